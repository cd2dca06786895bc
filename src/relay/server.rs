//! `ferry relay`'s QUIC server: accepts device connections, drives one [`RelaySession`] per
//! connection against the [`RelayStore`] (through `drive`, the loop the daemon and the
//! simulation run too), and fans new log entries out to every live session of the space at once.
//!
//! Bounded everywhere: connections (extra ones get `Overloaded`), frame size (checked before a
//! body is read), upload batch size and download page size (in the session), and per-connection
//! queues (one read in flight, a small channel of decoded frames), and stopping (sessions get
//! `SHUTDOWN_GRACE` to tell their devices, the endpoint `CLOSE_GRACE` to tell peers).
//!
//! With storage other relays share, `follow_storage` brings their commits in: new heads to the
//! spaces' sessions, revocations to the sessions they end, heads polled while it cannot hear.
//!
//! Must not touch: what a session sends when (that is `ferry_proto::session`), the store's layout.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_proto::session::{RelayEffect, RelayEvent, RelaySession, SessionConfig, SessionError};
use ferry_proto::wire::{ChangeOutcome, Credential, ErrorCode, Message};
use tokio::sync::{Semaphore, broadcast, watch};

use super::accounts::{Accounts, Revocation};
use super::activity::{Activity, SyncEvent, SyncKind};
use super::alerts::RelayAlerts;
use super::metrics::{RelayMetrics, RequestKind};
use super::storage::{StorageError, StorageNews};
use super::store::{RelayStore, RelayStoreError};
use crate::clock::{Clock, sleep_until};
use crate::drive::{Io, drive};
use crate::transport::{self, FrameSender, TransportError};

/// Over-limit connections told `Overloaded` at once; more are refused without a handshake.
const MAX_POLITE_REFUSALS: usize = 16;

/// How long a closing session waits for the device to read its last message.
const LINGER: Duration = Duration::from_secs(2);

/// How long sessions have, once the relay is told to stop, to tell their devices and close. A
/// device that does not answer (gone, or behind a lossy link) must not hold the relay, or its
/// data directory, for longer: its session is dropped after this.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(1000);

/// How long the endpoint then has to tell the remaining peers it closed.
const CLOSE_GRACE: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct RelayOptions {
    pub session: SessionConfig,
    pub transport: transport::TransportOptions,
    pub max_connections: usize,
    /// Sign-in attempts (any credential) one address may make per minute.
    pub sign_ins_per_minute: u32,
    /// Of those, attempts with an enrolment code.
    pub enrolments_per_minute: u32,
}

/// Token buckets per client address: each bucket holds up to a minute's worth of attempts and
/// refills continuously. Bounded: past `MAX_TRACKED` addresses, full buckets are forgotten first
/// (they are the same as a new one), then the whole table.
#[derive(Debug)]
pub struct AttemptLimiter {
    per_minute: u32,
    buckets: HashMap<std::net::IpAddr, (f64, u64)>,
}

impl AttemptLimiter {
    const MAX_TRACKED: usize = 65_536;

    pub fn new(per_minute: u32) -> Self {
        AttemptLimiter {
            per_minute,
            buckets: HashMap::new(),
        }
    }

