//! The device's sync loop. It connects to the relay, drives a [`DeviceSession`] over the
//! connection (through [`drive`], the loop the relay and the simulation run too),
//! carries out the session's effects against the local service, reconnects with backoff, and
//! publishes a [`SyncStatus`] that `status` and `ferry sync` read.
//!
//! A device may know several relays sharing one database (the same log, accounts and tokens):
//! each connection attempt tries them in turn, from the one used last, at every address each
//! resolves to, and a session that ends hands over to the next relay at once; the backoff
//! applies once every relay failed.
//!
//! The four phases of a sync are tracing spans and SyncLog entries: initialization (connect,
//! TLS, authentication, protocol version, relay time), upload (queue batches in priority order),
//! download (log pages since the cursor, applied and made durable before the cursor moves) and
//! finalization (status, SyncLog, subscribers told).
//!
//! Must not touch: the wire format or what to send when (that is `ferry_proto::session`), the
//! store's layout (that is `store`).

use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use ferry_proto::session::{
    Bootstrap, DeviceEffect, DeviceEvent, DeviceSession, SessionConfig, SessionError,
};
use ferry_proto::wire::{Credential, ErrorCode, ErrorKind, Message, RecordName};
use ferry_proto::{Direction, SyncLogEntry, SyncOutcome};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::alerting::Monitor;
use crate::auth::credentials::{self, TokenFile};
use crate::clock::{deadline_instant, now_ms, sleep_until};
use crate::config::SyncConfig;
use crate::drive::{Io, drive};
use crate::resolve::ConflictStatus;
use crate::service::{Origin, Service};
use crate::store::StoreError;
use crate::store::{BatchLimits, RefusedEntry, RetryPolicy, Store};
use crate::transport::{self, Fingerprint, FrameSender, ServerTrust, TransportError};

mod metrics;
mod status;
pub use metrics::DaemonMetrics;
pub use status::{Behind, ConnectionState, SyncFailure, SyncStatus, relative};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("relay {0:?} is not host:port, or the host does not resolve: {1}")]
    RelayAddress(String, String),
    #[error("sync.fingerprint is not valid: {0}")]
    Fingerprint(String),
    #[error(
        "sync.relay is set but neither sync.fingerprint nor sync.ca_file is: copy the fingerprint \
         `ferry relay` printed into sync.fingerprint"
    )]
    NoTrust,
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot apply the relay's changes: {0}")]
    Apply(#[from] crate::service::ApiError),
    #[error("the sync loop has stopped: the daemon is shutting down")]
    Stopped,
    #[error("sync is not configured: set sync.relay and sync.fingerprint in the config file")]
    NotConfigured,
    #[error("the relay did not let the device in: {0}")]
    Refused(SessionError),
    #[error("registered, but {0}")]
    Credentials(#[from] credentials::CredentialsError),
}

/// The class of a sync failure, as status, logs and the SyncLog show it: the five kinds of the
/// protocol, plus the device's own storage.
pub fn error_kind(error: &EngineError) -> &'static str {
    match error {
        EngineError::Transport(e) => e.kind().as_str(),
        EngineError::Store(_) | EngineError::Apply(_) => "storage",
        EngineError::RelayAddress(..) | EngineError::Fingerprint(_) | EngineError::NoTrust => {
            ErrorKind::Validation.as_str()
        }
        EngineError::Stopped | EngineError::NotConfigured => ErrorKind::Network.as_str(),
        EngineError::Refused(e) => e.kind().as_str(),
        EngineError::Credentials(_) => "storage",
    }
}

/// Everything the sync loop needs from the config, checked.
#[derive(Debug, Clone)]
pub struct SyncSettings {
    /// The relays, in the order given; never empty. All present the same certificate.
    pub relays: Vec<String>,
    pub server_name: String,
    pub trust: ServerTrust,
    pub space: String,
    pub session: SessionConfig,
    pub interval: Duration,
    pub debounce: Duration,
    /// How a queue entry whose upload fails is tried again.
    pub retries: RetryPolicy,
    /// How often a quiet connection is pinged, and how long without an answer means the relay
    /// is gone.
    pub keep_alive: Duration,
    pub idle_timeout: Duration,
    pub congestion: crate::config::Congestion,
    /// TLS sessions kept from one connection for the next (resumed, never with 0-RTT).
    pub sessions: transport::SessionStore,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// A new device bootstraps from the relay's snapshot (`sync.snapshot`).
    pub snapshot: bool,
}

impl SyncSettings {
    /// `None` when sync is off or no relay is named: the device works offline only.
    pub fn from_config(config: &SyncConfig) -> Result<Option<Self>, EngineError> {
        let relays = config.relays();
        if !config.enabled || relays.is_empty() {
            return Ok(None);
        }
        let trust = if !config.fingerprint.is_empty() {
            let pin: Fingerprint =
                config
                    .fingerprint
                    .parse()
                    .map_err(|e: transport::FingerprintParseError| {
                        EngineError::Fingerprint(e.to_string())
                    })?;
            ServerTrust::Pinned(pin)
        } else if !config.ca_file.is_empty() {
            ServerTrust::CaFile(config.ca_file.clone().into())
        } else {
            return Err(EngineError::NoTrust);
        };
        let session = SessionConfig {
            request_timeout_ms: config.request_timeout_ms,
            max_batch_changes: config.batch_changes,
            max_frame_bytes: config.max_frame_bytes,
            max_batch_bytes: (config.max_frame_bytes as usize) / 2,
            max_download_changes: config.download_changes,
            max_snapshot_records: config.snapshot_records,
            ..SessionConfig::default()
        };
        Ok(Some(SyncSettings {
            relays,
            server_name: config.server_name.clone(),
            trust,
            space: config.space.clone(),
            session,
            interval: Duration::from_secs(config.interval_secs),
            debounce: Duration::from_millis(config.debounce_ms),
            retries: RetryPolicy {
                max_retries: config.max_retries,
                backoff_initial_ms: config.backoff_initial_ms,
                backoff_max_ms: config.backoff_max_ms,
            },
            keep_alive: Duration::from_millis(config.keep_alive_ms),
            idle_timeout: Duration::from_millis(config.idle_timeout_ms),
            congestion: config.congestion,
            sessions: transport::session_store(),
            backoff_initial: Duration::from_millis(config.backoff_initial_ms),
            backoff_max: Duration::from_millis(config.backoff_max_ms),
            snapshot: config.snapshot,
        }))
    }

    fn transport_options(&self) -> transport::TransportOptions {
        transport::TransportOptions {
            max_frame_bytes: self.session.max_frame_bytes as usize,
            keep_alive: self.keep_alive,
            idle_timeout: self.idle_timeout,
            congestion: self.congestion,
            ..transport::TransportOptions::default()
        }
    }
}

