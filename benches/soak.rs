//! The soak: warren under a steady load and random faults for as long as asked, checked end to
//! end and watched for slow leaks.
//!
//! `cargo bench --bench soak -- --minutes 60` (`.ci/run` runs `--minutes 3 --fault-every 15`).
//!
//! It starts a RabbitMQ node of its own (`warren-t1`, port 5681, through `tests/util/nodes.rs`,
//! under the nodes lock) with a `consumer_timeout` of 15 s, which it checks every second, while
//! warren's configuration keeps the 30-minute default: the first task that outlives 15 s makes
//! warren learn the broker's real limit. On it run five `warren run` processes, each with two
//! workers: `dots` on the classic queue `soak-dots`, `command` (a shell script) on the classic
//! queue `soak-command`, and three `pipe` processes (a Python program) on the quorum queue
//! `soak-pipe`. warren caps glibc's malloc arenas at 2 (`main.rs`); `pipe-c` runs with
//! `MALLOC_ARENA_MAX=16`, glibc's default on 2 cores (8 per core), beside `pipe-a` under the same
//! load, which shows what the cap is worth. A producer thread publishes `--rate` persistent messages a second with publisher
//! confirms, republishing whatever a lost connection left unconfirmed; every 200th message to
//! `command` and `pipe` is poison (the handler dead-letters it), and one in 20 to `dots` takes a
//! second.
//!
//! Every `--fault-every` seconds it injects one fault, drawn at random (seeded by `--seed`):
//! - `close-all`: `rabbitmqctl close_all_connections`;
//! - `restart-app`: `stop_app`, 3 s, `start_app`;
//! - `kill-warren`: SIGKILL to `pipe-b`, which is started again;
//! - `crash-burst`: for 5 s every handler fails (the command exits 3, the pipe program exits
//!   mid-message);
//! - `kill-pipe`: SIGKILL to every pipe program;
//! - `memory-alarm`: the node's memory watermark drops below its use for 5 s, blocking
//!   publishers (warren's retries included);
//! - `slow-task`: the next message to `command` or `pipe` takes 25 s on its first attempt,
//!   longer than the broker's consumer_timeout.
//!
//! Every 5 s it samples each warren process's anonymous resident memory, open descriptors and
//! threads, and every 30 s its broker connections. At the end it stops producing, waits for every
//! queue but the dead-letter queues to empty, and checks every confirmed message: a `command` or
//! `pipe` message, by its id, must be in its handler's record of successes or in the dead-letter
//! queue with a reason (a poison message in the dead-letter queue, and no other message with the
//! poison's reason); `dots` records nothing, so it is checked by count: its queue must be empty
//! with nothing dead-lettered. It prints one table and exits 1 on any lost message, a producer
//! left without confirms, an unclean stop, or when a process that was never killed (and runs
//! with warren's own arena cap) grew, from the median of the second quarter of the run to that
//! of the last, by more than the bounds in [`Bounds`] (its broker connections: from the first
//! sample, before any fault, to the last, after the queues emptied).

#[path = "../tests/util/mod.rs"]
mod util;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use util::nodes::{Cluster, Node};
use util::ConfigFile;
use warren::amqp::{Header, PublishEvent, Stamp};

/// The broker's consumer_timeout on the soak's node, in milliseconds.
const CONSUMER_TIMEOUT_MS: u64 = 15_000;
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
const CONNECTIONS_EVERY: Duration = Duration::from_secs(30);
/// How long the queues may take to empty once the producer has stopped.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the producer waits for its last confirms once producing has stopped.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(120);
/// Every this many messages to `command` and `pipe`, one is poison.
const POISON_EVERY: u64 = 200;

/// The growth allowed to a process that was never killed, from the median of the second quarter
/// of the run to the median of the last quarter (connections: from the first sample to the last). Descriptors and threads move with the tasks in
/// flight (a command's pipes, a pipe program's two threads), hence the slack.
struct Bounds;

impl Bounds {
    const ANON_KIB: i64 = 1024;
    const FDS: i64 = 8;
    const THREADS: i64 = 4;
    const CONNECTIONS: i64 = 0;
}

/// The process `kill-warren` kills: `pipe-b`.
const KILLED: usize = 3;

const QUEUES: [&str; 3] = ["soak-dots", "soak-command", "soak-pipe"];
const DOTS: usize = 0;
const COMMAND: usize = 1;
const PIPE: usize = 2;

