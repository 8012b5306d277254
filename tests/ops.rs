//! The operator's commands through the real binary, against the real broker:
//! `warren check-config` prints the configuration as `warren run` reads it with every password
//! masked, refuses a bad file exactly as `warren run` does, and with `--connect` reports each
//! queue as found or missing without creating it; `warren stats` shows the work, retry and
//! dead-letter queues, and with `--watch` refreshes with a rate; `warren dead-letters list` shows
//! why each message was dead-lettered and leaves it there; `requeue` moves messages back to the
//! work queue as attempt 1, only the chosen ones with `--id`, and loses none when it is killed
//! half-way; `purge` deletes only with `--yes`.

mod util;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use util::{
    publish_confirmed, ready_and_unacked, wait_for_ready, wait_until, BrokerLock, ConfigFile,
    Queues, Warren,
};

const WAIT: Duration = Duration::from_secs(20);

/// A broker URL where nothing listens, for commands that must fail or must not connect.
const NOWHERE: &str = "amqp://guest:guest@127.0.0.1:1/%2f";

/// How a run of the binary ended.
struct Ran {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Ran {
    /// The lines logged on stderr, without their `[time LEVEL]` prefix.
    fn errors(&self) -> Vec<String> {
        self.stderr
            .lines()
            .filter(|line| line.contains("ERROR"))
            .map(|line| {
                line.split_once("] ")
                    .map_or(line, |(_, msg)| msg)
                    .to_string()
            })
            .collect()
    }
}

/// Reads `pipe` to the end on a thread of its own.
fn read_all(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut text = Vec::new();
        let _ = pipe.read_to_end(&mut text);
        String::from_utf8_lossy(&text).into_owned()
    })
}

/// Runs `command` to the end; kills it and panics if it is still running after [`WAIT`].
fn run(mut command: Command) -> Ran {
    let mut child = command.spawn().expect("start warren");
    let stdout = read_all(child.stdout.take().expect("stdout is piped"));
    let stderr = read_all(child.stderr.take().expect("stderr is piped"));
    let Some(status) = util::wait_or_kill(&mut child, WAIT) else {
        panic!("warren {command:?} still ran after {WAIT:?}");
    };
    let ran = Ran {
        status,
        stdout: stdout.join().expect("the stdout reader"),
        stderr: stderr.join().expect("the stderr reader"),
    };
    eprintln!(
        "warren {:?} exited {}\n--- stdout\n{}--- stderr\n{}",
        command.get_args().collect::<Vec<_>>(),
        ran.status,
        ran.stdout,
        ran.stderr
    );
    ran
}

/// Runs `warren SUBCOMMAND... --config CONFIG EXTRA...`.
fn warren(subcommand: &[&str], config: &Path, extra: &[&str]) -> Ran {
    let config = config.to_str().expect("a UTF-8 path");
    let args: Vec<&str> = subcommand
        .iter()
        .copied()
        .chain(["--config", config])
        .chain(extra.iter().copied())
        .collect();
    run(util::warren_command(&args))
}

fn assert_exit(ran: &Ran, code: i32) {
    assert_eq!(
        ran.status.code(),
        Some(code),
        "exit status; stdout:\n{}\nstderr:\n{}",
        ran.stdout,
        ran.stderr
    );
}

/// A config for `queues` with one worker and the retries of [`ConfigFile::fast_retries`], so
/// that the commands see the same queues as the test; the caller adds the handler.
fn config_for(queues: &Queues) -> ConfigFile {
    ConfigFile::new(&queues.work).workers(1).fast_retries()
}

