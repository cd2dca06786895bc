//! `ferry status`: what the device holds and whether it is in sync, as one line per fact or
//! problem, times relative to now. With no daemon running it reads the store and shows the last
//! sync state the daemon kept there, saying that nothing syncs meanwhile.
//!
//! Must not touch: the store's contents (it only reads).

// Lint fixes for this module land with its rewrite.
#![allow(clippy::indexing_slicing)]

use serde_json::{Value, json};

use crate::auth::credentials::Registration;
use crate::clock::now_ms;
use crate::engine::{SyncSettings, SyncStatus, relative};
use crate::service::Service;

use super::{Context, Failure, print_alerts};

/// The sync section `status` shows with no daemon running: the last state the daemon kept, or
/// `None` when this device does not sync.
pub(super) fn last_known(ctx: &Context, service: &Service) -> Result<Option<Value>, Failure> {
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
    let status = SyncStatus::last_known(settings.relay, settings.space, cursor, known, &queue);
    Ok(Some(json!(status)))
}

/// The human form of `status`'s answer.
pub(super) fn print(status: &Value) {
    let now = now_ms();
    let running = status["daemon"] == json!(true);
    let device = status["device_id"].as_str().unwrap_or("?");
    let version = status["version"].as_str().unwrap_or("?");
    if running {
        let uptime = status["uptime_ms"].as_u64().unwrap_or(0);
        println!(
            "device {device} · ferry {version} · daemon running (pid {}, started {})",
            status["pid"],
            relative(now, now.saturating_sub(uptime))
        );
    } else {
        println!("device {device} · ferry {version} · daemon not running");
    }
    let live = match (
        status["live_bytes"].as_u64(),
        status["live_bytes_measured_ms"].as_u64(),
    ) {
        (Some(live), Some(at)) => format!(
            " for {} of live data (counted {})",
            bytes(live),
            relative(now, at)
        ),
        _ => String::new(),
    };
    println!(
        "data: {} records in {} collections · {} on disk{live}",
        status["documents"],
        status["collections"],
        status["store_bytes"]
            .as_u64()
            .map_or_else(|| "unknown".into(), bytes)
    );
    if status["storage"]["state"] == json!("disk_full") {
        let since = status["storage"]["since_ms"]
            .as_u64()
            .map_or(String::new(), |at| format!(" since {}", relative(now, at)));
        println!(
            "storage: the disk is full{since}: writes are refused until space is freed, then \
             they resume by themselves"
        );
    }
    let queue = &status["queue"];
    println!(
        "queue: {} pending, {} uploading, {} failed, {} completed",
        queue["pending"], queue["processing"], queue["failed"], queue["completed"]
    );
    match serde_json::from_value::<SyncStatus>(status["sync"].clone()) {
        Ok(sync) => {
            for line in sync.summary(now) {
                println!("sync: {line}");
            }
        }
        Err(_) if status["sync"].is_null() => {
            println!("sync: off (no relay configured or registered): this device works offline");
        }
        Err(e) => println!("sync: the daemon's sync status cannot be read ({e})"),
    }
    let open = status["conflicts"]["open"].as_u64().unwrap_or(0);
    if open > 0 {
        println!("conflicts: {open} open: see them with `ferry conflicts`");
    } else {
        println!("conflicts: none open");
    }
    if status["quarantined"]["count"]
        .as_u64()
        .is_some_and(|n| n > 0)
    {
        print_quarantined(&status["quarantined"]);
    }
    if !status["alerts"].is_null() {
        print_alerts(&status["alerts"]);
    }
}

/// How many relay log entries this device could not apply, and one line for each listed.
fn print_quarantined(quarantined: &Value) {
    println!("quarantined: {} log entries", quarantined["count"]);
    for q in quarantined["entries"].as_array().into_iter().flatten() {
        println!(
            "  seq {} {}/{}: {}",
            q["seq"],
            q["collection"].as_str().unwrap_or(""),
            q["record"].as_str().unwrap_or(""),
            q["reason"].as_str().unwrap_or("")
        );
    }
}

/// "512 B", "3.4 MB", "1.2 GB".
fn bytes(n: u64) -> String {
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
