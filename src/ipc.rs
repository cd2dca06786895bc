//! The local socket apps talk to: JSON-RPC 2.0, one message per line, over a Unix domain socket
//! (mode 0600) in the data directory. Any language with a socket and a JSON parser can use it.
//!
//! Owns: framing (bounded lines), JSON-RPC envelopes, batches, the JSON of each call (a method
//! and its params decoded into a typed `service::api::Request`, its typed answer encoded),
//! per-connection subscriptions and their notifications, `sync` and the daemon's `status`, the
//! connection limit, and the blocking client (typed requests and answers) the CLI uses.
//!
//! Must not touch: the store directly: every method goes through `service::Service`.
//!
//! Windows would serve the same protocol over a named pipe; only the Unix socket is built so far.

use crate::alerts::Alert;
use crate::engine::SyncHandle;
use crate::engine::{SyncReport, SyncStatus};
use crate::service::api::{self, Method};
use crate::service::{ApiError, ChangeEvent, ConflictEvent, Service, Submitted, code};
use futures_util::{SinkExt as _, StreamExt as _};
use serde::Deserialize;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::Path;
use std::sync::Arc;
use tokio::io::AsyncReadExt as _;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::codec::{Framed, LinesCodec, LinesCodecError};

#[derive(Clone)]
pub struct ServerOptions {
    pub max_message_bytes: usize,
    pub max_connections: usize,
    /// The daemon's sync loop, when a relay is configured.
    pub sync: Option<SyncHandle>,
    /// The daemon's alerts, shown by `status`.
    pub alerts: Option<std::sync::Arc<crate::alerting::Monitor>>,
}

/// `status` as the daemon answers it: the service's status, with the sync loop's status and the
/// active alerts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonStatus {
    #[serde(flatten)]
    pub status: api::StatusAnswer,
    /// The daemon's sync status, or the last one it kept when no daemon runs; `None` when this
    /// device does not sync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncStatus>,
    /// The daemon's active alerts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alerts: Option<Vec<Alert>>,
}

/// `sync`'s answer: what the sync did and where the device stands after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Synced {
    pub report: SyncReport,
    /// The failed entries retried first, with `retry_failed`.
    pub retried: Option<Vec<u64>>,
    pub status: SyncStatus,
}

/// A notification's params for a subscriber: the event's own fields plus `subscription`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForSubscription<E> {
    pub subscription: u64,
    #[serde(flatten)]
    pub event: E,
}

/// A change as a subscriber hears of it: the feed's entry, and the record's fields when the
/// subscription asked for them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeNote {
    #[serde(flatten)]
    pub change: ChangeEvent,
    /// The record's fields when the notification was sent (null once deleted); absent unless
    /// the subscription asked for `fields`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fields: Option<Value>,
}

/// What the daemon sends unasked on a connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", content = "params")]
pub enum Notification {
    /// A record changed (after the change is durable).
    #[serde(rename = "change")]
    Change(ForSubscription<ChangeNote>),
    /// A conflict was found or resolved; the filter's `id` matches its `record`.
    #[serde(rename = "conflict")]
    Conflict(ForSubscription<ConflictEvent>),
    /// The subscriber fell so far behind that events were dropped: re-read what it watches.
    #[serde(rename = "lagged")]
    Lagged { subscription: u64, missed: u64 },
    /// While a `sync` call runs: the sync status, each time it changes.
    #[serde(rename = "sync.progress")]
    SyncProgress(Box<SyncStatus>),
}

/// Accepts connections until `shutdown` turns true.
pub async fn serve(
    listener: UnixListener,
    service: Arc<Service>,
    options: ServerOptions,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(options.max_connections));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a socket connection failed");
                        continue;
                    }
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    tokio::spawn(refuse(stream, options.max_connections));
                    continue;
                };
                let service = service.clone();
                let options = options.clone();
                let shutdown = shutdown.clone();
                connections.spawn(async move {
                    let _permit = permit;
                    Connection::new(service, options).run(stream, shutdown).await;
                });
            }
        }
    }
    // Let every connection finish the request it is in, then stop them.
    while connections.join_next().await.is_some() {}
}