/// Puts one message per id in the dead-letter queue through `warren run` with a handler that
/// exits 65 (dead-letter at once), with the body `body of ID`, and stops warren.
fn dead_letter(broker: &BrokerLock, queues: &Queues, ids: &[&str]) -> PathBuf {
    let script = broker.script("reject", "cat > /dev/null\nexit 65");
    let config = config_for(queues)
        .command(&script)
        .write_in(broker.dir.path());
    let warren = Warren::run(&config, &[]);
    warren.wait_consuming(&queues.work, 1);
    let bodies: Vec<String> = ids.iter().map(|id| format!("body of {id}")).collect();
    let messages: Vec<(&str, &[u8])> = ids
        .iter()
        .zip(&bodies)
        .map(|(id, body)| (*id, body.as_bytes()))
        .collect();
    publish_confirmed(&queues.work, &messages, WAIT);
    queues.wait_settled(ids.len() as u64);
    warren.stop(WAIT);
    config
}

/// Dead-letters `count` messages with the ids `PREFIX-1` to `PREFIX-COUNT` as [`dead_letter`]
/// does, and returns the ids and the config.
fn dead_letter_numbered(
    broker: &BrokerLock,
    queues: &Queues,
    prefix: &str,
    count: usize,
) -> (Vec<String>, PathBuf) {
    let ids: Vec<String> = (1..=count).map(|i| format!("{prefix}-{i}")).collect();
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let config = dead_letter(broker, queues, &id_refs);
    (ids, config)
}

/// `warren dead-letters requeue` of `config` that waits 200ms after each confirmed copy before
/// it removes the original, so that a test can stop it half-way.
fn paused_requeue(config: &Path) -> Command {
    util::warren_command(&[
        "dead-letters",
        "requeue",
        "--config",
        config.to_str().unwrap(),
        "--test-pause-after-confirm",
        "200ms",
    ])
}

/// Takes every message of `queue` (acking it) and returns their message ids.
fn drain_ids(queue: &str) -> Vec<String> {
    let session = util::session();
    let mut ids = Vec::new();
    while let Some(message) = session.get(queue).expect("basic.get") {
        ids.push(message.message_id.unwrap_or_default());
    }
    ids
}

/// The rows of the last table `warren stats` printed, by queue name: every column after the name.
fn last_table(stdout: &str) -> Vec<(String, Vec<String>)> {
    let table = stdout
        .split("\n\n")
        .filter(|block| block.contains("QUEUE"))
        .last()
        .unwrap_or_else(|| panic!("no table in {stdout:?}"));
    table
        .lines()
        .skip_while(|line| !line.starts_with("QUEUE"))
        .skip(1)
        .map(|line| {
            let mut fields = line.split_whitespace().map(str::to_string);
            let name = fields.next().expect("a queue name");
            (name, fields.collect())
        })
        .collect()
}

/// The columns of `queue` in a table from [`last_table`].
fn row<'a>(table: &'a [(String, Vec<String>)], queue: &str) -> &'a [String] {
    &table
        .iter()
        .find(|(name, _)| name == queue)
        .unwrap_or_else(|| panic!("no row for {queue} in {table:?}"))
        .1
}