const COMMAND_HANDLER: &str = r#"#!/bin/sh
# The soak's command handler; $1 is the soak's directory. The body is "ID MODE".
IFS=' ' read -r id mode || true
if [ -e "$1/crash" ]; then echo "crash burst" >&2; exit 3; fi
case "$mode" in
    poison) echo "poison message" >&2; exit 65 ;;
    slow) if [ "$WARREN_ATTEMPT" = 1 ]; then sleep 25; fi ;;
esac
echo "$id" >> "$1/done.command"
"#;

const PIPE_HANDLER: &str = r#"import json, os, sys, time
# The soak's pipe handler; argv[1] is the soak's directory. The body is "ID MODE".
d = sys.argv[1]
done = os.open(os.path.join(d, "done.pipe"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
while True:
    line = stdin.readline()
    if not line:
        break
    header = json.loads(line)
    ident, _, mode = stdin.read(header["size"]).decode().partition(" ")
    if os.path.exists(os.path.join(d, "crash")):
        os._exit(3)
    if mode == "poison":
        answer = "dead poison message"
    else:
        if mode == "slow" and header["attempt"] == 1:
            time.sleep(25)
        os.write(done, (ident + "\n").encode())
        answer = "ack"
    stdout.write(b"%d %s\n" % (header["tag"], answer.encode()))
    stdout.flush()
"#;

struct Flags {
    minutes: f64,
    fault_every: Duration,
    rate: f64,
    seed: u64,
}

fn flags() -> Result<Flags, String> {
    let usage = "use --minutes M, --fault-every SECONDS, --rate MESSAGES_PER_SECOND, --seed N";
    let mut flags = Flags {
        minutes: 60.0,
        fault_every: Duration::from_secs(60),
        rate: 40.0,
        seed: fastrand::u64(..),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| format!("{arg} needs a value; {usage}"))
        };
        let number = |v: String| {
            v.parse::<f64>()
                .ok()
                .filter(|n| *n > 0.0)
                .ok_or_else(|| format!("{arg} takes a positive number, not {v:?}"))
        };
        match arg.as_str() {
            "--bench" => {}
            "--minutes" => flags.minutes = number(value()?)?,
            "--fault-every" => flags.fault_every = Duration::from_secs_f64(number(value()?)?),
            "--rate" => flags.rate = number(value()?)?,
            "--seed" => {
                let v = value()?;
                flags.seed = v
                    .parse()
                    .map_err(|_| format!("--seed takes a number, not {v:?}"))?
            }
            other => return Err(format!("unknown argument {other:?}; {usage}")),
        }
    }
    Ok(flags)
}