/// Exponential backoff with full jitter: each wait is random in `[d/2, d]` where `d` doubles
/// from `initial` up to `max`. The random numbers are passed in.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            attempt: 0,
        }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The next wait; `random` is any u64 (uniform).
    pub fn next_wait(&mut self, random: u64) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        let ceiling = self.initial.saturating_mul(factor).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        let spread = ceiling.saturating_sub(half).as_millis() as u64;
        half + Duration::from_millis(random % spread.max(1))
    }
}

impl SyncFailure {
    fn new(kind: &str, message: impl std::fmt::Display) -> Self {
        SyncFailure {
            kind: kind.into(),
            message: message.to_string(),
            at_ms: now_ms(),
        }
    }

    fn stopped() -> Self {
        SyncFailure::new(ErrorKind::Network.as_str(), EngineError::Stopped)
    }

    fn paused() -> Self {
        SyncFailure::new(
            "paused",
            "sync is paused: `ferry sync resume` (or the socket's sync.resume) resumes it",
        )
    }
}

/// What one `ferry sync` achieved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncReport {
    pub uploaded: u64,
    pub downloaded: u64,
    /// Conflicts found in the downloaded changes.
    pub conflicts: u64,
    pub cursor: u64,
    pub relay_head: u64,
    /// Local changes refused during the sync (by the relay, or as too large for any frame),
    /// with why: they are not on the relay.
    pub refused: Vec<RefusedEntry>,
}

enum Command {
    SyncNow {
        reply: oneshot::Sender<Result<SyncReport, SyncFailure>>,
    },
    /// Queue entries became ready to upload outside a write (a retry): upload them now.
    Upload,
    /// Stop syncing (the session ends, no connection is made) until `Resume`; with `remember`,
    /// also after a restart.
    Pause {
        remember: bool,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Resume {
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

/// How an attempt to connect ended.
enum Attempt {
    /// Linked to the relay at this index of `SyncSettings::relays`.
    Linked(usize, Link),
    Failed(EngineError),
    Paused,
    ShuttingDown,
}

/// The daemon's handle on its sync loop.
#[derive(Clone)]
pub struct SyncHandle {
    commands: mpsc::Sender<Command>,
    status: watch::Receiver<SyncStatus>,
    store: Arc<Store>,
}

impl SyncHandle {
    /// The status as of now: the loop's view of the relay, judged against the queue.
    pub fn status(&self) -> SyncStatus {
        let mut status = self.status.borrow().clone();
        judge(&mut status, &self.store);
        status
    }

    /// Status changes, for progress displays (not judged against the queue: see `status`).
    pub fn watch(&self) -> watch::Receiver<SyncStatus> {
        self.status.clone()
    }

    /// Syncs now (connecting at once if offline) and waits until nothing is left to upload and
    /// the device holds what the relay has, or the attempt fails.
    pub async fn sync_now(&self) -> Result<SyncReport, SyncFailure> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::SyncNow { reply })
            .await
            .map_err(|_| SyncFailure::stopped())?;
        answer.await.map_err(|_| SyncFailure::stopped())?
    }

    /// Pauses sync: the session in progress ends and no connection is made until
    /// [`SyncHandle::resume`]; with `remember`, the daemon also starts paused. Local writes go
    /// on and wait in the queue.
    pub async fn pause(&self, remember: bool) -> Result<(), SyncFailure> {
        let (reply, answer) = oneshot::channel();
        self.command(Command::Pause { remember, reply }, answer)
            .await
    }

    /// Resumes a paused sync (and forgets a remembered pause).
    pub async fn resume(&self) -> Result<(), SyncFailure> {
        let (reply, answer) = oneshot::channel();
        self.command(Command::Resume { reply }, answer).await
    }

    async fn command(
        &self,
        command: Command,
        answer: oneshot::Receiver<Result<(), StoreError>>,
    ) -> Result<(), SyncFailure> {
        self.commands
            .send(command)
            .await
            .map_err(|_| SyncFailure::stopped())?;
        answer
            .await
            .map_err(|_| SyncFailure::stopped())?
            .map_err(|e| SyncFailure {
                kind: "storage".into(),
                message: format!("cannot keep the pause in the store: {e}"),
                at_ms: now_ms(),
            })
    }

    /// Starts uploading what the queue holds now, without waiting for the outcome.
    pub fn upload_now(&self) {
        // A full channel already holds a command that will look at the queue.
        let _ = self.commands.try_send(Command::Upload);
    }
}

/// Fills in the queue's side of `status` (see [`SyncStatus::judge`]). The queue's counts are
/// kept in memory, so this reads no storage unless they were never counted.
fn judge(status: &mut SyncStatus, store: &Store) {
    match store.queue_counts() {
        Ok(counts) => status.judge(&counts, store.next_upload_due()),
        Err(e) => {
            tracing::warn!(error = %e, "cannot count the queue for the sync status");
            status.up_to_date = false;
        }
    }
}

fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    // Without OS randomness the waits lose their jitter but stay bounded.
    let _ = getrandom::fill(&mut bytes);
    u64::from_le_bytes(bytes)
}

/// Starts the sync loop; it runs until `shutdown` turns true.
pub fn spawn(
    service: Arc<Service>,
    key: SigningKey,
    tokens: TokenFile,
    settings: SyncSettings,
    metrics: Arc<DaemonMetrics>,
    alerts: Arc<Monitor>,
    shutdown: watch::Receiver<bool>,
) -> (SyncHandle, tokio::task::JoinHandle<()>) {
    let (commands_tx, commands) = mpsc::channel(16);
    let store = service.store().clone();
    let known = store.last_known_sync().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot read the last known sync state");
        None
    });
    let worked = known.as_ref().and_then(|k| k.relay.clone());
    let mut initial = SyncStatus::new(
        status::preferred_relay(&settings.relays, known.as_ref()),
        settings.space.clone(),
        store.sync_cursor().unwrap_or(0),
    );
    initial.relays = settings.relays.clone();
    initial.collections = store.synced_collections();
    // Until the relay says otherwise, what the last run knew of it.
    if let Some(known) = known {
        initial.relay_head = known.relay_head;
        initial.relay_head_at_ms = known.relay_head_at_ms;
        initial.last_sync_ms = known.last_sync_ms;
    }
    initial.disconnected_since_ms = Some(now_ms());
    let paused = store.sync_paused().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot read whether sync was paused; syncing");
        false
    });
    let (status_tx, status) = watch::channel(initial);
    let engine = Engine {
        service,
        key,
        tokens,
        shown: Credential::Key,
        signed_in: false,
        fallback: credentials::Fallback::default(),
        settings,
        commands,
        status: status_tx,
        shutdown,
        waiters: Vec::new(),
        round: Round::default(),
        rounds_finished: 0,
        applied_conflicts: 0,
        showing_refusal: false,
        counted: (0, 0),
        metrics,
        alerts,
        heads_check: HeadsCheck::default(),
        paused,
        worked,
    };
    let task = tokio::spawn(engine.run());
    (
        SyncHandle {
            commands: commands_tx,
            status,
            store,
        },
        task,
    )
}

