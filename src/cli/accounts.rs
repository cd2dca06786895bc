//! `ferry relay account|enrol|devices|revoke|rotate-key` (the relay operator's side) and
//! `ferry register` (a device joining an account).
//!
//! Operator commands go to the running relay's socket (`relay::admin`), or, when no relay runs,
//! open its store and call the same `relay::admin::dispatch`.
//! Must not touch: accounts' storage; sessions beyond `engine::register`.

use super::{Context, Failure, format_ms, print_json, read_secret_line, runtime};
use crate::config::SyncConfig;
use crate::engine::{self, EngineError};
use crate::ipc::{Client, ClientError};
use crate::relay::accounts::{Accounts, os_random};
use crate::relay::admin::{self, AdminOptions};
use crate::relay::storage::KvStorage;
use crate::store::kv::SledKv;
use clap::Subcommand;
use ferry_proto::wire::Secret;
use serde_json::{Value, json};
use std::sync::Arc;

#[derive(Subcommand, Debug)]
pub(super) enum RelayAction {
    /// Accounts: `account add NAME` creates one (with its own space), `account list` lists them
    Account {
        #[command(subcommand)]
        action: AccountAction,
    },
    /// Print a one-time code that registers one device in ACCOUNT (`ferry register --code`)
    Enrol {
        /// The account the device joins
        account: String,
        /// How long the code stays valid [default: relay.enrolment_code_hours]
        #[arg(long)]
        hours: Option<u64>,
    },
    /// Registered devices, with their account, last sign-in and revocation
    Devices {
        /// Only this account's devices
        #[arg(long)]
        account: Option<String>,
    },
    /// Cut a device off at once: its sessions end and its tokens stop working
    Revoke {
        /// The device's id, as `ferry relay devices` lists it
        device: String,
    },
    /// Make a new token signing key now (the old one still verifies for the overlap window)
    RotateKey,
}

#[derive(Subcommand, Debug)]
pub(super) enum AccountAction {
    /// Create an account, with its own space of records
    Add {
        /// The account's name (devices join it with `ferry relay enrol NAME`'s code)
        name: String,
    },
    /// Set the password people and HTTP-only clients sign in with (POST /api/auth/login); read
    /// from standard input (one line) or FERRY_PASSWORD, never from the command line
    Password {
        /// The account's name
        name: String,
    },
    /// The accounts, with their devices
    List,
}

/// Runs an operator command against the running relay, or its store when none runs.
pub(super) fn relay_admin(ctx: &Context, action: RelayAction) -> Result<(), Failure> {
    let (method, params) = match &action {
        RelayAction::Account {
            action: AccountAction::Add { name },
        } => ("account.add", json!({ "name": name })),
        RelayAction::Account {
            action: AccountAction::Password { name },
        } => (
            "account.password",
            json!({ "name": name, "password": read_password()? }),
        ),
        RelayAction::Account {
            action: AccountAction::List,
        } => ("account.list", json!({})),
        RelayAction::Enrol { account, hours } => {
            ("enrol", json!({ "account": account, "hours": hours }))
        }
        RelayAction::Devices { account } => ("devices", json!({ "account": account })),
        RelayAction::Revoke { device } => ("revoke", json!({ "device": device })),
        RelayAction::RotateKey => ("keys.rotate", json!({})),
    };
    let result = call_relay(ctx, method, params)?;
    if ctx.json {
        print_json(&result);
        return Ok(());
    }
    match action {
        RelayAction::Account {
            action: AccountAction::Add { name },
        } => {
            println!("account {name} created: `ferry relay enrol {name}` gives its devices a code")
        }
        RelayAction::Account {
            action: AccountAction::Password { name },
        } => println!("password of account {name} set: it signs in with POST /api/auth/login"),
        RelayAction::Account {
            action: AccountAction::List,
        } => {
            for a in result.as_array().into_iter().flatten() {
                println!(
                    "{}  {} devices ({} revoked)  created {}",
                    a["name"].as_str().unwrap_or(""),
                    a["devices"],
                    a["revoked_devices"],
                    format_ms(a["created_ms"].as_i64().unwrap_or(0))
                );
            }
        }
        RelayAction::Enrol { .. } => {
            println!(
                "{}",
                result.get("code").and_then(Value::as_str).unwrap_or("")
            );
            eprintln!(
                "one device may register with this code until {}: \
                 ferry register --relay HOST:PORT --fingerprint FINGERPRINT --code CODE",
                format_ms(
                    result
                        .get("expires_ms")
                        .and_then(Value::as_i64)
                        .unwrap_or(0)
                )
            );
        }
        RelayAction::Devices { .. } => {
            for d in result.as_array().into_iter().flatten() {
                let state = match d["revoked_ms"].as_i64() {
                    Some(at) => format!("revoked {}", format_ms(at)),
                    None => "active".into(),
                };
                println!(
                    "{}  {}  last sign-in {}  {state}",
                    d["device"].as_str().unwrap_or(""),
                    d["account"].as_str().unwrap_or(""),
                    format_ms(d["last_sign_in_ms"].as_i64().unwrap_or(0))
                );
            }
        }
        RelayAction::Revoke { device } => {
            println!("device {device} revoked: its sessions ended and its tokens no longer work")
        }
        RelayAction::RotateKey => println!(
            "new token signing key {}",
            result.get("kid").and_then(Value::as_str).unwrap_or("")
        ),
    }
    Ok(())
}

