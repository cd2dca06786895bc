//! Field-level encryption: the account key and the encrypted values of the fields a collection
//! declares `encrypted`, so that the relay (which never holds the key) stores and forwards
//! values it cannot read.
//!
//! Owns: the account key (derived from a passphrase with Argon2id, or moved between devices as
//! an export line), its owner-only file `account.key`, the key a running process uses
//! (`Keyring`), and the envelope of one encrypted value (XChaCha20-Poly1305, a random nonce per
//! value, bound to its collection, record id and field name).
//!
//! Must not touch: the store, Automerge documents, sockets. Secrets (the key, a passphrase, the
//! plaintext of a field) never go into an error message or a log line from here.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use zeroize::{Zeroize, Zeroizing};

/// First byte of every encrypted value, so the format can change without old values being
/// misread.
pub const ENVELOPE_V1: u8 = 1;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// The smallest envelope: version, nonce, and the tag of an empty plaintext.
const MIN_ENVELOPE: usize = 1 + NONCE_LEN + TAG_LEN;
const EXPORT_PREFIX: &str = "ferry-key-v1";

/// The JSON key that marks an encrypted value inside the store's JSON views of a record: the
/// envelope travels as `{"$sealed": "<base64url>"}` between the document and this module, and
/// is replaced by its plaintext (or `PLACEHOLDER_KEY`) before any reader sees it. User writes
/// may not use the name at any depth (`refuse_sealed`), so a marker always comes from a
/// document's bytes value.
pub const SEALED_KEY: &str = "$sealed";
/// Shown in place of an encrypted field that could not be decrypted in a listing:
/// `{"$encrypted": true, "error": "..."}`.
pub const PLACEHOLDER_KEY: &str = "$encrypted";

/// Argon2id cost: 64 MiB of memory and 3 passes make each guess at a passphrase cost an
/// attacker who stole a device's data (or any ciphertext) the same memory-bound work, which
/// GPUs cannot parallelise cheaply; one derivation takes a fraction of a second here and is
/// done once per device. One lane: derivation runs once, latency does not matter.
const ARGON2_MEMORY_KIB: u32 = 64 * 1024;
const ARGON2_PASSES: u32 = 3;
const ARGON2_LANES: u32 = 1;

/// Problems with the account key itself: deriving, storing, loading, moving it.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "no account key is set on this device: set it with `ferry key set` or `ferry key import`"
    )]
    NotSet,
    #[error("the passphrase is empty: give one line on stdin or in FERRY_PASSPHRASE")]
    EmptyPassphrase,
    #[error("deriving the key from the passphrase failed: {0}")]
    Derive(String),
    #[error(
        "the key line is damaged ({0}): copy the whole line `ferry key export` printed, starting with `{EXPORT_PREFIX}:`"
    )]
    BadExportLine(&'static str),
    #[error(
        "account key {path} is readable or writable by other users (mode {mode:o}): run `chmod 600 {path}`"
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error("account key file {0} is damaged: import the key again with `ferry key import`")]
    Damaged(PathBuf),
    #[error(
        "a different account key (fingerprint {existing}) is already set: values written with it would no longer decrypt; pass --replace to replace it anyway"
    )]
    Different { existing: String },
    #[error("no randomness available from the operating system: {0}")]
    Entropy(String),
    #[error("cannot access account key {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Problems with one encrypted field of one record. Names the field, never its value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FieldError {
    #[error(
        "field {field:?} of {collection}/{id} is encrypted and no account key is set on this device: set the account key with `ferry key set` or `ferry key import`"
    )]
    NoKey {
        collection: String,
        id: String,
        field: String,
    },
    #[error(
        "field {field:?} of {collection}/{id} does not decrypt with the account key {fingerprint}: it was written with another key (set the same key on every device with `ferry key export`/`ferry key import`) or under another record or field"
    )]
    WrongKey {
        collection: String,
        id: String,
        field: String,
        fingerprint: String,
    },
    #[error(
        "field {field:?} of {collection}/{id} holds a damaged encrypted value ({reason}): write the field again"
    )]
    Damaged {
        collection: String,
        id: String,
        field: String,
        reason: &'static str,
    },
    #[error(
        "encrypting a field failed ({0}): retry the write; if it persists, the system's randomness source is broken"
    )]
    Seal(String),
    #[error(
        "field {field:?} of {collection}/{id} cannot be written as JSON ({detail}): nothing was written; please report this as a bug"
    )]
    Encode {
        collection: String,
        id: String,
        field: String,
        detail: String,
    },
}

