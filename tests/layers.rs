//! The module layers ARCHITECTURE.md draws, checked against the code: every `crate::`, `super::`
//! and `self::` path in `src/` (outside `#[cfg(test)]` modules) may only reach a module on a
//! lower layer, or one inside its own top-level module on the same or a lower layer. The table
//! is read from ARCHITECTURE.md itself, so the map and the code cannot drift apart.

// A test stops at the first thing that goes wrong: panicking is how it reports it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Unit (`engine`, `auth::token`) → layer, from the ```text block under `## Layers`.
fn layer_table() -> BTreeMap<String, usize> {
    let map = std::fs::read_to_string(Path::new(ROOT).join("ARCHITECTURE.md"))
        .expect("ARCHITECTURE.md is readable");
    let section = map
        .split("\n## Layers")
        .nth(1)
        .expect("ARCHITECTURE.md has a `## Layers` section");
    let block = section
        .split("```text\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("the Layers section has a ```text block");
    let mut table = BTreeMap::new();
    for line in block.lines().filter(|l| !l.trim().is_empty()) {
        let mut words = line.split_whitespace();
        let layer: usize = words
            .next()
            .and_then(|w| w.parse().ok())
            .unwrap_or_else(|| panic!("layer line {line:?} starts with its number"));
        for unit in words {
            assert!(
                table.insert(unit.to_owned(), layer).is_none(),
                "{unit} is listed twice"
            );
        }
    }
    table
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/relay/server.rs` → `["relay", "server"]`; `src/store/mod.rs` → `["store"]`.
fn module_path(file: &Path) -> Vec<String> {
    let relative = file
        .strip_prefix(Path::new(ROOT).join("src"))
        .expect("a file under src/");
    let mut parts: Vec<String> = relative
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts
        .last()
        .is_some_and(|p| p == "mod" || p == "lib" || p == "main")
    {
        parts.pop();
    }
    parts
}

/// The most specific unit of the table that `path` falls in.
fn unit_of(path: &[String], table: &BTreeMap<String, usize>) -> Option<String> {
    (1..=path.len().min(2))
        .rev()
        .map(|n| path[..n].join("::"))
        .find(|unit| table.contains_key(unit))
}

/// The code of a file without comments and test modules.
fn code_of(text: &str) -> String {
    let body = text.split("#[cfg(test)]\nmod ").next().unwrap_or(text);
    body.lines()
        .map(|line| line.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every module path the code names, resolved to an absolute path from the crate root.
fn references(code: &str, here: &[String]) -> Vec<Vec<String>> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut found = Vec::new();
    let bytes: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        let starts_word = i == 0 || !(ident(bytes[i - 1]) || bytes[i - 1] == ':');
        if !starts_word || !ident(bytes[i]) {
            i += 1;
            continue;
        }
        let mut end = i;
        while end < bytes.len() && (ident(bytes[end]) || bytes[end] == ':') {
            end += 1;
        }
        let path: String = bytes[i..end].iter().collect();
        i = end;
        let mut segments: Vec<&str> = path.split("::").collect();
        let mut absolute: Vec<String> = match segments.first().copied() {
            Some("crate") => Vec::new(),
            Some("super") | Some("self") => here.to_vec(),
            _ => continue,
        };
        if segments.len() < 2 {
            continue;
        }
        if segments[0] == "crate" {
            segments.remove(0);
        } else {
            while let Some(first) = segments.first().copied() {
                match first {
                    "super" => {
                        absolute.pop();
                    }
                    "self" => {}
                    _ => break,
                }
                segments.remove(0);
            }
        }
        absolute.extend(
            segments
                .iter()
                .take_while(|s| s.chars().next().is_some_and(|c| c.is_ascii_lowercase()))
                .map(|s| s.to_string()),
        );
        if !absolute.is_empty() {
            found.push(absolute);
        }
    }
    found
}

#[test]
fn every_module_only_uses_modules_below_it() {
    let table = layer_table();
    let mut files = Vec::new();
    rust_files(&Path::new(ROOT).join("src"), &mut files);
    files.sort();
    let mut violations = Vec::new();
    for file in &files {
        let here = module_path(file);
        if here.is_empty() {
            continue; // lib.rs and main.rs only declare and start things
        }
        let Some(unit) = unit_of(&here, &table) else {
            violations.push(format!(
                "{}: module {} has no layer in ARCHITECTURE.md",
                file.display(),
                here.join("::")
            ));
            continue;
        };
        let layer = table[&unit];
        let code = code_of(&std::fs::read_to_string(file).expect("source is readable"));
        if code.contains("crate::{") {
            violations.push(format!(
                "{}: write one path per `use crate::` so this check can read it",
                file.display()
            ));
        }
        for target in references(&code, &here) {
            let Some(target_unit) = unit_of(&target, &table) else {
                continue; // an item of the crate root or an unknown name: not a module
            };
            let target_layer = table[&target_unit];
            let same_top = target.first() == here.first();
            let allowed =
                target_unit == unit || target_layer < layer || (same_top && target_layer <= layer);
            if !allowed {
                violations.push(format!(
                    "{}: {unit} (layer {layer}) uses {} (layer {target_layer})",
                    file.display(),
                    target.join("::")
                ));
            }
        }
    }
    violations.sort();
    violations.dedup();
    assert!(
        violations.is_empty(),
        "modules reach above their layer (see ARCHITECTURE.md, Layers):\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_checker_sees_paths_the_way_rust_resolves_them() {
    let here = vec!["relay".to_owned(), "server".to_owned()];
    let code = "use super::store::RelayStore;\nuse crate::engine::now;\nfn f() { self::g(); }";
    assert_eq!(
        references(code, &here),
        vec![
            vec!["relay".to_owned(), "store".to_owned()],
            vec!["engine".to_owned(), "now".to_owned()],
            vec!["relay".to_owned(), "server".to_owned(), "g".to_owned()],
        ]
    );
    assert_eq!(
        code_of("a // crate::x\n#[cfg(test)]\nmod tests { crate::y }"),
        "a "
    );
}

/// Each invariant in ARCHITECTURE.md names the tests that check it; those tests must exist.
#[test]
fn every_invariant_names_tests_that_exist() {
    let map = std::fs::read_to_string(Path::new(ROOT).join("ARCHITECTURE.md"))
        .expect("ARCHITECTURE.md is readable");
    let section = map
        .split("\n## Invariants")
        .nth(1)
        .expect("ARCHITECTURE.md has an `## Invariants` section");
    let invariants: Vec<&str> = section.split("\n- ").skip(1).collect();
    assert!(!invariants.is_empty(), "no invariants found");
    let tests = Path::new(ROOT).join("tests");
    let mut problems = Vec::new();
    for invariant in invariants {
        let mut named = 0;
        for quoted in invariant.split('`').skip(1).step_by(2) {
            if let Some(file) = quoted.strip_suffix(".rs") {
                if tests.join(quoted).is_file() {
                    named += 1;
                } else if !file.contains('/') {
                    problems.push(format!("tests/{quoted} does not exist"));
                }
                continue;
            }
            let Some((file, test)) = quoted.split_once("::") else {
                continue;
            };
            let is_test_name = |s: &str| {
                !s.is_empty()
                    && s.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            };
            if !is_test_name(file) || !is_test_name(test) {
                continue;
            }
            let test_file = tests.join(format!("{file}.rs"));
            if test_file.is_file() {
                let text = std::fs::read_to_string(&test_file).expect("test file is readable");
                if text.contains(&format!("fn {test}(")) {
                    named += 1;
                } else {
                    problems.push(format!("tests/{file}.rs has no test {test}"));
                }
            } else if Path::new(ROOT)
                .join("src")
                .join(file)
                .join(format!("{test}.rs"))
                .is_file()
            {
                named += 1; // a module's own unit tests
            }
        }
        if named == 0 {
            let first = invariant.lines().next().unwrap_or_default();
            problems.push(format!("the invariant \"{first}...\" names no test"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
