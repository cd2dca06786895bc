//! The PostgreSQL relay storage: what the embedded engine (`kv.rs`) keeps, in tables of one
//! database that any number of relay processes share (`pg/migrations/` is the schema).
//!
//! Owns: the schema and its versioned migrations (applied under an advisory lock, so relays
//! starting together do not race; a schema newer than this binary knows is refused), the pool of
//! connections and the small tokio runtime that drives it, turning each synchronous trait call
//! into database calls, and the checksum of every stored value. Must not touch: what the relay
//! decides (`relay::store`, `relay::accounts`), nor anything it caches.
//!
//! The traits are synchronous and are called from tokio workers (sometimes inside
//! `block_in_place`) and from plain threads alike, so a call never enters a runtime itself: it
//! spawns its future on the engine's own runtime and waits for the answer on a channel.
//!
//! One total order per space: each space has a `spaces` row holding its head, locked
//! (`FOR UPDATE`) by the transaction of each append and compaction, which numbers its entries
//! from it and is refused (`HeadMoved`) when the head is not the one it was staged against. A
//! commit is durable when COMMIT returns, so `flush` has nothing left to do. Counters are sums
//! (`n = n + $1`), so commits from several relays add up.
//!
//! Every row holding a value carries a CRC-32 of its key and value, checked on each read, as the
//! embedded engine checks each value: a row that fails it is reported `Damaged`, never served.
//! Counters (head, quota bytes, horizon, conflict counts) are sums the database keeps; a damaged
//! page under them is the database's own to find (`initdb --data-checksums`).
//!
//! As in the embedded engine, a new record's base names the log entry of its first change
//! (`bases.logged_seq`) rather than repeat the change; compaction copies the change into the
//! base before it drops the entry. `reclaim_space` frees nothing itself: PostgreSQL's
//! autovacuum reuses the space rows leave.
//!
//! Beside the trait, the `records` table backends read with SQL: its progress rows and leases,
//! the snapshot a materializer step reads and the transaction that writes its rows with the
//! position they bring the table to (`relay::materializer` decides what rows hold).

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::mpsc;
use std::task::Poll;
use std::time::Duration;

use deadpool_postgres::GenericClient;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::mpsc::UnboundedSender;
use tokio_postgres::types::{FromSql, ToSql};
use tokio_postgres::{AsyncMessage, NoTls, Notification, Row};

use super::{
    AccountRecord, AccountStorage, AccountWrite, Append, ChangeKey, DeviceRecord, EnrolmentRecord,
    Holders, LogCompaction, LogStorage, RecordKey, RelayConflictCount, StorageError, StorageNews,
    StoredKey, Tombstone, UniqueValue, UniqueValues,
};
use crate::auth::token::Family;
use crate::record::is_one_change;
use crate::resolve::{Conflict, ConflictKind, ConflictStatus};
use ferry_proto::wire::{LogEntry, RecordName};

/// How to reach the database.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// A libpq connection string or URL (`postgres://user@host:port/database`).
    pub url: String,
    /// Most connections open at once.
    pub pool_size: usize,
    /// How long to wait for a connection.
    pub connect_timeout: Duration,
    /// The longest one statement may run before the database cancels it.
    pub statement_timeout: Duration,
}

impl PgOptions {
    /// The options `[relay]` gives (`postgres_*`).
    pub fn from_config(relay: &crate::config::RelayConfig) -> Self {
        PgOptions {
            url: relay.postgres_url.clone(),
            pool_size: relay.postgres_pool_size,
            connect_timeout: Duration::from_secs(relay.postgres_connect_timeout_secs),
            statement_timeout: Duration::from_secs(relay.postgres_statement_timeout_secs),
        }
    }
}

/// One step of the schema, applied once, in version order.
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    sql: &'static str,
}

/// Every migration this binary knows, oldest first.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "relay_storage",
        sql: include_str!("pg/migrations/0001_relay_storage.sql"),
    },
    Migration {
        version: 2,
        name: "relay_certificate",
        sql: include_str!("pg/migrations/0002_relay_certificate.sql"),
    },
    Migration {
        version: 3,
        name: "records",
        sql: include_str!("pg/migrations/0003_records.sql"),
    },
    Migration {
        version: 4,
        name: "base_in_log",
        sql: include_str!("pg/migrations/0004_base_in_log.sql"),
    },
];

/// The bases of the records named by `$2` (collections) and `$3` (ids) in space `$1`, each with
/// the log entry it names when its change is kept there (`logged_seq`): one index probe per
/// record (`LATERAL ... OFFSET 0`, planned per call).
const BASES_OF_RECORDS: &str =
    "SELECT u.c, u.r, b.base, b.crc, b.logged_seq, e.origin, e.hash, e.change, e.crc
     FROM unnest($2::text[], $3::text[]) AS u(c, r)
     CROSS JOIN LATERAL (SELECT base, crc, logged_seq FROM bases b
       WHERE b.space = $1 AND b.collection = u.c AND b.record = u.r OFFSET 0) b
     LEFT JOIN LATERAL (SELECT origin, hash, change, crc FROM log_entries e
       WHERE e.space = $1 AND e.seq = b.logged_seq OFFSET 0) e ON true";

/// Sets the seq of the log entry that last ended a record's history (a purge or a flatten
/// entry): `$1` space, `$2` collection, `$3` record, `$4` seq, `$5` its checksum.
const PUT_HISTORY_END: &str =
    "INSERT INTO purges (space, collection, record, seq, crc) VALUES ($1, $2, $3, $4, $5)
     ON CONFLICT (space, collection, record) DO UPDATE SET seq = $4, crc = $5";

/// The advisory lock migrations take (any fixed number the database's other users do not use).
const MIGRATION_LOCK: i64 = 0x6665_7272_795f_6462;

/// The first key of a space's advisory lock (`space_lock_key`'s the second): every append takes
/// it for its transaction, and a relay holding a space (`hold_space`) for its session.
const SPACE_LOCK_CLASS: i32 = 0x6665_7272;

/// The second key of the space's advisory lock: spaces whose names hash alike share a lock,
/// which only makes them wait for each other.
fn space_lock_key(space: &str) -> i32 {
    crc(&[space.as_bytes()])
}

/// Rows read per query when paging through a space's log.
const LOG_PAGE: i64 = 256;

type Param = Box<dyn ToSql + Sync + Send>;

fn p<T: ToSql + Sync + Send + 'static>(value: T) -> Param {
    Box::new(value)
}

pub struct PgStorage {
    /// Drives the pool's connections; `None` only while dropping.
    runtime: Option<tokio::runtime::Runtime>,
    pool: Pool,
    /// What the listening connection (`follow`) connects with.
    config: tokio_postgres::Config,
    /// The listening connection's `application_name`.
    listener_name: &'static str,
    /// The connection holding each space this relay holds (`hold_space`), which its appends
    /// to the space use meanwhile.
    held: std::sync::Mutex<HashMap<String, deadpool_postgres::Object>>,
}

