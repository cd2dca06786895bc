//! `ferry status`: what the device holds and whether it is in sync, as one line per fact or
//! problem, times relative to now. With no daemon running it reads the store and shows the last
//! sync state the daemon kept there, saying that nothing syncs meanwhile.
//!
//! Must not touch: the store's contents (it only reads).

use crate::auth::credentials::Registration;
use crate::clock::now_ms;
use crate::engine::{SyncSettings, SyncStatus, relative};
use crate::ipc::DaemonStatus;
use crate::service::Service;
use crate::service::api::{DoctorAnswer, QuarantinedSummary, Storage};

use super::{Context, Failure, print_alerts};

/// The sync section `status` shows with no daemon running: the last state the daemon kept, or
/// `None` when this device does not sync.
pub(super) fn last_known(ctx: &Context, service: &Service) -> Result<Option<SyncStatus>, Failure> {
    let config = Registration::sync_config(ctx.dir.path(), &ctx.config.sync)
        .map_err(|e| Failure::failed(format!("cannot read this device's registration: {e}")))?;
    // Sync that is off, or configured so that the daemon would not start it, has no state.
    let Ok(Some(settings)) = SyncSettings::from_config(&config) else {
        return Ok(None);
    };
    let store = service.store();
    let cursor = store
        .sync_cursor()
        .map_err(|e| Failure::failed(e.to_string()))?;
    let known = store.last_known_sync().unwrap_or_else(|e| {
        eprintln!("the last sync state cannot be read ({e}): showing what the store holds");
        None
    });
    let queue = store
        .queue_counts()
        .map_err(|e| Failure::failed(e.to_string()))?;
    let mut status = SyncStatus::last_known(settings.relays, settings.space, cursor, known, &queue);
    status.collections = store.synced_collections();
    Ok(Some(status))
}

/// The human form of `doctor`'s answer.
pub(super) fn print_doctor(answer: &DoctorAnswer) {
    let c = &answer.checkup;
    let read = format!(
        "{} keys, {} documents, {} queue entries, {} journal records (a copy of each local change until the journal is rewritten)",
        c.keys, c.documents, c.queue_entries, c.journaled_changes
    );
    match &c.damage {
        None => println!("store: sound ({read})"),
        Some(damage) => {
            println!("store: DAMAGED ({read}): {}", damage.summary());
            if let Some(lost) = &damage.lost_batches {
                println!(
                    "  lost: batches {} to {} were made durable and are gone from the data",
                    lost.found + 1,
                    lost.durable
                );
            }
            for value in &damage.damaged {
                println!("  damaged {} {}: {}", value.kind, value.key, value.detail);
            }
            for change in &damage.recoverable {
                println!(
                    "  unsynced change {} ({:?} of {}/{}) is missing from the queue: the journal \
                     keeps it",
                    change.queue_id, change.operation, change.collection, change.id
                );
            }
            for id in &damage.unrecoverable {
                println!("  queue entry {id} is damaged and has no copy: its change is lost");
            }
        }
    }
    if let Some(r) = &answer.repaired {
        println!(
            "repaired: {} damaged values removed, {} unsynced changes put back into the queue{}",
            r.removed.len(),
            r.restored.len(),
            if r.reads_relay_again {
                "; the device reads the relay's data again at its next sync"
            } else {
                ""
            }
        );
        if !r.unrecoverable.is_empty() {
            println!(
                "lost for good (unless they reached the relay before): queue entries {:?}",
                r.unrecoverable
            );
        }
    }
}

/// The human form of `status`'s answer.
pub(super) fn print(daemon: &DaemonStatus) {
    let status = &daemon.status;
    let now = now_ms();
    let device = &status.device_id;
    let version = &status.version;
    match (status.daemon, status.pid) {
        (true, Some(pid)) => {
            let uptime = status.uptime_ms.unwrap_or(0);
            println!(
                "device {device} · ferry {version} · daemon running (pid {pid}, started {})",
                relative(now, now.saturating_sub(uptime))
            );
        }
        _ => println!("device {device} · ferry {version} · daemon not running"),
    }
    let live = match (status.live_bytes, status.live_bytes_measured_ms) {
        (Some(live), Some(at)) => format!(
            " for {} of live data (counted {})",
            bytes(live),
            relative(now, at)
        ),
        _ => String::new(),
    };
    let on_disk = status.store_bytes.map_or_else(|| "unknown".into(), bytes);
    match &status.contents {
        Some(c) => println!(
            "data: {} records in {} collections · {on_disk} on disk{live}",
            c.documents, c.collections
        ),
        None if status.damage.is_some() => {
            println!("data: partly unreadable, the store is damaged · {on_disk} on disk{live}")
        }
        None => println!("data: unreadable until the disk has room · {on_disk} on disk{live}"),
    }
    if let Some(damage) = &status.damage {
        println!(
            "store: DAMAGED since {}: {}; `ferry doctor` says what, `ferry doctor --repair` \
             (daemon stopped) repairs it",
            relative(now, damage.since_ms),
            damage.summary()
        );
    }
    if let Storage::DiskFull { since_ms } = status.storage {
        println!(
            "storage: the disk is full since {}: writes are refused until space is freed, then \
             they resume by themselves",
            relative(now, since_ms)
        );
    }
    if let Some(c) = &status.contents {
        let queue = &c.queue;
        println!(
            "queue: {} pending, {} uploading, {} failed, {} completed",
            queue.pending, queue.processing, queue.failed, queue.completed
        );
    }
    match &daemon.sync {
        Some(sync) => {
            for line in sync.summary(now) {
                println!("sync: {line}");
            }
        }
        None => {
            println!("sync: off (no relay configured or registered): this device works offline");
        }
    }
    if let Some(c) = &status.contents {
        if c.conflicts.open > 0 {
            println!(
                "conflicts: {} open: see them with `ferry conflicts`",
                c.conflicts.open
            );
        } else {
            println!("conflicts: none open");
        }
        if c.quarantined.count > 0 {
            print_quarantined(&c.quarantined);
        }
    }
    if let Some(alerts) = &daemon.alerts {
        print_alerts(alerts);
    }
}

/// How many relay log entries this device could not apply, and one line for each listed.
fn print_quarantined(quarantined: &QuarantinedSummary) {
    println!("quarantined: {} log entries", quarantined.count);
    for q in &quarantined.entries {
        println!(
            "  seq {} {}/{}: {}",
            q.seq, q.collection, q.record, q.reason
        );
    }
}

/// "512 B", "3.4 MB", "1.2 GB".
pub(super) fn bytes(n: u64) -> String {
    match n {
        0..1_000 => format!("{n} B"),
        1_000..1_000_000 => format!("{:.1} kB", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", n as f64 / 1e6),
        _ => format!("{:.1} GB", n as f64 / 1e9),
    }
}

#[cfg(test)]
mod tests {
    use super::bytes;

    #[test]
    fn sizes_read_naturally() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3_400_000), "3.4 MB");
        assert_eq!(bytes(1_200_000_000), "1.2 GB");
    }
}
