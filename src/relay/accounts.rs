//! The relay's accounts: who may use which space. Each account owns one space (named like the
//! account); devices join an account with a one-time enrolment code, then sign in on every
//! connection with their key and get short-lived access tokens and rotating refresh tokens.
//!
//! Owns: accounts, enrolment codes (only their hashes are stored), registered devices and their
//! revocation, refresh-token families (reuse of a rotated token revokes the family), the token
//! signing keys and their rotation, and the decision to let a device in (`admit`). What it keeps
//! in memory (devices, revoked families, the key ring) is read again when a relay sharing the
//! storage writes it (`*_elsewhere`, `reload`, from `server::follow_storage`).
//! Must not touch: the change log (`relay::store`), sessions and sockets (`relay::server` asks
//! and carries out the answer), the token format itself (`auth::token`), and how any of it is
//! kept (`relay::storage`: every read and write goes through `AccountStorage`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use ferry_proto::session::{Grant, validate_space};
use ferry_proto::wire::{Credential, ErrorCode, Secret, Tokens};
use serde::Serialize;
use sha2::Digest as _;
use tokio::sync::broadcast;

use super::storage::{AccountStorage, AccountWrite, EnrolmentRecord, StorageError, StoredKey};
use crate::auth::token::{
    self, Claims, Family, KeyRing, RefreshError, RefreshToken, SigningKeyEntry, TokenError,
    TokenPolicy,
};

pub use super::storage::{AccountRecord, ClientKind, DeviceRecord};

/// Characters of an enrolment code's secret: base32 without look-alikes' confusion (no padding).
const CODE_ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
/// Random bytes in an enrolment code's secret (120 bits: 24 characters).
const CODE_BYTES: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error(transparent)]
    Storage(StorageError),
    #[error("account name {0:?} is not valid: use 1 to 128 letters, digits, '-', '_' or '.'")]
    InvalidName(String),
    #[error("account {0:?} already exists")]
    Exists(String),
    #[error("there is no account {0:?}: create it with `ferry relay account add {0}`")]
    NoAccount(String),
    #[error("no device {0:?} is registered: `ferry relay devices` lists them")]
    NoDevice(String),
    #[error("no randomness from the operating system: {0}")]
    Entropy(String),
    #[error("cannot sign tokens: {0}")]
    Signing(#[from] TokenError),
    #[error("the password cannot be used: {0}")]
    Password(String),
}

/// Why a device was not let in. `Display` is what the device is told: it never says whether
/// an account or a record exists; `reason` is the short word the relay logs.
#[derive(Debug, thiserror::Error)]
pub enum Denied {
    #[error("the access token was refused ({0})")]
    Token(TokenError),
    #[error("the refresh token was refused ({0})")]
    Refresh(RefreshError),
    #[error(
        "this device is not registered in this account: register it with `ferry register` and \
         an enrolment code from the relay's operator"
    )]
    NotRegistered,
    #[error("this device was revoked by the relay's operator: it can no longer sync")]
    Revoked,
    #[error(
        "the enrolment code is not valid (unknown, expired or already used): ask the relay's \
         operator for a new one (`ferry relay enrol ACCOUNT`)"
    )]
    Enrolment,
    #[error(
        "this device is registered in another account: revoke it there before enrolling it here"
    )]
    OtherAccount,
    #[error("the account name or the password is wrong")]
    Login,
    #[error("the relay could not check the credential: {0}")]
    Store(#[from] AccountError),
}

impl Denied {
    pub fn code(&self) -> ErrorCode {
        match self {
            Denied::Token(_) | Denied::Refresh(_) | Denied::Enrolment | Denied::Login => {
                ErrorCode::AuthenticationFailed
            }
            Denied::NotRegistered | Denied::Revoked | Denied::OtherAccount => ErrorCode::Forbidden,
            Denied::Store(_) => ErrorCode::Internal,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            Denied::Token(e) => e.reason(),
            Denied::Refresh(e) => e.reason(),
            Denied::NotRegistered => "not_registered",
            Denied::Revoked => "device_revoked",
            Denied::Enrolment => "bad_enrolment_code",
            Denied::OtherAccount => "other_account",
            Denied::Login => "bad_login",
            Denied::Store(_) => "store",
        }
    }
}

/// Access withdrawn while devices may be connected: their sessions end at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revocation {
    Device(String),
    Family(String),
}

/// A new enrolment code: `ACCOUNT/SECRET`, shown once to the operator, never stored.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct EnrolmentCode {
    pub code: String,
    pub account: String,
    pub expires_ms: u64,
}

