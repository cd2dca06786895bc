//! What the device can truthfully say about its sync: the [`SyncStatus`] the engine publishes,
//! judged against the SyncQueue at the moment it is read, the last known state kept in the store
//! for when the daemon is not running, and the one-line-per-problem summary people read.
//!
//! `up_to_date` is true only when every condition holds at once: a live, signed-in connection;
//! no local change pending, being uploaded or refused; the device holds the relay's head as the
//! relay last confirmed it; and the session has nothing in flight. Every condition that fails is
//! named in `reasons`.
//!
//! Must not touch: the network, the store's layout or the session's decisions; this is a view.

use serde::{Deserialize, Serialize};

use crate::store::{LastKnownSync, QueueCounts};

/// Where the connection to the relay is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionState {
    Connecting,
    Connected,
    /// Waiting before the next attempt.
    Offline,
    /// Sync was paused (`ferry sync pause`): no connection until it is resumed.
    Paused,
    Stopped,
}

/// The last failure of a sync round or of one queue entry's upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncFailure {
    pub kind: String,
    pub message: String,
    pub at_ms: u64,
}

/// Why a device is not up to date, as `status.sync.reasons` lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Behind {
    /// No daemon runs: nothing syncs, and what is shown is the last known state.
    DaemonNotRunning,
    /// No live session with the relay (connecting, waiting to retry, or stopped).
    Disconnected,
    /// Local changes not yet stored by the relay (pending or being uploaded).
    PendingUploads,
    /// Local changes the relay refused, or that ran out of retries: they are not on the relay.
    FailedUploads,
    /// The relay's log goes further than this device has applied.
    BehindRelay,
    /// The session is still uploading or downloading.
    Syncing,
    /// Sync is paused: nothing is uploaded or downloaded until `ferry sync resume`.
    Paused,
}

impl Behind {
    pub fn as_str(self) -> &'static str {
        match self {
            Behind::DaemonNotRunning => "daemon_not_running",
            Behind::Disconnected => "disconnected",
            Behind::PendingUploads => "pending_uploads",
            Behind::FailedUploads => "failed_uploads",
            Behind::BehindRelay => "behind_relay",
            Behind::Syncing => "syncing",
            Behind::Paused => "paused",
        }
    }
}

/// The device's sync status, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncStatus {
    /// False when this was read from the store with no daemon running.
    pub daemon_running: bool,
    pub state: ConnectionState,
    /// The relay in use (`host:port` as configured): the one connected to, else the one used
    /// last, which the next attempt tries first.
    pub relay: String,
    /// The socket address `relay` resolved to for the live connection; `None` while
    /// disconnected.
    #[serde(default)]
    pub relay_addr: Option<String>,
    /// Every relay this device knows, in the order they are tried after `relay`.
    #[serde(default)]
    pub relays: Vec<String>,
    pub space: String,
    /// The collections this device syncs (`sync.collections`; empty: every one).
    #[serde(default)]
    pub collections: Vec<String>,
    /// When a sync last finished with nothing left to do.
    pub last_sync_ms: Option<u64>,
    /// The last failure; cleared by a round that ends with nothing left to do and nothing refused.
    pub last_error: Option<SyncFailure>,
    /// How far this device has applied the relay's log, and how far the log went when the relay
    /// last said so (at `relay_head_at_ms`).
    pub cursor: u64,
    pub relay_head: u64,
    pub relay_head_at_ms: Option<u64>,
    /// `relay_head - cursor`: log entries known to be missing here.
    pub behind_by: u64,
    /// Since when no live session is open; `None` while connected.
    pub disconnected_since_ms: Option<u64>,
    /// True only when `reasons` is empty.
    pub up_to_date: bool,
    pub reasons: Vec<Behind>,
    /// Local changes not yet stored by the relay: pending or being uploaded.
    pub pending_uploads: u64,
    /// Local changes that will not be uploaded again until retried (`ferry retry`).
    pub failed_uploads: u64,
    /// When the next upload attempt of an entry waiting out its backoff is due.
    pub next_retry_ms: Option<u64>,
    /// The session has work in flight (an upload or download not answered and recorded yet).
    pub syncing: bool,
    /// Changes uploaded and log entries applied since the daemon started.
    pub uploaded: u64,
    pub downloaded: u64,
    /// Queue entries the relay refused since the daemon started.
    pub rejected: u64,
    /// Conflicts found in the log entries applied since the daemon started.
    pub conflicts: u64,
    /// Conflicts per applied log entry in the last sync round that applied any.
    pub last_conflict_rate: f64,
    /// When the next connection attempt is due (while offline).
    pub next_attempt_ms: Option<u64>,
    /// UDP payload bytes sent to and received from the relay since the daemon started (QUIC
    /// and TLS overhead included), updated at each finalization and when a session ends.
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

