//! Access tokens (compact JWS, EdDSA over Ed25519) and rotating refresh tokens for the relay's
//! accounts: issuing, verifying, the ring of signing keys and their rotation, and the state of
//! one refresh-token family.
//!
//! Pure: time (unix seconds) and random bytes are arguments, so every result follows from the
//! inputs alone. Must not touch: storage (the caller persists keys and families), clocks,
//! randomness, sockets or logging of secrets.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use subtle::ConstantTimeEq as _;

/// Largest token accepted (bytes of the compact JWT); longer is refused before any parsing.
pub const MAX_TOKEN_BYTES: usize = 4096;

/// The only algorithm a token may name; verification never takes it from the header.
const ALGORITHM: &str = "EdDSA";
const REFRESH_PREFIX: &str = "rt1.";
const FAMILY_HEX_LEN: usize = 32;
const SECRET_B64_LEN: usize = 43;
const REFRESH_TOKEN_LEN: usize = REFRESH_PREFIX.len() + FAMILY_HEX_LEN + 1 + SECRET_B64_LEN;
const DEVICE_HEX_LEN: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    pub iss: String,
    pub aud: String,
    /// The account name.
    pub sub: String,
    /// The device id (32 lowercase hex digits).
    pub device: String,
    /// Unix seconds.
    pub exp: u64,
    pub nbf: u64,
    pub iat: u64,
    /// Hex of 16 random bytes given by the issuer.
    pub jti: String,
    /// The refresh-token family this access token was issued with.
    pub fam: String,
}

impl Claims {
    /// Refuses a token presented on a connection authenticated as another device.
    pub fn require_device(&self, device: &str) -> Result<(), TokenError> {
        if self.device == device {
            Ok(())
        } else {
            Err(TokenError::WrongDevice)
        }
    }
}

#[derive(Debug, Clone)]
pub struct TokenPolicy {
    pub issuer: String,
    pub audience: String,
    pub access_ttl_s: u64,
    /// Allowed clock skew for `exp`, `nbf` and `iat`.
    pub skew_s: u64,
    /// How long a retired signing key still verifies.
    pub overlap_s: u64,
    /// How long a refresh-token family lives after its last rotation.
    pub refresh_ttl_s: u64,
}

impl Default for TokenPolicy {
    fn default() -> Self {
        TokenPolicy {
            issuer: "ferry-relay".into(),
            audience: "ferry".into(),
            access_ttl_s: 600,
            skew_s: 60,
            overlap_s: 3600,
            refresh_ttl_s: 30 * 24 * 3600,
        }
    }
}

/// Why a token was refused. Messages never hold the token or any secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the access token is {len} bytes, over the limit of {max}: request a new one")]
    TooLarge { len: usize, max: usize },
    #[error("the access token is malformed ({0}): request a new one")]
    Malformed(&'static str),
    #[error(
        "the access token is not signed with EdDSA: only EdDSA tokens from the relay are accepted"
    )]
    Algorithm,
    #[error(
        "the access token header carries `{0}`, which is refused: request a new token from the relay"
    )]
    ForbiddenHeader(&'static str),
    #[error(
        "the access token names a signing key the relay does not hold: refresh it or reconnect"
    )]
    UnknownKey,
    #[error("the access token was signed with a retired key: refresh it or reconnect")]
    RetiredKey,
    #[error("the access token's signature does not verify: request a new one")]
    BadSignature,
    #[error("the access token expired: refresh it or reconnect")]
    Expired,
    #[error("the access token is not valid yet: check the device's clock")]
    NotYetValid,
    #[error("the access token is for another audience: request one for this service")]
    WrongAudience,
    #[error("the access token was issued by another issuer: request one from this relay")]
    WrongIssuer,
    #[error("the access token belongs to another device: use the token issued to this device")]
    WrongDevice,
    #[error("the access token's claims are invalid ({0}): request a new one")]
    InvalidClaim(&'static str),
    #[error("the relay has no current signing key: rotate one in before issuing tokens")]
    NoSigningKey,
    #[error("the refresh token is malformed ({0}): sign in again")]
    MalformedRefresh(&'static str),
}

impl TokenError {
    /// A stable short name for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::TooLarge { .. } => "too_large",
            TokenError::Malformed(_) => "malformed",
            TokenError::Algorithm => "algorithm",
            TokenError::ForbiddenHeader(_) => "forbidden_header",
            TokenError::UnknownKey => "unknown_key",
            TokenError::RetiredKey => "retired_key",
            TokenError::BadSignature => "bad_signature",
            TokenError::Expired => "expired",
            TokenError::NotYetValid => "not_yet_valid",
            TokenError::WrongAudience => "wrong_audience",
            TokenError::WrongIssuer => "wrong_issuer",
            TokenError::WrongDevice => "wrong_device",
            TokenError::InvalidClaim(_) => "invalid_claim",
            TokenError::NoSigningKey => "no_signing_key",
            TokenError::MalformedRefresh(_) => "malformed_refresh",
        }
    }
}