/// What happened since the last finalization.
#[derive(Default)]
struct Round {
    uploaded: u64,
    downloaded: u64,
    /// Conflicts found applying the downloaded changes.
    conflicts: u64,
    /// Local changes refused.
    refused: Vec<RefusedEntry>,
    started: Option<Instant>,
}

struct Engine {
    service: Arc<Service>,
    key: SigningKey,
    /// The tokens the relay issued to this device, kept for the next connection.
    tokens: TokenFile,
    /// What the current session showed the relay, whether it let the device in, and when to
    /// give up on the tokens.
    shown: Credential,
    signed_in: bool,
    fallback: credentials::Fallback,
    settings: SyncSettings,
    commands: mpsc::Receiver<Command>,
    status: watch::Sender<SyncStatus>,
    shutdown: watch::Receiver<bool>,
    waiters: Vec<oneshot::Sender<Result<SyncReport, SyncFailure>>>,
    round: Round,
    /// Rounds that ended with nothing left to do, since the daemon started.
    rounds_finished: u64,
    /// Conflicts found by the last `Apply`, for its SyncLog entry.
    applied_conflicts: u64,
    /// `last_error` is a refused change's.
    showing_refusal: bool,
    /// The current connection's byte counts already added to the status.
    counted: (u64, u64),
    metrics: Arc<DaemonMetrics>,
    alerts: Arc<Monitor>,
    heads_check: HeadsCheck,
    /// Sync is paused: no session runs.
    paused: bool,
    /// The relay that last let this device in, tried first at the next start.
    worked: Option<String>,
}

/// Records compared per heads check: each check digests the next page of the space.
const HEADS_CHECK_RECORDS: u32 = 1000;

/// Where the comparison of this device's record heads with the relay's is.
#[derive(Default)]
struct HeadsCheck {
    /// The next check starts after this record (`None`: from the first).
    after: Option<RecordName>,
    last_sent: Option<Instant>,
    /// A sync reached `Idle` since the last check was sent.
    due: bool,
    /// Every page of the current pass over the space agreed so far: only a whole pass that
    /// agrees clears the alert, not one page that does.
    pass_agrees: bool,
}

impl HeadsCheck {
    /// When a due check waiting out its interval may be sent.
    fn wake_at(&self, every: Duration) -> Option<tokio::time::Instant> {
        let last = self.last_sent.filter(|_| self.due)?;
        Some(tokio::time::Instant::from_std(last + every))
    }
}

/// A connection to the relay with its session stream: the sender, and the frames received.
type Link = (
    quinn::Endpoint,
    quinn::Connection,
    FrameSender,
    transport::Received,
);

impl Engine {
    async fn run(mut self) {
        transport::install_crypto_provider();
        let mut backoff = Backoff::new(self.settings.backoff_initial, self.settings.backoff_max);
        // Sessions that ended without finishing a round since the last wait: each hands over to
        // the next relay at once, and once every relay had its turn the backoff applies.
        let mut sessions_lost = 0;
        while !*self.shutdown.borrow() {
            if self.paused {
                if !self.wait_while_paused().await {
                    break;
                }
                backoff.reset();
                continue;
            }
            self.status.send_modify(|s| {
                s.state = ConnectionState::Connecting;
                s.next_attempt_ms = None;
            });
            match self.attempt_connection().await {
                Attempt::ShuttingDown => break,
                Attempt::Paused => continue,
                Attempt::Linked(index, (endpoint, connection, sender, receiver)) => {
                    self.linked(index, &connection);
                    // Only a session that got its work done resets the backoff: one that signs
                    // in and then fails every time must not reconnect at full speed.
                    let rounds = self.rounds_finished;
                    self.run_session(&connection, sender, receiver).await;
                    if self.rounds_finished > rounds {
                        backoff.reset();
                        sessions_lost = 0;
                    }
                    connection.close(0u32.into(), b"session over");
                    self.count_bytes(&connection);
                    self.counted = Default::default();
                    self.disconnected();
                    endpoint.wait_idle().await;
                    if *self.shutdown.borrow() {
                        break;
                    }
                    if self.paused {
                        continue;
                    }
                    // The relay may be gone: the next attempt starts with the next one.
                    let relays = self.settings.relays.len();
                    self.set_relay((index + 1) % relays);
                    sessions_lost += 1;
                    if sessions_lost < relays {
                        continue;
                    }
                }
                Attempt::Failed(e) => {
                    self.disconnected();
                    self.failed(&e, Direction::Initialization);
                }
            }
            sessions_lost = 0;
            if !self.paused && !self.wait_before_retry(&mut backoff).await {
                break;
            }
        }
        self.stopped();
    }

    /// Takes a pause or a resume once what is remembered of it is durable (a pause or resume
    /// that cannot be kept changes nothing). The caller answers.
    fn set_paused(&mut self, paused: bool, remember: bool) -> Result<(), StoreError> {
        if remember || !paused {
            let store = self.service.store();
            tokio::task::block_in_place(|| store.remember_sync_paused(paused))?;
        }
        self.paused = paused;
        if paused {
            self.fail_waiters(&SyncFailure::paused());
        }
        Ok(())
    }

    /// Takes a pause or a resume and answers it.
    fn pause_or_resume(
        &mut self,
        paused: bool,
        remember: bool,
        reply: oneshot::Sender<Result<(), StoreError>>,
    ) {
        let _ = reply.send(self.set_paused(paused, remember));
    }