impl SyncStatus {
    /// A status before anything is known of the relay.
    pub fn new(relay: String, space: String, cursor: u64) -> Self {
        SyncStatus {
            daemon_running: true,
            state: ConnectionState::Connecting,
            relays: vec![relay.clone()],
            relay,
            relay_addr: None,
            space,
            collections: Vec::new(),
            last_sync_ms: None,
            last_error: None,
            cursor,
            relay_head: 0,
            relay_head_at_ms: None,
            behind_by: 0,
            disconnected_since_ms: None,
            up_to_date: false,
            reasons: Vec::new(),
            pending_uploads: 0,
            failed_uploads: 0,
            next_retry_ms: None,
            syncing: false,
            uploaded: 0,
            downloaded: 0,
            rejected: 0,
            conflicts: 0,
            last_conflict_rate: 0.0,
            next_attempt_ms: None,
            bytes_sent: 0,
            bytes_received: 0,
        }
    }

    /// The state a daemon kept in the store, read with no daemon running, for a device that
    /// knows `relays`.
    pub fn last_known(
        relays: Vec<String>,
        space: String,
        cursor: u64,
        known: Option<LastKnownSync>,
        queue: &QueueCounts,
    ) -> Self {
        let relay = preferred_relay(&relays, known.as_ref());
        let mut status = SyncStatus::new(relay, space, cursor);
        status.relays = relays;
        status.daemon_running = false;
        status.state = ConnectionState::Stopped;
        if let Some(known) = known {
            status.relay_head = known.relay_head;
            status.relay_head_at_ms = known.relay_head_at_ms;
            status.last_sync_ms = known.last_sync_ms;
            status.last_error = known.last_error.map(|(kind, message, at_ms)| SyncFailure {
                kind,
                message,
                at_ms,
            });
            status.disconnected_since_ms = known.disconnected_since_ms;
        }
        status.judge(queue, None);
        status
    }

    /// What the store keeps of this status for when the daemon is not running, with the relay
    /// that last let the device in (`relay` may be one only being tried).
    pub fn to_last_known(&self, worked: Option<&str>) -> LastKnownSync {
        LastKnownSync {
            relay_head: self.relay_head,
            relay_head_at_ms: self.relay_head_at_ms,
            last_sync_ms: self.last_sync_ms,
            last_error: self
                .last_error
                .as_ref()
                .map(|e| (e.kind.clone(), e.message.clone(), e.at_ms)),
            disconnected_since_ms: self.disconnected_since_ms,
            relay: worked.map(str::to_owned),
        }
    }

    /// Fills in the queue's figures and decides `up_to_date`, naming every reason it is not.
    pub fn judge(&mut self, queue: &QueueCounts, next_retry_ms: Option<u64>) {
        self.pending_uploads = queue.pending + queue.processing;
        self.failed_uploads = queue.failed;
        self.next_retry_ms = next_retry_ms.filter(|_| self.pending_uploads > 0);
        self.behind_by = self.relay_head.saturating_sub(self.cursor);
        let mut reasons = Vec::new();
        if !self.daemon_running {
            reasons.push(Behind::DaemonNotRunning);
        }
        if self.state == ConnectionState::Paused {
            reasons.push(Behind::Paused);
        } else if self.state != ConnectionState::Connected {
            reasons.push(Behind::Disconnected);
        }
        if self.pending_uploads > 0 {
            reasons.push(Behind::PendingUploads);
        }
        if self.failed_uploads > 0 {
            reasons.push(Behind::FailedUploads);
        }
        // Unknown until the relay has said where its log ends.
        if self.behind_by > 0 || self.relay_head_at_ms.is_none() {
            reasons.push(Behind::BehindRelay);
        }
        if self.syncing {
            reasons.push(Behind::Syncing);
        }
        self.up_to_date = reasons.is_empty();
        self.reasons = reasons;
    }