    /// Takes one attempt for `ip` at `now_ms`; false when its bucket is empty.
    pub fn allow(&mut self, ip: std::net::IpAddr, now_ms: u64) -> bool {
        let capacity = f64::from(self.per_minute);
        if self.buckets.len() >= Self::MAX_TRACKED {
            let rate = capacity / 60_000.0;
            self.buckets.retain(|_, (level, at)| {
                *level + now_ms.saturating_sub(*at) as f64 * rate < capacity
            });
            if self.buckets.len() >= Self::MAX_TRACKED {
                self.buckets.clear();
            }
        }
        let (level, at) = self.buckets.entry(ip).or_insert((capacity, now_ms));
        let refilled = now_ms.saturating_sub(*at) as f64 * capacity / 60_000.0;
        *level = (*level + refilled).min(capacity);
        *at = now_ms;
        if *level >= 1.0 {
            *level -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The head of each space's log, watched by that space's sessions; published by sessions that
/// append and by the HTTP API's web actor (`relay::web_actor`), so every write reaches them at once.
#[derive(Default)]
pub struct Spaces {
    heads: Mutex<HashMap<String, watch::Sender<u64>>>,
}

impl Spaces {
    fn sender(&self, space: &str, head: u64) -> watch::Sender<u64> {
        let mut heads = self.heads.lock().unwrap_or_else(|e| e.into_inner());
        heads
            .entry(space.to_string())
            .or_insert_with(|| watch::channel(head).0)
            .clone()
    }

    pub fn subscribe(&self, space: &str, head: u64) -> watch::Receiver<u64> {
        self.sender(space, head).subscribe()
    }

    /// The spaces sessions watch.
    fn watched(&self) -> Vec<String> {
        let heads = self.heads.lock().unwrap_or_else(|e| e.into_inner());
        heads.keys().cloned().collect()
    }

    /// Publishes a head another relay committed, if sessions here watch the space.
    fn moved(&self, space: &str, head: u64) {
        let sender = {
            let heads = self.heads.lock().unwrap_or_else(|e| e.into_inner());
            heads.get(space).cloned()
        };
        if let Some(sender) = sender {
            raise(&sender, head);
        }
    }

    pub fn publish(&self, space: &str, head: u64) {
        raise(&self.sender(space, head), head);
    }
}

/// Moves a space's published head up to `head` (never down: heads arrive out of order).
fn raise(sender: &watch::Sender<u64>, head: u64) {
    sender.send_if_modified(|current| {
        let grew = head > *current;
        *current = (*current).max(head);
        grew
    });
}

/// Who is at the other end of a session, once it has signed in.
#[derive(Debug, Default, Clone)]
pub struct Peer {
    pub device: String,
    pub space: String,
    /// The token family of the session's access token.
    pub family: String,
}

/// Carries out one effect of a relay session against the store and tells the session. Returns
/// the space's new head when changes were appended, for the driver to announce. The server and
/// the simulation both use it.
#[allow(clippy::too_many_arguments)]
pub fn carry_out(
    store: &RelayStore,
    accounts: &Accounts,
    metrics: &RelayMetrics,
    activity: &Activity,
    peer: &mut Peer,
    session: &mut RelaySession,
    effect: RelayEffect,
    max_read_bytes: usize,
    now: u64,
) -> Result<Option<u64>, RelayStoreError> {
    match effect {
        RelayEffect::Authorize {
            device,
            public_key,
            space,
            credential,
        } => {
            let _span = tracing::info_span!("relay.sign_in", %device, %space,
                credential = credential.name())
            .entered();
            match accounts.admit(public_key, &device, &space, &credential, now) {
                Ok(admitted) => {
                    metrics.sign_in("ok");
                    tracing::info!(account = %admitted.account, "device signed in");
                    let head = store.head(&space)?;
                    *peer = Peer {
                        device,
                        space,
                        family: admitted.family,
                    };
                    session.authorized(head, admitted.grant, now);
                }
                Err(denied) => {
                    tracing::warn!(reason = denied.reason(), "sign-in refused");
                    metrics.sign_in(denied.reason());
                    session.refused(denied.code(), denied.to_string());
                }
            }
            Ok(None)
        }
        RelayEffect::Refresh { refresh } => {
            let _span = tracing::info_span!("relay.refresh", device = %peer.device).entered();
            match accounts.refresh(&peer.device, &peer.space, &refresh, now) {
                Ok((family, tokens)) => {
                    peer.family = family;
                    session.refreshed(tokens.access_expires_ms, tokens, now);
                }
                Err(denied) => {
                    tracing::warn!(reason = denied.reason(), "refresh refused");
                    session.refused(denied.code(), denied.to_string());
                }
            }
            Ok(None)
        }
        RelayEffect::Store { batch, changes } => {
            let _span =
                tracing::info_span!("relay.store", batch, changes = changes.len()).entered();
            // A change under an actor no device and not the web actor has is one of a
            // document made elsewhere that this device imports.
            let imported = |actor: &str| {
                !accounts.is_device(actor)
                    && store
                        .web_actor(&peer.space, &super::web_actor::new_actor_id(now))
                        .is_ok_and(|web| web != actor)
            };
            let (results, head) = append_counted(
                store,
                metrics,
                activity,
                (&peer.space, &peer.device),
                &changes,
                &imported,
                now,
            )?;
            session.stored(batch, results, head);
            Ok(Some(head))
        }
        RelayEffect::DigestHeads {
            after,
            max_records,
            collections,
        } => {
            let page = store.heads_digest(
                &peer.space,
                after.as_ref(),
                max_records,
                collections.as_ref(),
            )?;
            session.heads_digest(
                page.head,
                page.records,
                page.last,
                page.complete,
                page.digest,
            );
            Ok(None)
        }
        RelayEffect::ReadSnapshot {
            after,
            max_records,
            collections,
        } => {
            let _span = tracing::info_span!("relay.snapshot", device = %peer.device).entered();
            let page = store.snapshot_page(
                &peer.space,
                after.as_ref(),
                max_records,
                max_read_bytes,
                collections.as_ref(),
            )?;
            session.snapshot_read(page);
            Ok(None)
        }
        RelayEffect::ReadUniqueIndex {
            after,
            max_values,
            collections,
        } => {
            let _span = tracing::info_span!("relay.unique_index", device = %peer.device).entered();
            let page = store.unique_index_page(
                &peer.space,
                after.as_ref(),
                max_values,
                max_read_bytes,
                collections.as_ref(),
            )?;
            session.unique_index_read(page);
            Ok(None)
        }
        RelayEffect::Read {
            since,
            max_changes,
            push,
        } => {
            let started = std::time::Instant::now();
            let slice =
                store.read_since(&peer.space, since, max_changes as usize, max_read_bytes)?;
            let kind = if push {
                RequestKind::Push
            } else {
                RequestKind::Download
            };
            let took = started.elapsed();
            metrics.request(kind, took);
            metrics.log_entries_sent(slice.entries.len() as u64);
            let sync_kind = if push {
                SyncKind::Push
            } else {
                SyncKind::Download
            };
            let mut event = sync_event(&peer.device, sync_kind, now, took);
            event.changes = slice.entries.len() as u64;
            activity.record(&peer.space, event, Some(slice.through));
            session.read(slice);
            Ok(None)
        }
    }
}

/// Appends `changes` from `device` to the space's log (`RelayStore::append_importing`, with
/// `imported` saying which other actors' changes it may log) and counts them:
/// the metrics, and an upload entry in the space's sync log. Returns the answers and the
/// space's head after them. Devices' sessions and the web actor both append through this.
pub fn append_counted(
    store: &RelayStore,
    metrics: &RelayMetrics,
    activity: &Activity,
    (space, device): (&str, &str),
    changes: &[ferry_proto::wire::UploadChange],
    imported: &dyn Fn(&str) -> bool,
    now: u64,
) -> Result<(Vec<ferry_proto::wire::ChangeResult>, u64), RelayStoreError> {
    let started = std::time::Instant::now();
    let conflicts_before = store.conflicts_total(space)?;
    let results = store.append_importing(space, device, changes, imported)?;
    let head = store.head(space)?;
    let took = started.elapsed();
    metrics.request(RequestKind::Upload, took);
    let mut event = sync_event(device, SyncKind::Upload, now, took);
    for result in &results {
        match &result.outcome {
            ChangeOutcome::Stored { .. } => {
                metrics.change_stored();
                event.changes += 1;
            }
            ChangeOutcome::Duplicate { .. } => {
                metrics.change_duplicate();
                event.duplicates += 1;
            }
            ChangeOutcome::Rejected { code, .. } => {
                metrics.change_rejected(*code);
                event.rejected += 1;
            }
        }
    }
    event.conflicts = store
        .conflicts_total(space)?
        .saturating_sub(conflicts_before);
    activity.record(space, event, Some(head));
    Ok((results, head))
}

/// A successful sync log entry for `device`, with nothing counted yet.
fn sync_event(device: &str, kind: SyncKind, now: u64, took: Duration) -> SyncEvent {
    SyncEvent {
        time_ms: now,
        device: device.to_owned(),
        kind,
        changes: 0,
        duplicates: 0,
        rejected: 0,
        conflicts: 0,
        outcome: "ok".into(),
        error: None,
        duration_ms: took.as_secs_f64() * 1e3,
    }
}

/// What the relay's QUIC sessions and its HTTPS API share.
#[derive(Clone)]
pub struct Shared {
    /// The time every part of the relay reads.
    pub clock: Arc<dyn Clock>,
    pub store: Arc<RelayStore>,
    pub accounts: Arc<Accounts>,
    pub metrics: Arc<RelayMetrics>,
    /// Each space's sync log and per-minute totals, for the web interface.
    pub activity: Arc<Activity>,
    pub spaces: Arc<Spaces>,
    pub alerts: Arc<RelayAlerts>,
}

/// Serves until `shutdown` turns true, then tells every device and waits for the sessions.
pub async fn serve(
    endpoint: quinn::Endpoint,
    shared: Shared,
    options: RelayOptions,
    mut shutdown: watch::Receiver<bool>,
) {
    let Shared {
        clock,
        store,
        accounts,
        metrics,
        activity,
        spaces,
        alerts,
    } = shared;
    let limiters = Arc::new(Limiters {
        sign_ins: Mutex::new(AttemptLimiter::new(options.sign_ins_per_minute)),
        enrolments: Mutex::new(AttemptLimiter::new(options.enrolments_per_minute)),
    });
    let slots = Arc::new(Semaphore::new(options.max_connections));
    // Devices over the limit are told so (`Overloaded`) a few at a time; past that they are
    // refused before the TLS handshake, so a flood costs no more than a refusal packet each.
    let refusals = Arc::new(Semaphore::new(MAX_POLITE_REFUSALS));
    let mut sessions = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let permit = match slots.clone().try_acquire_owned() {
                    Ok(permit) => Ok(permit),
                    Err(_) => match refusals.clone().try_acquire_owned() {
                        Ok(refusal) => Err(refusal),
                        Err(_) => {
                            incoming.refuse();
                            continue;
                        }
                    },
                };
                let context = Context {
                    clock: clock.clone(),
                    store: store.clone(),
                    accounts: accounts.clone(),
                    metrics: metrics.clone(),
                    activity: activity.clone(),
                    alerts: alerts.clone(),
                    limiters: limiters.clone(),
                    spaces: spaces.clone(),
                    options: options.clone(),
                    shutdown: shutdown.clone(),
                    closed_cleanly: false,
                };
                sessions.spawn(async move {
                    let remote = incoming.remote_address();
                    let connection = match incoming.await {
                        Ok(connection) => connection,
                        Err(e) => {
                            tracing::debug!(%remote, error = %e, "handshake failed");
                            return;
                        }
                    };
                    match permit {
                        Ok(_permit) => context.run(connection, remote).await,
                        Err(_refusal) => refuse(connection, &context.options).await,
                    }
                });
            }
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
    let drain = async { while sessions.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
        tracing::warn!(
            sessions = sessions.len(),
            "sessions still open {} ms after the relay was told to stop: dropping them",
            SHUTDOWN_GRACE.as_millis()
        );
        sessions.abort_all();
        while sessions.join_next().await.is_some() {}
    }
    endpoint.close(0u32.into(), b"relay stopping");
    if tokio::time::timeout(CLOSE_GRACE, endpoint.wait_idle())
        .await
        .is_err()
    {
        tracing::debug!("peers did not acknowledge the close in time");
    }
}

/// Tells a device over the connection limit to come back later.
async fn refuse(connection: quinn::Connection, options: &RelayOptions) {
    if let Ok(Ok((mut sender, _))) = tokio::time::timeout(
        Duration::from_millis(options.session.handshake_timeout_ms),
        transport::accept_session(&connection, &options.transport),
    )
    .await
    {
        let _ = sender
            .send(&Message::Error {
                code: ErrorCode::Overloaded,
                message: "the relay is at its connection limit: try again later".into(),
            })
            .await;
        let _ = sender.finish();
        let _ = tokio::time::timeout(LINGER, connection.closed()).await;
    }
    connection.close(1u32.into(), b"overloaded");
}

struct Limiters {
    sign_ins: Mutex<AttemptLimiter>,
    enrolments: Mutex<AttemptLimiter>,
}

impl Limiters {
    /// Whether `ip` may make this sign-in attempt now: every attempt counts against the
    /// sign-in limit, enrolments against theirs too.
    fn allow(&self, ip: std::net::IpAddr, credential: &Credential, now: u64) -> bool {
        let lock =
            |m: &Mutex<AttemptLimiter>| m.lock().unwrap_or_else(|e| e.into_inner()).allow(ip, now);
        lock(&self.sign_ins)
            && (!matches!(credential, Credential::Enrol(_)) || lock(&self.enrolments))
    }
}

struct Context {
    clock: Arc<dyn Clock>,
    store: Arc<RelayStore>,
    accounts: Arc<Accounts>,
    metrics: Arc<RelayMetrics>,
    activity: Arc<Activity>,
    alerts: Arc<RelayAlerts>,
    limiters: Arc<Limiters>,
    spaces: Arc<Spaces>,
    options: RelayOptions,
    shutdown: watch::Receiver<bool>,
    /// The device ended the session on purpose: its end is not a failure in the sync log.
    closed_cleanly: bool,
}

impl Context {
    #[tracing::instrument(name = "relay.session", skip_all, fields(%remote, device = tracing::field::Empty))]
    async fn run(mut self, connection: quinn::Connection, remote: SocketAddr) {
        let binding = match transport::channel_binding(&connection) {
            Ok(binding) => binding,
            Err(e) => {
                tracing::warn!(error = %e, "no channel binding");
                return;
            }
        };
        let accepted = tokio::time::timeout(
            Duration::from_millis(self.options.session.handshake_timeout_ms),
            transport::accept_session(&connection, &self.options.transport),
        )
        .await;
        let (mut sender, mut receiver) = match accepted {
            Ok(Ok(streams)) => streams,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "no session stream");
                return;
            }
            Err(_) => {
                tracing::debug!("no session stream before the handshake deadline");
                connection.close(2u32.into(), b"handshake timeout");
                return;
            }
        };
        sender.count_into(self.metrics.bytes_sent.clone());
        receiver.count_into(self.metrics.bytes_received.clone());
        // Two decoded frames ahead at most: with the session's own limits (two uploads being
        // stored) a device can make the relay hold only a few frames, whatever it sends.
        let (mut incoming, reader) = receiver.into_channel(2, "device");
        let mut nonce = [0u8; 32];
        if let Err(e) = getrandom::fill(&mut nonce) {
            tracing::error!(error = %e, "no randomness for a challenge nonce");
            return;
        }
        let mut session = RelaySession::new(
            self.options.session.clone(),
            nonce,
            binding.to_vec(),
            self.clock.now_ms(),
        );
        let mut peer = Peer::default();
        let mut head: Option<watch::Receiver<u64>> = None;
        let mut revocations = self.accounts.subscribe_revocations();
        // Counts the device as connected from its sign-in until this function returns.
        let mut connected = None;
        loop {
            let mut io = Serving {
                context: &self,
                peer: &mut peer,
                head: &mut head,
                sender: &mut sender,
                remote,
            };
            drive(&mut session, &mut io).await;
            if connected.is_none() && session.is_open() && !peer.device.is_empty() {
                connected = Some(self.metrics.device_connected());
            }
            if session.is_closed() {
                break;
            }
            let deadline = session.poll_timeout().map(|at| self.clock.deadline(at));
            tokio::select! {
                frame = incoming.recv() => match frame {
                    Some(Ok(message)) => session.handle_message(message, self.clock.now_ms()),
                    Some(Err(TransportError::Frame(e))) => {
                        // The stream can no longer be trusted to be at a frame boundary.
                        let _ = sender.send(&Message::Error { code: e.code(), message: e.to_string() }).await;
                        session.connection_lost(e.to_string());
                    }
                    Some(Err(e)) => {
                        self.closed_cleanly = matches!(e, TransportError::PeerClosed(_));
                        session.connection_lost(e.to_string());
                    }
                    None => session.connection_lost("the reader stopped".into()),
                },
                changed = changed(&mut head) => match changed {
                    Some(new_head) => session.appended(new_head),
                    None => head = None,
                },
                _ = sleep_until(deadline) => session.handle_timeout(self.clock.now_ms()),
                _ = self.shutdown.changed() => session.shut_down(),
                revocation = revocations.recv() => match revocation {
                    Ok(Revocation::Device(device)) if device == peer.device => {
                        session.revoked("this device was revoked by the relay's operator".into());
                    }
                    Ok(Revocation::Family(family)) if family == peer.family => session.revoked(
                        "this session's tokens were revoked (a refresh token was used twice): \
                         sign in again with the device key"
                            .into(),
                    ),
                    Ok(_) => {}
                    // Revocations were missed: check this session's standing directly.
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        if session.is_open() && !self.accounts.still_admitted(&peer.device, &peer.family) {
                            session.revoked("this device's access was revoked".into());
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => {}
                },
            }
        }
        let mut io = Serving {
            context: &self,
            peer: &mut peer,
            head: &mut head,
            sender: &mut sender,
            remote,
        };
        drive(&mut session, &mut io).await;
        let _ = sender.finish();
        // Give the device a moment to read the last message (an error, say) before closing.
        let _ = tokio::time::timeout(LINGER, connection.closed()).await;
        connection.close(0u32.into(), b"session over");
        reader.abort();
    }
}

/// The relay's side of a session's output: frames to the device, effects against the store and
/// the accounts (sign-ins rate limited per address), new heads published to the space's
/// sessions, events into the metrics and the space's sync log.
struct Serving<'a> {
    context: &'a Context,
    peer: &'a mut Peer,
    head: &'a mut Option<watch::Receiver<u64>>,
    sender: &'a mut FrameSender,
    remote: SocketAddr,
}