/// Where an encrypted value belongs; bound into its ciphertext as associated data.
#[derive(Debug, Clone, Copy)]
pub struct FieldAt<'a> {
    pub collection: &'a str,
    pub id: &'a str,
    pub field: &'a str,
}

impl FieldAt<'_> {
    /// Length-prefixed parts, so that `("a/b", "c")` and `("a", "b/c")` bind differently.
    fn aad(&self) -> Vec<u8> {
        let mut aad = b"ferry-field-v1".to_vec();
        for part in [self.collection, self.id, self.field] {
            aad.extend_from_slice(&(part.len() as u64).to_be_bytes());
            aad.extend_from_slice(part.as_bytes());
        }
        aad
    }

    fn owned<T>(&self, make: impl FnOnce(String, String, String) -> T) -> T {
        make(
            self.collection.to_owned(),
            self.id.to_owned(),
            self.field.to_owned(),
        )
    }
}

/// The 32-byte account key. Zeroed when dropped; `Debug` shows the fingerprint only.
#[derive(Clone)]
pub struct AccountKey {
    bytes: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for AccountKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AccountKey({})", self.fingerprint())
    }
}

impl AccountKey {
    /// Every device of an account derives the same key from the same passphrase: the salt comes
    /// from the account's space name, not from randomness.
    pub fn derive(passphrase: &[u8], space: &str) -> Result<Self, KeyError> {
        if passphrase.is_empty() {
            return Err(KeyError::EmptyPassphrase);
        }
        let salt: [u8; 32] = Sha256::new()
            .chain_update(b"ferry-account-salt-v1\0")
            .chain_update(space.as_bytes())
            .finalize()
            .into();
        let params = argon2::Params::new(ARGON2_MEMORY_KIB, ARGON2_PASSES, ARGON2_LANES, Some(32))
            .map_err(|e| KeyError::Derive(e.to_string()))?;
        let argon =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut bytes = Zeroizing::new([0u8; 32]);
        argon
            .hash_password_into(passphrase, &salt, bytes.as_mut())
            .map_err(|e| KeyError::Derive(e.to_string()))?;
        Ok(AccountKey { bytes })
    }

