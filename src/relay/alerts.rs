//! The relay's alerts: per account, its log's bytes against `alerts.account_quota_bytes` and the
//! rate of conflicts its appended changes bring; for the whole relay, the free space of the disk
//! holding its data directory. [`RelayAlerts::active`] is what the web interface shows for an
//! account.
//!
//! Owns: turning the store's per-space totals, and the damaged values sessions met, into
//! observations for the account's alerts.
//! Must not touch: the log (it only reads the store's counters), sessions, HTTP routes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::storage::RecordKey;
use super::store::{RelayStore, RelayStoreError};
use crate::alerting::{self, Monitor};
use crate::alerts::{Alert, AlertsConfig};
use crate::clock::Clock;

/// The relay's alert state, shared by the sessions, the disk check and the HTTPS API.
pub struct RelayAlerts {
    clock: Arc<dyn Clock>,
    monitor: Arc<Monitor>,
    /// Per space: the log's head and the conflicts counted when last observed, so each append
    /// feeds only what it added.
    seen: Mutex<HashMap<String, (u64, u64)>>,
    /// Per space: the damaged values read since the relay started, with the record each
    /// belongs to (if one), what the `store_damaged` alert is about.
    damage: Mutex<HashMap<String, Vec<Damage>>>,
}

/// A damaged value a session met: the record it belongs to (if one) and what the relay said.
type Damage = (Option<RecordKey>, String);

impl std::fmt::Debug for RelayAlerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayAlerts").finish_non_exhaustive()
    }
}

impl RelayAlerts {
    /// Call inside the tokio runtime (a configured webhook gets its sender task).
    pub fn new(config: AlertsConfig, clock: Arc<dyn Clock>) -> Arc<Self> {
        Arc::new(RelayAlerts {
            clock,
            monitor: Monitor::new(config, "relay"),
            seen: Mutex::new(HashMap::new()),
            damage: Mutex::new(HashMap::new()),
        })
    }

    /// The alerts active for the account whose space is `space`, and the relay's own.
    pub fn active(&self, space: &str) -> Vec<Alert> {
        self.monitor.active(space)
    }

    pub fn monitor(&self) -> &Monitor {
        &self.monitor
    }

    /// After changes were appended to `space`: its storage and conflict rate. Reads the store.
    pub fn appended(&self, store: &RelayStore, space: &str) {
        if let Err(e) = self.observe_space(store, space) {
            tracing::warn!(space, error = %e, "cannot measure the account for its alerts");
        }
    }

    /// After `space`'s log was compacted: its storage again, so a quota alert clears once the
    /// log is back under the quota.
    pub fn compacted(&self, store: &RelayStore, space: &str) {
        if let Err(e) = self.observe_space(store, space) {
            tracing::warn!(space, error = %e, "cannot measure the account for its alerts");
        }
    }

    fn observe_space(&self, store: &RelayStore, space: &str) -> Result<(), RelayStoreError> {
        let now = self.clock.now_ms();
        let bytes = store.log_bytes(space)?;
        self.monitor
            .observe(space, now, |a, now| a.storage_used(bytes, now));
        let (head, conflicts) = (store.head(space)?, store.conflicts_total(space)?);
        let before = {
            let mut seen = lock(&self.seen);
            let entry = seen.entry(space.to_string()).or_insert((head, conflicts));
            let before = *entry;
            *entry = (head.max(before.0), conflicts.max(before.1));
            before
        };
        let (added, found) = (
            head.saturating_sub(before.0),
            conflicts.saturating_sub(before.1),
        );
        self.monitor
            .observe(space, now, |a, now| a.changes_applied(added, found, now));
        Ok(())
    }

    /// A stored value of `space` failed its checksum when read (`what` says which; `record`,
    /// the record it belongs to, if one): it was not served, and the account's alert stays
    /// until the relay restarts or every damaged value it saw was a record's that was rebuilt.
    pub fn damaged(&self, space: &str, record: Option<&RecordKey>, what: &str) {
        {
            let mut damage = lock(&self.damage);
            let seen = damage.entry(space.to_owned()).or_default();
            if !seen.iter().any(|(_, message)| message == what) {
                seen.push((record.cloned(), what.to_owned()));
            }
        }
        self.monitor.observe(space, self.clock.now_ms(), |a, now| {
            a.store_damaged(Some(what), now)
        });
    }

    /// `record` of `space` was rebuilt from the log: its damage is gone. The alert clears when
    /// no other damaged value was seen in the space, and otherwise fires again on what is left.
    pub fn rebuilt(&self, space: &str, record: &RecordKey) {
        let left = {
            let mut damage = lock(&self.damage);
            let Some(seen) = damage.get_mut(space) else {
                return;
            };
            let before = seen.len();
            seen.retain(|(of, _)| of.as_ref() != Some(record));
            if seen.len() == before {
                return;
            }
            seen.first().map(|(_, message)| message.clone())
        };
        let now = self.clock.now_ms();
        self.monitor
            .observe(space, now, |a, now| a.store_damaged(None, now));
        if let Some(message) = left {
            self.monitor
                .observe(space, now, |a, now| a.store_damaged(Some(&message), now));
        }
    }

    /// Measures the data directory's disk now and every `alerts.check_interval_secs`, until
    /// `shutdown` turns true.
    pub async fn check_disk(
        self: Arc<Self>,
        data_dir: PathBuf,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let every = Duration::from_secs(self.monitor.config().check_interval_secs);
        loop {
            let (dir, alerts) = (data_dir.clone(), self.clone());
            let measured = tokio::task::spawn_blocking(move || match alerting::disk_free(&dir) {
                Ok(free) => alerts
                    .monitor
                    .observe("", alerts.clock.now_ms(), |a, now| a.disk_free(free, now)),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the free space of the relay's disk")
                }
            })
            .await;
            if let Err(e) = measured {
                tracing::error!(error = %e, "measuring the relay's disk failed");
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every holder leaves the map whole before anything can panic.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::AlertKind;
    use crate::clock::FixedClock;

    fn store_damaged(alerts: &RelayAlerts) -> Option<String> {
        alerts
            .active("team")
            .into_iter()
            .find(|a| a.kind == AlertKind::StoreDamaged)
            .map(|a| a.message)
    }

    /// A rebuilt record's damage is forgotten: the alert stays on what else was seen damaged
    /// (another record's, or a value of no record), and clears once nothing is left.
    #[test]
    fn a_rebuild_clears_the_alert_once_no_damage_is_left() {
        let alerts = RelayAlerts::new(AlertsConfig::default(), Arc::new(FixedClock(1)));
        let record = |id: &str| ("Note".to_owned(), id.to_owned());
        alerts.damaged("team", Some(&record("a")), "a is damaged");
        alerts.damaged("team", Some(&record("b")), "b is damaged");
        alerts.damaged("team", None, "log entry 7 is damaged");
        assert_eq!(store_damaged(&alerts).as_deref(), Some("a is damaged"));
        alerts.rebuilt("team", &record("a"));
        assert_eq!(store_damaged(&alerts).as_deref(), Some("b is damaged"));
        alerts.rebuilt("team", &record("b"));
        assert_eq!(
            store_damaged(&alerts).as_deref(),
            Some("log entry 7 is damaged")
        );
        alerts.rebuilt("team", &record("c"));
        assert!(store_damaged(&alerts).is_some(), "a log entry is no record");

        let other = RelayAlerts::new(AlertsConfig::default(), Arc::new(FixedClock(1)));
        other.damaged("team", Some(&record("a")), "a is damaged");
        other.rebuilt("team", &record("a"));
        assert_eq!(store_damaged(&other), None);
    }
}
