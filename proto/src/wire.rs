//! The sync protocol's messages and their framing. `PROTOCOL.md` beside this crate is the
//! specification; the golden vectors in `tests/vectors/` pin the bytes.
//!
//! A frame is `length: u32 big-endian | flags: u8 | body`, where `length` counts the flags byte
//! and the body, and the body is one postcard-encoded [`Message`], zstd-compressed when flag bit 0
//! is set. Every decoder here is total: any input gives a message or a [`FrameError`].

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks best.
pub const PROTOCOL_VERSION: u16 = 8;
/// The first version with `CheckHeads` / `HeadsDigest`.
pub const HEADS_CHECK_VERSION: u16 = 3;
/// The first version in which `Changes` leaves out the entries the relay answered `Stored` or
/// `Duplicate` for earlier in the same session: the device holds their bytes, and their seqs.
pub const OWN_ENTRIES_LEFT_OUT_VERSION: u16 = 4;
/// The first version with `Snapshot` / `SnapshotPage` (PROTOCOL.md, section 5.8).
pub const SNAPSHOT_VERSION: u16 = 4;
/// The first version where a `Download` asks for a range, answered whole in one or more
/// `Changes`, and several may wait for their answers at once (PROTOCOL.md, section 5.3).
pub const PIPELINED_DOWNLOAD_VERSION: u16 = 4;
/// The first version whose log may hold purge entries (`LogEntry::is_purge`) and whose uploads
/// may be answered `Rejected{RecordPurged}` (PROTOCOL.md, section 5.8).
pub const PURGE_VERSION: u16 = 5;
/// The first version with `Collections`: a device that syncs only some collections
/// (PROTOCOL.md, section 5.9).
pub const COLLECTIONS_VERSION: u16 = 6;
/// The first version with `UniqueIndex` / `UniqueIndexPage`: a bootstrap of a space with unique
/// constraints takes the relay's unique-value index too (PROTOCOL.md, section 5.8).
pub const UNIQUE_INDEX_VERSION: u16 = 7;
/// The first version whose log may hold flatten entries (`LogEntry::is_flatten`): a record's
/// history started again by the relay as one change (PROTOCOL.md, section 5.8).
pub const FLATTEN_VERSION: u16 = 8;
/// The oldest protocol version this build still speaks. Version 1 had no accounts or tokens:
/// a relay that requires them cannot let a version 1 device in.
pub const MIN_PROTOCOL_VERSION: u16 = 2;
/// Longest credential string (token or enrolment code) a session accepts, in bytes; longer ones
/// are refused before anything looks inside them.
pub const MAX_CREDENTIAL_BYTES: usize = 4096;
/// Bytes before the body: the length and the flags.
pub const FRAME_HEADER_BYTES: usize = 5;
/// Bodies smaller than this are sent as they are: compressing them costs more than it saves.
pub const COMPRESS_FROM_BYTES: usize = 512;
/// zstd level 1: on change batches it keeps most of level 3's ratio at about twice the speed.
const ZSTD_LEVEL: i32 = 1;
const FLAG_ZSTD: u8 = 1;

/// A space is the set of records that a group of devices share; each has its own change log.
pub type Space = String;

/// Room a frame keeps beside one change's bytes for the message around it (names, positions and
/// the frame header, in an `Upload` or in a `Changes` page), far more than they can take.
pub const CHANGE_ENVELOPE_BYTES: usize = 4096;

/// The largest change a frame of `max_frame_bytes` can carry, alone in an `Upload` or in a page
/// of `Changes`: a larger change can never sync, so devices refuse to make one.
pub fn max_change_bytes(max_frame_bytes: usize) -> usize {
    max_frame_bytes.saturating_sub(CHANGE_ENVELOPE_BYTES)
}

/// One Automerge change of one record, as a device uploads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadChange {
    /// The device's queue entry id, echoed in the result.
    pub entry: u64,
    pub collection: String,
    pub record: String,
    /// Raw Automerge change bytes.
    #[serde(with = "serde_bytes")]
    pub change: Vec<u8>,
}