    /// One line per problem (or one line saying all is well), with times relative to `now_ms`.
    pub fn summary(&self, now_ms: u64) -> Vec<String> {
        let ago = |at: u64| relative(now_ms, at);
        let mut lines = Vec::new();
        let only = if self.collections.is_empty() {
            String::new()
        } else {
            format!("; syncing only {}", self.collections.join(", "))
        };
        if self.up_to_date {
            lines.push(format!(
                "in sync with {} (log position {}{}{only})",
                self.relay,
                self.cursor,
                self.last_sync_ms
                    .map_or(String::new(), |at| format!(", checked {}", ago(at)))
            ));
            return lines;
        }
        if !only.is_empty() {
            lines.push(format!(
                "collections synced: {}",
                self.collections.join(", ")
            ));
        }
        if !self.daemon_running {
            lines.push(
                "the daemon is not running: nothing syncs until `ferry daemon` starts; what \
                 follows is the last known state"
                    .into(),
            );
        }
        match self.state {
            ConnectionState::Connected => {}
            ConnectionState::Stopped if !self.daemon_running => {}
            ConnectionState::Paused => lines.push(
                "sync is paused: nothing is uploaded or downloaded until `ferry sync resume`"
                    .into(),
            ),
            _ => {
                let since = self
                    .disconnected_since_ms
                    .map_or(String::new(), |at| format!(" since {}", ago(at)));
                let next = self
                    .next_attempt_ms
                    .map_or(String::new(), |at| format!("; next attempt {}", ago(at)));
                if self.relays.len() > 1 {
                    lines.push(format!(
                        "no relay reachable ({}; {} used last){since}{next}",
                        self.relays.join(", "),
                        self.relay
                    ));
                } else {
                    lines.push(format!("relay {} unreachable{since}{next}", self.relay));
                }
            }
        }
        if self.pending_uploads > 0 {
            let retry = self
                .next_retry_ms
                .map_or(String::new(), |at| format!(" (next retry {})", ago(at)));
            lines.push(format!(
                "{} waiting to upload{retry}",
                changes(self.pending_uploads)
            ));
        }
        if self.failed_uploads > 0 {
            lines.push(format!(
                "{} refused or out of retries: see `ferry queue --status failed`, then `ferry \
                 retry --all-failed`",
                changes(self.failed_uploads)
            ));
        }
        if self.reasons.contains(&Behind::BehindRelay) {
            match self.relay_head_at_ms {
                Some(at) => lines.push(format!(
                    "{} log entries behind the relay (head {} as of {})",
                    self.behind_by,
                    self.relay_head,
                    ago(at)
                )),
                None => lines.push("the relay's log head is not known yet".into()),
            }
        }
        if self.syncing && self.state == ConnectionState::Connected {
            lines.push("syncing now".into());
        }
        if let Some(error) = &self.last_error {
            lines.push(format!(
                "last error {} ({}): {}",
                ago(error.at_ms),
                error.kind,
                error.message
            ));
        }
        lines
    }
}

/// The relay to try first: the one that worked last, if it is still among `relays`, else the
/// first.
pub fn preferred_relay(relays: &[String], known: Option<&LastKnownSync>) -> String {
    known
        .and_then(|k| k.relay.as_ref())
        .filter(|last| relays.contains(last))
        .or(relays.first())
        .cloned()
        .unwrap_or_default()
}

fn changes(n: u64) -> String {
    if n == 1 {
        "1 change".into()
    } else {
        format!("{n} changes")
    }
}