/// One signing key; the ring holds the current key and retired ones still in their overlap window.
#[derive(Clone)]
pub struct SigningKeyEntry {
    pub kid: String,
    pub created_s: u64,
    pub retired_s: Option<u64>,
    key: SigningKey,
    verifying: VerifyingKey,
}

impl SigningKeyEntry {
    pub fn from_seed(kid: String, seed: [u8; 32], created_s: u64) -> Self {
        let key = SigningKey::from_bytes(&seed);
        SigningKeyEntry {
            kid,
            created_s,
            retired_s: None,
            verifying: key.verifying_key(),
            key,
        }
    }

    /// The secret seed, for the caller to persist.
    pub fn seed(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// The public key, for publishing to whoever verifies tokens elsewhere.
    pub fn public_key(&self) -> [u8; 32] {
        self.verifying.to_bytes()
    }

    /// Whether the key is past its overlap window at `now_s` and no longer verifies.
    fn expired(&self, now_s: u64, policy: &TokenPolicy) -> bool {
        self.retired_s
            .is_some_and(|retired| now_s >= retired.saturating_add(policy.overlap_s))
    }
}

// The seed must never reach a log: Debug shows only what identifies the key.
impl std::fmt::Debug for SigningKeyEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKeyEntry")
            .field("kid", &self.kid)
            .field("created_s", &self.created_s)
            .field("retired_s", &self.retired_s)
            .finish_non_exhaustive()
    }
}

/// The relay's signing keys: at most one current key (issues and verifies) and retired keys that
/// still verify during their overlap window, so tokens issued just before a rotation stay valid.
#[derive(Clone, Default, Debug)]
pub struct KeyRing {
    keys: Vec<SigningKeyEntry>,
}

impl KeyRing {
    /// Adds a key as persisted (retired or not), replacing any key with the same kid.
    pub fn insert(&mut self, key: SigningKeyEntry) {
        self.keys.retain(|k| k.kid != key.kid);
        self.keys.push(key);
    }

    /// Retires the current key at `now_s`, makes `next` current. Keys whose overlap window is
    /// over are dropped.
    pub fn rotate(&mut self, mut next: SigningKeyEntry, now_s: u64, policy: &TokenPolicy) {
        for key in self.keys.iter_mut().filter(|k| k.retired_s.is_none()) {
            key.retired_s = Some(now_s);
        }
        next.retired_s = None;
        self.insert(next);
        self.prune(now_s, policy);
    }

    /// The key new tokens are signed with: of the keys not retired, the newest (a ring loaded
    /// from storage in any order picks the same one).
    pub fn current(&self) -> Option<&SigningKeyEntry> {
        self.keys
            .iter()
            .filter(|k| k.retired_s.is_none())
            .max_by(|a, b| (a.created_s, &a.kid).cmp(&(b.created_s, &b.kid)))
    }

    pub fn entries(&self) -> impl Iterator<Item = &SigningKeyEntry> {
        self.keys.iter()
    }

    /// Drops keys retired more than `overlap_s` ago; returns the kids dropped.
    pub fn prune(&mut self, now_s: u64, policy: &TokenPolicy) -> Vec<String> {
        let (gone, kept) = std::mem::take(&mut self.keys)
            .into_iter()
            .partition(|k| k.expired(now_s, policy));
        self.keys = kept;
        gone.into_iter().map(|k: SigningKeyEntry| k.kid).collect()
    }

