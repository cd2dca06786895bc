//! The relay's accounts (`Accounts` on a `MemoryKv`, time passed in) against bad credentials:
//! each forged, stale, misdirected, reused or revoked credential is refused with its own
//! `Denied` variant and logged reason, and the refusal leaves every key and value of the store
//! as it was, except where the refusal is itself the change (a reused refresh token revokes its
//! family, and exactly that is written). As properties, random mutations of a valid access
//! token or refresh token never let anyone in under other claims, never panic and never change
//! the store beyond that one revocation.

// A test stops at the first thing that goes wrong: panicking is how it reports it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

mod common;

use std::sync::{Arc, Mutex};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use common::proptest_config;
use ed25519_dalek::{Signer as _, SigningKey};
use ferry::auth::token::{
    Claims, Family, KeyRing, MAX_TOKEN_BYTES, RefreshError, SigningKeyEntry, TokenError,
    TokenPolicy, issue_access,
};
use ferry::relay::accounts::{Accounts, Admitted, Denied, RandomSource};
use ferry::relay::storage::KvStorage;
use ferry::store::kv::{Batch, Kv, KvError, MemoryKv, Pair};
use ferry_proto::session::device_id;
use ferry_proto::wire::{Credential, Secret, Tokens};
use proptest::prelude::*;
use rand::SeedableRng as _;
use rand::rngs::StdRng;
use serde_json::{Value, json};

/// The relay's clock at the start of every test, unix milliseconds.
const NOW: u64 = 1_700_000_000_000;
const SECOND: u64 = 1_000;
const HOUR: u64 = 3_600 * SECOND;

/// A relay's accounts on a store the test can read behind its back.
struct Relay {
    kv: MemoryKv,
    accounts: Accounts,
}

/// A device registered in an account, with the tokens it was last given.
struct Member {
    key: SigningKey,
    device: String,
    account: &'static str,
    family: String,
    tokens: Tokens,
}

impl Member {
    fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// Signs in as this device, in its own account, showing `credential`.
    fn admit(
        &self,
        relay: &Relay,
        credential: Credential,
        now_ms: u64,
    ) -> Result<Admitted, Denied> {
        relay.accounts.admit(
            self.public_key(),
            &self.device,
            self.account,
            &credential,
            now_ms,
        )
    }

    fn access(&self) -> Credential {
        Credential::Access(self.tokens.access.clone())
    }

    fn refresh(&self) -> Credential {
        Credential::Refresh(self.tokens.refresh.clone())
    }
}

fn seeded(seed: u64) -> RandomSource {
    let rng = Mutex::new(StdRng::seed_from_u64(seed));
    Arc::new(move |bytes: &mut [u8]| {
        rng.lock().map_err(|e| e.to_string())?.fill(bytes);
        Ok(())
    })
}

impl Relay {
    /// Accounts `alice` and `bob` on an empty store.
    fn open() -> Relay {
        let kv = MemoryKv::new();
        let accounts = Accounts::open(
            Arc::new(KvStorage::new(Arc::new(kv.clone()))),
            TokenPolicy::default(),
            seeded(1),
            NOW,
        )
        .expect("open the accounts");
        for name in ["alice", "bob"] {
            accounts.add_account(name, NOW).expect("add an account");
        }
        Relay { kv, accounts }
    }

    fn code(&self, account: &str, ttl_ms: u64, now_ms: u64) -> Credential {
        let code = self.accounts.enrol(account, ttl_ms, now_ms).expect("enrol");
        Credential::Enrol(Secret::new(code.code))
    }

    /// Registers the device whose key is made of `seed` in `account` with a fresh code.
    fn join(&self, seed: u8, account: &'static str) -> Member {
        let key = SigningKey::from_bytes(&[seed; 32]);
        let device = device_id(&key.verifying_key().to_bytes());
        let admitted = self
            .accounts
            .admit(
                key.verifying_key().to_bytes(),
                &device,
                account,
                &self.code(account, HOUR, NOW),
                NOW,
            )
            .expect("the enrolment code registers the device");
        let tokens = admitted.grant.tokens.expect("tokens for a new device");
        Member {
            key,
            device,
            account,
            family: admitted.family,
            tokens,
        }
    }

