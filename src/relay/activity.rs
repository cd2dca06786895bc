//! What each account's devices did with the relay, for the web interface: the sync log (one
//! entry per upload, download or push, and per session that ended in an error), per-minute
//! totals for its charts, and each device's last sync and how far the log it was sent reaches.
//!
//! Kept in memory and bounded (the newest `LOG_ENTRIES` entries and `MINUTES` minutes per
//! space): it is a view for people, rebuilt as devices sync after a restart. The durable records
//! are the log itself and each device's own sync log.
//!
//! Must not touch: the store, sessions, accounts. It only observes what `relay::server` tells it.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde::Serialize;

/// Sync log entries kept per space.
pub const LOG_ENTRIES: usize = 1_000;
/// Minutes of chart totals kept per space (a day).
pub const MINUTES: usize = 24 * 60;

const MINUTE_MS: u64 = 60_000;

/// What a sync log entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncKind {
    /// A batch of the device's changes appended to the log.
    Upload,
    /// Log entries the device asked for.
    Download,
    /// Log entries sent to a live device as soon as they were appended.
    Push,
    /// A session that ended in an error.
    Session,
}

/// One entry of a space's sync log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SyncEvent {
    pub time_ms: u64,
    pub device: String,
    pub kind: SyncKind,
    /// Changes uploaded (stored), or log entries sent.
    pub changes: u64,
    /// Uploaded changes already in the log.
    pub duplicates: u64,
    /// Uploaded changes refused.
    pub rejected: u64,
    /// Conflicts the upload's changes brought.
    pub conflicts: u64,
    /// `"ok"`, or the error's kind.
    pub outcome: String,
    /// What went wrong, for a failed entry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub duration_ms: f64,
}

/// One minute of a space's sync traffic.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Minute {
    /// The minute's start, ms since the epoch.
    pub start_ms: u64,
    pub uploads: u64,
    pub downloads: u64,
    pub changes_up: u64,
    pub changes_down: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub conflicts: u64,
    /// Total time the minute's uploads and downloads took, ms (mean: divide by their count).
    pub duration_ms: f64,
}

/// A device's latest sync with the relay.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DeviceSync {
    pub last_sync_ms: u64,
    /// The log position the device has been sent up to (0: nothing yet since the relay started).
    pub sent_through: u64,
}

#[derive(Debug, Default)]
struct SpaceActivity {
    log: VecDeque<SyncEvent>,
    minutes: VecDeque<Minute>,
    devices: HashMap<String, DeviceSync>,
}

/// Every space's activity.
#[derive(Debug, Default)]
pub struct Activity {
    spaces: Mutex<HashMap<String, SpaceActivity>>,
}

impl Activity {
    /// Records one entry; `through` is the log position an upload or download reached.
    pub fn record(&self, space: &str, event: SyncEvent, through: Option<u64>) {
        let mut spaces = self.spaces.lock().unwrap_or_else(|e| e.into_inner());
        let activity = spaces.entry(space.to_owned()).or_default();
        let start_ms = event.time_ms - event.time_ms % MINUTE_MS;
        if activity
            .minutes
            .back()
            .is_none_or(|m| m.start_ms < start_ms)
        {
            activity.minutes.push_back(Minute {
                start_ms,
                ..Minute::default()
            });
            while activity.minutes.len() > MINUTES {
                activity.minutes.pop_front();
            }
        }
        // An event stamped before the newest minute (clocks are read per thread) counts there.
        if let Some(minute) = activity.minutes.back_mut() {
            match event.kind {
                SyncKind::Upload => {
                    minute.uploads += 1;
                    minute.changes_up += event.changes;
                    minute.duration_ms += event.duration_ms;
                }
                SyncKind::Download | SyncKind::Push => {
                    minute.downloads += 1;
                    minute.changes_down += event.changes;
                    minute.duration_ms += event.duration_ms;
                }
                SyncKind::Session => {}
            }
            if event.outcome == "ok" {
                minute.succeeded += 1;
            } else {
                minute.failed += 1;
            }
            minute.conflicts += event.conflicts;
        }
        if event.kind != SyncKind::Session {
            let device = activity.devices.entry(event.device.clone()).or_default();
            device.last_sync_ms = device.last_sync_ms.max(event.time_ms);
            if let Some(through) = through
                && event.kind != SyncKind::Upload
            {
                device.sent_through = device.sent_through.max(through);
            }
        }
        activity.log.push_back(event);
        while activity.log.len() > LOG_ENTRIES {
            activity.log.pop_front();
        }
    }

    /// The space's newest sync log entries, newest first.
    pub fn log(&self, space: &str, limit: usize) -> Vec<SyncEvent> {
        let spaces = self.spaces.lock().unwrap_or_else(|e| e.into_inner());
        spaces
            .get(space)
            .map(|a| a.log.iter().rev().take(limit).cloned().collect())
            .unwrap_or_default()
    }

    /// The space's per-minute totals since `since_ms`, oldest first (minutes with no traffic
    /// are absent).
    pub fn minutes(&self, space: &str, since_ms: u64) -> Vec<Minute> {
        let spaces = self.spaces.lock().unwrap_or_else(|e| e.into_inner());
        spaces
            .get(space)
            .map(|a| {
                a.minutes
                    .iter()
                    .filter(|m| m.start_ms + MINUTE_MS > since_ms)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The device's latest sync, if it synced since the relay started.
    pub fn device(&self, space: &str, device: &str) -> Option<DeviceSync> {
        let spaces = self.spaces.lock().unwrap_or_else(|e| e.into_inner());
        spaces.get(space)?.devices.get(device).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(time_ms: u64, kind: SyncKind, changes: u64, outcome: &str) -> SyncEvent {
        SyncEvent {
            time_ms,
            device: "d1".into(),
            kind,
            changes,
            duplicates: 0,
            rejected: 0,
            conflicts: u64::from(kind == SyncKind::Upload),
            outcome: outcome.into(),
            error: None,
            duration_ms: 2.0,
        }
    }

    #[test]
    fn minutes_total_the_traffic_and_the_log_keeps_the_newest() {
        let activity = Activity::default();
        activity.record("s", event(60_000, SyncKind::Upload, 3, "ok"), Some(3));
        activity.record("s", event(61_000, SyncKind::Download, 5, "ok"), Some(8));
        activity.record("s", event(125_000, SyncKind::Session, 0, "timeout"), None);
        let minutes = activity.minutes("s", 0);
        assert_eq!(minutes.len(), 2);
        assert_eq!(
            minutes[0],
            Minute {
                start_ms: 60_000,
                uploads: 1,
                downloads: 1,
                changes_up: 3,
                changes_down: 5,
                succeeded: 2,
                failed: 0,
                conflicts: 1,
                duration_ms: 4.0,
            }
        );
        assert_eq!((minutes[1].failed, minutes[1].succeeded), (1, 0));
        assert_eq!(activity.minutes("s", 120_000).len(), 1);
        let log = activity.log("s", 2);
        assert_eq!(log[0].kind, SyncKind::Session, "newest first");
        assert_eq!(log.len(), 2);
        assert_eq!(
            activity.device("s", "d1"),
            Some(DeviceSync {
                last_sync_ms: 61_000,
                sent_through: 8
            })
        );
        assert!(activity.log("other", 10).is_empty());

        for i in 0..LOG_ENTRIES as u64 + 5 {
            activity.record(
                "s",
                event(200_000 + i, SyncKind::Push, 1, "ok"),
                Some(9 + i),
            );
        }
        assert_eq!(activity.log("s", usize::MAX).len(), LOG_ENTRIES);
    }
}
