//! `ferry relay account|enrol|devices|revoke|rotate-key|rebuild-record|migrate` (the relay
//! operator's side) and `ferry register` (a device joining an account).
//!
//! Operator commands go to the running relay's socket (`relay::admin`), or, when no relay runs,
//! open its store and run the same typed method (`relay::admin::AdminMethod`).
//! Must not touch: accounts' storage; sessions beyond `engine::register`.

use super::{Context, Failure, format_ms, print_json, read_secret_line, runtime};
use crate::config::RelayStorageKind;
use crate::config::SyncConfig;
use crate::datadir::DataDirError;
use crate::engine::{self, EngineError};
use crate::ipc::{Client, ClientError};
use crate::relay::accounts::{Accounts, os_random};
use crate::relay::admin::{self, AdminMethod, AdminOptions};
use crate::relay::storage::PgStorage;
use crate::relay::storage::pg::PgOptions;
use crate::relay::store::{RelayStore, RelayStoreOptions};
use clap::Subcommand;
use ferry_proto::wire::Secret;
use serde_json::json;

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
    /// Rebuild a record's document from the space's log, when the relay reports it damaged
    /// (refused when the log was compacted past the record's first change)
    RebuildRecord {
        /// The space (account) the record is in
        #[arg(long)]
        space: String,
        /// The record's collection
        #[arg(long)]
        collection: String,
        /// The record's id
        #[arg(long)]
        record: String,
    },
    /// Bring the PostgreSQL database's schema up to date (relay.storage = "postgres"), as a
    /// relay does when it starts
    Migrate {
        /// Apply nothing: list the pending migrations, and exit non-zero if there are any
        #[arg(long)]
        check: bool,
    },
    /// The records table (relay.storage = "postgres"): each space's log head, how far the table
    /// follows it, and its lag
    Status,
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
    match action {
        RelayAction::Migrate { check } => migrate(ctx, check),
        RelayAction::Status => super::relay_status::status(ctx),
        RelayAction::Account {
            action: AccountAction::Add { name },
        } => {
            let account = call_relay(ctx, admin::AccountAdd { name })?;
            show(ctx, &account, |a| {
                println!(
                    "account {} created: `ferry relay enrol {}` gives its devices a code",
                    a.name, a.name
                )
            })
        }
        RelayAction::Account {
            action: AccountAction::Password { name },
        } => {
            let password = read_password()?;
            let set = call_relay(ctx, admin::AccountPassword { name, password })?;
            show(ctx, &set, |s| {
                println!(
                    "password of account {} set: it signs in with POST /api/auth/login",
                    s.name
                )
            })
        }
        RelayAction::Account {
            action: AccountAction::List,
        } => {
            let accounts = call_relay(ctx, admin::AccountList {})?;
            show(ctx, &accounts, |accounts| {
                for a in accounts {
                    println!(
                        "{}  {} devices ({} revoked)  created {}",
                        a.name,
                        a.devices,
                        a.revoked_devices,
                        format_ms(ms(a.created_ms))
                    );
                }
            })
        }
        RelayAction::Enrol { account, hours } => {
            let code = call_relay(ctx, admin::Enrol { account, hours })?;
            show(ctx, &code, |code| {
                println!("{}", code.code);
                eprintln!(
                    "one device may register with this code until {}: \
                     ferry register --relay HOST:PORT --fingerprint FINGERPRINT --code CODE",
                    format_ms(ms(code.expires_ms))
                );
            })
        }
        RelayAction::Devices { account } => {
            let devices = call_relay(ctx, admin::Devices { account })?;
            show(ctx, &devices, |devices| {
                for d in devices {
                    let state = match d.revoked_ms {
                        Some(at) => format!("revoked {}", format_ms(ms(at))),
                        None => "active".into(),
                    };
                    println!(
                        "{}  {}  last sign-in {}  {state}",
                        d.device,
                        d.account,
                        format_ms(ms(d.last_sign_in_ms))
                    );
                }
            })
        }
        RelayAction::Revoke { device } => {
            let revoked = call_relay(ctx, admin::Revoke { device })?;
            show(ctx, &revoked, |r| {
                println!(
                    "device {} revoked: its sessions ended and its tokens no longer work",
                    r.device
                )
            })
        }
        RelayAction::RotateKey => {
            let rotated = call_relay(ctx, admin::RotateKey {})?;
            show(ctx, &rotated, |r| {
                println!("new token signing key {}", r.kid)
            })
        }
        RelayAction::RebuildRecord {
            space,
            collection,
            record,
        } => {
            let rebuilt = call_relay(
                ctx,
                admin::RebuildRecord {
                    space,
                    collection,
                    record,
                },
            )?;
            show(ctx, &rebuilt, |r| {
                println!(
                    "{}/{} of space {} rebuilt from {} log entries (seq {} to {}); heads {}; \
                     {} conflict entries{}",
                    r.collection,
                    r.record,
                    r.space,
                    r.changes,
                    r.first_seq,
                    r.last_seq,
                    r.heads.join(", "),
                    r.conflicts,
                    if r.conflicts_rebuilt {
                        " (the space's conflict entries were rebuilt from its log)"
                    } else {
                        ""
                    }
                )
            })
        }
    }
}