/// A device let in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    pub account: String,
    pub device: String,
    /// The token family the session's access token belongs to.
    pub family: String,
    pub grant: Grant,
}

/// Where the relay's random bytes come from: the operating system, or a seeded generator in
/// simulations.
pub type RandomSource = Arc<dyn Fn(&mut [u8]) -> Result<(), String> + Send + Sync>;

pub fn os_random() -> RandomSource {
    Arc::new(|bytes: &mut [u8]| getrandom::fill(bytes).map_err(|e| e.to_string()))
}

struct State {
    ring: KeyRing,
    devices: HashMap<String, DeviceRecord>,
    /// Families revoked since the relay started or stored as revoked: checked on every access
    /// token, so a revoked family's tokens stop working at once.
    revoked_families: HashSet<String>,
}

pub struct Accounts {
    storage: Arc<dyn AccountStorage>,
    policy: TokenPolicy,
    random: RandomSource,
    state: Mutex<State>,
    revocations: broadcast::Sender<Revocation>,
}

impl From<StorageError> for AccountError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::AccountExists(name) => AccountError::Exists(name),
            other => AccountError::Storage(other),
        }
    }
}

/// The token signing keys as stored.
fn read_ring(storage: &dyn AccountStorage) -> Result<KeyRing, AccountError> {
    let mut ring = KeyRing::default();
    for stored in storage.signing_keys()? {
        let mut entry = SigningKeyEntry::from_seed(stored.kid, stored.seed, stored.created_s);
        entry.retired_s = stored.retired_s;
        ring.insert(entry);
    }
    Ok(ring)
}

fn code_hash(secret: &str) -> [u8; 32] {
    sha2::Sha256::digest(secret.as_bytes()).into()
}