    /// Every key and value in the store.
    fn snapshot(&self) -> Vec<Pair> {
        self.kv
            .range(&[], &[0xff], usize::MAX)
            .expect("read the store")
    }

    /// The relay's signing keys as stored (`K{kid}` → postcard of kid, seed, created_s,
    /// retired_s), so a test can sign tokens exactly as the relay would and vary one thing.
    fn stored_ring(&self) -> KeyRing {
        #[derive(serde::Deserialize)]
        struct StoredKey {
            kid: String,
            seed: [u8; 32],
            created_s: u64,
            retired_s: Option<u64>,
        }
        let mut ring = KeyRing::default();
        for (_, value) in self.kv.range(b"K", b"L", usize::MAX).expect("read keys") {
            let stored: StoredKey = postcard::from_bytes(&value).expect("a stored signing key");
            let mut entry = SigningKeyEntry::from_seed(stored.kid, stored.seed, stored.created_s);
            entry.retired_s = stored.retired_s;
            ring.insert(entry);
        }
        ring
    }

    fn family(&self, id: &str) -> Family {
        let bytes = self
            .kv
            .get(format!("F{id}").as_bytes())
            .expect("read a family")
            .expect("the family is stored");
        postcard::from_bytes(&bytes).expect("a stored family")
    }

    /// Runs `attempt`, which must be refused as `expected` (logged as `reason`) and change
    /// nothing in the store.
    fn refused<T: std::fmt::Debug>(
        &self,
        what: &str,
        expected: Denied,
        reason: &str,
        attempt: impl FnOnce(&Accounts) -> Result<T, Denied>,
    ) {
        let before = self.snapshot();
        let result = attempt(&self.accounts);
        assert_eq!(
            self.snapshot(),
            before,
            "{what}: the refusal changed the store"
        );
        let denied = match result {
            Ok(let_in) => panic!("{what}: let in ({let_in:?}), expected {expected:?}"),
            Err(denied) => denied,
        };
        assert_eq!(
            format!("{denied:?}"),
            format!("{expected:?}"),
            "{what}: {denied}"
        );
        assert_eq!(denied.reason(), reason, "{what}");
    }
}

fn access(token: &str) -> Credential {
    Credential::Access(Secret::new(token))
}

fn jwt_parts(token: &str) -> (String, String, String) {
    let mut parts = token.split('.').map(str::to_owned);
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(h), Some(p), Some(s), None) => (h, p, s),
        _ => panic!("not a JWT: {token}"),
    }
}

/// A token with this header and payload, signed with `seed`'s Ed25519 key.
fn signed(seed: [u8; 32], header: &Value, payload: &str) -> String {
    let message = format!("{}.{}", B64.encode(header.to_string()), B64.encode(payload));
    let signature = SigningKey::from_bytes(&seed).sign(message.as_bytes());
    format!("{message}.{}", B64.encode(signature.to_bytes()))
}

/// The claims of `member`'s access token, as the relay reads them.
fn claims(relay: &Relay, member: &Member) -> Claims {
    relay
        .accounts
        .check_access(member.tokens.access.expose(), NOW)
        .expect("the member's access token is valid")
}

#[test]
fn a_valid_access_token_signs_in_and_writes_nothing() {
    let relay = Relay::open();
    let alice = relay.join(1, "alice");
    let before = relay.snapshot();
    let admitted = alice.admit(&relay, alice.access(), NOW).expect("let in");
    assert_eq!(relay.snapshot(), before);
    assert_eq!(
        (admitted.account.as_str(), admitted.device.as_str()),
        ("alice", alice.device.as_str())
    );
    assert_eq!(admitted.family, alice.family);
    assert_eq!(
        admitted.grant.tokens, None,
        "an access token gets no new tokens"
    );
    // The store holds no token: only hashes of refresh tokens.
    let stored = format!("{:?}", relay.snapshot());
    for secret in [&alice.tokens.access, &alice.tokens.refresh] {
        let text = secret.expose();
        assert!(!stored.contains(&format!("{:?}", text.as_bytes())));
    }
}