impl Io<RelaySession> for Serving<'_> {
    type SendError = TransportError;

    async fn transmit(&mut self, message: Message) -> Result<(), TransportError> {
        self.sender.send(&message).await
    }

    fn carry_out(&mut self, session: &mut RelaySession, effect: RelayEffect) {
        let context = self.context;
        let authorizing = matches!(effect, RelayEffect::Authorize { .. });
        if let RelayEffect::Authorize { credential, .. } = &effect
            && !context
                .limiters
                .allow(self.remote.ip(), credential, context.clock.now_ms())
        {
            tracing::warn!(remote = %self.remote, credential = credential.name(), "sign-in rate limited");
            context.metrics.sign_in("rate_limited");
            session.refused(
                ErrorCode::RateLimited,
                "too many sign-in attempts from this address: wait a minute, then try again".into(),
            );
            return;
        }
        let max_read_bytes = (context.options.session.max_frame_bytes as usize) / 2;
        let result = tokio::task::block_in_place(|| {
            carry_out(
                &context.store,
                &context.accounts,
                &context.metrics,
                &context.activity,
                self.peer,
                session,
                effect,
                max_read_bytes,
                context.clock.now_ms(),
            )
        });
        match result {
            Ok(Some(new_head)) => {
                context.spaces.publish(&self.peer.space, new_head);
                tokio::task::block_in_place(|| {
                    context.alerts.appended(&context.store, &self.peer.space)
                });
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, "relay store failed");
                if let RelayStoreError::Storage(StorageError::Damaged { record, .. }) = &e {
                    let record = record.as_ref();
                    context
                        .alerts
                        .damaged(&self.peer.space, record, &e.to_string());
                }
                session.failed(format!("the relay's store failed: {e}"));
            }
        }
        if authorizing && session.is_open() {
            tracing::Span::current().record("device", self.peer.device.as_str());
            let current = context.store.head(&self.peer.space).unwrap_or(0);
            *self.head = Some(context.spaces.subscribe(&self.peer.space, current));
        }
    }

    fn report(&mut self, event: RelayEvent) -> ControlFlow<()> {
        let context = self.context;
        match event {
            // Only the key is proven here: whether the device gets in is logged when its
            // credential is decided ("signed in" or "sign-in refused").
            RelayEvent::Authenticated { device, space } => {
                tracing::debug!(%device, %space, "device proved its key");
            }
            // The relay itself is stopping: a shutdown, not a failure of the session.
            RelayEvent::Closed {
                error:
                    Some(SessionError::Protocol {
                        code: ErrorCode::ShuttingDown,
                        ..
                    }),
            } => {
                tracing::info!("session closed: the relay is shutting down");
                context.metrics.session_ended("shutdown");
            }
            RelayEvent::Closed { error: Some(error) } => {
                tracing::info!(kind = %error.kind(), %error, "session ended");
                context.metrics.session_ended(error.kind().as_str());
                if !self.peer.space.is_empty() && !context.closed_cleanly {
                    let mut event = sync_event(
                        &self.peer.device,
                        SyncKind::Session,
                        context.clock.now_ms(),
                        Duration::ZERO,
                    );
                    event.outcome = error.kind().as_str().to_owned();
                    event.error = Some(error.to_string());
                    context.activity.record(&self.peer.space, event, None);
                }
            }
            RelayEvent::Closed { error: None } => {
                tracing::debug!("session ended");
                context.metrics.session_ended("ok");
            }
        }
        ControlFlow::Continue(())
    }
}