async fn refuse(stream: UnixStream, max: usize) {
    let mut framed = Framed::new(stream, LinesCodec::new());
    let err = ApiError::new(
        code::BUSY,
        format!(
            "the daemon already serves {max} connections: close one or raise ipc.max_connections"
        ),
    );
    if framed.send(error_line(Value::Null, &err)).await.is_err() {
        return;
    }
    // Close only once the app has closed its end (or after a short while). Closing at once,
    // with the app's first request unread, makes its write fail (broken pipe) or its read fail
    // (connection reset) before it sees this error.
    let mut stream = framed.into_inner();
    let mut discard = [0u8; 4096];
    let _ = tokio::time::timeout(REFUSED_LINGER, async {
        while matches!(stream.read(&mut discard).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// How long a refused connection stays open for the app to read why.
const REFUSED_LINGER: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a connection still sends what it owes once the daemon is shutting down.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// The most writes one connection has handed to the committer and not yet answered; past it
/// the connection reads no further request until one is answered.
const MAX_WRITES_IN_FLIGHT: usize = 1024;

/// A write handed to the committer: the id to answer, and how to wait for the answer.
type Waiting = (Option<Value>, Submitted);

/// A connection's writes handed to the committer and not yet answered (JSON-RPC lets an app
/// send requests without waiting for the answers): a task awaits each one in the order they
/// were handed over (the committer answers a whole group at once, so the order costs nothing)
/// and sends its reply.
struct Pipeline {
    out: mpsc::Sender<String>,
    /// Writes handed over and not yet answered.
    in_flight: Arc<watch::Sender<usize>>,
    /// The answerer, started with the connection's first write (a connection that only reads
    /// holds no thread).
    answerer: Option<(mpsc::Sender<Waiting>, JoinHandle<()>)>,
}

impl Pipeline {
    fn new(out: mpsc::Sender<String>) -> Self {
        Pipeline {
            out,
            in_flight: Arc::new(watch::Sender::new(0)),
            answerer: None,
        }
    }

    /// Hands a begun write's answer to the answerer; waits while too many are in flight.
    async fn push(&mut self, id: Option<Value>, submitted: Submitted) {
        let (out, in_flight) = (&self.out, &self.in_flight);
        let (waiting, _) = self.answerer.get_or_insert_with(|| {
            let (waiting, mut waiters) = mpsc::channel::<Waiting>(MAX_WRITES_IN_FLIGHT);
            let (out, answered) = (out.clone(), in_flight.clone());
            let task = tokio::spawn(async move {
                // Once the app is gone its answers go nowhere, but every write is still
                // awaited: its change is announced to the other subscribers as it lands.
                let mut gone = false;
                while let Some((id, submitted)) = waiters.recv().await {
                    let result = encode(submitted.await);
                    answered.send_modify(|n| *n = n.saturating_sub(1));
                    if let Some(reply) = reply(id, result).filter(|_| !gone) {
                        gone = out.send(reply).await.is_err();
                    }
                }
            });
            (waiting, task)
        });
        in_flight.send_modify(|n| *n += 1);
        if waiting.send((id, submitted)).await.is_err() {
            // The answerer stopped, which it does only once the connection is over.
            in_flight.send_modify(|n| *n = n.saturating_sub(1));
        }
    }

    /// Waits until every write handed over is answered, so that what comes next sees them.
    async fn drain(&self) {
        let mut count = self.in_flight.subscribe();
        // An error means the sender is gone, which it is not while `self` lives.
        let _ = count.wait_for(|n| *n == 0).await;
    }

    /// Answers what is in flight, then stops.
    async fn finish(self) {
        if let Some((waiting, thread)) = self.answerer {
            drop(waiting);
            let _ = thread.await;
        }
    }
}

struct Connection {
    service: Arc<Service>,
    options: ServerOptions,
    subscriptions: HashMap<u64, JoinHandle<()>>,
    next_subscription: u64,
    /// Subscriptions granted by the line at hand: they start sending once its reply is out, so
    /// that an app reads the answer before the first notification.
    starting: Vec<oneshot::Sender<()>>,
}

impl Connection {
    fn new(service: Arc<Service>, options: ServerOptions) -> Self {
        Connection {
            service,
            options,
            subscriptions: HashMap::new(),
            next_subscription: 1,
            starting: Vec::new(),
        }
    }

    async fn run(mut self, stream: UnixStream, mut shutdown: watch::Receiver<bool>) {
        let codec = LinesCodec::new_with_max_length(self.options.max_message_bytes);
        let (mut sink, mut lines) = Framed::new(stream, codec).split();
        let (out, mut outbox) = mpsc::channel::<String>(1024);
        let mut pipeline = Pipeline::new(out.clone());
        // Lines queued behind the one at hand go out in the same write (a burst of
        // notifications is one syscall, not one each); each is flushed before the writer waits.
        let writer = tokio::spawn(async move {
            while let Some(line) = outbox.recv().await {
                let mut written = sink.feed(line).await;
                while written.is_ok()
                    && let Ok(more) = outbox.try_recv()
                {
                    written = sink.feed(more).await;
                }
                if written.is_err() || sink.flush().await.is_err() {
                    break;
                }
            }
        });
        // After a decode error the framed stream yields `None` once, then reads on.
        let mut resume_after_error = false;
        loop {
            let line = tokio::select! {
                _ = shutdown.changed() => break,
                line = lines.next() => line,
            };
            let reply = match line {
                None if std::mem::take(&mut resume_after_error) => continue,
                None => break,
                // A client that stops reading can hold a line's handling back (its answers fill
                // the outbox): shutting down does not wait for it.
                Some(Ok(line)) => tokio::select! {
                    _ = shutdown.changed() => break,
                    reply = self.handle_line(&line, &out, &mut pipeline) => reply,
                },
                Some(Err(LinesCodecError::MaxLineLengthExceeded)) => {
                    // The codec drops the rest of the line; the connection goes on.
                    resume_after_error = true;
                    Some(error_line(
                        Value::Null,
                        &ApiError::new(
                            code::TOO_LARGE,
                            format!(
                                "message over {} bytes was discarded: split it (for bulk loads, several import calls)",
                                self.options.max_message_bytes
                            ),
                        ),
                    ))
                }
                // A line that is not UTF-8: the codec has consumed it, so the connection goes
                // on, as after a line that is not JSON.
                Some(Err(LinesCodecError::Io(e)))
                    if e.kind() == std::io::ErrorKind::InvalidData =>
                {
                    resume_after_error = true;
                    Some(error_line(
                        Value::Null,
                        &ApiError::new(
                            code::PARSE_ERROR,
                            "a message that is not UTF-8 was discarded: messages must be UTF-8 JSON, one per line",
                        ),
                    ))
                }
                Some(Err(LinesCodecError::Io(e))) => {
                    let err = ApiError::new(
                        code::PARSE_ERROR,
                        format!(
                            "unreadable message ({e}): messages must be UTF-8 JSON, one per line"
                        ),
                    );
                    let _ = out.send(error_line(Value::Null, &err)).await;
                    break;
                }
            };
            if let Some(reply) = reply
                && out.send(reply).await.is_err()
            {
                break;
            }
            for start in self.starting.drain(..) {
                let _ = start.send(());
            }
        }
        for (_, task) in self.subscriptions.drain() {
            task.abort();
        }
        let closing = async {
            pipeline.finish().await;
            drop(out);
            let _ = writer.await;
        };
        if *shutdown.borrow() {
            // The answers still owed go out if the client reads them soon.
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, closing).await;
        } else {
            closing.await;
        }
    }

    /// One line: a request, a notification, or a batch of them. A write (put, patch, delete,
    /// import) on its own is handed to the committer and answered once durable, while the
    /// connection reads on; anything else first waits for the writes before it, so that it
    /// sees them. A batch is answered whole, its writes made durable together.
    async fn handle_line(
        &mut self,
        line: &str,
        out: &mpsc::Sender<String>,
        pipeline: &mut Pipeline,
    ) -> Option<String> {
        match decode_message(line) {
            Message::Empty => None,
            Message::Invalid(reply) => Some(reply.to_string()),
            Message::Single(request) => {
                let (id, call) = match decode_call(request) {
                    Ok(decoded) => decoded,
                    Err(refusal) => return refusal,
                };
                if self.service.can_begin(&call) {
                    for begun in self.service.begin_writes(vec![call]) {
                        match begun {
                            Ok(submitted) => pipeline.push(id.clone(), submitted).await,
                            Err(e) => return reply(id, Err(e)),
                        }
                    }
                    return None;
                }
                pipeline.drain().await;
                let result = self.answer(call, out).await;
                reply(id, result)
            }
            Message::Batch(requests) => {
                pipeline.drain().await;
                // Replies in the order of the requests; consecutive writes wait together.
                let mut replies: Vec<Option<String>> = Vec::with_capacity(requests.len());
                let mut writes = Vec::new();
                for request in requests {
                    let (id, call) = match decode_call(request) {
                        Ok(decoded) => decoded,
                        Err(refusal) => {
                            replies.push(refusal);
                            continue;
                        }
                    };
                    if self.service.can_begin(&call) {
                        writes.push((replies.len(), id, call));
                        replies.push(None);
                        continue;
                    }
                    self.write_together(std::mem::take(&mut writes), &mut replies)
                        .await;
                    let result = self.answer(call, out).await;
                    replies.push(reply(id, result));
                }
                self.write_together(writes, &mut replies).await;
                let replies: Vec<String> = replies.into_iter().flatten().collect();
                (!replies.is_empty()).then(|| format!("[{}]", replies.join(",")))
            }
        }
    }

    /// Hands `writes` to the committer together, waits until they are durable and puts each
    /// one's reply at its place in `replies`.
    async fn write_together(
        &self,
        writes: Vec<(usize, Option<Value>, api::Request)>,
        replies: &mut [Option<String>],
    ) {
        if writes.is_empty() {
            return;
        }
        let (places, calls): (Vec<_>, Vec<_>) = writes
            .into_iter()
            .map(|(place, id, call)| ((place, id), call))
            .unzip();
        let mut results = Vec::with_capacity(places.len());
        for begun in self.service.begin_writes(calls) {
            results.push(encode(match begun {
                Ok(submitted) => submitted.await,
                Err(e) => Err(e),
            }));
        }
        for ((place, id), result) in places.into_iter().zip(results) {
            if let Some(slot) = replies.get_mut(place) {
                *slot = reply(id, result);
            }
        }
    }

    /// Runs one call: the connection's own methods here, the others on the service.
    async fn answer(
        &mut self,
        call: api::Request,
        out: &mpsc::Sender<String>,
    ) -> Result<String, ApiError> {
        match call {
            // A read from record views takes a few microseconds: answered here rather than on
            // a blocking thread, whose handoff would cost more than the read.
            api::Request::Get(p) => encode(self.service.call(p)),
            // So is a plain page of a few views, read in id order.
            api::Request::List(p) if p.is_short_page() => encode(self.service.call(p)),
            api::Request::Subscribe(filter) => encode(self.subscribe(filter, out)),
            api::Request::Unsubscribe(p) => encode(self.unsubscribe(p)),
            api::Request::Sync(p) => encode(self.sync(p, out).await),
            api::Request::Status(p) => {
                let status = self.run_blocking(p).await?;
                if let Some(alerts) = &self.options.alerts {
                    // The full-disk alert says what the store does now, as `storage` does: the
                    // daemon's storage loop would only catch up with it on its next pass.
                    let refused = match status.storage {
                        api::Storage::DiskFull { since_ms } => Some(since_ms),
                        api::Storage::Ok => None,
                    };
                    alerts.observe("", crate::clock::now_ms(), |a, _| a.writes_refused(refused));
                }
                encode(Ok(DaemonStatus {
                    status,
                    sync: self.options.sync.as_ref().map(SyncHandle::status),
                    alerts: self.options.alerts.as_ref().map(|a| a.active("")),
                }))
            }
            api::Request::SyncPause(p) => match self.options.sync.clone() {
                Some(sync) => encode(sync_moved(
                    sync.pause(p.remember).await,
                    api::SyncPaused {
                        paused: true,
                        remembered: p.remember,
                    },
                )),
                // A daemon that does not sync: only a pause for when it does means anything.
                None if !p.remember => Err(ApiError::new(
                    code::UNAVAILABLE,
                    crate::engine::EngineError::NotConfigured.to_string(),
                )),
                None => encode(self.run_blocking(p).await),
            },
            api::Request::SyncResume(p) => match self.options.sync.clone() {
                Some(sync) => encode(sync_moved(
                    sync.resume().await,
                    api::SyncPaused {
                        paused: false,
                        remembered: false,
                    },
                )),
                None => encode(self.run_blocking(p).await),
            },
            api::Request::Retry(p) => {
                let retried = self.run_blocking(p).await;
                if let (Ok(_), Some(sync)) = (&retried, &self.options.sync) {
                    sync.upload_now();
                }
                encode(retried)
            }
            other => {
                let service = self.service.clone();
                let method = other.method();
                let answer = tokio::task::spawn_blocking(move || service.handle(other))
                    .await
                    .unwrap_or_else(|e| {
                        tracing::error!(error = %e, method, "method panicked");
                        Err(internal())
                    });
                encode(answer)
            }
        }
    }

    /// Runs `call` on the service, off the async runtime's threads.
    async fn run_blocking<M: Method + Send + 'static>(&self, call: M) -> Result<M::Answer, ApiError>
    where
        M::Answer: Send,
    {
        let service = self.service.clone();
        tokio::task::spawn_blocking(move || service.call(call))
            .await
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, method = M::NAME, "method panicked");
                Err(internal())
            })
    }

    /// Syncs now and answers when done, sending `sync.progress` notifications meanwhile.
    async fn sync(
        &mut self,
        params: api::SyncParams,
        out: &mpsc::Sender<String>,
    ) -> Result<Synced, ApiError> {
        let Some(sync) = self.options.sync.clone() else {
            return Err(ApiError::new(
                code::UNAVAILABLE,
                crate::engine::EngineError::NotConfigured.to_string(),
            ));
        };
        let retried = if params.retry_failed {
            let all_failed = api::RetryParams {
                ids: None,
                all_failed: true,
            };
            Some(self.run_blocking(all_failed).await?.retried)
        } else {
            None
        };
        let mut progress = sync.watch();
        let wait = sync.sync_now();
        tokio::pin!(wait);
        let report = loop {
            tokio::select! {
                report = &mut wait => break report,
                Ok(()) = progress.changed() => {
                    let status = progress.borrow_and_update().clone();
                    // Progress is a hint: one that cannot be encoded is left out.
                    if let Ok(note) = notification(&Notification::SyncProgress(Box::new(status))) {
                        let _ = out.try_send(note.to_string());
                    }
                }
            }
        };
        match report {
            Ok(report) => Ok(Synced {
                report,
                retried,
                status: sync.status(),
            }),
            Err(failure) => Err(ApiError::new(
                code::SYNC_FAILED,
                format!("sync failed ({}): {}", failure.kind, failure.message),
            )),
        }
    }

    fn subscribe(
        &mut self,
        filter: api::SubscribeParams,
        out: &mpsc::Sender<String>,
    ) -> Result<api::Subscribed, ApiError> {
        let subscription = self.next_subscription;
        // Taken before the feed is read, so that nothing committed meanwhile is missed: what
        // both bring is sent once, by its number.
        let events = self.service.subscribe_events();
        let conflicts = self.service.subscribe_conflicts();
        let bounds = tokio::task::block_in_place(|| self.service.store().feed_bounds())?;
        if let Some(since) = filter.since
            && since > bounds.last
        {
            return Err(ApiError::new(
                code::INVALID_STATE,
                format!(
                    "there is no change {since} in this device's feed (its last is {}): `since` \
                     must be a `seq` this device gave; re-read what you watch, then subscribe \
                     with `since` set to this answer's `seq`",
                    bounds.last
                ),
            ));
        }
        if let Some(since) = filter.since
            && since.saturating_add(1) < bounds.first
        {
            return Err(ApiError::new(
                code::INVALID_STATE,
                format!(
                    "the changes after {since} are no longer kept (the feed starts at {}): \
                     re-read what you watch, then subscribe with `since` set to this answer's `seq`",
                    bounds.first
                ),
            ));
        }
        self.next_subscription += 1;
        let feed = Feed {
            service: self.service.clone(),
            subscription,
            sent: filter.since.unwrap_or(bounds.last),
            filter,
            out: out.clone(),
        };
        let (start, started) = oneshot::channel();
        self.starting.push(start);
        let task = tokio::spawn(feed.run(started, events, conflicts));
        self.subscriptions.insert(subscription, task);
        Ok(api::Subscribed {
            subscription,
            seq: bounds.last,
        })
    }

    fn unsubscribe(&mut self, p: api::UnsubscribeParams) -> Result<api::Unsubscribed, ApiError> {
        match self.subscriptions.remove(&p.subscription) {
            Some(task) => {
                task.abort();
                Ok(api::Unsubscribed {
                    unsubscribed: p.subscription,
                })
            }
            None => Err(ApiError::new(
                code::NOT_FOUND,
                format!("no subscription {} on this connection", p.subscription),
            )),
        }
    }
}

