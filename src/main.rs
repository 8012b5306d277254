//! The `warren` binary: parses the command line, starts logging, installs the signal handlers
//! (Ctrl+C and SIGTERM stop; SIGHUP reloads, or stops when warren runs on a terminal, whose
//! hangup it is), calls into the library, and maps the result to a sysexits exit code. Nothing
//! else lives here.

mod cli;

use std::convert::Infallible;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::thread;

use clap::Parser;
use cli::{Cli, Command, DeadLetters};
use crossbeam_channel::Receiver;
use signal_hook::consts::{SIGHUP, SIGTERM};
use signal_hook::iterator::Signals;
use warren::{control, exit, Failure, Handle};

/// How many malloc arenas glibc may make, unless `MALLOC_ARENA_MAX` says otherwise.
const MALLOC_ARENAS: i32 = 2;

/// Caps glibc's malloc arenas at [`MALLOC_ARENAS`]. glibc gives threads that allocate at once
/// arenas of their own, up to 8 per core, and keeps in each what it freed. Every reconnect starts
/// new amiquip I/O threads that allocate a few hundred KiB each (mio-extras' timer wheel), so
/// with the default, resident memory crept up by about 1 MiB in 20 minutes of the soak's faults
/// while the heap in use stayed flat; capped, it stays flat (RELIABILITY.md). warren's few
/// threads do not contend for the allocator. An operator's `MALLOC_ARENA_MAX` is left to glibc.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; it is called first thing in main,
        // before any other thread exists or allocates.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
        }
    }
}

fn main() -> ExitCode {
    limit_malloc_arenas();
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
    let verbose = matches!(cli.command, Command::Run { verbose: true, .. });
    warren::logging::init(verbose);
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            log::error!("{failure}");
            ExitCode::from(failure.exit_code())
        }
    }
}

fn run(cli: Cli) -> Result<u8, Failure> {
    let path = warren::config_path(cli.config);
    let config = match cli.command {
        Command::Pause | Command::Resume | Command::Reload => warren::load_control_config(&path)?,
        _ => warren::load_config(&path)?,
    };
    match cli.command {
        Command::Run { workers, .. } => {
            let code = warren::daemon(config, workers.map(usize::from), |handle| {
                let on_ctrl_c = handle.clone();
                if let Err(e) = ctrlc::set_handler(move || on_ctrl_c.stop()) {
                    log::warn!("cannot handle Ctrl+C: {e}");
                }
                handle_signals(handle);
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
            queue,
            exchange,
            routing_key,
            headers,
            correlation_id,
            stdin,
            no_declare,
            confirm_timeout,
            metrics_file,
            message,
        } => {
            let options = warren::publish::Options {
                target: match exchange {
                    Some(name) => warren::publish::Target::Exchange {
                        name,
                        routing_key: routing_key.unwrap_or_default(),
                    },
                    None => warren::publish::Target::Queue(
                        queue.unwrap_or_else(|| config.queue.name.clone()),
                    ),
                },
                declare: !no_declare,
                confirm_timeout,
                stamp: warren::amqp::Stamp {
                    correlation_id,
                    headers,
                },
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
        Command::CheckConfig { connect } => {
            warren::ops::check_config(&config, connect, &mut std::io::stdout())
        }
        Command::Stats { watch } => {
            warren::ops::stats(&config, watch, &stop_on_signal(), &mut std::io::stdout())
        }
        Command::DeadLetters(DeadLetters::List { limit }) => {
            warren::ops::list(&config, limit, &mut std::io::stdout())
        }
        Command::DeadLetters(DeadLetters::Requeue {
            limit,
            ids,
            test_pause_after_confirm,
        }) => {
            let options = warren::ops::Requeue {
                limit,
                ids,
                pause_after_confirm: test_pause_after_confirm,
            };
            let stop = stop_on_signal();
            warren::ops::requeue(&config, &options, &stop, &mut std::io::stdout())
        }
        Command::DeadLetters(DeadLetters::Purge { yes }) => {
            warren::ops::purge(&config, yes, &mut std::io::stdout())
        }
        Command::Pause => control(&config, control::Command::Pause),
        Command::Resume => control(&config, control::Command::Resume),
        Command::Reload => control(&config, control::Command::Reload),
    }
}

/// `warren pause`, `resume` and `reload`: the daemon's answer on standard output.
fn control(config: &warren::config::Config, command: control::Command) -> Result<u8, Failure> {
    let answer = warren::control_command(config, command)?;
    println!("{answer}");
    Ok(exit::OK)
}

/// SIGTERM stops the daemon, as Ctrl+C does. SIGHUP reloads its configuration, unless warren runs
/// on a terminal (standard input is one): there SIGHUP is the terminal's hangup, and warren stops
/// as for Ctrl+C rather than run on with nowhere to write.
fn handle_signals(handle: Handle) {
    let foreground = std::io::stdin().is_terminal();
    let mut signals = match Signals::new([SIGTERM, SIGHUP]) {
        Ok(signals) => signals,
        Err(e) => {
            log::warn!("cannot handle SIGTERM and SIGHUP: {e}");
            return;
        }
    };
    let spawned = thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if signal == SIGHUP && !foreground {
                    log::info!("SIGHUP: reloading the configuration");
                    // On a thread of its own: a SIGTERM must not wait behind a reload.
                    let handle = handle.clone();
                    let _ = thread::Builder::new()
                        .name("reload".into())
                        .spawn(move || handle.reload());
                } else {
                    handle.stop();
                }
            }
        });
    if let Err(e) = spawned {
        log::warn!("cannot handle SIGTERM and SIGHUP: {e}");
    }
}

/// For the operator commands that loop: a receiver that disconnects at the first Ctrl+C, SIGTERM
/// or SIGHUP, when a handler drops the only sender.
fn stop_on_signal() -> Receiver<Infallible> {
    let (stop, stopped) = crossbeam_channel::bounded(0);
    let stop = Arc::new(Mutex::new(Some(stop)));
    let on_ctrl_c = Arc::clone(&stop);
    if let Err(e) = ctrlc::set_handler(move || drop(on_ctrl_c.lock().map(|mut s| s.take()))) {
        log::warn!("cannot handle Ctrl+C: {e}");
    }
    let spawned = Signals::new([SIGTERM, SIGHUP]).and_then(|mut signals| {
        thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if signals.forever().next().is_some() {
                    drop(stop.lock().map(|mut s| s.take()));
                }
            })
    });
    if let Err(e) = spawned {
        log::warn!("cannot handle SIGTERM and SIGHUP: {e}");
    }
    stopped
}
