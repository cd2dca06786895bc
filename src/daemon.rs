//! `ferry daemon`: owns the data directory while it runs, opens the store, serves the IPC socket,
//! starts the sync loop when a relay is configured, and shuts down cleanly (every acknowledged write is already durable; the committer drains and
//! the store is flushed once more).
//!
//! Owns: process lifecycle, the data directory lock, the socket file, and when the store's space
//! is checked (compaction) and writes resumed after a full disk.
//! Must not touch: method semantics (that is `service`), framing (that is `ipc`).

use crate::alerting::{self, Monitor};
use crate::auth::credentials::{CredentialsError, Registration, TokenFile};
use crate::clock::SystemClock;
use crate::config::{Config, ConfigError};
use crate::crypt::{AccountKey, KeyError, Keyring};
use crate::datadir::{DataDir, DataDirError, DirLock};
use crate::engine::{self, DaemonMetrics, EngineError, SyncSettings};
use crate::ipc::{self, ServerOptions};
use crate::service::{Service, ServiceOptions};
use crate::store::keys;
use crate::store::kv::{Kv as _, KvError, SledKv};
use crate::store::{Store, StoreError};
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::net::UnixListener;

mod metrics;
pub use metrics::MetricsError;
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("cannot start syncing: {0}")]
    Sync(#[from] EngineError),
    #[error("cannot read this device's registration: {0}")]
    Credentials(#[from] CredentialsError),
    #[error("could not flush the store while stopping: {0}")]
    Shutdown(StoreError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("cannot listen on socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The socket path: `ipc.socket` from the config, or `ferry.sock` in the data directory.
pub fn socket_path(dir: &DataDir, config: &Config) -> PathBuf {
    if config.ipc.socket.is_empty() {
        dir.default_socket_path()
    } else {
        PathBuf::from(&config.ipc.socket)
    }
}

/// The daemon's async runtime. Blocking work (store calls) gets at most 32 threads: enough to keep
/// the store and the socket busy, few enough that their stacks and allocator state stay small.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(32)
        .build()
}

/// A store opened with the data directory's lock held.
pub struct OpenStore {
    pub store: Arc<Store>,
    pub lock: DirLock,
}

/// How long a starting daemon waits for the data directory's lock: a CLI command that found no
/// daemon yet works on the store directly for a moment, and the daemon comes up after it. (A
/// CLI command waits as long for a daemon that is starting, or for another command.)
pub const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

/// Takes the data directory's lock and opens its store. Used by CLI commands that run without a
/// daemon.
pub fn open_store(dir: &DataDir, config: &Config) -> Result<OpenStore, DaemonError> {
    open_locked_store(dir.lock()?, dir, config)
}

/// Opens the store of the data directory whose `lock` the caller holds.
pub fn open_locked_store(
    lock: DirLock,
    dir: &DataDir,
    config: &Config,
) -> Result<OpenStore, DaemonError> {
    let identity = dir.identity()?;
    // Checked before the store is opened: a refusal must leave nothing behind.
    let account_key = AccountKey::load(&dir.account_key_path())?;
    let store_path = dir.store_path();
    let created = begin_creating(&store_path)?;
    // sled reads an unreadable log as a torn write and opens it empty. A store whose log file
    // holds bytes but no device stamp has lost its contents: refuse it rather than start afresh
    // on top of it. (The stamp is the first thing written to a new store.)
    let log_file = SledKv::current_dir(&store_path)
        .map_err(StoreError::from)?
        .join("db");
    let had_log = std::fs::metadata(log_file).is_ok_and(|m| m.len() > 0);
    let kv = SledKv::open(
        &store_path,
        config.store.sled_cache_mb.saturating_mul(1024 * 1024),
    )
    .map_err(StoreError::from)?;
    // Unless the journal says batches were lost: then the store opens damaged, and a repair
    // puts back what the journal holds.
    if had_log
        && kv.lost().is_none()
        && kv
            .get(keys::META_DEVICE)
            .map_err(StoreError::from)?
            .is_none()
    {
        return Err(StoreError::Storage(KvError::Corrupt(format!(
            "{} holds data but no readable records (if this data directory never held any, \
             delete that directory and start again)",
            store_path.display()
        )))
        .into());
    }
    let mut options = config.store_options();
    options.keyring = Arc::new(Keyring::with(account_key));
    let store = Store::open(
        Box::new(kv),
        &identity.device_id(),
        options,
        Arc::new(SystemClock),
    )?;
    if let Some(marker) = created {
        // The stamp is durable (`Store::open` flushes it first): the store is whole.
        finish_creating(&marker)?;
    }
    Ok(OpenStore {
        store: Arc::new(store),
        lock,
    })
}

/// The file beside a store that is being created: while it exists, the store may lack its
/// stamp, and a start that finds it creates the store again (nothing in it was acknowledged:
/// the daemon serves only once the store is open).
fn creating_marker(store_path: &Path) -> PathBuf {
    store_path.with_extension("creating")
}

/// Before a store is opened: throws away one whose creation was cut short, and marks a new one
/// as being created. Returns the marker when the store is new.
fn begin_creating(store_path: &Path) -> Result<Option<PathBuf>, DaemonError> {
    let marker = creating_marker(store_path);
    let failed = |e: std::io::Error| {
        DaemonError::Store(StoreError::Storage(KvError::Io(format!(
            "creating the store {}: {e}",
            store_path.display()
        ))))
    };
    if marker.exists() {
        tracing::warn!(store = %store_path.display(),
            "the store's creation was cut short: creating it again");
        if store_path.exists() {
            std::fs::remove_dir_all(store_path).map_err(failed)?;
        }
    } else if store_path.exists() {
        return Ok(None);
    }
    std::fs::File::create(&marker)
        .and_then(|f| f.sync_all())
        .map_err(failed)?;
    sync_parent(store_path).map_err(failed)?;
    Ok(Some(marker))
}

fn finish_creating(marker: &Path) -> Result<(), DaemonError> {
    std::fs::remove_file(marker)
        .and_then(|()| sync_parent(marker))
        .map_err(|e| {
            DaemonError::Store(StoreError::Storage(KvError::Io(format!(
                "finishing the store's creation ({}): {e}",
                marker.display()
            ))))
        })
}

fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(parent) => std::fs::File::open(parent).and_then(|d| d.sync_all()),
        None => Ok(()),
    }
}

/// What `open_or_set_aside` did.
pub enum OpenedOrSetAside {
    /// The store opened (its lock held): the caller works on it as it is.
    Opened(OpenStore),
    /// The store could not be opened and went to this path; a new one holds its journal.
    SetAside(PathBuf),
}

/// Opens the data directory's store, or, when it cannot be opened at all (sled refuses its
/// files, or finds nothing in files that hold data), moves it aside and starts a new one
/// holding its journal, whose unsynced changes a repair then puts back (the rest comes from the
/// relay). For `ferry doctor --repair`, with no daemon: a store that opens is opened once.
pub fn open_or_set_aside(dir: &DataDir, config: &Config) -> Result<OpenedOrSetAside, DaemonError> {
    match open_store(dir, config) {
        Err(DaemonError::Store(StoreError::Storage(KvError::Corrupt(_) | KvError::Damaged(_)))) => {
        }
        other => return other.map(OpenedOrSetAside::Opened),
    }
    let _lock = dir.lock()?;
    let store = dir.store_path();
    let aside = store.with_file_name(format!("store.unreadable-{}", crate::clock::now_ms()));
    let io =
        |e: std::io::Error| DaemonError::Store(StoreError::Storage(KvError::Io(e.to_string())));
    std::fs::rename(&store, &aside).map_err(io)?;
    std::fs::create_dir(&store).map_err(io)?;
    match std::fs::copy(aside.join("journal"), store.join("journal")) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    Ok(OpenedOrSetAside::SetAside(aside))
}

pub fn service_options(dir: &DataDir, config: &Config, daemon: bool) -> ServiceOptions {
    ServiceOptions {
        data_dir: dir.path().to_owned(),
        socket: socket_path(dir, config),
        max_import_records: config.ipc.max_import_records,
        max_list_limit: config.ipc.max_list_limit,
        group_commit_max: config.store.group_commit_max,
        daemon,
    }
}

/// Runs the daemon until `shutdown` completes. `ready` is called with the socket path once apps
/// can connect.
pub async fn run(
    dir: &DataDir,
    config: &Config,
    shutdown: impl Future<Output = ()>,
    ready: impl FnOnce(&Path),
) -> Result<(), DaemonError> {
    // The pool the store builds new records on: named, or its threads take the name of the
    // thread that first used it. One already built (a process running several daemons) stays.
    let _ = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("ferry-build-{i}"))
        .build_global();
    let socket = socket_path(dir, config);
    let mut told = false;
    let lock = dir.lock_within(LOCK_PATIENCE, |pid| {
        if !told {
            told = true;
            tracing::info!(
                pid,
                "the data directory is in use by another ferry process (a command working on \
                 the store?); waiting up to {} s for it",
                LOCK_PATIENCE.as_secs()
            );
        }
        // A daemon that answers on the socket is there to stay: no use waiting for it.
        std::os::unix::net::UnixStream::connect(&socket).is_err()
    })?;
    let open = open_locked_store(lock, dir, config)?;
    let requeued = match open.store.recover_interrupted() {
        // A damaged store still starts, so that status and the alert say so; its damaged
        // entries are never read as good ones, so never uploaded.
        Err(e @ StoreError::Storage(KvError::Damaged(_))) => {
            tracing::error!(error = %e, "queue entries interrupted mid-upload cannot all be read");
            0
        }
        other => other?,
    };
    if requeued > 0 {
        tracing::info!(
            requeued,
            "queue entries interrupted mid-upload are pending again"
        );
    }
    let listener = bind(&socket)?;
    let service = Arc::new(Service::new(
        open.store.clone(),
        service_options(dir, config, true),
    ));
    // Bound before the daemon reports ready, so a taken or mistyped address stops the start.
    let metrics_listener = match config.metrics.listen.as_str() {
        "" => None,
        listen => Some(metrics::bind(listen).await?),
    };
    let daemon_metrics = Arc::new(DaemonMetrics::default());
    let alerts = Monitor::new(config.alerts.clone(), open.store.device_id());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let sync_config = Registration::sync_config(dir.path(), &config.sync)?;
    let sync = match SyncSettings::from_config(&sync_config)? {
        Some(settings) => {
            let key = dir.identity()?.signing_key().clone();
            Some(engine::spawn(
                service.clone(),
                key,
                TokenFile::new(dir.path()),
                settings,
                daemon_metrics.clone(),
                alerts.clone(),
                stopped.clone(),
            ))
        }
        None => {
            tracing::info!(
                "no relay (sync.enabled is false, or neither sync.relay nor a registration names one): working offline only"
            );
            None
        }
    };
    let pruning = tokio::spawn(prune_history(
        open.store.clone(),
        Retention {
            completed_days: config.store.keep_completed_days,
            log_days: config.store.keep_log_days,
            feed_changes: config.store.keep_feed_changes,
        },
        stopped.clone(),
    ));
    let storage_checks = tokio::spawn(check_storage(
        dir.path().to_owned(),
        alerts.clone(),
        stopped.clone(),
    ));
    let storage_care = tokio::spawn(look_after_storage(
        open.store.clone(),
        dir.store_path(),
        sync.as_ref().map(|(handle, _)| handle.clone()),
        alerts.clone(),
        stopped.clone(),
    ));
    let metrics_server = metrics_listener.map(|listener| {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "serving metrics at /metrics");
        }
        tokio::spawn(metrics::serve_daemon(
            listener,
            daemon_metrics,
            alerts.clone(),
            open.store.clone(),
            sync.as_ref().map(|(handle, _)| handle.clone()),
            stopped.clone(),
        ))
    });
    let server = tokio::spawn(ipc::serve(
        listener,
        service.clone(),
        ServerOptions {
            max_message_bytes: config.ipc.max_message_bytes,
            max_connections: config.ipc.max_connections,
            sync: sync.as_ref().map(|(handle, _)| handle.clone()),
            alerts: Some(alerts),
        },
        stopped,
    ));
    tracing::info!(
        socket = %socket.display(),
        device = open.store.device_id(),
        "daemon ready"
    );
    ready(&socket);
    shutdown.await;
    tracing::info!("shutting down");
    let _ = stop.send(true);
    if let Err(e) = server.await {
        tracing::error!(error = %e, "socket server stopped abnormally");
    }
    if let Err(e) = storage_checks.await {
        tracing::error!(error = %e, "storage checks stopped abnormally");
    }
    if let Err(e) = storage_care.await {
        tracing::error!(error = %e, "looking after the store's storage stopped abnormally");
    }
    if let Err(e) = pruning.await {
        tracing::error!(error = %e, "history pruning stopped abnormally");
    }
    if let Some(task) = metrics_server
        && let Err(e) = task.await
    {
        tracing::error!(error = %e, "metrics server stopped abnormally");
    }
    if let Some((_, task)) = sync
        && let Err(e) = task.await
    {
        tracing::error!(error = %e, "sync loop stopped abnormally");
    }
    let _ = std::fs::remove_file(&socket);
    match Arc::try_unwrap(service) {
        Ok(service) => service.shutdown().map_err(DaemonError::Shutdown)?,
        Err(service) => service.store().flush().map_err(DaemonError::Shutdown)?,
    }
    tracing::info!("stopped; everything flushed");
    drop(open.lock);
    Ok(())
}

