//! `ferry import`: JSON Lines into the store, through the daemon or on the store directly.
//!
//! Every record is checked here first, as the store checks it (JSON, shape, address, declared
//! collection, field names, depth and size: `StoreOptions::check_write`), so a refusal names its
//! line. A call the daemon still refuses for a record's sake (it holds what this process cannot
//! check, such as the account key) is split in halves until the refused line is found. Without
//! `--atomic`, the good lines around a bad one are imported and the summary says which landed;
//! with it the whole file is one call, which the daemon applies all or nothing.
//!
//! Must not touch: the store; it calls the `import` method only.

use super::{Backend, Context, EXIT_USAGE, Failure, LineRead, print_json, read_line_bounded};
use crate::ipc::ClientError;
use crate::service::api::{ImportAutomergeParams, ImportParams, ImportRecord};
use crate::service::{ApiError, code};
use crate::store::StoreOptions;
use base64::Engine as _;
use serde_json::{Value, json};
use std::io::{BufRead, IsTerminal as _};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Room left in a call for its envelope around the records.
const ENVELOPE_BYTES: usize = 1024;

pub(super) struct ImportArgs {
    pub file: Option<PathBuf>,
    pub batch: usize,
    pub atomic: bool,
}

/// What became of a line that held a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Imported,
    Refused,
    /// Not imported for another line's sake (`--atomic`) or because the import stopped.
    NotImported,
    /// Sent in a call that got no answer: the daemon may have imported them before it stopped.
    Unconfirmed,
}

/// Records read but not sent yet, with their line numbers.
#[derive(Default)]
struct Pending {
    records: Vec<(u64, ImportRecord)>,
    bytes: usize,
}

impl Pending {
    fn push(&mut self, line: u64, record: ImportRecord, bytes: usize) {
        self.records.push((line, record));
        self.bytes += bytes + 1;
    }

    fn take(&mut self) -> Vec<(u64, ImportRecord)> {
        self.bytes = 0;
        std::mem::take(&mut self.records)
    }
}

#[derive(Default)]
struct Outcomes {
    /// Every record line and its fate, in the order they were settled.
    fates: Vec<(u64, Fate)>,
    refusals: Vec<(u64, String)>,
    imported: u64,
    changed: u64,
    progress: Option<indicatif::ProgressBar>,
}

impl Outcomes {
    fn refuse(&mut self, line: u64, why: String) {
        self.fates.push((line, Fate::Refused));
        self.refusals.push((line, why));
    }

    fn settle(&mut self, records: &[(u64, ImportRecord)], fate: Fate) {
        self.fates
            .extend(records.iter().map(|(line, _)| (*line, fate)));
    }

    /// Imports `records` in one call. With `split`, a call refused for a record's sake is split
    /// until each refused record is alone, so the others land and the refusal names its line;
    /// any other failure (the daemon stopped, the disk is full) ends the import.
    fn send(
        &mut self,
        backend: &mut Backend,
        records: Vec<(u64, ImportRecord)>,
        split: bool,
    ) -> Result<(), Failure> {
        if records.is_empty() {
            return Ok(());
        }
        let params = ImportParams {
            records: records.iter().map(|(_, r)| r.clone()).collect(),
        };
        match backend.try_call(params) {
            Ok(r) => {
                self.imported += r.imported as u64;
                self.changed += r.changed as u64;
                self.settle(&records, Fate::Imported);
                if let Some(bar) = &self.progress {
                    bar.set_message(format!("{} records", self.imported));
                }
                Ok(())
            }
            Err(ClientError::Api(e)) if split && refuses_a_record(&e) => {
                if let [(line, _)] = records[..] {
                    self.refuse(line, e.message);
                    return Ok(());
                }
                let mut first = records;
                let second = first.split_off(first.len() / 2);
                self.send(backend, first, split)?;
                self.send(backend, second, split)
            }
            Err(e) => {
                // An error answer means the call applied nothing; no answer tells nothing.
                let fate = match e {
                    ClientError::Api(_) => Fate::NotImported,
                    _ => Fate::Unconfirmed,
                };
                self.settle(&records, fate);
                Err(e.into())
            }
        }
    }

