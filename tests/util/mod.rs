//! Helpers shared by the integration tests, one concern a file:
//!
//! - `broker.rs`: the system broker. [`BrokerLock`] is a test's claim on it (the lock that keeps
//!   tests which stop the broker apart from the others, unique queue names deleted afterwards,
//!   a scratch directory and the handler scripts written into it); sessions, queue counts (by
//!   passive declare or `rabbitmqctl list_queues`), `rabbitmqctl` and the connections it lists,
//!   [`Queues`] (a work queue with its retry and dead-letter queues), [`Exchanges`], and vhosts,
//!   users (with the permissions a test gives them) and a stopped app of a test's own.
//! - `config.rs`: [`ConfigFile`], the one way tests write a warren config file.
//! - `warren.rs`: the `warren` binary as a child process: [`Warren`] (a running `warren run`
//!   with its log collected line by line), other subcommands, processes going away, and
//!   `/metrics` over HTTP.
//! - `messages.rs`: putting messages in (`warren publish`, or the library's publisher with
//!   confirms) and reading them back with their dead-letter headers.
//! - `handlers.rs`: what handler scripts record, and [`Dependency`], a handler whose dependency
//!   a test switches off and on.
//! - `proxy.rs`: [`Proxy`], a loopback TCP proxy that makes the broker appear, vanish or go
//!   silent for one client.
//! - `tally.rs` (`util::tally`): numbered tasks under faults and what became of them, for the
//!   fault and cluster suites.
//! - `nodes.rs` (`util::nodes`): extra RabbitMQ nodes and clusters of them.
//! - `certs.rs` (`util::certs`): certificates for TLS tests.
//! - `container.rs` (`util::container`): a throwaway systemd booted in namespaces of its own,
//!   with `boot-container.sh`, for the package's units (tests/systemd.rs).
//!
//! The first five are re-exported here, so a test names `util::Warren` or `util::publish_ok`;
//! the last four are used by few suites and keep their module's name.
//!
//! Every test talks to the RabbitMQ named by `WARREN_TEST_AMQP_URL` (default: the local guest
//! account). A test that cannot reach it fails with a message that says so; none skip. Tests
//! that stop the broker take the broker lock exclusively; every other test holds it shared.
#![allow(dead_code)]

mod broker;
pub mod certs;
mod config;
pub mod container;
mod handlers;
mod messages;
pub mod nodes;
mod proxy;
pub mod tally;
mod warren;

// Each suite uses some of these and not others, which is no reason to warn.
#[allow(unused_imports)]
pub use self::{broker::*, config::*, handlers::*, messages::*, proxy::*, warren::*};

use std::thread;
use std::time::{Duration, Instant};

/// Waits until `condition` holds, or panics naming `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}