#[test]
fn forged_access_tokens_are_refused() {
    let relay = Relay::open();
    let alice = relay.join(1, "alice");
    let keys = relay.stored_ring();
    let key = keys.current().expect("a current key");
    let (h, p, s) = jwt_parts(alice.tokens.access.expose());
    let payload = String::from_utf8(B64.decode(&p).expect("payload")).expect("JSON text");
    let alice = &alice;
    let sign_in = |token: String| {
        move |a: &Accounts| {
            a.admit(
                alice.public_key(),
                &alice.device,
                "alice",
                &access(&token),
                NOW,
            )
        }
    };

    let unsigned = B64.encode(json!({ "alg": "none", "typ": "JWT", "kid": key.kid }).to_string());
    for token in [format!("{unsigned}.{p}."), format!("{unsigned}.{p}.{s}")] {
        relay.refused(
            "alg none",
            Denied::Token(TokenError::Algorithm),
            "algorithm",
            sign_in(token),
        );
    }

    let hmac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key.public_key());
    let hs256 = B64.encode(json!({ "alg": "HS256", "typ": "JWT", "kid": key.kid }).to_string());
    let message = format!("{hs256}.{p}");
    let tag = ring::hmac::sign(&hmac, message.as_bytes());
    relay.refused(
        "HS256 keyed with the relay's public key",
        Denied::Token(TokenError::Algorithm),
        "algorithm",
        sign_in(format!("{message}.{}", B64.encode(tag.as_ref()))),
    );

    let signature = B64.decode(&s).expect("signature");
    for bit in [0, 7, 100, 255, 256, 511] {
        let mut flipped = signature.clone();
        flipped[bit / 8] ^= 1 << (bit % 8);
        relay.refused(
            &format!("signature bit {bit} flipped"),
            Denied::Token(TokenError::BadSignature),
            "bad_signature",
            sign_in(format!("{h}.{p}.{}", B64.encode(&flipped))),
        );
    }

    let stranger = SigningKeyEntry::from_seed("0badc0de0badc0de".into(), [42; 32], NOW / SECOND);
    let header = json!({ "alg": "EdDSA", "typ": "JWT", "kid": stranger.kid });
    relay.refused(
        "a key the relay does not hold",
        Denied::Token(TokenError::UnknownKey),
        "unknown_key",
        sign_in(signed(stranger.seed(), &header, &payload)),
    );

    for (name, url) in [
        ("jku", "https://evil.example/jwks"),
        ("x5u", "https://evil.example/cert"),
    ] {
        let mut header = json!({ "alg": "EdDSA", "typ": "JWT", "kid": key.kid });
        header[name] = json!(url);
        relay.refused(
            &format!("a {name} header"),
            Denied::Token(TokenError::ForbiddenHeader(name)),
            "forbidden_header",
            sign_in(signed(key.seed(), &header, &payload)),
        );
    }
    // The control: the same header without the forbidden field, signed the same way, is let in.
    let header = json!({ "alg": "EdDSA", "typ": "JWT", "kid": key.kid });
    sign_in(signed(key.seed(), &header, &payload))(&relay.accounts).expect("a well-made token");

    let oversized = format!("{h}.{p}.{s}{}", "A".repeat(MAX_TOKEN_BYTES));
    relay.refused(
        "an oversized token",
        Denied::Token(TokenError::TooLarge {
            len: oversized.len(),
            max: MAX_TOKEN_BYTES,
        }),
        "too_large",
        sign_in(oversized),
    );
}

