//! `ferry relay status`: how far the `records` table follows each space's log, read from the
//! PostgreSQL database as `ferry relay migrate` reads it (no running relay needed).
//! Must not touch: the database beyond reading it.

use super::{Context, Failure, print_json};
use crate::config::RelayStorageKind;
use crate::relay::storage::PgStorage;
use crate::relay::storage::pg::PgOptions;
use serde_json::json;

pub(super) fn status(ctx: &Context) -> Result<(), Failure> {
    if ctx.config.relay.storage != RelayStorageKind::Postgres {
        return Err(Failure::usage(
            "`ferry relay status` is for relay.storage = \"postgres\": the records table lives in \
             the PostgreSQL database",
        ));
    }
    let storage = PgStorage::connect(&PgOptions::from_config(&ctx.config.relay))
        .map_err(|e| Failure::failed(e.to_string()))?;
    let schema = storage
        .schema()
        .map_err(|e| Failure::failed(e.to_string()))?;
    if !schema.pending.is_empty() {
        return Err(Failure::failed(
            "the database's schema predates the records table: `ferry relay migrate` (or \
             starting a relay) brings it up to date",
        ));
    }
    let lag = storage
        .records_lag()
        .map_err(|e| Failure::failed(e.to_string()))?;
    if ctx.json {
        let spaces: Vec<_> = lag
            .iter()
            .map(|l| {
                json!({
                    "space": l.space,
                    "head": l.head,
                    "materialized": l.materialized,
                    "entries_behind": l.entries_behind(),
                    "seconds_behind": l.seconds_behind,
                })
            })
            .collect();
        print_json(&json!({ "spaces": spaces }));
        return Ok(());
    }
    if lag.is_empty() {
        println!("no space has a log yet");
    }
    for l in &lag {
        println!(
            "{}: log head {}, records table at {}, {} entries behind ({:.1} s)",
            l.space,
            l.head,
            l.materialized,
            l.entries_behind(),
            l.seconds_behind
        );
    }
    Ok(())
}