impl Drop for PgStorage {
    fn drop(&mut self) {
        // Dropping a runtime waits for its tasks, which a tokio worker must not do: the storage
        // may be dropped on one.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// What `migrate` found and did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SchemaState {
    /// Versions applied before this call.
    pub applied: Vec<i32>,
    /// Versions this binary knows that the database lacks (before `migrate`, what it applies).
    pub pending: Vec<(i32, &'static str)>,
}

impl PgStorage {
    /// Connects (lazily: the first call opens the first connection) without touching the schema.
    pub fn connect(options: &PgOptions) -> Result<Self, StorageError> {
        let mut config =
            tokio_postgres::Config::from_str(&options.url).map_err(|e| StorageError::Database {
                detail: format!("relay.postgres_url does not parse: {e}"),
            })?;
        config.connect_timeout(options.connect_timeout);
        // A database that vanished without closing the connection (a host down, a partition)
        // is found within about a minute, rather than after the kernel's two hours.
        config.keepalives_idle(Duration::from_secs(30));
        config.keepalives_interval(Duration::from_secs(10));
        config.keepalives_retries(3);
        config.options(format!(
            "-c statement_timeout={}",
            options.statement_timeout.as_millis()
        ));
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ferry-postgres")
            .enable_all()
            .build()
            .map_err(|e| StorageError::Database {
                detail: format!("cannot start the database client's threads: {e}"),
            })?;
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(options.connect_timeout))
            .create_timeout(Some(options.connect_timeout))
            .build()
            .map_err(|e| StorageError::Database {
                detail: format!("cannot set up the connection pool: {e}"),
            })?;
        Ok(PgStorage {
            runtime: Some(runtime),
            pool,
            config,
            listener_name: LISTENER_NAME,
            held: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// The same storage, its listening connection named `name` (one that follows the database
    /// for something else than the relay's sessions).
    pub fn with_listener_name(mut self, name: &'static str) -> Self {
        self.listener_name = name;
        self
    }

    /// Connects and brings the schema up to date: what a relay does before it serves.
    pub fn open(options: &PgOptions) -> Result<Self, StorageError> {
        let storage = Self::connect(options)?;
        storage.migrate()?;
        Ok(storage)
    }

    /// The connections holding spaces (see `held`).
    fn held_connections(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, deadpool_postgres::Object>> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `work` on the engine's runtime and waits for its answer: safe from any thread, a
    /// tokio worker included.
    fn run<T, F, Fut>(&self, work: F) -> Result<T, StorageError>
    where
        F: FnOnce(Pool) -> Fut,
        Fut: Future<Output = Result<T, StorageError>> + Send + 'static,
        T: Send + 'static,
    {
        let runtime = self
            .runtime
            .as_ref()
            .ok_or_else(|| StorageError::Database {
                detail: "the storage is closed".into(),
            })?;
        let (answer, answered) = mpsc::sync_channel(1);
        let future = work(self.pool.clone());
        runtime.spawn(async move {
            // The caller waits for this; if it is gone, nobody needs the answer.
            let _ = answer.send(future.await);
        });
        answered.recv().map_err(|_| StorageError::Database {
            detail: "a database call stopped before it answered".into(),
        })?
    }

    /// One statement's rows.
    fn query(&self, sql: &'static str, params: Vec<Param>) -> Result<Vec<Row>, StorageError> {
        self.query_planned(sql, params, Planning::Cached)
    }

    /// One statement's rows, planned for these parameters (see `Planning::EachCall`).
    fn query_planned_each_call(
        &self,
        sql: &'static str,
        params: Vec<Param>,
    ) -> Result<Vec<Row>, StorageError> {
        self.query_planned(sql, params, Planning::EachCall)
    }

    fn query_planned(
        &self,
        sql: &'static str,
        params: Vec<Param>,
        planning: Planning,
    ) -> Result<Vec<Row>, StorageError> {
        self.run(move |pool| async move {
            let client = connection(&pool).await?;
            match rows_planned(&client, sql, &params, planning).await {
                // A pooled connection the database closed since it was last used (a restart,
                // a terminated backend) is dropped for good, and the read, which changes
                // nothing, is made once more on another.
                Err(StorageError::Unreachable { .. }) if client.is_closed() => {
                    drop(deadpool_postgres::Object::take(client));
                    rows_planned(&connection(&pool).await?, sql, &params, planning).await
                }
                answer => answer,
            }
        })
    }

    /// One statement's single row, if it gives one.
    fn query_opt(
        &self,
        sql: &'static str,
        params: Vec<Param>,
    ) -> Result<Option<Row>, StorageError> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    /// The schema's versions: those applied, and those this binary would apply.
    pub fn schema(&self) -> Result<SchemaState, StorageError> {
        self.run(|pool| async move {
            let client = connection(&pool).await?;
            let exists: bool = one(
                &client,
                "SELECT to_regclass('ferry_schema') IS NOT NULL",
                &[],
            )
            .await?;
            let applied = if exists {
                applied_versions(&client).await?
            } else {
                Vec::new()
            };
            schema_state(applied)
        })
    }

    /// Applies the migrations the database lacks, in one transaction under an advisory lock (a
    /// relay starting at the same time waits, then finds them applied); refused when the
    /// database's schema is newer than this binary knows. Returns what it found before.
    pub fn migrate(&self) -> Result<SchemaState, StorageError> {
        self.run(|pool| async move {
            let mut client = connection(&pool).await?;
            let tx = client.transaction().await.map_err(sql_error)?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .await
                .map_err(sql_error)?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS ferry_schema (
                     version integer PRIMARY KEY,
                     name text NOT NULL,
                     applied_at timestamptz NOT NULL DEFAULT now()
                 )",
            )
            .await
            .map_err(sql_error)?;
            let state = schema_state(applied_versions(&tx).await?)?;
            for migration in MIGRATIONS {
                if state.pending.iter().any(|(v, _)| *v == migration.version) {
                    tx.batch_execute(migration.sql).await.map_err(sql_error)?;
                    tx.execute(
                        "INSERT INTO ferry_schema (version, name) VALUES ($1, $2)",
                        &[&migration.version, &migration.name],
                    )
                    .await
                    .map_err(sql_error)?;
                }
            }
            tx.commit().await.map_err(sql_error)?;
            Ok(state)
        })
    }

    /// A space's counter from its `spaces` row (0 for a space never written).
    fn space_number(&self, sql: &'static str, space: &str) -> Result<u64, StorageError> {
        match self.query_opt(sql, vec![p(space.to_owned())])? {
            Some(row) => uint(col::<i64>(&row, 0)?, "space counter"),
            None => Ok(0),
        }
    }

    fn conflict_rows(&self, space: &str, rows: Vec<Row>) -> Result<Vec<Conflict>, StorageError> {
        rows.iter().map(|row| conflict_row(space, row)).collect()
    }

    fn account_values<T: serde::de::DeserializeOwned>(
        &self,
        sql: &'static str,
        table: &'static str,
        what: &'static str,
    ) -> Result<Vec<T>, StorageError> {
        self.query(sql, Vec::new())?
            .iter()
            .map(|row| account_value(row, table, what))
            .collect()
    }

    fn account_value_by<T: serde::de::DeserializeOwned>(
        &self,
        sql: &'static str,
        key: Param,
        table: &'static str,
        what: &'static str,
    ) -> Result<Option<T>, StorageError> {
        self.query_opt(sql, vec![key])?
            .map(|row| account_value(&row, table, what))
            .transpose()
    }
}

fn schema_state(applied: Vec<i32>) -> Result<SchemaState, StorageError> {
    let known = MIGRATIONS.iter().map(|m| m.version).max().unwrap_or(0);
    if let Some(&found) = applied.iter().max()
        && found > known
    {
        return Err(StorageError::SchemaTooNew { found, known });
    }
    let pending = MIGRATIONS
        .iter()
        .filter(|m| !applied.contains(&m.version))
        .map(|m| (m.version, m.name))
        .collect();
    Ok(SchemaState { applied, pending })
}

async fn applied_versions(client: &impl GenericClient) -> Result<Vec<i32>, StorageError> {
    client
        .query("SELECT version FROM ferry_schema ORDER BY version", &[])
        .await
        .map_err(sql_error)?
        .iter()
        .map(|row| col::<i32>(row, 0))
        .collect()
}

/// The channel each append announces itself on as it commits: `"<head> <space>"`.
const LOG_CHANNEL: &str = "ferry_log";
/// The channel account writes other relays keep something of are announced on:
/// `"device <id>"` (any write of the device), `"family <id>"` (a family revoked), `"keys "`.
const ACCOUNTS_CHANNEL: &str = "ferry_accounts";
/// How often the listening connection is checked: a database gone without closing it is found
/// about this fast, and its heads polled from then on.
const LISTENER_CHECK: Duration = Duration::from_secs(1);
/// The listening connection's `application_name`.
pub const LISTENER_NAME: &str = "ferry relay listener";
/// How long after losing it the listening connection is opened again.
const LISTENER_RETRY: Duration = Duration::from_millis(500);

async fn notify(
    tx: &deadpool_postgres::Transaction<'_>,
    channel: &str,
    payload: &str,
) -> Result<(), StorageError> {
    tx.execute("SELECT pg_notify($1, $2)", &[&channel, &payload])
        .await
        .map_err(sql_error)?;
    Ok(())
}

/// Listens to the commits announced on the database, on a connection of its own (a pooled one
/// would be recycled, and its notifications with it), until `news` is closed: reconnects
/// after `LISTENER_RETRY` whenever the connection is lost, saying `Deaf` meanwhile.
async fn listen(
    mut config: tokio_postgres::Config,
    name: &'static str,
    news: UnboundedSender<StorageNews>,
) {
    // Named so that an operator (or a test) can tell it from the pool's connections.
    config.application_name(name);
    loop {
        match listen_once(&config, &news).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, "not hearing other relays' commits: polling heads \
                    until the database is back");
                if news.send(StorageNews::Deaf).is_err() {
                    return;
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(LISTENER_RETRY) => {}
            () = news.closed() => return,
        }
    }
}

/// One listening connection's life: `Ok` when `news` was closed, the error that ended it
/// otherwise.
async fn listen_once(
    config: &tokio_postgres::Config,
    news: &UnboundedSender<StorageNews>,
) -> Result<(), StorageError> {
    let (client, mut connection) = config.connect(NoTls).await.map_err(sql_error)?;
    let (heard_tx, mut heard) = tokio::sync::mpsc::unbounded_channel::<Notification>();
    // Notifications arrive on the connection itself, which is polled here rather than left
    // to a plain driver task that would drop them.
    let _driver = AbortOnDrop(tokio::spawn(async move {
        while let Some(Ok(message)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let AsyncMessage::Notification(n) = message
                && heard_tx.send(n).is_err()
            {
                return;
            }
        }
    }));
    client
        .batch_execute(&format!("LISTEN {LOG_CHANNEL}; LISTEN {ACCOUNTS_CHANNEL}"))
        .await
        .map_err(sql_error)?;
    if news.send(StorageNews::Listening).is_err() {
        return Ok(());
    }
    let mut check = tokio::time::interval(LISTENER_CHECK);
    loop {
        tokio::select! {
            n = heard.recv() => {
                let Some(n) = n else {
                    return Err(StorageError::Unreachable {
                        detail: "the listening connection closed".into(),
                    });
                };
                match heard_news(&n) {
                    Some(item) => {
                        if news.send(item).is_err() {
                            return Ok(());
                        }
                    }
                    None => tracing::warn!(channel = n.channel(), payload = n.payload(),
                        "a notification of unknown form: ignored"),
                }
            }
            _ = check.tick() => {
                match tokio::time::timeout(LISTENER_CHECK * 2, client.simple_query("")).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(sql_error(e)),
                    Err(_) => {
                        return Err(StorageError::Unreachable {
                            detail: "the database stopped answering the listening connection"
                                .into(),
                        });
                    }
                }
            }
            () = news.closed() => return Ok(()),
        }
    }
}

/// Aborts its task when dropped: a listening connection's driver ends with it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What an announcement says; `None` for one of unknown form.
fn heard_news(n: &Notification) -> Option<StorageNews> {
    let (first, rest) = n.payload().split_once(' ')?;
    match (n.channel(), first) {
        (LOG_CHANNEL, head) => Some(StorageNews::Head {
            space: rest.to_owned(),
            head: head.parse().ok()?,
        }),
        (ACCOUNTS_CHANNEL, "device") => Some(StorageNews::Device(rest.to_owned())),
        (ACCOUNTS_CHANNEL, "family") => Some(StorageNews::FamilyRevoked(rest.to_owned())),
        (ACCOUNTS_CHANNEL, "keys") => Some(StorageNews::SigningKeys),
        _ => None,
    }
}

/// What account writes announce (`ACCOUNTS_CHANNEL`), each once.
fn announcements(writes: &[AccountWrite]) -> BTreeSet<String> {
    writes
        .iter()
        .filter_map(|write| match write {
            AccountWrite::Device(record) => Some(format!("device {}", record.device)),
            AccountWrite::RemoveDevice(device) => Some(format!("device {device}")),
            AccountWrite::Family(family) if family.revoked => Some(format!("family {}", family.id)),
            AccountWrite::SigningKey(_) | AccountWrite::RemoveSigningKey(_) => {
                Some("keys ".to_owned())
            }
            _ => None,
        })
        .collect()
}

async fn connection(pool: &Pool) -> Result<deadpool_postgres::Object, StorageError> {
    pool.get().await.map_err(|e| StorageError::Unreachable {
        detail: e.to_string(),
    })
}

/// How a statement is planned.
#[derive(Clone, Copy)]
enum Planning {
    /// Prepared once per connection; after a few calls PostgreSQL may keep one generic plan.
    Cached,
    /// Prepared afresh, so planned for the call's parameters and the tables' current sizes.
    /// For a lookup of an array of keys, written as a `LATERAL` subquery per key (`OFFSET 0`
    /// keeps it one, so that each key probes the index): a plan kept from when a table was
    /// nearly empty would scan the whole table for each key once it is large.
    EachCall,
}

async fn rows(
    client: &impl GenericClient,
    sql: &str,
    params: &[Param],
) -> Result<Vec<Row>, StorageError> {
    rows_planned(client, sql, params, Planning::Cached).await
}

async fn rows_planned(
    client: &impl GenericClient,
    sql: &str,
    params: &[Param],
    planning: Planning,
) -> Result<Vec<Row>, StorageError> {
    let params: Vec<&(dyn ToSql + Sync)> = params
        .iter()
        .map(|param| param.as_ref() as &(dyn ToSql + Sync))
        .collect();
    let statement = match planning {
        Planning::Cached => client.prepare_cached(sql).await,
        Planning::EachCall => client.prepare(sql).await,
    }
    .map_err(sql_error)?;
    client.query(&statement, &params).await.map_err(sql_error)
}

async fn one<T: for<'a> FromSql<'a>>(
    client: &impl GenericClient,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<T, StorageError> {
    let row = client.query_one(sql, params).await.map_err(sql_error)?;
    col(&row, 0)
}

async fn execute(
    client: &impl GenericClient,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, StorageError> {
    let statement = client.prepare_cached(sql).await.map_err(sql_error)?;
    client.execute(&statement, params).await.map_err(sql_error)
}

fn sql_error(e: tokio_postgres::Error) -> StorageError {
    if let Some(db) = e.as_db_error() {
        return StorageError::Database {
            detail: format!("{}: {}", db.code().code(), db.message()),
        };
    }
    // A connection that closed or failed reading or writing: the database went away.
    let io = std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
    if e.is_closed() || io {
        StorageError::Unreachable {
            detail: e.to_string(),
        }
    } else {
        StorageError::Database {
            detail: e.to_string(),
        }
    }
}

fn col<'a, T: FromSql<'a>>(row: &'a Row, index: usize) -> Result<T, StorageError> {
    row.try_get(index).map_err(|e| corrupt("row", e))
}

fn corrupt(what: &'static str, detail: impl ToString) -> StorageError {
    StorageError::Corrupt {
        what,
        detail: detail.to_string(),
    }
}

/// A stored number as the trait's type.
fn uint(value: i64, what: &'static str) -> Result<u64, StorageError> {
    u64::try_from(value).map_err(|_| corrupt(what, format!("{value} is negative")))
}

/// A number as the database's `bigint`.
fn int(value: u64) -> Result<i64, StorageError> {
    i64::try_from(value).map_err(|_| StorageError::Encode {
        what: "number",
        detail: format!("{value} does not fit a bigint"),
    })
}

/// A row limit as the database's `bigint`: the largest one means no limit.
fn limit(value: usize) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// The CRC-32 a row carries: of its key and value, each part length-prefixed, so that moving
/// bytes between parts changes it.
fn crc(parts: &[&[u8]]) -> i32 {
    let mut hasher = crc32fast::Hasher::new();
    for part in parts {
        hasher.update(&(part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    i32::from_be_bytes(hasher.finalize().to_be_bytes())
}

/// Checks a row's CRC; `damaged` names what it held when it fails.
fn check(
    stored: i32,
    parts: &[&[u8]],
    damaged: impl FnOnce() -> StorageError,
) -> Result<(), StorageError> {
    if stored == crc(parts) {
        Ok(())
    } else {
        Err(damaged())
    }
}

fn damaged(
    what: &'static str,
    space: &str,
    position: String,
    record: Option<RecordKey>,
) -> StorageError {
    StorageError::Damaged {
        what,
        space: space.to_owned(),
        position,
        record,
    }
}

fn record_damaged(what: &'static str, space: &str, collection: &str, record: &str) -> StorageError {
    damaged(
        what,
        space,
        format!("key {collection}/{record}"),
        Some((collection.to_owned(), record.to_owned())),
    )
}

fn seq_damaged(what: &'static str, space: &str, seq: u64) -> StorageError {
    damaged(what, space, format!("seq {seq}"), None)
}

fn json<T: serde::Serialize>(value: &T, what: &'static str) -> Result<Vec<u8>, StorageError> {
    serde_json::to_vec(value).map_err(|e| StorageError::Encode {
        what,
        detail: e.to_string(),
    })
}

fn from_json<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &'static str,
) -> Result<T, StorageError> {
    serde_json::from_slice(bytes).map_err(|e| corrupt(what, e))
}

fn encode<T: serde::Serialize>(value: &T, what: &'static str) -> Result<Vec<u8>, StorageError> {
    postcard::to_stdvec(value).map_err(|e| StorageError::Encode {
        what,
        detail: e.to_string(),
    })
}

fn hash_of(bytes: &[u8], what: &'static str) -> Result<[u8; 32], StorageError> {
    <[u8; 32]>::try_from(bytes).map_err(|_| corrupt(what, format!("{} bytes, not 32", bytes.len())))
}

fn heads_of(bytes: &[u8]) -> Result<Vec<[u8; 32]>, StorageError> {
    let (heads, rest) = bytes.as_chunks::<32>();
    if !rest.is_empty() {
        return Err(corrupt(
            "record heads",
            format!("{} bytes, not a multiple of 32", bytes.len()),
        ));
    }
    Ok(heads.to_vec())
}

fn log_crc(space: &str, seq: u64, entry: (&str, &str, &str, &[u8], &[u8])) -> i32 {
    let (collection, record, origin, hash, change) = entry;
    crc(&[
        space.as_bytes(),
        &seq.to_be_bytes(),
        collection.as_bytes(),
        record.as_bytes(),
        origin.as_bytes(),
        hash,
        change,
    ])
}

/// A record's row: its key and value.
/// The seq of a dedup index row (its seq at column `at`, its crc next), checked.
fn checked_change_seq(
    space: &str,
    (collection, record, hash): (&str, &str, &[u8; 32]),
    row: &Row,
    at: usize,
) -> Result<u64, StorageError> {
    let seq = uint(col::<i64>(row, at)?, "change index entry")?;
    check(
        col(row, at + 1)?,
        &[
            space.as_bytes(),
            collection.as_bytes(),
            record.as_bytes(),
            hash,
            &seq.to_be_bytes(),
        ],
        || record_damaged("change index entry", space, collection, record),
    )?;
    Ok(seq)
}

/// A base row's bytes (from column `at`: `b.base, b.crc, b.logged_seq` of `bases b`, then
/// `e.origin, e.hash, e.change, e.crc` of the log entry `logged_seq` names, joined), checked:
/// the change of the entry it names, or the bytes it holds.
fn checked_base(
    space: &str,
    (collection, record): (&str, &str),
    row: &Row,
    at: usize,
) -> Result<Vec<u8>, StorageError> {
    let base: Vec<u8> = col(row, at)?;
    check(
        col(row, at + 1)?,
        &[
            space.as_bytes(),
            collection.as_bytes(),
            record.as_bytes(),
            &base,
        ],
        || record_damaged("document", space, collection, record),
    )?;
    let Some(seq) = col::<Option<i64>>(row, at + 2)? else {
        return Ok(base);
    };
    let seq = uint(seq, "base's log entry")?;
    if base != seq.to_be_bytes() {
        return Err(record_damaged("document", space, collection, record));
    }
    let (Some(origin), Some(hash), Some(change), Some(crc)) = (
        col::<Option<String>>(row, at + 3)?,
        col::<Option<Vec<u8>>>(row, at + 4)?,
        col::<Option<Vec<u8>>>(row, at + 5)?,
        col::<Option<i32>>(row, at + 6)?,
    ) else {
        return Err(corrupt(
            "document",
            format!(
                "{collection}/{record}'s document is its first change, log entry {seq}, \
                 which the log no longer holds"
            ),
        ));
    };
    // The entry must be this record's: its crc is checked with the record's name.
    if crc != log_crc(space, seq, (collection, record, &origin, &hash, &change)) {
        return Err(seq_damaged("log entry", space, seq));
    }
    Ok(change)
}

/// A tail row's seq, checked against its crc.
fn checked_tail_seq(
    space: &str,
    (collection, record): (&str, &str),
    seq: i64,
    crc: i32,
) -> Result<u64, StorageError> {
    let seq = uint(seq, "tail seq")?;
    check(
        crc,
        &[
            space.as_bytes(),
            collection.as_bytes(),
            record.as_bytes(),
            &seq.to_be_bytes(),
        ],
        || {
            damaged(
                "document's tail entry",
                space,
                format!("record {collection}/{record}, seq {seq}"),
                Some((collection.to_owned(), record.to_owned())),
            )
        },
    )?;
    Ok(seq)
}

fn record_crc(space: &str, collection: &str, record: &str, value: &[u8]) -> i32 {
    crc(&[
        space.as_bytes(),
        collection.as_bytes(),
        record.as_bytes(),
        value,
    ])
}

fn conflict_crc(space: &str, id: &str, conflict: (&str, &str, bool), entry: &[u8]) -> i32 {
    let (collection, record, open) = conflict;
    crc(&[
        space.as_bytes(),
        id.as_bytes(),
        collection.as_bytes(),
        record.as_bytes(),
        &[u8::from(open)],
        entry,
    ])
}

fn holders_crc(space: &str, value: &UniqueValue, holders: &[u8]) -> i32 {
    crc(&[
        space.as_bytes(),
        value.collection.as_bytes(),
        &(value.constraint as u64).to_be_bytes(),
        value.value.as_bytes(),
        holders,
    ])
}

fn tombstone_crc(space: &str, tombstone: &Tombstone) -> i32 {
    crc(&[
        space.as_bytes(),
        &tombstone.seq.to_be_bytes(),
        tombstone.collection.as_bytes(),
        tombstone.record.as_bytes(),
        &tombstone.heads.concat(),
        &tombstone.time_ms.to_be_bytes(),
    ])
}

/// A conflict row: `id, collection, record, open, entry, crc`.
fn conflict_row(space: &str, row: &Row) -> Result<Conflict, StorageError> {
    let id: String = col(row, 0)?;
    let collection: String = col(row, 1)?;
    let record: String = col(row, 2)?;
    let open: bool = col(row, 3)?;
    let entry: Vec<u8> = col(row, 4)?;
    check(
        col(row, 5)?,
        &[
            space.as_bytes(),
            id.as_bytes(),
            collection.as_bytes(),
            record.as_bytes(),
            &[u8::from(open)],
            &entry,
        ],
        || damaged("conflict data", space, format!("key {id}"), None),
    )?;
    from_json(&entry, "conflict entry")
}

/// An account row: `key, value, crc` (the key as text or bytes).
fn account_value<T: serde::de::DeserializeOwned>(
    row: &Row,
    table: &'static str,
    what: &'static str,
) -> Result<T, StorageError> {
    let key: Vec<u8> = match row.try_get::<_, String>(0) {
        Ok(text) => text.into_bytes(),
        Err(_) => col(row, 0)?,
    };
    let value: Vec<u8> = col(row, 1)?;
    check(col(row, 2)?, &[table.as_bytes(), &key, &value], || {
        damaged(
            "account data",
            "",
            format!("{table} {}", String::from_utf8_lossy(&key)),
            None,
        )
    })?;
    postcard::from_bytes(&value).map_err(|e| corrupt(what, e))
}

fn account_crc(table: &str, key: &[u8], value: &[u8]) -> i32 {
    crc(&[table.as_bytes(), key, value])
}

/// Locks the space's row for this transaction and returns its head, making the row first.
async fn lock_space(
    tx: &deadpool_postgres::Transaction<'_>,
    space: &str,
) -> Result<u64, StorageError> {
    const LOCK: &str = "SELECT head FROM spaces WHERE space = $1 FOR UPDATE";
    let mut found = rows(tx, LOCK, &[p(space.to_owned())]).await?;
    if found.is_empty() {
        execute(
            tx,
            "INSERT INTO spaces (space) VALUES ($1) ON CONFLICT DO NOTHING",
            &[&space],
        )
        .await?;
        found = rows(tx, LOCK, &[p(space.to_owned())]).await?;
    }
    match found.first() {
        Some(row) => uint(col::<i64>(row, 0)?, "space head"),
        None => Err(corrupt("space", format!("{space:?} has no row to lock"))),
    }
}

/// Statements of one transaction sent together: PostgreSQL runs them one after the other, in
/// the order pushed, and the transaction waits one round trip for all of them instead of one
/// each (what a small append, a single edit, mostly waits for).
#[derive(Default)]
struct Pipeline {
    statements: Vec<(&'static str, Vec<Param>)>,
}

impl Pipeline {
    fn push(&mut self, sql: &'static str, params: Vec<Param>) {
        self.statements.push((sql, params));
    }

    /// Runs the statements pushed so far, in order; the first error fails it (PostgreSQL
    /// refuses every later statement of the transaction then).
    async fn run(&mut self, tx: &deadpool_postgres::Transaction<'_>) -> Result<(), StorageError> {
        let statements = std::mem::take(&mut self.statements);
        // Prepared first (from the connection's cache, once warm) so that nothing but the
        // executions below goes out between them: each is sent when first polled, in order.
        let mut prepared = Vec::with_capacity(statements.len());
        for (sql, _) in &statements {
            prepared.push(tx.prepare_cached(sql).await.map_err(sql_error)?);
        }
        let mut runs: Vec<Option<Pin<Box<dyn Future<Output = _> + Send + '_>>>> = statements
            .iter()
            .zip(&prepared)
            .map(|((_, params), statement)| {
                let run: Pin<Box<dyn Future<Output = _> + Send + '_>> = Box::pin(async move {
                    let params: Vec<&(dyn ToSql + Sync)> = params
                        .iter()
                        .map(|param| param.as_ref() as &(dyn ToSql + Sync))
                        .collect();
                    tx.execute(statement, &params).await.map_err(sql_error)
                });
                Some(run)
            })
            .collect();
        std::future::poll_fn(|cx| {
            let mut waiting = false;
            for slot in &mut runs {
                let Some(run) = slot else { continue };
                match run.as_mut().poll(cx) {
                    Poll::Ready(Ok(_)) => *slot = None,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => waiting = true,
                }
            }
            if waiting {
                Poll::Pending
            } else {
                Poll::Ready(Ok(()))
            }
        })
        .await
    }
}

fn put_base(pipeline: &mut Pipeline, space: &str, record: &RecordKey, base: &[u8]) {
    let (collection, id) = record;
    pipeline.push(
        "INSERT INTO bases (space, collection, record, base, crc) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (space, collection, record)
         DO UPDATE SET base = $4, crc = $5, logged_seq = NULL",
        vec![
            p(space.to_owned()),
            p(collection.clone()),
            p(id.clone()),
            p(base.to_vec()),
            p(record_crc(space, collection, id, base)),
        ],
    );
}

fn drop_tails(
    pipeline: &mut Pipeline,
    space: &str,
    record: &RecordKey,
    seqs: &[u64],
) -> Result<(), StorageError> {
    let seqs = seqs
        .iter()
        .map(|&s| int(s))
        .collect::<Result<Vec<_>, _>>()?;
    let (collection, id) = record;
    pipeline.push(
        "DELETE FROM tails WHERE space = $1 AND collection = $2 AND record = $3
         AND seq = ANY($4)",
        vec![
            p(space.to_owned()),
            p(collection.clone()),
            p(id.clone()),
            p(seqs),
        ],
    );
    Ok(())
}

/// Removes what the space keeps of the record's history (base, tail, logged heads, unique
/// values, conflict entries with their counts) and keeps the purge entry's seq.
async fn purge_record(
    tx: &deadpool_postgres::Transaction<'_>,
    space: &str,
    record: &RecordKey,
    seq: u64,
) -> Result<(), StorageError> {
    let (collection, id) = record;
    for sql in [
        "DELETE FROM bases WHERE space = $1 AND collection = $2 AND record = $3",
        "DELETE FROM record_heads WHERE space = $1 AND collection = $2 AND record = $3",
        "DELETE FROM unique_values WHERE space = $1 AND collection = $2 AND record = $3",
        "DELETE FROM tails WHERE space = $1 AND collection = $2 AND record = $3",
    ] {
        execute(tx, sql, &[&space, collection, id]).await?;
    }
    let removed = rows(
        tx,
        "DELETE FROM conflicts WHERE space = $1 AND collection = $2 AND record = $3
         RETURNING id, collection, record, open, entry, crc",
        &[p(space.to_owned()), p(collection.clone()), p(id.clone())],
    )
    .await?;
    // Their counts go with them: the counts are those of the entries kept, as on a device that
    // bootstraps from a snapshot after the purge.
    let mut counted: HashMap<(ConflictKind, String), i64> = HashMap::new();
    for row in &removed {
        let conflict = conflict_row(space, row)?;
        *counted
            .entry((conflict.kind, conflict.collection))
            .or_default() += 1;
    }
    for ((kind, collection), removed) in counted {
        execute(
            tx,
            "UPDATE conflict_counts SET detected = GREATEST(detected - $4, 0)
             WHERE space = $1 AND kind = $2 AND collection = $3",
            &[&space, &kind.as_str(), &collection, &removed],
        )
        .await?;
    }
    execute(
        tx,
        "DELETE FROM conflict_counts WHERE space = $1 AND detected = 0",
        &[&space],
    )
    .await?;
    execute(
        tx,
        PUT_HISTORY_END,
        &[
            &space,
            collection,
            id,
            &int(seq)?,
            &record_crc(space, collection, id, &seq.to_be_bytes()),
        ],
    )
    .await?;
    Ok(())
}

/// Commits `append` as one transaction on `client`: after the space's advisory lock (held
/// meanwhile by a relay that holds the space: see `hold_space`) and its row's, refused with
/// `HeadMoved` when the head is not the one it was staged against.
async fn write_whole_append(
    client: &mut deadpool_postgres::Object,
    space: &str,
    append: Append,
) -> Result<(), StorageError> {
    let tx = client.transaction().await.map_err(sql_error)?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, $2)",
        &[&SPACE_LOCK_CLASS, &space_lock_key(space)],
    )
    .await
    .map_err(sql_error)?;
    let head = lock_space(&tx, space).await?;
    if head != append.after {
        return Err(StorageError::HeadMoved {
            staged: append.after,
            head,
        });
    }
    write_append(&tx, space, append).await?;
    tx.commit().await.map_err(sql_error)
}

/// The writes of one append, in the order the embedded engine's batch makes them (a later write
/// to the same row replaces an earlier one), pipelined.
async fn write_append(
    tx: &deadpool_postgres::Transaction<'_>,
    space: &str,
    append: Append,
) -> Result<(), StorageError> {
    let mut pipeline = Pipeline::default();
    let owned_space = || p(space.to_owned());
    if !append.created.is_empty() {
        // A new record's base is its first change, which its log entry in this append holds
        // too: the base names that entry (its seq's bytes, and `logged_seq`) instead.
        let mut creating: HashMap<(&str, &str), (u64, &[u8])> = HashMap::new();
        for (seq, entry) in (append.after.saturating_add(1)..).zip(&append.entries) {
            creating
                .entry((entry.collection.as_str(), entry.record.as_str()))
                .or_insert((seq, entry.change.as_slice()));
        }
        let mut logged: Vec<Option<i64>> = Vec::with_capacity(append.created.len());
        let mut values = Vec::with_capacity(append.created.len());
        // Each record once: `created` is keyed by record.
        for (key, base) in &append.created {
            match creating.get(&(key.0.as_str(), key.1.as_str())) {
                Some(&(seq, change)) if change == base.as_slice() => {
                    logged.push(Some(int(seq)?));
                    values.push((key, seq.to_be_bytes().to_vec()));
                }
                _ => {
                    logged.push(None);
                    values.push((key, base.clone()));
                }
            }
        }
        let rows = Columns::of_records(space, values.into_iter());
        pipeline.push(
            "INSERT INTO bases (space, collection, record, base, crc, logged_seq)
             SELECT $1, * FROM unnest($2::text[], $3::text[], $4::bytea[], $5::integer[],
             $6::bigint[])
             ON CONFLICT (space, collection, record)
             DO UPDATE SET base = EXCLUDED.base, crc = EXCLUDED.crc,
             logged_seq = EXCLUDED.logged_seq",
            vec![
                owned_space(),
                p(rows.collections),
                p(rows.records),
                p(rows.values),
                p(rows.crcs),
                p(logged),
            ],
        );
    }
    let log_bytes = insert_entries(&mut pipeline, space, &append)?;
    if !append.purged.is_empty() {
        // A purge reads what it removes: the statements before it run first.
        pipeline.run(tx).await?;
        for (record, seq) in &append.purged {
            purge_record(tx, space, record, *seq).await?;
        }
    }
    for tombstone in &append.tombstones {
        pipeline.push(
            "INSERT INTO tombstones (space, seq, collection, record, heads, time_ms, crc)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (space, seq) DO UPDATE SET collection = $3, record = $4, heads = $5,
             time_ms = $6, crc = $7",
            vec![
                owned_space(),
                p(int(tombstone.seq)?),
                p(tombstone.collection.clone()),
                p(tombstone.record.clone()),
                p(tombstone.heads.concat()),
                p(int(tombstone.time_ms)?),
                p(tombstone_crc(space, tombstone)),
            ],
        );
    }
    if !append.tombstones_done.is_empty() {
        let done = append
            .tombstones_done
            .iter()
            .map(|&s| int(s))
            .collect::<Result<Vec<_>, _>>()?;
        pipeline.push(
            "DELETE FROM tombstones WHERE space = $1 AND seq = ANY($2)",
            vec![owned_space(), p(done)],
        );
    }
    if !append.tails.is_empty() {
        let mut rows = Columns::default();
        for ((collection, record), seq) in &append.tails {
            rows.collections.push(collection.clone());
            rows.records.push(record.clone());
            rows.seqs.push(int(*seq)?);
            rows.crcs
                .push(record_crc(space, collection, record, &seq.to_be_bytes()));
        }
        pipeline.push(
            "INSERT INTO tails (space, collection, record, seq, crc)
             SELECT $1, * FROM unnest($2::text[], $3::text[], $4::bigint[], $5::integer[])
             ON CONFLICT DO NOTHING",
            vec![
                owned_space(),
                p(rows.collections),
                p(rows.records),
                p(rows.seqs),
                p(rows.crcs),
            ],
        );
    }
    for compaction in &append.compactions {
        put_base(&mut pipeline, space, &compaction.record, &compaction.base);
        drop_tails(&mut pipeline, space, &compaction.record, &compaction.tail)?;
    }
    for flattened in &append.flattened {
        drop_tails(&mut pipeline, space, &flattened.record, &flattened.tail)?;
        let (collection, id) = &flattened.record;
        pipeline.push(
            PUT_HISTORY_END,
            vec![
                owned_space(),
                p(collection.clone()),
                p(id.clone()),
                p(int(flattened.seq)?),
                p(record_crc(
                    space,
                    collection,
                    id,
                    &flattened.seq.to_be_bytes(),
                )),
            ],
        );
    }
    if !append.heads.is_empty() {
        // Each record once: `heads` is keyed by record.
        let rows = Columns::of_records(space, append.heads.iter().map(|(k, h)| (k, h.concat())));
        pipeline.push(
            "INSERT INTO record_heads (space, collection, record, heads, crc)
             SELECT $1, * FROM unnest($2::text[], $3::text[], $4::bytea[], $5::integer[])
             ON CONFLICT (space, collection, record)
             DO UPDATE SET heads = EXCLUDED.heads, crc = EXCLUDED.crc",
            vec![
                owned_space(),
                p(rows.collections),
                p(rows.records),
                p(rows.values),
                p(rows.crcs),
            ],
        );
    }
    for (value, holders) in &append.holders {
        let constraint = int(value.constraint as u64)?;
        if holders.records.is_empty() {
            pipeline.push(
                "DELETE FROM unique_holders WHERE space = $1 AND collection = $2
                 AND constraint_index = $3 AND value = $4",
                vec![
                    owned_space(),
                    p(value.collection.clone()),
                    p(constraint),
                    p(value.value.clone()),
                ],
            );
        } else {
            let stored = json(holders, "unique value holders")?;
            let crc = holders_crc(space, value, &stored);
            pipeline.push(
                "INSERT INTO unique_holders (space, collection, constraint_index, value, holders,
                 crc) VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (space, collection, constraint_index, value)
                 DO UPDATE SET holders = $5, crc = $6",
                vec![
                    owned_space(),
                    p(value.collection.clone()),
                    p(constraint),
                    p(value.value.clone()),
                    p(stored),
                    p(crc),
                ],
            );
        }
    }
    for conflict in &append.conflict_entries {
        let entry = json(conflict, "conflict entry")?;
        let open = conflict.status == ConflictStatus::Open;
        let crc = conflict_crc(
            space,
            &conflict.id,
            (&conflict.collection, &conflict.record, open),
            &entry,
        );
        pipeline.push(
            "INSERT INTO conflicts (space, id, collection, record, open, entry, crc)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (space, id) DO UPDATE SET collection = $3, record = $4, open = $5,
             entry = $6, crc = $7",
            vec![
                owned_space(),
                p(conflict.id.clone()),
                p(conflict.collection.clone()),
                p(conflict.record.clone()),
                p(open),
                p(entry),
                p(crc),
            ],
        );
    }
    if append.conflicts_complete {
        pipeline.push(
            "UPDATE spaces SET conflicts_complete = true WHERE space = $1",
            vec![owned_space()],
        );
    }
    for (change, id) in &append.conflict_changes {
        let crc = crc(&[space.as_bytes(), change.as_bytes(), id.as_bytes()]);
        pipeline.push(
            "INSERT INTO change_conflicts (space, change, id, crc) VALUES ($1, $2, $3, $4)
             ON CONFLICT (space, change) DO UPDATE SET id = $3, crc = $4",
            vec![owned_space(), p(change.clone()), p(id.clone()), p(crc)],
        );
    }
    for ((collection, record), held) in &append.held {
        let stored = json(held, "unique values")?;
        let crc = record_crc(space, collection, record, &stored);
        pipeline.push(
            "INSERT INTO unique_values (space, collection, record, held, crc)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (space, collection, record) DO UPDATE SET held = $4, crc = $5",
            vec![
                owned_space(),
                p(collection.clone()),
                p(record.clone()),
                p(stored),
                p(crc),
            ],
        );
    }
    for (kind, collection, found) in &append.conflicts {
        pipeline.push(
            "INSERT INTO conflict_counts (space, kind, collection, detected)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (space, kind, collection)
             DO UPDATE SET detected = conflict_counts.detected + $4",
            vec![
                owned_space(),
                p(kind.as_str()),
                p(collection.clone()),
                p(int(*found)?),
            ],
        );
    }
    let head = append.next_seq().saturating_sub(1);
    pipeline.push(
        "UPDATE spaces SET head = $2, log_bytes = log_bytes + $3 WHERE space = $1",
        vec![owned_space(), p(int(head)?), p(int(log_bytes)?)],
    );
    if !append.entries.is_empty() {
        // Delivered when (and only if) the transaction commits.
        pipeline.push(
            "SELECT pg_notify($1, $2)",
            vec![p(LOG_CHANNEL), p(format!("{head} {space}"))],
        );
    }
    pipeline.run(tx).await
}

/// Rows of one table as columns, for an `INSERT ... SELECT * FROM unnest(...)`: one statement
/// however many rows an append writes.
#[derive(Default)]
struct Columns {
    collections: Vec<String>,
    records: Vec<String>,
    seqs: Vec<i64>,
    values: Vec<Vec<u8>>,
    crcs: Vec<i32>,
}

impl Columns {
    /// Rows of a table keyed by record, each holding `value` under its record's crc.
    fn of_records<'a>(space: &str, rows: impl Iterator<Item = (&'a RecordKey, Vec<u8>)>) -> Self {
        let mut columns = Columns::default();
        for ((collection, record), value) in rows {
            columns
                .crcs
                .push(record_crc(space, collection, record, &value));
            columns.collections.push(collection.clone());
            columns.records.push(record.clone());
            columns.values.push(value);
        }
        columns
    }
}

