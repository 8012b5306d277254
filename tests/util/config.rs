//! [`ConfigFile`]: the one way tests write a warren config file. A test says which keys it
//! needs (`ConfigFile::new(&queue).workers(2).dots()`), and the builder writes valid TOML for
//! them, quoting paths and URLs itself. Tests about malformed or unusual files (a syntax error,
//! a comment after a table header, a key's line number) write their text literally instead:
//! there the text is the point.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use warren::config::Config;

use super::amqp_url;

/// The tables of a config in the order they are written: the order of `config/warren.toml`.
const TABLES: [&str; 11] = [
    "broker",
    "broker.tls",
    "queue",
    "workers",
    "handler",
    "retry",
    "shutdown",
    "breaker",
    "control",
    "metrics",
    "log",
];

/// A warren config file under construction: tables of keys and values, written as TOML by
/// [`ConfigFile::write_in`] or [`ConfigFile::write_to`].
#[derive(Debug, Clone)]
pub struct ConfigFile {
    /// Each table's name and its keys, in the order of [`TABLES`], then any other table in the
    /// order it was first set.
    tables: Vec<(String, Vec<(String, toml::Value)>)>,
    /// Each `[[queue.bindings]]`, written after `[queue]`.
    bindings: Vec<toml::Table>,
}

impl ConfigFile {
    /// A config for `queue` on the test broker, with a heartbeat of 5 s so that a connection
    /// lost without a word is noticed within a test's patience.
    pub fn new(queue: &str) -> ConfigFile {
        ConfigFile::at(&amqp_url(), queue).set("broker.heartbeat", "5s")
    }

    /// A config for `queue` on the broker at `url`, with warren's default for every other key.
    pub fn at(url: &str, queue: &str) -> ConfigFile {
        ConfigFile::empty().url(url).set("queue.name", queue)
    }

    /// A config for `queue` on the cluster whose nodes are at `urls`, with warren's default for
    /// every other key.
    pub fn at_nodes(urls: &[String], queue: &str) -> ConfigFile {
        ConfigFile::empty().urls(urls).set("queue.name", queue)
    }

    /// No key at all, and the tables in their order.
    fn empty() -> ConfigFile {
        let tables = TABLES
            .iter()
            .map(|table| (table.to_string(), Vec::new()))
            .collect();
        ConfigFile {
            tables,
            bindings: Vec::new(),
        }
    }

    /// Adds a `[[queue.bindings]]`: exchange `exchange` of type `kind`, with `routing_keys`
    /// unless there are none.
    pub fn binding(mut self, exchange: &str, kind: &str, routing_keys: &[&str]) -> ConfigFile {
        let mut binding = toml::Table::new();
        binding.insert("exchange".into(), exchange.into());
        binding.insert("type".into(), kind.into());
        if !routing_keys.is_empty() {
            binding.insert("routing_keys".into(), routing_keys.to_vec().into());
        }
        self.bindings.push(binding);
        self
    }

    /// Gives the last `[[queue.bindings]]` these string `arguments` (a headers exchange's).
    pub fn binding_arguments(mut self, arguments: &[(&str, &str)]) -> ConfigFile {
        let binding = self
            .bindings
            .last_mut()
            .expect("a binding to add arguments to");
        let table: toml::Table = (arguments.iter())
            .map(|(name, value)| (name.to_string(), toml::Value::from(*value)))
            .collect();
        binding.insert("arguments".into(), table.into());
        self
    }

    /// Sets `key`, a dotted path such as `"handler.timeout"` or `"broker.tls.ca_file"`: the last
    /// part is the key, the rest its table. A key set twice keeps its place and the last value.
    pub fn set(mut self, key: &str, value: impl Into<toml::Value>) -> ConfigFile {
        let (table, key) = key
            .rsplit_once('.')
            .unwrap_or_else(|| panic!("config key {key:?} names no table"));
        let keys = match self.tables.iter().position(|(name, _)| name == table) {
            Some(at) => &mut self.tables[at].1,
            None => {
                self.tables.push((table.to_string(), Vec::new()));
                &mut self.tables.last_mut().expect("invariant: just pushed").1
            }
        };
        let value = value.into();
        match keys.iter_mut().find(|(name, _)| name == key) {
            Some(entry) => entry.1 = value,
            None => keys.push((key.to_string(), value)),
        }
        self
    }

    /// Removes `key` (a dotted path, as for [`ConfigFile::set`]), if it is set.
    pub fn unset(mut self, key: &str) -> ConfigFile {
        if let Some((table, key)) = key.rsplit_once('.') {
            for (name, keys) in &mut self.tables {
                if name == table {
                    keys.retain(|(name, _)| name != key);
                }
            }
        }
        self
    }

