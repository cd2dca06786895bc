//! `ferry conflicts`: list conflicts, show one side by side, and resolve one.
//!
//! Owns: the arguments of these commands and how their results are printed for people. The
//! `--json` output is the API's result unchanged, so scripts see what apps see.
//!
//! Must not touch: the store or the conflict rules; every call goes through the `conflicts.*`
//! service methods, to the daemon or to the store opened here (see `Backend`).

// Lint fixes for this module land with its rewrite.
#![allow(clippy::indexing_slicing)]

use super::{Backend, Context, Failure, format_ms, print_json, read_fields};
use clap::{Subcommand, ValueEnum};
use serde_json::{Value, json};

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
    fn as_str(self) -> &'static str {
        match self {
            Take::Server => "server",
            Take::Client => "client",
            Take::Merge => "merge",
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
        Some(Action::Show { id }) => show(ctx, &mut backend, &id),
        Some(Action::Resolve { id, take, data }) => resolve(ctx, &mut backend, &id, take, data),
    }
}

fn list_conflicts(ctx: &Context, backend: &mut Backend, list: ListArgs) -> Result<(), Failure> {
    let r = backend.call(
        "conflicts.list",
        json!({
            "status": list.status.as_str(),
            "collection": list.collection,
            "limit": list.limit,
            "after": list.after,
        }),
    )?;
    if ctx.json {
        print_json(&r);
        return Ok(());
    }
    let header = [
        "ID", "KIND", "RECORD", "STATUS", "STRATEGY", "FIELDS", "SERVER", "CLIENT",
    ];
    let rows: Vec<Vec<String>> = r["conflicts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            vec![
                text(&c["id"]),
                text(&c["kind"]),
                format!("{}/{}", text(&c["collection"]), text(&c["record"])),
                status(c),
                text(&c["strategy"]),
                fields_involved(c),
                side_summary(&c["server"]),
                side_summary(&c["client"]),
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
    if let Some(next) = r["next"].as_str() {
        eprintln!(
            "more: ferry conflicts --status {} --after {next}",
            list.status.as_str()
        );
    }
    Ok(())
}

fn show(ctx: &Context, backend: &mut Backend, id: &str) -> Result<(), Failure> {
    let c = backend.call("conflicts.get", json!({ "id": id }))?;
    if ctx.json {
        print_json(&c);
        return Ok(());
    }
    let collection = text(&c["collection"]);
    let record = text(&c["record"]);
    println!("conflict {}", text(&c["id"]));
    println!("  kind      {}", text(&c["kind"]));
    println!("  record    {collection}/{record}");
    println!("  status    {}", status(&c));
    println!("  strategy  {}", text(&c["strategy"]));
    println!("  log seq   {}", c["seq"]);
    for (name, side) in [("server", &c["server"]), ("client", &c["client"])] {
        println!(
            "  {name:<8}  {collection}/{} by {} at {}{}",
            text(&side["record"]),
            text(&side["device"]),
            format_ms(side["time"].as_i64().unwrap_or(0)),
            if side["deleted"] == json!(true) {
                " (deleted)"
            } else {
                ""
            }
        );
    }
    if let Some(unique) = c.get("unique").filter(|u| !u.is_null()) {
        println!(
            "  unique    {} = {} held first by {collection}/{}, then by {collection}/{}",
            joined(&unique["fields"], ","),
            unique["value"],
            text(&c["server"]["record"]),
            text(&c["client"]["record"]),
        );
    }
    let fields = c["fields"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if !fields.is_empty() && c["unique"].is_object() {
        // Two records: where they differ, each shows its own value.
        let rows: Vec<Vec<String>> = fields
            .iter()
            .map(|f| {
                let path = f["path"].as_array().map(Vec::as_slice).unwrap_or_default();
                vec![
                    path_text(path),
                    side_value(&f["server"]),
                    side_value(&f["client"]),
                ]
            })
            .collect();
        println!();
        print_table(&["PATH", "SERVER", "CLIENT"], &rows);
    } else if !fields.is_empty() {
        // What the record shows now, to say which side each field holds.
        let now = match backend.call("get", json!({ "collection": collection, "id": record })) {
            Ok(r) => Some(r["fields"].clone()),
            Err(f) if f.exit == super::EXIT_NOT_FOUND => None,
            Err(f) => return Err(f),
        };
        let rows: Vec<Vec<String>> = fields
            .iter()
            .map(|f| {
                let path = f["path"].as_array().map(Vec::as_slice).unwrap_or_default();
                let current = now.as_ref().and_then(|fields| value_at(fields, path));
                vec![
                    path_text(path),
                    side_value(&f["server"]),
                    side_value(&f["client"]),
                    shown(current, &f["server"], &f["client"]).to_owned(),
                ]
            })
            .collect();
        println!();
        print_table(&["PATH", "SERVER", "CLIENT", "SHOWN"], &rows);
    }
    for (label, resolution) in [
        ("resolution", &c["resolution"]),
        ("resolving", &c["resolving"]),
    ] {
        if resolution.is_object() {
            println!();
            println!("{label}: {}", resolution_text(resolution));
        }
    }
    Ok(())
}

fn resolve(
    ctx: &Context,
    backend: &mut Backend,
    id: &str,
    take: Take,
    data: Option<String>,
) -> Result<(), Failure> {
    let data = data
        .map(|d| read_fields(Some(&d), ctx.config.ipc.max_message_bytes))
        .transpose()?;
    let r = backend.call(
        "conflicts.resolve",
        json!({ "id": id, "take": take.as_str(), "data": data }),
    )?;
    if ctx.json {
        print_json(&r);
        return Ok(());
    }
    println!("resolved {id}: took {}", take.as_str());
    for w in r["writes"].as_array().into_iter().flatten() {
        println!(
            "  {} {}/{}",
            w["operation"].as_str().unwrap_or("unchanged"),
            text(&w["collection"]),
            text(&w["id"])
        );
    }
    if r["conflict"]["resolving"].is_object() {
        eprintln!("the conflict shows as resolved on every device once the relay logs this change");
    }
    Ok(())
}

fn text(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_owned)
}

fn joined(v: &Value, separator: &str) -> String {
    v.as_array()
        .into_iter()
        .flatten()
        .map(text)
        .collect::<Vec<_>>()
        .join(separator)
}

fn status(c: &Value) -> String {
    let status = text(&c["status"]);
    if c["resolving"].is_object() {
        format!("{status} (resolving)")
    } else {
        status
    }
}

/// The fields a conflict is about: a unique constraint's fields, or the paths both sides wrote.
fn fields_involved(c: &Value) -> String {
    if c["unique"].is_object() {
        return joined(&c["unique"]["fields"], "+");
    }
    let paths: Vec<String> = c["fields"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| path_text(f["path"].as_array().map(Vec::as_slice).unwrap_or_default()))
        .collect();
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
                out.push_str(&text(other));
            }
        }
    }
    out
}