#[test]
fn check_config_prints_every_key_with_defaults_and_no_password() {
    let dir = tempfile::tempdir().unwrap();
    let path = ConfigFile::at("amqp://app:s3cret-pw@127.0.0.1:1/%2f", "jobs")
        .command_argv(&["sh", "--db=postgres://u:db-pw@h/x"])
        .write_to(&dir.path().join("warren.toml"));
    let ran = warren(&["check-config"], &path, &[]);
    assert_exit(&ran, 0);
    for secret in ["s3cret-pw", "db-pw"] {
        assert!(
            !ran.stdout.contains(secret) && !ran.stderr.contains(secret),
            "{secret} is shown"
        );
    }
    for line in [
        "url = \"amqp://app:***@127.0.0.1:1/%2f\"",
        "heartbeat = \"30s\"",
        "connect_timeout = \"5s\"",
        "consumer_timeout = \"30m\"",
        "name = \"jobs\"",
        "durable = true",
        "type = \"classic\"",
        "dead_letter = \"jobs.dead\"",
        "declare = true",
        "count = 4",
        "prefetch = 1",
        "kind = \"command\"",
        "command = [\"sh\", \"--db=postgres://u:***@h/x\"]",
        "timeout = \"10m\"",
        "kill_grace = \"10s\"",
        "max_attempts = 5",
        "delay = \"1s\"",
        "max_delay = \"5m\"",
        "grace = \"30s\"",
        "format = \"text\"",
    ] {
        assert!(
            ran.stdout.lines().any(|l| l == line),
            "{line:?} is not printed"
        );
    }

    // The environment's URL replaces the file's, and is masked too.
    let mut with_env = util::warren_command(&["check-config", "--config", path.to_str().unwrap()]);
    with_env.env(
        "WARREN_BROKER_URL",
        "amqp://ops:env-pw@10.0.0.1:5672/%2f, amqp://ops:env-pw@10.0.0.2:5672/%2f",
    );
    let ran = run(with_env);
    assert_exit(&ran, 0);
    assert!(!ran.stdout.contains("env-pw") && !ran.stderr.contains("env-pw"));
    assert!(ran.stdout.contains(
        "urls = [\"amqp://ops:***@10.0.0.1:5672/%2f\", \"amqp://ops:***@10.0.0.2:5672/%2f\"]"
    ));
}

#[test]
fn check_config_shows_the_recycle_limits_of_a_pipe_handler_and_its_output_reads_back_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = ConfigFile::at(NOWHERE, "jobs").pipe(&["cat"]);
    let plain = pipe.write_to(&dir.path().join("plain.toml"));
    let ran = warren(&["check-config"], &plain, &[]);
    assert_exit(&ran, 0);
    for key in ["max_tasks", "max_memory", "max_age"] {
        assert!(
            !ran.stdout.contains(key),
            "{key} is off, and not shown:\n{}",
            ran.stdout
        );
    }

    let limited = pipe
        .set("handler.max_tasks", 1000)
        .set("handler.max_memory", "1536MiB")
        .set("handler.max_age", "1h 30m")
        .write_to(&dir.path().join("limited.toml"));
    let ran = warren(&["check-config"], &limited, &[]);
    assert_exit(&ran, 0);
    for line in [
        "max_tasks = 1000",
        "max_memory = \"1536 MiB\"",
        "max_age = \"1h 30m\"",
    ] {
        assert!(
            ran.stdout.lines().any(|l| l == line),
            "{line:?} is not printed:\n{}",
            ran.stdout
        );
    }
    let printed = dir.path().join("printed.toml");
    std::fs::write(&printed, &ran.stdout).unwrap();
    let load = |path: &Path| warren::config::Config::load(path, None).unwrap().handler;
    assert_eq!(
        load(&printed),
        load(&limited),
        "what check-config prints loads as the same handler"
    );
    assert_exit(&warren(&["check-config"], &printed, &[]), 0);
}

#[test]
fn check_config_refuses_a_bad_file_with_the_same_line_as_warren_run() {
    let dir = tempfile::tempdir().unwrap();
    let nowhere = ConfigFile::at(NOWHERE, "jobs").set("broker.connect_timeout", "1s");
    let cases = [
        ("bad-value.toml", nowhere.clone().workers(0).dots()),
        ("no-handler.toml", nowhere.clone()),
        (
            "no-program.toml",
            nowhere.command_argv(&["/nonexistent/job"]),
        ),
    ];
    for (name, config) in cases {
        let path = config.write_to(&dir.path().join(name));
        let run_said = warren(&["run"], &path, &[]);
        assert_exit(&run_said, 78);
        for args in [&["check-config"][..], &["check-config", "--connect"][..]] {
            let check_said = warren(args, &path, &[]);
            assert_exit(&check_said, 78);
            assert_eq!(check_said.errors(), run_said.errors(), "{name}");
            assert_eq!(check_said.errors().len(), 1, "{name}: one error line");
            assert!(check_said.stdout.is_empty(), "{name}: nothing printed");
        }
    }
}

