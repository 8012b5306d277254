//! The command line: every subcommand and flag of `warren`, as clap definitions and nothing
//! else. `main.rs` parses it; `build.rs` includes this file to generate the man page and the
//! shell completions, so it may use only clap, humantime and std.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Runs background tasks from a RabbitMQ work queue, N at a time, and never loses one.
#[derive(Parser)]
#[command(version, about)]
pub struct Cli {
    /// The configuration file [default: $WARREN_CONFIG, else /etc/warren/warren.toml]
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the daemon: consume the queue and run the handler for each message.
    Run {
        /// Log each task as it is received and as it ends, as the tutorial's worker prints them
        /// (adds warren::task=debug to the log filter).
        #[arg(short, long)]
        verbose: bool,
        /// Worker threads, overriding workers.count.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
        workers: Option<u16>,
    },
    /// Publish persistent messages to the queue, with publisher confirms.
    Publish {
        /// The queue to publish to, overriding queue.name.
        #[arg(long, value_name = "NAME", value_parser = short_string)]
        queue: Option<String>,
        /// Publish to this exchange instead of a queue, with --routing-key.
        #[arg(long, value_name = "NAME", conflicts_with = "queue", value_parser = short_string)]
        exchange: Option<String>,
        /// The routing key for --exchange [default: empty]
        #[arg(long, value_name = "KEY", requires = "exchange", value_parser = short_string)]
        routing_key: Option<String>,
        /// Give every message the header NAME with the string VALUE; repeatable.
        #[arg(long = "header", value_name = "NAME=VALUE", value_parser = parse_header)]
        headers: Vec<(String, String)>,
        /// Give every message this correlation_id.
        #[arg(long, value_name = "ID", value_parser = short_string)]
        correlation_id: Option<String>,
        /// Publish each line of standard input as one message.
        #[arg(long, conflicts_with = "message")]
        stdin: bool,
        /// Do not declare the queue; for producers that may not configure queues.
        #[arg(long)]
        no_declare: bool,
        /// How long to wait for the broker to confirm messages.
        #[arg(long, value_name = "DUR", default_value = "30s", value_parser = parse_duration)]
        confirm_timeout: Duration,
        /// Write warren_published_messages_total, in Prometheus' text format, to PATH (for
        /// node_exporter's textfile collector) once every message is confirmed.
        #[arg(long, value_name = "PATH")]
        metrics_file: Option<PathBuf>,
        /// The message, its words joined with spaces [default: hello]
        message: Vec<String>,
    },
    /// Check the configuration as `warren run` would, and print it with passwords masked.
    ///
    /// Every default is filled in. Exits 78 with the same line as `warren run` on a bad file.
    CheckConfig {
        /// Also connect to every broker node, look for each queue (without creating it), and
        /// check the handler program; one line per check.
        #[arg(long)]
        connect: bool,
    },
    /// Show ready messages and consumers of the work, retry and dead-letter queues.
    ///
    /// Queues are looked at with passive declares: a missing queue is shown as missing, not
    /// created.
    Stats {
        /// Refresh every second, with the change in ready messages per second, until Ctrl+C.
        #[arg(long)]
        watch: bool,
    },
    /// Inspect the dead-letter queue, move its messages back to the work queue, or empty it.
    #[command(subcommand)]
    DeadLetters(DeadLetters),
    /// Ask the running `warren run` of this configuration to take no new messages.
    ///
    /// Tasks already running finish and are settled as usual; connections stay up. It lasts
    /// until `warren resume` or a restart. Talks to the daemon through control.socket.
    Pause,
    /// Ask the running `warren run` of this configuration to take messages again.
    ///
    /// Ends a pause, and closes the circuit breaker if it is open.
    Resume,
    /// Ask the running `warren run` to read its configuration again and apply it.
    ///
    /// The worker count, the handler, [breaker] and [shutdown] apply without dropping a running
    /// task; other changes are named and need a restart. A bad file is refused (exit 78) and
    /// the running configuration stays. This is the units' ExecReload= (systemctl reload).
    Reload,
}

#[derive(Subcommand)]
pub enum DeadLetters {
    /// Show each dead-lettered message: id, reason, attempts, time, body preview.
    ///
    /// Every message stays in the queue (taken unacked and put back, so their order may change).
    List {
        /// Show at most N messages.
        #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
    },
    /// Move dead-lettered messages back to the work queue, as attempt 1 again.
    ///
    /// Each is removed from the dead-letter queue only once the broker has confirmed its copy in
    /// the work queue: a crash can duplicate a message, never lose one.
    Requeue {
        /// Move at most N messages [default: every message in the queue when it starts]
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        limit: Option<u32>,
        /// Move only the messages with this message id; repeat for several.
        #[arg(long = "id", value_name = "ID")]
        ids: Vec<String>,
        /// For tests only: wait this long between a copy's confirm and the removal of its
        /// original, so that a test can kill warren in between.
        #[arg(long, value_name = "DUR", hide = true, value_parser = parse_duration)]
        test_pause_after_confirm: Option<Duration>,
    },
    /// Delete every message in the dead-letter queue (only with --yes).
    ///
    /// Nothing else in warren deletes messages.
    Purge {
        /// Yes, delete them: without it, purge refuses and exits 64.
        #[arg(long)]
        yes: bool,
    },
}

/// Parses a human duration such as "30s" for a flag.
fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("invalid duration {text:?}: {e}"))
}

/// A queue or exchange name, a routing key, a property: AMQP holds them in at most 255 bytes.
fn short_string(text: &str) -> Result<String, String> {
    match text.len() {
        0..=255 => Ok(text.to_string()),
        n => Err(format!("{n} bytes, more than the 255 AMQP allows")),
    }
}

fn parse_header(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        // An AMQP field name is a short string.
        Some((name, value)) => Ok((short_string(name)?, value.to_string())),
        None => Err(format!("{text:?} is not NAME=VALUE")),
    }
}