    /// The lines of each fate as ranges, in line order: consecutive record lines of one fate
    /// make one range (blank lines between them do not split it).
    fn ranges(&mut self, fate: Fate) -> Vec<(u64, u64)> {
        self.fates.sort_unstable_by_key(|(line, _)| *line);
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut previous = None;
        for &(line, this) in &self.fates {
            if this == fate {
                match ranges.last_mut() {
                    Some((_, end)) if previous == Some(fate) => *end = line,
                    _ => ranges.push((line, line)),
                }
            }
            previous = Some(this);
        }
        ranges
    }
}

/// Whether the daemon refused an import call for what a record holds (rather than for its own
/// state): splitting the call finds the record.
fn refuses_a_record(e: &ApiError) -> bool {
    matches!(
        e.code,
        code::INVALID_PARAMS | code::TOO_LARGE | code::UNKNOWN_COLLECTION | code::NO_KEY
    )
}

/// The record on `line`, or why the store would refuse it.
fn check_record(line: &[u8], options: &StoreOptions) -> Result<ImportRecord, String> {
    let record: Value =
        serde_json::from_slice(line).map_err(|e| format!("not valid JSON ({e})"))?;
    if !record.is_object() {
        return Err(
            "expected an object {\"collection\": ..., \"id\": ..., \"fields\": {...}}".into(),
        );
    }
    let parsed: ImportRecord = crate::service::parse(record).map_err(|e| e.message)?;
    options
        .check_write(
            &parsed.collection,
            parsed.id.as_deref(),
            Some(&parsed.fields),
        )
        .map_err(|e| e.to_string())?;
    Ok(parsed)
}

/// Skips what is left of a line that was too long to read.
fn skip_line(reader: &mut dyn BufRead) -> std::io::Result<()> {
    loop {
        let buffer = reader.fill_buf()?;
        if buffer.is_empty() {
            return Ok(());
        }
        match buffer.iter().position(|&b| b == b'\n') {
            Some(end) => {
                reader.consume(end + 1);
                return Ok(());
            }
            None => {
                let len = buffer.len();
                reader.consume(len);
            }
        }
    }
}

fn open(file: Option<&Path>) -> Result<(Box<dyn BufRead>, Option<u64>), Failure> {
    Ok(match file {
        Some(p) if p != Path::new("-") => {
            let f = std::fs::File::open(p)
                .map_err(|e| Failure::failed(format!("cannot open {}: {e}", p.display())))?;
            let len = f.metadata().ok().map(|m| m.len());
            (Box::new(std::io::BufReader::new(f)), len)
        }
        _ => (Box::new(std::io::BufReader::new(std::io::stdin())), None),
    })
}