    /// While paused: answers commands until a resume (true) or the daemon shuts down (false).
    async fn wait_while_paused(&mut self) -> bool {
        self.status.send_modify(|s| {
            s.state = ConnectionState::Paused;
            s.syncing = false;
            s.next_attempt_ms = None;
        });
        self.save_last_known();
        while self.paused {
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(Command::SyncNow { reply }) => {
                        let _ = reply.send(Err(SyncFailure::paused()));
                    }
                    Some(Command::Upload) => {}
                    Some(Command::Pause { remember, reply }) => self.pause_or_resume(true, remember, reply),
                    Some(Command::Resume { reply }) => self.pause_or_resume(false, false, reply),
                    None => return false,
                },
                _ = self.shutdown.changed() => return false,
            }
        }
        true
    }

    fn stopped(&mut self) {
        self.status.send_modify(|s| {
            s.state = ConnectionState::Stopped;
            s.syncing = false;
        });
        self.save_last_known();
        self.fail_waiters(&SyncFailure::stopped());
    }

    /// The relay at `index` is the one to try first from now on.
    fn set_relay(&mut self, index: usize) {
        if let Some(relay) = self.settings.relays.get(index) {
            self.status.send_modify(|s| s.relay.clone_from(relay));
        }
    }

    /// Connected to the relay at `index`: status names it (and the address it resolved to).
    fn linked(&mut self, index: usize, connection: &quinn::Connection) {
        self.set_relay(index);
        let addr = connection.remote_address().to_string();
        tracing::info!(relay = %self.status.borrow().relay, %addr, "connected to a relay");
        self.status.send_modify(|s| s.relay_addr = Some(addr));
    }

    /// No session is open any more (or none could be opened).
    fn disconnected(&mut self) {
        self.status.send_modify(|s| {
            s.state = ConnectionState::Connecting;
            s.syncing = false;
            s.relay_addr = None;
            s.disconnected_since_ms.get_or_insert_with(now_ms);
        });
        self.save_last_known();
    }

    /// Keeps the status in the store for `ferry status` while no daemon runs. It lands with the
    /// store's next flush; losing the latest copy in a crash loses nothing but that view.
    fn save_last_known(&self) {
        let known = self.status.borrow().to_last_known(self.worked.as_deref());
        if let Err(e) = self.service.store().save_last_known_sync(&known) {
            tracing::warn!(error = %e, "cannot keep the sync state for `ferry status`");
        }
    }

    /// Waits out the backoff, or less if someone asks to sync or upload now. False when
    /// shutting down.
    async fn wait_before_retry(&mut self, backoff: &mut Backoff) -> bool {
        let wait = backoff.next_wait(random_u64());
        self.status.send_modify(|s| {
            s.state = ConnectionState::Offline;
            s.next_attempt_ms = Some(now_ms() + wait.as_millis() as u64);
        });
        tokio::select! {
            _ = tokio::time::sleep(wait) => true,
            command = self.commands.recv() => match command {
                Some(Command::SyncNow { reply }) => {
                    self.waiters.push(reply);
                    true
                }
                Some(Command::Upload) => true,
                Some(Command::Pause { remember, reply }) => {
                    self.pause_or_resume(true, remember, reply);
                    true
                }
                Some(Command::Resume { reply }) => {
                    self.pause_or_resume(false, false, reply);
                    true
                }
                None => false,
            },
            _ = self.shutdown.changed() => false,
        }
    }

    /// Connects to the relay; `None` when the daemon shuts down meanwhile. A request to sync
    /// now starts the attempt over: an attempt made while the relay was down waits for QUIC to
    /// send its first packet again (about a second later), and the request usually means the
    /// relay is back.
    async fn attempt_connection(&mut self) -> Attempt {
        loop {
            let first = self.relay_index();
            tokio::select! {
                linked = connect(&self.settings, first) => return match linked {
                    Ok((index, link)) => Attempt::Linked(index, link),
                    Err(e) => Attempt::Failed(e),
                },
                command = self.commands.recv() => match command {
                    Some(Command::SyncNow { reply }) => self.waiters.push(reply),
                    // The session about to open uploads whatever is pending.
                    Some(Command::Upload) => {}
                    Some(Command::Pause { remember, reply }) => {
                        self.pause_or_resume(true, remember, reply);
                        if self.paused {
                            return Attempt::Paused;
                        }
                    }
                    Some(Command::Resume { reply }) => self.pause_or_resume(false, false, reply),
                    None => return Attempt::ShuttingDown,
                },
                _ = self.shutdown.changed() => return Attempt::ShuttingDown,
            }
        }
    }

    /// Where in `SyncSettings::relays` the relay status names is: the one tried first.
    fn relay_index(&self) -> usize {
        let relay = &self.status.borrow().relay;
        self.settings
            .relays
            .iter()
            .position(|r| r == relay)
            .unwrap_or(0)
    }

    /// Drives one session until it closes.
    async fn run_session(
        &mut self,
        connection: &quinn::Connection,
        mut sender: FrameSender,
        mut incoming: transport::Received,
    ) {
        let binding = match transport::channel_binding(connection) {
            Ok(binding) => binding,
            Err(e) => return self.failed(&e.into(), Direction::Initialization),
        };
        let cursor = match self.service.store().sync_cursor() {
            Ok(cursor) => cursor,
            Err(e) => return self.failed(&e.into(), Direction::Initialization),
        };
        let held = self.tokens.load().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "signing in with the device key");
            None
        });
        let (credential, refresh) = credentials::choose(held.as_ref(), now_ms());
        self.shown = credential.clone();
        self.signed_in = false;
        let mut session = DeviceSession::new(
            self.settings.session.clone(),
            self.key.clone(),
            self.settings.space.clone(),
            binding.to_vec(),
            cursor,
            credential,
            refresh,
            now_ms(),
        );
        match self.service.store().session_bootstrap() {
            Ok(bootstrap) => {
                let bootstrap = match bootstrap {
                    Bootstrap::Fresh if !self.settings.snapshot => Bootstrap::Off,
                    bootstrap => bootstrap,
                };
                session.set_bootstrap(bootstrap, self.service.store().has_unique_constraints())
            }
            Err(e) => return self.failed(&e.into(), Direction::Initialization),
        }
        session.set_collections(self.service.store().synced_collections());
        let mut local = self.service.subscribe_events();
        let mut pause_taken = None;
        let mut debounce: Option<tokio::time::Instant> = None;
        let mut interval = tokio::time::interval(self.settings.interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval.reset();
        self.round = Round {
            started: Some(Instant::now()),
            ..Round::default()
        };
        loop {
            self.pump(&mut session, &mut sender, connection).await;
            if session.is_closed() {
                break;
            }
            let deadline = session.poll_timeout().map(deadline_instant);
            let heads_check = self.heads_check.wake_at(self.heads_check_every());
            let retry_due = self.service.store().next_upload_due().map(deadline_instant);
            tokio::select! {
                frame = incoming.recv() => deliver(&mut session, frame),
                // The pump sends the check that was waiting for its interval.
                _ = sleep_until(heads_check) => {}
                event = local.recv() => match event {
                    Ok(event) if event.origin == Origin::Remote => {}
                    // A local write, or so many that some were skipped: upload soon.
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        if self.settings.debounce.is_zero() {
                            session.local_changes();
                        } else {
                            debounce.get_or_insert_with(|| {
                                tokio::time::Instant::now() + self.settings.debounce
                            });
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => session.shut_down(),
                },
                _ = sleep_until(debounce) => {
                    debounce = None;
                    session.local_changes();
                }
                _ = sleep_until(deadline) => session.handle_timeout(now_ms()),
                // An entry waiting out its backoff may go now.
                _ = sleep_until(retry_due) => session.local_changes(),
                _ = interval.tick() => session.sync_now(now_ms()),
                command = self.commands.recv() => match command {
                    Some(Command::SyncNow { reply }) => {
                        self.waiters.push(reply);
                        session.sync_now(now_ms());
                    }
                    Some(Command::Upload) => session.local_changes(),
                    Some(Command::Pause { remember, reply }) => match self.set_paused(true, remember) {
                        // Answered once the session is over, as the pause promises.
                        Ok(()) => {
                            pause_taken = Some(reply);
                            session.shut_down();
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    },
                    Some(Command::Resume { reply }) => self.pause_or_resume(false, false, reply),
                    None => session.shut_down(),
                },
                _ = self.shutdown.changed() => session.shut_down(),
            }
        }
        // Hand back whatever the closed session still holds (a batch it was uploading).
        self.pump(&mut session, &mut sender, connection).await;
        let _ = sender.finish();
        if let Some(reply) = pause_taken {
            let _ = reply.send(Ok(()));
        }
    }

    /// Carries out everything the session has to do, sends what it has to send and reports its
    /// events, until it is quiet; then publishes where the session is.
    async fn pump(
        &mut self,
        session: &mut DeviceSession,
        sender: &mut FrameSender,
        connection: &quinn::Connection,
    ) {
        loop {
            let mut io = Connected {
                engine: self,
                sender,
                connection,
            };
            drive(session, &mut io).await;
            if !self.maybe_check_heads(session) {
                break;
            }
        }
        let (idle, relay_head, open) = (session.is_idle(), session.relay_head(), session.is_open());
        self.status.send_if_modified(|s| {
            let before = (s.syncing, s.relay_head);
            s.syncing = open && !idle;
            if open && relay_head > s.relay_head {
                // A push announced more of the log than has been applied.
                s.relay_head = relay_head;
                s.relay_head_at_ms = Some(now_ms());
            }
            before != (s.syncing, s.relay_head)
        });
    }

    /// Takes in what carrying out one effect did.
    fn carried_out(&mut self, done: CarriedOut) {
        self.round.conflicts += done.conflicts;
        self.applied_conflicts = done.conflicts;
        self.status.send_modify(|s| {
            s.conflicts += done.conflicts;
            s.rejected += done.refused.len() as u64;
        });
        for refused in done.refused {
            self.refused(refused);
        }
    }

    /// A local change was refused: the log, the SyncLog, the status and `ferry sync` hear of it
    /// at once. The rest of the queue goes on.
    fn refused(&mut self, refused: RefusedEntry) {
        tracing::warn!(
            entry = refused.entry,
            record = %format!("{}/{}", refused.collection, refused.record),
            failed = refused.failed,
            error = %refused.error,
            "a local change was refused"
        );
        let message = refused.describe();
        self.log(
            Direction::Upload,
            0,
            SyncOutcome::Failed,
            Some(message.clone()),
        );
        let kind = refused
            .error
            .split_once(": ")
            .map_or(ErrorKind::Validation.as_str(), |(kind, _)| kind);
        let failure = SyncFailure::new(kind, message);
        self.status.send_modify(|s| s.last_error = Some(failure));
        self.showing_refusal = true;
        self.round.refused.push(refused);
    }

    /// After a sync that left nothing to do, asks the relay for the next page of its heads
    /// digest, at most every `alerts.check_interval_secs`. True if a check was sent.
    fn maybe_check_heads(&mut self, session: &mut DeviceSession) -> bool {
        let every = self.heads_check_every();
        let check = &mut self.heads_check;
        if !check.due || check.last_sent.is_some_and(|at| at.elapsed() < every) {
            return false;
        }
        check.due = false;
        let sent = session.check_heads(check.after.clone(), HEADS_CHECK_RECORDS, now_ms());
        if sent {
            check.last_sent = Some(Instant::now());
        }
        sent
    }

    fn heads_check_every(&self) -> Duration {
        Duration::from_secs(self.alerts.config().check_interval_secs)
    }

    /// Compares the relay's digest with this device's over the same records. Only a digest as
    /// of this device's cursor says anything: a relay whose log moved on is checked next time.
    fn compare_heads(
        &mut self,
        head: u64,
        last: Option<RecordName>,
        complete: bool,
        digest: [u8; 32],
    ) {
        let store = self.service.store();
        let cursor = match store.sync_cursor() {
            Ok(cursor) => cursor,
            Err(e) => return tracing::warn!(error = %e, "cannot read the cursor to compare heads"),
        };
        if head != cursor {
            tracing::debug!(
                head,
                cursor,
                "the relay's log moved on: heads compared later"
            );
            self.heads_check.due = true;
            return;
        }
        let until = if complete { None } else { last.as_ref() };
        let after = self.heads_check.after.take();
        let ours = tokio::task::block_in_place(|| store.heads_digest(after.as_ref(), until));
        let matched = match ours {
            Ok((_, ours)) => ours == digest,
            Err(e) => return tracing::warn!(error = %e, "cannot digest this device's heads"),
        };
        let name = |n: &RecordName| format!("{}/{}", n.collection, n.record);
        let range = match (&after, until) {
            (None, None) => "all records".to_string(),
            (a, u) => format!(
                "records {} through {}",
                a.as_ref()
                    .map_or("from the first".into(), |n| format!("after {}", name(n))),
                u.map_or("the last".into(), name)
            ),
        };
        tracing::debug!(matched, %range, cursor, "compared record heads with the relay");
        let check = &mut self.heads_check;
        if after.is_none() {
            check.pass_agrees = true;
        }
        check.pass_agrees &= matched;
        let judged = !matched || (complete && check.pass_agrees);
        check.after = if complete { None } else { last };
        if judged {
            self.alerts.observe("", now_ms(), |a, now| {
                a.heads_compared(matched, &range, now)
            });
        }
    }

    fn count_bytes(&mut self, connection: &quinn::Connection) {
        let stats = connection.stats();
        let (sent, received) = (stats.udp_tx.bytes, stats.udp_rx.bytes);
        let (counted_sent, counted_received) = self.counted;
        self.status.send_modify(|s| {
            s.bytes_sent += sent.saturating_sub(counted_sent);
            s.bytes_received += received.saturating_sub(counted_received);
        });
        self.counted = (sent, received);
    }

    fn on_event(&mut self, event: DeviceEvent, connection: &quinn::Connection) {
        match event {
            DeviceEvent::Authenticated {
                version,
                relay_time_ms,
                relay_head,
            } => {
                self.signed_in = true;
                self.worked = Some(self.status.borrow().relay.clone());
                let skew_ms = relay_time_ms as i64 - now_ms() as i64;
                tracing::info!(version, skew_ms, relay_head, "connected to the relay");
                self.log(Direction::Initialization, 0, SyncOutcome::Success, None);
                self.status.send_modify(|s| {
                    s.state = ConnectionState::Connected;
                    s.relay_head = relay_head;
                    s.relay_head_at_ms = Some(now_ms());
                    s.disconnected_since_ms = None;
                    s.next_attempt_ms = None;
                });
                self.save_last_known();
            }
            DeviceEvent::Uploaded {
                batch,
                stored,
                duplicate,
                rejected,
            } => {
                let _span = tracing::info_span!("sync.upload", batch).entered();
                tracing::debug!(stored, duplicate, rejected, "batch uploaded");
                let done = (stored + duplicate) as u64;
                self.round.uploaded += done;
                self.status.send_modify(|s| s.uploaded += done);
                let (outcome, error) = match rejected {
                    0 => (SyncOutcome::Success, None),
                    n => (
                        SyncOutcome::Partial,
                        Some(format!(
                            "{n} of {} changes refused: see the entries that follow and `ferry \
                             queue --status failed`",
                            n + stored + duplicate
                        )),
                    ),
                };
                self.log(Direction::Upload, done, outcome, error);
            }
            DeviceEvent::Downloaded {
                through,
                relay_head,
                entries,
            } => {
                self.round.downloaded += entries as u64;
                self.status.send_modify(|s| {
                    s.cursor = through;
                    s.relay_head = s.relay_head.max(relay_head);
                    s.relay_head_at_ms = Some(now_ms());
                    s.downloaded += entries as u64;
                });
                let conflicts = std::mem::take(&mut self.applied_conflicts);
                self.log_phase(
                    Direction::Download,
                    entries as u64,
                    SyncOutcome::Success,
                    None,
                    conflicts,
                );
            }
            DeviceEvent::Idle { cursor } => {
                self.count_bytes(connection);
                self.heads_check.due = self.alerts.config().check_consistency;
                self.finalize(cursor)
            }
            DeviceEvent::HeadsDigest {
                head,
                last,
                complete,
                digest,
                ..
            } => self.compare_heads(head, last, complete, digest),
            DeviceEvent::Tokens { tokens } => {
                if let Err(e) = tokio::task::block_in_place(|| self.tokens.save(&tokens)) {
                    // The session goes on; the next connection signs in with the key.
                    tracing::warn!(error = %e, "cannot keep the tokens the relay issued");
                }
            }
            DeviceEvent::Closed { error } => {
                if self
                    .fallback
                    .session_ended(&self.shown, self.signed_in, error.as_ref())
                {
                    tracing::info!(credential = self.shown.name(), error = ?error,
                        "the relay did not take the tokens: the next connection signs in with the key");
                    if let Err(e) = self.tokens.clear() {
                        tracing::warn!(error = %e, "cannot forget the refused tokens");
                    }
                }
                if let Some(error) = error.filter(|e| *e != SessionError::Ended) {
                    let failure = SyncFailure::new(error.kind().as_str(), &error);
                    self.report(failure, Direction::Finalization);
                }
            }
        }
    }

    #[tracing::instrument(name = "sync.finalization", skip(self))]
    fn finalize(&mut self, cursor: u64) {
        let round = std::mem::take(&mut self.round);
        self.rounds_finished += 1;
        let at = now_ms();
        self.status.send_modify(|s| {
            s.cursor = cursor;
            s.syncing = false;
            s.relay_head_at_ms = Some(at);
            if round.downloaded > 0 {
                s.last_conflict_rate = round.conflicts as f64 / round.downloaded as f64;
            }
            s.last_sync_ms = Some(at);
        });
        // A clean round clears a failure of the connection; a refusal stays shown while a
        // refused change waits in the queue for someone to retry it.
        let failed_waiting = self
            .service
            .store()
            .queue_counts()
            .map_or(true, |counts| counts.failed > 0);
        if round.refused.is_empty() && !(self.showing_refusal && failed_waiting) {
            self.showing_refusal = false;
            self.status.send_modify(|s| s.last_error = None);
        }
        self.save_last_known();
        let took = round.started.map_or(Duration::ZERO, |t| t.elapsed());
        self.metrics.round_succeeded(took);
        self.alerts.observe("", at, |a, now| a.round_succeeded(now));
        self.alerts.observe("", at, |a, now| {
            a.changes_applied(round.downloaded, round.conflicts, now)
        });
        match self.service.store().quarantined(0) {
            Ok((count, _)) => self
                .alerts
                .observe("", at, |a, now| a.quarantined(count, now)),
            Err(e) => tracing::warn!(error = %e, "cannot count quarantined log entries"),
        }
        let took_ms = took.as_millis() as u64;
        let (uploaded, downloaded) = (round.uploaded, round.downloaded);
        let worked = uploaded + downloaded > 0 || !round.refused.is_empty();
        if worked {
            tracing::info!(
                uploaded,
                downloaded,
                refused = round.refused.len(),
                cursor,
                took_ms,
                "sync round finished"
            );
        } else {
            tracing::debug!(cursor, took_ms, "sync round finished: nothing to do");
        }
        // A quiet periodic check is not worth an entry; a round that moved anything, or that
        // someone asked for, is.
        if worked || !self.waiters.is_empty() {
            let (outcome, error) = match round.refused.len() {
                0 => (SyncOutcome::Success, None),
                n => (
                    SyncOutcome::Partial,
                    Some(format!("{n} local changes were refused in this round")),
                ),
            };
            self.log_phase(
                Direction::Finalization,
                uploaded + downloaded,
                outcome,
                error,
                round.conflicts,
            );
        }
        let relay_head = self.status.borrow().relay_head;
        let report = SyncReport {
            uploaded,
            downloaded,
            conflicts: round.conflicts,
            cursor,
            relay_head,
            refused: round.refused,
        };
        for waiter in self.waiters.drain(..) {
            let _ = waiter.send(Ok(report.clone()));
        }
    }

    fn failed(&mut self, error: &EngineError, phase: Direction) {
        self.report(SyncFailure::new(error_kind(error), error), phase);
    }

    /// A sync failed: the log, the SyncLog, the status and whoever waits on a sync hear of it.
    fn report(&mut self, failure: SyncFailure, phase: Direction) {
        tracing::warn!(kind = %failure.kind, error = %failure.message, "cannot sync");
        self.metrics.round_failed(&failure.kind);
        self.alerts
            .observe("", failure.at_ms, |a, now| a.round_failed(now));
        self.log(
            phase,
            0,
            SyncOutcome::Failed,
            Some(format!("{}: {}", failure.kind, failure.message)),
        );
        self.status
            .send_modify(|s| s.last_error = Some(failure.clone()));
        self.showing_refusal = false;
        self.fail_waiters(&failure);
    }

    fn fail_waiters(&mut self, failure: &SyncFailure) {
        for waiter in self.waiters.drain(..) {
            let _ = waiter.send(Err(failure.clone()));
        }
    }

    fn log(
        &self,
        direction: Direction,
        records_processed: u64,
        status: SyncOutcome,
        error_message: Option<String>,
    ) {
        self.log_phase(direction, records_processed, status, error_message, 0);
    }

    fn log_phase(
        &self,
        direction: Direction,
        records_processed: u64,
        status: SyncOutcome,
        error_message: Option<String>,
        conflicts: u64,
    ) {
        append_sync_log(
            self.service.store(),
            direction,
            records_processed,
            status,
            error_message,
            conflicts,
        );
    }
}

/// The daemon's side of a live session's output: frames to the relay, effects against the
/// service, events into the status, the SyncLog and whoever waits on a sync.
struct Connected<'a> {
    engine: &'a mut Engine,
    sender: &'a mut FrameSender,
    connection: &'a quinn::Connection,
}