/// Pushes the inserts of the append's log entries and their dedup index rows, two statements in
/// all; returns the bytes they add to the space's quota.
fn insert_entries(
    pipeline: &mut Pipeline,
    space: &str,
    append: &Append,
) -> Result<u64, StorageError> {
    if append.entries.is_empty() {
        return Ok(0);
    }
    let mut log_bytes = 0u64;
    let mut entries = Columns::default();
    let (mut origins, mut hashes, mut bytes) = (Vec::new(), Vec::new(), Vec::new());
    // The dedup index by (record, hash): a later entry's seq replaces an earlier one's, as row
    // by row upserts would, and one statement may not touch a row twice.
    let mut index: HashMap<(&str, &str, &[u8]), u64> = HashMap::new();
    for (seq, entry) in (append.after.saturating_add(1)..).zip(&append.entries) {
        let size = [&entry.collection, &entry.record, &entry.origin]
            .iter()
            .map(|s| s.len())
            .sum::<usize>()
            .saturating_add(entry.change.len()) as u64;
        log_bytes = log_bytes.saturating_add(size);
        let hash = entry.hash.as_slice();
        entries.crcs.push(log_crc(
            space,
            seq,
            (
                &entry.collection,
                &entry.record,
                &entry.origin,
                hash,
                &entry.change,
            ),
        ));
        entries.seqs.push(int(seq)?);
        entries.collections.push(entry.collection.clone());
        entries.records.push(entry.record.clone());
        entries.values.push(entry.change.clone());
        origins.push(entry.origin.clone());
        hashes.push(hash.to_vec());
        bytes.push(int(size)?);
        // A purge entry is no change: nothing to deduplicate.
        if !entry.change.is_empty() {
            index.insert((&entry.collection, &entry.record, hash), seq);
        }
    }
    pipeline.push(
        "INSERT INTO log_entries
         (space, seq, collection, record, origin, hash, change, bytes, crc)
         SELECT $1, * FROM unnest($2::bigint[], $3::text[], $4::text[], $5::text[],
         $6::bytea[], $7::bytea[], $8::bigint[], $9::integer[])",
        vec![
            p(space.to_owned()),
            p(entries.seqs),
            p(entries.collections),
            p(entries.records),
            p(origins),
            p(hashes),
            p(entries.values),
            p(bytes),
            p(entries.crcs),
        ],
    );
    if !index.is_empty() {
        let mut rows = Columns::default();
        let mut hashes = Vec::with_capacity(index.len());
        for ((collection, record, hash), seq) in index {
            rows.crcs
                .push(change_crc(space, collection, record, hash, seq));
            rows.collections.push(collection.to_owned());
            rows.records.push(record.to_owned());
            rows.seqs.push(int(seq)?);
            hashes.push(hash.to_vec());
        }
        pipeline.push(
            "INSERT INTO record_changes (space, collection, record, hash, seq, crc)
             SELECT $1, * FROM unnest($2::text[], $3::text[], $4::bytea[], $5::bigint[],
             $6::integer[])
             ON CONFLICT (space, collection, record, hash)
             DO UPDATE SET seq = EXCLUDED.seq, crc = EXCLUDED.crc",
            vec![
                p(space.to_owned()),
                p(rows.collections),
                p(rows.records),
                p(hashes),
                p(rows.seqs),
                p(rows.crcs),
            ],
        );
    }
    Ok(log_bytes)
}

