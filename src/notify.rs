//! systemd's notify protocol: `READY=1` once every worker is consuming, a `STATUS=` line kept
//! current, `WATCHDOG=1` while the supervisor's loop runs, and `STOPPING=1` at shutdown.
//!
//! Only the supervisor thread talks to systemd, so a watchdog ping means that the thread which
//! restarts workers and handles signals is alive. Outside systemd (`NOTIFY_SOCKET` unset) every
//! call is a no-op; a failure to notify is logged at debug and never stops warren.

use std::time::{Duration, Instant};

use sd_notify::NotifyState;

use crate::metrics::Metrics;

/// How often the status line is refreshed when there is no watchdog to ping faster.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);

pub struct Notifier {
    /// Half of `WATCHDOG_USEC`, when systemd (or whoever started warren) asks for pings.
    watchdog: Option<Duration>,
    ready: bool,
    status: String,
    next: Instant,
}

impl Notifier {
    /// Reads `WATCHDOG_USEC`. `WATCHDOG_PID`, which systemd sets beside it, must name this
    /// process if it is set; unlike sd_notify's `watchdog_enabled`, a `WATCHDOG_USEC` alone (set
    /// by hand, outside systemd) is honoured too.
    pub fn from_env() -> Notifier {
        let pid_matches = std::env::var("WATCHDOG_PID")
            .map(|pid| pid.trim() == std::process::id().to_string())
            .unwrap_or(true);
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|usec| usec.trim().parse::<u64>().ok())
            .filter(|_| pid_matches)
            .map(|usec| Duration::from_micros(usec) / 2)
            .filter(|interval| !interval.is_zero());
        if let Some(interval) = watchdog {
            log::debug!("systemd watchdog: pinging every {interval:?}");
        }
        Notifier {
            watchdog,
            ready: false,
            status: String::new(),
            next: Instant::now(),
        }
    }

    /// When [`Notifier::tick`] is next due.
    pub fn deadline(&self) -> Instant {
        self.next
    }

    /// Sends what is due: the watchdog ping, `READY=1` the first time every worker is consuming,
    /// and the status line when it changed.
    pub fn tick(&mut self, metrics: &Metrics) {
        let mut states = Vec::new();
        let status = metrics.status();
        let (consuming, workers) = metrics.consuming();
        if !self.ready && consuming == workers {
            self.ready = true;
            states.push(NotifyState::Ready);
        }
        if status != self.status {
            states.push(NotifyState::Status(&status));
        }
        if self.watchdog.is_some() {
            states.push(NotifyState::Watchdog);
        }
        send(&states);
        self.status = status;
        self.next = Instant::now()
            + self
                .watchdog
                .unwrap_or(STATUS_INTERVAL)
                .min(STATUS_INTERVAL);
    }

    /// Tells systemd that warren is stopping.
    pub fn stopping(&mut self, metrics: &Metrics) {
        self.status = metrics.status();
        send(&[
            NotifyState::Stopping,
            NotifyState::Status(&format!("stopping; {}", self.status)),
        ]);
    }
}

fn send(states: &[NotifyState<'_>]) {
    if states.is_empty() {
        return;
    }
    if let Err(e) = sd_notify::notify(false, states) {
        log::debug!("cannot notify systemd: {e}");
    }
}