impl Io<DeviceSession> for Connected<'_> {
    type SendError = TransportError;

    async fn transmit(&mut self, message: Message) -> Result<(), TransportError> {
        // A token refresh is no sync work: it must not start the clock of a round.
        if matches!(message, Message::Download { .. }) {
            self.engine.round.started.get_or_insert_with(Instant::now);
        }
        self.sender.send(&message).await
    }

    fn carry_out(&mut self, session: &mut DeviceSession, effect: DeviceEffect) {
        let engine = &mut *self.engine;
        // A round starts when the idle session has something to do again, so its duration
        // leaves out the time spent idle in between.
        engine.round.started.get_or_insert_with(Instant::now);
        let (service, retries) = (&engine.service, &engine.settings.retries);
        let result =
            tokio::task::block_in_place(|| carry_out(service, retries, session, effect, now_ms()));
        match result {
            Ok(done) => engine.carried_out(done),
            Err(e) => {
                engine.failed(&e, Direction::Finalization);
                session.shut_down();
            }
        }
    }

    fn report(&mut self, event: DeviceEvent) -> ControlFlow<()> {
        self.engine.on_event(event, self.connection);
        ControlFlow::Continue(())
    }
}

/// Appends one phase's entry to the device's SyncLog (a failure to is logged, not raised: the
/// SyncLog is a record of sync, not part of it).
fn append_sync_log(
    store: &crate::store::Store,
    direction: Direction,
    records_processed: u64,
    status: SyncOutcome,
    error_message: Option<String>,
    conflicts: u64,
) {
    let entry = SyncLogEntry {
        id: 0,
        timestamp: now_ms(),
        direction,
        records_processed,
        status,
        error_message,
        user_id: None,
        device_id: store.device_id().to_string(),
        conflicts,
    };
    if let Err(e) = store.log_append(entry) {
        tracing::warn!(error = %e, "cannot write the SyncLog entry");
    }
}