    /// The broker at `url` instead of the one set so far, keeping the other `[broker]` keys.
    pub fn url(self, url: &str) -> ConfigFile {
        self.unset("broker.urls").set("broker.url", url)
    }

    /// The nodes of a cluster (`broker.urls`) instead of the broker set so far, keeping the
    /// other `[broker]` keys.
    pub fn urls(self, urls: &[String]) -> ConfigFile {
        self.unset("broker.url").set("broker.urls", urls.to_vec())
    }

    /// A quorum queue (`queue.type`).
    pub fn quorum(self) -> ConfigFile {
        self.set("queue.type", "quorum")
    }

    /// `count` workers (`workers.count`).
    pub fn workers(self, count: usize) -> ConfigFile {
        let count = i64::try_from(count).expect("invariant: a test's worker count fits");
        self.set("workers.count", count)
    }

    /// `workers.prefetch`.
    pub fn prefetch(self, prefetch: u16) -> ConfigFile {
        self.set("workers.prefetch", i64::from(prefetch))
    }

    /// The tutorial's `dots` handler.
    pub fn dots(self) -> ConfigFile {
        self.set("handler.kind", "dots")
    }

    /// A `command` handler that runs `program` with no arguments.
    pub fn command(self, program: &Path) -> ConfigFile {
        self.command_argv(&[&program.display().to_string()])
    }

    /// A `command` handler that runs `argv`.
    pub fn command_argv(self, argv: &[&str]) -> ConfigFile {
        self.set("handler.kind", "command")
            .set("handler.command", argv.to_vec())
    }

    /// A `pipe` handler that runs `argv`.
    pub fn pipe(self, argv: &[&str]) -> ConfigFile {
        self.set("handler.kind", "pipe")
            .set("handler.command", argv.to_vec())
    }

    /// Three attempts, 100ms and then 200ms apart, so that warren declares the retry queues
    /// `<queue>.retry.100ms` and `<queue>.retry.200ms` (the [`super::Queues`] of the queue).
    pub fn fast_retries(self) -> ConfigFile {
        self.set("retry.max_attempts", 3)
            .set("retry.delay", "100ms")
            .set("retry.max_delay", "400ms")
    }

    /// The control socket (`control.socket`) at `socket`.
    pub fn control(self, socket: &Path) -> ConfigFile {
        self.set("control.socket", socket.display().to_string())
    }

    /// `/metrics` and `/healthz` on `127.0.0.1:port` (`metrics.listen`).
    pub fn metrics(self, port: u16) -> ConfigFile {
        self.set("metrics.listen", format!("127.0.0.1:{port}"))
    }

    /// The file's text: each table that has keys, in order.
    pub fn text(&self) -> String {
        let mut text = String::new();
        for (table, keys) in self.tables.iter().filter(|(_, keys)| !keys.is_empty()) {
            if !text.is_empty() {
                text.push('\n');
            }
            writeln!(text, "[{table}]").expect("invariant: writing to a String");
            for (key, value) in keys {
                writeln!(text, "{key} = {value}").expect("invariant: writing to a String");
            }
            if table == "queue" {
                for binding in &self.bindings {
                    // Each key on its line, a table (the arguments) inline.
                    text.push_str("\n[[queue.bindings]]\n");
                    for (key, value) in binding {
                        writeln!(text, "{key} = {value}").expect("invariant: writing to a String");
                    }
                }
            }
        }
        text
    }

    /// Writes the file into `dir` under a name no other config of the test run has, and returns
    /// its path.
    pub fn write_in(&self, dir: &Path) -> PathBuf {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!("warren-{}.toml", NEXT.fetch_add(1, Ordering::Relaxed));
        self.write_to(&dir.join(name))
    }

    /// Writes the file at `path`, replacing what is there, and returns the path.
    pub fn write_to(&self, path: &Path) -> PathBuf {
        fs::write(path, self.text())
            .unwrap_or_else(|e| panic!("write the config file {}: {e}", path.display()));
        path.to_path_buf()
    }

    /// The config as warren loads it, for a test that calls the library directly.
    pub fn parse(&self) -> Config {
        let text = self.text();
        Config::parse(Path::new("test.toml"), &text, None)
            .unwrap_or_else(|e| panic!("the test config does not load: {e}\n{text}"))
    }
}

/// The number of the first line of `text` that contains `needle`, counting from 1, as warren
/// names the line of a bad key.
pub fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} is not in {text:?}"))
        + 1
}
