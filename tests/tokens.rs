//! Access and refresh tokens: a token the relay issued verifies to its claims; every forged,
//! altered, expired, misdirected or oversized one is refused with its specific reason (unsigned
//! and HMAC-confused tokens, flipped signature bits, key-choosing headers, retired keys); as a
//! property, no mutation of a valid token verifies to other claims. Refresh-token families
//! rotate, and a reused token revokes its family.

// A test stops at the first thing that goes wrong: panicking is how it reports it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

mod common;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use common::proptest_config;
use ed25519_dalek::{Signer as _, SigningKey};
use ferry::auth::token::{
    Claims, Family, KeyRing, MAX_TOKEN_BYTES, RefreshError, RefreshToken, SigningKeyEntry,
    TokenError, TokenPolicy, issue_access, verify_access,
};
use proptest::prelude::*;
use serde_json::{Value, json};

const SEED: [u8; 32] = [7; 32];
const KID: &str = "k1";
const NOW: u64 = 1_700_000_000;
const DEVICE: &str = "0123456789abcdef0123456789abcdef";
const OTHER_DEVICE: &str = "fedcba9876543210fedcba9876543210";
const FAMILY: &str = "00112233445566778899aabbccddeeff";
const JTI: [u8; 16] = [9; 16];

fn ring() -> KeyRing {
    let mut ring = KeyRing::default();
    ring.insert(SigningKeyEntry::from_seed(KID.into(), SEED, NOW - 100));
    ring
}

fn issue_with(ring: &KeyRing, policy: &TokenPolicy, now: u64) -> (String, Claims) {
    issue_access(ring, policy, "alice", DEVICE, FAMILY, now, JTI).unwrap()
}

fn issue() -> (String, Claims) {
    issue_with(&ring(), &TokenPolicy::default(), NOW)
}

fn verify(token: &str) -> Result<Claims, TokenError> {
    verify_access(&ring(), &TokenPolicy::default(), token, NOW)
}

fn parts(token: &str) -> [String; 3] {
    let v: Vec<String> = token.split('.').map(str::to_owned).collect();
    v.try_into().unwrap()
}

fn b64(json: &str) -> String {
    B64.encode(json.as_bytes())
}

/// A token with the given header and payload text, properly signed with the ring's key, so that
/// only the rule under test can refuse it.
fn signed(header: &str, payload: &str) -> String {
    let message = format!("{}.{}", b64(header), b64(payload));
    let signature = SigningKey::from_bytes(&SEED).sign(message.as_bytes());
    format!("{message}.{}", B64.encode(signature.to_bytes()))
}

fn header(extra: Value) -> String {
    let mut h = json!({ "alg": "EdDSA", "typ": "JWT", "kid": KID });
    for (k, v) in extra.as_object().unwrap() {
        h[k] = v.clone();
    }
    h.to_string()
}

fn payload(edit: impl FnOnce(&mut Value)) -> String {
    let mut p = serde_json::to_value(issue().1).unwrap();
    edit(&mut p);
    p.to_string()
}

#[test]
fn issued_token_verifies_to_its_claims() {
    let (token, claims) = issue();
    assert_eq!(verify(&token), Ok(claims.clone()));
    assert_eq!(claims.sub, "alice");
    assert_eq!(claims.device, DEVICE);
    assert_eq!(claims.fam, FAMILY);
    assert_eq!(claims.jti, "09".repeat(16));
    assert_eq!((claims.iat, claims.nbf, claims.exp), (NOW, NOW, NOW + 600));
    assert_eq!(claims.require_device(DEVICE), Ok(()));
    let h: Value = serde_json::from_slice(&B64.decode(&parts(&token)[0]).unwrap()).unwrap();
    assert_eq!(h, json!({ "alg": "EdDSA", "typ": "JWT", "kid": KID }));
    // A correctly signed token made outside `issue_access` verifies too: the checks below refuse
    // their tokens for the rule they break, not for how they were made.
    let p = payload(|_| {});
    assert_eq!(verify(&signed(&header(json!({})), &p)), Ok(claims));
}