/// One change in a space's log, as the relay sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Position in the space's log: 1, 2, 3, ... with no gaps.
    pub seq: u64,
    pub collection: String,
    pub record: String,
    /// An Automerge change, or nothing for a purge entry.
    #[serde(with = "serde_bytes")]
    pub change: Vec<u8>,
}

impl LogEntry {
    /// A purge entry: the record's history ends here (PROTOCOL.md, section 5.8). No Automerge
    /// change is empty, so an empty `change` tells it apart with the entry's wire shape kept.
    pub fn purge(seq: u64, collection: String, record: String) -> Self {
        LogEntry {
            seq,
            collection,
            record,
            change: Vec::new(),
        }
    }

    pub fn is_purge(&self) -> bool {
        self.change.is_empty()
    }

    /// A flatten entry: its change depends on nothing and its message's first line is
    /// `flatten`, which only the relay writes (PROTOCOL.md, section 5.8). Read from the change
    /// chunk's header alone; bytes that are no change chunk are no flatten entry.
    pub fn is_flatten(&self) -> bool {
        change_message(&self.change).is_some_and(|(deps, message)| {
            deps == 0 && message.split('\n').next() == Some("flatten")
        })
    }
}

/// An Automerge change chunk's dependency count and message, read from its header (magic,
/// checksum, type 1, body length; then dependencies, actor, sequence number, first operation,
/// time, message), without checking the checksum.
fn change_message(bytes: &[u8]) -> Option<(u64, &str)> {
    fn uleb(rest: &mut &[u8]) -> Option<u64> {
        let mut value = 0u64;
        for (i, &b) in rest.iter().enumerate().take(10) {
            value |= u64::from(b & 0x7f).checked_shl(7 * i as u32)?;
            if b & 0x80 == 0 {
                *rest = rest.get(i + 1..)?;
                return Some(value);
            }
        }
        None
    }
    fn skip<'a>(rest: &mut &'a [u8], n: u64) -> Option<&'a [u8]> {
        let (taken, after) = rest.split_at_checked(usize::try_from(n).ok()?)?;
        *rest = after;
        Some(taken)
    }
    const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
    if bytes.get(..4)? != MAGIC || *bytes.get(8)? != 1 {
        return None;
    }
    let mut rest = bytes.get(9..)?;
    let _len = uleb(&mut rest)?;
    let deps = uleb(&mut rest)?;
    skip(&mut rest, deps.checked_mul(32)?)?;
    let actor = uleb(&mut rest)?;
    skip(&mut rest, actor)?;
    let _seq = uleb(&mut rest)?;
    let _start_op = uleb(&mut rest)?;
    let _time = uleb(&mut rest)?;
    let message = uleb(&mut rest)?;
    Some((deps, std::str::from_utf8(skip(&mut rest, message)?).ok()?))
}

/// What the relay did with one uploaded change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChangeOutcome {
    /// Durably appended to the log at `seq`.
    Stored { seq: u64 },
    /// The relay already had this change (at `seq`): nothing was added.
    Duplicate { seq: u64 },
    /// Not stored; `code` says whether trying again can help.
    Rejected { code: ErrorCode, message: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeResult {
    pub entry: u64,
    pub outcome: ChangeOutcome,
}

/// Why a session or a change was refused. The numbers are stable (see `PROTOCOL.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// A frame could not be decoded.
    Malformed,
    /// No protocol version in common.
    UnsupportedVersion,
    /// The signature or key did not check out.
    AuthenticationFailed,
    /// The device may not use this space.
    Forbidden,
    /// A frame, batch or field is over a limit.
    TooLarge,
    /// A message arrived that the session's state does not allow.
    UnexpectedMessage,
    /// Bytes that are not a valid Automerge change, or a bad collection name or record id.
    InvalidChange,
    /// The change depends on changes the relay does not hold yet: upload those first.
    MissingDependencies,
    /// The relay is at a limit (connections, queue depth): try again later.
    Overloaded,
    /// The relay failed (its store, for example): try again later.
    Internal,
    /// The relay is stopping.
    ShuttingDown,
    /// The peer did not answer in time.
    Timeout,
    /// The session's access token expired before the device refreshed it: reconnect.
    TokenExpired,
    /// Too many attempts from this address: wait, then try again.
    RateLimited,
    /// The change continues a record's history the relay purged (a tombstone past
    /// `tombstone_days`): the device meets the purge entry in the log and uploads the record as a
    /// new history instead (PROTOCOL.md, section 5.8).
    RecordPurged,
}