#[test]
fn stale_and_misdirected_access_tokens_are_refused() {
    let relay = Relay::open();
    let alice = relay.join(1, "alice");
    let alice_laptop = relay.join(2, "alice");
    let bob = relay.join(3, "bob");
    let ring = relay.stored_ring();
    let issued = claims(&relay, &alice);
    let policy = TokenPolicy::default();
    let reissue = |policy: &TokenPolicy, now_ms: u64| {
        let (token, _) = issue_access(
            &ring,
            policy,
            "alice",
            &alice.device,
            &alice.family,
            now_ms / SECOND,
            [5; 16],
        )
        .expect("sign with the relay's key");
        token
    };

    // Expiry: valid up to `skew_s` past `exp`, then refused.
    let expiry_ms = (issued.exp + policy.skew_s) * SECOND;
    alice
        .admit(&relay, alice.access(), expiry_ms - SECOND)
        .expect("inside the skew");
    relay.refused(
        "expired beyond the skew",
        Denied::Token(TokenError::Expired),
        "expired",
        |_| alice.admit(&relay, alice.access(), expiry_ms),
    );

    let early = reissue(&policy, NOW + (policy.skew_s + 1) * SECOND);
    relay.refused(
        "nbf in the future",
        Denied::Token(TokenError::NotYetValid),
        "not_yet_valid",
        |_| alice.admit(&relay, access(&early), NOW),
    );
    let skewed = reissue(&policy, NOW + policy.skew_s * SECOND);
    alice
        .admit(&relay, access(&skewed), NOW)
        .expect("nbf inside the skew");

    let other_audience = TokenPolicy {
        audience: "someone-else".into(),
        ..TokenPolicy::default()
    };
    relay.refused(
        "wrong aud",
        Denied::Token(TokenError::WrongAudience),
        "wrong_audience",
        |_| alice.admit(&relay, access(&reissue(&other_audience, NOW)), NOW),
    );
    let other_issuer = TokenPolicy {
        issuer: "another-relay".into(),
        ..TokenPolicy::default()
    };
    relay.refused(
        "wrong iss",
        Denied::Token(TokenError::WrongIssuer),
        "wrong_issuer",
        |_| alice.admit(&relay, access(&reissue(&other_issuer, NOW)), NOW),
    );

    // Alice's token on another device's connection, in her account and in bob's.
    for (member, space) in [(&alice_laptop, "alice"), (&bob, "bob"), (&bob, "alice")] {
        relay.refused(
            &format!("alice's token shown by {} for {space}", member.device),
            Denied::Token(TokenError::WrongDevice),
            "wrong_device",
            |a| {
                a.admit(
                    member.public_key(),
                    &member.device,
                    space,
                    &alice.access(),
                    NOW,
                )
            },
        );
    }
    // Alice's own token, on her own device, for bob's space or one that does not exist: the
    // same answer for both, so it does not tell which accounts exist.
    for space in ["bob", "carol"] {
        relay.refused(
            &format!("alice's token for space {space}"),
            Denied::NotRegistered,
            "not_registered",
            |a| {
                a.admit(
                    alice.public_key(),
                    &alice.device,
                    space,
                    &alice.access(),
                    NOW,
                )
            },
        );
    }
    // Neither does signing in with the key say more.
    for space in ["bob", "carol"] {
        relay.refused(
            &format!("alice's key for space {space}"),
            Denied::NotRegistered,
            "not_registered",
            |a| {
                a.admit(
                    alice.public_key(),
                    &alice.device,
                    space,
                    &Credential::Key,
                    NOW,
                )
            },
        );
    }
}

#[test]
fn a_retired_signing_key_verifies_only_inside_its_overlap_window() {
    let relay = Relay::open();
    let alice = relay.join(1, "alice");
    let old_kid = relay.stored_ring().current().expect("a key").kid.clone();
    let rotated_ms = NOW + 10 * SECOND;
    relay
        .accounts
        .rotate_signing_key(rotated_ms)
        .expect("rotate");
    let overlap_ms = relay.accounts.policy().overlap_s * SECOND;
    alice
        .admit(&relay, alice.access(), rotated_ms + SECOND)
        .expect("inside the overlap window");

    // Past the window the old key no longer verifies, even though it is still stored.
    let after = rotated_ms + overlap_ms;
    assert!(relay.stored_ring().entries().any(|k| k.kid == old_kid));
    relay.refused(
        "signed by a key retired beyond its overlap",
        Denied::Token(TokenError::RetiredKey),
        "retired_key",
        |_| alice.admit(&relay, alice.access(), after),
    );
    // The next rotation drops it from the store; its tokens are then unknown.
    relay.accounts.rotate_signing_key(after).expect("rotate");
    assert!(!relay.stored_ring().entries().any(|k| k.kid == old_kid));
    relay.refused(
        "signed by a dropped key",
        Denied::Token(TokenError::UnknownKey),
        "unknown_key",
        |_| alice.admit(&relay, alice.access(), after),
    );
}

