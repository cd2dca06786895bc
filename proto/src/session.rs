//! The sync session state machines: one [`DeviceSession`] on a device and one [`RelaySession`] on
//! the relay per connection. They decide what to send, what to store or apply and when a session
//! is over; they never do it themselves.
//!
//! Both are driven the same way: feed them what happened (`handle_message` for a message received,
//! `handle_timeout` with the current time, and the answers to the effects they asked for), then
//! drain `poll_output`: one queue, in the order the session produced them, of messages to send,
//! effects (work for the driver: load an upload batch, record its results, apply or read log
//! entries, store changes) and events (things to report). An effect's answer is expected before
//! the next output is taken: what follows may depend on it. `poll_timeout` says when to call
//! `handle_timeout` next. Every answer to an effect must be given, even after the session closed,
//! so that no queue entry is left behind.
//!
//! Must not touch: sockets, storage, clocks, threads or randomness. Time (`now`, unix
//! milliseconds) and the relay's nonce are arguments, so a whole multi-device run replays exactly.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

pub use crate::wire::IndexPosition;
use crate::wire::{
    COLLECTIONS_VERSION, ChangeOutcome, ChangeResult, Credential, ErrorCode, ErrorKind,
    FLATTEN_VERSION, HEADS_CHECK_VERSION, LogEntry, MAX_CREDENTIAL_BYTES, MIN_PROTOCOL_VERSION,
    Message, OWN_ENTRIES_LEFT_OUT_VERSION, PIPELINED_DOWNLOAD_VERSION, PROTOCOL_VERSION,
    PURGE_VERSION, RecordName, SNAPSHOT_VERSION, Secret, SnapshotPage, Tokens,
    UNIQUE_INDEX_VERSION, UniqueIndexPage, UploadChange, auth_transcript,
};

/// The most collections one `Collections` may name.
pub const MAX_COLLECTIONS: usize = 1000;

/// The longest space name the relay accepts, in bytes.
pub const MAX_SPACE_BYTES: usize = 128;

/// The device id that goes with a public key: hex of its first 16 bytes.
pub fn device_id(public_key: &[u8; 32]) -> String {
    public_key[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Limits and deadlines of a session. The relay announces its own in `Welcome`; a device uses the
/// smaller of its own and the relay's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    /// From connection to `Welcome`.
    pub handshake_timeout_ms: u64,
    /// Longest wait for the answer to an `Upload` or a `Download`.
    pub request_timeout_ms: u64,
    /// Most changes in one `Upload`.
    pub max_batch_changes: u32,
    /// Most bytes of change data a device puts in one `Upload`, well under the frame limit.
    pub max_batch_bytes: usize,
    /// Largest frame either side sends or accepts.
    pub max_frame_bytes: u32,
    /// Most log entries asked for (device) or sent (relay) in one `Changes`.
    pub max_download_changes: u32,
    /// Most records asked for (device) or sent (relay) in one `SnapshotPage`. Larger than a
    /// `Changes` page: a bootstrap pays about a round trip per page, and a page of documents is
    /// still bounded by half a frame.
    pub max_snapshot_records: u32,
    /// Pushes a device holds while it applies earlier changes; beyond this it drops them and
    /// downloads instead, so a slow disk cannot make memory grow.
    pub max_buffered_pushes: usize,
    /// The oldest protocol version the relay lets a device speak: a relay whose log may hold
    /// what older devices cannot read (`FLATTEN_VERSION`'s flattened histories) raises it.
    pub min_device_version: u16,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            handshake_timeout_ms: 10_000,
            request_timeout_ms: 30_000,
            max_batch_changes: 1_000,
            max_batch_bytes: 4 << 20,
            max_frame_bytes: 8 << 20,
            max_download_changes: 2_000,
            max_snapshot_records: 10_000,
            max_buffered_pushes: 64,
            min_device_version: MIN_PROTOCOL_VERSION,
        }
    }
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("the peer ended the session ({code:?}): {message}")]
    Remote { code: ErrorCode, message: String },
    #[error("the peer broke the protocol ({code:?}): {message}")]
    Protocol { code: ErrorCode, message: String },
    #[error("the peer did not answer in time ({0}): check the network, then sync again")]
    Timeout(&'static str),
    #[error("the connection was lost: {0}")]
    ConnectionLost(String),
    #[error("this side ended the session")]
    Ended,
}

impl SessionError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            SessionError::Remote { code, .. } | SessionError::Protocol { code, .. } => code.kind(),
            SessionError::Timeout(_) => ErrorKind::Timeout,
            SessionError::ConnectionLost(_) | SessionError::Ended => ErrorKind::Network,
        }
    }

    /// The words stored in a queue entry's `last_error` and in the SyncLog: kind first.
    pub fn describe(&self) -> String {
        format!("{}: {self}", self.kind())
    }
}

/// One thing a session wants done, in the order it wants them done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output<Effect, Event> {
    /// Send this message to the peer.
    Transmit(Message),
    /// Carry this out and give the session its answer before taking the next output.
    Effect(Effect),
    /// Report this.
    Event(Event),
}

/// What a [`DeviceSession`] puts out.
pub type DeviceOutput = Output<DeviceEffect, DeviceEvent>;

/// What a [`RelaySession`] puts out.
pub type RelayOutput = Output<RelayEffect, RelayEvent>;

/// Work a device session asks its driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceEffect {
    /// Take the next pending queue entries (highest priority first), mark them processing, and
    /// hand them to [`DeviceSession::upload`] (an empty batch means nothing is ready to go).
    /// An entry whose change is over `max_change_bytes` can never be sent: the driver refuses it
    /// on its own (failed, with the reason) instead of putting it in any batch.
    LoadUploadBatch {
        max_changes: u32,
        max_bytes: usize,
        max_change_bytes: usize,
    },
    /// Record the relay's answer for each entry of the batch, durably, then call
    /// [`DeviceSession::upload_recorded`].
    RecordUploadResults {
        batch: u64,
        results: Vec<ChangeResult>,
    },
    /// The batches holding `entries` will get no answer (`kind` says why): put the entries back
    /// (or fail them after too many tries). Sent one batch at a time, so the driver knows which
    /// entries went together.
    AbandonUpload {
        entries: Vec<u64>,
        error: String,
        kind: ErrorKind,
    },
    /// Apply these log entries and advance the download cursor to `through`, durably and in one
    /// step, then call [`DeviceSession::applied`]. `own` are the entries of that span the relay
    /// left out because they are this device's own uploads: each one's seq and queue entry, whose
    /// change is the logged one, to be met in its place like any other entry.
    Apply {
        after: u64,
        through: u64,
        entries: Vec<LogEntry>,
        own: Vec<OwnEntry>,
    },
    /// Take in this page of the relay's snapshot (documents and conflict entries, and the page
    /// noted so that a bootstrap resumes after it), durably and in one step, then call
    /// [`DeviceSession::snapshot_applied`].
    ApplySnapshot { page: SnapshotPage },
    /// Take in this page of the relay's unique-value index (the holders of its values, or its
    /// conflict entries of kind `unique`, and the page noted so that reading resumes after it),
    /// durably and in one step, then call [`DeviceSession::unique_index_applied`].
    ApplyUniqueIndex { page: UniqueIndexPage },
}

/// Whether a device session bootstraps from the relay's snapshot (PROTOCOL.md, section 5.8)
/// instead of reading the log from its cursor, when the relay speaks version 4.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bootstrap {
    /// Never: the log is read from the cursor.
    Off,
    /// When the cursor is 0 and the relay's log is not empty.
    Fresh,
    /// A bootstrap was interrupted: go on after this record (`None`: from the first).
    Resume(Option<RecordName>),
    /// A bootstrap's pages are all in and its unique-value index was being read: go on after
    /// this position (`None`: from the start).
    ResumeIndex(Option<IndexPosition>),
}

/// Where a device session's bootstrap stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Snapshotting {
    No,
    /// Pages are read and applied. The next page is asked for as soon as the previous one
    /// arrives, so that it crosses the link while that one is applied (a round trip per page
    /// would otherwise bound a bootstrap over a slow link); at most
    /// [`SNAPSHOT_PAGES_HELD`] pages are received and not yet applied.
    Reading {
        /// The `Snapshot` out, if any: its answer is due by this time.
        asked: Option<u64>,
        /// `ApplySnapshot` effects whose `snapshot_applied` is still to come.
        applying: usize,
        /// Where the next page starts.
        next: Option<RecordName>,
        /// The last page has arrived.
        complete: bool,
    },
    /// The unique-value index is read, a page at a time: each page is applied before the next
    /// is asked for (they are small, and a bootstrap has many fewer of them).
    Indexing {
        /// The `UniqueIndex` out, if any: its answer is due by this time.
        asked: Option<u64>,
        /// An `ApplyUniqueIndex` effect is out.
        applying: bool,
        /// Where the next page starts.
        next: Option<IndexPosition>,
        /// The last page has arrived.
        complete: bool,
    },
}

/// The most snapshot pages a device holds received and not yet applied: one being applied and
/// one waiting, so memory stays bounded by pages while the link and the store both work.
const SNAPSHOT_PAGES_HELD: usize = 2;

/// A log entry the relay left out of `Changes` because this device uploaded it: where it sits in
/// the log, and the queue entry holding its change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnEntry {
    pub seq: u64,
    pub entry: u64,
}