impl ErrorCode {
    /// A stable snake_case name, for metrics labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "malformed",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::AuthenticationFailed => "authentication_failed",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::UnexpectedMessage => "unexpected_message",
            ErrorCode::InvalidChange => "invalid_change",
            ErrorCode::MissingDependencies => "missing_dependencies",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Internal => "internal",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Timeout => "timeout",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::RecordPurged => "record_purged",
        }
    }

    /// Whether sending the same thing again later may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::MissingDependencies
                | ErrorCode::Overloaded
                | ErrorCode::Internal
                | ErrorCode::ShuttingDown
                | ErrorCode::Timeout
                | ErrorCode::TokenExpired
                | ErrorCode::RateLimited
                | ErrorCode::RecordPurged
        )
    }

    /// The class of failure shown in status, logs and the SyncLog.
    pub fn kind(self) -> ErrorKind {
        match self {
            ErrorCode::AuthenticationFailed | ErrorCode::Forbidden | ErrorCode::TokenExpired => {
                ErrorKind::Authentication
            }
            ErrorCode::Malformed
            | ErrorCode::UnsupportedVersion
            | ErrorCode::TooLarge
            | ErrorCode::UnexpectedMessage
            | ErrorCode::InvalidChange
            | ErrorCode::MissingDependencies
            | ErrorCode::RecordPurged => ErrorKind::Validation,
            ErrorCode::Overloaded
            | ErrorCode::Internal
            | ErrorCode::ShuttingDown
            | ErrorCode::RateLimited => ErrorKind::Server,
            ErrorCode::Timeout => ErrorKind::Timeout,
        }
    }
}

/// The five classes of sync failure that status, logs and the SyncLog tell apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorKind {
    Network,
    Authentication,
    Validation,
    Server,
    Timeout,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Network => "network",
            ErrorKind::Authentication => "authentication",
            ErrorKind::Validation => "validation",
            ErrorKind::Server => "server",
            ErrorKind::Timeout => "timeout",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A token or code. Its `Debug` shows only its length, so no log or error message can carry it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(text: impl Into<String>) -> Self {
        Secret(text.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

/// What a device shows, beside its key's signature, to be let in (PROTOCOL.md, section 5.3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Credential {
    /// The key alone: a registered device gets a new token family.
    Key,
    /// An access token the relay issued to this device and that has not expired: no new tokens.
    Access(Secret),
    /// The current refresh token of the device's family: it is rotated, and new tokens issued.
    Refresh(Secret),
    /// A one-time enrolment code of the account named in `Hello`: registers the device.
    Enrol(Secret),
}

impl Credential {
    pub fn name(&self) -> &'static str {
        match self {
            Credential::Key => "key",
            Credential::Access(_) => "access token",
            Credential::Refresh(_) => "refresh token",
            Credential::Enrol(_) => "enrolment code",
        }
    }

    /// The secret it carries, if any.
    pub fn secret(&self) -> Option<&Secret> {
        match self {
            Credential::Key => None,
            Credential::Access(s) | Credential::Refresh(s) | Credential::Enrol(s) => Some(s),
        }
    }
}

/// Tokens the relay issues: a short-lived access token (a JWT) and the next refresh token of
/// the device's family. Times are the relay's clock, unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tokens {
    pub access: Secret,
    pub access_expires_ms: u64,
    pub refresh: Secret,
    pub refresh_expires_ms: u64,
}

