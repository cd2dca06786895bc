//! Alert rules: which conditions count as trouble, when an alert fires and when it clears.
//!
//! Owns the alert kinds, their thresholds (the `[alerts]` config section) and the [`Alerts`]
//! state machine: it is fed observations (a sync round's outcome, conflicts per applied change,
//! a heads comparison, bytes used, disk free) with the time passed in, and answers with the
//! [`Transition`]s they cause. An alert fires once when its condition starts and clears once when
//! it ends; a value has to get back past the threshold by a margin ([`CLEAR_MARGIN`]) to clear, so
//! a value hovering at the threshold does not flap.
//!
//! Must not touch: clocks, files, the network or logs. Measuring, logging and the webhook are
//! `alerting`'s.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};

/// How far past its threshold a measured value must get back before its alert clears, as a
/// fraction of the threshold.
pub const CLEAR_MARGIN: f64 = 0.1;

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// Sync rounds failed this many times in a row.
    SyncFailures,
    /// Too many of the changes applied lately brought a conflict.
    ConflictRate,
    /// After a sync that reported success, this device's records differ from the relay's.
    Inconsistency,
    /// Stored bytes over the quota (the relay: per account; a device: its data directory).
    StorageQuota,
    /// The disk holding the data directory is running out of space.
    DiskFree,
    /// Relay log entries this device could not apply were set aside.
    Quarantined,
    /// The store holds damaged or lost data (`ferry doctor`).
    StoreDamaged,
}

impl AlertKind {
    pub const ALL: [AlertKind; 7] = [
        AlertKind::SyncFailures,
        AlertKind::ConflictRate,
        AlertKind::Inconsistency,
        AlertKind::StorageQuota,
        AlertKind::DiskFree,
        AlertKind::Quarantined,
        AlertKind::StoreDamaged,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::SyncFailures => "sync_failures",
            AlertKind::ConflictRate => "conflict_rate",
            AlertKind::Inconsistency => "inconsistency",
            AlertKind::StorageQuota => "storage_quota",
            AlertKind::DiskFree => "disk_free",
            AlertKind::Quarantined => "quarantined",
            AlertKind::StoreDamaged => "store_damaged",
        }
    }
}

/// The `[alerts]` section: thresholds for the daemon and the relay, and where alerts are posted.
/// A threshold of 0 turns its alert off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// An `http://` URL each alert's firing and clearing is POSTed to as JSON; empty: none.
    pub webhook: String,
    /// Longest wait for the webhook to answer, in ms.
    pub webhook_timeout_ms: u64,
    /// Sync rounds failed in a row before `sync_failures` fires (a successful round clears it).
    pub sync_failures: u32,
    /// Conflicts per applied change, over the last `conflict_window` changes, at which
    /// `conflict_rate` fires (0.0 to 1.0).
    pub conflict_rate: f64,
    /// How many of the latest applied changes the conflict rate is measured over; it is only
    /// judged once that many were seen.
    pub conflict_window: u64,
    /// After a sync with nothing left to do, compare this device's record heads with the
    /// relay's (one digest per check) and raise `inconsistency` when they differ.
    pub check_consistency: bool,
    /// The relay: most bytes of changes one account's log may hold. A device: most bytes its
    /// data directory may take.
    pub account_quota_bytes: u64,
    /// Least free space on the data directory's disk, in MiB.
    pub min_disk_free_mb: u64,
    /// How often storage and disk free are measured, in seconds.
    pub check_interval_secs: u64,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            webhook: String::new(),
            webhook_timeout_ms: 5000,
            sync_failures: 5,
            conflict_rate: 0.2,
            conflict_window: 100,
            check_consistency: true,
            account_quota_bytes: 0,
            min_disk_free_mb: 512,
            check_interval_secs: 60,
        }
    }
}

