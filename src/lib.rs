//! warren runs background tasks from a RabbitMQ work queue, N at a time, acknowledging each one
//! only after its work is done.
//!
//! This crate root wires the modules into the commands: [`daemon`] (`warren run`, with its
//! metrics endpoint, queue depth poller and control socket), [`publish_messages`] (`warren
//! publish`) and [`control_command`] (`warren pause`, `resume`, `reload`), and sorts every way
//! they can fail into a [`Failure`] that carries its sysexits code. It parses no command line and
//! installs no signal handler: `main.rs` does both, so that tests can drive the library directly.

pub mod abort;
pub mod amqp;
pub mod child;
pub mod config;
pub mod context;
pub mod control;
pub mod depth;
pub mod factory;
pub mod handler;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod ops;
pub mod pipe;
pub mod pool;
pub mod publish;
pub mod retry;
pub mod secrets;
pub mod tls;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{Config, ConfigError};
use crate::control::Refusal;
use crate::handler::HandlerFactory;
use crate::metrics::Metrics;
use crate::pool::{Controller, Declined, Pool, Report, Request, Stopper};

/// Exit codes, from sysexits.h where one fits.
pub mod exit {
    pub const OK: u8 = 0;
    /// The pool stopped, but the grace ran out and tasks were requeued unfinished.
    pub const ABANDONED: u8 = 1;
    /// An operator command found a problem: a `check-config --connect` check failed, a queue it
    /// needs does not exist, or an `--id` is not in the dead-letter queue.
    pub const CHECK_FAILED: u8 = 1;
    pub const USAGE: u8 = 64;
    pub const UNAVAILABLE: u8 = 69;
    pub const SOFTWARE: u8 = 70;
    pub const TEMPFAIL: u8 = 75;
    pub const CONFIG: u8 = 78;
    /// A second Ctrl+C: 128 + SIGINT, as shells report it.
    pub const INTERRUPTED: u8 = 130;
}

/// Why a command failed. Each variant is one exit code; the text is one line for the log.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The broker refused something that only a configuration change can fix.
    #[error("{0}")]
    Misconfigured(String),
    #[error("{0}")]
    Unavailable(amqp::AmqpError),
    #[error("{0}")]
    TempFail(String),
    /// No daemon answers on the control socket.
    #[error("{0}")]
    NotRunning(String),
    #[error("{0}")]
    Software(String),
}

impl Failure {
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Usage(_) => exit::USAGE,
            Failure::Config(_) | Failure::Misconfigured(_) => exit::CONFIG,
            Failure::Unavailable(_) | Failure::NotRunning(_) => exit::UNAVAILABLE,
            Failure::TempFail(_) => exit::TEMPFAIL,
            Failure::Software(_) => exit::SOFTWARE,
        }
    }
}