/// The next head of the space, or `None` when there is no subscription (yet) or it ended.
async fn changed(head: &mut Option<watch::Receiver<u64>>) -> Option<u64> {
    match head {
        Some(receiver) => match receiver.changed().await {
            Ok(()) => Some(*receiver.borrow_and_update()),
            Err(_) => None,
        },
        None => std::future::pending().await,
    }
}

/// How often the heads of the spaces sessions watch are read while commits to shared storage
/// cannot be heard.
pub const HEAD_POLL: Duration = Duration::from_secs(1);

/// Carries what relays sharing this relay's storage commit (`LogStorage::follow`) to its
/// sessions: new heads to the spaces' watchers, revocations to the sessions they end. While
/// commits cannot be heard, the watched spaces' heads are read every `HEAD_POLL`, and once
/// more when they are heard again (what was committed meanwhile was missed).
pub async fn follow_storage(
    mut news: tokio::sync::mpsc::UnboundedReceiver<StorageNews>,
    store: Arc<RelayStore>,
    accounts: Arc<Accounts>,
    spaces: Arc<Spaces>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut hearing = false;
    let mut poll = tokio::time::interval(HEAD_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            item = news.recv() => match item {
                None => return,
                Some(StorageNews::Head { space, head }) => spaces.moved(&space, head),
                Some(StorageNews::Device(device)) => {
                    let accounts = accounts.clone();
                    blocking("read a device written elsewhere", move || {
                        accounts.device_written_elsewhere(&device)
                    })
                    .await;
                }
                Some(StorageNews::FamilyRevoked(family)) => {
                    accounts.family_revoked_elsewhere(&family);
                }
                Some(StorageNews::SigningKeys) => {
                    let accounts = accounts.clone();
                    blocking("read the signing keys", move || {
                        accounts.signing_keys_changed_elsewhere()
                    })
                    .await;
                }
                Some(StorageNews::Listening) => {
                    hearing = true;
                    let accounts = accounts.clone();
                    blocking("read the accounts again", move || accounts.reload()).await;
                    read_heads(&store, &spaces).await;
                }
                Some(StorageNews::Deaf) => hearing = false,
            },
            _ = poll.tick(), if !hearing => read_heads(&store, &spaces).await,
            _ = stopped.changed() => return,
        }
    }
}