/// The most log positions of its own uploads a relay session remembers for leaving them out of
/// `Changes` (about 16 bytes each): past it, entries are sent whole.
pub const MAX_OWN_ENTRIES_LEFT_OUT: usize = 100_000;

/// What a device session reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceEvent {
    /// The relay accepted the device: initialization is over.
    Authenticated {
        version: u16,
        relay_time_ms: u64,
        relay_head: u64,
    },
    /// A batch was uploaded and its results recorded.
    Uploaded {
        batch: u64,
        stored: usize,
        duplicate: usize,
        rejected: usize,
    },
    /// Log entries were applied; the cursor is now `through`.
    Downloaded {
        through: u64,
        relay_head: u64,
        entries: usize,
    },
    /// The relay issued new tokens (in `Welcome` or `Refreshed`): keep them for the next
    /// connection; the refresh token they replace is no longer valid.
    Tokens {
        tokens: Tokens,
    },
    /// Nothing to upload and nothing known to download: this device holds everything the relay
    /// had announced, and the relay holds every local change.
    Idle {
        cursor: u64,
    },
    /// The answer to [`DeviceSession::check_heads`]: the relay's digest of a range of records'
    /// logged heads, as of its log's `head` (fields as in `Message::HeadsDigest`).
    HeadsDigest {
        head: u64,
        records: u32,
        last: Option<RecordName>,
        complete: bool,
        digest: [u8; 32],
    },
    Closed {
        error: Option<SessionError>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handshake {
    AwaitChallenge,
    /// The relay chose `version` in its challenge.
    AwaitWelcome {
        version: u16,
    },
    Open,
    Closed,
}

/// How many `Upload`s may wait for their answer at once. Two let the device prepare the next
/// batch while the relay stores the previous one.
pub const MAX_UPLOADS_IN_FLIGHT: usize = 2;

/// From protocol version 4 ([`PIPELINED_DOWNLOAD_VERSION`]): four, so that on a long round trip
/// (a satellite's 600 ms) the batches in flight cover the link's bandwidth-delay product.
pub const MAX_UPLOADS_IN_FLIGHT_PIPELINED: usize = 4;

/// The `Upload`s that may wait for their answer at once under protocol `version`.
pub fn uploads_in_flight(version: u16) -> usize {
    if version >= PIPELINED_DOWNLOAD_VERSION {
        MAX_UPLOADS_IN_FLIGHT_PIPELINED
    } else {
        MAX_UPLOADS_IN_FLIGHT
    }
}

/// An upload waiting for its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SentBatch {
    batch: u64,
    entries: Vec<u64>,
    deadline: u64,
}

/// The upload side of a device session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Upload {
    /// A `LoadUploadBatch` is out.
    loading: bool,
    /// Sent, oldest first; answers come in this order.
    sent: VecDeque<SentBatch>,
    /// Answered, with `RecordUploadResults` out.
    recording: usize,
}

impl Upload {
    fn is_quiet(&self) -> bool {
        !self.loading && self.sent.is_empty() && self.recording == 0
    }

    fn has_room(&self, version: u16) -> bool {
        !self.loading && self.sent.len() + self.recording < uploads_in_flight(version)
    }
}

/// How many `Download`s a device keeps waiting for their answers at once, from protocol
/// version 4 ([`PIPELINED_DOWNLOAD_VERSION`]): with one, an initial sync pays a round trip per
/// page; with several the relay always has the next range to send while the device applies
/// the last. Pages received and not yet applied count against it too, which bounds memory.
pub const MAX_DOWNLOADS_IN_FLIGHT: usize = 4;

/// A `Download` waiting for (the rest of) its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Asked {
    /// Where the next `Changes` answering it starts.
    next: u64,
    /// The end of the range asked for (version 4); before, one `Changes` answers a `Download`.
    end: Option<u64>,
    /// Asked for after a range that came back short (the log ended): its answer may not follow
    /// on what was received, so it is read and dropped, and the log is asked for again.
    stale: bool,
}

/// Log entries received and waiting to be applied.
struct Pushed {
    after: u64,
    through: u64,
    entries: Vec<LogEntry>,
    own: Vec<OwnEntry>,
}

/// A device's side of one connection to the relay.
pub struct DeviceSession {
    config: SessionConfig,
    key: SigningKey,
    space: String,
    channel_binding: Vec<u8>,
    /// Shown with the signature; taken when `Authenticate` is sent.
    credential: Option<Credential>,
    /// The refresh token this device holds, for refreshing the session before it expires.
    refresh: Option<Secret>,
    /// When to refresh (this device's clock), while the session is open.
    refresh_at: Option<u64>,
    /// A `Refresh` is out: its answer is due by then.
    refresh_deadline: Option<u64>,
    /// A `CheckHeads` is out: its answer is due by then.
    heads_deadline: Option<u64>,
    bootstrap: Bootstrap,
    /// A bootstrap also reads the relay's unique-value index (the space has unique
    /// constraints); without it, such a space is read from its log.
    unique_index: bool,
    snapshotting: Snapshotting,
    /// The collections this device syncs (empty: every one), sent as `Collections` once the
    /// session is open.
    collections: Vec<String>,
    /// The protocol version the relay chose (0 before its challenge).
    version: u16,
    handshake: Handshake,
    handshake_deadline: u64,
    upload: Upload,
    /// Local changes arrived since the last batch was loaded.
    upload_dirty: bool,
    upload_drained: bool,
    next_batch: u64,
    /// `Download`s sent and not fully answered, oldest first: answers come in this order.
    asked: VecDeque<Asked>,
    /// The next answer is due by then, while any `Download` is out.
    download_deadline: Option<u64>,
    /// An `Apply` is out for the entries up to `.0` (`.1` of them).
    applying: Option<(u64, usize)>,
    /// Everything up to here is applied and durable.
    cursor: u64,
    /// The relay's last announced head.
    relay_head: u64,
    /// Received after what is being applied, in log order, each following the one before.
    pushes: VecDeque<Pushed>,
    /// Where the relay logged this session's uploads (seq to queue entry), until a `Changes`
    /// passes them: the relay may leave exactly these out of its pages.
    uploaded_at: BTreeMap<u64, u64>,
    /// A push was missed or dropped: download once the current work is done.
    resync: bool,
    idle_reported: bool,
    outputs: VecDeque<DeviceOutput>,
}