/// What carrying out one effect did, beyond what the session hears.
#[derive(Debug, Default)]
pub struct CarriedOut {
    /// Conflicts found applying remote changes.
    pub conflicts: u64,
    /// Local changes refused (by the relay, or before sending as too large for a frame).
    pub refused: Vec<RefusedEntry>,
}

/// Carries out one effect of a device session against the local service, and tells the session
/// it is done. The daemon's loop and the simulation both use it.
pub fn carry_out(
    service: &Service,
    retries: &RetryPolicy,
    session: &mut DeviceSession,
    effect: DeviceEffect,
    now: u64,
) -> Result<CarriedOut, EngineError> {
    let mut done = CarriedOut::default();
    let store = service.store();
    match effect {
        DeviceEffect::LoadUploadBatch {
            max_changes,
            max_bytes,
            max_change_bytes,
        } => {
            let batch = store.next_upload_batch(BatchLimits {
                max_changes: max_changes as usize,
                max_bytes,
                max_change_bytes,
            })?;
            done.refused = batch.refused.iter().map(RefusedEntry::of).collect();
            let changes = batch
                .entries
                .into_iter()
                .map(ferry_proto::SyncQueueEntry::into_upload)
                .collect();
            session.upload(changes, now);
        }
        DeviceEffect::RecordUploadResults { results, .. } => {
            let summary = store.finish_upload(&results, retries)?;
            done.refused = summary.refused;
            session.upload_recorded();
            if summary.written_again > 0 {
                tracing::info!(
                    records = summary.written_again,
                    "edits refused as built on a flattened history written again, to upload"
                );
                session.local_changes();
            }
        }
        DeviceEffect::AbandonUpload {
            entries,
            error,
            kind,
        } => {
            store.abandon_upload(&entries, &error, kind, retries)?;
        }
        DeviceEffect::Apply {
            through,
            entries,
            own,
            ..
        } => {
            let _span = tracing::info_span!(
                "sync.download",
                through,
                entries = entries.len(),
                own = own.len()
            )
            .entered();
            let entries = store.with_own_entries(entries, &own)?;
            let outcome = service.apply_remote(entries, through)?;
            done.conflicts = outcome
                .conflicts
                .iter()
                .filter(|c| c.status != ConflictStatus::Resolved)
                .count() as u64;
            if done.conflicts > 0 {
                tracing::info!(
                    conflicts = done.conflicts,
                    "conflicts found in the relay's changes"
                );
            }
            if !outcome.quarantined.is_empty() {
                log_quarantined(store, &outcome.quarantined);
            }
            session.applied(through, now);
            if outcome.restored > 0 {
                tracing::info!(
                    records = outcome.restored,
                    "purged or flattened records this device had edited written again, to upload"
                );
                session.local_changes();
            }
        }
        DeviceEffect::ApplySnapshot { page } => {
            let _span = tracing::info_span!(
                "sync.snapshot",
                head = page.head,
                records = page.records.len()
            )
            .entered();
            let outcome = service.apply_snapshot_page(page)?;
            session.snapshot_applied(outcome.cursor, now);
            if outcome.restored > 0 {
                tracing::info!(
                    records = outcome.restored,
                    "purged or flattened records this device had edited written again, to upload"
                );
                session.local_changes();
            }
        }
        DeviceEffect::ApplyUniqueIndex { page } => {
            let _span = tracing::info_span!(
                "sync.unique_index",
                head = page.head,
                values = page.values.len()
            )
            .entered();
            let (head, complete) = (page.head, page.complete);
            service.apply_unique_index_page(page)?;
            if complete {
                tracing::info!(head, "bootstrap: the relay's unique-value index taken");
            }
            session.unique_index_applied(now);
        }
    }
    Ok(done)
}