/// Every message of the protocol. New variants are only ever added at the end, so that the
/// postcard tags of the existing ones never change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Device → relay, first: who it is and which versions it speaks.
    Hello {
        min_version: u16,
        max_version: u16,
        /// The device's ed25519 public key; its device id is the first 16 bytes.
        public_key: [u8; 32],
        space: Space,
        /// The device's clock, unix milliseconds: the relay reports skew.
        time_ms: u64,
    },
    /// Relay → device: the version chosen and a fresh nonce to sign.
    Challenge {
        version: u16,
        nonce: [u8; 32],
        time_ms: u64,
    },
    /// Device → relay: an ed25519 signature over [`auth_transcript`], and the credential.
    Authenticate {
        #[serde(with = "signature_bytes")]
        signature: [u8; 64],
        credential: Credential,
    },
    /// Relay → device: the session is open.
    Welcome {
        time_ms: u64,
        /// The last seq in the space's log.
        head: u64,
        /// Largest upload batch the relay accepts, in changes.
        max_batch_changes: u32,
        /// Largest frame the relay accepts, in bytes.
        max_frame_bytes: u32,
        /// The session ends then (relay clock) unless the device refreshes before.
        expires_ms: u64,
        /// New tokens, unless the device came in with a valid access token.
        tokens: Option<Tokens>,
    },
    /// Device → relay: store these changes, in this order.
    Upload {
        batch: u64,
        changes: Vec<UploadChange>,
    },
    /// Relay → device: one result per uploaded change, in the upload's order.
    UploadAck {
        batch: u64,
        results: Vec<ChangeResult>,
    },
    /// Device → relay: send log entries after `since`.
    Download { since: u64, max_changes: u32 },
    /// Relay → device: the log from just after `after` up to and including `through`. From
    /// version 4 it leaves out the entries this session answered `Stored`/`Duplicate` for (the
    /// device has them). Sent as the answer to `Download` (`pushed == false`) or on its own when
    /// new changes arrive (`pushed == true`).
    Changes {
        after: u64,
        through: u64,
        head: u64,
        pushed: bool,
        entries: Vec<LogEntry>,
    },
    /// Either side: the session ends because of this.
    Error { code: ErrorCode, message: String },
    /// Device → relay: rotate this refresh token and extend the session.
    Refresh { refresh: Secret },
    /// Relay → device: the answer to `Refresh`.
    Refreshed {
        time_ms: u64,
        expires_ms: u64,
        tokens: Tokens,
    },
    /// Device → relay (version 3): digest the logged heads of up to `max_records` records of
    /// the space, in key order, after the record `after` (`None`: from the first).
    CheckHeads {
        after: Option<RecordName>,
        max_records: u32,
    },
    /// Relay → device: the answer to `CheckHeads`, as of the log's `head`: `records` records
    /// digested, the last of them `last`; `complete` when none follow it.
    HeadsDigest {
        head: u64,
        records: u32,
        last: Option<RecordName>,
        complete: bool,
        digest: [u8; 32],
    },
    /// Device → relay (version 4): send the documents of up to `max_records` records of the
    /// space, in key order, after the record `after` (`None`: from the first).
    Snapshot {
        after: Option<RecordName>,
        max_records: u32,
    },
    /// Relay → device: the answer to `Snapshot`, as of the log's `head` (no append in between):
    /// each record's document with every change logged up to `head`; `horizon` the lowest
    /// cursor the relay can still send the log after; `last` the last record of the page;
    /// `complete` when none follows it.
    SnapshotPage {
        head: u64,
        horizon: u64,
        records: Vec<SnapshotRecord>,
        last: Option<RecordName>,
        complete: bool,
    },
    /// Relay → device (version 4): the answer to a `Download` whose `since` lies below the
    /// relay's compaction horizon: the log up to `horizon` is no longer kept, so the device
    /// bootstraps from a snapshot instead (PROTOCOL.md, section 5.8).
    Compacted { horizon: u64 },
    /// Device → relay (version 6), before anything else once the session is open: this session
    /// syncs only these collections. `Changes`, pushes, `SnapshotPage` and `HeadsDigest` then
    /// hold only their records; cursors stay log positions (PROTOCOL.md, section 5.9).
    Collections { names: Vec<String> },
    /// Device → relay (version 7), once every `SnapshotPage` of a bootstrap is in: send the next
    /// page of the space's unique-value index after `after` (`None`: from the start).
    UniqueIndex { after: Option<IndexPosition> },
    /// Relay → device: the answer to `UniqueIndex`, as of the log's `head` (no append in
    /// between): either the holders of the unique values after the position asked for, in
    /// (collection, constraint, value) order, or, once no value is left, the space's conflict
    /// entries of kind `unique` after it, in id order; `last` where the next page starts;
    /// `complete` when none follows.
    UniqueIndexPage {
        head: u64,
        values: Vec<UniqueHolders>,
        /// A JSON array of conflict entries (their shape is the conflict entry's).
        #[serde(with = "serde_bytes")]
        conflicts: Vec<u8>,
        last: Option<IndexPosition>,
        complete: bool,
    },
}