fn change_crc(space: &str, collection: &str, record: &str, hash: &[u8], seq: u64) -> i32 {
    crc(&[
        space.as_bytes(),
        collection.as_bytes(),
        record.as_bytes(),
        hash,
        &seq.to_be_bytes(),
    ])
}

/// Copies into each base that names a log entry up to `horizon` that entry's change, before
/// compaction drops the entries.
async fn keep_logged_bases(
    tx: &deadpool_postgres::Transaction<'_>,
    space: &str,
    horizon: u64,
) -> Result<(), StorageError> {
    let named = rows(
        tx,
        "SELECT b.collection, b.record, b.base, b.crc, b.logged_seq,
         e.origin, e.hash, e.change, e.crc FROM bases b
         LEFT JOIN log_entries e ON e.space = b.space AND e.seq = b.logged_seq
         WHERE b.space = $1 AND b.logged_seq <= $2",
        &[p(space.to_owned()), p(int(horizon)?)],
    )
    .await?;
    if named.is_empty() {
        return Ok(());
    }
    let mut bases = Vec::with_capacity(named.len());
    for row in &named {
        let (collection, record): (String, String) = (col(row, 0)?, col(row, 1)?);
        let change = checked_base(space, (&collection, &record), row, 2)?;
        bases.push(((collection, record), change));
    }
    let rows = Columns::of_records(space, bases.iter().map(|(k, b)| (k, b.clone())));
    execute(
        tx,
        "UPDATE bases b SET base = u.v, crc = u.k, logged_seq = NULL
         FROM unnest($2::text[], $3::text[], $4::bytea[], $5::integer[]) AS u(c, r, v, k)
         WHERE b.space = $1 AND b.collection = u.c AND b.record = u.r",
        &[
            &space,
            &rows.collections,
            &rows.records,
            &rows.values,
            &rows.crcs,
        ],
    )
    .await?;
    Ok(())
}