#[test]
fn check_config_connect_reports_missing_queues_without_creating_them_then_finds_them() {
    let broker = BrokerLock::shared();
    let queues = Queues::new(&broker, "check");
    let config = config_for(&queues).dots().write_in(broker.dir.path());

    let ran = warren(&["check-config", "--connect"], &config, &[]);
    assert_exit(&ran, 1);
    let lines: Vec<&str> = ran.stdout.lines().collect();
    assert!(lines.contains(&"ok    handler: kind dots runs no program"));
    assert!(lines
        .iter()
        .any(|l| l.starts_with("ok    node amqp://guest:***@") && l.ends_with(": connected")));
    for (kind, queue) in [
        ("work", &queues.work),
        ("retry", &queues.retries[0]),
        ("retry", &queues.retries[1]),
        ("dead-letter", &queues.dead),
    ] {
        let line =
            format!("FAIL  {kind} queue {queue}: missing; warren run declares it when it starts");
        assert!(lines.contains(&line.as_str()), "{line:?}");
    }
    assert_eq!(lines.last(), Some(&"4 of 6 checks failed"));
    let table = util::queue_table("/");
    for queue in [&queues.work, &queues.retries[0], &queues.dead] {
        assert!(!table.contains_key(queue), "{queue} was created");
    }

    let running = Warren::run(&config, &[]);
    running.wait_consuming(&queues.work, 1);
    let ran = warren(&["check-config", "--connect"], &config, &[]);
    assert_exit(&ran, 0);
    let lines: Vec<&str> = ran.stdout.lines().collect();
    let work = format!(
        "ok    work queue {}: exists, 0 ready, 1 consumers",
        queues.work
    );
    assert!(lines.contains(&work.as_str()), "{work:?}");
    let dead = format!(
        "ok    dead-letter queue {}: exists, 0 ready, 0 consumers",
        queues.dead
    );
    assert!(lines.contains(&dead.as_str()), "{dead:?}");
    assert_eq!(lines.last(), Some(&"all 6 checks passed"));
    running.stop(WAIT);
}

#[test]
fn operator_commands_exit_69_when_no_node_answers() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = [
        NOWHERE.to_string(),
        "amqp://guest:guest@127.0.0.1:2/%2f".to_string(),
    ];
    let path = ConfigFile::at_nodes(&nodes, "jobs")
        .set("broker.connect_timeout", "1s")
        .dots()
        .write_to(&dir.path().join("warren.toml"));
    let commands: [(&[&str], &[&str]); 6] = [
        (&["check-config"], &["--connect"]),
        (&["stats"], &[]),
        (&["stats"], &["--watch"]),
        (&["dead-letters", "list"], &[]),
        (&["dead-letters", "requeue"], &[]),
        (&["dead-letters", "purge"], &["--yes"]),
    ];
    for (subcommand, extra) in commands {
        let ran = warren(subcommand, &path, extra);
        assert_exit(&ran, 69);
        assert!(
            ran.errors()
                .iter()
                .any(|e| e.starts_with("cannot reach the broker at 127.0.0.1:")),
            "{subcommand:?}: {:?}",
            ran.errors()
        );
    }
}