/// How often the daemon forgets completed queue entries and SyncLog entries past their days.
/// Measures the data directory's size and its disk's free space for the alerts, now and every
/// `alerts.check_interval_secs`, until shutdown.
async fn check_storage(
    data_dir: PathBuf,
    alerts: Arc<Monitor>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let every = std::time::Duration::from_secs(alerts.config().check_interval_secs);
    loop {
        let (dir, monitor) = (data_dir.clone(), alerts.clone());
        let measured = tokio::task::spawn_blocking(move || {
            let now = crate::clock::now_ms();
            match alerting::dir_size(&dir) {
                Ok(bytes) => monitor.observe("", now, |a, now| a.storage_used(bytes, now)),
                Err(e) => tracing::warn!(error = %e, "cannot measure the data directory's size"),
            }
            match alerting::disk_free(&dir) {
                Ok(free) => monitor.observe("", now, |a, now| a.disk_free(free, now)),
                Err(e) => tracing::warn!(error = %e, "cannot read the free space of the data directory's disk"),
            }
        })
        .await;
        if let Err(e) = measured {
            tracing::error!(error = %e, "measuring storage failed");
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// How often the daemon looks whether a full disk has room again.
const DISK_FULL_RETRY_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// How often it checks that the store keeps within its space bound (cheap unless it does not).
const SPACE_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(60);
/// Free space the store's disk needs before writes are tried again after it filled up: a few
/// of sled's log segments.
const RESUME_FREE_BYTES: u64 = 4 << 20;

/// How long a due space check waits for a sync in progress to finish. A compaction holds the
/// store's writes for as long as the copy takes (about 30 s for a store of 1,000,000 records),
/// so one run in the middle of a large first upload or download stalls it; a device that never
/// stops syncing is still compacted after this long.
const SYNC_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(600);

/// Looks after the store's storage until shutdown. At start and every `SPACE_CHECK_EVERY` it keeps
/// the store within its space bound (`Store::bound_space`, which compacts it when it is over),
/// waiting up to `SYNC_WAIT_MAX` for a sync in progress to finish first: a compaction copies
/// the whole store, and a device that just started usually has an upload or download to do.
/// While writes are refused for a full disk, it reopens the store as soon as the disk has room
/// again, so writes resume without a restart; the alerts hear of both.
async fn look_after_storage(
    store: Arc<Store>,
    store_dir: PathBuf,
    sync: Option<engine::SyncHandle>,
    alerts: Arc<Monitor>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut space_checked: Option<std::time::Instant> = None;
    let mut due_since: Option<std::time::Instant> = None;
    loop {
        let due = space_checked.is_none_or(|at| at.elapsed() >= SPACE_CHECK_EVERY);
        let check_space = due && {
            let waited = due_since
                .get_or_insert_with(std::time::Instant::now)
                .elapsed();
            // Pending uploads count while the session still connects: that is when a device
            // that worked offline starts. Asked of the store's pending index, not of the queue's
            // counts: counting a long queue at start would hold up its first upload.
            let syncing = sync.as_ref().is_some_and(|s| {
                let watch = s.watch();
                let status = watch.borrow();
                status.syncing || status.relay_head > status.cursor
            }) || (sync.is_some() && store.has_pending().unwrap_or(true));
            !syncing || waited >= SYNC_WAIT_MAX
        };
        if check_space {
            space_checked = Some(std::time::Instant::now());
            due_since = None;
        }
        let (store, dir, alerts) = (store.clone(), store_dir.clone(), alerts.clone());
        let looked = tokio::task::spawn_blocking(move || {
            if store.disk_full_since().is_some() {
                resume_when_room(&store, &dir);
            }
            let refused = store.disk_full_since();
            alerts.observe("", crate::clock::now_ms(), |a, _| a.writes_refused(refused));
            let damage = store.damage().map(|d| {
                format!(
                    "the store is damaged ({}): `ferry doctor` says what, and `ferry doctor \
                     --repair` (with the daemon stopped) repairs it from the relay",
                    d.summary()
                )
            });
            alerts.observe("", crate::clock::now_ms(), |a, now| {
                a.store_damaged(damage.as_deref(), now)
            });
            if check_space {
                bound_space(&store);
            }
            if refused.is_none()
                && let Err(e) = store.bound_journal()
            {
                tracing::warn!(error = %e, "could not rewrite the journal of unsynced changes");
            }
        })
        .await;
        if let Err(e) = looked {
            tracing::error!(error = %e, "looking after the store's storage failed");
        }
        tokio::select! {
            _ = tokio::time::sleep(DISK_FULL_RETRY_EVERY) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Takes a store whose writes were refused for a full disk back to what is durable (if a failed
/// flush did not already), and lets writes through once the disk has room.
fn resume_when_room(store: &Store, dir: &Path) {
    if let Err(e) = store.reopen_storage() {
        tracing::warn!(error = %e, "the store could not go back to what is durable yet");
    }
    match alerting::disk_free(dir) {
        Ok(free) if free >= RESUME_FREE_BYTES => match store.resume_writes() {
            Ok(requeued) => tracing::info!(
                free,
                requeued,
                "the store's disk has room again: writes are taken again"
            ),
            Err(e) => tracing::warn!(error = %e, "the store could not be opened again yet"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the free space of the store's disk"),
    }
}

fn bound_space(store: &Store) {
    match store.bound_space() {
        Ok(Some(c)) => tracing::info!(
            before = c.before.store_bytes,
            after = c.after.store_bytes,
            live = c.after.live_bytes,
            "compacted the store: it took more than its bound"
        ),
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "could not check or compact the store's size"),
    }
}

const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);
/// Entries removed per batch, so a first pruning of a long history does not hold the queue.
const PRUNE_BATCH: usize = 10_000;

/// Forgets completed queue entries and SyncLog entries older than their configured days, at
/// start and then every hour, until `shutdown`. 0 days keeps that history for ever.
/// How much history the daemon keeps (0: all of that kind).
struct Retention {
    completed_days: u64,
    log_days: u64,
    feed_changes: u64,
}

async fn prune_history(
    store: Arc<Store>,
    keep: Retention,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    if keep.completed_days == 0 && keep.log_days == 0 && keep.feed_changes == 0 {
        return;
    }
    let cutoff = |days: u64| match days {
        0 => 0,
        days => crate::clock::now_ms().saturating_sub(days.saturating_mul(86_400_000)),
    };
    loop {
        let store = store.clone();
        let (queue_cutoff, log_cutoff) = (cutoff(keep.completed_days), cutoff(keep.log_days));
        let feed_changes = keep.feed_changes;
        let pruned = tokio::task::spawn_blocking(move || {
            let mut total = (0, 0);
            loop {
                let (queue, log) = store.prune_history(queue_cutoff, log_cutoff, PRUNE_BATCH)?;
                store.flush()?;
                total = (total.0 + queue, total.1 + log);
                if queue < PRUNE_BATCH && log < PRUNE_BATCH {
                    break;
                }
            }
            let feed = match feed_changes {
                0 => 0,
                keep => store.prune_feed(keep, PRUNE_BATCH)?,
            };
            store.flush()?;
            Ok::<_, StoreError>((total.0, total.1, feed))
        })
        .await;
        match pruned {
            Ok(Ok((0, 0, 0))) => {}
            Ok(Ok((queue, log, feed))) => {
                tracing::info!(
                    queue,
                    log,
                    feed,
                    "forgot completed queue entries, old SyncLog entries and old feed changes"
                )
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "could not prune the queue's history"),
            Err(e) => tracing::error!(error = %e, "history pruning failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(PRUNE_EVERY) => {}
            _ = shutdown.changed() => return,
        }
    }
}

fn bind(socket: &Path) -> Result<UnixListener, DaemonError> {
    let err = |source| DaemonError::Socket {
        path: socket.to_owned(),
        source,
    };
    // We hold the data directory's lock, so a socket file left here is from a process that died.
    match std::fs::remove_file(socket) {
        Ok(()) => tracing::info!(socket = %socket.display(), "removed a stale socket file"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(socket).map_err(err)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}