/// The configuration file to read: `--config`, else `WARREN_CONFIG`, else the default path.
pub fn config_path(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("WARREN_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_PATH))
}

/// Loads the configuration at `path`. `WARREN_BROKER_URL`, else the systemd credential
/// `broker-url`, overrides the file's broker URL (see [`secrets`]). Warns when the file shows a
/// broker password to every user.
pub fn load_config(path: &Path) -> Result<Config, Failure> {
    let url = secrets::broker_url_override()?;
    let config = Config::load(path, url)?;
    // Every line from here on, the warning below included, in the configured format.
    logging::set_format(config.log.format);
    secrets::warn_if_password_readable(path);
    Ok(config)
}

/// The configuration for `warren pause`, `resume` and `reload`, which talk to the daemon's
/// control socket and never to the broker: the file alone, without the broker URL of
/// `WARREN_BROKER_URL` or the credential. The units' `ExecReload=` runs `warren reload` where
/// the credential cannot be read: systemd (252 to 256 at least, systemd/systemd#35227) does not
/// mount a unit's credentials in the namespace of its `ExecReload=` once the unit is sandboxed,
/// and reading it would fail the reload. The daemon reads the file, and the credential, itself.
pub fn load_control_config(path: &Path) -> Result<Config, Failure> {
    let config = Config::load(path, None)?;
    logging::set_format(config.log.format);
    Ok(config)
}

/// What a signal handler may ask of a running daemon.
#[derive(Clone)]
pub struct Handle {
    stopper: Stopper,
    reload: Arc<dyn Fn() -> control::Response + Send + Sync>,
}

impl Handle {
    /// Stops gracefully; a second call stops at once.
    pub fn stop(&self) {
        self.stopper.stop();
    }

    /// Reads the configuration file again and applies it, as `warren reload` does; the outcome
    /// is logged too.
    pub fn reload(&self) -> control::Response {
        (self.reload)()
    }
}

/// `warren run`: starts the pool and waits for it to end. `on_start` receives a [`Handle`]
/// before any thread starts, for the caller's signal handlers. `workers` (`--workers`) overrides
/// `workers.count`, at start and at every reload.
pub fn daemon(
    mut config: Config,
    workers: Option<usize>,
    on_start: impl FnOnce(Handle),
) -> Result<u8, Failure> {
    if let Some(workers) = workers {
        if workers == 0 {
            return Err(Failure::Usage("--workers must be at least 1".into()));
        }
        config.workers.count = workers;
    }
    let handler = config.handler()?;
    let metrics = Pool::metrics_for(&config);
    let factory = factory::from_config(handler, &config.queue.name, &metrics);
    log::info!(
        "warren {} starting {} workers on queue {} at {} (handler {}, prefetch {})",
        env!("CARGO_PKG_VERSION"),
        config.workers.count,
        config.queue.name,
        config.broker.describe(),
        match handler.kind.argv() {
            None => handler.kind.name().to_string(),
            Some(argv) => format!("{} {argv:?}", handler.kind.name()),
        },
        config.workers.prefetch,
    );
    let config = Arc::new(config);
    let pool = Pool::with_metrics(Arc::clone(&config), factory, metrics)
        .map_err(|e| Failure::Software(format!("cannot set up the worker pool: {e}")))?;
    let config_error =
        |e: String| Failure::Config(ConfigError::new(format!("{}: {e}", config.path.display())));
    if let Some(listen) = config.metrics.listen {
        http::serve(listen, pool.metrics())
            .map_err(|e| config_error(format!("metrics.listen: {e}")))?;
    }
    // Dropped when the daemon returns: the poller's connection closes, the socket file goes.
    let _poller = match config.metrics.listen {
        Some(_) => depth::start(&config, pool.metrics())
            .map_err(|e| Failure::Software(format!("cannot start the queue depth poller: {e}")))?,
        None => None,
    };
    let reload = reloader(
        config.path.clone(),
        workers,
        pool.controller(),
        pool.metrics(),
    );
    let _control = {
        let (controller, reload) = (pool.controller(), Arc::clone(&reload));
        control::serve(&config.control, &config.path, move |command| {
            match command {
                control::Command::Pause => controller.ask(Request::Pause),
                control::Command::Resume => controller.ask(Request::Resume),
                control::Command::Reload => return reload(),
            }
            .map_err(refusal)
        })
        .map_err(config_error)?
    };
    on_start(Handle {
        stopper: pool.stopper(),
        reload,
    });
    let pool = pool
        .start()
        .map_err(|e| Failure::Software(format!("cannot start the supervisor thread: {e}")))?;
    match pool.wait() {
        Report::Clean => {
            log::info!("stopped cleanly");
            Ok(exit::OK)
        }
        Report::Abandoned { requeued, stuck } => {
            let mut parts = Vec::new();
            if !requeued.is_empty() {
                parts.push(format!(
                    "requeued unfinished messages: {}",
                    requeued.join(", ")
                ));
            }
            if !stuck.is_empty() {
                let names: Vec<_> = stuck.iter().map(|w| format!("worker-{w}")).collect();
                parts.push(format!(
                    "{} did not stop; the broker requeues what they held",
                    names.join(", ")
                ));
            }
            log::error!(
                "stopped after the shutdown grace ran out; {}",
                parts.join("; ")
            );
            Ok(exit::ABANDONED)
        }
        Report::Interrupted => Ok(exit::INTERRUPTED),
        Report::Fatal(e) => Err(Failure::Misconfigured(e.to_string())),
    }
}

/// How a refusal of the supervisor reaches the control socket's client.
fn refusal(declined: Declined) -> (Refusal, String) {
    match declined {
        Declined::Config(why) => (Refusal::Config, why),
        Declined::Busy(why) => (Refusal::Busy, why),
    }
}

/// The reload of the daemon of the configuration at `path`: reads the file as `warren run` does
/// (`--workers`, if given, still wins) and hands it to the supervisor. A file that does not load,
/// or whose handler program is missing, is refused with its one line, and the running
/// configuration stays. The new handlers count in the running pool's `metrics`.
fn reloader(
    path: PathBuf,
    workers: Option<usize>,
    controller: Controller,
    metrics: Arc<Metrics>,
) -> Arc<dyn Fn() -> control::Response + Send + Sync> {
    Arc::new(move || {
        let read = || -> Result<(Config, HandlerFactory), ConfigError> {
            let mut config = Config::load(&path, secrets::broker_url_override()?)?;
            if let Some(workers) = workers {
                config.workers.count = workers;
            }
            let factory = factory::from_config(config.handler()?, &config.queue.name, &metrics);
            Ok((config, factory))
        };
        let outcome = match read() {
            Ok((config, factory)) => controller
                .ask(Request::Reload {
                    config: Box::new(config),
                    factory,
                })
                .map_err(refusal),
            Err(e) => Err((Refusal::Config, e.to_string())),
        };
        if let Err((_, why)) = &outcome {
            log::error!("reload refused: {why}; the running configuration stays");
        }
        outcome
    })
}

/// `warren pause`, `warren resume` and `warren reload`: sends `command` to the running daemon of
/// `config` through its control socket, and returns the daemon's answer.
pub fn control_command(config: &Config, command: control::Command) -> Result<String, Failure> {
    control::send(&config.control, &config.path, command).map_err(|e| match e {
        control::SendError::Unreachable(why) => Failure::NotRunning(why),
        control::SendError::Declined(Refusal::Config, why) => {
            Failure::Config(ConfigError::new(why))
        }
        control::SendError::Declined(Refusal::Busy, why) => Failure::TempFail(why),
    })
}

/// `warren publish`: publishes `messages` with confirms and logs a summary line.
pub fn publish_messages(
    config: &Config,
    options: &publish::Options,
    messages: impl Iterator<Item = std::io::Result<Vec<u8>>>,
) -> Result<publish::Summary, Failure> {
    let summary = publish::publish(config, options, messages).map_err(|e| match e {
        publish::PublishError::Unavailable(e) if e.is_fatal() => {
            Failure::Misconfigured(e.to_string())
        }
        publish::PublishError::Unavailable(e) => Failure::Unavailable(e),
        publish::PublishError::Misconfigured(why) => Failure::Misconfigured(why),
        publish::PublishError::NotConfirmed(why) => Failure::TempFail(why),
        publish::PublishError::Input(e) => {
            Failure::Software(format!("cannot read standard input: {e}"))
        }
    })?;
    if let Some(path) = &options.metrics_file {
        // Labelled with the queue published to; through an exchange, with queue.name.
        let queue = match &options.target {
            publish::Target::Queue(queue) => queue,
            publish::Target::Exchange { .. } => &config.queue.name,
        };
        write_metrics_file(path, queue, summary.confirmed as u64)?;
    }
    let mut notes = match summary.skipped_empty {
        0 => String::new(),
        n => format!(" ({n} empty lines skipped)"),
    };
    if summary.republished > 0 {
        notes.push_str(&format!(
            " ({} published again after a lost connection: the queue may hold duplicates)",
            summary.republished
        ));
    }
    log::info!(
        " [x] published {} message{} to {}, all confirmed{notes}",
        summary.confirmed,
        if summary.confirmed == 1 { "" } else { "s" },
        options.target
    );
    Ok(summary)
}

/// Writes the published count to `path` the way node_exporter's textfile collector wants it:
/// to a temporary file beside it, then renamed, so that a scrape never reads half a file.
fn write_metrics_file(path: &Path, queue: &str, published: u64) -> Result<(), Failure> {
    let text = metrics::published_textfile(queue, published);
    let tmp = path.with_extension("prom.tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| Failure::Software(format!("cannot write {}: {e}", path.display())))
}