#[test]
fn stats_shows_ready_messages_and_consumers_of_the_work_retry_and_dead_letter_queues() {
    let broker = BrokerLock::shared();
    let queues = Queues::new(&broker, "stats");
    let config = config_for(&queues).dots().write_in(broker.dir.path());

    // Nothing declared yet: every queue is missing, and none is created.
    let ran = warren(&["stats"], &config, &[]);
    assert_exit(&ran, 0);
    let table = last_table(&ran.stdout);
    assert_eq!(table.len(), 4, "work, two retry queues, dead: {table:?}");
    for (_, columns) in &table {
        assert_eq!(columns[1..], ["missing", "-"]);
    }
    assert!(!util::queue_table("/").contains_key(&queues.work));

    // One dead-lettered message, then a consumer on the work queue.
    let reject = dead_letter(&broker, &queues, &["stats-1"]);
    let running = Warren::run(&reject, &[]);
    running.wait_consuming(&queues.work, 1);
    let ran = warren(&["stats"], &config, &[]);
    assert_exit(&ran, 0);
    assert!(
        ran.stdout
            .contains(&format!(" broker {}\n", util::broker_address())),
        "the node is named"
    );
    let table = last_table(&ran.stdout);
    assert_eq!(row(&table, &queues.work), ["work", "0", "1"]);
    assert_eq!(row(&table, &queues.retries[0]), ["retry", "0", "0"]);
    assert_eq!(row(&table, &queues.retries[1]), ["retry", "0", "0"]);
    assert_eq!(row(&table, &queues.dead), ["dead", "1", "0"]);
    running.stop(WAIT);

    // Three waiting messages and no consumer.
    util::publish_ok(&config, &["one", "two", "three"]);
    let ran = warren(&["stats"], &config, &[]);
    let table = last_table(&ran.stdout);
    assert_eq!(row(&table, &queues.work), ["work", "3", "0"]);
    assert_eq!(row(&table, &queues.dead), ["dead", "1", "0"]);
}

/// A `warren stats --watch` whose stdout is collected line by line.
struct Watch {
    child: Child,
    stdout: Arc<Mutex<String>>,
}

