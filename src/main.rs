//! The `warren` binary: parses the command line, starts logging, installs the Ctrl+C / SIGTERM
//! handler, calls into the library, and maps the result to a sysexits exit code. Nothing else
//! lives here.

mod cli;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use cli::{Cli, Command};
use warren::{exit, Failure};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(exit::USAGE);
        }
    };
    // amiquip's own warnings repeat, less clearly, what warren logs about the same event, so
    // they are hidden unless RUST_LOG asks for amiquip by name.
    let mut filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|f| !f.trim().is_empty())
        .unwrap_or_else(|| "info".into());
    if !filter.contains("amiquip") {
        filter.push_str(",amiquip=error");
    }
    env_logger::Builder::new()
        .parse_filters(&filter)
        .format_target(false)
        .init();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            log::error!("{failure}");
            ExitCode::from(failure.exit_code())
        }
    }
}

fn run(cli: Cli) -> Result<u8, Failure> {
    match cli.command {
        Command::Run { config, workers } => {
            let config = warren::load_config(&warren::config_path(config))?;
            let code = warren::daemon(config, workers.map(usize::from), |stopper| {
                if let Err(e) = ctrlc::set_handler(move || stopper.stop()) {
                    log::warn!("cannot handle Ctrl+C and SIGTERM: {e}");
                }
                if std::io::stderr().is_terminal() {
                    log::info!(" [*] Waiting for messages. To exit press CTRL+C");
                }
            })?;
            if code == exit::INTERRUPTED {
                // A second Ctrl+C: the supervisor has killed the tasks in flight (waiting a second
                // at most for them); leave now, without joining worker threads. The broker requeues
                // every unacked message when their connections drop.
                std::process::exit(code.into());
            }
            Ok(code)
        }
        Command::Publish {
            config,
            queue,
            stdin,
            no_declare,
            confirm_timeout,
            message,
        } => {
            let config = warren::load_config(&warren::config_path(config))?;
            let options = warren::publish::Options {
                queue: queue.unwrap_or_else(|| config.queue.name.clone()),
                declare: !no_declare,
                confirm_timeout,
            };
            if stdin {
                let input = std::io::stdin().lock();
                warren::publish_messages(&config, &options, warren::publish::lines(input))?;
            } else {
                let body = match message.join(" ") {
                    body if body.is_empty() => "hello".to_string(),
                    body => body,
                };
                log::info!(" [x] Sent {}", warren::pool::preview(body.as_bytes()));
                warren::publish_messages(
                    &config,
                    &options,
                    std::iter::once(Ok(body.into_bytes())),
                )?;
            }
            Ok(exit::OK)
        }
    }
}