#[test]
fn a_reused_refresh_token_revokes_exactly_its_family() {
    let relay = Relay::open();
    let mut alice = relay.join(1, "alice");
    let first = alice.tokens.clone();
    let rotated = alice
        .admit(&relay, alice.refresh(), NOW + SECOND)
        .expect("the current refresh token rotates");
    assert_eq!(rotated.family, alice.family);
    alice.tokens = rotated.grant.tokens.expect("new tokens");
    // A second family of the same device, started with its key.
    let other = alice
        .admit(&relay, Credential::Key, NOW + SECOND)
        .expect("the key starts a family");
    assert_ne!(other.family, alice.family);
    let other_tokens = other.grant.tokens.expect("tokens");

    let before = relay.snapshot();
    let family_before = relay.family(&alice.family);
    let reused = alice.admit(
        &relay,
        Credential::Refresh(first.refresh.clone()),
        NOW + 2 * SECOND,
    );
    match reused {
        Err(ref d @ Denied::Refresh(RefreshError::Reused)) => assert_eq!(d.reason(), "reused"),
        other => panic!("expected Reused, got {other:?}"),
    }
    let after = relay.snapshot();
    let changed: Vec<_> = after
        .iter()
        .filter(|pair| !before.contains(pair))
        .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
        .collect();
    assert_eq!(changed, [format!("F{}", alice.family)]);
    assert_eq!(after.len(), before.len(), "nothing added or removed");
    assert_eq!(
        relay.family(&alice.family),
        Family {
            revoked: true,
            ..family_before
        }
    );

    // Everything of that family is refused from now on, and changes nothing more.
    let later = NOW + 3 * SECOND;
    for (what, credential) in [
        ("the family's current refresh token", alice.refresh()),
        (
            "the rotated one again",
            Credential::Refresh(first.refresh.clone()),
        ),
    ] {
        relay.refused(
            what,
            Denied::Refresh(RefreshError::Revoked),
            "revoked",
            |_| alice.admit(&relay, credential, later),
        );
    }
    for (what, token) in [
        ("the family's current access token", &alice.tokens.access),
        ("its first access token", &first.access),
    ] {
        relay.refused(
            what,
            Denied::Refresh(RefreshError::Revoked),
            "revoked",
            |_| alice.admit(&relay, Credential::Access(token.clone()), later),
        );
    }
    relay.refused(
        "the current refresh token on an open session",
        Denied::Refresh(RefreshError::Revoked),
        "revoked",
        |a| a.refresh(&alice.device, "alice", &alice.tokens.refresh, later),
    );
    assert!(!relay.accounts.still_admitted(&alice.device, &alice.family));

    // The device's other family goes on.
    assert!(relay.accounts.still_admitted(&alice.device, &other.family));
    alice
        .admit(
            &relay,
            Credential::Access(other_tokens.access.clone()),
            later,
        )
        .expect("the other family's access token");
    alice
        .admit(
            &relay,
            Credential::Refresh(other_tokens.refresh.clone()),
            later,
        )
        .expect("the other family's refresh token");
}

#[test]
fn a_refresh_token_shown_by_another_device_is_refused_without_revoking() {
    let relay = Relay::open();
    let alice = relay.join(1, "alice");
    let laptop = relay.join(2, "alice");
    let bob = relay.join(3, "bob");
    relay.refused(
        "alice's refresh token from her laptop",
        Denied::Refresh(RefreshError::WrongDevice),
        "wrong_device",
        |a| {
            a.admit(
                laptop.public_key(),
                &laptop.device,
                "alice",
                &alice.refresh(),
                NOW,
            )
        },
    );
    relay.refused(
        "alice's refresh token from bob's device, for alice's space",
        Denied::NotRegistered,
        "not_registered",
        |a| {
            a.admit(
                bob.public_key(),
                &bob.device,
                "alice",
                &alice.refresh(),
                NOW,
            )
        },
    );
    relay.refused(
        "alice's refresh token from bob's device, for bob's space",
        Denied::Refresh(RefreshError::WrongDevice),
        "wrong_device",
        |a| a.admit(bob.public_key(), &bob.device, "bob", &alice.refresh(), NOW),
    );
    alice
        .admit(&relay, alice.refresh(), NOW)
        .expect("alice's family was not touched");
}

#[test]
fn another_key_under_a_registered_device_id_is_refused() {
    let relay = Relay::open();
    let alice = relay.join(1, "alice");
    let impostor = SigningKey::from_bytes(&[0x1e; 32])
        .verifying_key()
        .to_bytes();
    for (what, credential) in [
        ("the key alone", Credential::Key),
        ("alice's access token", alice.access()),
        ("alice's refresh token", alice.refresh()),
    ] {
        relay.refused(
            &format!("another key as alice's device, with {what}"),
            Denied::NotRegistered,
            "not_registered",
            |a| a.admit(impostor, &alice.device, "alice", &credential, NOW),
        );
    }
    alice
        .admit(&relay, alice.refresh(), NOW)
        .expect("alice's own key and tokens still work");
}

