//! The `warren` binary: parses the command line, starts logging, installs the Ctrl+C / SIGTERM
//! handler, calls into the library, and maps the result to a sysexits exit code. Nothing else
//! lives here.

mod cli;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use cli::{Cli, Command, DeadLetters};
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
    warren::logging::init();
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
            metrics_file,
            message,
        } => {
            let config = warren::load_config(&warren::config_path(config))?;
            let options = warren::publish::Options {
                queue: queue.unwrap_or_else(|| config.queue.name.clone()),
                declare: !no_declare,
                confirm_timeout,
                metrics_file,
            };
            if stdin {
                let input = std::io::stdin().lock();
                warren::publish_messages(&config, &options, warren::publish::lines(input))?;
            } else {
                let body = match message.join(" ") {
                    body if body.is_empty() => "hello".to_string(),
                    body => body,
                };
                let preview = warren::logging::preview(body.as_bytes());
                warren::publish_messages(
                    &config,
                    &options,
                    std::iter::once(Ok(body.into_bytes())),
                )?;
                // The tutorial's line, once it is true: the broker has confirmed the message.
                log::info!(" [x] Sent {preview}");
            }
            Ok(exit::OK)
        }
        Command::CheckConfig { config, connect } => {
            let config = warren::load_config(&warren::config_path(config))?;
            warren::ops::check_config(&config, connect, &mut std::io::stdout())
        }
        Command::Stats { config, watch } => {
            let config = warren::load_config(&warren::config_path(config))?;
            warren::ops::stats(&config, watch, &stop_on_signal(), &mut std::io::stdout())
        }
        Command::DeadLetters(DeadLetters::List { config, limit }) => {
            let config = warren::load_config(&warren::config_path(config))?;
            warren::ops::list(&config, limit, &mut std::io::stdout())
        }
        Command::DeadLetters(DeadLetters::Requeue {
            config,
            limit,
            ids,
            test_pause_after_confirm,
        }) => {
            let config = warren::load_config(&warren::config_path(config))?;
            let options = warren::ops::Requeue {
                limit,
                ids,
                pause_after_confirm: test_pause_after_confirm,
            };
            let stop = stop_on_signal();
            warren::ops::requeue(&config, &options, &stop, &mut std::io::stdout())
        }
        Command::DeadLetters(DeadLetters::Purge { config, yes }) => {
            let config = warren::load_config(&warren::config_path(config))?;
            warren::ops::purge(&config, yes, &mut std::io::stdout())
        }
    }
}

/// For the operator commands that loop: a receiver that disconnects at the first Ctrl+C, SIGTERM
/// or SIGHUP, when the handler drops the only sender.
fn stop_on_signal() -> crossbeam_channel::Receiver<std::convert::Infallible> {
    let (stop, stopped) = crossbeam_channel::bounded(0);
    let mut stop = Some(stop);
    if let Err(e) = ctrlc::set_handler(move || drop(stop.take())) {
        log::warn!("cannot handle Ctrl+C and SIGTERM: {e}");
    }
    stopped
}
