//! The relay operator's socket: `ferry relay account|enrol|devices|revoke|rotate-key|
//! rebuild-record` talk to a running relay through `DATA_DIR/relay.sock` (a Unix socket, mode 0600, so only the relay's
//! own user reaches it), with the same JSON-RPC 2.0 lines as the device's socket. When no relay
//! runs, the CLI opens the store and calls [`dispatch`] itself: both paths share it.
//!
//! Owns: the operator's methods, each a typed params struct with its answer type
//! ([`AdminMethod`]), run on an [`Operated`] relay, and [`request`], the typed call the CLI, the
//! demo and tests use.
//! Must not touch: accounts' storage (`relay::accounts`), the log's (`relay::store`), devices'
//! sessions.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::{SinkExt as _, StreamExt as _};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio_util::codec::{Framed, LinesCodec};

use super::accounts::{AccountError, Accounts, EnrolmentCode};
use super::alerts::RelayAlerts;
use super::storage::{AccountRecord, ClientKind, StorageError};
use super::store::{RecordRebuilt, RelayStore, RelayStoreError};
use crate::clock::Clock;
use crate::datadir::DataDir;
use crate::ipc::{Client, ClientError, Message, decode_message};
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

impl From<RelayStoreError> for ApiError {
    fn from(e: RelayStoreError) -> Self {
        let code = match &e {
            RelayStoreError::InvalidSpace(_) | RelayStoreError::Address(_) => code::INVALID_PARAMS,
            RelayStoreError::NoSuchRecord { .. } => code::NOT_FOUND,
            RelayStoreError::Compacted { .. } => code::INVALID_STATE,
            RelayStoreError::Unrebuildable { .. }
            | RelayStoreError::Record(_)
            | RelayStoreError::Storage(
                StorageError::Corrupt { .. } | StorageError::Damaged { .. },
            ) => code::CORRUPT,
            RelayStoreError::Storage(_) => code::STORAGE,
        };
        ApiError::new(code, e.to_string())
    }
}

/// The relay the operator's methods act on: the running one's parts, or those a command opened
/// on its data directory when none runs (no alerts then: they live in the running process).
pub struct Operated<'a> {
    pub accounts: &'a Accounts,
    pub store: &'a RelayStore,
    pub alerts: Option<&'a RelayAlerts>,
    pub options: &'a AdminOptions,
}

fn params<T: for<'de> Deserialize<'de>>(params: Value) -> Result<T, ApiError> {
    let params = if params.is_null() { json!({}) } else { params };
    serde_path_to_error::deserialize(params).map_err(ApiError::invalid_params)
}

/// One operator method: its name on the socket, its params (this type) and its answer.
pub trait AdminMethod: Serialize + for<'de> Deserialize<'de> {
    const NAME: &'static str;
    type Answer: Serialize + for<'de> Deserialize<'de>;
    fn run(self, relay: &Operated<'_>, now_ms: u64) -> Result<Self::Answer, ApiError>;
}

/// `account.add`: creates an account, with its own space.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountAdd {
    pub name: String,
}

impl AdminMethod for AccountAdd {
    const NAME: &'static str = "account.add";
    type Answer = AccountRecord;
    fn run(self, relay: &Operated<'_>, now_ms: u64) -> Result<AccountRecord, ApiError> {
        Ok(relay.accounts.add_account(&self.name, now_ms)?)
    }
}

/// `account.password`: sets the password the account signs in with over HTTP.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountPassword {
    pub name: String,
    pub password: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PasswordSet {
    pub name: String,
    pub password_set: bool,
}

impl AdminMethod for AccountPassword {
    const NAME: &'static str = "account.password";
    type Answer = PasswordSet;
    fn run(self, relay: &Operated<'_>, _: u64) -> Result<PasswordSet, ApiError> {
        relay
            .accounts
            .set_password(&self.name, &ferry_proto::wire::Secret::new(self.password))?;
        Ok(PasswordSet {
            name: self.name,
            password_set: true,
        })
    }
}

/// `account.list`: the accounts, with how many devices each has.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountList {}