#[test]
fn a_revoked_device_is_refused_whatever_it_shows() {
    let relay = Relay::open();
    let alice = relay.join(1, "alice");
    let laptop = relay.join(2, "alice");
    let second = laptop
        .admit(&relay, Credential::Key, NOW)
        .expect("a second family");
    relay
        .accounts
        .revoke(&laptop.device, NOW + SECOND)
        .expect("revoke");

    for family in [&laptop.family, &second.family] {
        assert!(relay.family(family).revoked, "family {family}");
        assert!(!relay.accounts.still_admitted(&laptop.device, family));
    }
    let later = NOW + 2 * SECOND;
    let second_tokens = second.grant.tokens.expect("tokens");
    for (what, credential) in [
        ("its key", Credential::Key),
        ("its access token", laptop.access()),
        ("its refresh token", laptop.refresh()),
        (
            "its other family's access token",
            Credential::Access(second_tokens.access),
        ),
        (
            "its other family's refresh token",
            Credential::Refresh(second_tokens.refresh),
        ),
    ] {
        relay.refused(
            &format!("revoked device showing {what}"),
            Denied::Revoked,
            "device_revoked",
            |_| laptop.admit(&relay, credential, later),
        );
    }
    alice
        .admit(&relay, alice.access(), later)
        .expect("the account's other device goes on");
}

#[test]
fn enrolment_codes_work_once_in_time_and_only_for_their_account() {
    let relay = Relay::open();
    let newcomer = SigningKey::from_bytes(&[9; 32]);
    let public_key = newcomer.verifying_key().to_bytes();
    let device = &device_id(&public_key);
    let enrol = |space: &'static str, code: Credential, now_ms: u64| {
        move |a: &Accounts| a.admit(public_key, device, space, &code, now_ms)
    };

    let used = relay.code("alice", HOUR, NOW);
    let other = SigningKey::from_bytes(&[8; 32]);
    relay
        .accounts
        .admit(
            other.verifying_key().to_bytes(),
            &device_id(&other.verifying_key().to_bytes()),
            "alice",
            &used,
            NOW,
        )
        .expect("the code registers its first device");
    relay.refused(
        "a replayed code",
        Denied::Enrolment,
        "bad_enrolment_code",
        enrol("alice", used, NOW),
    );

    let short = relay.code("alice", 10 * SECOND, NOW);
    relay.refused(
        "an expired code",
        Denied::Enrolment,
        "bad_enrolment_code",
        enrol("alice", short, NOW + 10 * SECOND),
    );

    let bobs = relay.code("bob", HOUR, NOW);
    relay.refused(
        "bob's code for alice's space",
        Denied::Enrolment,
        "bad_enrolment_code",
        enrol("alice", bobs.clone(), NOW),
    );
    let Credential::Enrol(secret) = &bobs else {
        unreachable!("codes are enrolment credentials")
    };
    let (_, bob_secret) = secret.expose().split_once('/').expect("ACCOUNT/SECRET");
    let relabelled = Credential::Enrol(Secret::new(format!("alice/{bob_secret}")));
    relay.refused(
        "bob's secret relabelled as alice's",
        Denied::Enrolment,
        "bad_enrolment_code",
        enrol("alice", relabelled, NOW),
    );
    for garbage in ["", "alice", "alice/", "/", "alice/AAAAAAAAAAAAAAAAAAAAAAAA"] {
        relay.refused(
            &format!("code {garbage:?}"),
            Denied::Enrolment,
            "bad_enrolment_code",
            enrol("alice", Credential::Enrol(Secret::new(garbage)), NOW),
        );
    }

    // None of those used the codes up: bob's still registers in bob's account.
    enrol("bob", bobs.clone(), NOW + SECOND)(&relay.accounts).expect("bob's code, in bob's space");
    relay.refused(
        "a device of bob enrolling in alice with a fresh code",
        Denied::OtherAccount,
        "other_account",
        enrol("alice", relay.code("alice", HOUR, NOW), NOW + SECOND),
    );
}

