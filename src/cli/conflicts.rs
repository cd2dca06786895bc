//! `ferry conflicts`: list conflicts, show one side by side, and resolve one.
//!
//! Owns: the arguments of these commands and how their results are printed for people. The
//! `--json` output is the API's result unchanged, so scripts see what apps see.
//!
//! Must not touch: the store or the conflict rules; every call goes through the `conflicts.*`
//! service methods, to the daemon or to the store opened here (see `Backend`).

use super::{Backend, Context, Failure, format_ms, label, print_json, read_fields};
use crate::resolve::{self, Conflict, Resolution, Side};
use crate::service::api;
use clap::{Subcommand, ValueEnum};
use serde_json::Value;

#[derive(Subcommand, Debug)]
pub(super) enum Action {
    /// Both sides of a conflict field by field, which one the record shows, and the resolution
    Show {
        /// The conflict's id, as `ferry conflicts` lists it
        id: String,
    },
    /// Settle a conflict by keeping one side, or by setting the fields given with --data; the
    /// choice is written as a change that syncs
    Resolve {
        /// The conflict's id, as `ferry conflicts` lists it
        id: String,
        /// server: the version the relay logged first; client: the one that arrived later;
        /// merge: the fields given with --data
        #[arg(long, value_enum)]
        take: Take,
        /// Fields to set, as a JSON object (with --take merge); `-` reads standard input
        #[arg(long)]
        data: Option<String>,
    },
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub(super) enum StatusFilter {
    Open,
    Resolved,
    #[value(name = "auto_resolved")]
    AutoResolved,
    All,
}

impl StatusFilter {
    fn as_str(self) -> &'static str {
        match self {
            StatusFilter::Open => "open",
            StatusFilter::Resolved => "resolved",
            StatusFilter::AutoResolved => "auto_resolved",
            StatusFilter::All => "all",
        }
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub(super) enum Take {
    Server,
    Client,
    Merge,
}

impl Take {
    fn typed(self) -> resolve::Take {
        match self {
            Take::Server => resolve::Take::Server,
            Take::Client => resolve::Take::Client,
            Take::Merge => resolve::Take::Merge,
        }
    }
}

/// The listing's filters and page.
pub(super) struct ListArgs {
    pub status: StatusFilter,
    pub collection: Option<String>,
    pub limit: usize,
    pub after: Option<String>,
}

pub(super) fn run(ctx: &Context, action: Option<Action>, list: ListArgs) -> Result<(), Failure> {
    let mut backend = Backend::connect(ctx)?;
    match action {
        None => list_conflicts(ctx, &mut backend, list),
        Some(Action::Show { id }) => show(ctx, &mut backend, id),
        Some(Action::Resolve { id, take, data }) => resolve(ctx, &mut backend, id, take, data),
    }
}

fn list_conflicts(ctx: &Context, backend: &mut Backend, list: ListArgs) -> Result<(), Failure> {
    let r = backend.call(api::ConflictsParams {
        status: Some(list.status.as_str().to_owned()),
        collection: list.collection,
        limit: Some(list.limit),
        after: list.after,
    })?;
    if ctx.json {
        print_json(&r);
        return Ok(());
    }
    let header = [
        "ID", "KIND", "RECORD", "STATUS", "STRATEGY", "FIELDS", "SERVER", "CLIENT",
    ];
    let rows: Vec<Vec<String>> = r
        .conflicts
        .iter()
        .map(|c| {
            vec![
                c.id.clone(),
                label(&c.kind),
                format!("{}/{}", c.collection, c.record),
                status(c),
                label(&c.strategy),
                fields_involved(c),
                side_summary(&c.server),
                side_summary(&c.client),
            ]
        })
        .collect();
    if rows.is_empty() {
        match list.status {
            StatusFilter::All => eprintln!("no conflicts"),
            other => eprintln!("no {} conflicts", other.as_str().replace('_', "-")),
        }
    } else {
        print_table(&header, &rows);
    }
    if let Some(next) = r.next {
        eprintln!(
            "more: ferry conflicts --status {} --after {next}",
            list.status.as_str()
        );
    }
    Ok(())
}

fn show(ctx: &Context, backend: &mut Backend, id: String) -> Result<(), Failure> {
    let c = backend.call(api::ConflictId { id })?;
    if ctx.json {
        print_json(&c);
        return Ok(());
    }
    let collection = &c.collection;
    let record = &c.record;
    println!("conflict {}", c.id);
    println!("  kind      {}", label(&c.kind));
    println!("  record    {collection}/{record}");
    println!("  status    {}", status(&c));
    println!("  strategy  {}", label(&c.strategy));
    println!("  log seq   {}", c.seq);
    for (name, side) in [("server", &c.server), ("client", &c.client)] {
        println!(
            "  {name:<8}  {collection}/{} by {} at {}{}",
            side.record,
            side.device,
            format_ms(side.time),
            if side.deleted { " (deleted)" } else { "" }
        );
    }
    if let Some(unique) = &c.unique {
        println!(
            "  unique    {} = {} held first by {collection}/{}, then by {collection}/{}",
            unique.fields.join(","),
            Value::Array(unique.value.clone()),
            c.server.record,
            c.client.record,
        );
    }
    if !c.fields.is_empty() && c.unique.is_some() {
        // Two records: where they differ, each shows its own value.
        let rows: Vec<Vec<String>> = c
            .fields
            .iter()
            .map(|f| {
                vec![
                    path_text(&f.path),
                    side_value(f.server.as_ref()),
                    side_value(f.client.as_ref()),
                ]
            })
            .collect();
        println!();
        print_table(&["PATH", "SERVER", "CLIENT"], &rows);
    } else if !c.fields.is_empty() {
        // What the record shows now, to say which side each field holds.
        let now = match backend.call(api::GetParams::new(collection.clone(), record.clone())) {
            Ok(r) => r.fields.parse().ok().map(Value::Object),
            Err(f) if f.exit == super::EXIT_NOT_FOUND => None,
            Err(f) => return Err(f),
        };
        let rows: Vec<Vec<String>> = c
            .fields
            .iter()
            .map(|f| {
                let current = now.as_ref().and_then(|fields| value_at(fields, &f.path));
                vec![
                    path_text(&f.path),
                    side_value(f.server.as_ref()),
                    side_value(f.client.as_ref()),
                    shown(current, f.server.as_ref(), f.client.as_ref()).to_owned(),
                ]
            })
            .collect();
        println!();
        print_table(&["PATH", "SERVER", "CLIENT", "SHOWN"], &rows);
    }
    for (what, resolution) in [("resolution", &c.resolution), ("resolving", &c.resolving)] {
        if let Some(resolution) = resolution {
            println!();
            println!("{what}: {}", resolution_text(resolution));
        }
    }
    Ok(())
}

fn resolve(
    ctx: &Context,
    backend: &mut Backend,
    id: String,
    take: Take,
    data: Option<String>,
) -> Result<(), Failure> {
    let data = data
        .map(|d| read_fields(Some(&d), ctx.config.ipc.max_message_bytes))
        .transpose()?;
    let take = take.typed();
    let r = backend.call(api::ResolveRequest {
        id: id.clone(),
        take,
        data,
    })?;
    if ctx.json {
        print_json(&r);
        return Ok(());
    }
    println!("resolved {id}: took {}", take.as_str());
    for w in &r.writes {
        println!(
            "  {} {}/{}",
            w.operation.map_or("unchanged", |o| o.as_str()),
            w.collection,
            w.id
        );
    }
    if r.conflict.resolving.is_some() {
        eprintln!("the conflict shows as resolved on every device once the relay logs this change");
    }
    Ok(())
}

fn status(c: &Conflict) -> String {
    let status = c.status.as_str();
    if c.resolving.is_some() {
        format!("{status} (resolving)")
    } else {
        status.to_owned()
    }
}

/// The fields a conflict is about: a unique constraint's fields, or the paths both sides wrote.
fn fields_involved(c: &Conflict) -> String {
    if let Some(unique) = &c.unique {
        return unique.fields.join("+");
    }
    let paths: Vec<String> = c.fields.iter().map(|f| path_text(&f.path)).collect();
    if paths.is_empty() {
        "-".to_owned()
    } else {
        paths.join(",")
    }
}

/// `address.lines[2]` for the path `["address", "lines", 2]`.
fn path_text(path: &[Value]) -> String {
    let mut out = String::new();
    for step in path {
        match step {
            Value::Number(n) => out.push_str(&format!("[{n}]")),
            other => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(
                    &other
                        .as_str()
                        .map_or_else(|| other.to_string(), str::to_owned),
                );
            }
        }
    }
    out
}

fn side_summary(side: &Side) -> String {
    let short = side.device.get(..8).unwrap_or(&side.device);
    format!("{short} {}", format_ms(side.time))
}

fn side_value(v: Option<&Value>) -> String {
    v.filter(|v| !v.is_null())
        .map_or_else(|| "(removed)".to_owned(), Value::to_string)
}

fn value_at<'a>(fields: &'a Value, path: &[Value]) -> Option<&'a Value> {
    path.iter().try_fold(fields, |at, step| match step {
        Value::Number(n) => at.get(usize::try_from(n.as_u64()?).ok()?),
        Value::String(key) => at.get(key.as_str()),
        _ => None,
    })
}