impl DeviceSession {
    /// Starts a session on a fresh connection: `cursor` is the device's durable download cursor,
    /// `channel_binding` the connection's TLS exporter value, `credential` what it shows beside
    /// its signature and `refresh` the refresh token it holds (for keeping the session alive).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: SessionConfig,
        key: SigningKey,
        space: String,
        channel_binding: Vec<u8>,
        cursor: u64,
        credential: Credential,
        refresh: Option<Secret>,
        now: u64,
    ) -> Self {
        let hello = Message::Hello {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            public_key: key.verifying_key().to_bytes(),
            space: space.clone(),
            time_ms: now,
        };
        DeviceSession {
            handshake_deadline: now.saturating_add(config.handshake_timeout_ms),
            config,
            key,
            space,
            channel_binding,
            credential: Some(credential),
            refresh,
            refresh_at: None,
            refresh_deadline: None,
            heads_deadline: None,
            bootstrap: Bootstrap::Off,
            unique_index: false,
            snapshotting: Snapshotting::No,
            collections: Vec::new(),
            version: 0,
            handshake: Handshake::AwaitChallenge,
            upload: Upload::default(),
            upload_dirty: true,
            upload_drained: false,
            next_batch: 1,
            asked: VecDeque::new(),
            download_deadline: None,
            applying: None,
            cursor,
            relay_head: 0,
            pushes: VecDeque::new(),
            uploaded_at: BTreeMap::new(),
            resync: false,
            idle_reported: false,
            outputs: VecDeque::from([Output::Transmit(hello)]),
        }
    }

    pub fn is_open(&self) -> bool {
        self.handshake == Handshake::Open
    }

    /// Whether the session bootstraps from a snapshot once it is open (before `Welcome`; `Off`
    /// unless set), and whether a bootstrap also takes the relay's unique-value index
    /// (PROTOCOL.md, section 5.8): set for a space with unique constraints, which is then
    /// bootstrapped only from a relay that speaks a version with `UniqueIndex` (or once its log
    /// is compacted away).
    pub fn set_bootstrap(&mut self, bootstrap: Bootstrap, unique_index: bool) {
        self.bootstrap = bootstrap;
        self.unique_index = unique_index;
    }

    /// Syncs only these collections (PROTOCOL.md, section 5.9; empty: every one). Set before
    /// `Welcome`: a relay that speaks no version with `Collections` is then refused.
    pub fn set_collections(&mut self, collections: Vec<String>) {
        self.collections = collections;
    }

    /// A bootstrap from the relay's snapshot is under way.
    pub fn is_bootstrapping(&self) -> bool {
        self.snapshotting != Snapshotting::No
    }

    pub fn is_closed(&self) -> bool {
        self.handshake == Handshake::Closed
    }

    /// The next thing to do, in the order the session produced them.
    pub fn poll_output(&mut self) -> Option<DeviceOutput> {
        self.outputs.pop_front()
    }

    fn transmit(&mut self, message: Message) {
        self.outputs.push_back(Output::Transmit(message));
    }

    fn effect(&mut self, effect: DeviceEffect) {
        self.outputs.push_back(Output::Effect(effect));
    }

    fn event(&mut self, event: DeviceEvent) {
        self.outputs.push_back(Output::Event(event));
    }

    /// The earliest time at which `handle_timeout` has something to do.
    pub fn poll_timeout(&self) -> Option<u64> {
        match self.handshake {
            Handshake::Closed => None,
            Handshake::AwaitChallenge | Handshake::AwaitWelcome { .. } => {
                Some(self.handshake_deadline)
            }
            Handshake::Open => {
                let upload = self.upload.sent.iter().map(|b| b.deadline).min();
                let snapshot = match self.snapshotting {
                    Snapshotting::Reading { asked, .. } | Snapshotting::Indexing { asked, .. } => {
                        asked
                    }
                    Snapshotting::No => None,
                };
                let download = self.download_deadline.or(snapshot);
                let refresh = self.refresh_deadline.or(self.refresh_at);
                upload
                    .into_iter()
                    .chain(download)
                    .chain(refresh)
                    .chain(self.heads_deadline)
                    .min()
            }
        }
    }

    pub fn handle_timeout(&mut self, now: u64) {
        let expired = |deadline: u64| now >= deadline;
        if self.handshake == Handshake::Open
            && self.refresh_deadline.is_none()
            && self.refresh_at.is_some_and(expired)
        {
            self.refresh_at = None;
            if let Some(refresh) = self.refresh.clone() {
                self.transmit(Message::Refresh { refresh });
                self.refresh_deadline = Some(now.saturating_add(self.config.request_timeout_ms));
            }
        }
        let what = match (&self.handshake, &self.upload, self.download_deadline) {
            (Handshake::Closed, ..) => return,
            (Handshake::AwaitChallenge | Handshake::AwaitWelcome { .. }, ..) => {
                if !expired(self.handshake_deadline) {
                    return;
                }
                "handshake"
            }
            (_, upload, _) if upload.sent.iter().any(|b| expired(b.deadline)) => "upload",
            _ if self.refresh_deadline.is_some_and(expired) => "refresh",
            _ if self.heads_deadline.is_some_and(expired) => "heads check",
            (_, _, Some(deadline)) if expired(deadline) => "download",
            _ if matches!(self.snapshotting, Snapshotting::Reading { asked: Some(deadline), .. } if expired(deadline)) => {
                "snapshot"
            }
            _ if matches!(self.snapshotting, Snapshotting::Indexing { asked: Some(deadline), .. } if expired(deadline)) => {
                "unique index"
            }
            _ => return,
        };
        self.close(SessionError::Timeout(what), Some(ErrorCode::Timeout));
    }

    /// New local writes are waiting: upload them once the current batch is done.
    pub fn local_changes(&mut self) {
        self.upload_dirty = true;
        self.idle_reported = false;
        self.start_upload();
    }

    /// Sync now: upload what is pending and ask the relay for anything new, then report `Idle`.
    pub fn sync_now(&mut self, now: u64) {
        self.local_changes();
        self.resync = true;
        self.start_download(now);
    }

    /// Asks the relay for the digest of up to `max_records` records' logged heads after
    /// `after`; the answer comes as [`DeviceEvent::HeadsDigest`]. False (nothing sent) unless
    /// the session is open, the relay speaks a version with the check, and no check is out.
    pub fn check_heads(&mut self, after: Option<RecordName>, max_records: u32, now: u64) -> bool {
        if self.handshake != Handshake::Open
            || self.version < HEADS_CHECK_VERSION
            || self.heads_deadline.is_some()
        {
            return false;
        }
        self.heads_deadline = Some(now.saturating_add(self.config.request_timeout_ms));
        self.transmit(Message::CheckHeads {
            after,
            max_records: max_records.max(1),
        });
        true
    }

    /// The connection failed under the session.
    pub fn connection_lost(&mut self, reason: String) {
        self.close(SessionError::ConnectionLost(reason), None);
    }

    /// Ends the session from this side (the daemon stops, for example).
    pub fn shut_down(&mut self) {
        self.close(SessionError::Ended, None);
    }

    /// The answer to `LoadUploadBatch`: the entries now marked processing.
    pub fn upload(&mut self, changes: Vec<UploadChange>, now: u64) {
        if !self.upload.loading || self.handshake != Handshake::Open {
            // The session closed while the batch was loading: hand the entries straight back.
            if !changes.is_empty() {
                self.effect(DeviceEffect::AbandonUpload {
                    entries: changes.iter().map(|c| c.entry).collect(),
                    error: self.closed_reason(),
                    kind: ErrorKind::Network,
                });
            }
            return;
        }
        self.upload.loading = false;
        if changes.is_empty() {
            if self.upload_dirty {
                self.start_upload();
            } else {
                self.upload_drained = true;
                self.check_idle();
            }
            return;
        }
        let batch = self.next_batch;
        self.next_batch += 1;
        self.upload.sent.push_back(SentBatch {
            batch,
            entries: changes.iter().map(|c| c.entry).collect(),
            deadline: now.saturating_add(self.config.request_timeout_ms),
        });
        self.transmit(Message::Upload { batch, changes });
        // The queue may hold more: load the next batch while this one is on its way.
        self.upload_dirty = true;
        self.start_upload();
    }

    /// The answer to `RecordUploadResults`.
    pub fn upload_recorded(&mut self) {
        if self.upload.recording > 0 {
            self.upload.recording -= 1;
            self.upload_dirty = true;
            self.start_upload();
            self.check_idle();
        }
    }

    /// The answer to `Apply`: the entries up to `through` are durable.
    pub fn applied(&mut self, through: u64, now: u64) {
        let Some((expected, entries)) = self.applying else {
            return;
        };
        if expected != through {
            return;
        }
        self.cursor = through;
        self.applying = None;
        self.event(DeviceEvent::Downloaded {
            through,
            relay_head: self.relay_head,
            entries,
        });
        while let Some(push) = self.pushes.pop_front() {
            if push.through <= self.cursor {
                continue;
            }
            if push.after == self.cursor {
                self.begin_apply(push.after, push.through, push.entries, push.own);
                break;
            }
            self.resync = true;
            self.pushes.clear();
        }
        self.start_download(now);
        self.check_idle();
    }

    /// The answer to `ApplySnapshot`: the page is durable; after the last one the download
    /// cursor is `cursor`, and the log is read from there.
    pub fn snapshot_applied(&mut self, cursor: u64, now: u64) {
        let Snapshotting::Reading {
            asked,
            applying,
            complete,
            ..
        } = &mut self.snapshotting
        else {
            return;
        };
        *applying = applying.saturating_sub(1);
        // The page out was asked for before this one was applied: the time that took is not
        // the relay's, so its answer gets a whole timeout from now.
        if let Some(deadline) = asked {
            *deadline = (*deadline).max(now.saturating_add(self.config.request_timeout_ms));
        }
        if !(*complete && *applying == 0) {
            self.ask_for_page(now);
            return;
        }
        self.snapshotting = Snapshotting::No;
        self.cursor = self.cursor.max(cursor);
        if self.unique_index && self.version >= UNIQUE_INDEX_VERSION {
            return self.start_index(None, now);
        }
        self.end_bootstrap(now);
    }

    /// The bootstrap is over: the log is read from the cursor.
    fn end_bootstrap(&mut self, now: u64) {
        self.snapshotting = Snapshotting::No;
        self.resync = true;
        self.start_download(now);
        self.check_idle();
    }

    fn start_index(&mut self, after: Option<IndexPosition>, now: u64) {
        self.snapshotting = Snapshotting::Indexing {
            asked: None,
            applying: false,
            next: after,
            complete: false,
        };
        self.ask_for_index(now);
    }

    /// Sends the `UniqueIndex` for the next page when none is out or being applied.
    fn ask_for_index(&mut self, now: u64) {
        if self.handshake != Handshake::Open {
            return;
        }
        let Snapshotting::Indexing {
            asked,
            applying,
            next,
            complete,
        } = &mut self.snapshotting
        else {
            return;
        };
        if asked.is_some() || *applying || *complete {
            return;
        }
        *asked = Some(now.saturating_add(self.config.request_timeout_ms));
        let after = next.clone();
        self.idle_reported = false;
        self.transmit(Message::UniqueIndex { after });
    }

    /// The answer to `ApplyUniqueIndex`: the page is durable.
    pub fn unique_index_applied(&mut self, now: u64) {
        let Snapshotting::Indexing {
            applying, complete, ..
        } = &mut self.snapshotting
        else {
            return;
        };
        *applying = false;
        if *complete {
            self.end_bootstrap(now);
        } else {
            self.ask_for_index(now);
        }
    }

    fn start_snapshot(&mut self, after: Option<RecordName>, now: u64) {
        self.snapshotting = Snapshotting::Reading {
            asked: None,
            applying: 0,
            next: after,
            complete: false,
        };
        self.ask_for_page(now);
    }

    /// Sends the `Snapshot` for the next page when none is out, one is still to come and fewer
    /// than [`SNAPSHOT_PAGES_HELD`] pages wait to be applied.
    fn ask_for_page(&mut self, now: u64) {
        if self.handshake != Handshake::Open {
            return;
        }
        let Snapshotting::Reading {
            asked,
            applying,
            next,
            complete,
        } = &mut self.snapshotting
        else {
            return;
        };
        if asked.is_some() || *complete || *applying >= SNAPSHOT_PAGES_HELD {
            return;
        }
        *asked = Some(now.saturating_add(self.config.request_timeout_ms));
        let after = next.clone();
        self.idle_reported = false;
        self.transmit(Message::Snapshot {
            after,
            max_records: self.config.max_snapshot_records,
        });
    }

    pub fn handle_message(&mut self, message: Message, now: u64) {
        match (self.handshake, message) {
            (Handshake::Closed, _) => {}
            (_, Message::Error { code, message }) => {
                self.close(SessionError::Remote { code, message }, None);
            }
            (
                Handshake::AwaitChallenge,
                Message::Challenge {
                    version,
                    nonce,
                    time_ms: _,
                },
            ) => {
                if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
                    return self.violation(
                        ErrorCode::UnsupportedVersion,
                        format!(
                            "the relay chose protocol version {version}, this device speaks \
                             {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}"
                        ),
                    );
                }
                let public_key = self.key.verifying_key().to_bytes();
                let transcript =
                    auth_transcript(&nonce, &self.channel_binding, &self.space, &public_key);
                let signature = self.key.sign(&transcript).to_bytes();
                let credential = self.credential.take().unwrap_or(Credential::Key);
                self.transmit(Message::Authenticate {
                    signature,
                    credential,
                });
                self.handshake = Handshake::AwaitWelcome { version };
            }
            (
                Handshake::AwaitWelcome { version },
                Message::Welcome {
                    time_ms,
                    head,
                    max_batch_changes,
                    max_frame_bytes,
                    expires_ms,
                    tokens,
                },
            ) => {
                if !self.collections.is_empty() && version < COLLECTIONS_VERSION {
                    return self.violation(
                        ErrorCode::UnsupportedVersion,
                        format!(
                            "the relay speaks protocol {version}, which cannot sync only some \
                             collections (sync.collections needs {COLLECTIONS_VERSION}): upgrade \
                             the relay, or sync every collection"
                        ),
                    );
                }
                self.handshake = Handshake::Open;
                self.version = version;
                if !self.collections.is_empty() {
                    self.transmit(Message::Collections {
                        names: self.collections.clone(),
                    });
                }
                self.session_granted(time_ms, expires_ms, tokens, now);
                self.relay_head = head;
                self.config.max_batch_changes =
                    self.config.max_batch_changes.min(max_batch_changes).max(1);
                // Leave room in the frame for the message around the change bytes.
                let frame_room = (max_frame_bytes as usize) / 2;
                self.config.max_batch_bytes = self.config.max_batch_bytes.min(frame_room).max(1);
                self.config.max_frame_bytes = self.config.max_frame_bytes.min(max_frame_bytes);
                self.event(DeviceEvent::Authenticated {
                    version,
                    relay_time_ms: time_ms,
                    relay_head: head,
                });
                self.start_upload();
                self.resync = true;
                // A space with unique constraints is bootstrapped only with its unique-value
                // index: from a relay without it, it is read from its log.
                let indexed = !self.unique_index || version >= UNIQUE_INDEX_VERSION;
                match std::mem::replace(&mut self.bootstrap, Bootstrap::Off) {
                    Bootstrap::Resume(after) if version >= SNAPSHOT_VERSION => {
                        self.start_snapshot(after, now)
                    }
                    Bootstrap::Fresh
                        if self.cursor == 0
                            && head > 0
                            && version >= SNAPSHOT_VERSION
                            && indexed =>
                    {
                        self.start_snapshot(None, now)
                    }
                    Bootstrap::ResumeIndex(after) if version >= UNIQUE_INDEX_VERSION => {
                        self.start_index(after, now)
                    }
                    _ => self.start_download(now),
                }
            }
            (Handshake::Open, Message::UploadAck { batch, results }) => {
                self.handle_upload_ack(batch, results);
            }
            (
                Handshake::Open,
                Message::Refreshed {
                    time_ms,
                    expires_ms,
                    tokens,
                },
            ) if self.refresh_deadline.is_some() => {
                self.refresh_deadline = None;
                self.session_granted(time_ms, expires_ms, Some(tokens), now);
            }
            (
                Handshake::Open,
                Message::HeadsDigest {
                    head,
                    records,
                    last,
                    complete,
                    digest,
                },
            ) if self.heads_deadline.is_some() => {
                self.heads_deadline = None;
                self.event(DeviceEvent::HeadsDigest {
                    head,
                    records,
                    last,
                    complete,
                    digest,
                });
            }
            (
                Handshake::Open,
                Message::SnapshotPage {
                    head,
                    horizon,
                    records,
                    last,
                    complete,
                },
            ) if matches!(
                self.snapshotting,
                Snapshotting::Reading { asked: Some(_), .. }
            ) =>
            {
                // A page names the last record it covers; only a last page that covers none
                // names none. A page of a session syncing some collections may list no record
                // and still cover some (of other collections).
                if last.is_none() && (!records.is_empty() || !complete) {
                    return self.violation(
                        ErrorCode::Malformed,
                        "a SnapshotPage must name its last record, and only an empty last page \
                         holds none"
                            .into(),
                    );
                }
                self.relay_head = self.relay_head.max(head);
                if let Snapshotting::Reading {
                    asked,
                    applying,
                    next,
                    complete: all_read,
                } = &mut self.snapshotting
                {
                    *asked = None;
                    *applying = applying.saturating_add(1);
                    next.clone_from(&last);
                    *all_read = complete;
                }
                self.ask_for_page(now);
                self.effect(DeviceEffect::ApplySnapshot {
                    page: SnapshotPage {
                        head,
                        horizon,
                        records,
                        last,
                        complete,
                    },
                });
            }
            (
                Handshake::Open,
                Message::UniqueIndexPage {
                    head,
                    values,
                    conflicts,
                    last,
                    complete,
                },
            ) if matches!(
                self.snapshotting,
                Snapshotting::Indexing { asked: Some(_), .. }
            ) =>
            {
                if last.is_none() && !complete {
                    return self.violation(
                        ErrorCode::Malformed,
                        "a UniqueIndexPage that is not the last must name where it ends".into(),
                    );
                }
                self.relay_head = self.relay_head.max(head);
                if let Snapshotting::Indexing {
                    asked,
                    applying,
                    next,
                    complete: all_read,
                } = &mut self.snapshotting
                {
                    *asked = None;
                    *applying = true;
                    next.clone_from(&last);
                    *all_read = complete;
                }
                self.effect(DeviceEffect::ApplyUniqueIndex {
                    page: UniqueIndexPage {
                        head,
                        values,
                        conflicts,
                        last,
                        complete,
                    },
                });
            }
            (Handshake::Open, Message::Compacted { horizon })
                if self.version >= SNAPSHOT_VERSION && !self.asked.is_empty() =>
            {
                self.handle_compacted(horizon, now);
            }
            (
                Handshake::Open,
                Message::Changes {
                    after,
                    through,
                    head,
                    pushed,
                    entries,
                },
            ) => {
                if let Err(problem) = check_slice(after, through, &entries) {
                    return self.violation(ErrorCode::Malformed, problem);
                }
                let own = match self.left_out(after, through, &entries) {
                    Ok(own) => own,
                    Err(problem) => return self.violation(ErrorCode::Malformed, problem),
                };
                self.relay_head = head.max(through);
                let page = Pushed {
                    after,
                    through,
                    entries,
                    own,
                };
                if pushed {
                    self.handle_push(page, now);
                } else {
                    self.handle_download_answer(page, head, now);
                }
            }
            (_, other) => self.violation(
                ErrorCode::UnexpectedMessage,
                format!(
                    "{} is not expected at this point of the session",
                    other.name()
                ),
            ),
        }
    }

    /// The relay let the session run until `expires_ms` (its clock, `relay_time` now): refresh
    /// three quarters of the way there, when there is a refresh token to do it with.
    fn session_granted(
        &mut self,
        relay_time: u64,
        expires_ms: u64,
        tokens: Option<Tokens>,
        now: u64,
    ) {
        if let Some(tokens) = tokens {
            self.refresh = Some(tokens.refresh.clone());
            self.event(DeviceEvent::Tokens { tokens });
        }
        let lifetime = expires_ms.saturating_sub(relay_time);
        self.refresh_at = self
            .refresh
            .as_ref()
            .map(|_| now.saturating_add(lifetime / 4 * 3));
    }

    fn handle_upload_ack(&mut self, batch: u64, results: Vec<ChangeResult>) {
        let Some(SentBatch {
            batch: expected,
            entries,
            ..
        }) = self.upload.sent.front()
        else {
            return self.violation(
                ErrorCode::UnexpectedMessage,
                format!("UploadAck for batch {batch}, but no upload is waiting for an answer"),
            );
        };
        let matches = results.len() == entries.len()
            && results.iter().zip(entries).all(|(r, e)| r.entry == *e);
        if batch != *expected || !matches {
            return self.violation(
                ErrorCode::Malformed,
                format!(
                    "UploadAck for batch {batch} does not answer batch {expected} entry for entry"
                ),
            );
        }
        let count =
            |f: fn(&ChangeOutcome) -> bool| results.iter().filter(|r| f(&r.outcome)).count();
        let uploaded = DeviceEvent::Uploaded {
            batch,
            stored: count(|o| matches!(o, ChangeOutcome::Stored { .. })),
            duplicate: count(|o| matches!(o, ChangeOutcome::Duplicate { .. })),
            rejected: count(|o| matches!(o, ChangeOutcome::Rejected { .. })),
        };
        self.upload.sent.pop_front();
        self.upload.recording += 1;
        for result in &results {
            if let ChangeOutcome::Stored { seq } | ChangeOutcome::Duplicate { seq } = result.outcome
            {
                self.uploaded_at.insert(seq, result.entry);
            }
        }
        self.effect(DeviceEffect::RecordUploadResults { batch, results });
        // Reported once the results are recorded, which the driver does before taking this.
        self.event(uploaded);
    }

    /// The entries of `(after, through]` missing from `entries`, which must all be this
    /// session's own uploads (the relay leaves out only those, and the entries of collections a
    /// session syncing some does not sync), and forgets the uploads up to `through`: the relay
    /// does too once it sent this, so later pages hold them whole.
    fn left_out(
        &mut self,
        after: u64,
        through: u64,
        entries: &[LogEntry],
    ) -> Result<Vec<OwnEntry>, String> {
        let missing = (through - after).saturating_sub(entries.len() as u64);
        let mut own = Vec::new();
        if missing > 0 {
            // Both are in seq order: a walk through the two finds the uploads left out.
            let mut present = entries.iter().map(|e| e.seq).peekable();
            for (&seq, &entry) in self.uploaded_at.range(after.saturating_add(1)..=through) {
                while present.next_if(|s| *s < seq).is_some() {}
                if present.next_if_eq(&seq).is_none() {
                    own.push(OwnEntry { seq, entry });
                }
            }
        }
        // A session syncing some collections is sent only their entries: the others are
        // missing too.
        if own.len() as u64 != missing && self.collections.is_empty() {
            return Err(format!(
                "Changes after {after} through {through} holds {} entries and leaves out {} of \
                 this device's uploads: {} entries are missing that the device did not upload",
                entries.len(),
                own.len(),
                missing - own.len() as u64
            ));
        }
        self.uploaded_at = self.uploaded_at.split_off(&through.saturating_add(1));
        Ok(own)
    }

    fn handle_download_answer(&mut self, page: Pushed, head: u64, now: u64) {
        let (after, through) = (page.after, page.through);
        let Some(asked) = self.asked.front_mut().filter(|a| a.next == after) else {
            return self.violation(
                ErrorCode::UnexpectedMessage,
                format!("Changes after {after} do not answer a Download of this session"),
            );
        };
        asked.next = through;
        let Asked { end, stale, .. } = *asked;
        // A range is answered once covered, or once the log ends inside it.
        if end.is_none_or(|end| through >= end) || through >= head {
            self.asked.pop_front();
            if end.is_some_and(|end| through < end) {
                // The ranges asked after this one start past its end: what lies between is
                // asked for again once they are drained.
                self.asked.iter_mut().for_each(|a| a.stale = true);
            }
        }
        self.download_deadline =
            (!self.asked.is_empty()).then(|| now.saturating_add(self.config.request_timeout_ms));
        if !stale {
            self.receive(page);
        }
        self.start_download(now);
        self.check_idle();
    }

    /// The oldest `Download` was answered `Compacted`: the relay no longer keeps the log after
    /// the cursor. What the later ranges bring is dropped, and the device bootstraps from a
    /// snapshot (its queue untouched: local changes go on uploading meanwhile), after which the
    /// log is read from the snapshot's head.
    fn handle_compacted(&mut self, horizon: u64, now: u64) {
        self.asked.pop_front();
        self.asked.iter_mut().for_each(|a| a.stale = true);
        self.pushes.clear();
        self.download_deadline =
            (!self.asked.is_empty()).then(|| now.saturating_add(self.config.request_timeout_ms));
        self.relay_head = self.relay_head.max(horizon);
        if !self.is_bootstrapping() {
            self.start_snapshot(None, now);
        }
    }

    /// Where what is received, applied or being applied ends.
    fn received_through(&self) -> u64 {
        self.pushes
            .back()
            .map(|p| p.through)
            .or(self.applying.map(|(through, _)| through))
            .unwrap_or(self.cursor)
    }

    /// Entries that follow on what was received: applied now, or queued behind the `Apply` out.
    /// Anything else means something was dropped on the way: download again.
    fn receive(&mut self, page: Pushed) {
        let expected = self.received_through();
        if page.through <= expected {
            return;
        }
        if page.after != expected {
            self.drop_received();
            return;
        }
        self.idle_reported = false;
        if self.applying.is_none() {
            self.begin_apply(page.after, page.through, page.entries, page.own);
        } else if self.pushes.len() < self.config.max_buffered_pushes {
            self.pushes.push_back(page);
        } else {
            self.drop_received();
        }
    }

    /// Forgets what is waiting to be applied and what the ranges still out would bring, and
    /// downloads again from what is being applied once they are drained.
    fn drop_received(&mut self) {
        self.pushes.clear();
        self.asked.iter_mut().for_each(|a| a.stale = true);
        self.resync = true;
    }

    fn handle_push(&mut self, page: Pushed, now: u64) {
        if self.is_bootstrapping() {
            // The log is read after the snapshot, from where its pages leave the cursor.
            return;
        }
        if !self.asked.is_empty() {
            // The relay pushed this before it saw the download: the answers on their way start
            // at or before it and cover it.
            return;
        }
        self.receive(page);
        self.start_download(now);
    }

    fn begin_apply(
        &mut self,
        after: u64,
        through: u64,
        entries: Vec<LogEntry>,
        own: Vec<OwnEntry>,
    ) {
        self.idle_reported = false;
        self.applying = Some((through, entries.len()));
        self.effect(DeviceEffect::Apply {
            after,
            through,
            entries,
            own,
        });
    }

    fn start_upload(&mut self) {
        if self.handshake != Handshake::Open
            || !self.upload.has_room(self.version)
            || !self.upload_dirty
        {
            return;
        }
        self.upload_dirty = false;
        self.upload_drained = false;
        self.upload.loading = true;
        self.effect(DeviceEffect::LoadUploadBatch {
            max_changes: self.config.max_batch_changes,
            max_bytes: self.config.max_batch_bytes,
            max_change_bytes: crate::wire::max_change_bytes(self.config.max_frame_bytes as usize),
        });
    }

    /// Asks for the log after what was received if the relay announced more, or a resync is
    /// due. From version 4 it asks for consecutive ranges, several at once, while the window
    /// has room; before, for one page at a time once everything received is applied.
    fn start_download(&mut self, now: u64) {
        if self.handshake != Handshake::Open
            || self.asked.iter().any(|a| a.stale)
            || self.is_bootstrapping()
        {
            return;
        }
        let ranges = self.version >= PIPELINED_DOWNLOAD_VERSION;
        let page = self.config.max_download_changes.max(1);
        loop {
            let since = match self.asked.back() {
                Some(Asked { end: Some(end), .. }) => *end,
                Some(_) => return,
                None => self.received_through(),
            };
            let wanted = since < self.relay_head || (self.resync && self.asked.is_empty());
            let waiting =
                self.asked.len() + self.pushes.len() + usize::from(self.applying.is_some());
            let room = if ranges {
                waiting < MAX_DOWNLOADS_IN_FLIGHT
            } else {
                waiting == 0
            };
            if !wanted || !room {
                return;
            }
            self.resync = false;
            self.idle_reported = false;
            if self.asked.is_empty() {
                self.download_deadline = Some(now.saturating_add(self.config.request_timeout_ms));
            }
            self.asked.push_back(Asked {
                next: since,
                end: ranges.then(|| since.saturating_add(u64::from(page))),
                stale: false,
            });
            self.transmit(Message::Download {
                since,
                max_changes: page,
            });
        }
    }

    /// Open, with nothing to upload and nothing known to download: what `Idle` reports.
    pub fn is_idle(&self) -> bool {
        self.handshake == Handshake::Open
            && self.upload.is_quiet()
            && self.upload_drained
            && !self.upload_dirty
            && self.asked.is_empty()
            && self.applying.is_none()
            && self.pushes.is_empty()
            && !self.is_bootstrapping()
            && self.cursor >= self.relay_head
            // An upload the relay stored past the cursor: the log reaches at least that far,
            // whatever the head last announced says.
            && self.uploaded_at.range(self.cursor.saturating_add(1)..).next().is_none()
            && !self.resync
    }

    /// The relay's head as it last announced it (at sign-in, in a page or a push).
    pub fn relay_head(&self) -> u64 {
        self.relay_head
    }

    fn check_idle(&mut self) {
        let idle = self.is_idle();
        if idle && !self.idle_reported {
            self.idle_reported = true;
            self.event(DeviceEvent::Idle {
                cursor: self.cursor,
            });
        }
    }

    fn violation(&mut self, code: ErrorCode, message: String) {
        self.transmit(Message::Error {
            code,
            message: message.clone(),
        });
        self.close(SessionError::Protocol { code, message }, None);
    }

    fn closed_reason(&self) -> String {
        "connection closed before the relay answered".into()
    }

    fn close(&mut self, error: SessionError, tell_peer: Option<ErrorCode>) {
        if self.handshake == Handshake::Closed {
            return;
        }
        if let Some(code) = tell_peer {
            self.transmit(Message::Error {
                code,
                message: error.to_string(),
            });
        }
        self.handshake = Handshake::Closed;
        for sent in std::mem::take(&mut self.upload.sent) {
            self.effect(DeviceEffect::AbandonUpload {
                entries: sent.entries,
                error: error.describe(),
                kind: error.kind(),
            });
        }
        self.pushes.clear();
        self.asked.clear();
        self.download_deadline = None;
        self.event(DeviceEvent::Closed { error: Some(error) });
    }
}