async fn write_compaction(
    tx: &deadpool_postgres::Transaction<'_>,
    space: &str,
    step: LogCompaction,
) -> Result<(), StorageError> {
    let head = lock_space(tx, space).await?;
    if head != step.after {
        return Err(StorageError::HeadMoved {
            staged: step.after,
            head,
        });
    }
    let before = uint(
        one::<i64>(tx, "SELECT horizon FROM spaces WHERE space = $1", &[&space]).await?,
        "horizon",
    )?;
    let horizon = step.horizon.min(step.after).max(before);
    let mut pipeline = Pipeline::default();
    for compaction in &step.bases {
        put_base(&mut pipeline, space, &compaction.record, &compaction.base);
        drop_tails(&mut pipeline, space, &compaction.record, &compaction.tail)?;
    }
    pipeline.run(tx).await?;
    if horizon > before {
        let uncovered = rows(
            tx,
            "SELECT collection, record, seq FROM tails WHERE space = $1 AND seq <= $2
             ORDER BY collection, record, seq LIMIT 1",
            &[p(space.to_owned()), p(int(horizon)?)],
        )
        .await?;
        if let Some(row) = uncovered.first() {
            return Err(StorageError::Uncovered {
                horizon,
                record: (col(row, 0)?, col(row, 1)?),
                seq: uint(col::<i64>(row, 2)?, "tail seq")?,
            });
        }
        keep_logged_bases(tx, space, horizon).await?;
        let dropped: i64 = one(
            tx,
            "WITH dropped AS (DELETE FROM log_entries WHERE space = $1 AND seq <= $2
             RETURNING bytes) SELECT COALESCE(sum(bytes), 0)::bigint FROM dropped",
            &[&space, &int(horizon)?],
        )
        .await?;
        execute(
            tx,
            "UPDATE spaces SET horizon = $2, log_bytes = GREATEST(log_bytes - $3, 0)
             WHERE space = $1",
            &[&space, &int(horizon)?, &dropped],
        )
        .await?;
    }
    if let Some((time, at)) = step.mark
        && at > horizon
    {
        execute(
            tx,
            "INSERT INTO time_marks (space, time_ms, head) VALUES ($1, $2, $3)
             ON CONFLICT (space, time_ms) DO UPDATE SET head = $3",
            &[&space, &int(time)?, &int(at)?],
        )
        .await?;
    }
    execute(
        tx,
        "DELETE FROM time_marks WHERE space = $1 AND head <= $2",
        &[&space, &int(horizon)?],
    )
    .await?;
    Ok(())
}

/// The writes of one account commit, in order; its checks (a name is new, a code unused) hold
/// when it commits, whichever connection or relay makes another.
async fn write_accounts(
    tx: &deadpool_postgres::Transaction<'_>,
    writes: Vec<AccountWrite>,
) -> Result<(), StorageError> {
    for write in writes {
        match write {
            AccountWrite::CreateAccount(record) => {
                let value = encode(&record, "account")?;
                let created = execute(
                    tx,
                    "INSERT INTO accounts (name, value, crc) VALUES ($1, $2, $3)
                     ON CONFLICT DO NOTHING",
                    &[
                        &record.name,
                        &value,
                        &account_crc("accounts", record.name.as_bytes(), &value),
                    ],
                )
                .await?;
                if created == 0 {
                    return Err(StorageError::AccountExists(record.name));
                }
            }
            AccountWrite::Device(record) => {
                let value = encode(&record, "device")?;
                execute(
                    tx,
                    "INSERT INTO devices (device, value, crc) VALUES ($1, $2, $3)
                     ON CONFLICT (device) DO UPDATE SET value = $2, crc = $3",
                    &[
                        &record.device,
                        &value,
                        &account_crc("devices", record.device.as_bytes(), &value),
                    ],
                )
                .await?;
            }
            AccountWrite::RemoveDevice(device) => {
                execute(tx, "DELETE FROM devices WHERE device = $1", &[&device]).await?;
            }
            AccountWrite::Enrolment { code_hash, record } => {
                let value = encode(&record, "enrolment")?;
                let key = code_hash.as_slice();
                execute(
                    tx,
                    "INSERT INTO enrolments (code_hash, value, crc) VALUES ($1, $2, $3)
                     ON CONFLICT (code_hash) DO UPDATE SET value = $2, crc = $3",
                    &[&key, &value, &account_crc("enrolments", key, &value)],
                )
                .await?;
            }
            AccountWrite::ConsumeEnrolment(code_hash) => {
                let key = code_hash.as_slice();
                let consumed =
                    execute(tx, "DELETE FROM enrolments WHERE code_hash = $1", &[&key]).await?;
                if consumed == 0 {
                    return Err(StorageError::EnrolmentUsed);
                }
            }
            AccountWrite::Family(family) => {
                let value = encode(&family, "token family")?;
                execute(
                    tx,
                    "INSERT INTO token_families (id, value, crc) VALUES ($1, $2, $3)
                     ON CONFLICT (id) DO UPDATE SET value = $2, crc = $3",
                    &[
                        &family.id,
                        &value,
                        &account_crc("token_families", family.id.as_bytes(), &value),
                    ],
                )
                .await?;
            }
            AccountWrite::RemoveFamily(id) => {
                execute(tx, "DELETE FROM token_families WHERE id = $1", &[&id]).await?;
            }
            AccountWrite::SigningKey(stored) => {
                let value = encode(&stored, "signing key")?;
                execute(
                    tx,
                    "INSERT INTO signing_keys (kid, value, crc) VALUES ($1, $2, $3)
                     ON CONFLICT (kid) DO UPDATE SET value = $2, crc = $3",
                    &[
                        &stored.kid,
                        &value,
                        &account_crc("signing_keys", stored.kid.as_bytes(), &value),
                    ],
                )
                .await?;
            }
            AccountWrite::RemoveSigningKey(kid) => {
                execute(tx, "DELETE FROM signing_keys WHERE kid = $1", &[&kid]).await?;
            }
            AccountWrite::Password { account, phc } => {
                execute(
                    tx,
                    "INSERT INTO passwords (account, phc, crc) VALUES ($1, $2, $3)
                     ON CONFLICT (account) DO UPDATE SET phc = $2, crc = $3",
                    &[
                        &account,
                        &phc,
                        &account_crc("passwords", account.as_bytes(), phc.as_bytes()),
                    ],
                )
                .await?;
            }
        }
    }
    Ok(())
}

impl LogStorage for PgStorage {
    fn shared(&self) -> bool {
        true
    }

    fn follow(&self, news: UnboundedSender<StorageNews>) -> bool {
        let Some(runtime) = self.runtime.as_ref() else {
            return false;
        };
        runtime.spawn(listen(self.config.clone(), self.listener_name, news));
        true
    }

    fn head(&self, space: &str) -> Result<u64, StorageError> {
        self.space_number("SELECT head FROM spaces WHERE space = $1", space)
    }

    fn append(&self, space: &str, append: Append) -> Result<(), StorageError> {
        let held = self.held_connections().remove(space);
        let holding = held.is_some();
        let key = space.to_owned();
        let (client, done) = self.run(move |pool| async move {
            let mut client = match held {
                Some(client) => client,
                None => connection(&pool).await?,
            };
            let done = write_whole_append(&mut client, &key, append).await;
            Ok((client, done))
        })?;
        if holding {
            self.held_connections().insert(space.to_owned(), client);
        }
        done
    }

    fn hold_space(&self, space: &str) -> Result<bool, StorageError> {
        let key = space_lock_key(space);
        let client = self.run(move |pool| async move {
            let client = connection(&pool).await?;
            client
                .execute(
                    "SELECT pg_advisory_lock($1, $2)",
                    &[&SPACE_LOCK_CLASS, &key],
                )
                .await
                .map_err(sql_error)?;
            Ok(client)
        })?;
        self.held_connections().insert(space.to_owned(), client);
        Ok(true)
    }

    fn release_space(&self, space: &str) {
        let Some(client) = self.held_connections().remove(space) else {
            return;
        };
        let key = space_lock_key(space);
        let released = self.run(move |_| async move {
            let unlocked = client
                .execute(
                    "SELECT pg_advisory_unlock($1, $2)",
                    &[&SPACE_LOCK_CLASS, &key],
                )
                .await;
            if unlocked.is_err() {
                // The session, and its lock with it, ends with the connection.
                drop(deadpool_postgres::Object::take(client));
            }
            unlocked.map(drop).map_err(sql_error)
        });
        if let Err(e) = released {
            tracing::warn!(space, error = %e, "releasing the space's lock failed; the connection was closed instead");
        }
    }

    fn flush(&self) -> Result<(), StorageError> {
        // Every commit was durable when it returned.
        Ok(())
    }

    fn change_seq(
        &self,
        space: &str,
        collection: &str,
        record: &str,
        hash: &[u8; 32],
    ) -> Result<Option<u64>, StorageError> {
        let row = self.query_opt(
            "SELECT seq, crc FROM record_changes
             WHERE space = $1 AND collection = $2 AND record = $3 AND hash = $4",
            vec![
                p(space.to_owned()),
                p(collection.to_owned()),
                p(record.to_owned()),
                p(hash.to_vec()),
            ],
        )?;
        let Some(row) = row else { return Ok(None) };
        let seq = checked_change_seq(space, (collection, record, hash), &row, 0)?;
        Ok(Some(seq))
    }

    fn change_seqs(
        &self,
        space: &str,
        changes: &[ChangeKey],
    ) -> Result<HashMap<ChangeKey, u64>, StorageError> {
        if changes.is_empty() {
            return Ok(HashMap::new());
        }
        let mut columns = (Vec::new(), Vec::new(), Vec::new());
        for (collection, record, hash) in changes {
            columns.0.push(collection.clone());
            columns.1.push(record.clone());
            columns.2.push(hash.to_vec());
        }
        self.query_planned_each_call(
            "SELECT k.collection, k.record, k.hash, c.seq, c.crc
             FROM unnest($2::text[], $3::text[], $4::bytea[]) AS k(collection, record, hash)
             CROSS JOIN LATERAL (SELECT seq, crc FROM record_changes c WHERE c.space = $1
               AND c.collection = k.collection AND c.record = k.record AND c.hash = k.hash
               OFFSET 0) c",
            vec![
                p(space.to_owned()),
                p(columns.0),
                p(columns.1),
                p(columns.2),
            ],
        )?
        .iter()
        .map(|row| {
            let (collection, record) = (col::<String>(row, 0)?, col::<String>(row, 1)?);
            let hash = hash_of(&col::<Vec<u8>>(row, 2)?, "change index key")?;
            let seq = checked_change_seq(space, (&collection, &record, &hash), row, 3)?;
            Ok(((collection, record, hash), seq))
        })
        .collect()
    }

    fn record_changes(
        &self,
        space: &str,
        collection: &str,
        record: &str,
    ) -> Result<Vec<([u8; 32], u64)>, StorageError> {
        self.query(
            "SELECT hash, seq, crc FROM record_changes
             WHERE space = $1 AND collection = $2 AND record = $3 ORDER BY seq",
            vec![
                p(space.to_owned()),
                p(collection.to_owned()),
                p(record.to_owned()),
            ],
        )?
        .iter()
        .map(|row| {
            let hash = hash_of(&col::<Vec<u8>>(row, 0)?, "change index key")?;
            let seq = checked_change_seq(space, (collection, record, &hash), row, 1)?;
            Ok((hash, seq))
        })
        .collect()
    }

    fn change_at(&self, space: &str, seq: u64) -> Result<Option<Vec<u8>>, StorageError> {
        let row = self.query_opt(
            "SELECT seq, collection, record, origin, hash, change, crc FROM log_entries
             WHERE space = $1 AND seq = $2",
            vec![p(space.to_owned()), p(int(seq)?)],
        )?;
        row.map(|row| log_row(space, &row).map(|entry| entry.change))
            .transpose()
    }