    fn find(&self, kid: &str) -> Option<&SigningKeyEntry> {
        self.keys.iter().find(|k| k.kid == kid)
    }
}

/// Signs a new access token for `account` on `device` with the ring's current key.
pub fn issue_access(
    ring: &KeyRing,
    policy: &TokenPolicy,
    account: &str,
    device: &str,
    family: &str,
    now_s: u64,
    jti: [u8; 16],
) -> Result<(String, Claims), TokenError> {
    let key = ring.current().ok_or(TokenError::NoSigningKey)?;
    let claims = Claims {
        iss: policy.issuer.clone(),
        aud: policy.audience.clone(),
        sub: account.to_owned(),
        device: device.to_owned(),
        exp: now_s.saturating_add(policy.access_ttl_s),
        nbf: now_s,
        iat: now_s,
        jti: crate::hex::encode(&jti),
        fam: family.to_owned(),
    };
    // A token this relay would refuse must not be handed out.
    check_shape(&claims)?;
    let header = serde_json::json!({ "alg": ALGORITHM, "typ": "JWT", "kid": key.kid });
    let payload =
        serde_json::to_vec(&claims).map_err(|_| TokenError::InvalidClaim("not serialisable"))?;
    let mut token = format!(
        "{}.{}",
        B64.encode(header.to_string().as_bytes()),
        B64.encode(payload)
    );
    let signature = key.key.sign(token.as_bytes());
    token.push('.');
    token.push_str(&B64.encode(signature.to_bytes()));
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::TooLarge {
            len: token.len(),
            max: MAX_TOKEN_BYTES,
        });
    }
    Ok((token, claims))
}

/// The header fields a token may carry. Fields that would let the token choose its own key or
/// extend the rules (`jku`, `x5u`, `jwk`, `x5c`, `crit`, ...) are read only to be refused by
/// name; any other field, and any field given twice, fails to deserialize.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    // Optional here so that a header without them is refused with the specific reason.
    #[serde(default)]
    alg: Option<String>,
    #[serde(default)]
    typ: Option<String>,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default, deserialize_with = "present")]
    jku: bool,
    #[serde(default, deserialize_with = "present")]
    x5u: bool,
    #[serde(default, deserialize_with = "present")]
    jwk: bool,
    #[serde(default, deserialize_with = "present")]
    x5c: bool,
    #[serde(default, deserialize_with = "present")]
    x5t: bool,
    #[serde(default, rename = "x5t#S256", deserialize_with = "present")]
    x5t_s256: bool,
    #[serde(default, deserialize_with = "present")]
    crit: bool,
}

/// True whenever the field is there, whatever its value (`null` included).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    serde::de::IgnoredAny::deserialize(d).map(|_| true)
}

impl Header {
    fn forbidden(&self) -> Option<&'static str> {
        [
            (self.jku, "jku"),
            (self.x5u, "x5u"),
            (self.jwk, "jwk"),
            (self.x5c, "x5c"),
            (self.x5t, "x5t"),
            (self.x5t_s256, "x5t#S256"),
            (self.crit, "crit"),
        ]
        .into_iter()
        .find_map(|(there, name)| there.then_some(name))
    }
}

