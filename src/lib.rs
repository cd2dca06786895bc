//! Ferry: an offline-first sync daemon. See ARCHITECTURE.md for the map.

pub mod record;
pub mod store;