/// Where a page of the unique-value index ends: a unique value, or a conflict entry once the
/// values are all sent.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum IndexPosition {
    Value(IndexValue),
    Conflict(String),
}

/// One value of a collection's unique constraint, as the unique-value index keys it: pages are
/// in the order of these fields.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IndexValue {
    pub collection: String,
    /// The constraint's place in the collection's list.
    pub constraint: u32,
    /// The constraint's field values, compact JSON.
    pub value: String,
}

/// The records holding one unique value, as `UniqueIndexPage` carries them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UniqueHolders {
    pub value: IndexValue,
    /// The holders as the relay keeps them, JSON (their shape is the unique index's).
    #[serde(with = "serde_bytes")]
    pub holders: Vec<u8>,
}

/// A page of a space's unique-value index: the fields of `Message::UniqueIndexPage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UniqueIndexPage {
    pub head: u64,
    pub values: Vec<UniqueHolders>,
    pub conflicts: Vec<u8>,
    pub last: Option<IndexPosition>,
    pub complete: bool,
}

/// A page of a space's snapshot: the fields of `Message::SnapshotPage`, as the relay's store
/// reads it and a device's store takes it in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotPage {
    pub head: u64,
    pub horizon: u64,
    pub records: Vec<SnapshotRecord>,
    pub last: Option<RecordName>,
    pub complete: bool,
}

/// One record of a `SnapshotPage`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub collection: String,
    pub record: String,
    /// The record's Automerge document, saved.
    #[serde(with = "serde_bytes")]
    pub document: Vec<u8>,
    /// The record's conflict entries as the relay holds them, a JSON array (their shape is the
    /// conflict entry's, which this crate does not know).
    #[serde(with = "serde_bytes")]
    pub conflicts: Vec<u8>,
}

/// A record of a space: its collection and id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RecordName {
    pub collection: String,
    pub record: String,
}

/// The digest of `HeadsDigest`: SHA-256 over, for each record in order, `collection`, a zero
/// byte, `record`, a zero byte, the number of heads (u32 big-endian) and the heads (32 bytes
/// each, sorted). Two stores over the same log prefix give the same digest for the same range.
pub struct HeadsHasher {
    hasher: sha2::Sha256,
    records: u32,
}

impl Default for HeadsHasher {
    fn default() -> Self {
        HeadsHasher {
            hasher: <sha2::Sha256 as sha2::Digest>::new(),
            records: 0,
        }
    }
}