/// Verifies an access token: size, structure, header, key, signature, then claims. Nothing
/// but the header (to find the key) is read before the signature verifies.
pub fn verify_access(
    ring: &KeyRing,
    policy: &TokenPolicy,
    token: &str,
    now_s: u64,
) -> Result<Claims, TokenError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::TooLarge {
            len: token.len(),
            max: MAX_TOKEN_BYTES,
        });
    }
    let mut parts = token.split('.');
    let (Some(header_b64), Some(payload_b64), signature_b64, None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed("expected three dot-separated parts"));
    };
    let header_json = B64
        .decode(header_b64)
        .map_err(|_| TokenError::Malformed("header is not base64url"))?;
    let header: Header = object(&header_json).ok_or(TokenError::Malformed(
        "header is not a JSON object of known, distinct, well-typed fields",
    ))?;
    if header.alg.as_deref() != Some(ALGORITHM) {
        return Err(TokenError::Algorithm);
    }
    if let Some(name) = header.forbidden() {
        return Err(TokenError::ForbiddenHeader(name));
    }
    if header.typ.as_deref().is_some_and(|typ| typ != "JWT") {
        return Err(TokenError::ForbiddenHeader("typ other than JWT"));
    }
    // Checked after the header so that an unsigned (`alg: none`) token is named as such.
    let signature = signature_b64
        .filter(|s| !s.is_empty())
        .ok_or(TokenError::Malformed("no signature"))?;
    let signature = B64
        .decode(signature)
        .ok()
        .and_then(|bytes| Signature::from_slice(&bytes).ok())
        .ok_or(TokenError::Malformed("signature is not 64 base64url bytes"))?;
    let kid = header
        .kid
        .ok_or(TokenError::Malformed("header names no key"))?;
    let key = ring.find(&kid).ok_or(TokenError::UnknownKey)?;
    if key.expired(now_s, policy) {
        return Err(TokenError::RetiredKey);
    }
    let signed_len = header_b64.len() + 1 + payload_b64.len();
    let signed = token
        .get(..signed_len)
        .ok_or(TokenError::Malformed("expected three dot-separated parts"))?;
    key.verifying
        .verify_strict(signed.as_bytes(), &signature)
        .map_err(|_| TokenError::BadSignature)?;

    let payload = B64
        .decode(payload_b64)
        .map_err(|_| TokenError::Malformed("payload is not base64url"))?;
    let claims: Claims = object(&payload).ok_or(TokenError::InvalidClaim(
        "payload is not a JSON object of exactly the expected claims",
    ))?;
    if claims.iss != policy.issuer {
        return Err(TokenError::WrongIssuer);
    }
    if claims.aud != policy.audience {
        return Err(TokenError::WrongAudience);
    }
    if claims.exp.saturating_add(policy.skew_s) <= now_s {
        return Err(TokenError::Expired);
    }
    let latest = now_s.saturating_add(policy.skew_s);
    if claims.nbf > latest || claims.iat > latest {
        return Err(TokenError::NotYetValid);
    }
    check_shape(&claims)?;
    Ok(claims)
}

/// A JSON object into `T`. serde's derived structs would also take a JSON array of the field
/// values in order; a JOSE header or claim set is an object, so anything else is refused.
fn object<T: serde::de::DeserializeOwned>(json: &[u8]) -> Option<T> {
    if json.first() != Some(&b'{') {
        return None;
    }
    serde_json::from_slice(json).ok()
}

/// What every token, issued or presented, must satisfy beyond its times and parties.
fn check_shape(claims: &Claims) -> Result<(), TokenError> {
    if !is_lower_hex(&claims.device, DEVICE_HEX_LEN) {
        return Err(TokenError::InvalidClaim(
            "device is not 32 lowercase hex digits",
        ));
    }
    if claims.sub.is_empty() {
        return Err(TokenError::InvalidClaim("empty account name"));
    }
    Ok(())
}

fn is_lower_hex(text: &str, len: usize) -> bool {
    text.len() == len && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// An opaque refresh token, `rt1.<family id: 32 lowercase hex>.<secret: 32 bytes base64url>`.
/// The relay stores only the secret's hash.
#[derive(Clone)]
pub struct RefreshToken {
    pub family: String,
    secret: [u8; 32],
}

// The secret must never reach a log.
impl std::fmt::Debug for RefreshToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefreshToken")
            .field("family", &self.family)
            .finish_non_exhaustive()
    }
}

impl RefreshToken {
    /// Refuses a family id that is not 32 lowercase hex digits: its token could not be parsed
    /// back, and the device would be locked out.
    pub fn new(family: String, secret: [u8; 32]) -> Result<Self, TokenError> {
        if !is_lower_hex(&family, FAMILY_HEX_LEN) {
            return Err(TokenError::MalformedRefresh(
                "family id is not 32 lowercase hex digits",
            ));
        }
        Ok(RefreshToken { family, secret })
    }

