//! warren and its connections to the broker: `broker.urls` names the nodes of a cluster, workers
//! start spread over them from a random node and fail over to another node when one is down or
//! dies, the least used one after a lost connection; a login that a dying node cuts or a busy
//! node leaves unanswered is retried, not taken for refused credentials; an IPv6 address works;
//! a dead network is caught by heartbeats and the task in flight is redelivered; a memory alarm that
//! blocks publishing makes `warren publish` and a worker's retry wait for it to lift instead of
//! timing out or losing the message; and the broker's `consumer_timeout` is checked against the
//! handler timeout at start, and handled like any lost channel when the broker enforces it.
//!
//! Nodes are loopback proxies to the one test broker (`util::Proxy`), so that a node can be down,
//! die or go silent without stopping the broker for the other tests. The alarm and consumer
//! timeout tests change broker-wide settings, so they hold the broker exclusively and restore the
//! settings in a `Drop` guard even when they fail.

mod util;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use util::{
    publish_ok, queue_counts, rabbitmqctl, ready_and_unacked, recorded, wait_until, Broker, Proxy,
    Warren,
};

/// Writes a config like `broker.config`, with `broker.urls` naming `urls` instead of `broker.url`.
fn cluster_config(broker: &Broker, queue: &str, urls: &[String], extra: &str) -> PathBuf {
    let path = broker.config(queue, extra);
    let text = fs::read_to_string(&path).expect("read the config file");
    let single = format!("url = \"{}\"\n", util::amqp_url());
    assert!(
        text.contains(&single),
        "broker.config writes broker.url: {text}"
    );
    let list: Vec<String> = urls.iter().map(|url| format!("\"{url}\"")).collect();
    let text = text.replace(&single, &format!("urls = [{}]\n", list.join(", ")));
    fs::write(&path, text).expect("write the config file");
    path
}

/// A proxy standing in for the one node, and a config through it for one `dots` worker.
fn one_node(broker: &Broker, queue: &str) -> (Proxy, PathBuf) {
    let node = Proxy::start(Proxy::free_port());
    let config = cluster_config(
        broker,
        queue,
        &[node.url()],
        "[workers]\ncount = 1\n\n[handler]\nkind = \"dots\"\n",
    );
    (node, config)
}

/// Two proxies standing in for two nodes, and a config whose `broker.urls` lists them.
fn two_nodes(broker: &Broker, queue: &str, extra: &str) -> ([Proxy; 2], PathBuf) {
    let nodes = [
        Proxy::start(Proxy::free_port()),
        Proxy::start(Proxy::free_port()),
    ];
    let config = cluster_config(broker, queue, &[nodes[0].url(), nodes[1].url()], extra);
    (nodes, config)
}

/// Publishes `messages` to `queue` through `config`'s nodes, waits until `warren` has done them
/// all, stops it with SIGTERM (exit 0) and checks that the queue holds nothing, unacked or not.
fn drain_and_stop(mut warren: Warren, config: &Path, queue: &str, messages: &[&str]) {
    publish_ok(config, messages);
    warren.wait_for_count(" done ", messages.len(), Duration::from_secs(20));
    warren.signal(Signal::SIGTERM);
    assert_eq!(warren.wait_exit(Duration::from_secs(10)).code(), Some(0));
    assert_eq!(ready_and_unacked(queue), (0, 0));
}

/// Replaces `from` with `to` in the config file at `path`, which must contain it.
fn edit_config(path: &Path, from: &str, to: &str) {
    let text = fs::read_to_string(path).expect("read the config file");
    assert!(text.contains(from), "{from:?} is not in the config: {text}");
    fs::write(path, text.replacen(from, to, 1)).expect("write the config file");
}

/// Established TCP connections accepted on the loopback port `port`: the connections a proxy
/// listening there currently forwards, whoever opened them. Read from `/proc/net/tcp{,6}`, where
/// the accepted side of a connection has `port` as its local port (state 01 is ESTABLISHED).
fn connections_through(port: u16) -> usize {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .map(|table| {
            fs::read_to_string(table)
                .unwrap_or_default()
                .lines()
                .skip(1)
                .filter(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    let local_port = fields
                        .get(1)
                        .and_then(|local| local.rsplit(':').next())
                        .and_then(|hex| u16::from_str_radix(hex, 16).ok());
                    local_port == Some(port) && fields.get(3) == Some(&"01")
                })
                .count()
        })
        .sum()
}