impl HeadsHasher {
    /// Adds the next record (in key order) with its logged heads.
    pub fn record(&mut self, collection: &str, record: &str, heads: &mut [[u8; 32]]) {
        use sha2::Digest;
        heads.sort_unstable();
        self.hasher.update(collection.as_bytes());
        self.hasher.update([0]);
        self.hasher.update(record.as_bytes());
        self.hasher.update([0]);
        self.hasher
            .update(u32::try_from(heads.len()).unwrap_or(u32::MAX).to_be_bytes());
        for head in heads.iter() {
            self.hasher.update(head);
        }
        self.records = self.records.saturating_add(1);
    }

    /// The record count and the digest.
    pub fn finish(self) -> (u32, [u8; 32]) {
        use sha2::Digest;
        (self.records, self.hasher.finalize().into())
    }
}

impl Message {
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::Challenge { .. } => "Challenge",
            Message::Authenticate { .. } => "Authenticate",
            Message::Welcome { .. } => "Welcome",
            Message::Upload { .. } => "Upload",
            Message::UploadAck { .. } => "UploadAck",
            Message::Download { .. } => "Download",
            Message::Changes { .. } => "Changes",
            Message::Error { .. } => "Error",
            Message::Refresh { .. } => "Refresh",
            Message::Refreshed { .. } => "Refreshed",
            Message::CheckHeads { .. } => "CheckHeads",
            Message::HeadsDigest { .. } => "HeadsDigest",
            Message::Snapshot { .. } => "Snapshot",
            Message::SnapshotPage { .. } => "SnapshotPage",
            Message::Compacted { .. } => "Compacted",
            Message::Collections { .. } => "Collections",
            Message::UniqueIndex { .. } => "UniqueIndex",
            Message::UniqueIndexPage { .. } => "UniqueIndexPage",
        }
    }
}

/// The bytes a device signs to prove it holds its key: bound to the relay's nonce, to the TLS
/// session (`channel_binding`, from the TLS exporter; empty when there is none), to the space and
/// to the key itself, so a signature is worth nothing anywhere else.
pub fn auth_transcript(
    nonce: &[u8; 32],
    channel_binding: &[u8],
    space: &str,
    public_key: &[u8; 32],
) -> Vec<u8> {
    let mut t = Vec::with_capacity(64 + channel_binding.len() + space.len());
    t.extend_from_slice(b"ferry-sync-auth-v1\0");
    t.extend_from_slice(nonce);
    t.extend_from_slice(&(channel_binding.len() as u32).to_be_bytes());
    t.extend_from_slice(channel_binding);
    t.extend_from_slice(&(space.len() as u32).to_be_bytes());
    t.extend_from_slice(space.as_bytes());
    t.extend_from_slice(public_key);
    t
}

mod signature_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8; 64], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 64], D::Error> {
        let bytes: &[u8] = Deserialize::deserialize(d)?;
        bytes
            .try_into()
            .map_err(|_| serde::de::Error::invalid_length(bytes.len(), &"64 bytes"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes is over the limit of {max}: send smaller batches")]
    TooLarge { len: usize, max: usize },
    #[error("frame length is zero: every frame has at least a flags byte")]
    Empty,
    #[error("frame has unknown flags {0:#04x}: the peer speaks a newer protocol")]
    UnknownFlags(u8),
    #[error("frame body does not decompress: {0}")]
    Decompress(String),
    #[error("frame body is not a valid message: {0}")]
    Decode(String),
    #[error("frame body has {0} bytes left over after the message")]
    TrailingBytes(usize),
    #[error("message cannot be encoded ({0}): nothing was sent; please report this as a bug")]
    Encode(String),
}

impl FrameError {
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::TooLarge { .. } => ErrorCode::TooLarge,
            FrameError::Encode(_) => ErrorCode::Internal,
            _ => ErrorCode::Malformed,
        }
    }
}