/// The password from FERRY_PASSWORD, or one line of standard input (asked for without echo on
/// a terminal).
fn read_password() -> Result<String, Failure> {
    if let Ok(password) = std::env::var("FERRY_PASSWORD") {
        return Ok(password);
    }
    let password = read_secret_line("password: ")?;
    if password.is_empty() {
        return Err(Failure::usage(
            "no password: give it on standard input (one line) or in FERRY_PASSWORD",
        ));
    }
    Ok(password.to_string())
}

fn call_relay(ctx: &Context, method: &str, params: Value) -> Result<Value, Failure> {
    let socket = admin::socket_path(&ctx.dir);
    if let Ok(mut client) = Client::connect(&socket) {
        return client.call(method, params).map_err(|e| match e {
            ClientError::Api(e) => e.into(),
            other => Failure::failed(format!("the relay's socket failed: {other}")),
        });
    }
    let _lock = ctx.dir.lock().map_err(|e| {
        Failure::failed(format!(
            "{e}; a relay seems to run on this data directory but its socket {} does not answer",
            socket.display()
        ))
    })?;
    let kv = SledKv::open(
        &ctx.dir.path().join("relay.db"),
        ctx.config.relay.sled_cache_mb * 1024 * 1024,
    )
    .map_err(|e| Failure::failed(format!("cannot open the relay's store: {e}")))?;
    let accounts = Accounts::open(
        Arc::new(KvStorage::new(Arc::new(kv))),
        ctx.config.relay.token_policy(),
        os_random(),
        crate::clock::now_ms(),
    )
    .map_err(|e| Failure::failed(e.to_string()))?;
    let options = AdminOptions {
        enrolment_code_hours: ctx.config.relay.enrolment_code_hours,
    };
    Ok(admin::dispatch(
        &accounts,
        &options,
        method,
        params,
        crate::clock::now_ms(),
    )?)
}

pub(super) struct RegisterArgs {
    pub relay: String,
    pub fingerprint: Option<String>,
    pub ca_file: Option<String>,
    pub server_name: String,
    pub code: String,
}

/// `ferry register`: proves this device's key to the relay with an enrolment code, and keeps
/// the relay, the account and the tokens it issues for the daemon.
pub(super) fn register(ctx: &Context, args: RegisterArgs) -> Result<(), Failure> {
    ctx.dir.init(super::EXAMPLE_CONFIG)?;
    let code = if args.code == "-" {
        read_secret_line("enrolment code: ")?.trim().to_string()
    } else {
        args.code
    };
    let Some((account, _)) = code.split_once('/') else {
        return Err(Failure::usage(
            "the code is not an enrolment code: it looks like ACCOUNT/SECRET, as `ferry relay \
             enrol ACCOUNT` printed it",
        ));
    };
    let sync = SyncConfig {
        enabled: true,
        relay: args.relay,
        server_name: args.server_name,
        fingerprint: args.fingerprint.unwrap_or_default(),
        ca_file: args.ca_file.unwrap_or_default(),
        space: account.to_string(),
        ..ctx.config.sync.clone()
    };
    let identity = ctx.dir.identity()?;
    let device = identity.device_id();
    let waiting = super::RelayWait::start(&sync.relay);
    let registration = runtime()?
        .block_on(engine::register_device(
            ctx.dir.path(),
            identity.signing_key().clone(),
            &sync,
            Secret::new(code.clone()),
        ))
        .map_err(|e| match e {
            EngineError::NotConfigured
            | EngineError::RelayAddress(..)
            | EngineError::Fingerprint(_) => Failure::usage(e.to_string()),
            other => Failure::failed(other.to_string()),
        });
    drop(waiting);
    let registration = registration?;
    if ctx.json {
        print_json(&json!({ "device": device, "account": account, "relay": registration.relay }));
    } else {
        println!(
            "device {device} registered in account {account} at {}",
            registration.relay
        );
        if !ctx.config.sync.relay.is_empty() {
            println!(
                "note: the config's sync.relay ({}) takes precedence over this registration",
                ctx.config.sync.relay
            );
        }
        println!("a running daemon starts syncing with it once restarted");
    }
    Ok(())
}
