//! The data directory: where it is, what is in it, who may use it. One process at a time holds
//! its lock (the daemon, or a CLI command working on the store directly).
//!
//! Layout: `config.toml`, `identity.key` (0600), `account.key` (0600, when an account key is
//! set), `store/` (sled), `ferry.sock` (0600), `ferry.lock` (holds the owner's pid).
//!
//! Must not touch: the contents of the store.

use crate::auth::{Identity, IdentityError};
use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, Write as _};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error(
        "no data directory could be found: set --data-dir, FERRY_DATA_DIR, XDG_DATA_HOME or HOME"
    )]
    NoDefault,
    #[error("data directory {0} does not exist: run `ferry init --data-dir {0}`")]
    Missing(PathBuf),
    #[error("{0} is not a directory: point --data-dir at a directory")]
    NotADirectory(PathBuf),
    #[error("data directory {path} is open to other users (mode {mode:o}): run `chmod 700 {path}`")]
    Exposed { path: PathBuf, mode: u32 },
    #[error(
        "data directory {path} is in use by another ferry process{}: stop it, or talk to it through its socket",
        .pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Locked { path: PathBuf, pid: Option<u32> },
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("cannot use {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone)]
pub struct DataDir {
    path: PathBuf,
}

/// Held while a process owns the data directory; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DataDir {
    /// `explicit` comes from `--data-dir` or `FERRY_DATA_DIR`; otherwise the XDG data directory.
    pub fn resolve(explicit: Option<&Path>) -> Result<Self, DataDirError> {
        if let Some(p) = explicit {
            return Ok(DataDir { path: p.to_owned() });
        }
        let base = std::env::var_os("XDG_DATA_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
            .ok_or(DataDirError::NoDefault)?;
        Ok(DataDir {
            path: base.join("ferry"),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn config_path(&self) -> PathBuf {
        self.path.join("config.toml")
    }

    pub fn identity_path(&self) -> PathBuf {
        self.path.join("identity.key")
    }

    pub fn account_key_path(&self) -> PathBuf {
        account_key_path(&self.path)
    }

    pub fn store_path(&self) -> PathBuf {
        self.path.join("store")
    }

    pub fn default_socket_path(&self) -> PathBuf {
        self.path.join("ferry.sock")
    }

    fn io(&self, source: std::io::Error) -> DataDirError {
        DataDirError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Creates the directory (0700), a config file with every default, and the identity key.
    /// An existing empty directory open to others (made with `mkdir`, say) is closed to them
    /// first; one that holds anything is left as it is and refused. Returns false when it was
    /// already initialised (nothing is changed then).
    pub fn init(&self, config_text: &str) -> Result<bool, DataDirError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.path)
            .map_err(|e| self.io(e))?;
        if let Err(DataDirError::Exposed { .. }) = self.check()
            && std::fs::read_dir(&self.path)
                .map_err(|e| self.io(e))?
                .next()
                .is_none()
        {
            std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| self.io(e))?;
        }
        self.check()?;
        if self.identity_path().exists() {
            return Ok(false);
        }
        let config = self.config_path();
        if !config.exists() {
            std::fs::write(&config, config_text).map_err(|e| self.io(e))?;
        }
        Identity::create(&self.identity_path())?;
        Ok(true)
    }

    /// The directory exists and only its owner can enter it.
    pub fn check(&self) -> Result<(), DataDirError> {
        let meta = std::fs::metadata(&self.path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => DataDirError::Missing(self.path.clone()),
            _ => self.io(e),
        })?;
        if !meta.is_dir() {
            return Err(DataDirError::NotADirectory(self.path.clone()));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(DataDirError::Exposed {
                path: self.path.clone(),
                mode,
            });
        }
        Ok(())
    }

    pub fn identity(&self) -> Result<Identity, DataDirError> {
        self.check()?;
        Ok(Identity::load(&self.identity_path())?)
    }

    /// `lock`, waiting up to `patience` for another process (a CLI command working on the store
    /// directly, say) to release it. While it waits, `keep_waiting` is asked with the holder's
    /// pid at each attempt; `false` gives up at once (with the `Locked` error).
    pub fn lock_within(
        &self,
        patience: Duration,
        mut keep_waiting: impl FnMut(Option<u32>) -> bool,
    ) -> Result<DirLock, DataDirError> {
        const POLL: Duration = Duration::from_millis(50);
        let deadline = Instant::now() + patience;
        loop {
            match self.lock() {
                Err(DataDirError::Locked { pid, .. })
                    if Instant::now() < deadline && keep_waiting(pid) =>
                {
                    std::thread::sleep(POLL);
                }
                taken => return taken,
            }
        }
    }

    /// Takes the directory's lock without waiting, writing this process's pid into it.
    pub fn lock(&self) -> Result<DirLock, DataDirError> {
        self.check()?;
        let path = self.path.join("ferry.lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| self.io(e))?;
        if file.try_lock().is_err() {
            let mut text = String::new();
            let pid = file
                .read_to_string(&mut text)
                .ok()
                .and_then(|_| text.trim().parse().ok());
            return Err(DataDirError::Locked {
                path: self.path.clone(),
                pid,
            });
        }
        file.set_len(0).map_err(|e| self.io(e))?;
        file.rewind().map_err(|e| self.io(e))?;
        write!(file, "{}", std::process::id()).map_err(|e| self.io(e))?;
        Ok(DirLock { _file: file })
    }
}

/// The account key's file (`crate::crypt`) in the data directory at `dir`.
pub fn account_key_path(dir: &Path) -> PathBuf {
    dir.join("account.key")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_check_and_lock() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::resolve(Some(&tmp.path().join("dev"))).unwrap();
        assert!(matches!(dir.check(), Err(DataDirError::Missing(_))));
        assert!(dir.init("").unwrap());
        assert!(!dir.init("").unwrap(), "second init changes nothing");
        let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let lock = dir.lock().unwrap();
        match dir.lock() {
            Err(DataDirError::Locked { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("expected Locked, got {other:?}"),
        }
        // A patient taker waits while the lock is held, and gets it once it is released.
        let (told, waiting) = std::sync::mpsc::channel();
        let patient = {
            let dir = dir.clone();
            std::thread::spawn(move || {
                dir.lock_within(Duration::from_secs(30), |pid| {
                    let _ = told.send(pid);
                    true
                })
            })
        };
        let holder = waiting.recv_timeout(Duration::from_secs(30)).unwrap();
        assert_eq!(holder, Some(std::process::id()));
        drop(lock);
        let lock = patient.join().unwrap().unwrap();
        assert!(matches!(
            dir.lock_within(Duration::from_secs(30), |_| false),
            Err(DataDirError::Locked { .. })
        ));
        drop(lock);
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(matches!(dir.check(), Err(DataDirError::Exposed { .. })));
        // Once it holds anything, init does not close it: it refuses it.
        assert!(matches!(dir.init(""), Err(DataDirError::Exposed { .. })));
    }

    #[test]
    fn init_closes_an_empty_directory_open_to_others() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("made-by-mkdir");
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(&path)
            .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let dir = DataDir::resolve(Some(&path)).unwrap();
        assert!(dir.init("").unwrap());
        let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        dir.check().unwrap();
    }
}