/// `now` once the sync loop took a pause or resume, or the failure it met.
fn sync_moved(
    taken: Result<(), crate::engine::SyncFailure>,
    now: api::SyncPaused,
) -> Result<api::SyncPaused, ApiError> {
    taken
        .map(|()| now)
        .map_err(|failure| ApiError::new(code::UNAVAILABLE, failure.message))
}

/// A request's id and call, or the reply refusing it (none for a notification).
fn decode_call(
    request: Result<Request, Value>,
) -> Result<(Option<Value>, api::Request), Option<String>> {
    let request = request.map_err(|refusal| Some(refusal.to_string()))?;
    match api::Request::decode(&request.method, request.params) {
        Ok(call) => Ok((request.id, call)),
        Err(e) => Err(reply(request.id, Err(e))),
    }
}

/// One subscription's notifications: changes from the store's feed after `sent` (so that an
/// app resuming with `since`, or a subscriber that fell behind the live events, misses none),
/// then the live ones, each once, in feed order; conflicts as they come.
struct Feed {
    service: Arc<Service>,
    subscription: u64,
    filter: api::SubscribeParams,
    /// The feed number of the last change sent or passed over.
    sent: u64,
    out: mpsc::Sender<String>,
}

/// Changes read from the store's feed at a time while catching up.
const FEED_PAGE: usize = 256;