    /// First 8 bytes of the key's SHA-256, hex: tells keys apart without revealing them.
    pub fn fingerprint(&self) -> String {
        Sha256::digest(self.bytes.as_ref())
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// `ferry-key-v1:<base64url key>:<checksum>`, one line; the checksum catches a line that
    /// was cut or mistyped before it replaces a working key.
    pub fn export_line(&self) -> Zeroizing<String> {
        let encoded = Zeroizing::new(URL_SAFE_NO_PAD.encode(self.bytes.as_ref()));
        Zeroizing::new(format!(
            "{EXPORT_PREFIX}:{}:{}",
            encoded.as_str(),
            checksum(self.bytes.as_ref())
        ))
    }

    pub fn from_export_line(line: &str) -> Result<Self, KeyError> {
        let mut parts = line.trim().split(':');
        if parts.next() != Some(EXPORT_PREFIX) {
            return Err(KeyError::BadExportLine("it does not start with the prefix"));
        }
        let (Some(encoded), Some(sum), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(KeyError::BadExportLine("it does not have three parts"));
        };
        let decoded = Zeroizing::new(
            URL_SAFE_NO_PAD
                .decode(encoded)
                .map_err(|_| KeyError::BadExportLine("the key is not base64url"))?,
        );
        let mut bytes = Zeroizing::new([0u8; 32]);
        if decoded.len() != 32 {
            return Err(KeyError::BadExportLine("the key is not 32 bytes"));
        }
        bytes.copy_from_slice(&decoded);
        if checksum(bytes.as_ref()) != sum {
            return Err(KeyError::BadExportLine("the checksum does not match"));
        }
        Ok(AccountKey { bytes })
    }

    /// Loads `account.key`; `Ok(None)` when there is none. Refuses a file other users can read
    /// or write, like the identity key.
    pub fn load(path: &Path) -> Result<Option<Self>, KeyError> {
        let io = |source| KeyError::Io {
            path: path.to_owned(),
            source,
        };
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Exposed {
                path: path.to_owned(),
                mode,
            });
        }
        let mut text = std::fs::read(path).map_err(io)?;
        let key = std::str::from_utf8(&text)
            .ok()
            .and_then(|t| AccountKey::from_export_line(t).ok());
        text.zeroize();
        key.map(Some)
            .ok_or_else(|| KeyError::Damaged(path.to_owned()))
    }

    /// Writes the key to `path` (mode 0600 from its creation): a new file beside it is written,
    /// synced and renamed over, so a crash leaves the old key or the new one, never half of one.
    /// Refuses to replace a different key unless `replace`.
    pub fn save(&self, path: &Path, replace: bool) -> Result<(), KeyError> {
        if let Some(existing) = AccountKey::load(path)? {
            if existing.bytes == self.bytes {
                return Ok(());
            }
            if !replace {
                return Err(KeyError::Different {
                    existing: existing.fingerprint(),
                });
            }
        }
        let io = |source| KeyError::Io {
            path: path.to_owned(),
            source,
        };
        let tmp = path.with_extension("key.new");
        // A leftover from an interrupted save holds a key nobody confirmed: start again.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
            _ => {}
        }
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        let line = self.export_line();
        file.write_all(line.as_bytes()).map_err(io)?;
        file.write_all(b"\n").map_err(io)?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        Ok(())
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(&(*self.bytes).into())
    }

    /// Encrypts one field's JSON value: `ENVELOPE_V1`, a random 24-byte nonce, the ciphertext
    /// with its tag.
    pub fn seal(&self, at: FieldAt<'_>, value: &Value) -> Result<Vec<u8>, FieldError> {
        let plaintext = serde_json::to_vec(value).map_err(|e| {
            at.owned(|collection, id, field| FieldError::Encode {
                collection,
                id,
                field,
                detail: e.to_string(),
            })
        })?;
        let plaintext = Zeroizing::new(plaintext);
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| FieldError::Seal(e.to_string()))?;
        let aad = at.aad();
        let ciphertext = self
            .cipher()
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: &plaintext,
                    aad: &aad,
                },
            )
            .map_err(|_| FieldError::Seal("the cipher refused the value".into()))?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + ciphertext.len());
        out.push(ENVELOPE_V1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        Ok(out)
    }

    /// Decrypts what `seal` wrote for the same place.
    pub fn open(&self, at: FieldAt<'_>, envelope: &[u8]) -> Result<Value, FieldError> {
        let damaged = |reason| {
            at.owned(|collection, id, field| FieldError::Damaged {
                collection,
                id,
                field,
                reason,
            })
        };
        let sealed = match envelope.split_first() {
            Some((&ENVELOPE_V1, sealed)) => sealed,
            _ => return Err(damaged("unknown version")),
        };
        if envelope.len() < MIN_ENVELOPE {
            return Err(damaged("too short"));
        }
        let Some((nonce, ciphertext)) = sealed.split_first_chunk::<NONCE_LEN>() else {
            return Err(damaged("too short"));
        };
        let aad = at.aad();
        let plaintext = self
            .cipher()
            .decrypt(
                &XNonce::from(*nonce),
                Payload {
                    msg: ciphertext,
                    aad: &aad,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| {
                at.owned(|collection, id, field| FieldError::WrongKey {
                    collection,
                    id,
                    field,
                    fingerprint: self.fingerprint(),
                })
            })?;
        // Authentic bytes that are not JSON were written by something other than `seal`.
        serde_json::from_slice(&plaintext).map_err(|_| damaged("not JSON inside"))
    }
}