/// Waits until the proxies on `ports` forward exactly `counts` connections each.
fn wait_for_connections_through(ports: &[u16], counts: &[usize]) {
    let mut seen = Vec::new();
    wait_until(
        Duration::from_secs(20),
        &format!("{counts:?} connections through the proxies on ports {ports:?}"),
        || {
            seen = ports.iter().map(|&p| connections_through(p)).collect();
            seen == counts
        },
    );
}

/// The worker (`worker-N`) and the message id of a `worker-N received ID ...` log line.
fn received(line: &str) -> (String, String) {
    let (head, rest) = line
        .split_once(" received ")
        .unwrap_or_else(|| panic!("not a received line: {line}"));
    let worker = head.rsplit(' ').next().unwrap_or_default().to_string();
    let id = rest
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    (worker, id)
}

/// Waits until `warren` has logged a line with `then` after a line with `first`.
fn wait_for_log_after(warren: &Warren, first: &str, then: &str, timeout: Duration) {
    wait_until(
        timeout,
        &format!("warren to log {then:?} after {first:?}"),
        || {
            let log = warren.log();
            log.iter()
                .position(|l| l.contains(first))
                .is_some_and(|at| log[at..].iter().any(|l| l.contains(then)))
        },
    );
}

/// A running `warren publish` whose log is collected as it comes, for publishes that must wait.
fn spawn_publish(config: &Path, args: &[&str]) -> Warren {
    Warren::spawn(
        Command::new(util::warren_bin())
            .arg("publish")
            .arg("--config")
            .arg(config)
            .args(args),
    )
}

/// A memory alarm on the broker: a high watermark of 0 makes every node blow it, and the broker
/// blocks every connection that publishes. Dropping the guard restores the watermark, so that a
/// failing test cannot leave the broker blocking every other test's publishes.
struct MemoryAlarm {
    watermark: String,
}

impl MemoryAlarm {
    fn raise() -> MemoryAlarm {
        let current = rabbitmqctl(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."]);
        // A relative watermark (a fraction of the RAM) is restored as it was; anything else as
        // the broker's default.
        let watermark = match current.trim().parse::<f64>() {
            Ok(fraction) if fraction > 0.0 => current.trim().to_string(),
            _ => "0.4".to_string(),
        };
        let alarm = MemoryAlarm { watermark };
        rabbitmqctl(&["set_vm_memory_high_watermark", "0"]);
        alarm
    }
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        let restored = Command::new("rabbitmqctl")
            .args(["set_vm_memory_high_watermark", &self.watermark])
            .output();
        if !restored.is_ok_and(|out| out.status.success()) && !thread::panicking() {
            panic!(
                "could not restore the broker's memory high watermark to {}: run rabbitmqctl set_vm_memory_high_watermark {}",
                self.watermark, self.watermark
            );
        }
    }
}

/// A setting of the broker's `rabbit` application, changed for one test and restored when the
/// guard drops. Channels read these when they open, so set them before warren connects.
struct RabbitEnv {
    key: &'static str,
    original: String,
}

impl RabbitEnv {
    fn set(key: &'static str, value: &str) -> RabbitEnv {
        let current = rabbitmqctl(&["eval", &format!("application:get_env(rabbit, {key}).")]);
        let original = current
            .trim()
            .strip_prefix("{ok,")
            .and_then(|rest| rest.strip_suffix('}'))
            .unwrap_or_else(|| panic!("rabbit {key} is not set: {current}"))
            .to_string();
        let guard = RabbitEnv { key, original };
        rabbitmqctl(&[
            "eval",
            &format!("application:set_env(rabbit, {key}, {value})."),
        ]);
        guard
    }
}

impl Drop for RabbitEnv {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args([
                "eval",
                &format!(
                    "application:set_env(rabbit, {}, {}).",
                    self.key, self.original
                ),
            ])
            .output();
    }
}

