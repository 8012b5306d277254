//! Running under systemd and being watched: the notify protocol (`READY=1` once every worker
//! consumes, `STATUS=` kept current, `WATCHDOG=1` when `WATCHDOG_USEC` asks, `STOPPING=1` at
//! shutdown) over a real unix datagram socket, and `/metrics` and `/healthz` over real HTTP.

mod util;

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use util::{
    http_get as get, metric_sample as sample, publish_ok, wait_until, BrokerLock, ConfigFile,
    Proxy, Warren,
};

const WAIT: Duration = Duration::from_secs(20);

/// Every datagram received on `socket` until `until` returns true for one, or the deadline.
fn notifications_until(
    socket: &UnixDatagram,
    seen: &mut Vec<String>,
    until: impl Fn(&str) -> bool,
) {
    let deadline = Instant::now() + WAIT;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = text.lines().any(&until);
            seen.push(text);
            if done {
                return;
            }
        }
    }
    panic!("timed out waiting for a notification; got {seen:#?}");
}

#[test]
fn systemd_hears_ready_then_status_and_watchdog_then_stopping() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("notify");
    let config = ConfigFile::new(&queue)
        .workers(2)
        .dots()
        .write_in(broker.dir.path());
    let path = broker.dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();

    let mut warren = Warren::spawn(
        Command::new(util::warren_bin())
            .args(["run", "--config"])
            .arg(&config)
            .env("NOTIFY_SOCKET", &path)
            .env("WATCHDOG_USEC", "1000000"),
    );
    let mut seen = Vec::new();
    notifications_until(&socket, &mut seen, |l| l == "READY=1");
    assert_eq!(
        util::queue_counts(&queue).1,
        2,
        "READY=1 came once both workers were consuming"
    );

    publish_ok(&config, &["one", "two"]);
    warren.wait_for_count(" done ", 2, WAIT);
    notifications_until(&socket, &mut seen, |l| {
        l.starts_with("STATUS=") && l.contains("2 done")
    });
    let before = seen.len();
    notifications_until(&socket, &mut seen, |l| l == "WATCHDOG=1");
    notifications_until(&socket, &mut seen, |l| l == "WATCHDOG=1");
    assert!(seen.len() > before, "the watchdog keeps being pinged");

    warren.signal(Signal::SIGTERM);
    notifications_until(&socket, &mut seen, |l| l == "STOPPING=1");
    assert_eq!(warren.wait_exit(WAIT).code(), Some(0));

    let all: Vec<&str> = seen.iter().flat_map(|n| n.lines()).collect();
    let position = |what: &str| {
        all.iter()
            .position(|l| *l == what)
            .unwrap_or_else(|| panic!("no {what} in {all:#?}"))
    };
    assert!(position("READY=1") < position("STOPPING=1"), "{all:#?}");
    assert_eq!(
        all.iter().filter(|l| **l == "READY=1").count(),
        1,
        "READY=1 is sent once"
    );
    assert!(
        all.iter().any(|l| l.starts_with("STATUS=") && l.contains("0 busy, 2 idle of 2 workers; 2 done, 0 retried, 0 dead-lettered; broker connected")),
        "{all:#?}"
    );
    assert!(
        all.iter().any(|l| l.starts_with("STATUS=stopping")),
        "{all:#?}"
    );
}

#[test]
fn metrics_count_real_tasks_and_healthz_says_when_every_worker_consumes() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("metrics");
    let port = Proxy::free_port();
    let script = broker.script_in_dir(
        "outcome",
        "body=$(cat)\n[ \"$body\" = bad ] && exit 65\nexit 0",
    );
    let config = ConfigFile::new(&queue)
        .workers(2)
        .command(&script)
        .metrics(port)
        .write_in(broker.dir.path());
    let warren = Warren::run(&config, &[]);
    warren.wait_consuming(&queue, 2);
    wait_until(WAIT, "/healthz to say ok", || {
        get(port, "/healthz") == (200, "ok\n".into())
    });

    publish_ok(&config, &["good", "good", "bad"]);
    warren.wait_for_count(" done ", 2, WAIT);
    warren.wait_for_log(" rejected ", WAIT);
    let q = format!("queue=\"{queue}\"");
    let mut metrics = String::new();
    wait_until(WAIT, "the dead-lettered task to be counted", || {
        metrics = get(port, "/metrics").1;
        metrics.contains(&format!(
            "warren_tasks_total{{{q},outcome=\"dead_letter\"}} 1"
        ))
    });
    assert_eq!(
        sample(
            &metrics,
            &format!("warren_tasks_total{{{q},outcome=\"ack\"}}")
        ),
        2.0
    );
    assert_eq!(
        sample(
            &metrics,
            &format!("warren_handler_duration_seconds_count{{{q}}}")
        ),
        3.0
    );
    assert_eq!(
        sample(&metrics, &format!("warren_workers_busy{{{q}}}")),
        0.0
    );
    assert_eq!(
        sample(&metrics, &format!("warren_workers_consuming{{{q}}}")),
        2.0
    );

    let connections = util::connections_of(warren.pid());
    util::rabbitmqctl(&[
        "close_connection",
        &connections[0],
        "closed by the warren test suite",
    ]);
    wait_until(WAIT, "the reconnect to be counted", || {
        metrics = get(port, "/metrics").1;
        metrics.contains(&format!("warren_reconnects_total{{{q}}} 1"))
    });
    assert_eq!(
        sample(&metrics, &format!("warren_connection_losses_total{{{q}}}")),
        1.0
    );
    assert_eq!(
        sample(&metrics, &format!("warren_worker_restarts_total{{{q}}}")),
        1.0
    );
    assert_eq!(get(port, "/nothing").0, 404);
    warren.stop(WAIT);
}