fn side_summary(side: &Value) -> String {
    let device = text(&side["device"]);
    let short = device.get(..8).unwrap_or(&device);
    format!("{short} {}", format_ms(side["time"].as_i64().unwrap_or(0)))
}

fn side_value(v: &Value) -> String {
    if v.is_null() {
        "(removed)".to_owned()
    } else {
        v.to_string()
    }
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
fn shown(current: Option<&Value>, server: &Value, client: &Value) -> &'static str {
    let current = current.unwrap_or(&Value::Null);
    if current == client {
        "client"
    } else if current == server {
        "server"
    } else {
        "neither"
    }
}

fn resolution_text(r: &Value) -> String {
    let take = r["take"]
        .as_str()
        .map_or_else(|| "ended by an edit".to_owned(), |t| format!("took {t}"));
    let by = r["device"]
        .as_str()
        .map(|d| format!(" by {d}"))
        .unwrap_or_default();
    let change = r["change"]
        .as_str()
        .map(|c| format!(" (change {c})"))
        .unwrap_or_default();
    format!(
        "{take}{by} at {}{change}",
        format_ms(r["time"].as_i64().unwrap_or(0))
    )
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
            shown(at(&[json!("name")]), &json!("Ada"), &json!("Bea")),
            "client"
        );
        assert_eq!(
            shown(at(&[json!("name")]), &json!("Bea"), &json!("Ada")),
            "server"
        );
        assert_eq!(
            shown(at(&[json!("tags"), json!(1)]), &json!("b"), &json!("c")),
            "server"
        );
        assert_eq!(
            shown(at(&[json!("gone")]), &json!("x"), &Value::Null),
            "client"
        );
        assert_eq!(
            shown(at(&[json!("name")]), &json!("x"), &json!("y")),
            "neither"
        );
    }
}