/// Which side's value the record holds now: `server`, `client`, or `neither` when it was edited
/// since (a removed field counts as null on both ends).
fn shown(current: Option<&Value>, server: Option<&Value>, client: Option<&Value>) -> &'static str {
    let current = current.unwrap_or(&Value::Null);
    if current == client.unwrap_or(&Value::Null) {
        "client"
    } else if current == server.unwrap_or(&Value::Null) {
        "server"
    } else {
        "neither"
    }
}

fn resolution_text(r: &Resolution) -> String {
    let take = r.take.map_or_else(
        || "ended by an edit".to_owned(),
        |t| format!("took {}", t.as_str()),
    );
    let by = r
        .device
        .as_deref()
        .map(|d| format!(" by {d}"))
        .unwrap_or_default();
    let change = r
        .change
        .as_deref()
        .map(|c| format!(" (change {c})"))
        .unwrap_or_default();
    format!("{take}{by} at {}{change}", format_ms(r.time))
}

/// Columns padded to their widest cell, the last one left ragged.
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let padded: Vec<String> = cells
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths_read_as_written() {
        assert_eq!(path_text(&[json!("name")]), "name");
        assert_eq!(
            path_text(&[json!("address"), json!("lines"), json!(2)]),
            "address.lines[2]"
        );
    }

    #[test]
    fn the_shown_side_is_the_one_the_record_holds() {
        let fields = json!({ "name": "Bea", "tags": ["a", "b"] });
        let at = |path: &[Value]| value_at(&fields, path);
        assert_eq!(
            shown(
                at(&[json!("name")]),
                Some(&json!("Ada")),
                Some(&json!("Bea"))
            ),
            "client"
        );
        assert_eq!(
            shown(
                at(&[json!("name")]),
                Some(&json!("Bea")),
                Some(&json!("Ada"))
            ),
            "server"
        );
        assert_eq!(
            shown(
                at(&[json!("tags"), json!(1)]),
                Some(&json!("b")),
                Some(&json!("c"))
            ),
            "server"
        );
        assert_eq!(
            shown(at(&[json!("gone")]), Some(&json!("x")), None),
            "client"
        );
        assert_eq!(
            shown(at(&[json!("name")]), Some(&json!("x")), Some(&json!("y"))),
            "neither"
        );
    }
}