impl AlertsConfig {
    /// Why the section cannot be used, naming the key.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.conflict_rate) {
            return Err("alerts.conflict_rate must be between 0.0 (off) and 1.0".into());
        }
        if self.conflict_window == 0 {
            return Err("alerts.conflict_window must be at least 1".into());
        }
        if self.check_interval_secs == 0 {
            return Err("alerts.check_interval_secs must be at least 1".into());
        }
        if self.webhook_timeout_ms == 0 {
            return Err("alerts.webhook_timeout_ms must be at least 1".into());
        }
        if !self.webhook.is_empty() && !self.webhook.starts_with("http://") {
            return Err(format!(
                "alerts.webhook {:?} is not an http:// URL: give one such as http://127.0.0.1:9000/alerts, or leave it empty",
                self.webhook
            ));
        }
        Ok(())
    }
}

/// An active alert, or the last state of one that cleared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub kind: AlertKind,
    pub message: String,
    /// When it fired (unix ms).
    pub since_ms: u64,
    /// The measured value that fired (or cleared) it, and the threshold it was judged against.
    pub value: f64,
    pub threshold: f64,
}

/// What an observation changed.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    Fired(Alert),
    /// The alert as it was, with the value that cleared it.
    Cleared(Alert),
}

impl Transition {
    pub fn alert(&self) -> &Alert {
        match self {
            Transition::Fired(a) | Transition::Cleared(a) => a,
        }
    }

    pub fn state(&self) -> &'static str {
        match self {
            Transition::Fired(_) => "fired",
            Transition::Cleared(_) => "cleared",
        }
    }
}

/// The alert state of one device, or of one account on the relay.
#[derive(Debug, Clone)]
pub struct Alerts {
    config: AlertsConfig,
    active: BTreeMap<AlertKind, Alert>,
    failures_in_a_row: u64,
    /// (changes, conflicts) per observation, newest last, covering at least the window.
    applied: VecDeque<(u64, u64)>,
    /// The active `disk_free` alert is for writes refused on a full disk (not for low space).
    writes_refused: bool,
}

/// Whether a measured value is bad when high (a count, a size) or when low (free space).
#[derive(Clone, Copy)]
enum Bad {
    Above,
    Below,
}

impl Alerts {
    pub fn new(config: AlertsConfig) -> Self {
        Alerts {
            config,
            active: BTreeMap::new(),
            failures_in_a_row: 0,
            applied: VecDeque::new(),
            writes_refused: false,
        }
    }

    pub fn active(&self) -> Vec<Alert> {
        self.active.values().cloned().collect()
    }

    pub fn round_failed(&mut self, now_ms: u64) -> Option<Transition> {
        self.failures_in_a_row = self.failures_in_a_row.saturating_add(1);
        self.failures(now_ms)
    }

    pub fn round_succeeded(&mut self, now_ms: u64) -> Option<Transition> {
        self.failures_in_a_row = 0;
        self.failures(now_ms)
    }

    fn failures(&mut self, now_ms: u64) -> Option<Transition> {
        let n = self.failures_in_a_row;
        self.judge(
            AlertKind::SyncFailures,
            n as f64,
            f64::from(self.config.sync_failures),
            Bad::Above,
            now_ms,
            || format!("{n} sync rounds failed in a row: see `ferry status` for the last error"),
        )
    }

    /// `changes` log entries were applied (the relay: appended), `conflicts` of them brought one.
    pub fn changes_applied(
        &mut self,
        changes: u64,
        conflicts: u64,
        now_ms: u64,
    ) -> Option<Transition> {
        if changes == 0 {
            return None;
        }
        self.applied.push_back((changes, conflicts.min(changes)));
        let window = self.config.conflict_window;
        // Drop the oldest observations as long as the rest still cover the window.
        while let Some(&(oldest, _)) = self.applied.front() {
            let total: u64 = self.applied.iter().map(|(c, _)| c).sum();
            if total.saturating_sub(oldest) >= window {
                self.applied.pop_front();
            } else {
                break;
            }
        }
        let (total, conflicted) = self
            .applied
            .iter()
            .fold((0u64, 0u64), |(t, k), (c, x)| (t + c, k + x));
        if total < window {
            return None;
        }
        let rate = conflicted as f64 / total as f64;
        self.judge(
            AlertKind::ConflictRate,
            rate,
            self.config.conflict_rate,
            Bad::Above,
            now_ms,
            || {
                format!(
                    "{conflicted} of the last {total} changes brought a conflict: see `ferry conflicts`"
                )
            },
        )
    }