#[test]
fn unsigned_tokens_are_refused() {
    let p = b64(&payload(|_| {}));
    let real_signature = parts(&issue().0)[2].clone();
    for h in [
        json!({ "alg": "none", "typ": "JWT" }),
        json!({ "alg": "none", "typ": "JWT", "kid": KID }),
        json!({ "alg": "None", "kid": KID }),
        json!({ "typ": "JWT", "kid": KID }),
        json!({ "alg": null, "kid": KID }),
    ] {
        let h = b64(&h.to_string());
        for token in [
            format!("{h}.{p}."),
            format!("{h}.{p}"),
            format!("{h}.{p}.{real_signature}"),
        ] {
            assert_eq!(verify(&token), Err(TokenError::Algorithm), "{token}");
        }
    }
}

#[test]
fn hmac_token_keyed_with_the_public_key_is_refused() {
    let public = ring().current().unwrap().public_key();
    assert_eq!(
        public,
        SigningKey::from_bytes(&SEED).verifying_key().to_bytes()
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &public);
    let p = b64(&payload(|_| {}));
    for alg in [
        "HS256", "ES256", "RS256", "eddsa", "EDDSA", "Ed25519", "EdDSA ",
    ] {
        let message = format!("{}.{p}", b64(&header(json!({ "alg": alg }))));
        let tag = ring::hmac::sign(&key, message.as_bytes());
        let token = format!("{message}.{}", B64.encode(tag.as_ref()));
        assert_eq!(verify(&token), Err(TokenError::Algorithm), "{alg}");
        // The same header with a real Ed25519 signature: the named algorithm alone refuses it.
        let token = signed(&header(json!({ "alg": alg })), &payload(|_| {}));
        assert_eq!(verify(&token), Err(TokenError::Algorithm), "{alg}");
    }
}

#[test]
fn every_flipped_signature_bit_is_refused() {
    let (token, _) = issue();
    let [h, p, s] = parts(&token);
    let signature = B64.decode(&s).unwrap();
    for byte in 0..signature.len() {
        for bit in 0..8 {
            let mut forged = signature.clone();
            forged[byte] ^= 1 << bit;
            let token = format!("{h}.{p}.{}", B64.encode(&forged));
            assert_eq!(
                verify(&token),
                Err(TokenError::BadSignature),
                "byte {byte} bit {bit}"
            );
        }
    }
}

#[test]
fn expiry_and_not_before_allow_the_skew_and_no_more() {
    let policy = TokenPolicy::default();
    let (token, claims) = issue();
    let at = |now| verify_access(&ring(), &policy, &token, now);
    let exp = claims.exp;
    assert_eq!(at(exp + policy.skew_s - 1), Ok(claims.clone()));
    assert_eq!(at(exp + policy.skew_s), Err(TokenError::Expired));
    assert_eq!(at(u64::MAX), Err(TokenError::Expired));
    assert_eq!(at(NOW - policy.skew_s), Ok(claims.clone()));
    assert_eq!(at(NOW - policy.skew_s - 1), Err(TokenError::NotYetValid));
    assert_eq!(at(0), Err(TokenError::NotYetValid));
    // A token whose nbf is fine but whose issue time lies beyond the skew.
    let future_iat = payload(|p| p["iat"] = json!(NOW + policy.skew_s + 1));
    assert_eq!(
        verify(&signed(&header(json!({})), &future_iat)),
        Err(TokenError::NotYetValid)
    );
}

