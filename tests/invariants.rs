//! Rules of the code base that ARCHITECTURE.md states, checked here rather than by memory.

use std::fs;
use std::path::Path;

fn sources() -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    files.sort();
    assert!(
        files.len() >= 7,
        "found the sources: {:?}",
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