/// Why a record name from the device is too long to look up (the relay's limits are far lower).
fn oversized_name(name: &RecordName) -> Option<String> {
    (name.collection.len() + name.record.len() > MAX_CREDENTIAL_BYTES).then(|| {
        format!(
            "CheckHeads names a record of {} bytes: no record name is that long",
            name.collection.len() + name.record.len()
        )
    })
}

/// Checks the shape of a `Changes`: a range that does not go backwards, and entries inside it in
/// strictly increasing order.
fn check_slice(after: u64, through: u64, entries: &[LogEntry]) -> Result<(), String> {
    if through < after {
        return Err(format!(
            "Changes through {through} ends before it starts ({after})"
        ));
    }
    let mut last = after;
    for entry in entries {
        if entry.seq <= last || entry.seq > through {
            return Err(format!(
                "Changes after {after} through {through} holds entry {} out of order",
                entry.seq
            ));
        }
        last = entry.seq;
    }
    Ok(())
}

/// Work a relay session asks its driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayEffect {
    /// Decide whether this device may use this space; answer with [`RelaySession::authorized`]
    /// (giving the space's head) or [`RelaySession::refused`].
    Authorize {
        device: String,
        public_key: [u8; 32],
        space: String,
        credential: Credential,
    },
    /// Rotate the refresh token of the session's device and answer with
    /// [`RelaySession::refreshed`] or [`RelaySession::refused`].
    Refresh { refresh: Secret },
    /// Append the changes to the space's log, durably, and answer with [`RelaySession::stored`].
    Store {
        batch: u64,
        changes: Vec<UploadChange>,
    },
    /// Read the space's log after `since` (at most `max_changes` entries, leaving out the device's
    /// own changes) and answer with [`RelaySession::read`]. `push` is true when the session reads
    /// on its own to push new entries to a live device, false for a `Download` the device asked for.
    Read {
        since: u64,
        max_changes: u32,
        push: bool,
    },
    /// Digest the logged heads of up to `max_records` records of the space after `after`, as of
    /// one log head, and answer with [`RelaySession::heads_digest`].
    DigestHeads {
        after: Option<RecordName>,
        max_records: u32,
        /// Only the records of these collections (`None`: every one).
        collections: Option<BTreeSet<String>>,
    },
    /// Read a page of the space's snapshot: up to `max_records` records after `after`, as of one
    /// log head, and answer with [`RelaySession::snapshot_read`].
    ReadSnapshot {
        after: Option<RecordName>,
        max_records: u32,
        /// Only the records of these collections (`None`: every one); the page still names
        /// the last record it went through, of any collection.
        collections: Option<BTreeSet<String>>,
    },
    /// Read a page of the space's unique-value index after `after`, as of one log head, and
    /// answer with [`RelaySession::unique_index_read`].
    ReadUniqueIndex {
        after: Option<IndexPosition>,
        /// Most values (or conflict entries looked through) in the page.
        max_values: u32,
        /// Only the values and entries of these collections (`None`: every one).
        collections: Option<BTreeSet<String>>,
    },
}