#[test]
fn a_worker_whose_first_node_is_down_fails_over_to_the_next_node() {
    let broker = Broker::shared();
    let queue = broker.queue("failover");
    let dead_port = Proxy::free_port();
    let config = cluster_config(
        &broker,
        &queue,
        &[util::proxied_url(dead_port), util::amqp_url()],
        "[workers]\ncount = 2\n\n[handler]\nkind = \"dots\"\n",
    );

    let warren = Warren::run(&config, &[]);
    let line = warren.wait_for_log("failing over to", Duration::from_secs(20));
    // Workers start round-robin from a random node: one of the two starts on the dead one.
    assert!(
        line.contains(&format!(
            ": cannot reach the broker at 127.0.0.1:{dead_port}"
        )) && (line.contains("worker-1: ") || line.contains("worker-2: ")),
        "one worker starts on node 0, which is down: {line}"
    );
    assert!(
        line.contains("failing over to amqp://") && line.contains(&util::broker_address()),
        "it fails over to node 1: {line}"
    );
    warren.wait_consuming(&queue, 2);
    assert_eq!(
        util::connections_of(warren.pid()).len(),
        2,
        "both workers consume, on the live node"
    );
    assert!(
        warren.lines_with("retrying in").is_empty() && warren.lines_with("(round ").is_empty(),
        "one node answering is not an unreachable broker: {:#?}",
        warren.log()
    );

    // warren publish fails over the same way.
    drain_and_stop(warren, &config, &queue, &["one.", "two.", "three", "four"]);
}

#[test]
fn workers_start_spread_over_the_nodes_of_a_cluster() {
    let broker = Broker::shared();
    let queue = broker.queue("spread");
    let nodes = [
        Proxy::start(Proxy::free_port()),
        Proxy::start(Proxy::free_port()),
    ];
    let ports = [nodes[0].port, nodes[1].port];
    let config = cluster_config(
        &broker,
        &queue,
        &[nodes[0].url(), nodes[1].url()],
        "[workers]\ncount = 4\n\n[handler]\nkind = \"dots\"\n",
    );

    let mut warren = Warren::run(&config, &[]);
    warren.wait_consuming(&queue, 4);
    // Each worker has a consuming and a publishing connection, both to its node; workers start
    // round-robin from a random node, so two are on each.
    wait_for_connections_through(&ports, &[4, 4]);
    assert!(
        warren.lines_with("failing over").is_empty(),
        "no worker had to fail over: {:#?}",
        warren.log()
    );

    warren.signal(Signal::SIGTERM);
    assert_eq!(warren.wait_exit(Duration::from_secs(10)).code(), Some(0));
}

/// How many processes the random-start tests run: all of them start on the same one of two
/// nodes with a chance of 2 in 2^20, if the start is random.
const PROCESSES: usize = 20;

#[test]
fn each_warren_process_starts_its_workers_at_a_random_node() {
    let broker = Broker::shared();
    let queue = broker.queue("randomstart");
    let (nodes, config) = two_nodes(
        &broker,
        &queue,
        "[workers]\ncount = 1\n\n[handler]\nkind = \"dots\"\n",
    );
    // Many hosts with the same broker.urls: with one worker each, a fixed start would put every
    // one of them on node 0.
    let warrens: Vec<Warren> = (0..PROCESSES).map(|_| Warren::run(&config, &[])).collect();
    warrens[0].wait_consuming(&queue, PROCESSES as u32);
    let ports = [nodes[0].port, nodes[1].port];
    let mut counts = [0; 2];
    wait_until(
        Duration::from_secs(20),
        "two connections per warren through the proxies",
        || {
            counts = ports.map(connections_through);
            counts.iter().sum::<usize>() == 2 * PROCESSES
        },
    );
    assert!(
        counts.iter().all(|&n| n > 0),
        "both nodes have workers: {counts:?}"
    );
    for warren in &warrens {
        warren.signal(Signal::SIGTERM);
    }
    for mut warren in warrens {
        assert_eq!(warren.wait_exit(Duration::from_secs(10)).code(), Some(0));
    }
}