impl Feed {
    async fn run(
        mut self,
        started: oneshot::Receiver<()>,
        mut events: broadcast::Receiver<ChangeEvent>,
        mut conflicts: broadcast::Receiver<ConflictEvent>,
    ) {
        // Dropped unsent only when the connection is going: then nothing is sent anyway.
        let _ = started.await;
        if self.catch_up().await.is_err() {
            return;
        }
        loop {
            let sent = tokio::select! {
                event = events.recv() => match event {
                    Ok(change) if change.seq <= self.sent => Ok(()),
                    Ok(change) => self.live(change).await,
                    // The live events ran ahead: the feed still has what was dropped.
                    Err(broadcast::error::RecvError::Lagged(_)) => self.catch_up().await,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                conflict = conflicts.recv() => match conflict {
                    Ok(event) if !self.filter.admits(&event.collection, &event.record) => Ok(()),
                    Ok(event) => self.send(&Notification::Conflict(ForSubscription {
                        subscription: self.subscription,
                        event,
                    })).await,
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        self.send(&Notification::Lagged {
                            subscription: self.subscription,
                            missed,
                        })
                        .await
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            };
            if sent.is_err() {
                return;
            }
        }
    }

    /// A live change. Changes are announced by whichever task waited for them, so they may come
    /// out of order: one past a gap is sent after what the feed holds in the gap, in order.
    async fn live(&mut self, change: ChangeEvent) -> Result<(), ()> {
        if change.seq > self.sent.saturating_add(1) {
            self.catch_up().await?;
        }
        if change.seq <= self.sent {
            return Ok(());
        }
        self.sent = change.seq;
        self.send_change(change).await
    }

    /// Sends what the feed holds after `sent`; `Err` once the subscriber is gone.
    async fn catch_up(&mut self) -> Result<(), ()> {
        loop {
            let store = self.service.store().clone();
            let after = self.sent;
            let page = match tokio::task::spawn_blocking(move || store.feed_after(after, FEED_PAGE))
                .await
            {
                Ok(Ok(page)) => page,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, subscription = self.subscription, "cannot read the change feed; the subscriber is told it missed changes");
                    return self
                        .send(&Notification::Lagged {
                            subscription: self.subscription,
                            missed: 1,
                        })
                        .await;
                }
                Err(_) => return Err(()),
            };
            let Some(last) = page.last().map(|c| c.seq) else {
                return Ok(());
            };
            for change in page {
                self.send_change(change).await?;
            }
            self.sent = last;
        }
    }