    fn read_log(
        &self,
        space: &str,
        after: u64,
        max_changes: usize,
        max_bytes: usize,
    ) -> Result<Vec<LogEntry>, StorageError> {
        let max_changes = max_changes.max(1);
        let mut entries: Vec<LogEntry> = Vec::new();
        let mut bytes = 0usize;
        let mut from = after;
        while entries.len() < max_changes {
            let page = limit(max_changes.saturating_sub(entries.len())).min(LOG_PAGE);
            let rows = self.query(
                "SELECT seq, collection, record, origin, hash, change, crc FROM log_entries
                 WHERE space = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                vec![p(space.to_owned()), p(int(from)?), p(page)],
            )?;
            if rows.is_empty() {
                break;
            }
            for row in &rows {
                let entry = log_row(space, row)?;
                if !entries.is_empty() && bytes.saturating_add(entry.change.len()) > max_bytes {
                    return Ok(entries);
                }
                bytes = bytes.saturating_add(entry.change.len());
                from = entry.seq;
                entries.push(entry);
                if entries.len() == max_changes {
                    return Ok(entries);
                }
            }
        }
        Ok(entries)
    }

    fn base(
        &self,
        space: &str,
        collection: &str,
        record: &str,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        let row = self.query_opt(
            "SELECT b.base, b.crc, b.logged_seq, e.origin, e.hash, e.change, e.crc FROM bases b
             LEFT JOIN log_entries e ON e.space = b.space AND e.seq = b.logged_seq
             WHERE b.space = $1 AND b.collection = $2 AND b.record = $3",
            record_params(space, collection, record),
        )?;
        let Some(row) = row else { return Ok(None) };
        checked_base(space, (collection, record), &row, 0).map(Some)
    }

    fn bases_of(
        &self,
        space: &str,
        records: &[RecordKey],
    ) -> Result<HashMap<RecordKey, Vec<u8>>, StorageError> {
        if records.is_empty() {
            return Ok(HashMap::new());
        }
        let (collections, ids) = record_arrays(records.iter());
        self.query_planned_each_call(
            BASES_OF_RECORDS,
            vec![p(space.to_owned()), p(collections), p(ids)],
        )?
        .iter()
        .map(|row| {
            let (collection, record): (String, String) = (col(row, 0)?, col(row, 1)?);
            let base = checked_base(space, (&collection, &record), row, 2)?;
            Ok(((collection, record), base))
        })
        .collect()
    }

    fn has_base(&self, space: &str, collection: &str, record: &str) -> Result<bool, StorageError> {
        Ok(self
            .query_opt(
                "SELECT 1 FROM bases WHERE space = $1 AND collection = $2 AND record = $3",
                record_params(space, collection, record),
            )?
            .is_some())
    }

    fn tail(&self, space: &str, collection: &str, record: &str) -> Result<Vec<u64>, StorageError> {
        self.query(
            "SELECT seq, crc FROM tails WHERE space = $1 AND collection = $2 AND record = $3
             ORDER BY seq",
            record_params(space, collection, record),
        )?
        .iter()
        .map(|row| checked_tail_seq(space, (collection, record), col(row, 0)?, col(row, 1)?))
        .collect()
    }

    fn tails_of(
        &self,
        space: &str,
        records: &[RecordKey],
    ) -> Result<HashMap<RecordKey, Vec<u64>>, StorageError> {
        if records.is_empty() {
            return Ok(HashMap::new());
        }
        let (collections, ids) = record_arrays(records.iter());
        let mut tails: HashMap<RecordKey, Vec<u64>> = HashMap::new();
        // A held record with an empty tail comes as one row without seq.
        for row in self.query_planned_each_call(
            "SELECT k.collection, k.record, t.seq, t.crc
             FROM unnest($2::text[], $3::text[]) AS k(collection, record)
             CROSS JOIN LATERAL (SELECT 1 FROM bases b WHERE b.space = $1
               AND b.collection = k.collection AND b.record = k.record OFFSET 0) b
             LEFT JOIN LATERAL (SELECT seq, crc FROM tails t WHERE t.space = $1
               AND t.collection = k.collection AND t.record = k.record OFFSET 0) t ON true
             ORDER BY t.seq",
            vec![p(space.to_owned()), p(collections), p(ids)],
        )? {
            let (collection, record) = (col::<String>(&row, 0)?, col::<String>(&row, 1)?);
            let seq = match (col::<Option<i64>>(&row, 2)?, col::<Option<i32>>(&row, 3)?) {
                (Some(seq), Some(crc)) => {
                    Some(checked_tail_seq(space, (&collection, &record), seq, crc)?)
                }
                _ => None,
            };
            let tail = tails.entry((collection, record)).or_default();
            tail.extend(seq);
        }
        Ok(tails)
    }

    fn record_heads(
        &self,
        space: &str,
        collection: &str,
        record: &str,
    ) -> Result<Option<Vec<[u8; 32]>>, StorageError> {
        let row = self.query_opt(
            "SELECT heads, crc FROM record_heads
             WHERE space = $1 AND collection = $2 AND record = $3",
            record_params(space, collection, record),
        )?;
        let Some(row) = row else { return Ok(None) };
        let heads: Vec<u8> = col(&row, 0)?;
        check(
            col(&row, 1)?,
            &[
                space.as_bytes(),
                collection.as_bytes(),
                record.as_bytes(),
                &heads,
            ],
            || record_damaged("record heads", space, collection, record),
        )?;
        heads_of(&heads).map(Some)
    }

    fn unique_values(
        &self,
        space: &str,
        collection: &str,
        record: &str,
    ) -> Result<Option<UniqueValues>, StorageError> {
        let row = self.query_opt(
            "SELECT held, crc FROM unique_values
             WHERE space = $1 AND collection = $2 AND record = $3",
            record_params(space, collection, record),
        )?;
        let Some(row) = row else { return Ok(None) };
        let held: Vec<u8> = col(&row, 0)?;
        check(
            col(&row, 1)?,
            &[
                space.as_bytes(),
                collection.as_bytes(),
                record.as_bytes(),
                &held,
            ],
            || {
                damaged(
                    "unique value",
                    space,
                    format!("key {collection}/{record}"),
                    None,
                )
            },
        )?;
        from_json(&held, "unique values").map(Some)
    }

    fn unique_holders(&self, space: &str, value: &UniqueValue) -> Result<Holders, StorageError> {
        let row = self.query_opt(
            "SELECT holders, crc FROM unique_holders WHERE space = $1 AND collection = $2
             AND constraint_index = $3 AND value = $4",
            vec![
                p(space.to_owned()),
                p(value.collection.clone()),
                p(int(value.constraint as u64)?),
                p(value.value.clone()),
            ],
        )?;
        let Some(row) = row else {
            return Ok(Holders::default());
        };
        let holders: Vec<u8> = col(&row, 0)?;
        if col::<i32>(&row, 1)? != holders_crc(space, value, &holders) {
            return Err(damaged(
                "unique value",
                space,
                format!("key {}/{}", value.collection, value.value),
                None,
            ));
        }
        from_json(&holders, "unique value index")
    }

    fn unique_holders_after(
        &self,
        space: &str,
        collection: &str,
        constraint: usize,
        after: Option<&str>,
        count: usize,
    ) -> Result<Vec<(String, Holders)>, StorageError> {
        let rows = self.query(
            "SELECT value, holders, crc FROM unique_holders
             WHERE space = $1 AND collection = $2 AND constraint_index = $3
             AND ($4::text IS NULL OR value > $4) ORDER BY value LIMIT $5",
            vec![
                p(space.to_owned()),
                p(collection.to_owned()),
                p(int(constraint as u64)?),
                p(after.map(str::to_owned)),
                p(limit(count)),
            ],
        )?;
        rows.iter()
            .map(|row| {
                let value = UniqueValue {
                    collection: collection.to_owned(),
                    constraint,
                    value: col(row, 0)?,
                };
                let holders: Vec<u8> = col(row, 1)?;
                if col::<i32>(row, 2)? != holders_crc(space, &value, &holders) {
                    return Err(damaged(
                        "unique value",
                        space,
                        format!("key {}/{}", value.collection, value.value),
                        None,
                    ));
                }
                Ok((value.value, from_json(&holders, "unique value index")?))
            })
            .collect()
    }

    fn conflict(&self, space: &str, id: &str) -> Result<Option<Conflict>, StorageError> {
        self.query_opt(
            "SELECT id, collection, record, open, entry, crc FROM conflicts
             WHERE space = $1 AND id = $2",
            vec![p(space.to_owned()), p(id.to_owned())],
        )?
        .map(|row| conflict_row(space, &row))
        .transpose()
    }

    fn conflicts(
        &self,
        space: &str,
        open_only: bool,
        after: Option<&str>,
        count: usize,
    ) -> Result<Vec<Conflict>, StorageError> {
        let rows = self.query(
            "SELECT id, collection, record, open, entry, crc FROM conflicts
             WHERE space = $1 AND (open OR NOT $2) AND ($3::text IS NULL OR id > $3)
             ORDER BY id LIMIT $4",
            vec![
                p(space.to_owned()),
                p(open_only),
                p(after.map(str::to_owned)),
                p(limit(count)),
            ],
        )?;
        self.conflict_rows(space, rows)
    }

    fn record_conflicts(
        &self,
        space: &str,
        collection: &str,
        record: &str,
    ) -> Result<Vec<Conflict>, StorageError> {
        let rows = self.query(
            "SELECT id, collection, record, open, entry, crc FROM conflicts
             WHERE space = $1 AND collection = $2 AND record = $3 ORDER BY id",
            record_params(space, collection, record),
        )?;
        self.conflict_rows(space, rows)
    }

    fn conflicts_of(
        &self,
        space: &str,
        records: &[RecordKey],
    ) -> Result<HashMap<RecordKey, Vec<Conflict>>, StorageError> {
        if records.is_empty() {
            return Ok(HashMap::new());
        }
        let (collections, ids) = record_arrays(records.iter());
        let rows = self.query_planned_each_call(
            "SELECT x.id, x.collection, x.record, x.open, x.entry, x.crc
             FROM unnest($2::text[], $3::text[]) AS u(c, r)
             CROSS JOIN LATERAL (SELECT * FROM conflicts x
               WHERE x.space = $1 AND x.collection = u.c AND x.record = u.r OFFSET 0) x
             ORDER BY x.id",
            vec![p(space.to_owned()), p(collections), p(ids)],
        )?;
        let mut conflicts: HashMap<RecordKey, Vec<Conflict>> = HashMap::new();
        for conflict in self.conflict_rows(space, rows)? {
            let key = (conflict.collection.clone(), conflict.record.clone());
            conflicts.entry(key).or_default().push(conflict);
        }
        Ok(conflicts)
    }

    fn conflicts_complete(&self, space: &str) -> Result<bool, StorageError> {
        match self.query_opt(
            "SELECT conflicts_complete FROM spaces WHERE space = $1",
            vec![p(space.to_owned())],
        )? {
            Some(row) => col(&row, 0),
            None => Ok(false),
        }
    }

    fn change_conflict(&self, space: &str, change: &str) -> Result<Option<String>, StorageError> {
        let row = self.query_opt(
            "SELECT id, crc FROM change_conflicts WHERE space = $1 AND change = $2",
            vec![p(space.to_owned()), p(change.to_owned())],
        )?;
        let Some(row) = row else { return Ok(None) };
        let id: String = col(&row, 0)?;
        check(
            col(&row, 1)?,
            &[space.as_bytes(), change.as_bytes(), id.as_bytes()],
            || damaged("conflict data", space, format!("key {change}"), None),
        )?;
        Ok(Some(id))
    }

    fn web_actor(&self, space: &str, candidate: &str) -> Result<String, StorageError> {
        // One statement: of two relays choosing at once, the first to commit is kept.
        let row = self.query_opt(
            "INSERT INTO spaces (space, web_actor) VALUES ($1, $2)
             ON CONFLICT (space) DO UPDATE SET web_actor = COALESCE(spaces.web_actor, $2)
             RETURNING web_actor",
            vec![p(space.to_owned()), p(candidate.to_owned())],
        )?;
        match row {
            Some(row) => col(&row, 0),
            None => Err(corrupt("web actor", "the space's row was not written")),
        }
    }

    fn conflict_counts(&self, space: &str) -> Result<Vec<RelayConflictCount>, StorageError> {
        self.query(
            "SELECT kind, collection, detected FROM conflict_counts WHERE space = $1
             ORDER BY kind, collection",
            vec![p(space.to_owned())],
        )?
        .iter()
        .map(|row| {
            let kind: String = col(row, 0)?;
            let kind = ConflictKind::ALL
                .into_iter()
                .find(|k| k.as_str() == kind)
                .ok_or_else(|| corrupt("conflict counter", format!("unknown kind {kind:?}")))?;
            Ok(RelayConflictCount {
                kind,
                collection: col(row, 1)?,
                detected: uint(col::<i64>(row, 2)?, "conflict count")?,
            })
        })
        .collect()
    }

    fn log_bytes(&self, space: &str) -> Result<u64, StorageError> {
        self.space_number("SELECT log_bytes FROM spaces WHERE space = $1", space)
    }