#[test]
fn each_warren_publish_starts_at_a_random_node() {
    let broker = Broker::shared();
    let queue = broker.queue("randompublish");
    let (nodes, config) = two_nodes(&broker, &queue, "[handler]\nkind = \"dots\"\n");
    let mut used = [0; 2];
    for i in 0..PROCESSES {
        let before = nodes.each_ref().map(Proxy::received);
        publish_ok(&config, &[&format!("message {i}")]);
        for node in 0..2 {
            used[node] += usize::from(nodes[node].received() > before[node]);
        }
    }
    assert_eq!(
        used.iter().sum::<usize>(),
        PROCESSES,
        "one node each: {used:?}"
    );
    assert!(
        used.iter().all(|&n| n > 0),
        "both nodes were used: {used:?}"
    );
    assert_eq!(queue_counts(&queue).0 as usize, PROCESSES);
}

#[test]
fn a_node_named_by_its_ipv6_address_is_reached() {
    let broker = Broker::shared();
    let queue = broker.queue("ipv6");
    let node = Proxy::start_on(std::net::Ipv6Addr::LOCALHOST.into(), Proxy::free_port());
    let url = node.url();
    assert!(url.contains("@[::1]:"), "{url}");
    let config = cluster_config(
        &broker,
        &queue,
        &[url],
        "[workers]\ncount = 1\n\n[handler]\nkind = \"dots\"\n",
    );
    let warren = Warren::run(&config, &[]);
    warren.wait_consuming(&queue, 1);
    drain_and_stop(warren, &config, &queue, &["over IPv6"]);
}

#[test]
fn a_worker_whose_node_dies_reconnects_through_another_node_and_work_goes_on() {
    let broker = Broker::shared();
    let queue = broker.queue("nodedies");
    let dying = Proxy::start(Proxy::free_port());
    let surviving = Proxy::start(Proxy::free_port());
    let (dying_port, surviving_port) = (dying.port, surviving.port);
    let config = cluster_config(
        &broker,
        &queue,
        &[dying.url(), surviving.url()],
        "[workers]\ncount = 2\n\n[handler]\nkind = \"dots\"\n",
    );

    let warren = Warren::run(&config, &[]);
    warren.wait_consuming(&queue, 2);
    wait_for_connections_through(&[dying_port, surviving_port], &[2, 2]);
    let before = util::connections_of(warren.pid());

    // Node 0 dies: its connections are closed and nothing listens on its port any more.
    drop(dying);
    // Workers start round-robin from a random node: either may have been on the dying one.
    let line = warren.wait_for_log(
        &format!(": lost the connection to 127.0.0.1:{dying_port}"),
        Duration::from_secs(10),
    );
    assert!(line.contains("restarting it in"), "{line}");
    let (moved, stayed) = if line.contains("worker-1: ") {
        ("worker-1", "worker-2")
    } else {
        ("worker-2", "worker-1")
    };
    wait_until(
        Duration::from_secs(20),
        &format!("{moved} to consume again through the surviving node"),
        || {
            let now = util::connections_of(warren.pid());
            now.len() == 2 && now.iter().filter(|c| before.contains(c)).count() == 1
        },
    );
    warren.wait_consuming(&queue, 2);
    assert_eq!(
        connections_through(surviving_port),
        4,
        "both workers are on the surviving node"
    );
    assert!(
        warren.lines_with(&format!("{stayed}: lost")).is_empty(),
        "{stayed} was on the surviving node all along: {:#?}",
        warren.log()
    );

    drain_and_stop(warren, &config, &queue, &["after.", "the", "node", "died."]);
}