#[derive(Debug, Serialize, Deserialize)]
pub struct AccountSummary {
    pub name: String,
    pub created_ms: u64,
    pub devices: usize,
    pub revoked_devices: usize,
}

impl AdminMethod for AccountList {
    const NAME: &'static str = "account.list";
    type Answer = Vec<AccountSummary>;
    fn run(self, relay: &Operated<'_>, _: u64) -> Result<Self::Answer, ApiError> {
        let devices = relay.accounts.devices(None);
        Ok(relay
            .accounts
            .accounts()?
            .into_iter()
            .map(|a| {
                let theirs = || devices.iter().filter(|d| d.account == a.name);
                AccountSummary {
                    devices: theirs().count(),
                    revoked_devices: theirs().filter(|d| d.revoked_ms.is_some()).count(),
                    name: a.name,
                    created_ms: a.created_ms,
                }
            })
            .collect())
    }
}

/// `enrol`: a one-time code that registers one device in `account`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Enrol {
    pub account: String,
    /// How long the code stays valid; the relay's `enrolment_code_hours` when absent.
    pub hours: Option<u64>,
}

impl AdminMethod for Enrol {
    const NAME: &'static str = "enrol";
    type Answer = EnrolmentCode;
    fn run(self, relay: &Operated<'_>, now_ms: u64) -> Result<EnrolmentCode, ApiError> {
        let hours = self.hours.unwrap_or(relay.options.enrolment_code_hours);
        if hours == 0 {
            return Err(ApiError::invalid_params("hours must be at least 1"));
        }
        Ok(relay
            .accounts
            .enrol(&self.account, hours.saturating_mul(3_600_000), now_ms)?)
    }
}

/// `devices`: registered devices, all or one account's.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Devices {
    pub account: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DeviceSummary {
    pub device: String,
    pub account: String,
    pub kind: ClientKind,
    pub label: String,
    pub registered_ms: u64,
    pub last_sign_in_ms: u64,
    pub revoked_ms: Option<u64>,
}

impl AdminMethod for Devices {
    const NAME: &'static str = "devices";
    type Answer = Vec<DeviceSummary>;
    fn run(self, relay: &Operated<'_>, _: u64) -> Result<Self::Answer, ApiError> {
        Ok(relay
            .accounts
            .devices(self.account.as_deref())
            .into_iter()
            .map(|d| DeviceSummary {
                device: d.device,
                account: d.account,
                kind: d.kind,
                label: d.label,
                registered_ms: d.registered_ms,
                last_sign_in_ms: d.last_sign_in_ms,
                revoked_ms: d.revoked_ms,
            })
            .collect())
    }
}

/// `revoke`: cuts a device off at once.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revoke {
    pub device: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Revoked {
    pub device: String,
    pub account: String,
    pub revoked_ms: Option<u64>,
}

impl AdminMethod for Revoke {
    const NAME: &'static str = "revoke";
    type Answer = Revoked;
    fn run(self, relay: &Operated<'_>, now_ms: u64) -> Result<Revoked, ApiError> {
        let d = relay.accounts.revoke(&self.device, now_ms)?;
        Ok(Revoked {
            device: d.device,
            account: d.account,
            revoked_ms: d.revoked_ms,
        })
    }
}

/// `keys.rotate`: a new token signing key now.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateKey {}

#[derive(Debug, Serialize, Deserialize)]
pub struct KeyRotated {
    pub kid: String,
}

impl AdminMethod for RotateKey {
    const NAME: &'static str = "keys.rotate";
    type Answer = KeyRotated;
    fn run(self, relay: &Operated<'_>, now_ms: u64) -> Result<KeyRotated, ApiError> {
        Ok(KeyRotated {
            kid: relay.accounts.rotate_signing_key(now_ms)?,
        })
    }
}

/// `record.rebuild`: rebuilds a record's document from the space's log
/// (`RelayStore::rebuild_record`), for a stored document the relay found damaged; on a running
/// relay, the account's `store_damaged` alert forgets that record's damage.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RebuildRecord {
    pub space: String,
    pub collection: String,
    pub record: String,
}

