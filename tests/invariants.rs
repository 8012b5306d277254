//! Rules of the code base that ARCHITECTURE.md states, checked here rather than by memory.

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