#[test]
fn after_a_rolling_restart_workers_are_spread_over_the_nodes_not_piled_on_one() {
    let broker = Broker::shared();
    let queue = broker.queue("rolling");
    let mut nodes: Vec<Option<Proxy>> = (0..3)
        .map(|_| Some(Proxy::start(Proxy::free_port())))
        .collect();
    let ports: Vec<u16> = nodes.iter().flatten().map(|n| n.port).collect();
    let urls: Vec<String> = nodes.iter().flatten().map(Proxy::url).collect();
    let metrics = Proxy::free_port();
    let config = cluster_config(
        &broker,
        &queue,
        &urls,
        &format!(
            "[workers]\ncount = 6\n\n[handler]\nkind = \"dots\"\n\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics}\"\nqueue_depth_interval = \"0s\"\n"
        ),
    );
    // What warren's /metrics says of the workers on each node, as `warren_node_workers_consuming`.
    let wait_for_workers_on = |counts: [f64; 3]| {
        let mut seen = Vec::new();
        util::wait_until(
            Duration::from_secs(20),
            &format!("{counts:?} workers consuming per node in /metrics"),
            || {
                let text = util::http_get(metrics, "/metrics").1;
                seen = (ports.iter())
                    .map(|port| {
                        util::metric_sample(
                            &text,
                            &format!(
                                "warren_node_workers_consuming{{queue=\"{queue}\",node=\"127.0.0.1:{port}\"}}"
                            ),
                        )
                    })
                    .collect();
                seen == counts
            },
        );
    };

    let warren = Warren::run(&config, &[]);
    warren.wait_consuming(&queue, 6);
    // Two connections per worker (it consumes on one and publishes on the other), two workers
    // per node; no queue depth poller, whose connection would go through a node too.
    wait_for_connections_through(&ports, &[4, 4, 4]);
    wait_for_workers_on([2.0, 2.0, 2.0]);

    // Each node in turn goes away and comes back on the same port. Its workers go to the least
    // used of the others: [0, 3, 3], then [3, 0, 3], then [3, 3, 0]. Moving each to the next
    // node instead would end with all six on node 0.
    let expected = [[0, 6, 6], [6, 0, 6], [6, 6, 0]];
    for (down, counts) in expected.iter().enumerate() {
        nodes[down] = None;
        wait_for_connections_through(&ports, counts);
        wait_for_workers_on(counts.map(|connections| (connections / 2) as f64));
        nodes[down] = Some(Proxy::start(ports[down]));
        warren.wait_consuming(&queue, 6);
    }

    drain_and_stop(
        warren,
        &config,
        &queue,
        &["after", "the", "rolling", "restart"],
    );
}

#[test]
fn a_worker_whose_node_dies_does_not_move_to_a_node_that_refused_a_connect() {
    let broker = Broker::shared();
    let queue = broker.queue("avoiddown");
    let first = Proxy::start(Proxy::free_port());
    let second = Proxy::start(Proxy::free_port());
    let ports = [first.port, second.port];
    let config = cluster_config(
        &broker,
        &queue,
        &[
            first.url(),
            second.url(),
            util::proxied_url(Proxy::free_port()),
        ],
        "[workers]\ncount = 3\n\n[handler]\nkind = \"dots\"\n",
    );

    // One worker per node; the one on node 2, which is down, fails over to node 0.
    let mut warren = Warren::run(&config, &[]);
    warren.wait_consuming(&queue, 3);
    wait_for_connections_through(&ports, &[4, 2]);
    let failovers = warren.lines_with("failing over").len();
    assert_eq!(failovers, 1, "{:#?}", warren.log());

    // Node 0 dies. Node 2 carries no worker, but a connect to it failed: both go to node 1.
    drop(first);
    wait_for_connections_through(&ports, &[0, 6]);
    warren.wait_consuming(&queue, 3);
    assert_eq!(
        warren.lines_with("failing over").len(),
        failovers,
        "no worker tried node 2 again: {:#?}",
        warren.log()
    );
    warren.signal(Signal::SIGTERM);
    assert_eq!(warren.wait_exit(Duration::from_secs(10)).code(), Some(0));
}

#[test]
fn a_node_that_ends_the_login_is_tried_again_not_taken_for_refused_credentials() {
    let broker = Broker::shared();
    let queue = broker.queue("logincut");
    let (node, config) = one_node(&broker, &queue);

    // amiquip reports any connection that ends between the login and its acceptance as
    // invalid credentials; a node that goes away at that moment must not stop warren (exit 78,
    // which systemd does not restart).
    node.fail_next_login(util::LoginFault::Cut);
    let mut warren = Warren::run(&config, &[]);
    warren.wait_consuming(&queue, 1);
    assert_eq!(node.login_faults_left(), 0, "the first login was cut");
    warren.wait_for_log(
        "closed the connection during the login; trying once more",
        Duration::from_secs(5),
    );

    // warren publish tells the two apart the same way.
    node.fail_next_login(util::LoginFault::Cut);
    publish_ok(&config, &["after", "the cut"]);
    assert_eq!(node.login_faults_left(), 0, "publish's first login was cut");
    warren.wait_for_count(" done ", 2, Duration::from_secs(20));
    assert!(
        warren.lines_with("invalid credentials").is_empty(),
        "{:#?}",
        warren.log()
    );
    warren.signal(Signal::SIGTERM);
    assert_eq!(warren.wait_exit(Duration::from_secs(10)).code(), Some(0));
    assert_eq!(ready_and_unacked(&queue), (0, 0));
}