/// "just now", "12 s ago", "5 min ago", "in 3 s", "2 h ago", "3 d ago".
pub fn relative(now_ms: u64, at_ms: u64) -> String {
    let (future, delta) = if at_ms > now_ms {
        (true, at_ms - now_ms)
    } else {
        (false, now_ms - at_ms)
    };
    let secs = delta / 1000;
    let amount = match secs {
        0 => return "just now".into(),
        1..=119 => format!("{secs} s"),
        120..=7199 => format!("{} min", secs / 60),
        7200..=172_799 => format!("{} h", secs / 3600),
        _ => format!("{} d", secs / 86_400),
    };
    if future {
        format!("in {amount}")
    } else {
        format!("{amount} ago")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connected_at(cursor: u64, head: u64) -> SyncStatus {
        let mut s = SyncStatus::new("relay:1".into(), "team".into(), cursor);
        s.state = ConnectionState::Connected;
        s.relay_head = head;
        s.relay_head_at_ms = Some(1);
        s
    }

    #[test]
    fn up_to_date_needs_every_condition() {
        let mut s = connected_at(7, 7);
        s.judge(&QueueCounts::default(), None);
        assert!(s.up_to_date, "{:?}", s.reasons);

        let queued = QueueCounts {
            pending: 2,
            processing: 1,
            ..QueueCounts::default()
        };
        let mut s = connected_at(7, 7);
        s.judge(&queued, Some(99));
        assert!(!s.up_to_date);
        assert_eq!(s.reasons, vec![Behind::PendingUploads]);
        assert_eq!((s.pending_uploads, s.next_retry_ms), (3, Some(99)));

        let failed = QueueCounts {
            failed: 1,
            ..QueueCounts::default()
        };
        let mut s = connected_at(7, 9);
        s.state = ConnectionState::Offline;
        s.syncing = true;
        s.judge(&failed, Some(99));
        assert_eq!(
            s.reasons,
            vec![
                Behind::Disconnected,
                Behind::FailedUploads,
                Behind::BehindRelay,
                Behind::Syncing
            ]
        );
        assert_eq!((s.behind_by, s.next_retry_ms), (2, None));

        // The relay never said where its log ends.
        let mut s = connected_at(0, 0);
        s.relay_head_at_ms = None;
        s.judge(&QueueCounts::default(), None);
        assert_eq!(s.reasons, vec![Behind::BehindRelay]);
    }

    #[test]
    fn the_last_known_state_is_never_up_to_date() {
        let mut live = connected_at(5, 5);
        live.last_sync_ms = Some(1_000);
        live.judge(&QueueCounts::default(), None);
        assert!(live.up_to_date);
        let known = live.to_last_known(Some("relay:1"));
        let s = SyncStatus::last_known(
            vec!["relay:1".into()],
            "team".into(),
            5,
            Some(known),
            &QueueCounts::default(),
        );
        assert!(!s.up_to_date);
        assert_eq!(
            s.reasons,
            vec![Behind::DaemonNotRunning, Behind::Disconnected]
        );
        assert_eq!((s.relay_head, s.last_sync_ms), (5, Some(1_000)));
        let lines = s.summary(61_000);
        assert!(lines[0].contains("not running"), "{lines:?}");
    }

    #[test]
    fn the_summary_has_one_line_per_problem() {
        let mut s = connected_at(101, 114);
        s.state = ConnectionState::Offline;
        s.disconnected_since_ms = Some(40_000);
        s.last_error = Some(SyncFailure {
            kind: "timeout".into(),
            message: "the relay did not answer".into(),
            at_ms: 50_000,
        });
        let queued = QueueCounts {
            pending: 3,
            ..QueueCounts::default()
        };
        s.judge(&queued, None);
        let lines = s.summary(100_000);
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert!(lines[0].starts_with("relay relay:1 unreachable since 60 s ago"));
        assert_eq!(lines[1], "3 changes waiting to upload");
        assert!(lines[2].starts_with("13 log entries behind the relay"));
        assert!(lines[3].starts_with("last error 50 s ago (timeout)"));
    }

    #[test]
    fn status_names_the_relay_in_use_and_the_one_that_worked_last() {
        let relays: Vec<String> = vec!["a:1".into(), "b:2".into(), "c:3".into()];
        let known = |relay: Option<&str>| LastKnownSync {
            relay: relay.map(str::to_owned),
            ..LastKnownSync::default()
        };
        assert_eq!(preferred_relay(&relays, None), "a:1");
        assert_eq!(preferred_relay(&relays, Some(&known(Some("b:2")))), "b:2");
        // A relay no longer configured is not tried.
        assert_eq!(preferred_relay(&relays, Some(&known(Some("d:4")))), "a:1");

        let mut s = SyncStatus::last_known(
            relays.clone(),
            "team".into(),
            0,
            Some(known(Some("c:3"))),
            &QueueCounts::default(),
        );
        assert_eq!((s.relay.as_str(), &s.relays), ("c:3", &relays));
        assert_eq!(s.to_last_known(Some("c:3")).relay.as_deref(), Some("c:3"));
        s.daemon_running = true;
        s.state = ConnectionState::Offline;
        s.judge(&QueueCounts::default(), None);
        let lines = s.summary(0);
        assert_eq!(
            lines[0], "no relay reachable (a:1, b:2, c:3; c:3 used last)",
            "{lines:?}"
        );
    }

    #[test]
    fn relative_times_read_naturally() {
        assert_eq!(relative(10_000, 10_000), "just now");
        assert_eq!(relative(10_000, 5_000), "5 s ago");
        assert_eq!(relative(5_000, 10_000), "in 5 s");
        assert_eq!(relative(600_000, 0), "10 min ago");
        assert_eq!(relative(3 * 3_600_000, 0), "3 h ago");
        assert_eq!(relative(3 * 86_400_000, 0), "3 d ago");
    }
}