impl Watch {
    fn start(config: &Path) -> Watch {
        let mut child =
            util::warren_command(&["stats", "--watch", "--config", config.to_str().unwrap()])
                .stderr(Stdio::inherit())
                .spawn()
                .expect("start warren stats --watch");
        let pipe = child.stdout.take().expect("stdout is piped");
        let stdout = Arc::new(Mutex::new(String::new()));
        let text = Arc::clone(&stdout);
        thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                let mut text = text.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
            }
        });
        Watch { child, stdout }
    }

    fn text(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// The refreshes printed so far: the blocks that hold a whole table.
    fn refreshes(&self) -> Vec<String> {
        self.text()
            .split("\n\n")
            .filter(|block| block.contains("QUEUE") && block.lines().count() == 6)
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn stats_watch_refreshes_every_second_with_the_rate_of_each_queue() {
    let broker = BrokerLock::shared();
    let queues = Queues::new(&broker, "watch");
    let config = config_for(&queues).dots().write_in(broker.dir.path());
    util::declare_durable(&queues.work);
    let mut watch = Watch::start(&config);
    wait_until(WAIT, "the first refresh", || !watch.refreshes().is_empty());
    let first = last_table(&watch.refreshes()[0]);
    assert_eq!(
        row(&first, &queues.work),
        ["work", "0", "0", "-"],
        "no rate yet"
    );

    let bodies: Vec<String> = (0..5).map(|i| format!("watch-{i}")).collect();
    let messages: Vec<(&str, &[u8])> = bodies.iter().map(|b| (b.as_str(), b.as_bytes())).collect();
    publish_confirmed(&queues.work, &messages, WAIT);
    let mut rate = None;
    wait_until(WAIT, "a refresh with 5 ready and a positive rate", || {
        let refreshes = watch.refreshes();
        let table = last_table(refreshes.last().expect("a refresh"));
        let columns = row(&table, &queues.work).to_vec();
        rate = columns[3].parse::<f64>().ok();
        columns[1] == "5" && rate.is_some_and(|r| r > 0.0)
    });
    // Within a few seconds: 5 messages arrived during one interval of about a second.
    let rate = rate.expect("a rate");
    assert!((2.0..=10.0).contains(&rate), "rate {rate}");
    let refreshes = watch.refreshes();
    assert!(refreshes.len() >= 2, "{refreshes:?}");
    for refresh in &refreshes[1..] {
        for (name, columns) in last_table(refresh) {
            assert!(
                columns[3].parse::<f64>().is_ok() || columns[1] == "missing",
                "{name} has a rate in every refresh after the first: {refresh}"
            );
        }
    }

    kill(Pid::from_raw(watch.child.id() as i32), Signal::SIGTERM).expect("signal stats");
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = watch.child.try_wait().expect("wait for stats") {
            break status;
        }
        assert!(Instant::now() < deadline, "stats --watch ignored SIGTERM");
        thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "stats --watch stops cleanly: {status}");
}

#[test]
fn dead_letters_list_shows_why_each_message_was_dead_lettered_and_leaves_it_in_place() {
    let broker = BrokerLock::shared();
    let queues = Queues::new(&broker, "list");
    let ids = ["list-1", "list-2", "list-3"];
    let config = dead_letter(&broker, &queues, &ids);

    let ran = warren(&["dead-letters", "list"], &config, &[]);
    assert_exit(&ran, 0);
    let lines: Vec<&str> = ran.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "a line per message and a summary");
    let mut shown = BTreeSet::new();
    for line in &lines[..3] {
        let id = line
            .strip_prefix("id=\"")
            .and_then(|rest| rest.split_once('"'))
            .map(|(id, _)| id)
            .unwrap_or_else(|| panic!("no id in {line:?}"));
        shown.insert(id.to_string());
        for field in [
            " attempts=1 ".to_string(),
            " dead-lettered-at=\"20".to_string(),
            " reason=\"rejected by the handler (exit status 65)\" ".to_string(),
            " exit-status=\"exit status 65\" ".to_string(),
            format!(" queue=\"{}\" ", queues.work),
            format!(" body=\"body of {id}\""),
        ] {
            assert!(line.contains(&field), "{line:?} has {field:?}");
        }
    }
    assert_eq!(shown, ids.iter().map(|id| id.to_string()).collect());
    assert_eq!(
        lines[3],
        format!(
            "listed all 3 messages of dead-letter queue {}; they are all still there",
            queues.dead
        )
    );
    assert_eq!(ready_and_unacked(&queues.dead), (3, 0), "all left in place");

    let ran = warren(&["dead-letters", "list"], &config, &["--limit", "2"]);
    assert_exit(&ran, 0);
    assert_eq!(ran.stdout.lines().count(), 3);
    assert!(ran.stdout.contains("listed 2 of 3 messages"));
    assert_eq!(ready_and_unacked(&queues.dead), (3, 0), "all left in place");
}

#[test]
fn dead_letters_requeue_moves_messages_back_as_attempt_1() {
    let broker = BrokerLock::shared();
    let queues = Queues::new(&broker, "requeue");
    // Every attempt fails: each message is dead-lettered after its third. (With the breaker on,
    // three messages that all fail look like an outage, and would wait in the queue instead.)
    let failing = broker.script("fail", "cat > /dev/null\nexit 3");
    let config = config_for(&queues)
        .command(&failing)
        .set("breaker.enabled", false)
        .write_in(broker.dir.path());
    let warren_run = Warren::run(&config, &[]);
    warren_run.wait_consuming(&queues.work, 1);
    let ids = ["again-1", "again-2", "again-3"];
    publish_confirmed(&queues.work, &ids.map(|id| (id, id.as_bytes())), WAIT);
    queues.wait_settled(3);
    warren_run.stop(WAIT);

    let ran = warren(&["dead-letters", "requeue"], &config, &[]);
    assert_exit(&ran, 0);
    assert_eq!(
        ran.stdout,
        format!(
            "moved 3 messages from dead-letter queue {} to work queue {}\n",
            queues.dead, queues.work
        )
    );
    assert_eq!(ready_and_unacked(&queues.dead), (0, 0));
    assert_eq!(ready_and_unacked(&queues.work), (3, 0));

    // The copies carry none of the headers of their failures. (Looked at without taking them:
    // closing the session puts them back.)
    let session = util::session();
    let mut held = Vec::new();
    while let Some(message) = session.hold(&queues.work).expect("basic.get") {
        held.push(message);
    }
    assert_eq!(held.len(), 3);
    for message in &held {
        let delivery = message.delivery();
        for header in warren::retry::RESET_ON_REQUEUE {
            assert_eq!(delivery.header(header), None, "{header} was not dropped");
        }
        assert_eq!(delivery.body(), delivery.message_id().unwrap().as_bytes());
    }
    drop(held);
    session.close().expect("close the session");
    wait_for_ready(&queues.work, 3, WAIT);

    // A handler that succeeds sees each message as attempt 1 again.
    let record = broker.script_in_dir(
        "record",
        "cat > /dev/null\necho \"$WARREN_MESSAGE_ID $WARREN_ATTEMPT\" >> \"$DIR/done\"",
    );
    let config = config_for(&queues)
        .command(&record)
        .write_in(broker.dir.path());
    let warren_run = Warren::run(&config, &[]);
    queues.wait_settled(0);
    warren_run.stop(WAIT);
    let mut done = util::recorded(&broker.dir.path().join("done"));
    done.sort();
    assert_eq!(done, ["again-1 1", "again-2 1", "again-3 1"]);
}