/// Something another session does while this one is inside the store.
type Meanwhile = Box<dyn FnOnce() + Send>;

/// A `MemoryKv` that, the first time an enrolment code is looked up, reads it, then runs
/// `meanwhile` before answering with what it read: another session acting at that very moment,
/// the interleaving a busy relay makes.
#[derive(Default)]
struct Interleaved {
    kv: MemoryKv,
    meanwhile: Mutex<Option<Meanwhile>>,
}

impl Kv for Interleaved {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        let value = self.kv.get(key)?;
        if key.first() == Some(&b'E') {
            let meanwhile = self.meanwhile.lock().expect("hook").take();
            if let Some(meanwhile) = meanwhile {
                meanwhile();
            }
        }
        Ok(value)
    }
    fn range(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<Pair>, KvError> {
        self.kv.range(start, end, limit)
    }
    fn last_key(&self, start: &[u8], end: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.kv.last_key(start, end)
    }
    fn count(&self, start: &[u8], end: &[u8]) -> Result<u64, KvError> {
        self.kv.count(start, end)
    }
    fn apply(&self, batch: Batch) -> Result<(), KvError> {
        self.kv.apply(batch)
    }
    fn flush(&self) -> Result<(), KvError> {
        self.kv.flush()
    }
    fn size_on_disk(&self) -> Result<u64, KvError> {
        self.kv.size_on_disk()
    }
    fn live_bytes(&self) -> Result<u64, KvError> {
        self.kv.live_bytes()
    }
    fn journal(&self, each: &mut dyn FnMut(&[u8])) -> Result<bool, KvError> {
        self.kv.journal(each)
    }
    fn journal_bytes(&self) -> u64 {
        self.kv.journal_bytes()
    }
    fn rewrite_journal(&self, keep: ferry::store::kv::JournalKeep<'_>) -> Result<(), KvError> {
        self.kv.rewrite_journal(keep)
    }
}

#[test]
fn an_enrolment_code_shown_by_two_sessions_at_once_registers_one_device() {
    let kv = Arc::new(Interleaved::default());
    let accounts = Arc::new(
        Accounts::open(
            Arc::new(KvStorage::new(kv.clone())),
            TokenPolicy::default(),
            seeded(1),
            NOW,
        )
        .expect("open"),
    );
    accounts.add_account("alice", NOW).expect("account");
    let code = accounts.enrol("alice", HOUR, NOW).expect("enrol").code;
    let enrol = move |accounts: &Accounts, seed: u8| {
        let public_key = SigningKey::from_bytes(&[seed; 32])
            .verifying_key()
            .to_bytes();
        let credential = Credential::Enrol(Secret::new(code.clone()));
        accounts.admit(
            public_key,
            &device_id(&public_key),
            "alice",
            &credential,
            NOW,
        )
    };
    let second = Arc::new(Mutex::new(None));
    *kv.meanwhile.lock().expect("hook") = Some(Box::new({
        let (accounts, second, enrol) = (accounts.clone(), second.clone(), enrol.clone());
        move || *second.lock().expect("result") = Some(enrol(&accounts, 2))
    }));
    let first = enrol(&accounts, 1);
    let second = second
        .lock()
        .expect("result")
        .take()
        .expect("the second session ran while the first looked the code up");
    let registered: Vec<_> = accounts
        .devices(Some("alice"))
        .into_iter()
        .map(|d| d.device)
        .collect();
    assert_eq!(registered.len(), 1, "one code registered {registered:?}");
    match (&first, &second) {
        (Ok(_), Err(Denied::Enrolment)) | (Err(Denied::Enrolment), Ok(_)) => {}
        other => panic!("expected one registration and one refusal, got {other:?}"),
    }
}