    fn collections(&self, space: &str) -> Result<Vec<(String, u64)>, StorageError> {
        self.query(
            "SELECT collection, count(*) FROM bases WHERE space = $1 GROUP BY collection
             ORDER BY collection",
            vec![p(space.to_owned())],
        )?
        .iter()
        .map(|row| Ok((col(row, 0)?, uint(col::<i64>(row, 1)?, "record count")?)))
        .collect()
    }

    fn records(
        &self,
        space: &str,
        collection: &str,
        after: Option<&str>,
        count: usize,
    ) -> Result<Vec<String>, StorageError> {
        self.query(
            "SELECT record FROM bases WHERE space = $1 AND collection = $2
             AND ($3::text IS NULL OR record > $3) ORDER BY record LIMIT $4",
            vec![
                p(space.to_owned()),
                p(collection.to_owned()),
                p(after.map(str::to_owned)),
                p(limit(count)),
            ],
        )?
        .iter()
        .map(|row| col(row, 0))
        .collect()
    }

    fn record_names(
        &self,
        space: &str,
        after: Option<&RecordName>,
        count: usize,
    ) -> Result<Vec<RecordName>, StorageError> {
        let (collection, record) = match after {
            Some(name) => (Some(name.collection.clone()), name.record.clone()),
            None => (None, String::new()),
        };
        self.query(
            "SELECT collection, record FROM bases WHERE space = $1
             AND ($2::text IS NULL OR (collection, record) > ($2, $3))
             ORDER BY collection, record LIMIT $4",
            vec![
                p(space.to_owned()),
                p(collection),
                p(record),
                p(limit(count)),
            ],
        )?
        .iter()
        .map(|row| {
            Ok(RecordName {
                collection: col(row, 0)?,
                record: col(row, 1)?,
            })
        })
        .collect()
    }

    fn size_on_disk(&self) -> Result<u64, StorageError> {
        match self.query_opt("SELECT pg_database_size(current_database())", Vec::new())? {
            Some(row) => uint(col::<i64>(&row, 0)?, "database size"),
            None => Ok(0),
        }
    }

    fn horizon(&self, space: &str) -> Result<u64, StorageError> {
        self.space_number("SELECT horizon FROM spaces WHERE space = $1", space)
    }

    fn tails_through(
        &self,
        space: &str,
        seq: u64,
        count: usize,
    ) -> Result<Vec<RecordKey>, StorageError> {
        self.query(
            "SELECT DISTINCT collection, record FROM tails WHERE space = $1 AND seq <= $2
             ORDER BY collection, record LIMIT $3",
            vec![p(space.to_owned()), p(int(seq)?), p(limit(count))],
        )?
        .iter()
        .map(|row| Ok((col(row, 0)?, col(row, 1)?)))
        .collect()
    }

    fn time_marks(&self, space: &str) -> Result<Vec<(u64, u64)>, StorageError> {
        self.query(
            "SELECT time_ms, head FROM time_marks WHERE space = $1 ORDER BY time_ms",
            vec![p(space.to_owned())],
        )?
        .iter()
        .map(|row| {
            Ok((
                uint(col::<i64>(row, 0)?, "time mark")?,
                uint(col::<i64>(row, 1)?, "time mark")?,
            ))
        })
        .collect()
    }

    fn compact_log(&self, space: &str, step: LogCompaction) -> Result<(), StorageError> {
        let space = space.to_owned();
        self.run(move |pool| async move {
            let mut client = connection(&pool).await?;
            let tx = client.transaction().await.map_err(sql_error)?;
            write_compaction(&tx, &space, step).await?;
            tx.commit().await.map_err(sql_error)
        })
    }

    fn tombstones(&self, space: &str, count: usize) -> Result<Vec<Tombstone>, StorageError> {
        self.query(
            "SELECT seq, collection, record, heads, time_ms, crc FROM tombstones
             WHERE space = $1 ORDER BY seq LIMIT $2",
            vec![p(space.to_owned()), p(limit(count))],
        )?
        .iter()
        .map(|row| {
            let heads: Vec<u8> = col(row, 3)?;
            let tombstone = Tombstone {
                seq: uint(col::<i64>(row, 0)?, "tombstone note")?,
                collection: col(row, 1)?,
                record: col(row, 2)?,
                heads: heads_of(&heads)?,
                time_ms: uint(col::<i64>(row, 4)?, "tombstone note")?,
            };
            if col::<i32>(row, 5)? != tombstone_crc(space, &tombstone) {
                return Err(seq_damaged("tombstone note", space, tombstone.seq));
            }
            Ok(tombstone)
        })
        .collect()
    }

    fn purged_at(
        &self,
        space: &str,
        collection: &str,
        record: &str,
    ) -> Result<Option<u64>, StorageError> {
        let row = self.query_opt(
            "SELECT seq, crc FROM purges WHERE space = $1 AND collection = $2 AND record = $3",
            record_params(space, collection, record),
        )?;
        let Some(row) = row else { return Ok(None) };
        let seq = uint(col::<i64>(&row, 0)?, "purge marker")?;
        if col::<i32>(&row, 1)? != record_crc(space, collection, record, &seq.to_be_bytes()) {
            return Err(record_damaged("purge marker", space, collection, record));
        }
        Ok(Some(seq))
    }

    fn reclaim_space(&self) -> Result<(u64, u64), StorageError> {
        // PostgreSQL's autovacuum makes the space of removed rows reusable as it goes; giving
        // it back to the file system (VACUUM FULL) would lock every table: the operator's call.
        let size = self.size_on_disk()?;
        Ok((size, size))
    }
}

fn record_params(space: &str, collection: &str, record: &str) -> Vec<Param> {
    vec![
        p(space.to_owned()),
        p(collection.to_owned()),
        p(record.to_owned()),
    ]
}

/// A log row: `seq, collection, record, origin, hash, change, crc`, checked.
fn log_row(space: &str, row: &Row) -> Result<LogEntry, StorageError> {
    let seq = uint(col::<i64>(row, 0)?, "log entry")?;
    let collection: String = col(row, 1)?;
    let record: String = col(row, 2)?;
    let origin: String = col(row, 3)?;
    let hash: Vec<u8> = col(row, 4)?;
    let change: Vec<u8> = col(row, 5)?;
    if col::<i32>(row, 6)? != log_crc(space, seq, (&collection, &record, &origin, &hash, &change)) {
        return Err(seq_damaged("log entry", space, seq));
    }
    Ok(LogEntry {
        seq,
        collection,
        record,
        change,
    })
}

/// A space's place in `records` (`PgStorage::records_lag`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RecordsLag {
    pub space: String,
    /// The last seq of its log.
    pub head: u64,
    /// The last seq `records` holds (0: none yet).
    pub materialized: u64,
    /// How long ago the oldest entry `records` lacks was logged (0 when it lacks none).
    pub seconds_behind: f64,
}

impl RecordsLag {
    pub fn entries_behind(&self) -> u64 {
        self.head.saturating_sub(self.materialized)
    }
}

/// The log entries one materializer step covers, and what the records they touch keep, read in
/// one snapshot of the database (`PgStorage::records_batch`).
#[derive(Debug, Default)]
pub struct RecordsBatch {
    /// The entries after the materialized position up to this seq are covered.
    pub through: u64,
    /// `records` lists every record of the space (and every row the table holds for it): the
    /// entries after the materialized position were compacted away, so the rows are made again
    /// from the records' documents, and rows of records no longer held are dropped.
    pub whole: bool,
    pub records: Vec<StoredRecord>,
    /// Records whose rows the caller said it has (`records_batch`'s `known`), not read: each
    /// with the seq of the entry that created it, the last of the step's entries for it.
    pub known: Vec<(RecordKey, u64)>,
}

/// A record as storage keeps it: its base, tail and the seqs of its changes.
#[derive(Debug, Default)]
pub struct StoredRecord {
    pub key: RecordKey,
    /// `None`: the space holds no such record (purged).
    pub base: Option<Vec<u8>>,
    /// `(seq, change)` of its changes logged since its base, in log order.
    pub tail: Vec<(u64, Vec<u8>)>,
    /// The seq each of its logged changes has (the dedup index); not read (empty) for a record
    /// with `one_change_seq`.
    pub seqs: HashMap<[u8; 32], u64>,
    /// For a record whose only change is its base, logged by an entry of the step: that
    /// entry's seq (the dedup index is not read for it).
    pub one_change_seq: Option<u64>,
}

/// One record's row of `records`.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordRow {
    pub key: RecordKey,
    /// The fields as JSON text.
    pub fields: String,
    pub deleted: bool,
    /// Milliseconds since the Unix epoch.
    pub updated_ms: i64,
    pub log_position: u64,
}

/// One materializer step's writes, committed with the position they bring `records` to.
#[derive(Debug, Default)]
pub struct RecordsCommit {
    /// The materialized position the step was read at.
    pub after: u64,
    pub through: u64,
    /// Drop every row of the space not in `rows` (`RecordsBatch::whole`).
    pub whole: bool,
    pub rows: Vec<RecordRow>,
    /// Records whose rows go: purged, or no longer held.
    pub removed: Vec<RecordKey>,
}

/// The `(collections, ids)` arrays of some records, for a join with `unnest`.
fn record_arrays<'a>(keys: impl Iterator<Item = &'a RecordKey>) -> (Vec<String>, Vec<String>) {
    keys.map(|(c, r)| (c.clone(), r.clone())).unzip()
}

/// The records `rows` name (`collection, record` first), each once, in order.
fn named_records(rows: &[Row]) -> Result<Vec<RecordKey>, StorageError> {
    let mut seen = BTreeSet::new();
    for row in rows {
        seen.insert((col::<String>(row, 0)?, col::<String>(row, 1)?));
    }
    Ok(seen.into_iter().collect())
}

/// What the records `keys` keep, as of the transaction's snapshot. `logged` holds the last seq
/// of a step's entries per record: a record logged there whose base is its one change (no tail)
/// gets that seq as `one_change_seq` instead of its dedup index rows.
async fn read_records(
    tx: &deadpool_postgres::Transaction<'_>,
    space: &str,
    keys: Vec<RecordKey>,
    logged: &HashMap<RecordKey, u64>,
) -> Result<Vec<StoredRecord>, StorageError> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let (collections, ids) = record_arrays(keys.iter());
    let mut records: HashMap<RecordKey, StoredRecord> = keys
        .into_iter()
        .map(|key| {
            let record = StoredRecord {
                key: key.clone(),
                ..StoredRecord::default()
            };
            (key, record)
        })
        .collect();
    let by_key = [p(space.to_owned()), p(collections), p(ids)];
    for row in rows_planned(tx, BASES_OF_RECORDS, &by_key, Planning::EachCall).await? {
        let (collection, id): (String, String) = (col(&row, 0)?, col(&row, 1)?);
        let base = checked_base(space, (&collection, &id), &row, 2)?;
        if let Some(record) = records.get_mut(&(collection, id)) {
            record.base = Some(base);
        }
    }
    for row in rows_planned(
        tx,
        "SELECT e.seq, e.collection, e.record, e.origin, e.hash, e.change, e.crc, t.crc
         FROM unnest($2::text[], $3::text[]) AS u(c, r)
         CROSS JOIN LATERAL (SELECT seq, crc FROM tails t
           WHERE t.space = $1 AND t.collection = u.c AND t.record = u.r OFFSET 0) t
         CROSS JOIN LATERAL (SELECT * FROM log_entries e
           WHERE e.space = $1 AND e.seq = t.seq OFFSET 0) e
         ORDER BY e.seq",
        &by_key,
        Planning::EachCall,
    )
    .await?
    {
        let entry = log_row(space, &row)?;
        let (collection, id) = (&entry.collection, &entry.record);
        check(
            col(&row, 7)?,
            &[
                space.as_bytes(),
                collection.as_bytes(),
                id.as_bytes(),
                &entry.seq.to_be_bytes(),
            ],
            || record_damaged("record tail", space, collection, id),
        )?;
        if let Some(record) = records.get_mut(&(entry.collection, entry.record)) {
            record.tail.push((entry.seq, entry.change));
        }
    }
    let mut indexed: Vec<&RecordKey> = Vec::new();
    for (key, record) in &mut records {
        match (&record.base, logged.get(key)) {
            (Some(base), Some(&seq)) if record.tail.is_empty() && is_one_change(base) => {
                record.one_change_seq = Some(seq);
            }
            (Some(_), _) => indexed.push(key),
            (None, _) => {}
        }
    }
    let (collections, ids) = record_arrays(indexed.into_iter());
    for row in rows_planned(
        tx,
        "SELECT u.c, u.r, c.hash, c.seq, c.crc FROM unnest($2::text[], $3::text[]) AS u(c, r)
         CROSS JOIN LATERAL (SELECT hash, seq, crc FROM record_changes c
           WHERE c.space = $1 AND c.collection = u.c AND c.record = u.r OFFSET 0) c",
        &[p(space.to_owned()), p(collections), p(ids)],
        Planning::EachCall,
    )
    .await?
    {
        let (collection, id): (String, String) = (col(&row, 0)?, col(&row, 1)?);
        let hash = hash_of(&col::<Vec<u8>>(&row, 2)?, "change index key")?;
        let seq = checked_change_seq(space, (&collection, &id, &hash), &row, 3)?;
        if let Some(record) = records.get_mut(&(collection, id)) {
            record.seqs.insert(hash, seq);
        }
    }
    let mut records: Vec<StoredRecord> = records.into_values().collect();
    records.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(records)
}

