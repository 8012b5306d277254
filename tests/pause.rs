//! Pause and resume by the operator (`warren pause`, `warren resume`) through the control
//! socket: no new message is taken while paused, running tasks finish, connections stay up,
//! /healthz and /metrics say so, and SIGTERM still stops warren cleanly; the messages a paused
//! worker gives back spend no attempt, even on a quorum queue, which counts deliveries.

mod util;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use util::{
    http_get, metric_sample, publish_ok, queue_counts, wait_until, warren_command, BrokerLock,
    ConfigFile, Dependency, Proxy, Warren,
};

/// Runs `warren <command> --config <config>` to completion.
fn control(command: &str, config: &Path) -> Output {
    warren_command(&[command, "--config", config.to_str().expect("a UTF-8 path")])
        .output()
        .expect("run warren")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

#[test]
fn a_paused_pool_takes_nothing_new_finishes_its_running_task_and_resumes() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("pause");
    let dependency = Dependency::new(&broker, "pause");
    let port = Proxy::free_port();
    // Prefetch 3: the workers hold unstarted messages when the pause comes, and must give
    // them back.
    let config = ConfigFile::new(&queue)
        .workers(2)
        .prefetch(3)
        .command(&dependency.script)
        .control(&broker.dir.path().join("control.sock"))
        .metrics(port)
        .set("metrics.queue_depth_interval", "1s")
        .write_in(broker.dir.path());
    let notify = broker.dir.path().join("notify.sock");
    let status = UnixDatagram::bind(&notify).unwrap();
    status
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let warren = Warren::spawn(
        Command::new(util::warren_bin())
            .args(["run", "--config"])
            .arg(&config)
            .env("NOTIFY_SOCKET", &notify),
    );
    warren.wait_consuming(&queue, 2);

    publish_ok(&config, &["slow-1"]);
    warren.wait_for_log("\"slow-1\"", Duration::from_secs(10));
    let paused = control("pause", &config);
    assert!(paused.status.success(), "{paused:?}");
    assert_eq!(
        stdout(&paused),
        "paused: no worker takes a new message; the 1 task running finishes as usual"
    );
    let again = control("pause", &config);
    assert!(stdout(&again).starts_with("already paused"), "{again:?}");

    util::publish_numbered(&config, "fast", 5);
    // The running task finishes; the new ones wait in the queue, with no consumer.
    wait_until(Duration::from_secs(10), "slow-1 to finish", || {
        dependency.done().contains("slow-1")
    });
    wait_until(Duration::from_secs(10), "five ready, no consumer", || {
        queue_counts(&queue) == (5, 0)
    });
    assert_eq!(dependency.calls().len(), 1, "nothing new was taken");
    // The workers' connections stay up: two each, one consuming and one publishing.
    let connections = util::connections_named(&format!(" pid {}\"", warren.pid()));
    let workers = (connections.iter())
        .filter(|(_, line)| line.contains("warren worker-"))
        .count();
    assert_eq!(workers, 4, "{connections:#?}");

    let (code, health) = http_get(port, "/healthz");
    assert_eq!(
        (code, health.trim()),
        (200, "ok; paused: by the operator (warren pause)")
    );
    // systemd's status line says so too.
    let mut buf = [0u8; 4096];
    wait_until(Duration::from_secs(5), "a paused STATUS= line", || {
        status.recv(&mut buf).is_ok_and(|n| {
            String::from_utf8_lossy(&buf[..n]).contains(
                "STATUS=paused: by the operator (warren pause); 0 busy, 2 idle of 2 workers",
            )
        })
    });
    wait_until(Duration::from_secs(5), "the depth gauge", || {
        let metrics = http_get(port, "/metrics").1;
        metric_sample(&metrics, &format!("warren_paused{{queue=\"{queue}\"}}")) == 1.0
            && util::metric_value(
                &metrics,
                &format!("warren_queue_messages_ready{{queue=\"{queue}\",kind=\"work\",name=\"{queue}\"}}"),
            ) == Some(5.0)
    });

    let resumed = control("resume", &config);
    assert_eq!(stdout(&resumed), "resumed: workers take messages again");
    wait_until(Duration::from_secs(10), "the five tasks", || {
        dependency.done().len() == 6
    });

    // Paused again, SIGTERM still stops warren with exit 0, and quickly.
    assert!(control("pause", &config).status.success());
    warren.stop(Duration::from_secs(5));
}

#[test]
fn pause_without_a_running_warren_exits_69_and_names_the_socket() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("pause-none");
    let socket = broker.dir.path().join("nobody.sock");
    let config = ConfigFile::new(&queue)
        .dots()
        .control(&socket)
        .write_in(broker.dir.path());
    let ran = control("pause", &config);
    assert_eq!(ran.status.code(), Some(69), "{ran:?}");
    let log = String::from_utf8_lossy(&ran.stderr);
    assert_eq!(log.lines().count(), 1, "{log}");
    assert!(
        log.contains(&format!("no warren run answers on {}", socket.display())),
        "{log}"
    );
}

#[test]
fn a_control_socket_another_warren_listens_on_is_a_config_error() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("pause-twice");
    let socket = broker.dir.path().join("shared.sock");
    let config = ConfigFile::new(&queue).workers(1).dots().control(&socket);
    let first = config.write_in(broker.dir.path());
    let second = config.write_in(broker.dir.path());
    let warren = Warren::run(&first, &[]);
    warren.wait_consuming(&queue, 1);
    let mut other = Warren::run(&second, &[]);
    assert_eq!(other.wait_exit(Duration::from_secs(10)).code(), Some(78));
    let errors = other.lines_with("ERROR");
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(
        errors[0].contains("control.socket: another process listens on"),
        "{errors:#?}"
    );
    // Asked through the second file, the first warren refuses: the socket is not its file's.
    let refused = control("pause", &second);
    assert_eq!(refused.status.code(), Some(78), "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("belongs to the warren run of"));
    warren.stop(Duration::from_secs(10));
}

#[test]
fn paused_quorum_queue_messages_go_back_without_spending_an_attempt() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("quorum-pause");
    let dependency = Dependency::new(&broker, "quorum-pause");
    let socket = broker.dir.path().join("control.sock");
    // Prefetch 5: each busy worker holds four unstarted messages when the pause comes.
    let config = ConfigFile::at(&util::amqp_url(), &queue)
        .quorum()
        .workers(2)
        .prefetch(5)
        .command(&dependency.script)
        .control(&socket)
        .write_to(&broker.dir.path().join("quorum.toml"));
    let warren = Warren::run(&config, &[]);
    warren.wait_consuming(&queue, 2);
    util::publish_numbered(&config, "slow", 12);
    wait_until(Duration::from_secs(10), "two tasks running", || {
        (warren.lines_with("\"slow-").iter())
            .filter(|line| line.contains(" received "))
            .count()
            >= 2
    });
    let paused = control("pause", &config);
    assert!(paused.status.success(), "{paused:?}");
    // The stragglers are back in the queue, ready, and no consumer holds them.
    wait_until(
        Duration::from_secs(15),
        "ten messages back in the queue",
        || queue_counts(&queue) == (10, 0),
    );
    let resumed = control("resume", &config);
    assert!(resumed.status.success(), "{resumed:?}");
    wait_until(Duration::from_secs(30), "every message", || {
        dependency.done().len() == 12
    });
    let attempts: Vec<u32> = dependency.calls().iter().map(|c| c.attempt).collect();
    assert_eq!(attempts, [1; 12], "a pause spends no attempt");
    warren.stop(Duration::from_secs(10));
}