/// One edit of a token's text.
#[derive(Debug, Clone)]
enum Mutation {
    FlipBit { at: usize, bit: u8 },
    Replace { at: usize, with: char },
    Insert { at: usize, with: char },
    Remove { at: usize },
    Truncate { at: usize },
    Duplicate { from: usize, len: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let index = any::<prop::sample::Index>();
    let interesting =
        prop::sample::select(vec!['.', '-', '_', '=', '+', '/', 'A', 'a', '0', ' ', 'é']);
    prop_oneof![
        (index.clone(), 0u8..7).prop_map(|(i, bit)| Mutation::FlipBit {
            at: i.index(1 << 20),
            bit
        }),
        (index.clone(), interesting.clone()).prop_map(|(i, with)| Mutation::Replace {
            at: i.index(1 << 20),
            with
        }),
        (index.clone(), interesting).prop_map(|(i, with)| Mutation::Insert {
            at: i.index(1 << 20),
            with
        }),
        index.clone().prop_map(|i| Mutation::Remove {
            at: i.index(1 << 20)
        }),
        index.clone().prop_map(|i| Mutation::Truncate {
            at: i.index(1 << 20)
        }),
        (index, 1usize..40).prop_map(|(i, len)| Mutation::Duplicate {
            from: i.index(1 << 20),
            len
        }),
    ]
}

/// Applies `mutation` to `text` (positions wrap around its length, counted in characters).
fn apply(text: &str, mutation: &Mutation) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    let n = chars.len().max(1);
    match *mutation {
        Mutation::FlipBit { at, bit } => {
            if let Some(c) = chars.get_mut(at % n) {
                // ASCII stays ASCII: only the low seven bits are flipped.
                *c = char::from(((*c as u32 as u8) ^ (1 << bit)) & 0x7f);
            }
        }
        Mutation::Replace { at, with } => {
            if let Some(c) = chars.get_mut(at % n) {
                *c = with;
            }
        }
        Mutation::Insert { at, with } => chars.insert(at % (chars.len() + 1), with),
        Mutation::Remove { at } => {
            if !chars.is_empty() {
                chars.remove(at % n);
            }
        }
        Mutation::Truncate { at } => chars.truncate(at % n),
        Mutation::Duplicate { from, len } => {
            let from = from % n;
            let end = (from + len).min(chars.len());
            let copy: Vec<char> = chars.get(from..end).unwrap_or_default().to_vec();
            chars.splice(from..from, copy);
        }
    }
    chars.into_iter().collect()
}

proptest! {
    #![proptest_config(proptest_config(2048))]

    #[test]
    fn mutated_access_tokens_never_sign_in_as_someone_else(
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let relay = Relay::open();
        let alice = relay.join(1, "alice");
        let original = claims(&relay, &alice);
        let token = mutations
            .iter()
            .fold(alice.tokens.access.expose().to_string(), |t, m| apply(&t, m));
        let before = relay.snapshot();
        let checked = relay.accounts.check_access(&token, NOW);
        let admitted = alice.admit(&relay, access(&token), NOW);
        prop_assert_eq!(relay.snapshot(), before, "{:?} changed the store", mutations);
        match (checked, admitted) {
            (Ok(claims), Ok(admitted)) => {
                prop_assert_eq!(&claims, &original);
                prop_assert_eq!(admitted.family, original.fam);
            }
            (Err(_), Err(_)) => {}
            (checked, admitted) => {
                prop_assert!(false, "check_access {:?} but admit {:?}", checked, admitted);
            }
        }
    }

    #[test]
    fn mutated_refresh_tokens_are_refused_and_at_most_revoke_their_family(
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let relay = Relay::open();
        let alice = relay.join(1, "alice");
        let token = mutations
            .iter()
            .fold(alice.tokens.refresh.expose().to_string(), |t, m| apply(&t, m));
        prop_assume!(token != alice.tokens.refresh.expose());
        let before = relay.snapshot();
        let family_before = relay.family(&alice.family);
        let result = alice.admit(&relay, Credential::Refresh(Secret::new(token)), NOW);
        match result {
            Err(Denied::Refresh(RefreshError::Reused)) => {
                // The token named alice's family with another secret: exactly that family is
                // revoked, as for any reuse.
                let changed: Vec<_> = relay
                    .snapshot()
                    .into_iter()
                    .filter(|pair| !before.contains(pair))
                    .collect();
                prop_assert_eq!(changed.len(), 1);
                prop_assert_eq!(
                    relay.family(&alice.family),
                    Family { revoked: true, ..family_before }
                );
            }
            Err(Denied::Refresh(RefreshError::Unknown)) => {
                prop_assert_eq!(relay.snapshot(), before);
            }
            other => prop_assert!(false, "{:?}", other),
        }
    }
}
