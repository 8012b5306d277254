//! Numbered tasks under faults, and what became of them. The fault suite (tests/faults.rs: one
//! warren on the system broker) and the cluster suite (tests/cluster.rs: three warrens on a
//! cluster of nodes of the test's own) both publish the tasks "1" to "N" through [`Tasks`], run
//! a handler that appends each task it completes to a file, and end with a [`Tally`] that says
//! which tasks were lost and how many ran twice. Each suite's own `Scenario` sets up the broker,
//! the faults and the warrens around them.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::process::{Child, ChildStdin};
use std::time::Duration;

use warren::amqp::Fetched;

use super::{spawn_publish_stdin, wait_until};

/// The tasks of one scenario: the config that publishes and runs them, and the file that the
/// scenario's handler appends one line to per task it completes: `ID`, or `ID TIME` (seconds
/// since the epoch) when the handler also says when.
pub struct Tasks {
    pub config: PathBuf,
    pub done: PathBuf,
}

/// One line of the completions file.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Completion {
    pub id: u64,
    /// When the task was done, in seconds since the epoch, if the handler wrote it.
    pub at: Option<f64>,
}

impl Tasks {
    /// Publishes the tasks `ids` with one `warren publish --stdin` and returns its log.
    pub fn publish(&self, ids: RangeInclusive<u64>) -> String {
        let mut publisher = Publisher::start(&self.config);
        let lines: String = ids.map(|id| format!("{id}\n")).collect();
        publisher.write(&lines);
        publisher.finish()
    }

    /// Every completion recorded so far, in order, duplicates included.
    pub fn completions(&self) -> Vec<Completion> {
        let text = fs::read_to_string(&self.done).unwrap_or_default();
        text.lines()
            .map(|line| {
                let mut fields = line.split_whitespace();
                let id = fields.next().and_then(|id| id.parse().ok());
                let at = fields.next().map(str::parse);
                match (id, at, fields.next()) {
                    (Some(id), None, None) => Completion { id, at: None },
                    (Some(id), Some(Ok(at)), None) => Completion { id, at: Some(at) },
                    _ => panic!(
                        "{} holds {line:?}, not a task id and maybe a time",
                        self.done.display()
                    ),
                }
            })
            .collect()
    }

    /// How many different tasks are done so far.
    pub fn distinct(&self) -> usize {
        let ids: BTreeSet<u64> = self.completions().iter().map(|c| c.id).collect();
        ids.len()
    }

    /// Waits until `count` different tasks are done.
    pub fn wait_done(&self, count: usize, timeout: Duration) {
        wait_until(timeout, &format!("{count} tasks to be done"), || {
            self.distinct() >= count
        });
    }

    /// What became of the tasks `1..=tasks`: the completions recorded so far, and the copies
    /// that were taken off the dead-letter queue, each with its task id.
    pub fn tally(&self, tasks: u64, dead_lettered: Vec<(u64, Fetched)>) -> Tally {
        Tally::new(tasks, &self.completions(), dead_lettered)
    }
}

/// What became of the tasks of one scenario.
pub struct Tally {
    /// Completions per task id.
    pub done: BTreeMap<u64, usize>,
    /// Dead-lettered copies, by task id.
    pub dead: BTreeMap<u64, Vec<Fetched>>,
    /// Ids neither done nor dead-lettered.
    pub lost: Vec<u64>,
    /// Completions and dead-letterings beyond the first of each task.
    pub duplicates: usize,
    /// The longest gap between two completions, in seconds, when the handler wrote their times.
    pub longest_pause: Option<f64>,
}

impl Tally {
    /// Checks that every task that was done or dead-lettered was published (`1..=tasks`), and
    /// counts the rest.
    pub fn new(
        tasks: u64,
        completions: &[Completion],
        dead_lettered: Vec<(u64, Fetched)>,
    ) -> Tally {
        let mut done = BTreeMap::new();
        for completion in completions {
            *done.entry(completion.id).or_insert(0) += 1;
        }
        let mut dead: BTreeMap<u64, Vec<Fetched>> = BTreeMap::new();
        for (id, message) in dead_lettered {
            dead.entry(id).or_default().push(message);
        }
        let valid = 1..=tasks;
        for id in done.keys().chain(dead.keys()) {
            assert!(valid.contains(id), "task {id} was never published");
        }
        let lost = valid
            .filter(|id| !done.contains_key(id) && !dead.contains_key(id))
            .collect();
        let outcomes = done.values().sum::<usize>() + dead.values().map(Vec::len).sum::<usize>();
        let distinct = done
            .keys()
            .chain(dead.keys())
            .collect::<BTreeSet<_>>()
            .len();
        let times: Option<Vec<f64>> = completions.iter().map(|c| c.at).collect();
        let longest_pause = times.map(|mut times| {
            times.sort_by(f64::total_cmp);
            times.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max)
        });
        Tally {
            duplicates: outcomes - distinct,
            done,
            dead,
            lost,
            longest_pause,
        }
    }

    /// Checks that no task was lost.
    pub fn assert_none_lost(&self) {
        assert!(
            self.lost.is_empty(),
            "{} tasks were neither done nor dead-lettered: {:?}",
            self.lost.len(),
            self.lost.iter().take(20).collect::<Vec<_>>()
        );
    }
}

/// A `warren publish --stdin` fed by the test, a batch of task ids at a time.
pub struct Publisher {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Publisher {
    pub fn start(config: &std::path::Path) -> Publisher {
        let mut child = spawn_publish_stdin(config, &[]);
        let stdin = child.stdin.take();
        Publisher { child, stdin }
    }

    /// Writes `lines`, one task id a line.
    pub fn write(&mut self, lines: &str) {
        let stdin = self.stdin.as_mut().expect("stdin is open");
        stdin
            .write_all(lines.as_bytes())
            .expect("write tasks to warren publish");
        stdin.flush().expect("flush the tasks to warren publish");
    }

    /// Closes its input and asserts that it confirmed everything (exit 0); returns its log.
    pub fn finish(mut self) -> String {
        drop(self.stdin.take());
        let out = self
            .child
            .wait_with_output()
            .expect("wait for warren publish");
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "warren publish failed: {}\n{log}",
            out.status
        );
        log
    }
}