    pub fn parse(text: &str) -> Result<Self, TokenError> {
        if text.len() != REFRESH_TOKEN_LEN {
            return Err(TokenError::MalformedRefresh("wrong length"));
        }
        let rest = text
            .strip_prefix(REFRESH_PREFIX)
            .ok_or(TokenError::MalformedRefresh("not an rt1 token"))?;
        let (family, secret) = rest
            .split_once('.')
            .ok_or(TokenError::MalformedRefresh("no secret part"))?;
        let secret: [u8; 32] = B64
            .decode(secret)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or(TokenError::MalformedRefresh(
                "secret is not 32 base64url bytes",
            ))?;
        RefreshToken::new(family.to_owned(), secret)
    }

    pub fn encode(&self) -> String {
        format!(
            "{REFRESH_PREFIX}{}.{}",
            self.family,
            B64.encode(self.secret)
        )
    }

    /// SHA-256 of the secret: what the relay stores instead of the secret.
    pub fn secret_hash(&self) -> [u8; 32] {
        sha2::Sha256::digest(self.secret).into()
    }
}

/// The relay's record of one refresh-token family: which account and device it belongs to, the
/// hash of the one refresh token currently valid, and whether the family is revoked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Family {
    pub id: String,
    pub account: String,
    pub device: String,
    pub current: [u8; 32],
    pub generation: u32,
    pub revoked: bool,
    pub expires_s: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RefreshError {
    #[error("the refresh token is not known to the relay: sign in again")]
    Unknown,
    #[error("the refresh token's family was revoked: sign in again")]
    Revoked,
    #[error("the refresh token expired: sign in again")]
    Expired,
    #[error(
        "an already used refresh token was presented, so its family is now revoked: sign in again"
    )]
    Reused,
    #[error("the refresh token belongs to another device: use the token issued to this device")]
    WrongDevice,
    #[error(
        "the next refresh token was made for another family: issue it for the family it rotates"
    )]
    FamilyMismatch,
}

impl RefreshError {
    /// A stable short name for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            RefreshError::Unknown => "unknown",
            RefreshError::Revoked => "revoked",
            RefreshError::Expired => "expired",
            RefreshError::Reused => "reused",
            RefreshError::WrongDevice => "wrong_device",
            RefreshError::FamilyMismatch => "family_mismatch",
        }
    }
}

impl Family {
    pub fn start(
        id: String,
        account: String,
        device: String,
        first: &RefreshToken,
        now_s: u64,
        refresh_ttl_s: u64,
    ) -> Family {
        Family {
            id,
            account,
            device,
            current: first.secret_hash(),
            generation: 0,
            revoked: false,
            expires_s: now_s.saturating_add(refresh_ttl_s),
        }
    }

    /// Presenting the current token rotates to `next` (generation + 1, new expiry). Presenting
    /// any other token of this family revokes it: `Err(Reused)` with `self.revoked` set, for the
    /// caller to persist. `device` is the connection's authenticated device; it is checked
    /// before the token, so only the family's own device can trigger a revocation (a family id
    /// is not secret: access tokens carry it).
    pub fn rotate(
        &mut self,
        presented: &RefreshToken,
        next: &RefreshToken,
        device: &str,
        now_s: u64,
        refresh_ttl_s: u64,
    ) -> Result<(), RefreshError> {
        if presented.family != self.id {
            return Err(RefreshError::Unknown);
        }
        if next.family != self.id {
            return Err(RefreshError::FamilyMismatch);
        }
        if self.revoked {
            return Err(RefreshError::Revoked);
        }
        if now_s >= self.expires_s {
            return Err(RefreshError::Expired);
        }
        if device != self.device {
            return Err(RefreshError::WrongDevice);
        }
        if !bool::from(presented.secret_hash().ct_eq(&self.current)) {
            self.revoked = true;
            return Err(RefreshError::Reused);
        }
        self.current = next.secret_hash();
        self.generation = self.generation.saturating_add(1);
        self.expires_s = now_s.saturating_add(refresh_ttl_s);
        Ok(())
    }
}