/// Runs an accounts read off the async workers; a failure is logged (the next news, or the
/// reload when the storage is heard again, reads it anew).
async fn blocking(
    what: &'static str,
    read: impl FnOnce() -> Result<(), super::accounts::AccountError> + Send + 'static,
) {
    match tokio::task::spawn_blocking(read).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot {what}"),
        Err(e) => tracing::error!(error = %e, "cannot {what}"),
    }
}

/// Reads the heads of the spaces sessions watch from storage and publishes them.
async fn read_heads(store: &Arc<RelayStore>, spaces: &Arc<Spaces>) {
    let watched = spaces.watched();
    if watched.is_empty() {
        return;
    }
    let store = store.clone();
    let read = tokio::task::spawn_blocking(move || {
        watched
            .into_iter()
            .filter_map(|space| match store.head(&space) {
                Ok(head) => Some((space, head)),
                Err(e) => {
                    tracing::debug!(space, error = %e, "cannot read the head to poll");
                    None
                }
            })
            .collect::<Vec<_>>()
    })
    .await;
    for (space, head) in read.unwrap_or_default() {
        spaces.moved(&space, head);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_are_limited_per_address_and_refill_over_a_minute() {
        let mut limiter = AttemptLimiter::new(3);
        let a: std::net::IpAddr = [10, 0, 0, 1].into();
        let b: std::net::IpAddr = [10, 0, 0, 2].into();
        assert!((0..3).all(|_| limiter.allow(a, 0)));
        assert!(!limiter.allow(a, 0), "a's bucket is empty");
        assert!(limiter.allow(b, 0), "b has its own");
        assert!(!limiter.allow(a, 19_000), "not a whole attempt back yet");
        assert!(limiter.allow(a, 21_000), "one attempt per 20 s comes back");
        assert!(!limiter.allow(a, 21_000));
    }
}