/// Tells the SyncLog (and the log) of relay log entries `apply_remote` set aside.
fn log_quarantined(store: &crate::store::Store, quarantined: &[crate::store::sync::Quarantined]) {
    let listed: Vec<String> = quarantined
        .iter()
        .map(|q| format!("seq {} {}/{}: {}", q.seq, q.collection, q.record, q.reason))
        .collect();
    tracing::warn!(count = quarantined.len(), entries = %listed.join("; "),
        "relay log entries could not be applied: quarantined, the device moves past them");
    let message = format!(
        "{} log entries could not be applied and were quarantined (see `ferry status`): {}",
        quarantined.len(),
        listed.join("; ")
    );
    append_sync_log(
        store,
        Direction::Download,
        quarantined.len() as u64,
        SyncOutcome::Partial,
        Some(message),
        0,
    );
}

/// Registers the device whose data directory is `data_dir` (and whose key is `key`) with the
/// relay `sync` names, in the account `sync.space`, with a one-time enrolment code; keeps the
/// registration and the tokens the relay issues in the data directory for the daemon.
pub async fn register_device(
    data_dir: &std::path::Path,
    key: SigningKey,
    sync: &SyncConfig,
    code: ferry_proto::wire::Secret,
) -> Result<credentials::Registration, EngineError> {
    let settings = SyncSettings::from_config(sync)?.ok_or(EngineError::NotConfigured)?;
    let device = ferry_proto::session::device_id(key.verifying_key().as_bytes());
    let signed_in = sign_in(&settings, key, Credential::Enrol(code)).await?;
    let tokens = signed_in.tokens.clone();
    signed_in.closed().await;
    let tokens = tokens.ok_or_else(|| {
        EngineError::Refused(SessionError::Protocol {
            code: ErrorCode::Malformed,
            message: "the relay registered the device without issuing tokens".into(),
        })
    })?;
    let registration = credentials::Registration {
        relays: settings.relays.clone(),
        server_name: sync.server_name.clone(),
        fingerprint: sync.fingerprint.clone(),
        ca_file: sync.ca_file.clone(),
        account: sync.space.clone(),
        device,
        registered_ms: now_ms(),
    };
    TokenFile::new(data_dir).save(&tokens)?;
    registration.save(data_dir)?;
    Ok(registration)
}