fn progress_bar(ctx: &Context, total_bytes: Option<u64>) -> Option<indicatif::ProgressBar> {
    (!ctx.json && std::io::stderr().is_terminal()).then(|| {
        let bar = match total_bytes {
            Some(n) => indicatif::ProgressBar::new(n),
            None => indicatif::ProgressBar::new_spinner(),
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    })
}

/// `ferry import --format automerge FILE --into COLLECTION/ID`: one record's Automerge document
/// made elsewhere, taken in with its history (`import_automerge`).
pub(super) fn document(ctx: &Context, file: Option<&Path>, into: &str) -> Result<(), Failure> {
    let (collection, id) = super::full_address(into)?;
    let mut bytes = Vec::new();
    let (mut reader, _) = open(file)?;
    reader
        .read_to_end(&mut bytes)
        .map_err(|e| Failure::failed(format!("cannot read the document: {e}")))?;
    let mut backend = Backend::connect(ctx)?;
    let answer = backend.call(ImportAutomergeParams {
        collection,
        id,
        automerge_base64: base64::engine::general_purpose::STANDARD.encode(&bytes),
    })?;
    if ctx.json {
        print_json(&answer);
    } else {
        println!(
            "imported {}/{}: {} change(s), heads {}",
            answer.collection,
            answer.id,
            answer.changes,
            answer.heads.join(",")
        );
    }
    Ok(())
}

pub(super) fn run(ctx: &Context, args: ImportArgs) -> Result<(), Failure> {
    let max_records = ctx.config.ipc.max_import_records.max(1);
    let max_bytes = ctx.config.ipc.max_message_bytes;
    let batch = if args.atomic {
        max_records
    } else {
        args.batch.clamp(1, max_records)
    };
    let (mut reader, total_bytes) = open(args.file.as_deref())?;
    let mut backend = Backend::connect(ctx)?;
    let options = ctx.config.store_options();
    let started = Instant::now();
    let mut outcomes = Outcomes {
        progress: progress_bar(ctx, total_bytes),
        ..Outcomes::default()
    };
    let mut pending = Pending::default();
    let mut line = Vec::new();
    let mut stopped = None;
    for n in 1.. {
        let read = read_line_bounded(reader.as_mut(), &mut line, max_bytes)?;
        if let Some(bar) = &outcomes.progress {
            bar.inc(line.len() as u64 + 1);
        }
        match read {
            LineRead::End => break,
            LineRead::TooLong => {
                skip_line(reader.as_mut())?;
                outcomes.refuse(
                    n,
                    format!(
                        "it is over {max_bytes} bytes (ipc.max_message_bytes): split the record"
                    ),
                );
                continue;
            }
            LineRead::Line if line.trim_ascii().is_empty() => continue,
            LineRead::Line => {}
        }
        let record = match check_record(&line, &options) {
            Ok(record) => record,
            Err(why) => {
                outcomes.refuse(n, why);
                continue;
            }
        };
        let full = pending.records.len() == batch
            || pending.bytes + line.len() + ENVELOPE_BYTES > max_bytes;
        if full && args.atomic {
            outcomes.settle(&pending.take(), Fate::NotImported);
            stopped = Some(Failure::usage(format!(
                "--atomic imports the file in one call, and line {n} takes it past the limit \
                 of one call ({max_records} records, ipc.max_import_records, and {max_bytes} \
                 bytes, ipc.max_message_bytes): raise them in the daemon's config, or import \
                 without --atomic; nothing was imported"
            )));
            break;
        }
        if full && let Err(e) = outcomes.send(&mut backend, pending.take(), true) {
            stopped = Some(Failure {
                message: format!(
                    "{}; the import stopped there: line {n} and the lines after it were not \
                     imported either",
                    e.message
                ),
                ..e
            });
            break;
        }
        pending.push(n, record, line.len());
    }
    if stopped.is_none() {
        let records = pending.take();
        let sent = match (args.atomic, outcomes.refusals.is_empty()) {
            (false, _) => outcomes.send(&mut backend, records, true),
            // One call, applied all or nothing: a refusal here has no line to split down to.
            (true, true) => outcomes
                .send(&mut backend, records, false)
                .map_err(|f| Failure {
                    message: format!("nothing was imported (--atomic): {}", f.message),
                    ..f
                }),
            (true, false) => {
                outcomes.settle(&records, Fate::NotImported);
                Ok(())
            }
        };
        stopped = sent.err();
    }
    if let Some(bar) = &outcomes.progress {
        bar.finish_and_clear();
    }
    report(ctx, outcomes, started, args.atomic, stopped)
}

fn report(
    ctx: &Context,
    mut outcomes: Outcomes,
    started: Instant,
    atomic: bool,
    stopped: Option<Failure>,
) -> Result<(), Failure> {
    let secs = started.elapsed().as_secs_f64();
    let imported_lines = outcomes.ranges(Fate::Imported);
    let refused_lines = outcomes.ranges(Fate::Refused);
    let not_imported = outcomes.ranges(Fate::NotImported);
    let unconfirmed = outcomes.ranges(Fate::Unconfirmed);
    outcomes.refusals.sort_unstable_by_key(|(line, _)| *line);
    if ctx.json {
        let refused: Vec<Value> = outcomes
            .refusals
            .iter()
            .map(|(line, why)| json!({ "line": line, "error": why }))
            .collect();
        print_json(&json!({
            "imported": outcomes.imported,
            "changed": outcomes.changed,
            "seconds": secs,
            "imported_lines": imported_lines,
            "refused": refused,
            "not_imported_lines": not_imported,
            "unconfirmed_lines": unconfirmed,
        }));
    } else {
        for (line, why) in &outcomes.refusals {
            eprintln!("line {line} refused: {why}");
        }
        let (imported, changed) = (outcomes.imported, outcomes.changed);
        if imported == 0 {
            println!("imported nothing");
        } else {
            println!(
                "imported lines {} ({imported} records, {changed} changed) in {secs:.2}s, \
                 {:.0} records/s",
                show_ranges(&imported_lines),
                imported as f64 / secs.max(1e-9)
            );
        }
        if !not_imported.is_empty() {
            println!("not imported: lines {}", show_ranges(&not_imported));
        }
        if !unconfirmed.is_empty() {
            println!(
                "not confirmed: lines {} (the daemon may have imported them before it stopped \
                 answering)",
                show_ranges(&unconfirmed)
            );
        }
    }
    if let Some(failure) = stopped {
        return Err(failure);
    }
    if outcomes.refusals.is_empty() {
        return Ok(());
    }
    let refused = outcomes.refusals.len();
    let lines = if refused == 1 { "line" } else { "lines" };
    let others = if atomic {
        ", so nothing was imported (--atomic)"
    } else {
        "; every other line was imported"
    };
    Err(Failure {
        exit: EXIT_USAGE,
        message: format!(
            "{refused} {lines} refused ({}){others}",
            show_ranges(&refused_lines)
        ),
    })
}

/// `1-2500, 2502-3000`.
fn show_ranges(ranges: &[(u64, u64)]) -> String {
    ranges
        .iter()
        .map(|&(first, last)| {
            if first == last {
                first.to_string()
            } else {
                format!("{first}-{last}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_join_consecutive_record_lines_of_one_fate() {
        let mut outcomes = Outcomes::default();
        // Settled out of order, as a bad line is refused before the batch around it is sent;
        // line 4 was blank.
        outcomes.refuse(5, "bad".into());
        for line in [1, 2, 3, 6, 7, 9] {
            outcomes.fates.push((line, Fate::Imported));
        }
        outcomes.fates.push((8, Fate::NotImported));
        assert_eq!(outcomes.ranges(Fate::Imported), [(1, 3), (6, 7), (9, 9)]);
        assert_eq!(show_ranges(&outcomes.ranges(Fate::Imported)), "1-3, 6-7, 9");
        assert_eq!(outcomes.ranges(Fate::Refused), [(5, 5)]);
        assert_eq!(outcomes.ranges(Fate::NotImported), [(8, 8)]);
    }

    #[test]
    fn records_are_checked_as_the_store_checks_them() {
        let options = StoreOptions::default();
        let ok = br#"{"collection": "Note", "id": "a", "fields": {"text": "hi"}}"#;
        assert!(check_record(ok, &options).is_ok());
        let refused = |line: &[u8]| check_record(line, &options).unwrap_err();
        assert!(refused(b"{bad").contains("not valid JSON"));
        assert!(refused(b"[1]").contains("expected an object"));
        assert!(refused(br#"{"collection": "Note", "fields": 5}"#).contains("`fields`"));
        assert!(refused(br#"{"collection": "Note", "fields": {"$x": 1}}"#).contains("reserved"));
        assert!(refused(br#"{"collection": "", "fields": {}}"#).contains("collection name"));
    }
}