    async fn send_change(&self, change: ChangeEvent) -> Result<(), ()> {
        if !self.filter.admits(&change.collection, &change.id) {
            return Ok(());
        }
        let fields = if self.filter.fields {
            let store = self.service.store().clone();
            let (collection, id) = (change.collection.clone(), change.id.clone());
            let view = tokio::task::spawn_blocking(move || store.get(&collection, &id))
                .await
                .map_err(|_| ())?;
            Some(match view {
                Ok(view) => serde_json::to_value(view.fields).unwrap_or(Value::Null),
                Err(_) => Value::Null,
            })
        } else {
            None
        };
        self.send(&Notification::Change(ForSubscription {
            subscription: self.subscription,
            event: ChangeNote { change, fields },
        }))
        .await
    }

    async fn send(&self, note: &Notification) -> Result<(), ()> {
        let wire = notification(note).unwrap_or_else(|e| missed_one(self.subscription, &e));
        self.out.send(wire.to_string()).await.map_err(|_| ())
    }
}

/// The reply to a request with this id (none for a notification), as its line. The answer is
/// JSON text already, written into the line as it is.
fn reply(id: Option<Value>, result: Result<String, ApiError>) -> Option<String> {
    let id = id?;
    Some(match result {
        Ok(result) => format!(r#"{{"jsonrpc":"2.0","id":{id},"result":{result}}}"#),
        Err(err) => error_line(id, &err),
    })
}

fn internal() -> ApiError {
    ApiError::new(code::INTERNAL, "internal error: see the daemon log")
}

/// An answer as the `result` of a reply: JSON text, serialized straight from the answer (a
/// `Value` in between costs more than the serializing, for a page of records).
fn encode<T: Serialize>(answer: Result<T, ApiError>) -> Result<String, ApiError> {
    serde_json::to_string(&answer?).map_err(encode_failed)
}

fn encode_failed(e: serde_json::Error) -> ApiError {
    ApiError::new(code::INTERNAL, e.to_string())
}

/// Runs one JSON-RPC method with its params on `service` alone, as the socket would (without
/// the methods that need the daemon's connection or sync loop).
pub fn call_json(service: &Service, method: &str, params: Value) -> Result<Value, ApiError> {
    let answer = service.handle(api::Request::decode(method, params)?)?;
    serde_json::to_value(answer).map_err(encode_failed)
}

/// A notification as it goes on the socket.
pub fn notification(note: &Notification) -> Result<Value, serde_json::Error> {
    let mut message = serde_json::to_value(note)?;
    if let Value::Object(map) = &mut message {
        map.insert("jsonrpc".into(), "2.0".into());
    }
    Ok(message)
}

/// What a subscriber gets in place of a notification that could not be encoded: word that it
/// missed one, as when it falls behind, rather than nothing.
fn missed_one(subscription: u64, error: &serde_json::Error) -> Value {
    tracing::error!(%error, subscription, "a notification cannot be encoded; the subscriber is told it missed one");
    json!({ "jsonrpc": "2.0", "method": "lagged",
            "params": { "subscription": subscription, "missed": 1 } })
}

fn error_response(id: Value, err: &ApiError) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "error": { "code": err.code, "message": err.message } })
}