/// Encodes `message` as one frame, compressed when that makes it at least 10% smaller.
pub fn encode_frame(message: &Message) -> Result<Vec<u8>, FrameError> {
    let mut body = postcard::to_stdvec(message).map_err(|e| FrameError::Encode(e.to_string()))?;
    let mut flags = 0;
    if body.len() >= COMPRESS_FROM_BYTES
        && let Ok(packed) = zstd::bulk::compress(&body, ZSTD_LEVEL)
        && packed.len() * 10 < body.len() * 9
    {
        body = packed;
        flags |= FLAG_ZSTD;
    }
    let len = body.len() + 1;
    let header = u32::try_from(len).map_err(|_| FrameError::TooLarge {
        len,
        max: u32::MAX as usize,
    })?;
    let mut frame = Vec::with_capacity(FRAME_HEADER_BYTES + body.len());
    frame.extend_from_slice(&header.to_be_bytes());
    frame.push(flags);
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// The length a frame header announces (flags and body), checked against `max_frame_bytes`, so
/// that a reader can refuse a frame before reading it.
pub fn frame_length(header: [u8; 4], max_frame_bytes: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > max_frame_bytes {
        return Err(FrameError::TooLarge {
            len,
            max: max_frame_bytes,
        });
    }
    Ok(len)
}

/// Decodes the part of a frame after its length: the flags byte and the body. A compressed body
/// may not decompress to more than `max_frame_bytes` either.
pub fn decode_frame_body(frame: &[u8], max_frame_bytes: usize) -> Result<Message, FrameError> {
    let (&flags, body) = frame.split_first().ok_or(FrameError::Empty)?;
    if frame.len() > max_frame_bytes {
        return Err(FrameError::TooLarge {
            len: frame.len(),
            max: max_frame_bytes,
        });
    }
    if flags & !FLAG_ZSTD != 0 {
        return Err(FrameError::UnknownFlags(flags));
    }
    let unpacked;
    let body = if flags & FLAG_ZSTD != 0 {
        // A body that says it unpacks to more than the limit is refused as too large, not as
        // malformed, so the sender learns to send smaller batches. The declared size is only a
        // claim: the decompression below stops at the limit whatever it says.
        if let Ok(Some(declared)) = zstd::zstd_safe::get_frame_content_size(body)
            && declared > max_frame_bytes as u64
        {
            return Err(FrameError::TooLarge {
                len: usize::try_from(declared).unwrap_or(usize::MAX),
                max: max_frame_bytes,
            });
        }
        unpacked = zstd::bulk::decompress(body, max_frame_bytes)
            .map_err(|e| FrameError::Decompress(e.to_string()))?;
        &unpacked[..]
    } else {
        body
    };
    let (message, rest) =
        postcard::take_from_bytes(body).map_err(|e| FrameError::Decode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::TrailingBytes(rest.len()));
    }
    Ok(message)
}

/// Splits whole frames off the front of a byte stream. Used where bytes arrive in arbitrary
/// pieces: the simulation's links, the fuzz targets.
#[derive(Debug)]
pub struct FrameReader {
    buffer: Vec<u8>,
    max_frame_bytes: usize,
}

