//! The credentials a device keeps between connections: the relays it registered with
//! (`registration.json`), the tokens the relay last issued to it (`tokens.json`), both
//! owner-only and replaced atomically, and the choice of what to show the relay next time.
//!
//! Must not touch: the relay's side of tokens (`auth::token`), the store, sockets.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use ferry_proto::wire::{Credential, Secret, Tokens};

/// An access token this close to its expiry is not shown any more: the session it opened would
/// end almost at once.
const ACCESS_MARGIN_MS: u64 = 60_000;

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("token file {path} is readable by other users (mode {mode:o}): run `chmod 600 {path}`")]
    Exposed { path: PathBuf, mode: u32 },
    #[error("cannot access token file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// `DATA_DIR/tokens.json`: the tokens the relay last issued to this device.
#[derive(Debug, Clone)]
pub struct TokenFile {
    path: PathBuf,
}

impl TokenFile {
    pub fn new(data_dir: &Path) -> Self {
        TokenFile {
            path: data_dir.join("tokens.json"),
        }
    }

    fn io(&self, source: std::io::Error) -> CredentialsError {
        CredentialsError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// The tokens held, or `None` when there are none. A damaged file counts as none: the
    /// device then signs in with its key and gets new ones.
    pub fn load(&self) -> Result<Option<Tokens>, CredentialsError> {
        let meta = match std::fs::metadata(&self.path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io(e)),
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(CredentialsError::Exposed {
                path: self.path.clone(),
                mode,
            });
        }
        let bytes = std::fs::read(&self.path).map_err(|e| self.io(e))?;
        match serde_json::from_slice(&bytes) {
            Ok(tokens) => Ok(Some(tokens)),
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e,
                    "the token file is damaged: signing in with the device key instead");
                Ok(None)
            }
        }
    }

    /// Replaces the tokens held, durably (a crash leaves either the old tokens or the new).
    pub fn save(&self, tokens: &Tokens) -> Result<(), CredentialsError> {
        write_owner_only(&self.path, tokens)
    }

    /// Forgets the tokens (the relay refused them): the next connection signs in with the key.
    pub fn clear(&self) -> Result<(), CredentialsError> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(self.io(e)),
            _ => Ok(()),
        }
    }
}

/// Writes `value` as JSON to a new owner-only file, syncs it, then renames it over `path`.
fn write_owner_only(path: &Path, value: &impl serde::Serialize) -> Result<(), CredentialsError> {
    let io = |source| CredentialsError::Io {
        path: path.to_owned(),
        source,
    };
    let temporary = path.with_extension("json.new");
    let _ = std::fs::remove_file(&temporary);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(io)?;
    let body = serde_json::to_vec_pretty(value).map_err(|e| io(e.into()))?;
    file.write_all(&body).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&temporary, path).map_err(io)
}

/// `DATA_DIR/registration.json`: the relays and account `ferry register` joined. A device whose
/// config names no relay (`sync.relay` empty) syncs with these.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Registration {
    /// Relays sharing one database, in the order given; a registration written before devices
    /// knew several relays holds one, as `relay`.
    #[serde(alias = "relay", deserialize_with = "one_or_several")]
    pub relays: Vec<String>,
    pub server_name: String,
    pub fingerprint: String,
    pub ca_file: String,
    pub account: String,
    pub device: String,
    pub registered_ms: u64,
}

impl Registration {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("registration.json")
    }

    pub fn load(data_dir: &Path) -> Result<Option<Registration>, CredentialsError> {
        let path = Self::path(data_dir);
        let io = |source| CredentialsError::Io {
            path: path.clone(),
            source,
        };
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| io(std::io::Error::new(std::io::ErrorKind::InvalidData, e))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(e)),
        }
    }

    pub fn save(&self, data_dir: &Path) -> Result<(), CredentialsError> {
        write_owner_only(&Self::path(data_dir), self)
    }

    /// The sync settings of the device in `data_dir`: `apply` with its registration, if any.
    pub fn sync_config(
        data_dir: &Path,
        config: &crate::config::SyncConfig,
    ) -> Result<crate::config::SyncConfig, CredentialsError> {
        Ok(Self::apply(Self::load(data_dir)?.as_ref(), config))
    }

    /// The sync settings to use: the config's when it names a relay, else this registration's.
    pub fn apply(
        registration: Option<&Registration>,
        config: &crate::config::SyncConfig,
    ) -> crate::config::SyncConfig {
        match registration {
            Some(r) if config.relay.is_empty() => crate::config::SyncConfig {
                relay: r.relays.join(","),
                server_name: r.server_name.clone(),
                fingerprint: r.fingerprint.clone(),
                ca_file: r.ca_file.clone(),
                space: r.account.clone(),
                ..config.clone()
            },
            _ => config.clone(),
        }
    }
}

/// A list of addresses, or one address as a string (older registrations).
fn one_or_several<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Vec<String>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum OneOrSeveral {
        One(String),
        Several(Vec<String>),
    }
    Ok(
        match <OneOrSeveral as serde::Deserialize>::deserialize(de)? {
            OneOrSeveral::One(relay) => crate::config::relay_list(&relay),
            OneOrSeveral::Several(relays) => relays,
        },
    )
}

/// Decides when a device stops showing its tokens and signs in with its key instead: when the
/// relay refused them, or when two sessions in a row that showed them ended before the relay let
/// the device in (the refusal may have been lost with the connection).
#[derive(Debug, Default)]
pub struct Fallback {
    unanswered: u32,
}