/// What a relay session reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayEvent {
    Authenticated { device: String, space: String },
    Closed { error: Option<SessionError> },
}

/// A slice of a space's log, as the relay's store returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSlice {
    pub after: u64,
    /// The last seq looked at (entries left out still count).
    pub through: u64,
    /// The space's last seq.
    pub head: u64,
    /// The space's compaction horizon: entries up to it are no longer kept, so a read after a
    /// lower `after` cannot be served (0: the whole log is kept).
    pub horizon: u64,
    pub entries: Vec<LogEntry>,
}

/// What the relay grants a device that it lets in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The session ends then (unless refreshed), relay clock.
    pub expires_ms: u64,
    /// New tokens for the device, when it did not come in with a valid access token.
    pub tokens: Option<Tokens>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum RelayState {
    AwaitHello,
    AwaitAuthenticate { public_key: [u8; 32], space: String },
    Authorizing,
    Open,
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadFor {
    /// For a `Download`, up to `end` when it asked for a range (version 4).
    Download {
        since: u64,
        end: Option<u64>,
    },
    Push {
        since: u64,
    },
}

/// The relay's side of one device connection.
pub struct RelaySession {
    config: SessionConfig,
    nonce: [u8; 32],
    channel_binding: Vec<u8>,
    state: RelayState,
    /// The handshake deadline, then the session's expiry.
    deadline: u64,
    /// A `Refresh` effect is out.
    refreshing: bool,
    /// A `DigestHeads` effect is out.
    digesting: bool,
    /// A `ReadSnapshot` or `ReadUniqueIndex` effect is out.
    snapshotting: bool,
    /// Uploads being stored, oldest first.
    storing: VecDeque<u64>,
    reading: Option<ReadFor>,
    /// `Download`s (since, max_changes) waiting for the read out to come back, oldest first.
    queued_downloads: VecDeque<(u64, u32)>,
    /// The protocol version chosen (0 before `Hello`).
    version: u16,
    /// The seqs this session answered `Stored`/`Duplicate` for and has not sent a `Changes`
    /// past (from version 4): left out of the pages, since the device holds them.
    acked: BTreeSet<u64>,
    /// Everything up to here has been sent to the device (as an answer or a push).
    sent_through: u64,
    /// The device has caught up once, so new entries are pushed to it.
    live: bool,
    /// The space's head as last heard from the store.
    known_head: u64,
    /// The collections the device syncs (`Collections`, version 6; `None`: every one).
    collections: Option<BTreeSet<String>>,
    /// The device has asked for something (a download, a snapshot page or a heads digest):
    /// too late to choose its collections.
    requested: bool,
    outputs: VecDeque<RelayOutput>,
}

impl RelaySession {
    /// Starts a session for a new connection; `nonce` must be fresh random bytes.
    pub fn new(config: SessionConfig, nonce: [u8; 32], channel_binding: Vec<u8>, now: u64) -> Self {
        RelaySession {
            deadline: now.saturating_add(config.handshake_timeout_ms),
            config,
            nonce,
            channel_binding,
            state: RelayState::AwaitHello,
            refreshing: false,
            digesting: false,
            snapshotting: false,
            storing: VecDeque::new(),
            reading: None,
            queued_downloads: VecDeque::new(),
            version: 0,
            acked: BTreeSet::new(),
            sent_through: 0,
            collections: None,
            requested: false,
            live: false,
            known_head: 0,
            outputs: VecDeque::new(),
        }
    }

    pub fn is_open(&self) -> bool {
        self.state == RelayState::Open
    }

    pub fn is_closed(&self) -> bool {
        self.state == RelayState::Closed
    }

    /// Whether new entries are pushed to this device as they arrive.
    pub fn is_live(&self) -> bool {
        self.live
    }

    /// The next thing to do, in the order the session produced them. A push read is only asked
    /// for once every earlier output has been taken (its message handed over for sending), so a
    /// slow device holds back its own pushes, not the relay's memory.
    pub fn poll_output(&mut self) -> Option<RelayOutput> {
        if let Some(output) = self.outputs.pop_front() {
            return Some(output);
        }
        if self.state == RelayState::Open
            && self.live
            && self.reading.is_none()
            && self.known_head > self.sent_through
        {
            let since = self.sent_through;
            self.reading = Some(ReadFor::Push { since });
            return Some(Output::Effect(RelayEffect::Read {
                since,
                max_changes: self.config.max_download_changes,
                push: true,
            }));
        }
        None
    }

    fn transmit(&mut self, message: Message) {
        self.outputs.push_back(Output::Transmit(message));
    }

    fn effect(&mut self, effect: RelayEffect) {
        self.outputs.push_back(Output::Effect(effect));
    }

    fn event(&mut self, event: RelayEvent) {
        self.outputs.push_back(Output::Event(event));
    }

    pub fn poll_timeout(&self) -> Option<u64> {
        match self.state {
            RelayState::AwaitHello
            | RelayState::AwaitAuthenticate { .. }
            | RelayState::Authorizing
            | RelayState::Open => Some(self.deadline),
            RelayState::Closed => None,
        }
    }

    pub fn handle_timeout(&mut self, now: u64) {
        if now < self.deadline {
            return;
        }
        match self.state {
            RelayState::Closed => {}
            RelayState::Open => self.fail(
                ErrorCode::TokenExpired,
                "the session's access token expired: reconnect and sign in again".into(),
            ),
            _ => self.fail(
                ErrorCode::Timeout,
                "the handshake did not finish in time".into(),
            ),
        }
    }

    /// The space's log grew to `head`.
    pub fn appended(&mut self, head: u64) {
        self.known_head = self.known_head.max(head);
    }

    pub fn connection_lost(&mut self, reason: String) {
        self.close(Some(SessionError::ConnectionLost(reason)));
    }

    /// The relay is stopping: tell the device, so it reconnects later rather than at once.
    pub fn shut_down(&mut self) {
        self.fail(ErrorCode::ShuttingDown, "the relay is shutting down".into());
    }

    /// The answer to `Authorize`: the device may use the space, whose log ends at `head`.
    pub fn authorized(&mut self, head: u64, grant: Grant, now: u64) {
        if self.state != RelayState::Authorizing {
            return;
        }
        self.state = RelayState::Open;
        self.known_head = head;
        self.deadline = grant.expires_ms;
        self.transmit(Message::Welcome {
            time_ms: now,
            head,
            max_batch_changes: self.config.max_batch_changes,
            max_frame_bytes: self.config.max_frame_bytes,
            expires_ms: grant.expires_ms,
            tokens: grant.tokens,
        });
    }

    /// The answer to `Refresh`: the session now runs until `expires_ms`.
    pub fn refreshed(&mut self, expires_ms: u64, tokens: Tokens, now: u64) {
        if !self.refreshing {
            return;
        }
        self.refreshing = false;
        if self.state == RelayState::Open {
            self.deadline = expires_ms;
            self.transmit(Message::Refreshed {
                time_ms: now,
                expires_ms,
                tokens,
            });
        }
    }

    /// The answer to `Authorize` or `Refresh`: the device may not go on (`code` says why:
    /// `AuthenticationFailed`, `Forbidden` or `RateLimited`).
    pub fn refused(&mut self, code: ErrorCode, message: String) {
        if self.state == RelayState::Authorizing || self.refreshing {
            self.refreshing = false;
            self.fail(code, message);
        }
    }

    /// The device's access was withdrawn (revoked by the operator, or its token family
    /// revoked): the session ends now.
    pub fn revoked(&mut self, message: String) {
        self.fail(ErrorCode::Forbidden, message);
    }

    /// The answer to `Store`.
    pub fn stored(&mut self, batch: u64, mut results: Vec<ChangeResult>, head: u64) {
        if self.storing.front() != Some(&batch) {
            return;
        }
        if self.version < PURGE_VERSION {
            // An older device knows no `RecordPurged`: it keeps the change, as for a missing
            // dependency, until its download meets the purge entry and ends the session.
            for result in &mut results {
                if let ChangeOutcome::Rejected { code, .. } = &mut result.outcome
                    && *code == ErrorCode::RecordPurged
                {
                    *code = ErrorCode::MissingDependencies;
                }
            }
        }
        self.storing.pop_front();
        self.known_head = self.known_head.max(head);
        if self.state == RelayState::Open {
            if self.version >= OWN_ENTRIES_LEFT_OUT_VERSION {
                for result in &results {
                    if let ChangeOutcome::Stored { seq } | ChangeOutcome::Duplicate { seq } =
                        result.outcome
                        && self.acked.len() < MAX_OWN_ENTRIES_LEFT_OUT
                    {
                        self.acked.insert(seq);
                    }
                }
            }
            self.transmit(Message::UploadAck { batch, results });
        }
    }

    /// The answer to `DigestHeads`: the digest as of the log's `head`.
    pub fn heads_digest(
        &mut self,
        head: u64,
        records: u32,
        last: Option<RecordName>,
        complete: bool,
        digest: [u8; 32],
    ) {
        if !self.digesting {
            return;
        }
        self.digesting = false;
        if self.state == RelayState::Open {
            self.transmit(Message::HeadsDigest {
                head,
                records,
                last,
                complete,
                digest,
            });
        }
    }

    /// The answer to `ReadSnapshot`.
    pub fn snapshot_read(&mut self, page: SnapshotPage) {
        if !self.snapshotting {
            return;
        }
        self.snapshotting = false;
        self.known_head = self.known_head.max(page.head);
        if self.state == RelayState::Open {
            self.transmit(Message::SnapshotPage {
                head: page.head,
                horizon: page.horizon,
                records: page.records,
                last: page.last,
                complete: page.complete,
            });
        }
    }

    /// The answer to `ReadUniqueIndex`.
    pub fn unique_index_read(&mut self, page: UniqueIndexPage) {
        if !self.snapshotting {
            return;
        }
        self.snapshotting = false;
        self.known_head = self.known_head.max(page.head);
        if self.state == RelayState::Open {
            self.transmit(Message::UniqueIndexPage {
                head: page.head,
                values: page.values,
                conflicts: page.conflicts,
                last: page.last,
                complete: page.complete,
            });
        }
    }

    /// The store could not carry out an effect: the session ends, the device will retry.
    pub fn failed(&mut self, message: String) {
        self.fail(ErrorCode::Internal, message);
    }

    /// The answer to `Read`.
    pub fn read(&mut self, slice: LogSlice) {
        let Some(purpose) = self.reading.take() else {
            return;
        };
        self.known_head = self.known_head.max(slice.head);
        if self.state != RelayState::Open {
            return;
        }
        let (since, end) = match purpose {
            ReadFor::Download { since, end } => (since, Some(end)),
            ReadFor::Push { since } => (since, None),
        };
        let pushed = end.is_none();
        if pushed && let Some((since, max_changes)) = self.queued_downloads.pop_front() {
            // The device asked to download, so the push would not follow on its cursor.
            self.start_read(since, max_changes);
            return;
        }
        if since > slice.head {
            return self.fail(
                ErrorCode::UnexpectedMessage,
                format!(
                    "this device has read the log up to {since} but it ends at {}: the relay \
                     lost part of its log (restored from an older backup?); its operator must \
                     restore it",
                    slice.head
                ),
            );
        }
        if since < slice.horizon {
            return self.compacted(since, slice.head, slice.horizon, pushed);
        }
        if pushed && slice.through <= since {
            // The store has nothing after `since` after all: stop pushing until the device
            // downloads again, rather than asking for the same read forever.
            self.live = false;
            return;
        }
        // The device's own uploads, answered earlier on this session, are left out: it has them.
        // A push of only those has no entries but is still sent, so that the device's cursor
        // passes them.
        if self.version < PURGE_VERSION
            && let Some(purge) = slice.entries.iter().find(|e| e.is_purge())
        {
            return self.fail(
                ErrorCode::UnsupportedVersion,
                format!(
                    "the log purges {}/{} at seq {}, and this device speaks protocol {}, which \
                     has no purge entries: upgrade it",
                    purge.collection, purge.record, purge.seq, self.version
                ),
            );
        }
        if self.version < FLATTEN_VERSION
            && let Some(flatten) = slice.entries.iter().find(|e| e.is_flatten())
        {
            return self.fail(
                ErrorCode::UnsupportedVersion,
                format!(
                    "the log flattens the history of {}/{} at seq {}, and this device speaks \
                     protocol {}, which has no flatten entries: upgrade it",
                    flatten.collection, flatten.record, flatten.seq, self.version
                ),
            );
        }
        let mut entries = slice.entries;
        if !self.acked.is_empty() {
            entries.retain(|e| !self.acked.contains(&e.seq));
            self.acked = self.acked.split_off(&slice.through.saturating_add(1));
        }
        if let Some(collections) = &self.collections {
            entries.retain(|e| collections.contains(&e.collection));
        }
        self.sent_through = slice.through;
        let (through, head) = (slice.through, slice.head);
        self.transmit(Message::Changes {
            after: since,
            through,
            head,
            pushed,
            entries,
        });
        if let Some(Some(end)) = end
            && through < end
            && through < head
        {
            // The rest of the range, once this part is handed over for sending.
            self.read_range(through, end);
        } else if let Some((since, max_changes)) = self.queued_downloads.pop_front() {
            self.start_read(since, max_changes);
        } else {
            self.live = through >= head;
        }
    }

    /// A read after `since` found the log compacted past it (PROTOCOL.md, section 5.8). A
    /// `Download` is answered `Compacted`, which ends it whole; a push cannot say so, so it
    /// carries no entries, only the head: the device, seeing the log ahead of its cursor,
    /// downloads and is answered `Compacted` then.
    fn compacted(&mut self, since: u64, head: u64, horizon: u64, pushed: bool) {
        if pushed {
            self.live = false;
            self.transmit(Message::Changes {
                after: since,
                through: since,
                head,
                pushed: true,
                entries: Vec::new(),
            });
            return;
        }
        if self.version < SNAPSHOT_VERSION {
            return self.fail(
                ErrorCode::UnsupportedVersion,
                format!(
                    "the relay no longer keeps the log up to seq {horizon}, and this device \
                     speaks protocol {}, which cannot bootstrap from a snapshot: upgrade it",
                    self.version
                ),
            );
        }
        self.transmit(Message::Compacted { horizon });
        if let Some((since, max_changes)) = self.queued_downloads.pop_front() {
            self.start_read(since, max_changes);
        }
    }

    pub fn handle_message(&mut self, message: Message, now: u64) {
        let _ = now;
        match (&self.state, message) {
            (RelayState::Closed, _) => {}
            (_, Message::Error { code, message }) => {
                self.close(Some(SessionError::Remote { code, message }));
            }
            (
                RelayState::AwaitHello,
                Message::Hello {
                    min_version,
                    max_version,
                    public_key,
                    space,
                    time_ms: _,
                },
            ) => {
                let version = max_version.min(PROTOCOL_VERSION);
                let oldest = self.config.min_device_version.max(MIN_PROTOCOL_VERSION);
                if version < min_version.max(oldest) {
                    return self.fail(
                        ErrorCode::UnsupportedVersion,
                        format!(
                            "the device speaks protocol {min_version} to {max_version}, this \
                             relay {oldest} to {PROTOCOL_VERSION}: upgrade the older side"
                        ),
                    );
                }
                if let Err(problem) = validate_space(&space) {
                    return self.fail(ErrorCode::Forbidden, problem);
                }
                self.version = version;
                self.transmit(Message::Challenge {
                    version,
                    nonce: self.nonce,
                    time_ms: now,
                });
                self.state = RelayState::AwaitAuthenticate { public_key, space };
            }
            (
                RelayState::AwaitAuthenticate { .. },
                Message::Authenticate {
                    signature,
                    credential,
                },
            ) => {
                let RelayState::AwaitAuthenticate { public_key, space } =
                    std::mem::replace(&mut self.state, RelayState::Authorizing)
                else {
                    return;
                };
                let transcript =
                    auth_transcript(&self.nonce, &self.channel_binding, &space, &public_key);
                let verified = VerifyingKey::from_bytes(&public_key).is_ok_and(|key| {
                    key.verify_strict(&transcript, &Signature::from_bytes(&signature))
                        .is_ok()
                });
                if !verified {
                    return self.fail(
                        ErrorCode::AuthenticationFailed,
                        "the signature does not match the device's key for this connection".into(),
                    );
                }
                if let Some(problem) = oversized(&credential) {
                    return self.fail(ErrorCode::TooLarge, problem);
                }
                let device = device_id(&public_key);
                self.event(RelayEvent::Authenticated {
                    device: device.clone(),
                    space: space.clone(),
                });
                self.effect(RelayEffect::Authorize {
                    device,
                    public_key,
                    space,
                    credential,
                });
            }
            (RelayState::Open, Message::Refresh { refresh }) => {
                if self.refreshing {
                    return self.fail(
                        ErrorCode::UnexpectedMessage,
                        "a Refresh arrived before the previous one was answered".into(),
                    );
                }
                if let Some(problem) = oversized(&Credential::Refresh(refresh.clone())) {
                    return self.fail(ErrorCode::TooLarge, problem);
                }
                self.refreshing = true;
                self.effect(RelayEffect::Refresh { refresh });
            }
            (RelayState::Open, Message::Upload { batch, changes }) => {
                let allowed = uploads_in_flight(self.version);
                if self.storing.len() >= allowed {
                    return self.fail(
                        ErrorCode::UnexpectedMessage,
                        format!("more than {allowed} Uploads are waiting for an answer"),
                    );
                }
                if changes.is_empty() {
                    return self.fail(ErrorCode::Malformed, "an Upload holds no changes".into());
                }
                if changes.len() > self.config.max_batch_changes as usize {
                    return self.fail(
                        ErrorCode::TooLarge,
                        format!(
                            "an Upload of {} changes is over the limit of {}",
                            changes.len(),
                            self.config.max_batch_changes
                        ),
                    );
                }
                self.storing.push_back(batch);
                self.effect(RelayEffect::Store { batch, changes });
            }
            (RelayState::Open, Message::Download { since, max_changes }) => {
                self.requested = true;
                if max_changes == 0 {
                    return self.fail(
                        ErrorCode::Malformed,
                        "a Download asks for no changes (max_changes 0)".into(),
                    );
                }
                let waiting = self.queued_downloads.len()
                    + usize::from(matches!(self.reading, Some(ReadFor::Download { .. })));
                let allowed = if self.version >= PIPELINED_DOWNLOAD_VERSION {
                    MAX_DOWNLOADS_IN_FLIGHT
                } else {
                    1
                };
                if waiting >= allowed {
                    return self.fail(
                        ErrorCode::UnexpectedMessage,
                        format!("more than {allowed} Downloads are waiting for an answer"),
                    );
                }
                self.live = false;
                if self.reading.is_some() {
                    self.queued_downloads.push_back((since, max_changes));
                } else {
                    self.start_read(since, max_changes);
                }
            }
            (RelayState::Open, Message::CheckHeads { after, max_records }) => {
                if self.digesting {
                    return self.fail(
                        ErrorCode::UnexpectedMessage,
                        "a CheckHeads arrived before the previous one was answered".into(),
                    );
                }
                if let Some(problem) = after.as_ref().and_then(oversized_name) {
                    return self.fail(ErrorCode::TooLarge, problem);
                }
                self.digesting = true;
                self.requested = true;
                self.effect(RelayEffect::DigestHeads {
                    after,
                    max_records: max_records.clamp(1, self.config.max_download_changes.max(1)),
                    collections: self.collections.clone(),
                });
            }
            (RelayState::Open, Message::Snapshot { after, max_records })
                if self.version >= SNAPSHOT_VERSION =>
            {
                if self.snapshotting {
                    return self.fail(
                        ErrorCode::UnexpectedMessage,
                        "a Snapshot arrived before the previous one was answered".into(),
                    );
                }
                if let Some(problem) = after.as_ref().and_then(oversized_name) {
                    return self.fail(ErrorCode::TooLarge, problem);
                }
                self.snapshotting = true;
                self.requested = true;
                self.effect(RelayEffect::ReadSnapshot {
                    after,
                    max_records: max_records.clamp(1, self.config.max_snapshot_records.max(1)),
                    collections: self.collections.clone(),
                });
            }
            (RelayState::Open, Message::UniqueIndex { after })
                if self.version >= UNIQUE_INDEX_VERSION =>
            {
                if self.snapshotting {
                    return self.fail(
                        ErrorCode::UnexpectedMessage,
                        "a UniqueIndex arrived before the previous request was answered".into(),
                    );
                }
                // A position is a unique value or a conflict id, bounded by the frame only: a
                // device resumes after the last one it was sent.
                self.snapshotting = true;
                self.requested = true;
                self.effect(RelayEffect::ReadUniqueIndex {
                    after,
                    max_values: self.config.max_snapshot_records.max(1),
                    collections: self.collections.clone(),
                });
            }
            (RelayState::Open, Message::Collections { names })
                if self.version >= COLLECTIONS_VERSION =>
            {
                if self.requested || self.collections.is_some() {
                    return self.fail(
                        ErrorCode::UnexpectedMessage,
                        "Collections comes once, before the session's first request".into(),
                    );
                }
                if names.len() > MAX_COLLECTIONS {
                    return self.fail(
                        ErrorCode::TooLarge,
                        format!(
                            "Collections names {} collections, over the limit of \
                             {MAX_COLLECTIONS}",
                            names.len()
                        ),
                    );
                }
                if let Some(name) = names
                    .iter()
                    .find(|n| n.is_empty() || n.len() > MAX_CREDENTIAL_BYTES)
                {
                    return self.fail(
                        ErrorCode::Malformed,
                        format!(
                            "Collections names a collection of {} bytes: no collection name is \
                             that long or empty",
                            name.len()
                        ),
                    );
                }
                if names.is_empty() {
                    return self.fail(
                        ErrorCode::Malformed,
                        "Collections names no collection: a device syncing every collection \
                         sends none"
                            .into(),
                    );
                }
                self.collections = Some(names.into_iter().collect());
            }
            (_, other) => self.fail(
                ErrorCode::UnexpectedMessage,
                format!(
                    "{} is not expected at this point of the session",
                    other.name()
                ),
            ),
        }
    }

    /// Reads for a `Download`: a range from version 4, one page before.
    fn start_read(&mut self, since: u64, max_changes: u32) {
        if self.version >= PIPELINED_DOWNLOAD_VERSION {
            return self.read_range(since, since.saturating_add(u64::from(max_changes)));
        }
        self.reading = Some(ReadFor::Download { since, end: None });
        self.effect(RelayEffect::Read {
            since,
            max_changes: max_changes.min(self.config.max_download_changes),
            push: false,
        });
    }

    /// Reads the next part of a range a `Download` asked for: at most a page of the relay's.
    fn read_range(&mut self, since: u64, end: u64) {
        let left = u32::try_from(end.saturating_sub(since)).unwrap_or(u32::MAX);
        self.reading = Some(ReadFor::Download {
            since,
            end: Some(end),
        });
        self.effect(RelayEffect::Read {
            since,
            max_changes: left.min(self.config.max_download_changes).max(1),
            push: false,
        });
    }

    fn fail(&mut self, code: ErrorCode, message: String) {
        if self.state == RelayState::Closed {
            return;
        }
        self.transmit(Message::Error {
            code,
            message: message.clone(),
        });
        self.close(Some(SessionError::Protocol { code, message }));
    }

    fn close(&mut self, error: Option<SessionError>) {
        if self.state == RelayState::Closed {
            return;
        }
        self.state = RelayState::Closed;
        self.event(RelayEvent::Closed { error });
    }
}

/// Why a credential is refused unread: it is longer than any token or code the relay issues.
fn oversized(credential: &Credential) -> Option<String> {
    let len = credential.secret().map_or(0, |s| s.expose().len());
    (len > MAX_CREDENTIAL_BYTES).then(|| {
        format!(
            "the {} is {len} bytes, over the limit of {MAX_CREDENTIAL_BYTES}",
            credential.name()
        )
    })
}

/// Checks a space name: 1 to [`MAX_SPACE_BYTES`] ASCII letters, digits, `-`, `_` or `.`.
pub fn validate_space(space: &str) -> Result<(), String> {
    let valid = !space.is_empty()
        && space.len() <= MAX_SPACE_BYTES
        && space
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "space name {space:?} is not valid: use 1 to {MAX_SPACE_BYTES} letters, digits, '-', '_' or '.'"
        ))
    }
}
