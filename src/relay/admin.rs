//! The relay operator's socket: `ferry relay account|enrol|devices|revoke|rotate-key` talk to a
//! running relay through `DATA_DIR/relay.sock` (a Unix socket, mode 0600, so only the relay's
//! own user reaches it), with the same JSON-RPC 2.0 lines as the device's socket. When no relay
//! runs, the CLI opens the store and calls [`dispatch`] itself: both paths share it.
//!
//! Owns: the operator's methods and their parameters.
//! Must not touch: accounts' storage (`relay::accounts`), devices' sessions.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::{SinkExt as _, StreamExt as _};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio_util::codec::{Framed, LinesCodec};

use super::accounts::{AccountError, Accounts};
use super::storage::StorageError;
use crate::clock::Clock;
use crate::datadir::DataDir;
use crate::ipc::{Message, decode_message};
use crate::service::{ApiError, code};

/// Longest request line the operator's socket reads.
const MAX_LINE_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct AdminOptions {
    /// Validity of an enrolment code when the request does not say.
    pub enrolment_code_hours: u64,
}

pub fn socket_path(dir: &DataDir) -> PathBuf {
    dir.path().join("relay.sock")
}

/// Binds the socket owner-only. The caller holds the data directory's lock, so a socket file
/// already there was left by a relay that died.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

impl From<AccountError> for ApiError {
    fn from(e: AccountError) -> Self {
        let code = match &e {
            AccountError::InvalidName(_) => code::INVALID_PARAMS,
            AccountError::Exists(_) => code::INVALID_STATE,
            AccountError::NoAccount(_) | AccountError::NoDevice(_) => code::NOT_FOUND,
            AccountError::Storage(StorageError::Corrupt { .. }) => code::CORRUPT,
            AccountError::Storage(_) => code::STORAGE,
            AccountError::Password(_) => code::INVALID_PARAMS,
            AccountError::Entropy(_) | AccountError::Signing(_) => code::INTERNAL,
        };
        ApiError::new(code, e.to_string())
    }
}

fn params<T: for<'de> Deserialize<'de>>(params: Value) -> Result<T, ApiError> {
    let params = if params.is_null() { json!({}) } else { params };
    serde_path_to_error::deserialize(params).map_err(ApiError::invalid_params)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Named {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PasswordParams {
    name: String,
    password: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrolParams {
    account: String,
    hours: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DevicesParams {
    account: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceParams {
    device: String,
}

/// Runs one operator method.
pub fn dispatch(
    accounts: &Accounts,
    options: &AdminOptions,
    method: &str,
    raw: Value,
    now_ms: u64,
) -> Result<Value, ApiError> {
    match method {
        "account.add" => {
            let p: Named = params(raw)?;
            to_json(&accounts.add_account(&p.name, now_ms)?)
        }
        "account.password" => {
            let p: PasswordParams = params(raw)?;
            accounts.set_password(&p.name, &ferry_proto::wire::Secret::new(p.password))?;
            Ok(json!({ "name": p.name, "password_set": true }))
        }
        "account.list" => {
            params::<NoParams>(raw)?;
            let devices = accounts.devices(None);
            let list: Vec<Value> = accounts
                .accounts()?
                .into_iter()
                .map(|a| {
                    let count = devices.iter().filter(|d| d.account == a.name).count();
                    let revoked = devices
                        .iter()
                        .filter(|d| d.account == a.name && d.revoked_ms.is_some())
                        .count();
                    json!({"name": a.name, "created_ms": a.created_ms,
                           "devices": count, "revoked_devices": revoked})
                })
                .collect();
            Ok(json!(list))
        }
        "enrol" => {
            let p: EnrolParams = params(raw)?;
            let hours = p.hours.unwrap_or(options.enrolment_code_hours);
            if hours == 0 {
                return Err(ApiError::invalid_params("hours must be at least 1"));
            }
            let code = accounts.enrol(&p.account, hours.saturating_mul(3_600_000), now_ms)?;
            to_json(&code)
        }
        "devices" => {
            let p: DevicesParams = params(raw)?;
            let list: Vec<Value> = accounts
                .devices(p.account.as_deref())
                .iter()
                .map(|d| {
                    json!({
                        "device": d.device,
                        "account": d.account,
                        "kind": d.kind,
                        "label": d.label,
                        "registered_ms": d.registered_ms,
                        "last_sign_in_ms": d.last_sign_in_ms,
                        "revoked_ms": d.revoked_ms,
                    })
                })
                .collect();
            Ok(json!(list))
        }
        "revoke" => {
            let p: DeviceParams = params(raw)?;
            let d = accounts.revoke(&p.device, now_ms)?;
            Ok(json!({"device": d.device, "account": d.account, "revoked_ms": d.revoked_ms}))
        }
        "keys.rotate" => {
            params::<NoParams>(raw)?;
            Ok(json!({"kid": accounts.rotate_signing_key(now_ms)?}))
        }
        other => Err(ApiError::new(
            code::METHOD_NOT_FOUND,
            format!(
                "unknown method {other:?}: the relay's socket serves account.add, \
                 account.password, account.list, enrol, devices, revoke and keys.rotate"
            ),
        )),
    }
}

fn to_json(value: &impl serde::Serialize) -> Result<Value, ApiError> {
    serde_json::to_value(value).map_err(|e| {
        ApiError::new(
            code::INTERNAL,
            format!("the answer cannot be written as JSON ({e}): please report this as a bug"),
        )
    })
}

/// Serves the operator's socket until `shutdown` turns true.
pub async fn serve(
    listener: UnixListener,
    accounts: Arc<Accounts>,
    clock: Arc<dyn Clock>,
    options: AdminOptions,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let accounts = accounts.clone();
                let clock = clock.clone();
                let options = options.clone();
                connections.spawn(async move {
                    let mut framed =
                        Framed::new(stream, LinesCodec::new_with_max_length(MAX_LINE_BYTES));
                    while let Some(Ok(line)) = framed.next().await {
                        let reply = answer(&accounts, &options, &line, clock.now_ms());
                        if let Some(reply) = reply
                            && framed.send(reply.to_string()).await.is_err()
                        {
                            break;
                        }
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.abort_all();
}

fn answer(accounts: &Accounts, options: &AdminOptions, line: &str, now_ms: u64) -> Option<Value> {
    let reply = |id: Value, result: Result<Value, ApiError>| match result {
        Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
        Err(e) => json!({"jsonrpc": "2.0", "id": id, "error": e}),
    };
    match decode_message(line) {
        Message::Empty => None,
        Message::Invalid(error) => Some(error),
        Message::Single(Err(error)) => Some(error),
        Message::Single(Ok(request)) => {
            let id = request.id.clone().unwrap_or(Value::Null);
            let result = tokio::task::block_in_place(|| {
                dispatch(accounts, options, &request.method, request.params, now_ms)
            });
            tracing::info!(
                method = request.method,
                ok = result.is_ok(),
                "operator request"
            );
            request.id.map(|_| reply(id, result))
        }
        Message::Batch(_) => Some(reply(
            Value::Null,
            Err(ApiError::new(
                code::INVALID_REQUEST,
                "the relay's socket takes one request per line, not batches",
            )),
        )),
    }
}