impl Accounts {
    /// Opens the accounts kept in `storage`, making a first token signing key if there is none.
    pub fn open(
        storage: Arc<dyn AccountStorage>,
        policy: TokenPolicy,
        random: RandomSource,
        now_ms: u64,
    ) -> Result<Self, AccountError> {
        let ring = read_ring(&*storage)?;
        let devices = storage
            .devices()?
            .into_iter()
            .map(|device| (device.device.clone(), device))
            .collect();
        let revoked_families = storage
            .families()?
            .into_iter()
            .filter(|family| family.revoked)
            .map(|family| family.id)
            .collect();
        let accounts = Accounts {
            storage,
            policy,
            random,
            state: Mutex::new(State {
                ring,
                devices,
                revoked_families,
            }),
            revocations: broadcast::channel(256).0,
        };
        if accounts.lock().ring.current().is_none() {
            accounts.rotate_signing_key(now_ms)?;
        }
        Ok(accounts)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn random<const N: usize>(&self) -> Result<[u8; N], AccountError> {
        let mut bytes = [0u8; N];
        (self.random)(&mut bytes).map_err(AccountError::Entropy)?;
        Ok(bytes)
    }

    fn commit(&self, writes: Vec<AccountWrite>) -> Result<(), AccountError> {
        Ok(self.storage.write_accounts(writes)?)
    }

    pub fn policy(&self) -> &TokenPolicy {
        &self.policy
    }

    /// Sessions listen here to end at once when their device or token family is revoked.
    pub fn subscribe_revocations(&self) -> broadcast::Receiver<Revocation> {
        self.revocations.subscribe()
    }

    /// Another relay sharing the storage wrote the device's record (registered it, signed it
    /// in, revoked or removed it): this relay reads it again, and a revocation ends the
    /// device's sessions here.
    pub fn device_written_elsewhere(&self, device: &str) -> Result<(), AccountError> {
        let record = self.storage.device(device)?;
        let mut state = self.lock();
        let was_admitted = state
            .devices
            .get(device)
            .is_some_and(|d| d.revoked_ms.is_none());
        let revoked = record.as_ref().is_none_or(|d| d.revoked_ms.is_some());
        match record {
            Some(record) => state.devices.insert(device.to_owned(), record),
            None => state.devices.remove(device),
        };
        drop(state);
        if was_admitted && revoked {
            let _ = self.revocations.send(Revocation::Device(device.to_owned()));
        }
        Ok(())
    }

    /// Another relay sharing the storage revoked a token family: its tokens stop working here
    /// and its sessions here end.
    pub fn family_revoked_elsewhere(&self, family: &str) {
        let fresh = self.lock().revoked_families.insert(family.to_owned());
        if fresh {
            let _ = self.revocations.send(Revocation::Family(family.to_owned()));
        }
    }

    /// Another relay sharing the storage changed the token signing keys: the ring is read
    /// again, so tokens it signs are verified here.
    pub fn signing_keys_changed_elsewhere(&self) -> Result<(), AccountError> {
        let ring = read_ring(&*self.storage)?;
        self.lock().ring = ring;
        Ok(())
    }

    /// Reads again everything this relay keeps of the accounts (devices, revoked families,
    /// signing keys), for writes other relays made while it could not hear of them; the
    /// sessions of what was revoked meanwhile end.
    pub fn reload(&self) -> Result<(), AccountError> {
        let ring = read_ring(&*self.storage)?;
        let devices: HashMap<String, DeviceRecord> = self
            .storage
            .devices()?
            .into_iter()
            .map(|device| (device.device.clone(), device))
            .collect();
        let revoked_families: HashSet<String> = self
            .storage
            .families()?
            .into_iter()
            .filter(|family| family.revoked)
            .map(|family| family.id)
            .collect();
        let mut state = self.lock();
        let mut revoked: Vec<Revocation> = state
            .devices
            .iter()
            .filter(|(id, d)| {
                d.revoked_ms.is_none() && devices.get(*id).is_none_or(|n| n.revoked_ms.is_some())
            })
            .map(|(id, _)| Revocation::Device(id.clone()))
            .collect();
        revoked.extend(
            revoked_families
                .difference(&state.revoked_families)
                .map(|f| Revocation::Family(f.clone())),
        );
        *state = State {
            ring,
            devices,
            revoked_families,
        };
        drop(state);
        for revocation in revoked {
            let _ = self.revocations.send(revocation);
        }
        Ok(())
    }

    pub fn add_account(&self, name: &str, now_ms: u64) -> Result<AccountRecord, AccountError> {
        validate_space(name).map_err(|_| AccountError::InvalidName(name.to_string()))?;
        let record = AccountRecord {
            name: name.to_string(),
            created_ms: now_ms,
        };
        self.commit(vec![AccountWrite::CreateAccount(record.clone())])?;
        tracing::info!(account = name, "account created");
        Ok(record)
    }

    pub fn accounts(&self) -> Result<Vec<AccountRecord>, AccountError> {
        Ok(self.storage.accounts()?)
    }

    fn account_exists(&self, name: &str) -> Result<bool, AccountError> {
        Ok(self.storage.account(name)?.is_some())
    }

    /// A one-time code that registers one device in `account` until `now_ms + ttl_ms`.
    pub fn enrol(
        &self,
        account: &str,
        ttl_ms: u64,
        now_ms: u64,
    ) -> Result<EnrolmentCode, AccountError> {
        if !self.account_exists(account)? {
            return Err(AccountError::NoAccount(account.to_string()));
        }
        let bytes: [u8; CODE_BYTES] = self.random()?;
        let secret: String = bytes
            .chunks(5)
            .flat_map(|chunk| {
                let bits = chunk.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
                (0..8)
                    .rev()
                    .filter_map(move |i| CODE_ALPHABET.get(((bits >> (i * 5)) & 31) as usize))
                    .map(|&c| char::from(c))
            })
            .collect();
        let expires_ms = now_ms.saturating_add(ttl_ms);
        self.commit(vec![AccountWrite::Enrolment {
            code_hash: code_hash(&secret),
            record: EnrolmentRecord {
                account: account.to_string(),
                expires_ms,
            },
        }])?;
        tracing::info!(account, expires_ms, "enrolment code issued");
        Ok(EnrolmentCode {
            code: format!("{account}/{secret}"),
            account: account.to_string(),
            expires_ms,
        })
    }

    /// Registered devices, of one account or all, in device id order.
    /// Whether `id` is a device the relay registered, in any account, revoked or not.
    pub fn is_device(&self, id: &str) -> bool {
        self.lock().devices.contains_key(id)
    }

    pub fn devices(&self, account: Option<&str>) -> Vec<DeviceRecord> {
        let mut devices: Vec<_> = self
            .lock()
            .devices
            .values()
            .filter(|d| account.is_none_or(|a| d.account == a))
            .cloned()
            .collect();
        devices.sort_by(|a, b| a.device.cmp(&b.device));
        devices
    }

    /// Cuts a device off: it can no longer sign in, its token families are revoked, and its
    /// open sessions end at once.
    pub fn revoke(&self, device: &str, now_ms: u64) -> Result<DeviceRecord, AccountError> {
        let mut state = self.lock();
        let mut record = state
            .devices
            .get(device)
            .cloned()
            .ok_or_else(|| AccountError::NoDevice(device.to_string()))?;
        record.revoked_ms.get_or_insert(now_ms);
        let mut writes = vec![AccountWrite::Device(record.clone())];
        let mut families = Vec::new();
        for mut family in self.storage.families()? {
            if family.device == device && !family.revoked {
                family.revoked = true;
                families.push(family.id.clone());
                writes.push(AccountWrite::Family(family));
            }
        }
        self.commit(writes)?;
        state.devices.insert(device.to_string(), record.clone());
        state.revoked_families.extend(families);
        drop(state);
        let _ = self
            .revocations
            .send(Revocation::Device(device.to_string()));
        tracing::info!(device, account = record.account, "device revoked");
        Ok(record)
    }

    /// Makes a new signing key current; the one it replaces still verifies tokens for the
    /// policy's overlap window, then is dropped. Token families past their expiry are removed
    /// at the same time: nothing they issued can verify any more; so are web clients that have
    /// not signed in or refreshed for that long (they can no longer, and each password login
    /// makes a new one).
    pub fn rotate_signing_key(&self, now_ms: u64) -> Result<String, AccountError> {
        let now_s = now_ms / 1000;
        let seed: [u8; 32] = self.random()?;
        let kid: [u8; 8] = self.random()?;
        let entry = SigningKeyEntry::from_seed(crate::hex::encode(&kid), seed, now_s);
        let kid = entry.kid.clone();
        let mut state = self.lock();
        let mut ring = state.ring.clone();
        ring.rotate(entry, now_s, &self.policy);
        let mut writes = Vec::new();
        for dropped in state.ring.entries().map(|e| e.kid.clone()) {
            if !ring.entries().any(|e| e.kid == dropped) {
                writes.push(AccountWrite::RemoveSigningKey(dropped));
            }
        }
        let mut expired = Vec::new();
        for family in self.storage.families()? {
            if family.expires_s <= now_s {
                writes.push(AccountWrite::RemoveFamily(family.id.clone()));
                expired.push(family.id);
            }
        }
        let web_expiry_ms = self.policy.refresh_ttl_s.saturating_mul(1000);
        let gone_web: Vec<String> = state
            .devices
            .values()
            .filter(|d| {
                d.kind == ClientKind::Web
                    && d.last_sign_in_ms.saturating_add(web_expiry_ms) <= now_ms
            })
            .map(|d| d.device.clone())
            .collect();
        for device in &gone_web {
            writes.push(AccountWrite::RemoveDevice(device.clone()));
        }
        for entry in ring.entries() {
            writes.push(AccountWrite::SigningKey(StoredKey {
                kid: entry.kid.clone(),
                seed: entry.seed(),
                created_s: entry.created_s,
                retired_s: entry.retired_s,
            }));
        }
        self.commit(writes)?;
        state.ring = ring;
        for id in &expired {
            state.revoked_families.remove(id);
        }
        for device in &gone_web {
            state.devices.remove(device);
        }
        tracing::info!(
            kid,
            expired_families = expired.len(),
            expired_web_clients = gone_web.len(),
            "token signing key rotated"
        );
        Ok(kid)
    }

    /// How old the current signing key is, in seconds.
    pub fn signing_key_age_s(&self, now_ms: u64) -> u64 {
        self.lock()
            .ring
            .current()
            .map_or(u64::MAX, |k| (now_ms / 1000).saturating_sub(k.created_s))
    }

    /// Checks an access token, including that its device and family are not revoked: for
    /// sessions resuming with one, and for the HTTP API.
    pub fn check_access(&self, token: &str, now_ms: u64) -> Result<Claims, Denied> {
        let state = self.lock();
        let claims = token::verify_access(&state.ring, &self.policy, token, now_ms / 1000)
            .map_err(Denied::Token)?;
        let device = state
            .devices
            .get(&claims.device)
            .filter(|d| d.account == claims.sub)
            .ok_or(Denied::NotRegistered)?;
        if device.revoked_ms.is_some() {
            return Err(Denied::Revoked);
        }
        if state.revoked_families.contains(&claims.fam) {
            return Err(Denied::Refresh(RefreshError::Revoked));
        }
        Ok(claims)
    }

    /// Whether a session signed in as `device` with a token of `family` may go on.
    pub fn still_admitted(&self, device: &str, family: &str) -> bool {
        let state = self.lock();
        let device_ok = state
            .devices
            .get(device)
            .is_some_and(|d| d.revoked_ms.is_none());
        device_ok && !state.revoked_families.contains(family)
    }

    /// Decides whether the device with `public_key` (whose signature the session checked) may
    /// use `space`, given its credential.
    pub fn admit(
        &self,
        public_key: [u8; 32],
        device: &str,
        space: &str,
        credential: &Credential,
        now_ms: u64,
    ) -> Result<Admitted, Denied> {
        // The device id is only a prefix of the key: a registered device is the whole key it
        // registered with.
        let other_key = |d: &DeviceRecord| d.public_key != public_key;
        if !matches!(credential, Credential::Enrol(_)) {
            self.know(device);
        }
        if !matches!(credential, Credential::Enrol(_))
            && self.lock().devices.get(device).is_some_and(other_key)
        {
            return Err(Denied::NotRegistered);
        }
        match credential {
            Credential::Enrol(code) => self.register(public_key, device, space, code, now_ms),
            Credential::Access(token) => {
                let claims = self.check_access(token.expose(), now_ms)?;
                claims.require_device(device).map_err(Denied::Token)?;
                if claims.sub != space {
                    return Err(Denied::NotRegistered);
                }
                self.seen(device, now_ms);
                Ok(Admitted {
                    account: claims.sub,
                    device: device.to_string(),
                    family: claims.fam,
                    grant: Grant {
                        expires_ms: claims.exp.saturating_mul(1000),
                        tokens: None,
                    },
                })
            }
            Credential::Refresh(refresh) => {
                self.member(device, space)?;
                let (family, tokens) = self.rotate(refresh, device, now_ms)?;
                Ok(self.admitted(space, device, family, tokens))
            }
            Credential::Key => {
                self.member(device, space)?;
                let (family, tokens) = self.start_family(space, device, now_ms)?;
                Ok(self.admitted(space, device, family, tokens))
            }
        }
    }

    /// Sets the account's password (for `login`), hashed with Argon2id.
    pub fn set_password(&self, account: &str, password: &Secret) -> Result<(), AccountError> {
        use argon2::password_hash::PasswordHasher as _;
        if !self.account_exists(account)? {
            return Err(AccountError::NoAccount(account.to_string()));
        }
        if password.expose().chars().count() < 8 {
            return Err(AccountError::Password(
                "it is shorter than 8 characters".into(),
            ));
        }
        let salt: [u8; 16] = self.random()?;
        let hash: argon2::password_hash::phc::PasswordHash = argon2::Argon2::default()
            .hash_password_with_salt(password.expose().as_bytes(), &salt)
            .map_err(|e| AccountError::Password(e.to_string()))?;
        self.commit(vec![AccountWrite::Password {
            account: account.to_string(),
            phc: hash.to_string(),
        }])?;
        tracing::info!(account, "account password set");
        Ok(())
    }

    /// A person or an HTTP-only client signs in with the account's password: it is registered
    /// as a `web` client of the account (listed, and revocable, like a device) and gets tokens.
    /// A wrong password and an unknown account get the same answer.
    pub fn login(
        &self,
        account: &str,
        password: &Secret,
        label: &str,
        now_ms: u64,
    ) -> Result<(String, Tokens), Denied> {
        use argon2::password_hash::phc::PasswordHash;
        use argon2::password_hash::{PasswordHasher as _, PasswordVerifier as _};
        let stored = self.storage.password(account).map_err(AccountError::from)?;
        let hash = stored
            .as_deref()
            .and_then(|text| PasswordHash::new(text).ok());
        let argon2 = argon2::Argon2::default();
        let verified = match hash {
            Some(hash) => argon2
                .verify_password(password.expose().as_bytes(), &hash)
                .is_ok(),
            None => {
                // As long as a real check, so the time taken does not tell which accounts
                // exist or have a password.
                let _: Result<PasswordHash, _> =
                    argon2.hash_password_with_salt(password.expose().as_bytes(), &[0; 16]);
                false
            }
        };
        if !verified {
            return Err(Denied::Login);
        }
        let device = crate::hex::encode(&self.random::<16>()?);
        let record = DeviceRecord {
            device: device.clone(),
            account: account.to_string(),
            kind: ClientKind::Web,
            label: label.chars().take(64).collect(),
            public_key: [0; 32],
            registered_ms: now_ms,
            revoked_ms: None,
            last_sign_in_ms: now_ms,
        };
        let mut state = self.lock();
        let (_, tokens, family_record) = self.new_family(&state, account, &device, now_ms)?;
        self.commit(vec![
            AccountWrite::Device(record.clone()),
            AccountWrite::Family(family_record),
        ])?;
        state.devices.insert(device.clone(), record);
        drop(state);
        tracing::info!(account, device, label, "web client signed in");
        Ok((device, tokens))
    }

    /// A bearer's refresh (HTTP): the refresh token alone names its family, device and account.
    pub fn refresh_bearer(
        &self,
        refresh: &Secret,
        now_ms: u64,
    ) -> Result<(String, String, Tokens), Denied> {
        let presented = RefreshToken::parse(refresh.expose())
            .map_err(|_| Denied::Refresh(RefreshError::Unknown))?;
        let family = self
            .storage
            .family(&presented.family)
            .map_err(AccountError::from)?
            .ok_or(Denied::Refresh(RefreshError::Unknown))?;
        let (_, tokens) = self.refresh(&family.device, &family.account, refresh, now_ms)?;
        Ok((family.account, family.device, tokens))
    }

    /// A session's refresh: the device rotates its refresh token and gets new tokens.
    pub fn refresh(
        &self,
        device: &str,
        space: &str,
        refresh: &Secret,
        now_ms: u64,
    ) -> Result<(String, Tokens), Denied> {
        self.member(device, space)?;
        self.rotate(refresh, device, now_ms)
    }

    fn admitted(&self, account: &str, device: &str, family: String, tokens: Tokens) -> Admitted {
        Admitted {
            account: account.to_string(),
            device: device.to_string(),
            family,
            grant: Grant {
                expires_ms: tokens.access_expires_ms,
                tokens: Some(tokens),
            },
        }
    }

    /// A device this relay does not know may have been registered through another relay
    /// sharing the storage moments ago, before this one heard of it: it is read from storage.
    fn know(&self, device: &str) {
        if self.lock().devices.contains_key(device) {
            return;
        }
        match self.storage.device(device) {
            Ok(Some(record)) => {
                self.lock()
                    .devices
                    .entry(device.to_owned())
                    .or_insert(record);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(device, error = %e, "cannot read an unknown device"),
        }
    }

    fn seen(&self, device: &str, now_ms: u64) {
        if let Some(record) = self.lock().devices.get_mut(device) {
            record.last_sign_in_ms = record.last_sign_in_ms.max(now_ms);
        }
    }

    /// The device is registered in `space` and not revoked. An unknown account and a device of
    /// another account get the same answer.
    fn member(&self, device: &str, space: &str) -> Result<(), Denied> {
        match self.lock().devices.get(device) {
            Some(d) if d.account != space => Err(Denied::NotRegistered),
            Some(d) if d.revoked_ms.is_some() => Err(Denied::Revoked),
            Some(_) => Ok(()),
            None => Err(Denied::NotRegistered),
        }
    }

    fn register(
        &self,
        public_key: [u8; 32],
        device: &str,
        space: &str,
        code: &Secret,
        now_ms: u64,
    ) -> Result<Admitted, Denied> {
        let (account, secret) = code.expose().split_once('/').ok_or(Denied::Enrolment)?;
        if account != space {
            return Err(Denied::Enrolment);
        }
        let code = code_hash(secret);
        let enrolment = self
            .storage
            .enrolment(&code)
            .map_err(AccountError::from)?
            .ok_or(Denied::Enrolment)?;
        if enrolment.account != account || enrolment.expires_ms <= now_ms {
            return Err(Denied::Enrolment);
        }
        let mut state = self.lock();
        if let Some(existing) = state.devices.get(device)
            && existing.account != account
            && existing.revoked_ms.is_none()
        {
            return Err(Denied::OtherAccount);
        }
        let record = DeviceRecord {
            device: device.to_string(),
            account: account.to_string(),
            kind: ClientKind::Device,
            label: String::new(),
            public_key,
            registered_ms: now_ms,
            revoked_ms: None,
            last_sign_in_ms: now_ms,
        };
        let (family, tokens, family_record) = self.new_family(&state, account, device, now_ms)?;
        // Another session may have used the code since it was read, and a code registers one
        // device only: the commit consumes it or is refused whole.
        match self.commit(vec![
            AccountWrite::ConsumeEnrolment(code),
            AccountWrite::Device(record.clone()),
            AccountWrite::Family(family_record),
        ]) {
            Err(AccountError::Storage(StorageError::EnrolmentUsed)) => {
                return Err(Denied::Enrolment);
            }
            other => other?,
        }
        state.devices.insert(device.to_string(), record);
        drop(state);
        tracing::info!(device, account, "device registered");
        Ok(self.admitted(account, device, family, tokens))
    }

    fn new_family(
        &self,
        state: &State,
        account: &str,
        device: &str,
        now_ms: u64,
    ) -> Result<(String, Tokens, Family), AccountError> {
        let now_s = now_ms / 1000;
        let family = crate::hex::encode(&self.random::<16>()?);
        let refresh = RefreshToken::new(family.clone(), self.random()?)?;
        let record = Family::start(
            family.clone(),
            account.to_string(),
            device.to_string(),
            &refresh,
            now_s,
            self.policy.refresh_ttl_s,
        );
        let tokens = self.issue(
            state,
            account,
            device,
            &family,
            &refresh,
            record.expires_s,
            now_ms,
        )?;
        Ok((family, tokens, record))
    }

    #[allow(clippy::too_many_arguments)]
    fn issue(
        &self,
        state: &State,
        account: &str,
        device: &str,
        family: &str,
        refresh: &RefreshToken,
        refresh_expires_s: u64,
        now_ms: u64,
    ) -> Result<Tokens, AccountError> {
        let (access, claims) = token::issue_access(
            &state.ring,
            &self.policy,
            account,
            device,
            family,
            now_ms / 1000,
            self.random()?,
        )?;
        Ok(Tokens {
            access: Secret::new(access),
            access_expires_ms: claims.exp.saturating_mul(1000),
            refresh: Secret::new(refresh.encode()),
            refresh_expires_ms: refresh_expires_s.saturating_mul(1000),
        })
    }

    fn start_family(
        &self,
        account: &str,
        device: &str,
        now_ms: u64,
    ) -> Result<(String, Tokens), Denied> {
        let mut state = self.lock();
        let (family, tokens, record) = self.new_family(&state, account, device, now_ms)?;
        let mut writes = vec![AccountWrite::Family(record)];
        if let Some(device_record) = state.devices.get_mut(device) {
            device_record.last_sign_in_ms = now_ms;
            writes.push(AccountWrite::Device(device_record.clone()));
        }
        self.commit(writes)?;
        Ok((family, tokens))
    }

    fn rotate(
        &self,
        presented: &Secret,
        device: &str,
        now_ms: u64,
    ) -> Result<(String, Tokens), Denied> {
        let presented = RefreshToken::parse(presented.expose())
            .map_err(|_| Denied::Refresh(RefreshError::Unknown))?;
        let mut state = self.lock();
        let mut family = self
            .storage
            .family(&presented.family)
            .map_err(AccountError::from)?
            .ok_or(Denied::Refresh(RefreshError::Unknown))?;
        let next =
            RefreshToken::new(family.id.clone(), self.random()?).map_err(AccountError::from)?;
        let now_s = now_ms / 1000;
        match family.rotate(&presented, &next, device, now_s, self.policy.refresh_ttl_s) {
            Ok(()) => {}
            Err(RefreshError::Reused) => {
                self.commit(vec![AccountWrite::Family(family.clone())])?;
                state.revoked_families.insert(family.id.clone());
                drop(state);
                let _ = self.revocations.send(Revocation::Family(family.id.clone()));
                tracing::warn!(
                    device,
                    family = family.id,
                    "a rotated refresh token was used again: its family is revoked"
                );
                return Err(Denied::Refresh(RefreshError::Reused));
            }
            Err(e) => return Err(Denied::Refresh(e)),
        }
        let tokens = self.issue(
            &state,
            &family.account,
            device,
            &family.id,
            &next,
            family.expires_s,
            now_ms,
        )?;
        let id = family.id.clone();
        let mut writes = vec![AccountWrite::Family(family)];
        if let Some(device_record) = state.devices.get_mut(device) {
            device_record.last_sign_in_ms = now_ms;
            writes.push(AccountWrite::Device(device_record.clone()));
        }
        self.commit(writes)?;
        Ok((id, tokens))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::storage::KvStorage;
    use crate::store::kv::MemoryKv;

    const DAY_MS: u64 = 86_400_000;

    fn open(kv: &MemoryKv, now_ms: u64) -> Accounts {
        let counter = std::sync::atomic::AtomicU8::new(0);
        let random: RandomSource = Arc::new(move |bytes: &mut [u8]| {
            let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            bytes
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = n ^ i as u8);
            Ok(())
        });
        let storage = Arc::new(KvStorage::new(Arc::new(kv.clone())));
        Accounts::open(storage, TokenPolicy::default(), random, now_ms).unwrap()
    }

    fn families(kv: &MemoryKv) -> usize {
        KvStorage::new(Arc::new(kv.clone()))
            .families()
            .unwrap()
            .len()
    }

    #[test]
    fn a_registered_device_signs_in_and_expired_families_go_at_the_next_rotation() {
        let kv = MemoryKv::new();
        let accounts = open(&kv, 0);
        accounts.add_account("team", 0).unwrap();
        let code = accounts.enrol("team", DAY_MS, 0).unwrap();
        let device = "00112233445566778899aabbccddeeff";
        let enrolled = accounts
            .admit(
                [1; 32],
                device,
                "team",
                &Credential::Enrol(Secret::new(code.code.clone())),
                0,
            )
            .unwrap();
        assert!(enrolled.grant.tokens.is_some());
        // The code is spent.
        assert!(matches!(
            accounts.admit(
                [1; 32],
                device,
                "team",
                &Credential::Enrol(Secret::new(code.code)),
                0
            ),
            Err(Denied::Enrolment)
        ));
        accounts
            .admit([1; 32], device, "team", &Credential::Key, 1_000)
            .unwrap();
        assert_eq!(families(&kv), 2);

        // Reopened (a restarted relay): the device and its families are still there.
        let accounts = open(&kv, 2_000);
        accounts
            .admit([1; 32], device, "team", &Credential::Key, 2_000)
            .unwrap();
        assert_eq!(families(&kv), 3);
        let ttl_ms = TokenPolicy::default().refresh_ttl_s * 1000;
        accounts.rotate_signing_key(ttl_ms + 2_000).unwrap();
        assert_eq!(families(&kv), 0, "every family had expired");
        assert_eq!(accounts.devices(Some("team")).len(), 1, "the device stays");
    }

    #[test]
    fn web_clients_sign_in_with_the_password_and_go_when_their_tokens_can_no_longer_renew() {
        let kv = MemoryKv::new();
        let accounts = open(&kv, 0);
        accounts.add_account("team", 0).unwrap();
        let password = Secret::new("correct horse battery");
        assert!(
            matches!(
                accounts.login("team", &password, "web", 0),
                Err(Denied::Login)
            ),
            "no password set yet"
        );
        assert!(matches!(
            accounts.set_password("team", &Secret::new("short")),
            Err(AccountError::Password(_))
        ));
        accounts.set_password("team", &password).unwrap();
        let (device, tokens) = accounts.login("team", &password, "browser", 1_000).unwrap();
        assert!(matches!(
            accounts.login("team", &Secret::new("wrong password"), "web", 1_000),
            Err(Denied::Login)
        ));
        assert!(matches!(
            accounts.login("nobody", &password, "web", 1_000),
            Err(Denied::Login)
        ));
        let claims = accounts
            .check_access(tokens.access.expose(), 2_000)
            .unwrap();
        assert_eq!(
            (claims.sub.as_str(), claims.device.as_str()),
            ("team", device.as_str())
        );
        let (account, refreshed_device, _) =
            accounts.refresh_bearer(&tokens.refresh, 3_000).unwrap();
        assert_eq!(
            (account.as_str(), refreshed_device),
            ("team", device.clone())
        );
        assert_eq!(accounts.devices(Some("team")).len(), 1);
        // A refresh token's lifetime after its last use, the web client is gone.
        let ttl_ms = TokenPolicy::default().refresh_ttl_s * 1000;
        accounts.rotate_signing_key(3_000 + ttl_ms - 1).unwrap();
        assert_eq!(accounts.devices(Some("team")).len(), 1, "not yet");
        accounts.rotate_signing_key(3_000 + ttl_ms).unwrap();
        assert!(accounts.devices(Some("team")).is_empty());
        assert!(
            open(&kv, 3_000 + ttl_ms).devices(None).is_empty(),
            "gone for good"
        );
    }

    #[test]
    fn revoking_a_device_revokes_its_families_and_tells_live_sessions() {
        let kv = MemoryKv::new();
        let accounts = open(&kv, 0);
        accounts.add_account("team", 0).unwrap();
        let code = accounts.enrol("team", DAY_MS, 0).unwrap();
        let device = "ffeeddccbbaa99887766554433221100";
        let admitted = accounts
            .admit(
                [2; 32],
                device,
                "team",
                &Credential::Enrol(Secret::new(code.code)),
                0,
            )
            .unwrap();
        let mut revocations = accounts.subscribe_revocations();
        assert!(accounts.still_admitted(device, &admitted.family));
        accounts.revoke(device, 5).unwrap();
        assert_eq!(
            revocations.try_recv().unwrap(),
            Revocation::Device(device.into())
        );
        assert!(!accounts.still_admitted(device, &admitted.family));
        let access = admitted.grant.tokens.unwrap().access;
        assert!(matches!(
            accounts.admit([2; 32], device, "team", &Credential::Access(access), 6),
            Err(Denied::Revoked)
        ));
        assert!(matches!(
            accounts.admit([2; 32], device, "team", &Credential::Key, 6),
            Err(Denied::Revoked)
        ));
        // Revocation survives a restart.
        let accounts = open(&kv, 7);
        assert!(matches!(
            accounts.admit([2; 32], device, "team", &Credential::Key, 7),
            Err(Denied::Revoked)
        ));
    }
}
