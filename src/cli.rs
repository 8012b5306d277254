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
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the daemon: consume the queue and run the handler for each message.
    Run {
        /// The configuration file [default: $WARREN_CONFIG, else /etc/warren/warren.toml]
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
        /// Worker threads, overriding workers.count.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
        workers: Option<u16>,
    },
    /// Publish persistent messages to the queue, with publisher confirms.
    Publish {
        /// The configuration file [default: $WARREN_CONFIG, else /etc/warren/warren.toml]
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
        /// The queue to publish to, overriding queue.name.
        #[arg(long, value_name = "NAME")]
        queue: Option<String>,
        /// Publish each line of standard input as one message.
        #[arg(long, conflicts_with = "message")]
        stdin: bool,
        /// Do not declare the queue; for producers that may not configure queues.
        #[arg(long)]
        no_declare: bool,
        /// How long to wait for the broker to confirm messages.
        #[arg(long, value_name = "DUR", default_value = "30s", value_parser = parse_duration)]
        confirm_timeout: Duration,
        /// The message, its words joined with spaces [default: hello]
        message: Vec<String>,
    },
}

/// Parses a human duration such as "30s" for a flag.
fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("invalid duration {text:?}: {e}"))
}
