//! Ferry's wire types and the deterministic, I/O-free parts of sync.
//!
//! Owns: record addressing and its validation, time-ordered id generation, the SyncQueue and
//! SyncLog entry types with their state transitions, the sync protocol's messages and framing
//! (`wire`, specified in `PROTOCOL.md`, pinned by `tests/vectors/`), and the session state
//! machines that both the daemon and the relay drive (`session`). Everything here is plain data
//! and pure functions: no sockets, files, threads, clocks or global randomness. Time and random
//! bytes are passed in by the caller, so the same inputs always give the same outputs.
//!
//! Must not touch: tokio, sled, the filesystem, `SystemTime::now`, OS randomness.

pub mod address;
pub mod id;
pub mod queue;
pub mod session;
pub mod wire;

pub use address::{AddressError, Limits, validate_collection, validate_record_id};
pub use id::IdGenerator;
pub use queue::{
    Direction, Operation, QueueStatus, SyncLogEntry, SyncOutcome, SyncQueueEntry, TransitionError,
};