/// `ferry relay migrate [--check]`: the database's schema versions, and the migrations this
/// binary applies (or, with `--check`, would apply).
fn migrate(ctx: &Context, check: bool) -> Result<(), Failure> {
    if ctx.config.relay.storage != RelayStorageKind::Postgres {
        return Err(Failure::usage(
            "`ferry relay migrate` is for relay.storage = \"postgres\": the embedded sled store \
             has no schema to migrate",
        ));
    }
    let storage = PgStorage::connect(&PgOptions::from_config(&ctx.config.relay))
        .map_err(|e| Failure::failed(e.to_string()))?;
    let state = if check {
        storage.schema()
    } else {
        storage.migrate()
    }
    .map_err(|e| Failure::failed(e.to_string()))?;
    let pending: Vec<String> = state
        .pending
        .iter()
        .map(|(version, name)| format!("{version:04}_{name}"))
        .collect();
    show(
        ctx,
        &json!({
            "applied": state.applied,
            "pending": pending,
            "migrated": !check && !pending.is_empty(),
        }),
        |_| match (check, pending.is_empty()) {
            (_, true) => println!("the database's schema is up to date"),
            (true, false) => println!("pending migrations: {}", pending.join(", ")),
            (false, false) => println!("applied migrations: {}", pending.join(", ")),
        },
    )?;
    if check && !pending.is_empty() {
        return Err(Failure::failed(format!(
            "{} migration(s) pending: `ferry relay migrate` (or starting the relay) applies them",
            pending.len()
        )));
    }
    Ok(())
}

/// Prints an answer: as JSON with `--json`, otherwise as `human` writes it.
fn show<T: serde::Serialize>(
    ctx: &Context,
    answer: &T,
    human: impl FnOnce(&T),
) -> Result<(), Failure> {
    if ctx.json {
        let value = serde_json::to_value(answer)
            .map_err(|e| Failure::failed(format!("the answer cannot be written as JSON: {e}")))?;
        print_json(&value);
    } else {
        human(answer);
    }
    Ok(())
}

/// A time in unix milliseconds as `format_ms` takes it.
fn ms(at: u64) -> i64 {
    i64::try_from(at).unwrap_or(i64::MAX)
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

fn call_relay<M: AdminMethod>(ctx: &Context, params: M) -> Result<M::Answer, Failure> {
    let socket = admin::socket_path(&ctx.dir);
    if let Ok(mut client) = Client::connect(&socket) {
        return admin::request(&mut client, params).map_err(|e| match e {
            ClientError::Api(e) => e.into(),
            other => Failure::failed(format!("the relay's socket failed: {other}")),
        });
    }
    let _lock = ctx.dir.lock().map_err(|e| match e {
        DataDirError::Locked { .. } => Failure::failed(format!(
            "{e}; a relay seems to run on this data directory but its socket {} does not answer",
            socket.display()
        )),
        other => Failure::failed(other.to_string()),
    })?;
    let storage = crate::relay::open_storage(ctx.dir.path(), &ctx.config.relay)
        .map_err(|e| Failure::failed(e.to_string()))?;
    let now = crate::clock::now_ms();
    let accounts = Accounts::open(
        storage.clone(),
        ctx.config.relay.token_policy(),
        os_random(),
        now,
    )
    .map_err(|e| Failure::failed(e.to_string()))?;
    let store = RelayStore::open(
        storage,
        RelayStoreOptions {
            doc_cache_docs: ctx.config.relay.cache_docs,
            limits: ctx.config.limits,
            policies: ctx.config.policies(),
            ..RelayStoreOptions::default()
        },
    );
    let options = AdminOptions {
        enrolment_code_hours: ctx.config.relay.enrolment_code_hours,
    };
    let relay = admin::Operated {
        accounts: &accounts,
        store: &store,
        alerts: None,
        options: &options,
    };
    Ok(params.run(&relay, now)?)
}

pub(super) struct RegisterArgs {
    pub relay: Vec<String>,
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
        relay: args.relay.join(","),
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
        print_json(&json!({ "device": device, "account": account, "relays": registration.relays }));
    } else {
        println!(
            "device {device} registered in account {account} at {}",
            registration.relays.join(", ")
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
