//! The relay: the server that devices of a space upload their changes to and download the
//! space's change log from.
//!
//! Owns: the relay's durable state (`store`: change logs; `accounts`: accounts, devices, tokens;
//! `storage`: how both are kept),
//! its QUIC server (`server`), the operator's socket (`admin`), and the process around them
//! (`run`: data directory, certificate, endpoint, signing key rotation, clean shutdown).
//! Must not touch: the device's store or its socket.

pub mod accounts;
pub mod activity;
pub mod admin;
pub mod alerts;
pub mod created;
pub mod http;
pub mod materializer;
pub mod metrics;
pub mod recent;
pub mod server;
pub mod storage;
pub mod store;
pub mod web;
pub mod web_actor;
pub(crate) mod web_write;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Clock, SystemClock};
use crate::config::{Config, RelayStorageKind};
use crate::datadir::{DataDir, DataDirError};
use crate::store::kv::{KvError, SledKv};
use crate::transport::{self, Fingerprint, RelayCertificate, TransportError, TransportOptions};
use ferry_proto::session::SessionConfig;
use metrics::{RelayMetrics, RelayScrape};
use server::RelayOptions;
use store::{LogRetention, RelayStore, RelayStoreError, RelayStoreOptions};

/// Most conflicts one HTTP list request returns.
const MAX_CONFLICTS_LISTED: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error("relay.listen {0:?} is not an address such as 127.0.0.1:7443")]
    Listen(String),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("cannot open the relay's store: {0}")]
    Kv(#[from] KvError),
    #[error("cannot open the relay's storage: {0}")]
    Storage(#[from] storage::StorageError),
    #[error(transparent)]
    Store(#[from] RelayStoreError),
    #[error(transparent)]
    Accounts(#[from] accounts::AccountError),
    #[error("cannot listen for HTTPS on {address} (relay.http_listen): {source}")]
    HttpListen {
        address: String,
        source: std::io::Error,
    },
    #[error("cannot serve the operator's socket {path}: {source}")]
    Admin {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// What `ferry relay` tells its operator once it serves.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Listening {
    pub listen: SocketAddr,
    /// Devices pin this (`sync.fingerprint`).
    pub fingerprint: Fingerprint,
    /// The HTTPS API's address, when it serves one (`relay.http_listen`).
    pub http: Option<SocketAddr>,
    /// The relay's metrics, for a `GET /metrics` route.
    #[serde(skip)]
    pub metrics: RelayScrape,
    /// The relay's alerts, per account.
    #[serde(skip)]
    pub alerts: Arc<alerts::RelayAlerts>,
}

/// Starts the `records` table's materializer on a storage of its own (two connections, its own
/// listener), so that it never takes a connection an upload waits for.
/// It takes the rows of records this relay's appends created from `created`.
fn start_materializer(
    relay: &crate::config::RelayConfig,
    policies: crate::resolve::Policies,
    metrics: Arc<RelayMetrics>,
    created: Arc<created::CreatedRows>,
    stopped: tokio::sync::watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, RelayError> {
    let options = storage::pg::PgOptions {
        pool_size: 2,
        ..storage::pg::PgOptions::from_config(relay)
    };
    let storage = Arc::new(
        storage::PgStorage::connect(&options)?.with_listener_name(materializer::LISTENER_NAME),
    );
    let heard = materializer::follow(&storage);
    let materializer = materializer::Materializer::new(
        storage,
        policies,
        metrics,
        materializer::MaterializerOptions::default(),
    )
    .taking_created_from(created);
    Ok(tokio::spawn(materializer::run(
        Arc::new(materializer),
        heard,
        stopped,
    )))
}

/// Opens the storage `relay.storage` names: sled in the data directory (refused when sled lost
/// batches it had made durable), or the PostgreSQL database, its schema migrated first.
pub fn open_storage(
    dir: &std::path::Path,
    relay: &crate::config::RelayConfig,
) -> Result<Arc<dyn storage::RelayStorage>, RelayError> {
    if relay.storage == RelayStorageKind::Postgres {
        let options = storage::pg::PgOptions::from_config(relay);
        return Ok(Arc::new(storage::PgStorage::open(&options)?));
    }
    let store_path = dir.join("relay.db");
    let sled = SledKv::open(&store_path, relay.sled_cache_mb * 1024 * 1024)?;
    // Serving a log without changes it acknowledged would have devices skip or reuse positions.
    if let Some(lost) = crate::store::kv::Kv::lost(&sled) {
        return Err(KvError::Corrupt(format!(
            "{} lost batches {} to {}, which had been made durable (its log was damaged on \
             disk and sled dropped everything after the damage): serving it would hand devices \
             a log without changes it acknowledged storing. Restore the data directory from a \
             backup; to serve what is left anyway, remove {}",
            store_path.display(),
            lost.found + 1,
            lost.durable,
            store_path.join("journal").display()
        ))
        .into());
    }
    let kv: Arc<dyn crate::store::kv::Kv> = Arc::new(sled);
    Ok(Arc::new(storage::KvStorage::open(kv)?))
}

/// The certificate the relay presents: the configured files; on storage several relays share,
/// the one they all present (the first relay's: its data directory's pair if it had one, else a
/// new one), so that one pinned fingerprint fits every relay; otherwise its data directory's own,
/// created the first time.
fn relay_certificate(
    dir: &std::path::Path,
    relay: &crate::config::RelayConfig,
    storage: &dyn storage::RelayStorage,
) -> Result<RelayCertificate, RelayError> {
    if !relay.cert_file.is_empty() {
        return Ok(RelayCertificate::from_pem_files(
            relay.cert_file.as_ref(),
            relay.key_file.as_ref(),
        )?);
    }
    if !storage.shared() {
        return Ok(RelayCertificate::load_or_create(
            dir,
            &relay.certificate_names,
        )?);
    }
    let (cert_path, key_path) = (
        dir.join(transport::CERT_FILE_NAME),
        dir.join(transport::KEY_FILE_NAME),
    );
    let candidate = match (
        std::fs::read_to_string(&cert_path),
        std::fs::read_to_string(&key_path),
    ) {
        (Ok(cert), Ok(key)) => (cert, key),
        _ => RelayCertificate::generate_pem(&relay.certificate_names)?,
    };
    let (cert, key) = storage.shared_certificate(candidate)?;
    let stored = std::path::Path::new("the database's relay_certificate row");
    Ok(RelayCertificate::from_pem(
        cert.as_bytes(),
        stored,
        key.as_bytes(),
        stored,
    )?)
}

/// Runs the relay until `shutdown` completes: every acknowledged change is already durable, and
/// the store is flushed once more on the way out.
pub async fn run(
    dir: &DataDir,
    config: &Config,
    listen: Option<&str>,
    shutdown: impl Future<Output = ()>,
    ready: impl FnOnce(&Listening),
) -> Result<(), RelayError> {
    let relay = &config.relay;
    let listen = listen.unwrap_or(&relay.listen);
    let addr: SocketAddr = listen
        .parse()
        .map_err(|_| RelayError::Listen(listen.to_string()))?;
    // Owner-only, like a device's: the relay's key and every space's data live here.
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(dir.path())
        .map_err(|e| {
            RelayError::DataDir(DataDirError::Io {
                path: dir.path().to_owned(),
                source: e,
            })
        })?;
    let _lock = dir.lock()?;
    transport::install_crypto_provider();
    let storage = open_storage(dir.path(), relay)?;
    let certificate = relay_certificate(dir.path(), relay, &*storage)?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let accounts = Arc::new(accounts::Accounts::open(
        storage.clone(),
        relay.token_policy(),
        accounts::os_random(),
        clock.now_ms(),
    )?);
    let (news, heard) = tokio::sync::mpsc::unbounded_channel();
    let follows = storage.follow(news);
    let store = RelayStore::open(
        storage,
        RelayStoreOptions {
            doc_cache_docs: relay.cache_docs,
            limits: config.limits,
            policies: config.policies(),
            clock: clock.clone(),
            ..RelayStoreOptions::default()
        },
    );
    // Only the `records` materializer takes created records' rows (PostgreSQL storage).
    let created = (relay.storage == RelayStorageKind::Postgres)
        .then(|| Arc::new(created::CreatedRows::default()));
    let store = Arc::new(match &created {
        Some(created) => store.hand_created_to(created.clone()),
        None => store,
    });
    let transport_options = TransportOptions {
        max_concurrent_connections: relay.max_connections,
        idle_timeout: Duration::from_millis(relay.idle_timeout_ms),
        max_frame_bytes: relay.max_frame_bytes as usize,
        congestion: relay.congestion,
        ..TransportOptions::default()
    };
    let endpoint = transport::server_endpoint(addr, &certificate, &transport_options)?;
    let metrics = Arc::new(RelayMetrics::default());
    let alerts = alerts::RelayAlerts::new(config.alerts.clone(), clock.clone());
    let mut listening = Listening {
        listen: endpoint.local_addr().unwrap_or(addr),
        fingerprint: certificate.fingerprint(),
        http: None,
        metrics: RelayScrape::new(metrics.clone(), store.clone(), alerts.clone()),
        alerts: alerts.clone(),
    };
    let options = RelayOptions {
        session: SessionConfig {
            handshake_timeout_ms: relay.handshake_timeout_ms,
            max_batch_changes: relay.max_batch_changes,
            max_frame_bytes: relay.max_frame_bytes,
            max_download_changes: relay.max_download_changes,
            max_snapshot_records: relay.max_snapshot_records,
            // A device older than flatten entries would keep a flattened document beside the
            // history it holds.
            min_device_version: if relay.flatten_history {
                ferry_proto::wire::FLATTEN_VERSION
            } else {
                ferry_proto::wire::MIN_PROTOCOL_VERSION
            },
            ..SessionConfig::default()
        },
        transport: transport_options,
        max_connections: relay.max_connections,
        sign_ins_per_minute: relay.sign_ins_per_minute,
        enrolments_per_minute: relay.enrolments_per_minute,
    };
    let shared = server::Shared {
        clock: clock.clone(),
        store: store.clone(),
        accounts: accounts.clone(),
        metrics,
        activity: Arc::default(),
        spaces: Arc::new(server::Spaces::default()),
        alerts: alerts.clone(),
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let http_server = match relay.http_listen.as_str() {
        "" => None,
        address => {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .map_err(|source| RelayError::HttpListen {
                    address: address.to_string(),
                    source,
                })?;
            listening.http = listener.local_addr().ok();
            let policies = Arc::new(config.policies());
            let web_actors = Arc::new(web_actor::WebActors::new(
                &shared,
                crate::store::StoreOptions {
                    limits: config.limits,
                    declared_collections: (!policies.collections.is_empty())
                        .then(|| policies.collections.keys().cloned().collect()),
                    policies: (*policies).clone(),
                    ..crate::store::StoreOptions::default()
                },
                MAX_CONFLICTS_LISTED,
            ));
            let state = http::ApiState::new(
                &shared,
                policies,
                http::HttpOptions {
                    max_body_bytes: relay.http_max_body_bytes,
                    max_page: relay.http_max_page,
                    min_app_version: relay.min_app_version.clone(),
                    logins_per_minute: relay.logins_per_minute,
                },
                (!relay.metrics_token.is_empty()).then(|| {
                    (
                        listening.metrics.clone(),
                        ferry_proto::wire::Secret::new(relay.metrics_token.clone()),
                    )
                }),
                web_actors,
            );
            let tls = transport::https_server_config(&certificate)?;
            Some(tokio::spawn(http::serve(
                listener,
                tls,
                http::router(state),
                relay.max_connections,
                stopped.clone(),
            )))
        }
    };
    let admin_socket = admin::socket_path(dir);
    let admin_listener = admin::bind(&admin_socket).map_err(|source| RelayError::Admin {
        path: admin_socket.clone(),
        source,
    })?;
    let admin = tokio::spawn(admin::serve(
        admin_listener,
        admin::Served {
            accounts: accounts.clone(),
            store: store.clone(),
            alerts: alerts.clone(),
            clock: clock.clone(),
            options: admin::AdminOptions {
                enrolment_code_hours: relay.enrolment_code_hours,
            },
        },
        stopped.clone(),
    ));
    let rotation = tokio::spawn(rotate_signing_keys(
        accounts.clone(),
        clock.clone(),
        Duration::from_secs(relay.signing_key_rotation_hours.saturating_mul(3600)),
        stopped.clone(),
    ));
    let disk_checks = tokio::spawn(
        alerts
            .clone()
            .check_disk(dir.path().to_owned(), stopped.clone()),
    );
    let rebuilds = {
        let (store, accounts, stopped) = (store.clone(), accounts.clone(), stopped.clone());
        tokio::task::spawn_blocking(move || rebuild_conflicts(&store, &accounts, &stopped))
    };
    let compactions = tokio::spawn(compact_logs(
        Compactor {
            store: store.clone(),
            accounts: accounts.clone(),
            alerts: alerts.clone(),
            clock: clock.clone(),
            retention: LogRetention {
                keep_log_days: relay.keep_log_days,
                keep_log_entries: relay.keep_log_entries,
                flatten_history: relay.flatten_history,
            },
            tombstone_ms: relay.tombstone_ms(),
            spaces: shared.spaces.clone(),
        },
        Duration::from_secs(relay.compact_interval_secs.max(1)),
        stopped.clone(),
    ));
    let follower = follows.then(|| {
        tokio::spawn(server::follow_storage(
            heard,
            store.clone(),
            accounts.clone(),
            shared.spaces.clone(),
            stopped.clone(),
        ))
    });
    let materializer = match created {
        Some(created) => Some(start_materializer(
            relay,
            config.policies(),
            shared.metrics.clone(),
            created,
            stopped.clone(),
        )?),
        None => None,
    };
    let server = tokio::spawn(server::serve(endpoint, shared, options, stopped));
    tracing::info!(listen = %listening.listen, fingerprint = %listening.fingerprint, "relay ready");
    ready(&listening);
    shutdown.await;
    tracing::info!("relay shutting down");
    let _ = stop.send(true);
    if let Err(e) = server.await {
        tracing::error!(error = %e, "relay server stopped abnormally");
    }
    if let Some(task) = http_server
        && let Err(e) = task.await
    {
        tracing::error!(error = %e, "relay HTTPS API stopped abnormally");
    }
    if let Some(task) = follower
        && let Err(e) = task.await
    {
        tracing::error!(error = %e, "relay storage follower stopped abnormally");
    }
    if let Some(task) = materializer
        && let Err(e) = task.await
    {
        tracing::error!(error = %e, "relay records materializer stopped abnormally");
    }
    for (what, task) in [
        ("operator socket", admin),
        ("key rotation", rotation),
        ("disk checks", disk_checks),
        ("conflict rebuild", rebuilds),
        ("log compaction", compactions),
    ] {
        if let Err(e) = task.await {
            tracing::error!(error = %e, "relay {what} stopped abnormally");
        }
    }
    let _ = std::fs::remove_file(&admin_socket);
    store.flush()?;
    tracing::info!("relay stopped; everything flushed");
    Ok(())
}

/// Finds the conflicts of every account's log kept before the relay kept conflict entries
/// (`RelayStore::rebuild_conflicts`), one account at a time, until done or `stopped`.
fn rebuild_conflicts(
    store: &RelayStore,
    accounts: &accounts::Accounts,
    stopped: &tokio::sync::watch::Receiver<bool>,
) {
    let spaces = match accounts.accounts() {
        Ok(all) => all.into_iter().map(|a| a.name),
        Err(e) => {
            return tracing::error!(error = %e, "cannot list the accounts to rebuild their conflicts");
        }
    };
    for space in spaces {
        match store.conflicts_complete(&space) {
            Ok(true) => continue,
            Ok(false) => {}
            Err(e) => {
                tracing::error!(space, error = %e, "cannot tell whether the account's conflicts are kept");
                continue;
            }
        }
        tracing::info!(
            space,
            "finding the conflicts of a log kept before the relay kept them"
        );
        let started = std::time::Instant::now();
        match store.rebuild_conflicts(&space, || *stopped.borrow()) {
            Ok(Some(found)) => tracing::info!(
                space,
                found,
                secs = started.elapsed().as_secs_f64(),
                "the account's conflicts are kept from now on"
            ),
            Ok(None) => return,
            Err(e) => tracing::error!(space, error = %e,
                "cannot rebuild the account's conflicts; the next start tries again"),
        }
    }
}

/// What compacting the spaces' logs works with.
struct Compactor {
    store: Arc<RelayStore>,
    accounts: Arc<accounts::Accounts>,
    alerts: Arc<alerts::RelayAlerts>,
    clock: Arc<dyn Clock>,
    retention: LogRetention,
    /// How long a record stays deleted before it is purged (0: never).
    tombstone_ms: u64,
    /// Where the purge entries' new heads are published, so live sessions get them at once.
    spaces: Arc<server::Spaces>,
}

impl Compactor {
    /// One pass over every account's log (`RelayStore::compact_log`), each measured again for
    /// its alerts once compacted.
    fn pass(&self, stopped: &tokio::sync::watch::Receiver<bool>) {
        let spaces = match self.accounts.accounts() {
            Ok(all) => all.into_iter().map(|a| a.name),
            Err(e) => {
                return tracing::error!(error = %e, "cannot list the accounts to compact their logs");
            }
        };
        let mut compacted = false;
        for space in spaces {
            if *stopped.borrow() {
                return;
            }
            let started = std::time::Instant::now();
            // Before compaction, so that the purged records' entries can go in the same pass.
            match self
                .store
                .purge_tombstones(&space, self.clock.now_ms(), self.tombstone_ms)
            {
                Ok(0) => {}
                Ok(purged) => {
                    tracing::info!(space, purged, "deleted records purged");
                    match self.store.head(&space) {
                        Ok(head) => self.spaces.publish(&space, head),
                        Err(e) => tracing::error!(space, error = %e,
                            "cannot read the log's head to push the purge entries; devices get \
                             them at their next sync"),
                    }
                }
                Err(e) => tracing::error!(space, error = %e,
                    "cannot purge the account's deleted records; the next pass tries again"),
            }
            match self
                .store
                .compact_log(&space, self.clock.now_ms(), self.retention)
            {
                Ok(Some(done)) => {
                    tracing::info!(
                        space,
                        horizon = done.horizon,
                        bases_saved = done.bases_saved,
                        flattened = done.flattened,
                        bytes_before = done.bytes_before,
                        bytes_after = done.bytes_after,
                        secs = started.elapsed().as_secs_f64(),
                        "log compacted"
                    );
                    self.alerts.compacted(&self.store, &space);
                    compacted = true;
                }
                Ok(None) => {}
                Err(e) => tracing::error!(space, error = %e,
                    "cannot compact the account's log; the next pass tries again"),
            }
        }
        if !compacted {
            return;
        }
        let started = std::time::Instant::now();
        match self.store.reclaim_space() {
            Ok((before, after)) if after < before => tracing::info!(
                before,
                after,
                secs = started.elapsed().as_secs_f64(),
                "relay store rewritten without the compacted log entries"
            ),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e,
                "cannot free the disk compacted log entries take; the next pass tries again"),
        }
    }
}

/// Compacts every account's log and purges its old tombstones now and every `every` (see
/// `relay.keep_log_days`, `relay.tombstone_days`), until `shutdown`. Does nothing when neither
/// is set.
async fn compact_logs(
    compactor: Compactor,
    every: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    if compactor.retention == LogRetention::default() && compactor.tombstone_ms == 0 {
        return;
    }
    let compactor = Arc::new(compactor);
    loop {
        let (pass, stopped) = (compactor.clone(), shutdown.clone());
        if let Err(e) = tokio::task::spawn_blocking(move || pass.pass(&stopped)).await {
            tracing::error!(error = %e, "a log compaction pass stopped abnormally");
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Makes a new token signing key whenever the current one is `every` old, until `shutdown`.
async fn rotate_signing_keys(
    accounts: Arc<accounts::Accounts>,
    clock: Arc<dyn Clock>,
    every: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let age = Duration::from_secs(accounts.signing_key_age_s(clock.now_ms()));
        let wait = every.saturating_sub(age);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
        if let Err(e) = accounts.rotate_signing_key(clock.now_ms()) {
            tracing::error!(error = %e, "cannot rotate the token signing key; retrying in a minute");
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