#[test]
fn dead_letters_requeue_with_an_id_moves_only_that_message() {
    let broker = BrokerLock::shared();
    let queues = Queues::new(&broker, "pick");
    let config = dead_letter(&broker, &queues, &["pick-1", "pick-2", "pick-3"]);

    let ran = warren(&["dead-letters", "requeue"], &config, &["--id", "pick-2"]);
    assert_exit(&ran, 0);
    assert!(
        ran.stdout.starts_with("moved 1 message from"),
        "{}",
        ran.stdout
    );
    assert_eq!(
        ready_and_unacked(&queues.dead),
        (2, 0),
        "the others are back"
    );

    let ran = warren(&["dead-letters", "requeue"], &config, &["--id", "absent"]);
    assert_exit(&ran, 1);
    assert!(
        ran.stdout.starts_with("moved 0 messages from"),
        "{}",
        ran.stdout
    );
    assert_eq!(
        ran.errors(),
        [format!(
            "no message with id absent in dead-letter queue {}",
            queues.dead
        )]
    );
    assert_eq!(ready_and_unacked(&queues.dead), (2, 0));

    assert_eq!(drain_ids(&queues.work), ["pick-2"]);
    let mut left = drain_ids(&queues.dead);
    left.sort();
    assert_eq!(left, ["pick-1", "pick-3"]);
}