/// Hands the session what the connection's reader produced: a message, or why it stopped.
fn deliver(
    session: &mut DeviceSession,
    frame: Option<Result<ferry_proto::wire::Message, TransportError>>,
) {
    match frame {
        Some(Ok(message)) => session.handle_message(message, now_ms()),
        Some(Err(e)) => session.connection_lost(e.to_string()),
        None => session.connection_lost("the connection's reader stopped".into()),
    }
}

/// A finished sign-in: the tokens the relay issued (none for a still valid access token), and the
/// connection, closed but still telling the relay so.
pub struct SignedIn {
    pub tokens: Option<ferry_proto::wire::Tokens>,
    endpoint: quinn::Endpoint,
}

impl SignedIn {
    /// Waits until the relay has been told the connection is closed (before a process exits).
    pub async fn closed(self) {
        self.endpoint.wait_idle().await;
    }
}

/// Signs in to the relay as the device with `key`, in the account `settings.space`, showing
/// `credential`. Only the handshake is run: nothing syncs.
pub async fn sign_in(
    settings: &SyncSettings,
    key: SigningKey,
    credential: Credential,
) -> Result<SignedIn, EngineError> {
    transport::install_crypto_provider();
    let (_, (endpoint, connection, mut sender, mut incoming)) = connect(settings, 0).await?;
    let binding = transport::channel_binding(&connection)?;
    let mut session = DeviceSession::new(
        settings.session.clone(),
        key,
        settings.space.clone(),
        binding.to_vec(),
        0,
        credential,
        None,
        now_ms(),
    );
    let mut io = SigningIn {
        sender: &mut sender,
        tokens: None,
        signed_in: false,
        refusal: None,
    };
    loop {
        drive(&mut session, &mut io).await;
        if io.signed_in || session.is_closed() {
            break;
        }
        let deadline = session.poll_timeout().map(deadline_instant);
        tokio::select! {
            frame = incoming.recv() => deliver(&mut session, frame),
            _ = sleep_until(deadline) => session.handle_timeout(now_ms()),
        }
    }
    let SigningIn {
        tokens,
        signed_in,
        refusal,
        ..
    } = io;
    let _ = sender.finish();
    connection.close(0u32.into(), b"signed in");
    match (signed_in, refusal) {
        (true, _) => Ok(SignedIn { tokens, endpoint }),
        (false, error) => {
            endpoint.wait_idle().await;
            Err(EngineError::Refused(error.unwrap_or(SessionError::Ended)))
        }
    }
}

/// A sign-in's side of the session's output: frames to the relay, and what the handshake gave.
struct SigningIn<'a> {
    sender: &'a mut FrameSender,
    tokens: Option<ferry_proto::wire::Tokens>,
    signed_in: bool,
    refusal: Option<SessionError>,
}

impl Io<DeviceSession> for SigningIn<'_> {
    type SendError = TransportError;

    async fn transmit(&mut self, message: Message) -> Result<(), TransportError> {
        self.sender.send(&message).await
    }

    /// A session asks for store work only once it is open, and signing in stops there.
    fn carry_out(&mut self, _: &mut DeviceSession, _: DeviceEffect) {}

    fn report(&mut self, event: DeviceEvent) -> ControlFlow<()> {
        match event {
            DeviceEvent::Tokens { tokens } => self.tokens = Some(tokens),
            // Once in, stop: what the open session would do next (upload, download) is not
            // wanted.
            DeviceEvent::Authenticated { .. } => {
                self.signed_in = true;
                return ControlFlow::Break(());
            }
            DeviceEvent::Closed { error } => self.refusal = error,
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

/// Connects to one of the relays, trying each in turn from the one at index `first`: the index
/// of the relay that answered, and the link; the last relay's error when none did.
async fn connect(settings: &SyncSettings, first: usize) -> Result<(usize, Link), EngineError> {
    let count = settings.relays.len();
    let mut last = EngineError::NotConfigured;
    for index in (first..count).chain(0..first.min(count)) {
        let Some(relay) = settings.relays.get(index) else {
            continue;
        };
        match connect_relay(settings, relay).await {
            Ok(link) => return Ok((index, link)),
            Err(e) => {
                if count > 1 {
                    tracing::info!(relay, error = %e, "relay unreachable: trying the next");
                }
                last = e;
            }
        }
    }
    Err(last)
}

/// Connects to `relay` at each address it resolves to in turn, until one answers.
#[tracing::instrument(name = "sync.initialization", skip(settings))]
async fn connect_relay(settings: &SyncSettings, relay: &str) -> Result<Link, EngineError> {
    let mut last = EngineError::RelayAddress(relay.into(), "no address".into());
    for addr in resolve(relay).await? {
        match connect_addr(settings, addr).await {
            Ok(link) => return Ok(link),
            Err(e) => last = e,
        }
    }
    Err(last)
}

async fn connect_addr(settings: &SyncSettings, addr: SocketAddr) -> Result<Link, EngineError> {
    let options = settings.transport_options();
    let endpoint = transport::client_endpoint(addr)?;
    let connecting = transport::connect_resuming(
        &endpoint,
        addr,
        &settings.server_name,
        &settings.trust,
        &options,
        &settings.sessions,
    );
    // Nothing answers for a relay that is down, and QUIC alone would wait out its whole idle
    // timeout; meanwhile `ferry sync` and shutdown would wait too.
    let timeout = Duration::from_millis(settings.session.request_timeout_ms);
    let connection = tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| TransportError::ConnectTimeout { addr })??;
    let (sender, receiver) = transport::open_session(&connection, &options).await?;
    let (incoming, _reader) = receiver.into_channel(16, "relay");
    Ok((endpoint, connection, sender, incoming))
}

async fn resolve(relay: &str) -> Result<Vec<SocketAddr>, EngineError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(relay)
        .await
        .map_err(|e| EngineError::RelayAddress(relay.into(), e.to_string()))?
        .collect();
    if addrs.is_empty() {
        return Err(EngineError::RelayAddress(relay.into(), "no address".into()));
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_ceiling() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let waits: Vec<_> = (0..6).map(|i| b.next_wait(i * 7919)).collect();
        let ceilings = [100, 200, 400, 800, 1000, 1000];
        for (wait, ceiling) in waits.iter().zip(ceilings) {
            let ms = wait.as_millis() as u64;
            assert!(ms >= ceiling / 2 && ms <= ceiling, "{ms} vs {ceiling}");
        }
        b.reset();
        assert!(b.next_wait(u64::MAX) <= Duration::from_millis(100));
    }
}