/// The materializer's side of the database: `records`, its progress rows and their leases
/// (`relay::materializer` decides what the rows hold).
impl PgStorage {
    /// Every space's head against what `records` holds of it, in space order.
    pub fn records_lag(&self) -> Result<Vec<RecordsLag>, StorageError> {
        self.query(
            "SELECT s.space, s.head, COALESCE(r.position, 0),
             COALESCE(EXTRACT(EPOCH FROM now() - (SELECT e.logged_at FROM log_entries e
                 WHERE e.space = s.space AND e.seq > COALESCE(r.position, 0)
                 ORDER BY e.seq LIMIT 1)), 0)::float8
             FROM spaces s LEFT JOIN records_progress r ON r.space = s.space
             ORDER BY s.space",
            Vec::new(),
        )?
        .iter()
        .map(|row| {
            Ok(RecordsLag {
                space: col(row, 0)?,
                head: uint(col::<i64>(row, 1)?, "space head")?,
                materialized: uint(col::<i64>(row, 2)?, "materialized position")?,
                seconds_behind: col::<f64>(row, 3)?.max(0.0),
            })
        })
        .collect()
    }

    /// Takes (or renews) the space's lease for `relay` until `lease` from now, unless another
    /// relay holds one that has not run out; returns the materialized position when taken.
    pub fn lease_records(
        &self,
        space: &str,
        relay: &str,
        lease: Duration,
    ) -> Result<Option<u64>, StorageError> {
        let (space, relay) = (space.to_owned(), relay.to_owned());
        let lease_ms = limit(usize::try_from(lease.as_millis()).unwrap_or(usize::MAX));
        self.run(move |pool| async move {
            let client = connection(&pool).await?;
            execute(
                &client,
                "INSERT INTO records_progress (space) VALUES ($1) ON CONFLICT DO NOTHING",
                &[&space],
            )
            .await?;
            let taken = rows(
                &client,
                "UPDATE records_progress
                 SET leased_by = $2, lease_until = now() + $3::bigint * interval '1 millisecond'
                 WHERE space = $1
                 AND (leased_by IS NULL OR leased_by = $2 OR lease_until < now())
                 RETURNING position",
                &[p(space), p(relay), p(lease_ms)],
            )
            .await?;
            taken
                .first()
                .map(|row| uint(col::<i64>(row, 0)?, "materialized position"))
                .transpose()
        })
    }

    /// Gives up `relay`'s lease on the space, so that another relay may take it at once.
    pub fn release_records(&self, space: &str, relay: &str) -> Result<(), StorageError> {
        self.query(
            "UPDATE records_progress SET leased_by = NULL, lease_until = NULL
             WHERE space = $1 AND leased_by = $2 RETURNING space",
            vec![p(space.to_owned()), p(relay.to_owned())],
        )?;
        Ok(())
    }

    /// The next materializer step after `after`: up to `max_entries` log entries and what the
    /// records they touch keep, all read in one snapshot; `None` when `after` is the head.
    /// A record whose last entry of the step is at a seq `known` says the caller has its row
    /// for (`CreatedRows`: the entry created it) is not read but listed in `known`; a whole
    /// step reads every record.
    pub fn records_batch(
        &self,
        space: &str,
        after: u64,
        max_entries: usize,
        known: impl Fn(u64, &RecordKey) -> bool + Send + 'static,
    ) -> Result<Option<RecordsBatch>, StorageError> {
        let space = space.to_owned();
        self.run(move |pool| async move {
            let mut client = connection(&pool).await?;
            let tx = client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(sql_error)?;
            let found = rows(
                &tx,
                "SELECT head, horizon FROM spaces WHERE space = $1",
                &[p(space.clone())],
            )
            .await?;
            let Some(row) = found.first() else {
                return Ok(None);
            };
            let head = uint(col::<i64>(row, 0)?, "space head")?;
            let horizon = uint(col::<i64>(row, 1)?, "horizon")?;
            if after >= head {
                return Ok(None);
            }
            let batch = if after < horizon {
                let names = rows(
                    &tx,
                    "SELECT collection, record FROM bases WHERE space = $1
                     UNION SELECT collection, id FROM records WHERE space = $1",
                    &[p(space.clone())],
                )
                .await?;
                RecordsBatch {
                    through: head,
                    whole: true,
                    records: read_records(&tx, &space, named_records(&names)?, &HashMap::new())
                        .await?,
                    known: Vec::new(),
                }
            } else {
                let entries = rows(
                    &tx,
                    "SELECT collection, record, seq FROM log_entries
                     WHERE space = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                    &[
                        p(space.clone()),
                        p(int(after)?),
                        p(limit(max_entries.max(1))),
                    ],
                )
                .await?;
                let through = match entries.last() {
                    Some(row) => uint(col::<i64>(row, 2)?, "log entry")?,
                    None => return Ok(None),
                };
                let mut logged: HashMap<RecordKey, u64> = HashMap::new();
                for row in &entries {
                    let seq = uint(col::<i64>(row, 2)?, "log entry")?;
                    logged.insert((col(row, 0)?, col(row, 1)?), seq);
                }
                let (known, read): (Vec<RecordKey>, Vec<RecordKey>) = named_records(&entries)?
                    .into_iter()
                    .partition(|key| logged.get(key).is_some_and(|&seq| known(seq, key)));
                let known = known
                    .into_iter()
                    .filter_map(|key| logged.get(&key).map(|&seq| (key, seq)))
                    .collect();
                RecordsBatch {
                    through,
                    whole: false,
                    records: read_records(&tx, &space, read, &logged).await?,
                    known,
                }
            };
            tx.commit().await.map_err(sql_error)?;
            Ok(Some(batch))
        })
    }

    /// Writes a step's rows and moves the space's materialized position from `step.after` to
    /// `step.through`, in one transaction, renewing `relay`'s lease; `false` (nothing written)
    /// when the position is not `step.after` or the lease is another relay's: someone else
    /// materialized the space meanwhile.
    pub fn commit_records(
        &self,
        space: &str,
        relay: &str,
        lease: Duration,
        step: RecordsCommit,
    ) -> Result<bool, StorageError> {
        let (space, relay) = (space.to_owned(), relay.to_owned());
        let lease_ms = limit(usize::try_from(lease.as_millis()).unwrap_or(usize::MAX));
        self.run(move |pool| async move {
            let mut client = connection(&pool).await?;
            let tx = client.transaction().await.map_err(sql_error)?;
            let found = rows(
                &tx,
                "SELECT position, leased_by FROM records_progress WHERE space = $1 FOR UPDATE",
                &[p(space.clone())],
            )
            .await?;
            let Some(row) = found.first() else {
                return Ok(false);
            };
            let position = uint(col::<i64>(row, 0)?, "materialized position")?;
            let holder: Option<String> = col(row, 1)?;
            if position != step.after || holder.as_deref() != Some(relay.as_str()) {
                return Ok(false);
            }
            if step.whole {
                execute(&tx, "DELETE FROM records WHERE space = $1", &[&space]).await?;
            }
            if !step.removed.is_empty() {
                let (collections, ids) = record_arrays(step.removed.iter());
                execute(
                    &tx,
                    "DELETE FROM records r USING unnest($2::text[], $3::text[]) AS u(c, i)
                     WHERE r.space = $1 AND r.collection = u.c AND r.id = u.i",
                    &[&space, &collections, &ids],
                )
                .await?;
            }
            if !step.rows.is_empty() {
                let mut columns = Columns::default();
                let (mut fields, mut deleted, mut updated) = (Vec::new(), Vec::new(), Vec::new());
                for row in step.rows {
                    let (collection, id) = row.key;
                    columns.collections.push(collection);
                    columns.records.push(id);
                    columns.seqs.push(int(row.log_position)?);
                    fields.push(row.fields);
                    deleted.push(row.deleted);
                    updated.push(row.updated_ms);
                }
                execute(
                    &tx,
                    "INSERT INTO records
                     (space, collection, id, fields, deleted, updated_at, log_position)
                     SELECT $1, u.c, u.i, u.f::jsonb, u.d, to_timestamp(u.ms / 1000.0), u.p
                     FROM unnest($2::text[], $3::text[], $4::text[], $5::bool[], $6::bigint[],
                     $7::bigint[]) AS u(c, i, f, d, ms, p)
                     ON CONFLICT (space, collection, id) DO UPDATE SET fields = EXCLUDED.fields,
                     deleted = EXCLUDED.deleted, updated_at = EXCLUDED.updated_at,
                     log_position = EXCLUDED.log_position",
                    &[
                        &space,
                        &columns.collections,
                        &columns.records,
                        &fields,
                        &deleted,
                        &updated,
                        &columns.seqs,
                    ],
                )
                .await?;
            }
            execute(
                &tx,
                "UPDATE records_progress SET position = $2,
                 lease_until = now() + $3::bigint * interval '1 millisecond' WHERE space = $1",
                &[&space, &int(step.through)?, &lease_ms],
            )
            .await?;
            tx.commit().await.map_err(sql_error)?;
            Ok(true)
        })
    }
}

impl AccountStorage for PgStorage {
    fn account(&self, name: &str) -> Result<Option<AccountRecord>, StorageError> {
        self.account_value_by(
            "SELECT name, value, crc FROM accounts WHERE name = $1",
            p(name.to_owned()),
            "accounts",
            "account",
        )
    }

    fn accounts(&self) -> Result<Vec<AccountRecord>, StorageError> {
        self.account_values(
            "SELECT name, value, crc FROM accounts ORDER BY name",
            "accounts",
            "account",
        )
    }

    fn devices(&self) -> Result<Vec<DeviceRecord>, StorageError> {
        self.account_values(
            "SELECT device, value, crc FROM devices ORDER BY device",
            "devices",
            "device",
        )
    }

    fn enrolment(&self, code_hash: &[u8; 32]) -> Result<Option<EnrolmentRecord>, StorageError> {
        self.account_value_by(
            "SELECT code_hash, value, crc FROM enrolments WHERE code_hash = $1",
            p(code_hash.to_vec()),
            "enrolments",
            "enrolment code",
        )
    }

    fn shared_certificate(
        &self,
        candidate: (String, String),
    ) -> Result<(String, String), StorageError> {
        self.run(move |pool| async move {
            let client = connection(&pool).await?;
            let (cert, key) = candidate;
            let crc = crc(&[cert.as_bytes(), key.as_bytes()]);
            // The first relay's stays: a later one's candidate is dropped.
            client
                .execute(
                    "INSERT INTO relay_certificate (cert, key, crc) VALUES ($1, $2, $3)
                     ON CONFLICT DO NOTHING",
                    &[&cert, &key, &crc],
                )
                .await
                .map_err(sql_error)?;
            let row = client
                .query_one("SELECT cert, key, crc FROM relay_certificate", &[])
                .await
                .map_err(sql_error)?;
            let (cert, key): (String, String) = (col(&row, 0)?, col(&row, 1)?);
            check(col(&row, 2)?, &[cert.as_bytes(), key.as_bytes()], || {
                StorageError::Damaged {
                    what: "relay certificate",
                    space: String::new(),
                    position: "the relay_certificate row".into(),
                    record: None,
                }
            })?;
            Ok((cert, key))
        })
    }

    fn device(&self, id: &str) -> Result<Option<DeviceRecord>, StorageError> {
        self.account_value_by(
            "SELECT device, value, crc FROM devices WHERE device = $1",
            p(id.to_owned()),
            "devices",
            "device",
        )
    }

    fn family(&self, id: &str) -> Result<Option<Family>, StorageError> {
        self.account_value_by(
            "SELECT id, value, crc FROM token_families WHERE id = $1",
            p(id.to_owned()),
            "token_families",
            "token family",
        )
    }

    fn families(&self) -> Result<Vec<Family>, StorageError> {
        self.account_values(
            "SELECT id, value, crc FROM token_families ORDER BY id",
            "token_families",
            "token family",
        )
    }

    fn signing_keys(&self) -> Result<Vec<StoredKey>, StorageError> {
        self.account_values(
            "SELECT kid, value, crc FROM signing_keys ORDER BY kid",
            "signing_keys",
            "signing key",
        )
    }

    fn password(&self, account: &str) -> Result<Option<String>, StorageError> {
        let row = self.query_opt(
            "SELECT phc, crc FROM passwords WHERE account = $1",
            vec![p(account.to_owned())],
        )?;
        let Some(row) = row else { return Ok(None) };
        let phc: String = col(&row, 0)?;
        if col::<i32>(&row, 1)? != account_crc("passwords", account.as_bytes(), phc.as_bytes()) {
            return Err(damaged(
                "account data",
                "",
                format!("passwords {account}"),
                None,
            ));
        }
        Ok(Some(phc))
    }

    fn write_accounts(&self, writes: Vec<AccountWrite>) -> Result<(), StorageError> {
        self.run(move |pool| async move {
            let mut client = connection(&pool).await?;
            let tx = client.transaction().await.map_err(sql_error)?;
            let announced = announcements(&writes);
            write_accounts(&tx, writes).await?;
            for payload in announced {
                notify(&tx, ACCOUNTS_CHANNEL, &payload).await?;
            }
            tx.commit().await.map_err(sql_error)
        })
    }
}