impl Fallback {
    /// A session that showed `shown` ended; `authenticated` if the relay let it in. True when
    /// the tokens should be forgotten.
    pub fn session_ended(
        &mut self,
        shown: &Credential,
        authenticated: bool,
        error: Option<&ferry_proto::session::SessionError>,
    ) -> bool {
        use ferry_proto::session::SessionError;
        use ferry_proto::wire::ErrorCode;
        if authenticated || matches!(shown, Credential::Key | Credential::Enrol(_)) {
            self.unanswered = 0;
            return false;
        }
        let refused = matches!(
            error,
            Some(SessionError::Remote {
                code: ErrorCode::AuthenticationFailed,
                ..
            })
        );
        self.unanswered += 1;
        if refused || self.unanswered >= 2 {
            self.unanswered = 0;
            return true;
        }
        false
    }
}

/// What to show the relay at `now_ms` (this device's clock): a valid access token resumes
/// without new tokens; otherwise a live refresh token is rotated; otherwise the key alone
/// starts a new family. Also the refresh token the session can keep itself alive with.
pub fn choose(tokens: Option<&Tokens>, now_ms: u64) -> (Credential, Option<Secret>) {
    let Some(tokens) = tokens else {
        return (Credential::Key, None);
    };
    if tokens.refresh_expires_ms <= now_ms {
        return (Credential::Key, None);
    }
    let refresh = Some(tokens.refresh.clone());
    if tokens.access_expires_ms > now_ms.saturating_add(ACCESS_MARGIN_MS) {
        (Credential::Access(tokens.access.clone()), refresh)
    } else {
        (Credential::Refresh(tokens.refresh.clone()), refresh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(access_expires_ms: u64, refresh_expires_ms: u64) -> Tokens {
        Tokens {
            access: Secret::new("a"),
            access_expires_ms,
            refresh: Secret::new("r"),
            refresh_expires_ms,
        }
    }

    #[test]
    fn the_credential_follows_what_is_still_valid() {
        assert_eq!(choose(None, 0), (Credential::Key, None));
        let held = tokens(1_000_000, 5_000_000);
        assert_eq!(
            choose(Some(&held), 0),
            (Credential::Access(Secret::new("a")), Some(Secret::new("r")))
        );
        // Within a minute of the access token's expiry: refresh instead.
        assert_eq!(
            choose(Some(&held), 1_000_000 - ACCESS_MARGIN_MS).0,
            Credential::Refresh(Secret::new("r"))
        );
        assert_eq!(choose(Some(&held), 5_000_000), (Credential::Key, None));
    }

    #[test]
    fn tokens_are_dropped_when_refused_or_twice_unanswered() {
        use ferry_proto::session::SessionError;
        use ferry_proto::wire::ErrorCode;
        let access = Credential::Access(Secret::new("a"));
        let refused = SessionError::Remote {
            code: ErrorCode::AuthenticationFailed,
            message: "expired".into(),
        };
        let lost = SessionError::ConnectionLost("gone".into());
        let mut fallback = Fallback::default();
        assert!(fallback.session_ended(&access, false, Some(&refused)));
        assert!(!fallback.session_ended(&access, false, Some(&lost)));
        assert!(
            fallback.session_ended(&access, false, Some(&lost)),
            "second unanswered"
        );
        assert!(
            !fallback.session_ended(&access, false, Some(&lost)),
            "counting anew"
        );
        assert!(
            !fallback.session_ended(&access, true, Some(&lost)),
            "let in: reset"
        );
        assert!(!fallback.session_ended(&access, false, Some(&lost)));
        assert!(
            !fallback.session_ended(&Credential::Key, false, Some(&refused)),
            "the key is never dropped"
        );
    }

    #[test]
    fn registrations_with_one_relay_are_read_and_several_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        // As devices registered before they knew several relays wrote it.
        let old = r#"{"relay":"relay.example:4433","server_name":"localhost","fingerprint":"ab",
            "ca_file":"","account":"team","device":"d1","registered_ms":7}"#;
        std::fs::write(Registration::path(dir.path()), old).unwrap();
        let read = Registration::load(dir.path()).unwrap().unwrap();
        assert_eq!(read.relays, ["relay.example:4433"]);
        let sync = Registration::apply(Some(&read), &crate::config::SyncConfig::default());
        assert_eq!(sync.relays(), ["relay.example:4433"]);
        assert_eq!(sync.space, "team");

        let several = Registration {
            relays: vec!["a.example:1".into(), "b.example:2".into()],
            ..read
        };
        several.save(dir.path()).unwrap();
        let read = Registration::load(dir.path()).unwrap().unwrap();
        assert_eq!(read, several);
        let sync = Registration::apply(Some(&read), &crate::config::SyncConfig::default());
        assert_eq!(sync.relay, "a.example:1,b.example:2");
        assert_eq!(sync.relays(), ["a.example:1", "b.example:2"]);
        // The config's relays take precedence over the registration's.
        let configured = crate::config::SyncConfig {
            relay: "c.example:3".into(),
            ..crate::config::SyncConfig::default()
        };
        assert_eq!(
            Registration::apply(Some(&read), &configured).relays(),
            ["c.example:3"]
        );
    }

    #[test]
    fn tokens_are_kept_owner_only_and_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let file = TokenFile::new(dir.path());
        assert_eq!(file.load().unwrap(), None);
        file.save(&tokens(1, 2)).unwrap();
        file.save(&tokens(3, 4)).unwrap();
        assert_eq!(file.load().unwrap(), Some(tokens(3, 4)));
        let path = dir.path().join("tokens.json");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(file.load(), Err(CredentialsError::Exposed { .. })));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "{damaged").unwrap();
        assert_eq!(file.load().unwrap(), None, "damaged tokens count as none");
        file.clear().unwrap();
        file.clear().unwrap();
        assert_eq!(file.load().unwrap(), None);
    }
}
