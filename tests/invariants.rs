//! Rules of the code base that ARCHITECTURE.md states, checked here rather than by memory.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

fn sources() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let name = path.strip_prefix(&root).unwrap().display().to_string();
                files.push((name, fs::read_to_string(&path).unwrap()));
            }
        }
    }
    files.sort();
    assert!(
        files.iter().any(|(name, _)| name == "pool/worker.rs") && files.len() >= 7,
        "found the sources, subdirectories included: {:?}",
        files.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    files
}

#[test]
fn only_amqp_rs_imports_amiquip() {
    for (name, text) in sources() {
        if name != "amqp.rs" {
            assert!(
                !text.contains("amiquip::") && !text.contains("use amiquip"),
                "{name} uses amiquip; broker calls belong in amqp.rs"
            );
        }
    }
}

#[test]
fn every_source_file_opens_with_a_module_paragraph() {
    for (name, text) in sources() {
        assert!(
            text.starts_with("//!"),
            "{name} does not open with a //! paragraph"
        );
    }
}

#[test]
fn only_main_rs_exits_the_process() {
    for (name, text) in sources() {
        if name != "main.rs" {
            assert!(
                !text.contains("process::exit"),
                "{name} exits the process; only main.rs may"
            );
        }
    }
}

/// The modules of `src/` that each module names through `crate::`, with `pool/*.rs` counted as
/// `pool` and the crate root's own items (`crate::exit`, `crate::Failure`) as `lib`.
fn import_graph() -> BTreeMap<String, BTreeSet<String>> {
    let sources = sources();
    let module = |file: &str| {
        let file = file.trim_end_matches(".rs");
        file.split('/').next().unwrap().to_string()
    };
    let modules: BTreeSet<String> = sources.iter().map(|(name, _)| module(name)).collect();
    let mut graph = BTreeMap::new();
    for (name, text) in &sources {
        let from = module(name);
        let edges: &mut BTreeSet<String> = graph.entry(from.clone()).or_default();
        // The crate root names its modules without `crate::`.
        let root_paths = (from == "lib").then(|| bare_paths(text, &modules));
        for path in crate_paths(text)
            .into_iter()
            .chain(root_paths.into_iter().flatten())
        {
            let to = if modules.contains(&path) {
                path
            } else {
                "lib".to_string()
            };
            if to != from {
                edges.insert(to);
            }
        }
    }
    graph
}

/// The first segment of every `crate::` path in `text`, including each member of a
/// `crate::{a, b::c}` group.
fn crate_paths(text: &str) -> Vec<String> {
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut paths = Vec::new();
    for (at, _) in text.match_indices("crate::") {
        let rest = &text[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // The first segment of each member at the group's own depth: `a::{b, c}` is `a`.
            let mut depth = 0;
            let mut member_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => member_start = true,
                    c if c.is_whitespace() => {}
                    _ if member_start => {
                        member_start = false;
                        paths.push(ident(&group[i..]));
                    }
                    _ => {}
                }
            }
        } else {
            paths.push(ident(rest));
        }
    }
    paths
}

/// The modules of `modules` that `text` names as `module::` without `crate::`, as the crate
/// root does.
fn bare_paths(text: &str, modules: &BTreeSet<String>) -> Vec<String> {
    let mut paths = Vec::new();
    for module in modules {
        let named = text.match_indices(&format!("{module}::")).any(|(at, _)| {
            let before = text[..at].chars().next_back();
            !before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':')
        });
        if named {
            paths.push(module.clone());
        }
    }
    paths
}

/// A cycle in `graph`, as the modules along it, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| n == node) {
            let mut cycle = path[start..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

/// The layers of ARCHITECTURE.md's code map, lowest first. A module may name only modules of
/// lower layers.
const LAYERS: &[&[&str]] = &[
    &["abort", "context", "metrics", "tls"],
    &["config", "http", "notify"],
    &["amqp", "child", "control", "logging", "secrets"],
    &["handler", "retry"],
    &["depth", "pipe", "publish"],
    &["factory"],
    &["pool"],
    &["lib"],
    &["ops"],
];

#[test]
fn the_modules_are_layered_with_no_import_circle() {
    let graph = import_graph();
    // The reader sees the edges it must: without them this test would pass on an empty graph.
    for (from, to) in [
        ("pool", "handler"),
        ("pipe", "child"),
        ("lib", "pool"),
        ("ops", "lib"),
    ] {
        assert!(
            graph[from].contains(to),
            "the import graph lacks {from} -> {to}: {graph:?}"
        );
    }
    let layer = |module: &str| LAYERS.iter().position(|layer| layer.contains(&module));
    for (from, to) in graph
        .iter()
        .flat_map(|(from, tos)| tos.iter().map(move |to| (from, to)))
    {
        // `main` and `cli` are the binary, above the library; they name it as `warren::`.
        if from == "main" || from == "cli" {
            continue;
        }
        let (Some(high), Some(low)) = (layer(from), layer(to)) else {
            panic!("{from} or {to} has no layer in LAYERS; add it where ARCHITECTURE.md's code map puts it");
        };
        assert!(
            low < high,
            "{from} names {to}, which is not in a lower layer (ARCHITECTURE.md, code map)"
        );
    }
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "the modules import each other in a circle: {}; move what they share into a module \
             below them (ARCHITECTURE.md, code map)",
            cycle.join(" -> ")
        );
    }
}

#[test]
fn the_circle_check_finds_a_circle() {
    let graph = BTreeMap::from([
        ("a".to_string(), BTreeSet::from(["b".to_string()])),
        ("b".to_string(), BTreeSet::from(["c".to_string()])),
        ("c".to_string(), BTreeSet::from(["a".to_string()])),
    ]);
    assert_eq!(find_cycle(&graph).unwrap(), ["a", "b", "c", "a"]);
    let text = "use crate::{x, y::Z};\nlet a = crate::w::f();";
    assert_eq!(crate_paths(text), ["x", "y", "w"]);
    let nested = "use crate::{a::{b, c}, d};";
    assert_eq!(crate_paths(nested), ["a", "d"]);
    let modules = BTreeSet::from(["pool".to_string(), "ops".to_string(), "w".to_string()]);
    assert_eq!(
        bare_paths("pool::Pool::new(); crate::w::f(); my_ops::g()", &modules),
        ["pool"]
    );
}