#[test]
fn healthz_is_503_with_the_reason_while_the_broker_is_unreachable() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("unhealthy");
    let port = Proxy::free_port();
    let dead = Proxy::free_port();
    let config = ConfigFile::new(&queue)
        .url(&util::proxied_url(dead))
        .dots()
        .metrics(port)
        .write_in(broker.dir.path());
    let warren = Warren::run(&config, &[]);
    warren.wait_for_log("cannot reach the broker", WAIT);
    let mut health = (0, String::new());
    wait_until(WAIT, "/healthz to answer", || {
        health = get(port, "/healthz");
        health.0 != 0
    });
    assert_eq!(health.0, 503, "{health:?}");
    assert!(
        health
            .1
            .starts_with("the broker is unreachable; 0 of 4 workers consuming"),
        "{health:?}"
    );
    warren.stop(WAIT);
}

#[test]
fn a_metrics_address_in_use_is_a_config_error() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("busy-port");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let config = ConfigFile::new(&queue)
        .dots()
        .metrics(port)
        .write_in(broker.dir.path());
    let mut warren = Warren::run(&config, &[]);
    assert_eq!(warren.wait_exit(WAIT).code(), Some(78));
    assert_eq!(
        warren.lines_with("metrics.listen: cannot listen on").len(),
        1,
        "{:#?}",
        warren.log()
    );
}

#[test]
fn log_format_json_writes_one_object_per_line() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("json-log");
    let config = ConfigFile::new(&queue)
        .workers(1)
        .dots()
        .set("log.format", "json")
        .write_in(broker.dir.path());
    let warren = Warren::run(&config, &[]);
    warren.wait_consuming(&queue, 1);
    publish_ok(&config, &["as json"]);
    warren.wait_for_log("done", WAIT);
    let mut warren = warren;
    warren.signal(Signal::SIGTERM);
    assert_eq!(warren.wait_exit(WAIT).code(), Some(0));
    let lines = warren.log();
    let objects: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let done = objects
        .iter()
        .find(|o| o["msg"].as_str().is_some_and(|m| m.contains(" done ")))
        .expect("a done line");
    assert_eq!(done["level"], "DEBUG", "a task's lines are at debug");
    assert!(
        done["msg"].as_str().unwrap().contains("(attempt 1)"),
        "{done}"
    );
    assert!(
        done["ts"]
            .as_str()
            .is_some_and(|t| humantime::parse_rfc3339(t).is_ok()),
        "{done}"
    );
}

#[test]
fn under_the_journal_lines_carry_a_priority_and_no_timestamp() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("journal");
    let config = ConfigFile::new(&queue)
        .workers(1)
        .dots()
        .write_in(broker.dir.path());
    let warren = Warren::spawn(
        Command::new(util::warren_bin())
            .args(["run", "--config"])
            .arg(&config)
            .env("JOURNAL_STREAM", "8:12345"),
    );
    warren.wait_consuming(&queue, 1);
    let mut warren = warren;
    warren.signal(Signal::SIGTERM);
    assert_eq!(warren.wait_exit(WAIT).code(), Some(0));
    let lines = warren.log();
    let starting = lines
        .iter()
        .find(|l| l.contains(" starting 1 workers"))
        .expect("a start line");
    assert!(starting.starts_with("<6>INFO  warren "), "{starting}");
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with('<') && !l.contains("Z INFO")),
        "{lines:#?}"
    );
}

#[test]
fn metrics_show_the_dead_letter_queue_depth_within_the_poll_interval() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("depth");
    let port = Proxy::free_port();
    let script = broker.script("reject", "cat > /dev/null\nexit 65");
    let config = ConfigFile::new(&queue)
        .workers(1)
        .command(&script)
        .metrics(port)
        .set("metrics.queue_depth_interval", "1s")
        .write_in(broker.dir.path());
    let warren = Warren::run(&config, &[]);
    warren.wait_consuming(&queue, 1);
    publish_ok(&config, &["a", "b", "c"]);
    util::wait_for_ready(&format!("{queue}.dead"), 3, WAIT);

    // Two polls at most after the broker holds them (one may have just missed them).
    let dead = format!(
        "warren_queue_messages_ready{{queue=\"{queue}\",kind=\"dead\",name=\"{queue}.dead\"}}"
    );
    let consumers =
        format!("warren_queue_consumers{{queue=\"{queue}\",kind=\"work\",name=\"{queue}\"}}");
    wait_until(
        Duration::from_secs(2) + Duration::from_millis(500),
        "the depth gauges",
        || {
            let metrics = get(port, "/metrics").1;
            util::metric_value(&metrics, &dead) == Some(3.0)
                && util::metric_value(&metrics, &consumers) == Some(1.0)
        },
    );
    let metrics = get(port, "/metrics").1;
    assert_eq!(
        sample(
            &metrics,
            &format!("warren_queue_messages_ready{{queue=\"{queue}\",kind=\"retry\",name=\"{queue}.retry.1s\"}}")
        ),
        0.0
    );
    assert_eq!(
        sample(
            &metrics,
            &format!("warren_queue_depth_errors_total{{queue=\"{queue}\"}}")
        ),
        0.0
    );

    // Every metric the example alerting rules use is one warren serves.
    let rules = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/warren.rules.yml"),
    )
    .unwrap();
    let mut used: Vec<&str> = rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("warren_"))
        .collect();
    used.sort();
    used.dedup();
    assert!(used.len() >= 6, "{used:?}");
    for name in used {
        assert!(
            metrics
                .lines()
                .any(|line| line.starts_with(&format!("{name}{{"))),
            "examples/warren.rules.yml uses {name}, which /metrics does not serve"
        );
    }
    warren.stop(WAIT);
}