fn main() -> ExitCode {
    match flags().and_then(soak) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("soak: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One message the producer made.
#[derive(Clone)]
struct Message {
    queue: usize,
    id: String,
    body: Vec<u8>,
    poison: bool,
}

/// What the producer thread did.
#[derive(Default)]
struct Produced {
    confirmed: Vec<Message>,
    /// Messages published again after a lost connection or a nack.
    republished: u64,
    reconnects: u64,
    /// Messages still unconfirmed when the producer gave up, [`CONFIRM_TIMEOUT`] after the
    /// stop: the broker never said whether it stored them.
    unconfirmed: u64,
}

/// An environment variable a process runs with.
type Env = (&'static str, &'static str);

/// One `warren run` process.
struct Process {
    name: &'static str,
    /// An environment variable it runs with.
    env: Option<Env>,
    config: PathBuf,
    log: PathBuf,
    child: Child,
    /// How many times it was killed (and started again).
    kills: u32,
    samples: Vec<Sample>,
}

#[derive(Clone, Copy, Default)]
struct Sample {
    at: f64,
    anon_kib: i64,
    fds: i64,
    threads: i64,
    /// Only every [`CONNECTIONS_EVERY`].
    connections: Option<i64>,
}

impl Process {
    fn start(name: &'static str, env: Option<Env>, config: PathBuf, dir: &Path) -> Process {
        let log = dir.join(format!("{name}.log"));
        let child = spawn_warren(&config, &log, env);
        Process {
            name,
            env,
            config,
            log,
            child,
            kills: 0,
            samples: Vec::new(),
        }
    }

    /// Whether its growth is held to the bounds: never killed, and run as warren runs.
    fn judged(&self) -> bool {
        self.kills == 0 && self.env.is_none()
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn kill_and_restart(&mut self) {
        let _ = kill(Pid::from_raw(self.pid()), Signal::SIGKILL);
        let _ = self.child.wait();
        self.kills += 1;
        self.samples.clear();
        self.child = spawn_warren(&self.config, &self.log, self.env);
    }

    fn sample(&mut self, at: f64, connections: Option<&str>) {
        let pid = self.pid();
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| -> i64 {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(-1)
        };
        let fds = fs::read_dir(format!("/proc/{pid}/fd")).map_or(-1, |d| d.count() as i64);
        let connections = connections.map(|list| {
            let marker = format!(" pid {pid}\"");
            list.lines().filter(|line| line.contains(&marker)).count() as i64
        });
        self.samples.push(Sample {
            at,
            anon_kib: field("RssAnon:"),
            fds,
            threads: field("Threads:"),
            connections,
        });
    }
}

fn spawn_warren(config: &Path, log: &Path, env: Option<(&str, &str)>) -> Child {
    let out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("open the warren log");
    let mut command = Command::new(util::warren_bin());
    if let Some((key, value)) = env {
        command.env(key, value);
    }
    command
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .env_remove("WARREN_BROKER_URL")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("clone the log handle"))
        .stderr(out)
        .spawn()
        .expect("start warren run")
}

/// Writes the config of the process `name`, which consumes `QUEUES[queue]` on the node at `url`
/// with `handler`.
fn write_config(
    dir: &Path,
    name: &str,
    queue: usize,
    handler: impl FnOnce(ConfigFile) -> ConfigFile,
    url: &str,
) -> PathBuf {
    let mut config = ConfigFile::new(QUEUES[queue])
        .url(url)
        .set("broker.connect_timeout", "3s");
    if queue == PIPE {
        config = config.quorum();
    }
    handler(config.workers(2))
        .set("handler.timeout", "60s")
        .set("retry.max_attempts", 20)
        .set("retry.delay", "200ms")
        .set("retry.max_delay", "2s")
        .control(&dir.join(format!("{name}.sock")))
        .write_to(&dir.join(format!("{name}.toml")))
}

fn soak(flags: Flags) -> Result<bool, String> {
    let started = Instant::now();
    let length = Duration::from_secs_f64(flags.minutes * 60.0);
    fastrand::seed(flags.seed);
    println!(
        "soak: {} minutes, a fault every {:?}, {} messages/s, seed {}",
        flags.minutes, flags.fault_every, flags.rate, flags.seed
    );

    let cluster = Cluster::start_with(1, &format!("consumer_timeout = {CONSUMER_TIMEOUT_MS}"));
    let node = cluster.node(0);
    node.rabbitmqctl(&[
        "eval",
        "application:set_env(rabbit, channel_tick_interval, 1000).",
    ]);
    let url = node.amqp_url();
    let scratch = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
    let dir = scratch.path();
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
    let command_script = dir.join("soak_command.sh");
    fs::write(&command_script, COMMAND_HANDLER).map_err(|e| e.to_string())?;
    fs::set_permissions(&command_script, fs::Permissions::from_mode(0o755))
        .map_err(|e| e.to_string())?;
    let pipe_script = dir.join("soak_pipe.py");
    fs::write(&pipe_script, PIPE_HANDLER).map_err(|e| e.to_string())?;
    let dir_arg = dir.display().to_string();

    let (command_arg, pipe_arg) = (
        command_script.display().to_string(),
        pipe_script.display().to_string(),
    );
    // The handler of each queue.
    let handler = |queue: usize, config: ConfigFile| match queue {
        DOTS => config.dots(),
        COMMAND => config.command_argv(&[&command_arg, &dir_arg]),
        _ => config.pipe(&["python3", &pipe_arg, &dir_arg]),
    };
    // The process that `kill-warren` kills is the one at KILLED.
    let layout: [(&'static str, usize, Option<Env>); 5] = [
        ("dots", DOTS, None),
        ("command", COMMAND, None),
        ("pipe-a", PIPE, None),
        ("pipe-b", PIPE, None),
        ("pipe-c", PIPE, Some(("MALLOC_ARENA_MAX", "16"))),
    ];
    let mut processes: Vec<Process> = layout
        .iter()
        .map(|&(name, queue, env)| {
            let config = write_config(dir, name, queue, |c| handler(queue, c), &url);
            Process::start(name, env, config, dir)
        })
        .collect();
    let consumers = [2, 2, 6];
    util::wait_until(
        Duration::from_secs(60),
        "every warren worker to consume",
        || {
            let Ok(session) = util::session_at(&url) else {
                return false;
            };
            QUEUES.iter().zip(consumers).all(|(queue, n)| {
                session
                    .queue_counts(queue)
                    .is_ok_and(|(_, consumers)| consumers == n)
            })
        },
    );
    println!("soak: 5 warren processes consume; producing");

    let produced = Arc::new(Mutex::new(Produced::default()));
    let slow = Arc::new([AtomicBool::new(false), AtomicBool::new(false)]);
    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let (url, produced, slow, stop) = (
            url.clone(),
            Arc::clone(&produced),
            Arc::clone(&slow),
            Arc::clone(&stop),
        );
        let (rate, seed) = (flags.rate, flags.seed.wrapping_add(1));
        thread::spawn(move || produce(&url, rate, seed, &slow, &stop, &produced))
    };

    let mut faults: BTreeMap<&'static str, u32> = BTreeMap::new();
    let mut next_fault = Instant::now() + flags.fault_every;
    let mut next_sample = Instant::now();
    let mut next_connections = Instant::now();
    let end = Instant::now() + length;
    while Instant::now() < end {
        let now = Instant::now();
        if now >= next_sample {
            let connections = (now >= next_connections).then(|| {
                next_connections = now + CONNECTIONS_EVERY;
                list_connections(node)
            });
            let at = started.elapsed().as_secs_f64();
            for process in &mut processes {
                process.sample(at, connections.as_deref());
            }
            next_sample = now + SAMPLE_EVERY;
        }
        if now >= next_fault {
            let fault = inject(node, dir, &pipe_script, &mut processes, &slow);
            *faults.entry(fault).or_default() += 1;
            println!(
                "soak: {:>6.0}s fault {fault}",
                started.elapsed().as_secs_f64()
            );
            next_fault = Instant::now() + flags.fault_every;
        }
        thread::sleep(Duration::from_millis(200));
    }

    stop.store(true, Ordering::SeqCst);
    producer
        .join()
        .map_err(|_| "the producer thread panicked".to_string())?;
    println!(
        "soak: producing stopped at {:.0}s; waiting for the queues to empty",
        started.elapsed().as_secs_f64()
    );
    let drained = wait_drained(node, DRAIN_TIMEOUT);
    let at = started.elapsed().as_secs_f64();
    let connections = list_connections(node);
    for process in &mut processes {
        process.sample(at, Some(&connections));
    }

    // Stop every warren; each must exit 0.
    let mut unclean = Vec::new();
    for process in &mut processes {
        let _ = kill(Pid::from_raw(process.pid()), Signal::SIGTERM);
    }
    for process in &mut processes {
        match util::wait_or_kill(&mut process.child, Duration::from_secs(30)) {
            Some(status) if status.success() => {}
            other => unclean.push(format!("{} ended with {other:?}", process.name)),
        }
    }

    let produced = std::mem::take(&mut *produced.lock().unwrap());
    let dead = dead_letters(&url)?;
    let done = [
        HashMap::new(),
        done_ids(&dir.join("done.command")),
        done_ids(&dir.join("done.pipe")),
    ];
    let errors: usize = processes
        .iter()
        .map(|p| {
            fs::read_to_string(&p.log)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains(" ERROR]"))
                .count()
        })
        .sum();
    let report = Report {
        minutes: started.elapsed().as_secs_f64() / 60.0,
        faults,
        produced,
        dead,
        done,
        drained,
        unclean,
        errors,
    };
    let ok = report.print(&processes);
    // Keep the logs of a failed run for a look.
    if !ok {
        let keep = std::env::temp_dir().join(format!("warren-soak-{}", std::process::id()));
        let _ = fs::create_dir_all(&keep);
        for process in &processes {
            let _ = fs::copy(&process.log, keep.join(format!("{}.log", process.name)));
        }
        println!("soak: the warren logs are in {}", keep.display());
    }
    drop(cluster);
    Ok(ok)
}

/// `rabbitmqctl list_connections client_properties` on `node`: one line per connection.
fn list_connections(node: &Node) -> String {
    node.try_rabbitmqctl(
        &[
            "list_connections",
            "-q",
            "--no-table-headers",
            "client_properties",
        ],
        Duration::from_secs(30),
    )
    .unwrap_or_default()
}

/// Injects one fault, drawn at random, and returns its name.
fn inject(
    node: &Node,
    dir: &Path,
    pipe_script: &Path,
    processes: &mut [Process],
    slow: &[AtomicBool; 2],
) -> &'static str {
    const FAULTS: [&str; 7] = [
        "close-all",
        "restart-app",
        "kill-warren",
        "crash-burst",
        "kill-pipe",
        "memory-alarm",
        "slow-task",
    ];
    let fault = FAULTS[fastrand::usize(..FAULTS.len())];
    match fault {
        "close-all" => {
            let _ = node.try_rabbitmqctl(
                &["close_all_connections", "--global", "soak fault"],
                Duration::from_secs(30),
            );
        }
        "restart-app" => {
            node.stop_app();
            thread::sleep(Duration::from_secs(3));
            node.start_app();
        }
        "kill-warren" => processes[KILLED].kill_and_restart(),
        "crash-burst" => {
            let flag = dir.join("crash");
            let _ = fs::write(&flag, "");
            thread::sleep(Duration::from_secs(5));
            let _ = fs::remove_file(&flag);
        }
        "kill-pipe" => {
            let script = pipe_script.display().to_string();
            for pid in pids_running(&script) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        "memory-alarm" => {
            let _ = node.try_rabbitmqctl(
                &["set_vm_memory_high_watermark", "absolute", "10MB"],
                Duration::from_secs(30),
            );
            thread::sleep(Duration::from_secs(5));
            // The alarm must lift, or nothing would be published again.
            util::wait_until(
                Duration::from_secs(120),
                "the memory watermark to be restored",
                || {
                    node.try_rabbitmqctl(
                        &["set_vm_memory_high_watermark", "0.4"],
                        Duration::from_secs(30),
                    )
                    .is_ok()
                },
            );
        }
        _ => slow[fastrand::usize(..2)].store(true, Ordering::SeqCst),
    }
    fault
}

/// The pids of the processes whose command line contains `needle`.
fn pids_running(needle: &str) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(needle))
        })
        .collect()
}