fn checksum(key: &[u8]) -> String {
    Sha256::new()
        .chain_update(EXPORT_PREFIX.as_bytes())
        .chain_update(key)
        .finalize()
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The marker `{"$sealed": "<base64url>"}` for an envelope.
pub fn marker(envelope: &[u8]) -> Value {
    let mut map = serde_json::Map::new();
    map.insert(SEALED_KEY.into(), URL_SAFE_NO_PAD.encode(envelope).into());
    Value::Object(map)
}

/// The envelope a marker stands for; `None` for any other value.
pub fn marker_bytes(value: &Value) -> Option<Vec<u8>> {
    match value {
        Value::Object(map) if map.len() == 1 => match map.get(SEALED_KEY) {
            Some(Value::String(encoded)) => URL_SAFE_NO_PAD.decode(encoded).ok(),
            _ => None,
        },
        _ => None,
    }
}

/// Refuses a user value that uses the marker's name anywhere, so that no written value can pass
/// for an encrypted one.
pub fn refuses_sealed(value: &Value) -> bool {
    match value {
        Value::Object(map) => map.contains_key(SEALED_KEY) || map.values().any(refuses_sealed),
        Value::Array(items) => items.iter().any(refuses_sealed),
        _ => false,
    }
}

/// The key a process uses now. The daemon swaps it when told to reload (`key.reload`), so it is
/// shared behind a lock rather than fixed at start.
#[derive(Debug, Default)]
pub struct Keyring {
    key: RwLock<Option<Arc<AccountKey>>>,
}

impl Keyring {
    pub fn with(key: Option<AccountKey>) -> Self {
        Keyring {
            key: RwLock::new(key.map(Arc::new)),
        }
    }

    pub fn get(&self) -> Option<Arc<AccountKey>> {
        // A writer cannot leave the slot half-written: replacing an `Option<Arc>` is one move.
        self.key.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set(&self, key: Option<AccountKey>) {
        *self.key.write().unwrap_or_else(|p| p.into_inner()) = key.map(Arc::new);
    }

    /// Replaces the encrypted fields of `target` (a write's new fields) with markers: a field
    /// whose plaintext equals what `shown` (the record as it is) already holds keeps its marker,
    /// so an unchanged value makes no change; any other gets a new envelope.
    pub fn seal_fields(
        &self,
        encrypted: &std::collections::BTreeSet<String>,
        collection: &str,
        id: &str,
        shown: &serde_json::Map<String, Value>,
        target: &mut serde_json::Map<String, Value>,
    ) -> Result<(), FieldError> {
        let names: Vec<&String> = encrypted
            .iter()
            .filter(|n| target.contains_key(*n))
            .collect();
        if names.is_empty() {
            return Ok(());
        }
        let key = self.get();
        for name in names {
            let at = FieldAt {
                collection,
                id,
                field: name,
            };
            let Some(key) = &key else {
                return Err(at.owned(|collection, id, field| FieldError::NoKey {
                    collection,
                    id,
                    field,
                }));
            };
            let Some(plain) = target.get_mut(name) else {
                continue;
            };
            let kept = shown.get(name).and_then(marker_bytes).filter(|old| {
                key.open(at, old).is_ok_and(|old_plain| {
                    // Compared as JSON text: `0.0` and `-0.0` differ, as they do for plain
                    // fields.
                    // A value that does not encode is never the same: `seal` reports it.
                    matches!(
                        (serde_json::to_vec(&old_plain), serde_json::to_vec(plain)),
                        (Ok(old), Ok(new)) if old == new
                    )
                })
            });
            *plain = match kept {
                Some(old) => marker(&old),
                None => marker(&key.seal(at, plain)?),
            };
        }
        Ok(())
    }

    /// Replaces each top-level marker in `fields` with its plaintext. A field that does not
    /// decrypt fails the call when `strict`; otherwise it is shown as
    /// `{"$encrypted": true, "error": "..."}`, so one bad field does not hide a whole listing
    /// (and its ciphertext is never shown as if it were data).
    pub fn open_fields(
        &self,
        collection: &str,
        id: &str,
        fields: &mut serde_json::Map<String, Value>,
        strict: bool,
    ) -> Result<(), FieldError> {
        let key = self.get();
        for (name, value) in fields.iter_mut() {
            let Some(envelope) = marker_bytes(value) else {
                continue;
            };
            let at = FieldAt {
                collection,
                id,
                field: name,
            };
            let opened = match &key {
                Some(key) => key.open(at, &envelope),
                None => Err(at.owned(|collection, id, field| FieldError::NoKey {
                    collection,
                    id,
                    field,
                })),
            };
            *value = match opened {
                Ok(plain) => plain,
                Err(e) if strict => return Err(e),
                Err(e) => placeholder(&e),
            };
        }
        Ok(())
    }

    /// `open_fields` for one value found at `field` (a conflict's field-level value).
    pub fn open_value(&self, collection: &str, id: &str, field: &str, value: &mut Value) {
        let mut one = serde_json::Map::new();
        one.insert(field.to_owned(), std::mem::take(value));
        // Lenient, so this cannot fail.
        let _ = self.open_fields(collection, id, &mut one, false);
        if let Some(v) = one.remove(field) {
            *value = v;
        }
    }
}

fn placeholder(error: &FieldError) -> Value {
    let mut map = serde_json::Map::new();
    map.insert(PLACEHOLDER_KEY.into(), Value::Bool(true));
    map.insert("error".into(), error.to_string().into());
    Value::Object(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(n: u8) -> AccountKey {
        AccountKey {
            bytes: Zeroizing::new([n; 32]),
        }
    }

    const AT: FieldAt<'static> = FieldAt {
        collection: "people",
        id: "p1",
        field: "iban",
    };

    #[test]
    fn every_json_type_round_trips() {
        for value in [
            json!(null),
            json!(true),
            json!(-7),
            json!(u64::MAX),
            json!(1.5),
            json!(-0.0),
            json!("DE89 3704"),
            json!([1, "a", {"b": null}]),
            json!({"x": [1.25, false]}),
        ] {
            let sealed = key(1).seal(AT, &value).unwrap();
            assert_eq!(sealed[0], ENVELOPE_V1);
            let opened = key(1).open(AT, &sealed).unwrap();
            assert_eq!(
                serde_json::to_vec(&opened).unwrap(),
                serde_json::to_vec(&value).unwrap()
            );
        }
    }

    #[test]
    fn a_value_is_bound_to_its_key_and_place() {
        let sealed = key(1).seal(AT, &json!("secret")).unwrap();
        for at in [
            FieldAt { id: "p2", ..AT },
            FieldAt {
                field: "name",
                ..AT
            },
            FieldAt {
                collection: "other",
                ..AT
            },
        ] {
            assert!(matches!(
                key(1).open(at, &sealed),
                Err(FieldError::WrongKey { .. })
            ));
        }
        match key(2).open(AT, &sealed) {
            Err(e @ FieldError::WrongKey { .. }) => {
                let text = e.to_string();
                assert!(text.contains("people/p1") && text.contains(&key(2).fingerprint()));
                assert!(!text.contains("secret"));
            }
            other => panic!("expected WrongKey, got {other:?}"),
        }
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(
            key(1).open(AT, &flipped),
            Err(FieldError::WrongKey { .. })
        ));
        assert!(matches!(
            key(1).open(AT, &sealed[..MIN_ENVELOPE - 1]),
            Err(FieldError::Damaged { .. })
        ));
        let mut versioned = sealed;
        versioned[0] = 9;
        assert!(matches!(
            key(1).open(AT, &versioned),
            Err(FieldError::Damaged { .. })
        ));
    }

    #[test]
    fn two_seals_of_one_value_differ() {
        let a = key(1).seal(AT, &json!(1)).unwrap();
        let b = key(1).seal(AT, &json!(1)).unwrap();
        assert_ne!(a, b, "each value gets its own nonce");
    }

    #[test]
    fn export_lines_round_trip_and_damage_is_refused() {
        let line = key(7).export_line();
        let back = AccountKey::from_export_line(&line).unwrap();
        assert_eq!(back.fingerprint(), key(7).fingerprint());
        // One character of the key part changed, as a mistyped copy would.
        let mut damaged = line.as_bytes().to_vec();
        damaged[20] = if damaged[20] == b'A' { b'B' } else { b'A' };
        let damaged = String::from_utf8(damaged).unwrap();
        assert!(matches!(
            AccountKey::from_export_line(&damaged),
            Err(KeyError::BadExportLine(_))
        ));
        assert!(AccountKey::from_export_line(&line[..line.len() - 2]).is_err());
        assert!(AccountKey::from_export_line("").is_err());
        assert!(!format!("{:?}", key(7)).contains(&line[13..20]));
    }

    #[test]
    fn the_passphrase_and_space_decide_the_key() {
        let a = AccountKey::derive(b"correct horse", "team").unwrap();
        let b = AccountKey::derive(b"correct horse", "team").unwrap();
        let c = AccountKey::derive(b"correct horse", "other").unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), c.fingerprint());
        assert!(matches!(
            AccountKey::derive(b"", "team"),
            Err(KeyError::EmptyPassphrase)
        ));
    }

    #[test]
    fn the_key_file_is_owner_only_and_not_silently_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("account.key");
        assert!(AccountKey::load(&path).unwrap().is_none());
        key(1).save(&path, false).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            AccountKey::load(&path).unwrap().unwrap().fingerprint(),
            key(1).fingerprint()
        );
        key(1).save(&path, false).unwrap();
        assert!(matches!(
            key(2).save(&path, false),
            Err(KeyError::Different { .. })
        ));
        key(2).save(&path, true).unwrap();
        assert_eq!(
            AccountKey::load(&path).unwrap().unwrap().fingerprint(),
            key(2).fingerprint()
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        match AccountKey::load(&path) {
            Err(e @ KeyError::Exposed { .. }) => assert!(e.to_string().contains("chmod 600")),
            other => panic!("expected Exposed, got {other:?}"),
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "ferry-key-v1:xx:yy\n").unwrap();
        assert!(matches!(AccountKey::load(&path), Err(KeyError::Damaged(_))));
    }

    #[test]
    fn unchanged_plaintext_keeps_its_envelope_and_reads_open_markers() {
        let ring = Keyring::with(Some(key(1)));
        let encrypted = ["iban".to_owned()].into_iter().collect();
        let mut first = json!({"iban": "DE89", "name": "Ada"})
            .as_object()
            .unwrap()
            .clone();
        ring.seal_fields(&encrypted, "people", "p1", &Default::default(), &mut first)
            .unwrap();
        assert!(marker_bytes(&first["iban"]).is_some());
        assert_eq!(first["name"], "Ada");
        let mut again = json!({"iban": "DE89"}).as_object().unwrap().clone();
        ring.seal_fields(&encrypted, "people", "p1", &first, &mut again)
            .unwrap();
        assert_eq!(again["iban"], first["iban"]);
        let mut changed = json!({"iban": "FR76"}).as_object().unwrap().clone();
        ring.seal_fields(&encrypted, "people", "p1", &first, &mut changed)
            .unwrap();
        assert_ne!(changed["iban"], first["iban"]);

        let mut read = first.clone();
        ring.open_fields("people", "p1", &mut read, true).unwrap();
        assert_eq!(read["iban"], "DE89");
        let mut moved = first.clone();
        assert!(ring.open_fields("people", "p2", &mut moved, true).is_err());
        ring.open_fields("people", "p2", &mut moved, false).unwrap();
        assert_eq!(moved["iban"][PLACEHOLDER_KEY], true);
        assert!(moved["iban"].get(SEALED_KEY).is_none());

        let empty = Keyring::default();
        let mut write = json!({"iban": "x"}).as_object().unwrap().clone();
        assert!(matches!(
            empty.seal_fields(&encrypted, "people", "p1", &Default::default(), &mut write),
            Err(FieldError::NoKey { .. })
        ));
    }
}
