//! `ferry space`: where a stopped device's or relay's store puts its bytes. The store's
//! directory on disk next to the live bytes of each kind of key (`store::keys::Kind`,
//! `relay::storage::kv::key_kind`) and the journal beside them; the difference is the engine's
//! own (sled's log: old versions of its nodes, free space it has not given back).
//! `--compact` first rewrites each store as the daemon's space bound does (`Kv::compact`).
//! Must not touch: the stores' contents (it opens them as the daemon and relay do, and writes
//! nothing of its own).

use super::status::bytes;
use super::{Context, Failure, print_json};
use crate::daemon;
use crate::store::kv::{self, KeyKind, Kv as _, SledKv};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// `ferry space --json`.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SpaceReport {
    pub stores: Vec<StoreSpace>,
}

/// One store of the data directory.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoreSpace {
    /// `device` (`store/`) or `relay` (`relay.db/`).
    pub store: String,
    pub path: String,
    /// The directory's allocated blocks, as `du` counts them (journal included).
    pub disk_bytes: u64,
    /// The engine's own figure for its files (sled's `size_on_disk`, journal left out).
    pub engine_bytes: u64,
    /// The journal beside the engine's files: unsynced local changes and the last durable
    /// batch's number.
    pub journal_bytes: u64,
    /// Every key and value held, the sum of `kinds`.
    pub live_bytes: u64,
    /// The CRC-32 each value carries on disk (4 bytes a key), not in `live_bytes`.
    pub checksum_bytes: u64,
    /// Live bytes by kind of key, largest first.
    pub kinds: Vec<KeyKind>,
}

pub(super) fn run(ctx: &Context, compact: bool) -> Result<(), Failure> {
    let device_path = ctx.dir.store_path();
    let relay_path = ctx.dir.path().join("relay.db");
    if !device_path.exists() && !relay_path.exists() {
        return Err(Failure::failed(format!(
            "{} holds no store (neither store/ nor relay.db/)",
            ctx.dir.path().display()
        )));
    }
    let lock = ctx.dir.lock().map_err(|e| {
        Failure::failed(format!(
            "{e}: `ferry space` opens the store itself; stop the daemon or relay first"
        ))
    })?;
    let mut stores = Vec::new();
    if device_path.exists() {
        let open = daemon::open_locked_store(lock, &ctx.dir, &ctx.config)?;
        if compact {
            open.store
                .compact()
                .map_err(|e| Failure::failed(format!("cannot compact the store: {e}")))?;
        }
        let (kinds, journal_bytes) = open
            .store
            .live_bytes_by_kind()
            .map_err(|e| Failure::failed(e.to_string()))?;
        let engine_bytes = open
            .store
            .size_on_disk()
            .map_err(|e| Failure::failed(e.to_string()))?;
        drop(open);
        stores.push(store_space(
            "device",
            &device_path,
            kinds,
            engine_bytes,
            journal_bytes,
        )?);
    }
    if relay_path.exists() {
        let sled = SledKv::open(
            &relay_path,
            ctx.config.relay.sled_cache_mb.saturating_mul(1024 * 1024),
        )
        .map_err(|e| Failure::failed(format!("{}: {e}", relay_path.display())))?;
        if compact {
            sled.compact()
                .map_err(|e| Failure::failed(format!("cannot compact the relay's store: {e}")))?;
        }
        let kinds = kv::sizes_by(&sled, &crate::relay::storage::kv::key_kind)
            .map_err(|e| Failure::failed(e.to_string()))?;
        let engine_bytes = sled
            .size_on_disk()
            .map_err(|e| Failure::failed(e.to_string()))?;
        let journal_bytes = sled.journal_bytes();
        drop(sled);
        stores.push(store_space(
            "relay",
            &relay_path,
            kinds,
            engine_bytes,
            journal_bytes,
        )?);
    }
    let report = SpaceReport { stores };
    if ctx.json {
        print_json(&report);
    } else {
        print_text(&report);
    }
    Ok(())
}

fn store_space(
    store: &str,
    path: &Path,
    mut kinds: Vec<KeyKind>,
    engine_bytes: u64,
    journal_bytes: u64,
) -> Result<StoreSpace, Failure> {
    kinds.sort_by(|a, b| {
        (b.key_bytes + b.value_bytes)
            .cmp(&(a.key_bytes + a.value_bytes))
            .then_with(|| a.kind.cmp(&b.kind))
    });
    let live_bytes = kinds.iter().map(|k| k.key_bytes + k.value_bytes).sum();
    let keys: u64 = kinds.iter().map(|k| k.keys).sum();
    Ok(StoreSpace {
        store: store.to_owned(),
        path: path.display().to_string(),
        disk_bytes: crate::alerting::dir_allocated(path)
            .map_err(|e| Failure::failed(format!("{}: {e}", path.display())))?,
        engine_bytes,
        journal_bytes,
        live_bytes,
        checksum_bytes: keys.saturating_mul(kv::SEAL_BYTES as u64),
        kinds,
    })
}

fn print_text(report: &SpaceReport) {
    for s in &report.stores {
        println!(
            "{} store {}: {} on disk (sled {}, journal {}), {} live ({:.2}x)",
            s.store,
            s.path,
            bytes(s.disk_bytes),
            bytes(s.engine_bytes),
            bytes(s.journal_bytes),
            bytes(s.live_bytes),
            s.disk_bytes as f64 / s.live_bytes.max(1) as f64
        );
        for k in &s.kinds {
            println!(
                "  {:<16} {:>10} keys {:>10} ({} of keys)",
                k.kind,
                k.keys,
                bytes(k.key_bytes + k.value_bytes),
                bytes(k.key_bytes)
            );
        }
        println!(
            "  {:<16} {:>15} {:>10}",
            "checksums",
            "",
            bytes(s.checksum_bytes)
        );
    }
}