#[test]
fn wrong_audience_issuer_key_and_device_are_refused() {
    let (token, claims) = issue();
    let other_aud = TokenPolicy {
        audience: "other".into(),
        ..TokenPolicy::default()
    };
    assert_eq!(
        verify_access(&ring(), &other_aud, &token, NOW),
        Err(TokenError::WrongAudience)
    );
    let other_iss = TokenPolicy {
        issuer: "other".into(),
        ..TokenPolicy::default()
    };
    assert_eq!(
        verify_access(&ring(), &other_iss, &token, NOW),
        Err(TokenError::WrongIssuer)
    );
    let unknown = signed(&header(json!({ "kid": "k9" })), &payload(|_| {}));
    assert_eq!(verify(&unknown), Err(TokenError::UnknownKey));
    let mut other_ring = KeyRing::default();
    other_ring.insert(SigningKeyEntry::from_seed("k2".into(), [8; 32], NOW));
    assert_eq!(
        verify_access(&other_ring, &TokenPolicy::default(), &token, NOW),
        Err(TokenError::UnknownKey)
    );
    // The same kid holding another key: the signature decides.
    let mut impostor = KeyRing::default();
    impostor.insert(SigningKeyEntry::from_seed(KID.into(), [8; 32], NOW));
    assert_eq!(
        verify_access(&impostor, &TokenPolicy::default(), &token, NOW),
        Err(TokenError::BadSignature)
    );
    assert_eq!(
        claims.require_device(OTHER_DEVICE),
        Err(TokenError::WrongDevice)
    );
}

