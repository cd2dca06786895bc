//! `ferry key`: set, import, export and show the account key that encrypts the fields
//! collections declare `encrypted`.
//!
//! The key file is written here, in the data directory, even while a daemon runs; the daemon is
//! then told to read it again (`key.reload`), so the key and the passphrase never cross the
//! socket and cannot reach the daemon's logs.
//!
//! Must not touch: the store. Never prints the key except for `export`, whose job that is, and
//! never takes a secret from the command line (argv is visible to other users).

use super::{Context, Failure, print_json, read_secret_line};
use crate::auth::credentials::Registration;
use crate::crypt::{AccountKey, KeyError};
use crate::daemon;
use crate::ipc::Client;
use crate::service::api::KeyReloadParams;
use clap::Subcommand;
use serde_json::json;
use zeroize::Zeroizing;

/// Longest line read for a passphrase or an export line.

#[derive(Subcommand, Debug)]
pub enum Action {
    /// Derive the key from a passphrase (asked for without echo on a terminal, else one line of
    /// stdin, or FERRY_PASSPHRASE): every device of the account (its registration's, or
    /// `sync.space`) given the same passphrase gets the same key; run it after `ferry register`
    Set {
        /// Replace a different key already set (values written with it will no longer decrypt)
        #[arg(long)]
        replace: bool,
    },
    /// Read a line printed by `ferry key export` on another device from stdin
    Import {
        /// Replace a different key already set (values written with it will no longer decrypt)
        #[arg(long)]
        replace: bool,
    },
    /// Print the key as one line for `ferry key import` (keep it secret)
    Export,
    /// Whether a key is set, and its fingerprint
    Status,
}

impl From<KeyError> for Failure {
    fn from(e: KeyError) -> Self {
        match e {
            KeyError::EmptyPassphrase | KeyError::BadExportLine(_) | KeyError::Different { .. } => {
                Failure::usage(e.to_string())
            }
            other => Failure::failed(other.to_string()),
        }
    }
}

pub(super) fn run(ctx: &Context, action: Action) -> Result<(), Failure> {
    ctx.dir.check()?;
    let path = ctx.dir.account_key_path();
    match action {
        Action::Set { replace } => {
            let passphrase = match std::env::var("FERRY_PASSPHRASE") {
                Ok(p) if !p.is_empty() => Zeroizing::new(p),
                _ => read_secret_line("passphrase: ")?,
            };
            // The account this device syncs (its registration's, unless the config names a
            // relay): every device of the account derives the same key from the passphrase.
            let account = Registration::sync_config(ctx.dir.path(), &ctx.config.sync)
                .map_err(|e| Failure::failed(e.to_string()))?
                .space;
            let key = AccountKey::derive(passphrase.as_bytes(), &account)?;
            if !ctx.json {
                eprintln!("key derived for account {account}");
            }
            install(ctx, &key, replace)
        }
        Action::Import { replace } => {
            let line = read_secret_line("key line (from `ferry key export`): ")?;
            let key = AccountKey::from_export_line(&line)?;
            install(ctx, &key, replace)
        }
        Action::Export => {
            let key = AccountKey::load(&path)?.ok_or(KeyError::NotSet)?;
            println!("{}", key.export_line().as_str());
            Ok(())
        }
        Action::Status => {
            let fingerprint = AccountKey::load(&path)?.map(|k| k.fingerprint());
            if ctx.json {
                print_json(&json!({ "set": fingerprint.is_some(), "fingerprint": fingerprint }));
            } else {
                match fingerprint {
                    Some(f) => println!("account key set, fingerprint {f}"),
                    None => {
                        println!("no account key set: run `ferry key set` or `ferry key import`")
                    }
                }
            }
            Ok(())
        }
    }
}

/// Saves the key and has a running daemon pick it up.
fn install(ctx: &Context, key: &AccountKey, replace: bool) -> Result<(), Failure> {
    key.save(&ctx.dir.account_key_path(), replace)?;
    let socket = daemon::socket_path(&ctx.dir, &ctx.config);
    let daemon = match Client::connect(&socket) {
        Ok(mut client) => {
            client.request(KeyReloadParams {})?;
            true
        }
        Err(_) => false,
    };
    let fingerprint = key.fingerprint();
    if ctx.json {
        print_json(&json!({ "set": true, "fingerprint": fingerprint, "daemon_reloaded": daemon }));
    } else {
        println!("account key set, fingerprint {fingerprint}");
        if daemon {
            println!("the running daemon uses it now");
        }
    }
    Ok(())
}