fn error_line(id: Value, err: &ApiError) -> String {
    error_response(id, err).to_string()
}

/// One line from a client, decoded but not yet executed.
#[derive(Debug)]
pub enum Message {
    /// A blank line: ignored.
    Empty,
    /// Unusable as a whole; the value is the error reply to send.
    Invalid(Value),
    /// One request, or the error reply for it.
    Single(Result<Request, Value>),
    /// A batch: a request, or the error reply, per element.
    Batch(Vec<Result<Request, Value>>),
}

/// Decodes one line of the protocol. Pure: no I/O, never panics, whatever the input.
pub fn decode_message(line: &str) -> Message {
    if line.trim().is_empty() {
        return Message::Empty;
    }
    let message: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => {
            let err = ApiError::new(code::PARSE_ERROR, format!("not valid JSON ({e})"));
            return Message::Invalid(error_response(Value::Null, &err));
        }
    };
    let decode = |v| Request::from_value(v).map_err(|(id, err)| error_response(id, &err));
    match message {
        Value::Array(batch) if batch.is_empty() => Message::Invalid(error_response(
            Value::Null,
            &ApiError::new(code::INVALID_REQUEST, "empty batch"),
        )),
        Value::Array(batch) => Message::Batch(batch.into_iter().map(decode).collect()),
        single => Message::Single(decode(single)),
    }
}

#[derive(Debug)]
pub struct Request {
    /// `None` for a notification (no reply is sent).
    pub id: Option<Value>,
    pub method: String,
    pub params: Value,
}

impl Request {
    fn from_value(message: Value) -> Result<Request, (Value, ApiError)> {
        let Value::Object(mut map) = message else {
            return Err((
                Value::Null,
                ApiError::new(code::INVALID_REQUEST, "a request must be a JSON object"),
            ));
        };
        let id = map.remove("id");
        if !matches!(
            id,
            None | Some(Value::Null | Value::Number(_) | Value::String(_))
        ) {
            // JSON-RPC 2.0: when the id cannot be read, the reply's id is null.
            return Err((
                Value::Null,
                ApiError::new(
                    code::INVALID_REQUEST,
                    "`id` must be a number, a string or null",
                ),
            ));
        }
        let reply_id = id.clone().unwrap_or(Value::Null);
        let invalid = |msg: &str| (reply_id.clone(), ApiError::new(code::INVALID_REQUEST, msg));
        if map.get("jsonrpc") != Some(&Value::String("2.0".into())) {
            return Err(invalid("`jsonrpc` must be \"2.0\""));
        }
        let method = match map.remove("method") {
            Some(Value::String(m)) => m,
            _ => return Err(invalid("`method` must be a string")),
        };
        let params = map.remove("params").unwrap_or(Value::Null);
        if !matches!(params, Value::Null | Value::Object(_)) {
            return Err((
                reply_id,
                ApiError::invalid_params("params must be an object with named fields"),
            ));
        }
        if let Some(extra) = map.keys().find(|k| k.as_str() != "jsonrpc") {
            return Err(invalid(&format!("unknown member {extra:?} in the request")));
        }
        Ok(Request { id, method, params })
    }
}