impl FrameReader {
    pub fn new(max_frame_bytes: usize) -> Self {
        FrameReader {
            buffer: Vec::new(),
            max_frame_bytes,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next whole message, `None` when more bytes are needed. After an error the stream is
    /// beyond repair: the session must end.
    pub fn next_message(&mut self) -> Result<Option<Message>, FrameError> {
        let Some(header) = self.buffer.first_chunk::<4>() else {
            return Ok(None);
        };
        let len = frame_length(*header, self.max_frame_bytes)?;
        let Some(frame) = self.buffer.get(4..4 + len) else {
            return Ok(None);
        };
        let message = decode_frame_body(frame, self.max_frame_bytes);
        self.buffer.drain(..4 + len);
        message.map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_changes(n: u64) -> Message {
        Message::Changes {
            after: 0,
            through: n,
            head: n,
            pushed: false,
            entries: (1..=n)
                .map(|seq| LogEntry {
                    seq,
                    collection: "Customer".into(),
                    record: format!("c{seq}"),
                    change: b"name email phone city country".repeat(3),
                })
                .collect(),
        }
    }

    #[test]
    fn frames_round_trip_split_anywhere() {
        let messages = vec![
            Message::Download {
                since: 7,
                max_changes: 100,
            },
            sample_changes(50),
            Message::Authenticate {
                signature: [9; 64],
                credential: Credential::Refresh(Secret::new("rt1.family.secret")),
            },
            Message::Refreshed {
                time_ms: 5,
                expires_ms: 600_005,
                tokens: Tokens {
                    access: Secret::new("header.claims.signature"),
                    access_expires_ms: 600_005,
                    refresh: Secret::new("rt1.family.next"),
                    refresh_expires_ms: 9_000_000,
                },
            },
        ];
        let bytes: Vec<u8> = messages
            .iter()
            .flat_map(|m| encode_frame(m).unwrap())
            .collect();
        for step in [1, 3, 7, 1000] {
            let mut reader = FrameReader::new(1 << 20);
            let mut got = Vec::new();
            for piece in bytes.chunks(step) {
                reader.push(piece);
                while let Some(m) = reader.next_message().unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(got, messages);
        }
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let message = Message::Authenticate {
            signature: [1; 64],
            credential: Credential::Enrol(Secret::new("acme/SECRETCODE")),
        };
        let shown = format!("{message:?}");
        assert!(!shown.contains("SECRETCODE"), "{shown}");
        assert!(shown.contains("Secret(15 bytes)"), "{shown}");
    }

    #[test]
    fn repetitive_bodies_are_compressed_small_ones_are_not() {
        let big = encode_frame(&sample_changes(50)).unwrap();
        assert_eq!(big[4], FLAG_ZSTD);
        let raw = postcard::to_stdvec(&sample_changes(50)).unwrap();
        assert!(big.len() * 3 < raw.len(), "{} vs {}", big.len(), raw.len());
        let small = encode_frame(&Message::Download {
            since: 1,
            max_changes: 2,
        })
        .unwrap();
        assert_eq!(small[4], 0);
    }

    #[test]
    fn limits_apply_before_and_after_decompression() {
        let frame = encode_frame(&sample_changes(200)).unwrap();
        assert!(matches!(
            frame_length(frame[..4].try_into().unwrap(), 100),
            Err(FrameError::TooLarge { .. })
        ));
        // Small on the wire, large once unpacked: refused too.
        let wire_len = frame.len() - 4;
        assert!(matches!(
            decode_frame_body(&frame[4..], wire_len + 10),
            Err(FrameError::TooLarge { .. })
        ));
        // A body that hides its size (a streaming encoder) is still cut off at the limit.
        let raw = postcard::to_stdvec(&sample_changes(200)).unwrap();
        let mut hidden = vec![FLAG_ZSTD];
        let mut encoder = zstd::stream::write::Encoder::new(&mut hidden, 1).unwrap();
        std::io::Write::write_all(&mut encoder, &raw).unwrap();
        encoder.finish().unwrap();
        assert!(matches!(
            zstd::zstd_safe::get_frame_content_size(&hidden[1..]),
            Ok(None)
        ));
        assert!(matches!(
            decode_frame_body(&hidden, raw.len() - 1),
            Err(FrameError::Decompress(_))
        ));
        assert_eq!(
            decode_frame_body(&hidden, raw.len()),
            Ok(sample_changes(200))
        );
    }

    #[test]
    fn bad_frames_are_errors() {
        assert_eq!(frame_length([0; 4], 10), Err(FrameError::Empty));
        assert_eq!(
            decode_frame_body(&[0x80, 0], 10),
            Err(FrameError::UnknownFlags(0x80))
        );
        assert!(matches!(
            decode_frame_body(&[0, 200], 10),
            Err(FrameError::Decode(_))
        ));
        let mut frame = encode_frame(&Message::Download {
            since: 1,
            max_changes: 2,
        })
        .unwrap();
        frame.push(0);
        assert_eq!(
            decode_frame_body(&frame[4..], 100),
            Err(FrameError::TrailingBytes(1))
        );
    }
}