#[test]
fn a_login_the_broker_does_not_answer_in_time_is_retried_and_says_why() {
    let broker = Broker::shared();
    let queue = broker.queue("loginstall");
    let (node, config) = one_node(&broker, &queue);
    edit_config(
        &config,
        "heartbeat = ",
        "connect_timeout = \"1s\"\nheartbeat = ",
    );

    // warren publish: an unavailable broker (69), not refused credentials (78).
    node.fail_next_login(util::LoginFault::Stall);
    let (status, log) = util::publish(&config, &["stalled"]);
    assert_eq!(status.code(), Some(69), "{status}\n{log}");
    assert!(
        log.contains("no answer to the login within 1s")
            && log.contains("check them too")
            && !log.contains("invalid credentials"),
        "the line says the login timed out, and that with so short a timeout wrong credentials look the same:\n{log}"
    );

    // warren run retries it.
    node.fail_next_login(util::LoginFault::Stall);
    let warren = Warren::run(&config, &[]);
    let line = warren.wait_for_log("no answer to the login", Duration::from_secs(10));
    assert!(line.contains("retrying in"), "{line}");
    warren.wait_consuming(&queue, 1);
    drain_and_stop(warren, &config, &queue, &["answered"]);
}

#[test]
fn a_dead_network_is_caught_by_heartbeats_and_the_task_in_flight_is_redelivered() {
    let broker = Broker::shared();
    let queue = broker.queue("heartbeat");
    let direct = broker.config(&queue, "[handler]\nkind = \"dots\"\n");
    let proxy = Proxy::start(Proxy::free_port());
    let config = broker.config(
        &queue,
        "[workers]\ncount = 2\n\n[handler]\nkind = \"dots\"\n",
    );
    edit_config(&config, &util::amqp_url(), &proxy.url());
    edit_config(&config, "heartbeat = \"5s\"", "heartbeat = \"2s\"");

    let mut warren = Warren::run(&config, &[]);
    warren.wait_consuming(&queue, 2);
    // Six seconds of work: longer than the two heartbeat intervals it takes to notice the
    // network is dead, so the task is still running when its connection goes.
    publish_ok(&direct, &["in flight......"]);
    let (holder, id) = received(&warren.wait_for_log("received", Duration::from_secs(10)));

    let marker = format!(" pid {}\"", warren.pid());
    let before: Vec<String> = util::connections_named(&marker)
        .into_iter()
        .map(|(conn, _)| conn)
        .collect();
    assert_eq!(
        before.len(),
        4,
        "a consuming and a publishing connection per worker: {before:?}"
    );

    let frozen = Instant::now();
    proxy.freeze();
    let lost = format!("lost the connection to 127.0.0.1:{}", proxy.port);
    let detected = warren.wait_for_log(&lost, Duration::from_secs(10));
    let took = frozen.elapsed();
    eprintln!("the dead network was noticed after {took:.2?}: {detected}");
    assert!(
        took >= Duration::from_secs(1),
        "the connection was given up after {took:?}, before any heartbeat was missed: {detected}"
    );

    // Thaw only once the broker, too, has given up on every connection that went silent, and
    // so requeued the message: a network that came back sooner would let the first run's ack
    // through on its old connection, which is right but not what this test is about.
    wait_until(
        Duration::from_secs(20),
        "the broker to close warren's silent connections",
        || {
            let now = util::connections_named(&marker);
            !now.iter().any(|(conn, _)| before.contains(conn))
        },
    );
    eprintln!(
        "the broker closed the silent connections after {:.2?}",
        frozen.elapsed()
    );
    proxy.thaw();
    // The message may run again while its first run is still going: at least once, not exactly
    // once.
    let (rerun_by, _) = received(&warren.wait_for_log(
        &format!("received {id} (attempt 1, redelivered)"),
        Duration::from_secs(30),
    ));
    let line = warren.wait_for_log(
        &format!("{holder} could not settle {id}"),
        Duration::from_secs(20),
    );
    assert!(
        line.contains(&lost),
        "the first run's ack had no connection to go to: {line}"
    );
    wait_for_log_after(
        &warren,
        &format!("received {id} (attempt 1, redelivered)"),
        &format!("{rerun_by} done {id}"),
        Duration::from_secs(20),
    );

    warren.wait_consuming(&queue, 2);
    publish_ok(&direct, &["after the network came back"]);
    let (_, after) =
        received(&warren.wait_for_log("\"after the network came back\"", Duration::from_secs(20)));
    warren.wait_for_log(&format!("done {after}"), Duration::from_secs(20));

    warren.signal(Signal::SIGTERM);
    assert_eq!(warren.wait_exit(Duration::from_secs(10)).code(), Some(0));
    assert_eq!(ready_and_unacked(&queue), (0, 0));
    // Checked last, so that the recovery above is checked even if the reason is missing.
    let reasons = warren.lines_with(&lost);
    assert!(
        reasons
            .iter()
            .any(|l| l.contains("missed heartbeats from the broker")),
        "the log says why the connection was given up: {reasons:#?}"
    );
}