    /// The result of comparing a device's record heads with the relay's over the same log
    /// prefix; `differing` says where, for the message. Ignored when the check is off.
    pub fn heads_compared(
        &mut self,
        matched: bool,
        differing: &str,
        now_ms: u64,
    ) -> Option<Transition> {
        if !self.config.check_consistency {
            return None;
        }
        let value = if matched { 0.0 } else { 1.0 };
        self.judge(AlertKind::Inconsistency, value, 1.0, Bad::Above, now_ms, || {
            format!(
                "this device's records differ from the relay's after a successful sync ({differing}): \
                 the relay may have been restored from an older copy; see the README's Alerts section"
            )
        })
    }

    /// `count` relay log entries are quarantined on this device (none: the alert clears).
    pub fn quarantined(&mut self, count: u64, now_ms: u64) -> Option<Transition> {
        self.judge(
            AlertKind::Quarantined,
            count as f64,
            1.0,
            Bad::Above,
            now_ms,
            || {
                format!(
                    "{count} relay log entries could not be applied and were set aside: see \
                     `ferry status` (quarantined) and the relay's version"
                )
            },
        )
    }

    /// What is wrong with the store and what to do, while something is (`None`: it is sound,
    /// or repaired). Fires whatever the thresholds: damage is never normal.
    pub fn store_damaged(&mut self, message: Option<&str>, now_ms: u64) -> Option<Transition> {
        match (message, self.active.contains_key(&AlertKind::StoreDamaged)) {
            (Some(message), false) => {
                let alert = Alert {
                    kind: AlertKind::StoreDamaged,
                    message: message.to_owned(),
                    since_ms: now_ms,
                    value: 1.0,
                    threshold: 1.0,
                };
                self.active.insert(AlertKind::StoreDamaged, alert.clone());
                Some(Transition::Fired(alert))
            }
            (None, true) => {
                let mut alert = self.active.remove(&AlertKind::StoreDamaged)?;
                alert.message = format!("{}; it is repaired", alert.message);
                alert.value = 0.0;
                Some(Transition::Cleared(alert))
            }
            _ => None,
        }
    }

    pub fn storage_used(&mut self, bytes: u64, now_ms: u64) -> Option<Transition> {
        let quota = self.config.account_quota_bytes;
        self.judge(
            AlertKind::StorageQuota,
            bytes as f64,
            quota as f64,
            Bad::Above,
            now_ms,
            || {
                format!(
                    "{bytes} bytes stored, over the quota of {quota} (alerts.account_quota_bytes)"
                )
            },
        )
    }

    /// The store refuses writes because the disk is full (`Some(since)`, in unix ms), or no
    /// longer does (`None`). A full disk fires `disk_free` whatever its threshold (even off),
    /// taking the place of a low-space alert; it clears once writes are taken again.
    pub fn writes_refused(&mut self, since_ms: Option<u64>) -> Option<Transition> {
        match (since_ms, self.writes_refused) {
            (Some(since), false) => {
                self.writes_refused = true;
                let alert = Alert {
                    kind: AlertKind::DiskFree,
                    message: format!(
                        "the data directory's disk is full: writes are refused since {since} \
                         (unix ms); free some space and they resume by themselves"
                    ),
                    since_ms: since,
                    value: 0.0,
                    threshold: self.config.min_disk_free_mb as f64,
                };
                self.active.insert(AlertKind::DiskFree, alert.clone());
                Some(Transition::Fired(alert))
            }
            (None, true) => {
                self.writes_refused = false;
                let mut alert = self.active.remove(&AlertKind::DiskFree)?;
                alert.message = format!("{}; writes are taken again", alert.message);
                Some(Transition::Cleared(alert))
            }
            _ => None,
        }
    }

