//! Failover across the nodes of a cluster: `broker.urls` names the nodes, workers start spread
//! over them from a random node (and each `warren publish` at a random node), a worker whose
//! node is down or dies fails over to another node, after a lost connection the least used one
//! and never one that just refused a connect; a node named by its IPv6 address is reached too.
//!
//! Nodes are loopback proxies to the one test broker (`util::Proxy`), so that a node can be down
//! or die without stopping the broker for the other tests.

mod util;

use std::fs;
use std::time::Duration;

use nix::sys::signal::Signal;
use util::{
    drain_and_stop, publish_ok, queue_counts, wait_until, BrokerLock, ConfigFile, Proxy, Warren,
};

/// Two proxies standing in for two nodes, and a config for `queue` whose `broker.urls` lists
/// them.
fn two_nodes(queue: &str) -> ([Proxy; 2], ConfigFile) {
    let nodes = [
        Proxy::start(Proxy::free_port()),
        Proxy::start(Proxy::free_port()),
    ];
    let config = ConfigFile::new(queue).urls(&[nodes[0].url(), nodes[1].url()]);
    (nodes, config)
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

#[test]
fn a_worker_whose_first_node_is_down_fails_over_to_the_next_node() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("failover");
    let dead_port = Proxy::free_port();
    let config = ConfigFile::new(&queue)
        .urls(&[util::proxied_url(dead_port), util::amqp_url()])
        .workers(2)
        .dots()
        .write_in(broker.dir.path());

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
    let broker = BrokerLock::shared();
    let queue = broker.queue("spread");
    let nodes = [
        Proxy::start(Proxy::free_port()),
        Proxy::start(Proxy::free_port()),
    ];
    let ports = [nodes[0].port, nodes[1].port];
    let config = ConfigFile::new(&queue)
        .urls(&[nodes[0].url(), nodes[1].url()])
        .workers(4)
        .dots()
        .write_in(broker.dir.path());

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
    let broker = BrokerLock::shared();
    let queue = broker.queue("randomstart");
    let (nodes, config) = two_nodes(&queue);
    let config = config.workers(1).dots().write_in(broker.dir.path());
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
    let broker = BrokerLock::shared();
    let queue = broker.queue("randompublish");
    let (nodes, config) = two_nodes(&queue);
    let config = config.dots().write_in(broker.dir.path());
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
    let broker = BrokerLock::shared();
    let queue = broker.queue("ipv6");
    let node = Proxy::start_on(std::net::Ipv6Addr::LOCALHOST.into(), Proxy::free_port());
    let url = node.url();
    assert!(url.contains("@[::1]:"), "{url}");
    let config = ConfigFile::new(&queue)
        .urls(&[url])
        .workers(1)
        .dots()
        .write_in(broker.dir.path());
    let warren = Warren::run(&config, &[]);
    warren.wait_consuming(&queue, 1);
    drain_and_stop(warren, &config, &queue, &["over IPv6"]);
}

#[test]
fn a_worker_whose_node_dies_reconnects_through_another_node_and_work_goes_on() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("nodedies");
    let dying = Proxy::start(Proxy::free_port());
    let surviving = Proxy::start(Proxy::free_port());
    let (dying_port, surviving_port) = (dying.port, surviving.port);
    let config = ConfigFile::new(&queue)
        .urls(&[dying.url(), surviving.url()])
        .workers(2)
        .dots()
        .write_in(broker.dir.path());

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
    let broker = BrokerLock::shared();
    let queue = broker.queue("rolling");
    let mut nodes: Vec<Option<Proxy>> = (0..3)
        .map(|_| Some(Proxy::start(Proxy::free_port())))
        .collect();
    let ports: Vec<u16> = nodes.iter().flatten().map(|n| n.port).collect();
    let urls: Vec<String> = nodes.iter().flatten().map(Proxy::url).collect();
    let metrics = Proxy::free_port();
    let config = ConfigFile::new(&queue)
        .urls(&urls)
        .workers(6)
        .dots()
        .metrics(metrics)
        .set("metrics.queue_depth_interval", "0s")
        .write_in(broker.dir.path());
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
    let broker = BrokerLock::shared();
    let queue = broker.queue("avoiddown");
    let first = Proxy::start(Proxy::free_port());
    let second = Proxy::start(Proxy::free_port());
    let ports = [first.port, second.port];
    let config = ConfigFile::new(&queue)
        .urls(&[
            first.url(),
            second.url(),
            util::proxied_url(Proxy::free_port()),
        ])
        .workers(3)
        .dots()
        .write_in(broker.dir.path());

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