#[test]
fn publish_waits_out_a_memory_alarm_longer_than_its_confirm_timeout() {
    let broker = Broker::exclusive();
    let queue = broker.queue("alarm");
    let config = broker.config(&queue, "");
    // The queue exists before the alarm, so that only the publish itself is held.
    util::declare_durable(&queue);

    let alarm = MemoryAlarm::raise();
    let mut publish = spawn_publish(&config, &["--confirm-timeout", "2s", "held back"]);
    let line = publish.wait_for_log("blocked publishing", Duration::from_secs(20));
    assert!(line.contains("waiting until it lifts the alarm"), "{line}");
    // The fault must outlast the confirm timeout: time blocked by an alarm does not count.
    thread::sleep(Duration::from_secs(4));
    assert!(
        publish.lines_with("ERROR").is_empty(),
        "publish gave up during the alarm: {:#?}",
        publish.log()
    );
    assert_eq!(
        queue_counts(&queue).0,
        0,
        "the broker holds the publish back while the alarm lasts"
    );

    drop(alarm);
    let status = publish.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{:#?}", publish.log());
    assert_eq!(queue_counts(&queue).0, 1, "the message was stored");
}

#[test]
fn a_retry_published_during_a_memory_alarm_waits_for_it_to_lift_and_is_not_lost() {
    let broker = Broker::exclusive();
    let queue = broker.queue("alarmretry");
    let go = broker.dir.path().join("go");
    let attempts = broker.dir.path().join("attempts");
    // The first attempt fails, once the test says so; the second succeeds.
    let script = broker.script(
        "fails-once.sh",
        &format!(
            "echo \"$WARREN_ATTEMPT\" >> {attempts}\n\
             if [ \"$WARREN_ATTEMPT\" = 1 ]; then\n\
               while [ ! -e {go} ]; do sleep 0.05; done\n\
               exit 1\n\
             fi\n\
             exit 0",
            attempts = attempts.display(),
            go = go.display()
        ),
    );
    let config = broker.command_config(
        &queue,
        1,
        &script,
        "[retry]\nmax_attempts = 2\ndelay = \"1s\"\n",
    );
    let retry_queue = format!("{queue}.retry.1s");

    let mut warren = Warren::run(&config, &[]);
    warren.wait_consuming(&queue, 1);
    publish_ok(&config, &["retried"]);
    warren.wait_for_log("received", Duration::from_secs(10));

    let alarm = MemoryAlarm::raise();
    fs::write(&go, "").expect("tell the task to fail");
    warren.wait_for_log("(attempt 1 of 2)", Duration::from_secs(10));
    let line = warren.wait_for_log("blocked publishing", Duration::from_secs(20));
    assert!(line.contains("waiting until it lifts the alarm"), "{line}");
    assert_eq!(
        ready_and_unacked(&queue),
        (0, 1),
        "the worker holds the original until its copy is confirmed"
    );
    assert_eq!(ready_and_unacked(&retry_queue), (0, 0));

    drop(alarm);
    warren.wait_for_log("unblocked publishing", Duration::from_secs(20));
    warren.wait_for_log("(attempt 2)", Duration::from_secs(20));
    warren.wait_for_count(" done ", 1, Duration::from_secs(20));
    assert_eq!(recorded(&attempts), ["1", "2"]);
    assert!(
        warren.lines_with("could not move").is_empty(),
        "the copy was not given up on: {:#?}",
        warren.log()
    );

    warren.signal(Signal::SIGTERM);
    assert_eq!(warren.wait_exit(Duration::from_secs(10)).code(), Some(0));
    assert_eq!(ready_and_unacked(&queue), (0, 0));
    assert_eq!(ready_and_unacked(&retry_queue), (0, 0));
    assert_eq!(ready_and_unacked(&format!("{queue}.dead")), (0, 0));
}

#[test]
fn a_handler_timeout_that_could_outlast_the_consumer_timeout_is_a_config_error() {
    let broker = Broker::shared();
    let queue = broker.queue("ctimeout");
    let config = broker.config(&queue, "[handler]\nkind = \"dots\"\ntimeout = \"2m\"\n");
    edit_config(
        &config,
        "heartbeat = \"5s\"\n",
        "heartbeat = \"5s\"\nconsumer_timeout = \"1m\"\n",
    );

    let mut warren = Warren::run(&config, &[]);
    assert_eq!(warren.wait_exit(Duration::from_secs(10)).code(), Some(78));
    let log = warren.log();
    assert_eq!(log.len(), 1, "one line: {log:#?}");
    assert!(
        log[0].contains(&format!("{}:", config.display()))
            && log[0].contains("handler.timeout (2m)")
            && log[0].contains("broker.consumer_timeout (1m)"),
        "{}",
        log[0]
    );
    assert!(
        util::connections_named(&format!(" pid {}\"", warren.pid())).is_empty(),
        "nothing connected"
    );
}

#[test]
fn a_channel_closed_by_the_broker_consumer_timeout_is_reopened_and_the_message_redelivered() {
    let broker = Broker::exclusive();
    let queue = broker.queue("brokertimeout");
    // The broker checks its consumer timeout on each channel tick, once a minute by default.
    let _timeout = RabbitEnv::set("consumer_timeout", "2000");
    let _tick = RabbitEnv::set("channel_tick_interval", "500");
    // The first delivery outlasts the broker's timeout; the redelivery is quick.
    let script = broker.script(
        "slow-first.sh",
        "if [ \"$WARREN_REDELIVERED\" = 1 ]; then exit 0; fi\nsleep 6",
    );
    let config = broker.command_config(&queue, 1, &script, "");

    let mut warren = Warren::run(&config, &[]);
    warren.wait_consuming(&queue, 1);
    publish_ok(&config, &["slow"]);
    let (_, id) = received(&warren.wait_for_log("received", Duration::from_secs(10)));
    let line = warren.wait_for_log("could not settle", Duration::from_secs(20));
    assert!(
        line.contains("closed the channel: a task outlived its consumer_timeout (2s)"),
        "the broker's reason and limit are logged: {line}"
    );
    warren.wait_for_log(
        &format!(
            "worker-1: the broker at {} closed the channel",
            util::broker_address()
        ),
        Duration::from_secs(5),
    );
    // The 6 s handler does not fit the broker's 2 s: warren fits it, once.
    assert_eq!(
        warren
            .lines_with("outlived its consumer_timeout of 2s, not the 30m")
            .len(),
        1
    );
    wait_for_log_after(
        &warren,
        &format!("received {id} (attempt 1, redelivered)"),
        &format!("done {id}"),
        Duration::from_secs(20),
    );

    warren.signal(Signal::SIGTERM);
    assert_eq!(warren.wait_exit(Duration::from_secs(10)).code(), Some(0));
    assert_eq!(ready_and_unacked(&queue), (0, 0));
}
