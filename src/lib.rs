//! Ferry: an offline-first sync daemon. See ARCHITECTURE.md for the map.

pub mod alerting;
pub mod alerts;
pub mod auth;
pub mod cli;
pub mod clock;
pub mod config;
pub mod crypt;
pub mod daemon;
pub mod datadir;
pub mod demo;
pub mod drive;
pub mod engine;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod hex;
pub mod ipc;
pub mod metrics;
pub mod query;
pub mod record;
pub mod relay;
pub mod resolve;
pub mod service;
pub mod store;
pub mod transport;