/// A blocking JSON-RPC client over the daemon's socket.
pub struct Client {
    reader: BufReader<StdUnixStream>,
    writer: StdUnixStream,
    next_id: u64,
    /// Notifications that arrived while waiting for a reply.
    pending_notifications: std::collections::VecDeque<Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot talk to the daemon: {0}")]
    Io(#[from] std::io::Error),
    #[error("the daemon sent something that is not JSON-RPC: {0}")]
    Protocol(String),
    #[error(transparent)]
    Api(#[from] ApiError),
}

/// A request line as the client sends it: the typed request's method and params in a JSON-RPC
/// envelope.
pub fn encode_request(id: u64, request: &api::Request) -> Result<String, ClientError> {
    let mut message =
        serde_json::to_value(request).map_err(|e| ClientError::Protocol(e.to_string()))?;
    if let Value::Object(map) = &mut message {
        map.insert("jsonrpc".into(), "2.0".into());
        map.insert("id".into(), id.into());
    }
    Ok(format!("{message}\n"))
}

impl Client {
    pub fn connect(socket: &Path) -> std::io::Result<Client> {
        let stream = StdUnixStream::connect(socket)?;
        Ok(Client {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            next_id: 1,
            pending_notifications: Default::default(),
        })
    }

    /// Calls a method of the local API and reads its typed answer. Notifications that arrive
    /// before it are kept for `next_event`.
    pub fn request<M: Method>(&mut self, params: M) -> Result<M::Answer, ClientError> {
        self.held(params.into())
    }

    /// `status` with what only the daemon knows: its sync and alerts.
    pub fn status(&mut self) -> Result<DaemonStatus, ClientError> {
        self.held(api::StatusParams {}.into())
    }

    /// Syncs now, handing each `sync.progress` notification to `on_progress`.
    pub fn sync(
        &mut self,
        params: api::SyncParams,
        mut on_progress: impl FnMut(SyncStatus),
    ) -> Result<Synced, ClientError> {
        let mut unread = Ok(());
        let result = self.typed_exchange(params.into(), |note| {
            match serde_json::from_value(note) {
                Ok(Notification::SyncProgress(status)) => on_progress(*status),
                // Another subscription's news on this connection is not the sync's.
                Ok(_) => {}
                Err(e) => unread = Err(ClientError::Protocol(e.to_string())),
            }
        })?;
        unread.map(|()| result)
    }

    /// A typed exchange whose notifications are kept for `next_event`.
    fn held<A: DeserializeOwned>(&mut self, request: api::Request) -> Result<A, ClientError> {
        let mut held = std::mem::take(&mut self.pending_notifications);
        let result = self.typed_exchange(request, |n| held.push_back(n));
        self.pending_notifications = held;
        result
    }

    fn typed_exchange<A: DeserializeOwned>(
        &mut self,
        request: api::Request,
        on_notification: impl FnMut(Value),
    ) -> Result<A, ClientError> {
        let line = encode_request(self.next_id, &request)?;
        let unreadable = |e: serde_json::Error| {
            ClientError::Protocol(format!(
                "the answer to {} does not read: {e}",
                request.method()
            ))
        };
        // The reply's text is read straight into the answer: through a `Value` first, every
        // field of a page of records would be built as a tree and (records' fields being
        // passed on as text) written out again.
        self.exchange(line, on_notification, Answered::<A>::of, |result| {
            serde_json::from_str(result.get()).map_err(unreadable)
        })
    }

    /// Calls `method` with JSON params and gives the JSON result: for a socket that speaks
    /// another set of methods (the relay's operator socket), or to test the wire itself.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, ClientError> {
        let request =
            json!({ "jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params });
        let mut held = std::mem::take(&mut self.pending_notifications);
        let protocol = |e: serde_json::Error| ClientError::Protocol(e.to_string());
        let result = self.exchange(
            format!("{request}\n"),
            |n| held.push_back(n),
            |_, _| None,
            |result| serde_json::from_str(result.get()).map_err(protocol),
        );
        self.pending_notifications = held;
        result
    }

    /// Sends one request line (with id `next_id`) and waits for its reply's result, handing
    /// notifications that arrive first to `on_notification`. `at_once` may read a line whole
    /// as the reply with this id and its result (one pass over a page of records); a line it
    /// does not take is read member by member, its result by `read`.
    fn exchange<T>(
        &mut self,
        line: String,
        mut on_notification: impl FnMut(Value),
        at_once: impl Fn(&str, u64) -> Option<T>,
        read: impl Fn(&RawValue) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        self.writer.write_all(line.as_bytes())?;
        let protocol = |e: serde_json::Error| ClientError::Protocol(e.to_string());
        loop {
            let text = self.read_line()?;
            if let Some(answer) = at_once(&text, id) {
                return Ok(answer);
            }
            let message: Envelope<'_> = serde_json::from_str(&text).map_err(protocol)?;
            if message.method.is_given() {
                on_notification(serde_json::from_str(&text).map_err(protocol)?);
                continue;
            }
            let given_id = match message.id {
                Member::Given(raw) => {
                    Some(serde_json::from_str::<Value>(raw.get()).map_err(protocol)?)
                }
                Member::Absent => None,
            };
            // An error with id null answers whatever was sent last: the daemon could not tie it
            // to a request (unreadable message, or the connection was refused).
            let for_us = given_id == Some(json!(id))
                || (given_id == Some(Value::Null) && message.error.is_given());
            if !for_us {
                return Err(ClientError::Protocol(format!(
                    "reply to another request: {}",
                    text.trim_end()
                )));
            }
            if let Member::Given(error) = message.error {
                let err: ApiError = serde_json::from_str(error.get()).map_err(protocol)?;
                return Err(ClientError::Api(err));
            }
            return match message.result {
                Member::Given(result) => read(result),
                Member::Absent => Err(ClientError::Protocol(format!(
                    "reply without result: {}",
                    text.trim_end()
                ))),
            };
        }
    }

    /// The next notification (method + params), waiting for it.
    pub fn next_notification(&mut self) -> Result<Value, ClientError> {
        if let Some(n) = self.pending_notifications.pop_front() {
            return Ok(n);
        }
        loop {
            let message = self.read_message()?;
            if message.get("method").is_some() {
                return Ok(message);
            }
        }
    }

    /// `next_notification`, typed.
    pub fn next_event(&mut self) -> Result<Notification, ClientError> {
        let note = self.next_notification()?;
        serde_json::from_value(note).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    pub fn set_read_timeout(&self, timeout: Option<std::time::Duration>) -> std::io::Result<()> {
        self.writer.set_read_timeout(timeout)
    }

    fn read_message(&mut self) -> Result<Value, ClientError> {
        let line = self.read_line()?;
        serde_json::from_str(&line).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    fn read_line(&mut self) -> Result<String, ClientError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(ClientError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the daemon closed the connection",
            )));
        }
        Ok(line)
    }
}

/// A message from the daemon with its members left as text: a reply's result is read once,
/// into the answer's own type.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(default, borrow)]
    method: Member<'a>,
    #[serde(default, borrow)]
    id: Member<'a>,
    #[serde(default, borrow)]
    result: Member<'a>,
    #[serde(default, borrow)]
    error: Member<'a>,
}