/// The producer: `rate` messages a second, spread over the queues (3 in 5 to `pipe`), each
/// confirmed; what a lost connection leaves unconfirmed, or the broker nacks or returns, is
/// published again. After `stop`, it makes no new message but waits for every confirm.
fn produce(
    url: &str,
    rate: f64,
    seed: u64,
    slow: &[AtomicBool; 2],
    stop: &AtomicBool,
    produced: &Mutex<Produced>,
) {
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut backlog: VecDeque<Message> = VecDeque::new();
    let mut seq = [0u64; 3];
    let mut next_at = Instant::now();
    let mut first = true;
    let mut give_up: Option<Instant> = None;
    let gave_up = |give_up: Option<Instant>| give_up.is_some_and(|at| Instant::now() >= at);
    loop {
        if stop.load(Ordering::SeqCst) {
            give_up.get_or_insert_with(|| Instant::now() + CONFIRM_TIMEOUT);
        }
        if stop.load(Ordering::SeqCst) && backlog.is_empty() {
            return;
        }
        if gave_up(give_up) {
            produced.lock().unwrap().unconfirmed = backlog.len() as u64;
            return;
        }
        let Ok(session) = util::session_at(url) else {
            thread::sleep(Duration::from_millis(500));
            continue;
        };
        let Ok(mut publisher) = session.publisher() else {
            thread::sleep(Duration::from_millis(500));
            continue;
        };
        if !first {
            produced.lock().unwrap().reconnects += 1;
        }
        first = false;
        let mut pending: BTreeMap<u64, Message> = BTreeMap::new();
        let mut returned: HashSet<String> = HashSet::new();
        loop {
            let stopping = stop.load(Ordering::SeqCst);
            if stopping && backlog.is_empty() && pending.is_empty() {
                return;
            }
            if stopping {
                give_up.get_or_insert_with(|| Instant::now() + CONFIRM_TIMEOUT);
            }
            if gave_up(give_up) {
                produced.lock().unwrap().unconfirmed = (backlog.len() + pending.len()) as u64;
                return;
            }
            let message = if let Some(message) = backlog.pop_front() {
                produced.lock().unwrap().republished += 1;
                Some(message)
            } else if !stopping && Instant::now() >= next_at {
                next_at = (next_at + interval).max(Instant::now() - Duration::from_secs(1));
                Some(next_message(&mut rng, &mut seq, slow))
            } else {
                None
            };
            if let Some(message) = message {
                match publisher.publish(
                    "",
                    QUEUES[message.queue],
                    &message.body,
                    &message.id,
                    &Stamp::default(),
                ) {
                    Ok(tag) => {
                        pending.insert(tag, message);
                    }
                    Err(_) => {
                        backlog.push_front(message);
                        break;
                    }
                }
            }
            match publisher.next_event(Duration::from_millis(5)) {
                Ok(Some(PublishEvent::Ack { tag, multiple })) => {
                    let settled = settle(&mut pending, tag, multiple);
                    let mut produced = produced.lock().unwrap();
                    for message in settled {
                        if returned.remove(&message.id) {
                            backlog.push_back(message);
                        } else {
                            produced.confirmed.push(message);
                        }
                    }
                }
                Ok(Some(PublishEvent::Nack { tag, multiple })) => {
                    backlog.extend(settle(&mut pending, tag, multiple));
                }
                Ok(Some(PublishEvent::Returned {
                    message_id: Some(id),
                    ..
                })) => {
                    returned.insert(id);
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        // Lost: whatever was not confirmed goes again (a copy may already be stored).
        backlog.extend(pending.into_values());
        drop(publisher);
        session.cut();
        thread::sleep(Duration::from_millis(200));
    }
}

/// Takes the messages a confirm of `tag` settles out of `pending`.
fn settle(pending: &mut BTreeMap<u64, Message>, tag: u64, multiple: bool) -> Vec<Message> {
    if multiple {
        let rest = pending.split_off(&(tag + 1));
        std::mem::replace(pending, rest).into_values().collect()
    } else {
        pending.remove(&tag).into_iter().collect()
    }
}

fn next_message(rng: &mut fastrand::Rng, seq: &mut [u64; 3], slow: &[AtomicBool; 2]) -> Message {
    let queue = match rng.u8(..5) {
        0 => DOTS,
        1 => COMMAND,
        _ => PIPE,
    };
    seq[queue] += 1;
    let n = seq[queue];
    let id = format!("{}-{n}", &QUEUES[queue][5..]);
    let (mode, poison) = match queue {
        DOTS if n % 20 == 0 => (".", false),
        DOTS => ("ok", false),
        _ if n % POISON_EVERY == 0 => ("poison", true),
        _ if slow[queue - 1].swap(false, Ordering::SeqCst) => ("slow", false),
        _ => ("ok", false),
    };
    Message {
        queue,
        body: format!("{id} {mode}").into_bytes(),
        id,
        poison,
    }
}

/// Waits until every queue on `node` but the dead-letter queues has been empty with nothing
/// unacked for more than 8 s.
fn wait_drained(node: &Node, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut empty_since: Option<Instant> = None;
    while Instant::now() < deadline {
        let queues = node.queues(Duration::from_secs(30)).unwrap_or_default();
        let busy: u64 = (queues.iter())
            .filter(|q| !q.name.ends_with(".dead"))
            .map(|q| q.ready + q.unacked)
            .sum();
        // Quorum queues report their counts from a tick of a few seconds: only readings of
        // zero that span more than that count.
        if !queues.is_empty() && busy == 0 {
            let since = *empty_since.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_secs(8) {
                return true;
            }
        } else {
            empty_since = None;
        }
        thread::sleep(Duration::from_secs(2));
    }
    false
}

/// Every dead letter of the soak's queues: message id and reason, by queue.
fn dead_letters(url: &str) -> Result<[Vec<(String, String)>; 3], String> {
    let session = util::session_at(url).map_err(|e| format!("cannot reach the node: {e}"))?;
    let mut dead: [Vec<(String, String)>; 3] = Default::default();
    for (queue, letters) in QUEUES.iter().zip(dead.iter_mut()) {
        let name = format!("{queue}.dead");
        while let Some(message) = session
            .get(&name)
            .map_err(|e| format!("basic.get from {name}: {e}"))?
        {
            let id = String::from_utf8_lossy(&message.body)
                .split(' ')
                .next()
                .unwrap_or_default()
                .to_string();
            let reason = match message.header("x-warren-reason") {
                Some(Header::Str(reason)) => reason.clone(),
                _ => String::new(),
            };
            letters.push((id, reason));
        }
    }
    Ok(dead)
}

/// The ids a handler recorded as done, and how many times each.
fn done_ids(path: &Path) -> HashMap<String, u32> {
    let mut ids = HashMap::new();
    for line in fs::read_to_string(path).unwrap_or_default().lines() {
        *ids.entry(line.to_string()).or_default() += 1;
    }
    ids
}

struct Report {
    minutes: f64,
    faults: BTreeMap<&'static str, u32>,
    produced: Produced,
    dead: [Vec<(String, String)>; 3],
    done: [HashMap<String, u32>; 3],
    drained: bool,
    unclean: Vec<String>,
    errors: usize,
}

impl Report {
    /// Prints the table and says whether the soak passed.
    fn print(&self, processes: &[Process]) -> bool {
        let mut ok = true;
        let faults: Vec<String> = self
            .faults
            .iter()
            .map(|(f, n)| format!("{f} {n}"))
            .collect();
        println!(
            "\nsoak: {:.1} minutes, {} faults ({}), producer reconnects {}, republished {}, ERROR lines {}",
            self.minutes,
            self.faults.values().sum::<u32>(),
            faults.join(", "),
            self.produced.reconnects,
            self.produced.republished,
            self.errors
        );
        println!(
            "\n| queue | handler | confirmed | processed | dead-lettered (poison) | dead-lettered (other) | lost | duplicates |"
        );
        println!("|---|---|---:|---:|---:|---:|---:|---:|");
        for (queue, name) in QUEUES.iter().enumerate().map(|(i, q)| (i, *q)) {
            let confirmed: Vec<&Message> = self
                .produced
                .confirmed
                .iter()
                .filter(|m| m.queue == queue)
                .collect();
            let ids: HashSet<&str> = confirmed.iter().map(|m| m.id.as_str()).collect();
            let poison: HashSet<&str> = confirmed
                .iter()
                .filter(|m| m.poison)
                .map(|m| m.id.as_str())
                .collect();
            let dead: HashMap<&str, &str> = self.dead[queue]
                .iter()
                .map(|(id, reason)| (id.as_str(), reason.as_str()))
                .collect();
            let dead_poison = dead.keys().filter(|id| poison.contains(*id)).count();
            let dead_other = dead.len() - dead_poison;
            let without_reason = dead.values().filter(|r| r.is_empty()).count();
            let (processed, lost, duplicates) = if queue == DOTS {
                // dots records nothing: acked is processed. The queue drained (checked below)
                // and nothing was dead-lettered, so every confirmed message was acked.
                let lost = if self.drained { dead.len() } else { ids.len() };
                (ids.len() - dead.len(), lost, 0)
            } else {
                let done = &self.done[queue];
                let lost = ids
                    .iter()
                    .filter(|id| !done.contains_key(**id) && !dead.contains_key(**id))
                    .count();
                let duplicates: u32 = done.values().map(|n| n - 1).sum();
                (done.len(), lost, duplicates)
            };
            let poison_done = poison
                .iter()
                .filter(|id| self.done[queue].contains_key(**id))
                .count();
            println!(
                "| {name} | {} | {} | {processed} | {dead_poison} of {} | {dead_other} | {lost} | {duplicates} |",
                ["dots", "command", "pipe"][queue],
                ids.len(),
                poison.len()
            );
            // A message dead-lettered with the poison's reason without being poison got another
            // message's answer.
            let misattributed = (self.dead[queue].iter())
                .filter(|(id, reason)| !poison.contains(id.as_str()) && reason.contains("poison"))
                .count();
            if lost > 0
                || without_reason > 0
                || poison_done > 0
                || dead_poison != poison.len()
                || misattributed > 0
            {
                ok = false;
                println!(
                    "soak: FAIL {name}: {lost} lost, {without_reason} dead-lettered without a reason, {poison_done} poison messages processed, {dead_poison} of {} poison messages dead-lettered, {misattributed} dead-lettered with a poison message's reason",
                    poison.len()
                );
            }
            let mut reasons: BTreeMap<&str, u32> = BTreeMap::new();
            for (id, reason) in &self.dead[queue] {
                if !poison.contains(id.as_str()) {
                    *reasons.entry(reason.as_str()).or_default() += 1;
                }
            }
            for (reason, n) in reasons {
                println!("soak: {name}: {n} dead-lettered: {reason}");
            }
        }
        if self.produced.unconfirmed > 0 {
            ok = false;
            println!(
                "soak: FAIL the producer gave up on {} messages the broker never confirmed or refused",
                self.produced.unconfirmed
            );
        }
        if !self.drained {
            ok = false;
            println!("soak: FAIL the queues did not empty within {DRAIN_TIMEOUT:?}");
        }
        for line in &self.unclean {
            ok = false;
            println!("soak: FAIL {line}");
        }

        println!(
            "\n| process | killed | anonymous memory (KiB) | descriptors | threads | broker connections | growth within bounds |"
        );
        println!("|---|---:|---|---|---|---|---|");
        for process in processes {
            let (second, last) = quarters(&process.samples);
            let median = |samples: &[Sample], f: &dyn Fn(&Sample) -> Option<i64>| {
                let mut values: Vec<i64> = samples.iter().filter_map(f).collect();
                values.sort_unstable();
                values.get(values.len() / 2).copied()
            };
            let columns: [Column; 4] = [
                ("anonymous memory", &|s| Some(s.anon_kib), Bounds::ANON_KIB),
                ("descriptors", &|s| Some(s.fds), Bounds::FDS),
                ("threads", &|s| Some(s.threads), Bounds::THREADS),
                ("connections", &|s| s.connections, Bounds::CONNECTIONS),
            ];
            let mut cells = Vec::new();
            let mut within = true;
            for (what, f, bound) in columns {
                let first = process.samples.iter().find_map(f);
                let (mut a, mut b) = (median(second, f), median(last, f));
                let end = process.samples.iter().rev().find_map(f);
                if what == "connections" {
                    // Sampled seldom, and a fault may be under way: judged by the first
                    // sample, before any fault, against the last, after the queues emptied.
                    (a, b) = (first, end);
                }
                let cell = format!(
                    "{} → {} → {} (end {})",
                    show(first),
                    show(a),
                    show(b),
                    show(end)
                );
                cells.push(cell);
                if process.judged() {
                    if let (Some(a), Some(b)) = (a, b) {
                        if b - a > bound {
                            within = false;
                            println!(
                                "soak: FAIL {}: {what} grew from a median of {a} to {b}, more than {bound}",
                                process.name
                            );
                        }
                    }
                }
            }
            if !within {
                ok = false;
            }
            println!(
                "| {} | {} | {} | {} | {} | {} | {} |",
                process.name,
                process.kills,
                cells[0],
                cells[1],
                cells[2],
                cells[3],
                if process.kills > 0 {
                    "not judged (restarted)"
                } else if process.env.is_some() {
                    "not judged (glibc's default arenas)"
                } else if within {
                    "yes"
                } else {
                    "NO"
                }
            );
        }
        println!(
            "\nColumns: first sample → median of the second quarter → median of the last quarter (the last sample, after the queues emptied). Bounds on growth between the two medians (connections: the first and the last sample), for a process never killed that runs with warren's arena cap: anonymous memory {} KiB, descriptors {}, threads {}, connections {}.",
            Bounds::ANON_KIB,
            Bounds::FDS,
            Bounds::THREADS,
            Bounds::CONNECTIONS
        );
        println!("soak: {}", if ok { "PASS" } else { "FAIL" });
        ok
    }
}

/// A column of the process table: its name, how to read it from a sample, and its bound.
type Column<'a> = (&'a str, &'a dyn Fn(&Sample) -> Option<i64>, i64);

fn show(value: Option<i64>) -> String {
    value.map_or("-".to_string(), |v| v.to_string())
}

/// The samples of the second quarter of the run and of the last quarter, while producing.
fn quarters(samples: &[Sample]) -> (&[Sample], &[Sample]) {
    // The last sample, taken after the queues emptied, is not part of the run.
    let samples = &samples[..samples.len().saturating_sub(1)];
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        return (&[], &[]);
    };
    let span = last.at - first.at;
    let index = |fraction: f64| {
        samples
            .iter()
            .position(|s| s.at >= first.at + span * fraction)
            .unwrap_or(samples.len())
    };
    let (a, b, c) = (index(0.25), index(0.5), index(0.75));
    (&samples[a..b], &samples[c..])
}
