//! The device's identity: its ed25519 key pair, kept in an owner-only file in the data
//! directory. The device id (and Automerge actor id) is the first 16 bytes of the public key, so
//! every change a device writes can later be tied to the key that may sign for it.
//!
//! Must not touch: the store, sockets. The relay's access and refresh tokens are `token`'s; the
//! tokens a device holds between connections are `credentials`'.

pub mod credentials;
pub mod token;

use ed25519_dalek::SigningKey;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("no identity key at {0}: run `ferry init` for this data directory")]
    Missing(PathBuf),
    #[error("identity key {0} already exists: refusing to replace a device's identity")]
    Exists(PathBuf),
    #[error(
        "identity key {path} is readable by other users (mode {mode:o}): run `chmod 600 {path}`"
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error("identity key {0} is damaged: it must hold 64 hex digits")]
    Malformed(PathBuf),
    #[error("no randomness available from the operating system: {0}")]
    Entropy(String),
    #[error("cannot access identity key {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub struct Identity {
    key: SigningKey,
}

impl Identity {
    /// Creates a new key file (mode 0600); refuses to overwrite one.
    pub fn create(path: &Path) -> Result<Self, IdentityError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| IdentityError::Entropy(e.to_string()))?;
        let io = |source| IdentityError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => IdentityError::Exists(path.to_owned()),
                _ => io(e),
            })?;
        let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
        file.write_all(format!("{hex}\n").as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(Identity {
            key: SigningKey::from_bytes(&seed),
        })
    }

    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let io = |source| IdentityError::Io {
            path: path.to_owned(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => IdentityError::Missing(path.to_owned()),
            _ => io(e),
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(IdentityError::Exposed {
                path: path.to_owned(),
                mode,
            });
        }
        // Damaged bytes (not UTF-8, not hex) must give `Malformed`, never a panic: slicing is
        // only done once every byte is known to be an ASCII hex digit.
        let bytes = std::fs::read(path).map_err(io)?;
        let text = bytes.trim_ascii();
        let seed: Option<Vec<u8>> = (text.len() == 64 && text.iter().all(u8::is_ascii_hexdigit))
            .then(|| {
                text.chunks(2)
                    .map(|pair| {
                        std::str::from_utf8(pair)
                            .ok()
                            .and_then(|h| u8::from_str_radix(h, 16).ok())
                    })
                    .collect()
            })
            .flatten();
        let seed: [u8; 32] = seed
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| IdentityError::Malformed(path.to_owned()))?;
        Ok(Identity {
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// Hex of the first 16 bytes of the public key.
    pub fn device_id(&self) -> String {
        ferry_proto::session::device_id(self.key.verifying_key().as_bytes())
    }

    /// The key that signs the relay's challenge.
    pub fn signing_key(&self) -> &SigningKey {
        &self.key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_load_and_refuse() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.key");
        let created = Identity::create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            Identity::load(&path).unwrap().device_id(),
            created.device_id()
        );
        assert_eq!(created.device_id().len(), 32);
        assert!(matches!(
            Identity::create(&path),
            Err(IdentityError::Exists(_))
        ));

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Identity::load(&path),
            Err(IdentityError::Exposed { .. })
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "zz").unwrap();
        assert!(matches!(
            Identity::load(&path),
            Err(IdentityError::Malformed(_))
        ));
        // 64 bytes whose pairs split a multi-byte character, and bytes that are not UTF-8.
        let split_chars = format!("a{}b", "é".repeat(31));
        for damaged in [split_chars.as_bytes(), &[0xff; 64][..], &[b'+'; 64][..]] {
            std::fs::write(&path, damaged).unwrap();
            assert!(matches!(
                Identity::load(&path),
                Err(IdentityError::Malformed(_))
            ));
        }
        assert!(matches!(
            Identity::load(&dir.path().join("nope")),
            Err(IdentityError::Missing(_))
        ));
    }
}