    pub fn disk_free(&mut self, free_bytes: u64, now_ms: u64) -> Option<Transition> {
        if self.writes_refused {
            return None;
        }
        let min_mb = self.config.min_disk_free_mb;
        let free_mb = free_bytes / (1024 * 1024);
        self.judge(
            AlertKind::DiskFree,
            free_mb as f64,
            min_mb as f64,
            Bad::Below,
            now_ms,
            || {
                format!(
                    "{free_mb} MiB free on the data directory's disk, under alerts.min_disk_free_mb = {min_mb}: free some space"
                )
            },
        )
    }

    /// Fires or clears `kind` for `value` against `threshold` (0: the alert is off).
    fn judge(
        &mut self,
        kind: AlertKind,
        value: f64,
        threshold: f64,
        bad: Bad,
        now_ms: u64,
        message: impl FnOnce() -> String,
    ) -> Option<Transition> {
        let off = threshold <= 0.0;
        let margin = threshold * CLEAR_MARGIN;
        let (fires, clears) = match bad {
            Bad::Above => (value >= threshold, value < threshold - margin),
            Bad::Below => (value < threshold, value >= threshold + margin),
        };
        match self.active.get(&kind) {
            Some(_) if off || clears => {
                let mut alert = self.active.remove(&kind)?;
                alert.value = value;
                Some(Transition::Cleared(alert))
            }
            None if !off && fires => {
                let alert = Alert {
                    kind,
                    message: message(),
                    since_ms: now_ms,
                    value,
                    threshold,
                };
                self.active.insert(kind, alert.clone());
                Some(Transition::Fired(alert))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alerts(edit: impl FnOnce(&mut AlertsConfig)) -> Alerts {
        let mut config = AlertsConfig::default();
        edit(&mut config);
        Alerts::new(config)
    }

    fn fired(t: Option<Transition>) -> Alert {
        match t {
            Some(Transition::Fired(a)) => a,
            other => panic!("expected a firing, got {other:?}"),
        }
    }

    fn cleared(t: Option<Transition>) -> Alert {
        match t {
            Some(Transition::Cleared(a)) => a,
            other => panic!("expected a clearing, got {other:?}"),
        }
    }

    #[test]
    fn sync_failures_fire_at_the_threshold_once_and_clear_on_success() {
        let mut a = alerts(|c| c.sync_failures = 3);
        assert_eq!(a.round_failed(1), None);
        assert_eq!(a.round_failed(2), None);
        let alert = fired(a.round_failed(3));
        assert_eq!(
            (alert.kind, alert.since_ms, alert.value),
            (AlertKind::SyncFailures, 3, 3.0)
        );
        assert_eq!(a.round_failed(4), None, "fires once");
        assert_eq!(a.active().len(), 1);
        let gone = cleared(a.round_succeeded(5));
        assert_eq!((gone.since_ms, gone.value), (3, 0.0));
        assert!(a.active().is_empty());
        assert_eq!(a.round_succeeded(6), None);
    }

    #[test]
    fn conflict_rate_is_judged_over_the_window_with_a_margin() {
        let mut a = alerts(|c| {
            c.conflict_rate = 0.5;
            c.conflict_window = 10;
        });
        assert_eq!(
            a.changes_applied(4, 4, 1),
            None,
            "under the window: not judged"
        );
        let alert = fired(a.changes_applied(6, 2, 2));
        assert_eq!(alert.value, 0.6);
        // 6 of 11 is still over the threshold less its margin (0.45): still active.
        assert_eq!(a.changes_applied(1, 0, 3), None);
        assert_eq!(a.active().len(), 1);
        let gone = cleared(a.changes_applied(10, 0, 4));
        assert_eq!(gone.value, 0.0);
        assert_eq!(a.changes_applied(0, 0, 5), None);
    }

    #[test]
    fn the_window_keeps_only_what_covers_it() {
        let mut a = alerts(|c| {
            c.conflict_rate = 0.9;
            c.conflict_window = 2;
        });
        for t in 0..100 {
            assert_eq!(a.changes_applied(1, 0, t), None);
        }
        assert!(a.applied.len() <= 3, "{:?}", a.applied);
        fired(a.changes_applied(2, 2, 100));
    }

    #[test]
    fn inconsistency_fires_on_a_mismatch_and_clears_on_a_match() {
        let mut a = alerts(|_| {});
        assert_eq!(a.heads_compared(true, "", 1), None);
        let alert = fired(a.heads_compared(false, "3 records", 2));
        assert!(alert.message.contains("3 records"), "{}", alert.message);
        assert_eq!(a.heads_compared(false, "3 records", 3), None);
        cleared(a.heads_compared(true, "", 4));
        let mut off = alerts(|c| c.check_consistency = false);
        assert_eq!(off.heads_compared(false, "x", 1), None);
    }

    #[test]
    fn a_full_disk_fires_disk_free_even_when_it_is_off_and_clears_when_writes_resume() {
        let mib = 1024 * 1024;
        for min_mb in [0, 100] {
            let mut a = alerts(|c| c.min_disk_free_mb = min_mb);
            if min_mb > 0 {
                fired(a.disk_free(0, 1));
            }
            let alert = fired(a.writes_refused(Some(2)));
            assert_eq!((alert.kind, alert.since_ms), (AlertKind::DiskFree, 2));
            assert!(alert.message.contains("disk is full"), "{}", alert.message);
            assert_eq!(a.writes_refused(Some(2)), None, "fires once");
            assert_eq!(
                a.disk_free(500 * mib, 5),
                None,
                "space alone does not clear it"
            );
            assert_eq!(a.active().len(), 1);
            let alert = cleared(a.writes_refused(None));
            assert!(alert.message.contains("taken again"), "{}", alert.message);
            assert!(a.active().is_empty());
            assert_eq!(a.writes_refused(None), None);
        }
    }

    #[test]
    fn storage_quota_and_disk_free_use_a_margin_both_ways() {
        let mut a = alerts(|c| {
            c.account_quota_bytes = 1000;
            c.min_disk_free_mb = 100;
        });
        assert_eq!(a.storage_used(999, 1), None);
        fired(a.storage_used(1000, 2));
        assert_eq!(a.storage_used(950, 3), None, "within the margin");
        cleared(a.storage_used(899, 4));
        let mib = 1024 * 1024;
        assert_eq!(a.disk_free(100 * mib, 5), None);
        let alert = fired(a.disk_free(99 * mib, 6));
        assert_eq!((alert.value, alert.threshold), (99.0, 100.0));
        assert_eq!(a.disk_free(105 * mib, 7), None, "within the margin");
        cleared(a.disk_free(110 * mib, 8));
    }

    #[test]
    fn a_zero_threshold_is_off() {
        let mut a = alerts(|c| {
            c.sync_failures = 0;
            c.account_quota_bytes = 0;
            c.min_disk_free_mb = 0;
            c.conflict_rate = 0.0;
            c.conflict_window = 1;
        });
        assert_eq!(a.round_failed(1), None);
        assert_eq!(a.storage_used(u64::MAX, 1), None);
        assert_eq!(a.disk_free(0, 1), None);
        assert_eq!(a.changes_applied(5, 5, 1), None);
    }

    #[test]
    fn validation_names_the_key() {
        for (edit, key) in [
            (
                (|c: &mut AlertsConfig| c.conflict_rate = 1.5) as fn(&mut AlertsConfig),
                "alerts.conflict_rate",
            ),
            (|c| c.conflict_window = 0, "alerts.conflict_window"),
            (|c| c.check_interval_secs = 0, "alerts.check_interval_secs"),
            (|c| c.webhook = "https://x".into(), "alerts.webhook"),
        ] {
            let mut config = AlertsConfig::default();
            edit(&mut config);
            let err = config.validate().unwrap_err();
            assert!(err.contains(key), "{err}");
        }
        assert_eq!(AlertsConfig::default().validate(), Ok(()));
    }
}