/// A reply read in one pass, its result straight into the answer `A`.
#[derive(Deserialize)]
#[serde(bound(deserialize = "A: Deserialize<'de>"))]
struct Answered<'a, A> {
    #[serde(default, borrow)]
    method: Member<'a>,
    #[serde(default, borrow)]
    id: Member<'a>,
    result: Option<A>,
    #[serde(default, borrow)]
    error: Member<'a>,
}

impl<A: DeserializeOwned> Answered<'_, A> {
    /// The answer `text` carries when it is the reply with this `id` and a result that reads;
    /// `None` for any other line (a notification, an error, another id, a line or result that
    /// does not read), which `Client::exchange` then reads member by member to tell which.
    fn of(text: &str, id: u64) -> Option<A> {
        let answered: Answered<'_, A> = serde_json::from_str(text).ok()?;
        let ours = matches!(answered.id, Member::Given(raw) if raw.get().parse() == Ok(id));
        let plain = !answered.method.is_given() && !answered.error.is_given();
        answered.result.filter(|_| ours && plain)
    }
}

/// A member of a message, present (even as `null`, which `Option` would take for absent) or not.
#[derive(Default)]
enum Member<'a> {
    #[default]
    Absent,
    Given(&'a RawValue),
}

impl Member<'_> {
    fn is_given(&self) -> bool {
        matches!(self, Member::Given(_))
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Member<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        <&'a RawValue>::deserialize(deserializer).map(Member::Given)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only the plain reply to the request is read in one pass; every other line is left to the
    /// member-by-member reading, which tells notifications, errors and strangers apart.
    #[test]
    fn only_the_plain_reply_with_our_id_is_read_in_one_pass() {
        #[derive(Deserialize, Debug, PartialEq)]
        struct Answer {
            n: u64,
        }
        let of = |line: &str| Answered::<Answer>::of(line, 7);
        assert_eq!(
            of(r#"{"jsonrpc":"2.0","id":7,"result":{"n":1}}"#),
            Some(Answer { n: 1 })
        );
        for other in [
            r#"{"jsonrpc":"2.0","id":8,"result":{"n":1}}"#,
            r#"{"jsonrpc":"2.0","id":"7","result":{"n":1}}"#,
            r#"{"jsonrpc":"2.0","id":7,"result":{"m":1}}"#,
            r#"{"jsonrpc":"2.0","id":7,"error":{"code":-32001,"message":"gone"}}"#,
            r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"?"}}"#,
            r#"{"jsonrpc":"2.0","method":"change","params":{"n":1}}"#,
            r#"{"jsonrpc":"2.0","id":7}"#,
            "not json",
        ] {
            assert_eq!(of(other), None, "{other} was taken as the answer");
        }
    }

    /// A reply read as text still tells a member given as `null` (an error no request could
    /// be tied to; a result that is null) from one absent, as the `Value` it was read into did.
    #[test]
    fn a_reply_read_as_text_tells_a_null_member_from_an_absent_one() {
        let given = |m: &Member<'_>| match m {
            Member::Given(raw) => Some(raw.get().to_owned()),
            Member::Absent => None,
        };
        let text = r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"x"}}"#;
        let e: Envelope<'_> = serde_json::from_str(text).unwrap();
        assert_eq!(given(&e.id).as_deref(), Some("null"));
        assert!(e.error.is_given() && !e.result.is_given() && !e.method.is_given());
        let e: Envelope<'_> = serde_json::from_str(r#"{"id":3,"result":null}"#).unwrap();
        assert_eq!(given(&e.id).as_deref(), Some("3"));
        assert_eq!(given(&e.result).as_deref(), Some("null"));
        let e: Envelope<'_> = serde_json::from_str(r#"{"method":"lagged","params":{}}"#).unwrap();
        assert!(e.method.is_given() && !e.id.is_given());
    }

    #[test]
    fn notifications_carry_the_event_beside_the_subscription() {
        let note = Notification::Lagged {
            subscription: 3,
            missed: 7,
        };
        let wire = notification(&note).unwrap();
        assert_eq!(
            wire,
            json!({ "jsonrpc": "2.0", "method": "lagged",
                    "params": { "subscription": 3, "missed": 7 } })
        );
        assert_eq!(serde_json::from_value::<Notification>(wire).unwrap(), note);
    }
}