#[test]
fn a_requeue_killed_half_way_loses_no_message() {
    let broker = BrokerLock::shared();
    let queues = Queues::new(&broker, "killed");
    let (ids, config) = dead_letter_numbered(&broker, &queues, "killed", 20);

    // Each original is removed 200ms after its copy is confirmed, so the kill lands in the
    // middle, most likely between a confirm and an ack.
    let mut requeue = paused_requeue(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start warren dead-letters requeue");
    wait_until(WAIT, "3 messages moved", || {
        util::queue_counts(&queues.work).0 >= 3
    });
    requeue.kill().expect("SIGKILL the requeue");
    requeue.wait().expect("reap the requeue");

    // The broker puts back what the dead connection held.
    wait_until(WAIT, "nothing unacked in the dead-letter queue", || {
        ready_and_unacked(&queues.dead).1 == 0
    });
    let work = drain_ids(&queues.work);
    let dead = drain_ids(&queues.dead);
    assert!(
        !work.is_empty() && !dead.is_empty(),
        "killed half-way: {work:?} {dead:?}"
    );
    let found: BTreeSet<&String> = work.iter().chain(&dead).collect();
    eprintln!(
        "killed requeue: {} in the work queue, {} in the dead-letter queue, {} duplicated",
        work.len(),
        dead.len(),
        work.len() + dead.len() - found.len()
    );
    let missing: Vec<&String> = ids.iter().filter(|id| !found.contains(id)).collect();
    assert!(missing.is_empty(), "lost {missing:?}");
    assert!(
        work.len() + dead.len() <= ids.len() + 1,
        "at most the message in flight is duplicated: {work:?} {dead:?}"
    );
}

#[test]
fn a_requeue_stopped_by_sigterm_moves_each_message_once_and_exits_130() {
    let broker = BrokerLock::shared();
    let queues = Queues::new(&broker, "stopped");
    let (ids, config) = dead_letter_numbered(&broker, &queues, "stopped", 10);

    let mut requeue = paused_requeue(&config)
        .spawn()
        .expect("start warren dead-letters requeue");
    let stdout = read_all(requeue.stdout.take().expect("stdout is piped"));
    let stderr = read_all(requeue.stderr.take().expect("stderr is piped"));
    wait_until(WAIT, "2 messages moved", || {
        util::queue_counts(&queues.work).0 >= 2
    });
    kill(Pid::from_raw(requeue.id() as i32), Signal::SIGTERM).expect("signal the requeue");
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = requeue.try_wait().expect("wait for the requeue") {
            break status;
        }
        assert!(Instant::now() < deadline, "the requeue ignored SIGTERM");
        thread::sleep(Duration::from_millis(10));
    };
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    assert_eq!(status.code(), Some(130), "{stdout}{stderr}");

    let work = drain_ids(&queues.work);
    let dead = drain_ids(&queues.dead);
    assert!(
        stdout.starts_with(&format!("moved {} messages from", work.len()))
            && stdout.ends_with(" before it was stopped; the others are still there\n"),
        "{stdout}"
    );
    assert!(!dead.is_empty(), "stopped half-way: {work:?} {dead:?}");
    let mut all: Vec<&String> = work.iter().chain(&dead).collect();
    all.sort();
    let mut want: Vec<&String> = ids.iter().collect();
    want.sort();
    assert_eq!(all, want, "each message once, in one queue or the other");
}

#[test]
fn dead_letters_purge_refuses_without_yes_and_deletes_with_it() {
    let broker = BrokerLock::shared();
    let queues = Queues::new(&broker, "purge");
    let config = dead_letter(&broker, &queues, &["purge-1", "purge-2"]);

    let ran = warren(&["dead-letters", "purge"], &config, &[]);
    assert_exit(&ran, 64);
    assert_eq!(
        ran.errors(),
        [format!(
            "dead-letters purge deletes every message in dead-letter queue {} for good; add --yes to do it",
            queues.dead
        )]
    );
    assert_eq!(ready_and_unacked(&queues.dead), (2, 0), "nothing deleted");

    let ran = warren(&["dead-letters", "purge"], &config, &["--yes"]);
    assert_exit(&ran, 0);
    assert_eq!(
        ran.stdout,
        format!(
            "deleted 2 messages from dead-letter queue {}\n",
            queues.dead
        )
    );
    assert_eq!(ready_and_unacked(&queues.dead), (0, 0));
}

#[test]
fn dead_letters_commands_name_a_dead_letter_queue_that_does_not_exist() {
    let broker = BrokerLock::shared();
    let queues = Queues::new(&broker, "nodlq");
    let config = config_for(&queues).dots().write_in(broker.dir.path());
    let commands: [(&str, &[&str]); 3] = [("list", &[]), ("requeue", &[]), ("purge", &["--yes"])];
    for (subcommand, extra) in commands {
        let ran = warren(&["dead-letters", subcommand], &config, extra);
        assert_exit(&ran, 1);
        assert_eq!(
            ran.errors(),
            [format!(
                "dead-letter queue {} does not exist; warren run declares it when it starts",
                queues.dead
            )]
        );
    }
    assert!(!util::queue_table("/").contains_key(&queues.dead));
}