impl AdminMethod for RebuildRecord {
    const NAME: &'static str = "record.rebuild";
    type Answer = RecordRebuilt;
    fn run(self, relay: &Operated<'_>, _: u64) -> Result<RecordRebuilt, ApiError> {
        let rebuilt = relay
            .store
            .rebuild_record(&self.space, &self.collection, &self.record)?;
        tracing::info!(
            space = self.space,
            collection = self.collection,
            record = self.record,
            changes = rebuilt.changes,
            "record rebuilt from the log"
        );
        if let Some(alerts) = relay.alerts {
            alerts.rebuilt(&self.space, &(self.collection, self.record));
        }
        Ok(rebuilt)
    }
}

/// Runs one operator method given as JSON, answering in JSON (the socket's side).
pub fn dispatch(
    relay: &Operated<'_>,
    method: &str,
    raw: Value,
    now_ms: u64,
) -> Result<Value, ApiError> {
    fn run<M: AdminMethod>(
        raw: Value,
        relay: &Operated<'_>,
        now_ms: u64,
    ) -> Result<Value, ApiError> {
        to_json(&params::<M>(raw)?.run(relay, now_ms)?)
    }
    match method {
        AccountAdd::NAME => run::<AccountAdd>(raw, relay, now_ms),
        AccountPassword::NAME => run::<AccountPassword>(raw, relay, now_ms),
        AccountList::NAME => run::<AccountList>(raw, relay, now_ms),
        Enrol::NAME => run::<Enrol>(raw, relay, now_ms),
        Devices::NAME => run::<Devices>(raw, relay, now_ms),
        Revoke::NAME => run::<Revoke>(raw, relay, now_ms),
        RotateKey::NAME => run::<RotateKey>(raw, relay, now_ms),
        RebuildRecord::NAME => run::<RebuildRecord>(raw, relay, now_ms),
        other => Err(ApiError::new(
            code::METHOD_NOT_FOUND,
            format!(
                "unknown method {other:?}: the relay's socket serves account.add, \
                 account.password, account.list, enrol, devices, revoke, keys.rotate and \
                 record.rebuild"
            ),
        )),
    }
}

/// Calls an operator method on a running relay's socket and reads its typed answer.
pub fn request<M: AdminMethod>(client: &mut Client, params: M) -> Result<M::Answer, ClientError> {
    let params = serde_json::to_value(&params).map_err(|e| ClientError::Protocol(e.to_string()))?;
    let answer = client.call(M::NAME, params)?;
    serde_json::from_value(answer).map_err(|e| {
        ClientError::Protocol(format!(
            "the relay's answer to {} is not what it should be: {e}",
            M::NAME
        ))
    })
}

fn to_json(value: &impl serde::Serialize) -> Result<Value, ApiError> {
    serde_json::to_value(value).map_err(|e| {
        ApiError::new(
            code::INTERNAL,
            format!("the answer cannot be written as JSON ({e}): please report this as a bug"),
        )
    })
}

/// What the operator's socket serves: the running relay's parts.
#[derive(Clone)]
pub struct Served {
    pub accounts: Arc<Accounts>,
    pub store: Arc<RelayStore>,
    pub alerts: Arc<RelayAlerts>,
    pub clock: Arc<dyn Clock>,
    pub options: AdminOptions,
}

/// Serves the operator's socket until `shutdown` turns true.
pub async fn serve(listener: UnixListener, served: Served, mut shutdown: watch::Receiver<bool>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let served = served.clone();
                connections.spawn(async move {
                    let mut framed =
                        Framed::new(stream, LinesCodec::new_with_max_length(MAX_LINE_BYTES));
                    while let Some(Ok(line)) = framed.next().await {
                        let relay = Operated {
                            accounts: &served.accounts,
                            store: &served.store,
                            alerts: Some(&served.alerts),
                            options: &served.options,
                        };
                        let reply = answer(&relay, &line, served.clock.now_ms());
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

fn answer(relay: &Operated<'_>, line: &str, now_ms: u64) -> Option<Value> {
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
                dispatch(relay, &request.method, request.params, now_ms)
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