#[test]
fn key_choosing_and_unknown_headers_are_refused() {
    let p = payload(|_| {});
    for (name, value) in [
        ("jku", json!("https://attacker.example/keys")),
        ("x5u", json!("https://attacker.example/cert")),
        (
            "jwk",
            json!({ "kty": "OKP", "crv": "Ed25519", "x": "AAAA" }),
        ),
        ("x5c", json!(["MIIB"])),
        ("x5t", json!("AAAA")),
        ("x5t#S256", json!("AAAA")),
        ("crit", json!(["exp"])),
        ("crit", Value::Null),
    ] {
        let token = signed(&header(json!({ name: value })), &p);
        assert_eq!(
            verify(&token),
            Err(TokenError::ForbiddenHeader(name)),
            "{name}"
        );
    }
    let malformed = |header: &str| match verify(&signed(header, &p)) {
        Err(TokenError::Malformed(_)) => {}
        other => panic!("{header}: {other:?}"),
    };
    malformed(&header(json!({ "cty": "JWT" })));
    malformed(&header(json!({ "kid": 1 })));
    malformed(&header(json!({ "typ": 1 })));
    malformed(r#"{"alg":"EdDSA","kid":"k1","alg":"EdDSA"}"#);
    malformed(r#"{"alg":"EdDSA","kid":"k9","kid":"k1"}"#);
    malformed(r#"{"alg":"EdDSA"}"#);
    malformed(r#"["EdDSA","JWT","k1"]"#);
    malformed(r#" {"alg":"EdDSA","kid":"k1"}"#);
    malformed("not json");
    assert_eq!(
        verify(&signed(&header(json!({ "typ": "JOSE" })), &p)),
        Err(TokenError::ForbiddenHeader("typ other than JWT"))
    );
    let no_typ = json!({ "alg": "EdDSA", "kid": KID }).to_string();
    assert!(verify(&signed(&no_typ, &p)).is_ok());
}

#[test]
fn claims_are_exactly_the_expected_set() {
    let h = header(json!({}));
    let refused = |p: String| match verify(&signed(&h, &p)) {
        Err(TokenError::InvalidClaim(_)) => {}
        other => panic!("{p}: {other:?}"),
    };
    refused(payload(|p| p["admin"] = json!(true)));
    refused(payload(|p| {
        p.as_object_mut().unwrap().remove("fam");
    }));
    refused(payload(|p| {
        p["device"] = json!("0123456789ABCDEF0123456789ABCDEF")
    }));
    refused(payload(|p| p["device"] = json!("0123")));
    refused(payload(|p| p["sub"] = json!("")));
    refused(payload(|p| p["exp"] = json!(-1)));
    refused(r#"{"iss":"ferry-relay","iss":"ferry-relay"}"#.into());
    let as_array: Vec<Value> =
        serde_json::from_str::<serde_json::Map<String, Value>>(&payload(|_| {}))
            .unwrap()
            .into_iter()
            .map(|(_, v)| v)
            .collect();
    refused(serde_json::to_string(&as_array).unwrap());
}

#[test]
fn retired_key_verifies_only_inside_its_overlap_window() {
    let policy = TokenPolicy {
        overlap_s: 100,
        ..TokenPolicy::default()
    };
    let mut keys = ring();
    let (old_token, old_claims) = issue_with(&keys, &policy, NOW);
    let retired_at = NOW + 10;
    keys.rotate(
        SigningKeyEntry::from_seed("k2".into(), [8; 32], retired_at),
        retired_at,
        &policy,
    );
    assert_eq!(keys.current().unwrap().kid, "k2");
    assert_eq!(
        keys.entries().find(|k| k.kid == KID).unwrap().retired_s,
        Some(retired_at)
    );
    let (new_token, new_claims) = issue_with(&keys, &policy, retired_at);
    assert_eq!(
        parts(&new_token)[0],
        b64(&json!({ "alg": "EdDSA", "typ": "JWT", "kid": "k2" }).to_string())
    );
    let at = |keys: &KeyRing, token: &str, now| verify_access(keys, &policy, token, now);
    assert_eq!(at(&keys, &old_token, retired_at + 99), Ok(old_claims));
    assert_eq!(
        at(&keys, &old_token, retired_at + 100),
        Err(TokenError::RetiredKey)
    );
    assert_eq!(keys.prune(retired_at + 99, &policy), Vec::<String>::new());
    assert_eq!(keys.prune(retired_at + 100, &policy), vec![KID.to_string()]);
    assert_eq!(
        at(&keys, &old_token, retired_at + 100),
        Err(TokenError::UnknownKey)
    );
    assert_eq!(at(&keys, &new_token, retired_at + 100), Ok(new_claims));
    // A later rotation drops keys whose window is over on its own.
    let mut keys = ring();
    keys.rotate(
        SigningKeyEntry::from_seed("k2".into(), [8; 32], NOW),
        NOW,
        &policy,
    );
    keys.rotate(
        SigningKeyEntry::from_seed("k3".into(), [3; 32], NOW + 100),
        NOW + 100,
        &policy,
    );
    let kids: Vec<&str> = keys.entries().map(|k| k.kid.as_str()).collect();
    assert_eq!(kids, ["k2", "k3"]);
}

#[test]
fn ring_reloaded_in_any_order_picks_the_same_current_key() {
    let policy = TokenPolicy::default();
    let mut original = ring();
    original.rotate(
        SigningKeyEntry::from_seed("k2".into(), [8; 32], NOW),
        NOW,
        &policy,
    );
    let persisted: Vec<SigningKeyEntry> = original.entries().cloned().collect();
    let mut reversed = KeyRing::default();
    for entry in persisted.iter().rev() {
        let mut reloaded = SigningKeyEntry::from_seed(entry.kid.clone(), entry.seed(), 0);
        reloaded.created_s = entry.created_s;
        reloaded.retired_s = entry.retired_s;
        reversed.insert(reloaded);
    }
    assert_eq!(reversed.current().unwrap().kid, "k2");
    let (token, claims) = issue_with(&reversed, &policy, NOW);
    assert_eq!(verify_access(&original, &policy, &token, NOW), Ok(claims));
    // Inserting a kid again replaces it rather than holding two keys under one name.
    reversed.insert(SigningKeyEntry::from_seed("k2".into(), [5; 32], NOW));
    assert_eq!(reversed.entries().count(), 2);
    assert_eq!(
        verify_access(&reversed, &policy, &token, NOW),
        Err(TokenError::BadSignature)
    );
}

#[test]
fn issuing_needs_a_current_key_and_a_verifiable_token() {
    let policy = TokenPolicy::default();
    let issue_on = |ring: &KeyRing, account: &str, device: &str| {
        issue_access(ring, &policy, account, device, FAMILY, NOW, JTI).map(|(_, c)| c)
    };
    assert_eq!(
        issue_on(&KeyRing::default(), "alice", DEVICE),
        Err(TokenError::NoSigningKey)
    );
    let mut only_retired = KeyRing::default();
    let mut retired = SigningKeyEntry::from_seed(KID.into(), SEED, NOW);
    retired.retired_s = Some(NOW);
    only_retired.insert(retired);
    assert_eq!(
        issue_on(&only_retired, "alice", DEVICE),
        Err(TokenError::NoSigningKey)
    );
    assert!(matches!(
        issue_on(&ring(), "alice", "0123"),
        Err(TokenError::InvalidClaim(_))
    ));
    assert!(matches!(
        issue_on(&ring(), "", DEVICE),
        Err(TokenError::InvalidClaim(_))
    ));
    assert!(matches!(
        issue_on(&ring(), &"a".repeat(MAX_TOKEN_BYTES), DEVICE),
        Err(TokenError::TooLarge { .. })
    ));
}

#[test]
fn oversized_tokens_are_refused_before_parsing() {
    let (token, _) = issue();
    let too_large = |t: &str| TokenError::TooLarge {
        len: t.len(),
        max: MAX_TOKEN_BYTES,
    };
    // A valid token with a tail, and bytes that are no token at all, refuse alike: on size.
    let padded = format!("{token}{}", " ".repeat(MAX_TOKEN_BYTES));
    assert_eq!(verify(&padded), Err(too_large(&padded)));
    let garbage = "\u{0}".repeat(MAX_TOKEN_BYTES + 1);
    assert_eq!(verify(&garbage), Err(too_large(&garbage)));
    let at_limit = "a".repeat(MAX_TOKEN_BYTES);
    assert!(matches!(verify(&at_limit), Err(TokenError::Malformed(_))));
}

#[test]
fn altered_claims_under_the_old_signature_are_refused() {
    let (token, _) = issue();
    let [h, _, s] = parts(&token);
    for edit in [
        json!({ "sub": "mallory" }),
        json!({ "device": OTHER_DEVICE }),
        json!({ "exp": NOW + 10_000_000 }),
        json!({ "fam": "ffffffffffffffffffffffffffffffff" }),
    ] {
        let p = payload(|p| {
            for (k, v) in edit.as_object().unwrap() {
                p[k] = v.clone();
            }
        });
        let token = format!("{h}.{}.{s}", b64(&p));
        assert_eq!(verify(&token), Err(TokenError::BadSignature), "{edit}");
    }
    // The same claims written differently are other bytes: the signature covers the text.
    let p: Value = serde_json::from_slice(&B64.decode(&parts(&token)[1]).unwrap()).unwrap();
    let pretty = serde_json::to_string_pretty(&p).unwrap();
    assert_eq!(
        verify(&format!("{h}.{}.{s}", b64(&pretty))),
        Err(TokenError::BadSignature)
    );
    let spaced_header = json!({ "alg": "EdDSA", "typ": "JWT", "kid": KID });
    let spaced_header = serde_json::to_string_pretty(&spaced_header).unwrap();
    let [_, p, _] = parts(&token);
    assert_eq!(
        verify(&format!("{}.{p}.{s}", b64(&spaced_header))),
        Err(TokenError::BadSignature)
    );
}

#[test]
fn padding_whitespace_and_alphabet_variants_are_refused() {
    let (token, _) = issue();
    let [h, p, s] = parts(&token);
    let standard = |part: &str| part.replace('-', "+").replace('_', "/");
    let malformed = [
        format!("{h}=.{p}.{s}"),
        format!("{h}.{p}.{s}=="),
        format!(" {token}"),
        format!("{token}\n"),
        format!("{token} "),
        format!("{h}.{p}.{s}."),
        format!("{h}..{p}.{s}"),
        format!("{}.{p}.{s}", standard(&h)),
        format!("{h}.{p}.{}", standard(&s)),
        format!("{h}.{p}.{}", &s[..s.len() - 1]),
        format!("{h}.{p}.{s}A"),
        format!("{h}.{p}"),
        format!("{h}.{p}."),
        String::new(),
        ".".into(),
        "..".into(),
    ];
    // Variants of the signed parts are other text than what was signed.
    let other_text = [
        format!("{h}.{p}==.{s}"),
        format!("{h}. {p}.{s}"),
        format!("{h}.{p} .{s}"),
        format!("{h}.{}.{s}", standard(&p)),
    ];
    for variant in malformed {
        if variant == token {
            continue;
        }
        match verify(&variant) {
            Err(TokenError::Malformed(_)) => {}
            other => panic!("{variant:?}: {other:?}"),
        }
    }
    for variant in other_text {
        if variant != token {
            assert_eq!(
                verify(&variant),
                Err(TokenError::BadSignature),
                "{variant:?}"
            );
        }
    }
}

/// One edit of a valid token's text.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(prop::sample::Index, u8),
    Set(prop::sample::Index, u8),
    Insert(prop::sample::Index, u8),
    Remove(prop::sample::Index),
    Truncate(prop::sample::Index),
    SwapParts(usize, usize),
    CopyPart(usize, usize),
    Header(&'static str),
    Payload(&'static str, i64),
}

const HEADERS: &[&str] = &[
    r#"{"alg":"EdDSA","typ":"JWT","kid":"k1"}"#,
    r#"{"alg":"EdDSA","kid":"k1","typ":"JWT"}"#,
    r#"{"alg":"EdDSA","kid":"k1"}"#,
    r#"{ "alg": "EdDSA", "typ": "JWT", "kid": "k1" }"#,
    r#"{"alg":"none","typ":"JWT","kid":"k1"}"#,
    r#"{"alg":"HS256","typ":"JWT","kid":"k1"}"#,
    r#"{"alg":"EdDSA","typ":"JWT","kid":"k2"}"#,
    r#"{"alg":"EdDSA","typ":"JWT","kid":"k1","jku":"x"}"#,
    r#"{"alg":"EdDSA","typ":"JWT","kid":"k1","kid":"k1"}"#,
    r#"{"alg":"EdDSA","typ":"JWT","kid":"k1","b64":false}"#,
    r#"{"alg":"EdDSA","typ":"JWT","kid":"k1"}  "#,
];

const CLAIMS: &[&str] = &[
    "sub", "device", "exp", "nbf", "iat", "aud", "iss", "jti", "fam", "x",
];

fn mutation() -> impl Strategy<Value = Mutation> {
    use prop::sample::{Index, select};
    prop_oneof![
        (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<Index>().prop_map(Mutation::Remove),
        any::<Index>().prop_map(Mutation::Truncate),
        (0usize..3, 0usize..3).prop_map(|(a, b)| Mutation::SwapParts(a, b)),
        (0usize..3, 0usize..3).prop_map(|(a, b)| Mutation::CopyPart(a, b)),
        select(HEADERS).prop_map(Mutation::Header),
        (select(CLAIMS), any::<i64>()).prop_map(|(c, v)| Mutation::Payload(c, v)),
    ]
}

fn apply(token: &str, mutation: &Mutation) -> String {
    let mut bytes = token.as_bytes().to_vec();
    let len = bytes.len();
    let mut split: Vec<String> = token.split('.').map(str::to_owned).collect();
    let join = |split: Vec<String>| split.join(".").into_bytes();
    match mutation {
        Mutation::Flip(i, bit) if !bytes.is_empty() => bytes[i.index(len)] ^= 1 << bit,
        Mutation::Set(i, b) if !bytes.is_empty() => bytes[i.index(len)] = *b,
        Mutation::Insert(i, b) => bytes.insert(i.index(bytes.len() + 1), *b),
        Mutation::Remove(i) if !bytes.is_empty() => {
            bytes.remove(i.index(bytes.len()));
        }
        Mutation::Truncate(i) => bytes.truncate(i.index(bytes.len() + 1)),
        Mutation::SwapParts(a, b) if *a < split.len() && *b < split.len() => {
            split.swap(*a, *b);
            bytes = join(split);
        }
        Mutation::CopyPart(a, b) if *a < split.len() && *b < split.len() => {
            split[*b] = split[*a].clone();
            bytes = join(split);
        }
        Mutation::Header(h) if !split.is_empty() => {
            split[0] = b64(h);
            bytes = join(split);
        }
        Mutation::Payload(claim, value) if split.len() > 1 => {
            if let Some(mut p) = B64
                .decode(&split[1])
                .ok()
                .and_then(|p| serde_json::from_slice::<Value>(&p).ok())
                .filter(Value::is_object)
            {
                p[*claim] = match p.get(*claim) {
                    Some(Value::String(s)) => json!(format!("{s}{value}")),
                    _ => json!(value),
                };
                split[1] = b64(&p.to_string());
                bytes = join(split);
            }
        }
        _ => {}
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

proptest! {
    #![proptest_config(proptest_config(4096))]

    #[test]
    fn no_mutant_verifies_to_other_claims(
        mutations in proptest::collection::vec(mutation(), 1..5),
        at in NOW - 120..NOW + 720,
    ) {
        let (token, claims) = issue();
        let mut mutant = token.clone();
        for m in &mutations {
            mutant = apply(&mutant, m);
        }
        let valid_now = verify_access(&ring(), &TokenPolicy::default(), &token, at);
        // Refusal is always fine; acceptance only of exactly what was issued.
        if let Ok(verified) = verify_access(&ring(), &TokenPolicy::default(), &mutant, at) {
            prop_assert_eq!(&verified, &claims);
            prop_assert!(valid_now.is_ok());
            // Only the signed text decides: what verifies is what was issued.
            prop_assert_eq!(mutant.rsplit_once('.').map(|m| m.0), token.rsplit_once('.').map(|t| t.0));
        }
    }
}

fn refresh(n: u8) -> RefreshToken {
    RefreshToken::new(FAMILY.into(), [n; 32]).unwrap()
}

const TTL: u64 = 1000;

fn family() -> Family {
    Family::start(
        FAMILY.into(),
        "alice".into(),
        DEVICE.into(),
        &refresh(0),
        NOW,
        TTL,
    )
}

#[test]
fn refresh_rotation_moves_to_the_next_token() {
    let mut fam = family();
    assert_eq!(fam.current, refresh(0).secret_hash());
    assert_ne!(fam.current, [0; 32]);
    assert_eq!((fam.generation, fam.expires_s), (0, NOW + TTL));
    fam.rotate(&refresh(0), &refresh(1), DEVICE, NOW + 5, TTL)
        .unwrap();
    assert_eq!(fam.current, refresh(1).secret_hash());
    assert_eq!((fam.generation, fam.expires_s), (1, NOW + 5 + TTL));
    fam.rotate(&refresh(1), &refresh(2), DEVICE, NOW + 6, TTL)
        .unwrap();
    assert_eq!(fam.generation, 2);
    assert!(!fam.revoked);
}

#[test]
fn reused_refresh_token_revokes_the_family() {
    let mut fam = family();
    fam.rotate(&refresh(0), &refresh(1), DEVICE, NOW, TTL)
        .unwrap();
    assert_eq!(
        fam.rotate(&refresh(0), &refresh(2), DEVICE, NOW, TTL),
        Err(RefreshError::Reused)
    );
    assert!(fam.revoked);
    assert_eq!(fam.current, refresh(1).secret_hash());
    // The thief's copy or the rightful one: once revoked, neither works.
    assert_eq!(
        fam.rotate(&refresh(1), &refresh(2), DEVICE, NOW, TTL),
        Err(RefreshError::Revoked)
    );
    // A stored family survives a round trip with its revocation.
    let stored = serde_json::to_vec(&fam).unwrap();
    assert_eq!(serde_json::from_slice::<Family>(&stored).unwrap(), fam);
}

#[test]
fn expired_family_and_wrong_device_are_refused() {
    let mut fam = family();
    assert_eq!(
        fam.rotate(&refresh(0), &refresh(1), DEVICE, NOW + TTL, TTL),
        Err(RefreshError::Expired)
    );
    // Another device cannot rotate the family, nor revoke it with an old or a guessed token.
    for presented in [refresh(0), refresh(9)] {
        assert_eq!(
            fam.rotate(&presented, &refresh(1), OTHER_DEVICE, NOW, TTL),
            Err(RefreshError::WrongDevice)
        );
    }
    assert!(!fam.revoked);
    let stranger = RefreshToken::new("ffffffffffffffffffffffffffffffff".into(), [0; 32]).unwrap();
    assert_eq!(
        fam.rotate(&stranger, &refresh(1), DEVICE, NOW, TTL),
        Err(RefreshError::Unknown)
    );
    assert_eq!(
        fam.rotate(&refresh(0), &stranger, DEVICE, NOW, TTL),
        Err(RefreshError::FamilyMismatch)
    );
    assert_eq!(
        fam,
        family(),
        "refused rotations leave the family unchanged"
    );
    fam.rotate(&refresh(0), &refresh(1), DEVICE, NOW + TTL - 1, TTL)
        .unwrap();
}

#[test]
fn refresh_tokens_parse_strictly() {
    let token = refresh(3);
    let text = token.encode();
    assert_eq!(text.len(), 80);
    assert!(text.starts_with(&format!("rt1.{FAMILY}.")));
    let parsed = RefreshToken::parse(&text).unwrap();
    assert_eq!(parsed.family, FAMILY);
    assert_eq!(parsed.secret_hash(), token.secret_hash());
    assert_eq!(parsed.encode(), text);
    assert!(!format!("{token:?}").contains(&text[37..]));

    let secret = &text[37..];
    let last = secret.chars().last().unwrap();
    let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let index = alphabet.find(last).unwrap();
    let trailing_bits = alphabet.chars().nth(index ^ 1).unwrap();
    let non_canonical = format!("{}{trailing_bits}", &text[..79]);
    let standard_alphabet = RefreshToken::new(FAMILY.into(), [0xfb; 32])
        .unwrap()
        .encode()
        .replace('-', "+")
        .replace('_', "/");
    for bad in [
        String::new(),
        "rt1.".into(),
        text.replacen("rt1", "rt2", 1),
        text.replacen("rt1.", "RT1.", 1),
        text.to_uppercase(),
        format!("{text}="),
        format!("{text}."),
        format!(" {}", &text[..79]),
        text[..79].to_string(),
        text.replacen(&format!("{FAMILY}."), &format!("{FAMILY}x"), 1),
        format!("rt1.{}.{secret}x", &FAMILY[..31]),
        format!("rt1.{FAMILY}.{}=", &secret[..42]),
        format!("rt1.{FAMILY}.{}é", &secret[..41]),
        non_canonical,
        standard_alphabet,
        "x".repeat(100_000),
    ] {
        match RefreshToken::parse(&bad) {
            Err(e @ TokenError::MalformedRefresh(_)) => assert_eq!(e.reason(), "malformed_refresh"),
            other => panic!("{bad:?}: {other:?}"),
        }
    }
    assert!(RefreshToken::new("0123".into(), [0; 32]).is_err());
    assert!(RefreshToken::new(FAMILY.to_uppercase(), [0; 32]).is_err());
}

#[test]
fn errors_name_a_stable_reason_and_never_the_token() {
    let (token, _) = issue();
    let [h, p, s] = parts(&token);
    let secret_debug = format!("{:?}", SigningKeyEntry::from_seed(KID.into(), SEED, NOW));
    assert!(!secret_debug.contains(&format!("{:?}", SEED)));
    assert!(!secret_debug.contains("7, 7"));
    let cases = [
        (format!("{h}.{p}.{}", &s[1..]), "malformed"),
        (format!("{h}.{p}x.{s}"), "bad_signature"),
        ("x".repeat(MAX_TOKEN_BYTES + 1), "too_large"),
    ];
    for (t, reason) in cases {
        let e = verify(&t).unwrap_err();
        assert_eq!(e.reason(), reason);
        let message = e.to_string();
        for part in [&h, &p, &s] {
            assert!(!message.contains(part.as_str()), "{message}");
        }
    }
    let at_expiry = verify_access(&ring(), &TokenPolicy::default(), &token, u64::MAX);
    assert_eq!(
        at_expiry.unwrap_err().to_string(),
        "the access token expired: refresh it or reconnect"
    );
}
