//! What the tests' handler scripts record, and [`Dependency`]: a `command` handler whose
//! dependency a test switches off and on. The scripts themselves are written by
//! [`super::BrokerLock::script`] into the test's directory.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::BrokerLock;

/// Reads the ids a recording handler wrote, one per line.
pub fn recorded(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// A `command` handler whose dependency the test switches off and on, for the circuit breaker
/// and the pause tests. Each call appends `<epoch ms> <body> <attempt> ok|fail` to `calls`; it
/// fails (exit 1) while the file `down` exists, and a body that starts with `slow` sleeps 2s
/// first. A body that is `poison` always fails.
pub struct Dependency {
    pub script: PathBuf,
    pub down: PathBuf,
    pub calls: PathBuf,
}

/// One line of a [`Dependency`]'s calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub at_ms: u64,
    pub body: String,
    pub attempt: u32,
    pub ok: bool,
}

impl Dependency {
    pub fn new(broker: &BrokerLock, name: &str) -> Dependency {
        let down = broker.dir.path().join(format!("{name}.down"));
        let calls = broker.dir.path().join(format!("{name}.calls"));
        let script = broker.script(
            &format!("{name}.sh"),
            &format!(
                "body=$(cat)\n\
                 case \"$body\" in slow*) sleep 2 ;; esac\n\
                 if [ -e '{down}' ] || [ \"$body\" = poison ]; then verdict=fail; else verdict=ok; fi\n\
                 echo \"$(date +%s%3N) $body $WARREN_ATTEMPT $verdict\" >> '{calls}'\n\
                 [ $verdict = ok ]",
                down = down.display(),
                calls = calls.display()
            ),
        );
        Dependency {
            script,
            down,
            calls,
        }
    }

    /// The dependency fails from now on.
    pub fn fail(&self) {
        fs::write(&self.down, "").expect("create the down flag");
    }

    /// The dependency works again.
    pub fn recover(&self) {
        let _ = fs::remove_file(&self.down);
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        recorded(&self.calls)
            .iter()
            .map(|line| {
                let fields: Vec<&str> = line.split(' ').collect();
                assert_eq!(fields.len(), 4, "a call line: {line:?}");
                Call {
                    at_ms: fields[0].parse().expect("a time"),
                    body: fields[1].to_string(),
                    attempt: fields[2].parse().expect("an attempt"),
                    ok: fields[3] == "ok",
                }
            })
            .collect()
    }

    /// The bodies that succeeded, each once.
    pub fn done(&self) -> std::collections::BTreeSet<String> {
        self.calls()
            .into_iter()
            .filter(|call| call.ok)
            .map(|call| call.body)
            .collect()
    }
}

/// Milliseconds since the epoch, as the [`Dependency`] script records them.
pub fn epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64
}
