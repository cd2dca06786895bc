//! Time, as every process reads it: the wall clock in unix milliseconds behind the [`Clock`]
//! trait (so stores, the engine and the relay can run on a fake clock in tests), and the bridge
//! from a unix-milliseconds deadline to a tokio timer.
//!
//! Owns: reading the system time. Must not touch: anything else; every other module may use it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Source of the current time, so tests can run on a fake clock.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> u64;

    /// The tokio instant of a unix-milliseconds deadline on this clock.
    fn deadline(&self, at_ms: u64) -> tokio::time::Instant {
        let wait = at_ms.saturating_sub(self.now_ms());
        tokio::time::Instant::now() + Duration::from_millis(wait)
    }
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        now_ms()
    }
}

/// A clock that always reads the same time: every write at one moment (fuzzing, tests).
#[derive(Debug, Clone, Copy)]
pub struct FixedClock(pub u64);

impl Clock for FixedClock {
    fn now_ms(&self) -> u64 {
        self.0
    }
}

/// The wall clock in unix milliseconds (0 before 1970, which only a broken clock reports).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The tokio instant of a unix-milliseconds deadline on the wall clock.
pub fn deadline_instant(at_ms: u64) -> tokio::time::Instant {
    SystemClock.deadline(at_ms)
}

/// Sleeps until `deadline`, or forever without one (a `select!` branch that never fires).
pub async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
