//! Log output: the filter (`RUST_LOG`, default `info`, with amiquip's own chatter hidden), and
//! the line format: text with a timestamp, text without one under systemd's journal (which adds
//! its own, and reads the `<N>` priority prefix), or one JSON object per line for log shippers.
//!
//! The format is chosen once the configuration is read; until then (and for errors in reading
//! it) lines are text. [`preview`] is how a message body appears in a line: never whole.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::config::LogFormat;

/// Set once the configuration asks for JSON; read by every log line.
static JSON: AtomicBool = AtomicBool::new(false);

/// The log target of each task's received and done lines, which are at debug level: at thousands
/// of tasks a second two lines per task cost throughput (BENCHMARKS.md) and journald's rate limit.
/// `warren run --verbose` shows them.
pub const TASKS: &str = "warren::task";

/// Installs the logger. Call once, first thing. `verbose` adds [`TASKS`] at debug to the filter.
pub fn init(verbose: bool) {
    // amiquip's own warnings repeat, less clearly, what warren logs about the same event, so
    // they are hidden unless RUST_LOG asks for amiquip by name.
    let mut filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|f| !f.trim().is_empty())
        .unwrap_or_else(|| "info".into());
    if !filter.contains("amiquip") {
        filter.push_str(",amiquip=error");
    }
    if verbose {
        filter.push_str(&format!(",{TASKS}=debug"));
    }
    // systemd sets JOURNAL_STREAM when standard error is connected to the journal.
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    env_logger::Builder::new()
        .parse_filters(&filter)
        .format(move |buf, record| {
            if JSON.load(Ordering::Relaxed) {
                let line = serde_json::json!({
                    "ts": buf.timestamp_millis().to_string(),
                    "level": record.level().as_str(),
                    "target": record.target(),
                    "msg": record.args().to_string(),
                });
                writeln!(buf, "{line}")
            } else if journal {
                writeln!(
                    buf,
                    "<{}>{:<5} {}",
                    priority(record.level()),
                    record.level(),
                    record.args()
                )
            } else {
                writeln!(
                    buf,
                    "[{} {:<5}] {}",
                    buf.timestamp(),
                    record.level(),
                    record.args()
                )
            }
        })
        .init();
}

/// Switches to the configured format.
pub fn set_format(format: LogFormat) {
    JSON.store(format == LogFormat::Json, Ordering::Relaxed);
}

/// How many bytes of a body the log shows.
const PREVIEW_BYTES: usize = 64;

/// The first bytes of a body, escaped, for the log. Never the whole body.
pub fn preview(body: &[u8]) -> String {
    let shown = &body[..body.len().min(PREVIEW_BYTES)];
    let more = if body.len() > PREVIEW_BYTES {
        format!("… ({} bytes)", body.len())
    } else {
        String::new()
    };
    format!("\"{}\"{more}", shown.escape_ascii())
}

/// The syslog priority journald reads from a `<N>` prefix.
fn priority(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    }
}

#[cfg(test)]
mod tests {
    use super::preview;

    #[test]
    fn previews_are_short_and_escaped() {
        assert_eq!(preview(b"Hello..."), "\"Hello...\"");
        assert_eq!(preview(b"a\"\n\xff"), "\"a\\\"\\n\\xff\"");
        let long = vec![b'x'; 1000];
        let shown = preview(&long);
        assert!(shown.starts_with(&format!("\"{}\"", "x".repeat(64))));
        assert!(shown.ends_with("… (1000 bytes)"));
    }
}
