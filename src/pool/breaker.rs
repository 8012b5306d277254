//! The circuit breaker: it decides, from the recent outcomes of all workers, when the handler's
//! dependency looks down (open: take no messages), when to try one message (half-open), and when
//! to take work again (closed).
//!
//! It is a pure state machine over the failures the workers report, the process's count of acked
//! tasks, and the time the supervisor passes in; the supervisor acts on what it returns. It never
//! touches a message: the messages of failed attempts are retried as ever, and the breaker only
//! says whether workers may take new ones.
//!
//! It keeps the last `outcomes` outcomes of all workers (an ack, or a failed attempt and its
//! message), forgetting those older than `window`, and trips when failures are at least
//! `failure_ratio` of them, at least `min_failures` of them, of at least `min_messages` different
//! messages. Counting outcomes rather than time, it trips as fast after hours of healthy work as
//! after none; asking for a large share of them, it leaves a handler that fails now and then
//! alone. A message that fails again and again is one message, so it never trips the breaker
//! alone. Messages are told apart by their message id, or by a hash of their body when they have
//! none.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config;

/// Where the breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Workers take messages.
    Closed,
    /// No worker takes messages; at `probe_at` one takes one.
    Open { probe_at: Instant },
    /// One worker is trying one message.
    HalfOpen { worker: usize },
}

/// What the breaker saw when it tripped, for the log and the status line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trip {
    pub failures: usize,
    pub messages: usize,
    /// The recent outcomes the failures are among.
    pub outcomes: usize,
    /// How long until the first probe.
    pub cooldown: Duration,
}

impl Trip {
    /// "17 of the last 20 outcomes failed, of 9 messages".
    pub fn describe(&self) -> String {
        format!(
            "{} of the last {} outcomes failed, of {} messages",
            self.failures, self.outcomes, self.messages
        )
    }
}

/// How a probe ended, as the worker that ran it reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// The message was acked.
    Succeeded,
    /// The attempt failed; the text says how.
    Failed(String),
    /// The outcome says nothing of the dependency (the message was dead-lettered for its own
    /// fault, or the task was abandoned at a stop).
    Inconclusive,
    /// The queue had no message to try.
    Empty,
    /// The worker ended (its connection was lost) before it could report.
    Lost,
}

pub struct Breaker {
    settings: config::BreakerConfig,
    state: State,
    /// The last `settings.outcomes` outcomes, oldest first: when, and the message of a failed
    /// attempt (`None` for an ack).
    recent: VecDeque<(Instant, Option<u64>)>,
    /// The process's acked count when the breaker last looked, to add the acks since.
    acked: u64,
    /// The cool-down of the last opening.
    cooldown: Duration,
    /// When it last closed, so that a trip soon after continues the backoff.
    closed_at: Option<Instant>,
    /// When the current outage began: the trip that opened it.
    opened_at: Option<Instant>,
}

impl Breaker {
    pub fn new(settings: config::BreakerConfig) -> Breaker {
        Breaker {
            cooldown: settings.cooldown,
            settings,
            state: State::Closed,
            recent: VecDeque::new(),
            acked: 0,
            closed_at: None,
            opened_at: None,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// When the current outage began, while the breaker is not closed.
    pub fn opened_at(&self) -> Option<Instant> {
        self.opened_at
    }

    /// New settings, from a reloaded configuration. A breaker that is turned off closes.
    pub fn configure(&mut self, settings: config::BreakerConfig) {
        if !settings.enabled {
            self.close(Instant::now());
        }
        self.settings = settings;
        self.trim();
    }

    /// Notes the tasks acked since the last look, given the process's acked count at `now`.
    /// The supervisor calls this at least once a second, and with every failure.
    pub fn sample(&mut self, now: Instant, acked: u64) {
        let new = acked.saturating_sub(self.acked);
        self.acked = acked;
        // More than the breaker keeps would only push each other out.
        for _ in 0..new.min(u64::from(self.settings.outcomes)) {
            self.recent.push_back((now, None));
        }
        self.trim();
        let start = now.checked_sub(self.settings.window);
        while (self.recent.front()).is_some_and(|&(t, _)| start.is_some_and(|start| t < start)) {
            self.recent.pop_front();
        }
    }

    /// A worker's attempt at `message` failed, at `now`, with `acked` tasks acked so far. Returns
    /// the trip if this failure opened the breaker.
    pub fn failed(&mut self, now: Instant, message: u64, acked: u64) -> Option<Trip> {
        self.sample(now, acked);
        self.recent.push_back((now, Some(message)));
        self.trim();
        if !self.settings.enabled || self.state != State::Closed {
            return None;
        }
        let mut failed: Vec<u64> = self.recent.iter().filter_map(|&(_, m)| m).collect();
        let failures = failed.len();
        failed.sort_unstable();
        failed.dedup();
        let (messages, outcomes) = (failed.len(), self.recent.len());
        let settings = &self.settings;
        let tripped = failures >= settings.min_failures as usize
            && messages >= settings.min_messages as usize
            && failures as f64 >= settings.failure_ratio * outcomes as f64;
        if !tripped {
            return None;
        }
        // A trip soon after the last close is the same outage: the cool-down keeps growing.
        self.cooldown = match self.closed_at {
            Some(closed) if now.saturating_duration_since(closed) < settings.window => {
                self.next_cooldown()
            }
            _ => settings.cooldown,
        };
        self.state = State::Open {
            probe_at: now + self.cooldown,
        };
        self.opened_at = Some(now);
        Some(Trip {
            failures,
            messages,
            outcomes,
            cooldown: self.cooldown,
        })
    }

    /// When a probe is due, while the breaker is open.
    pub fn probe_at(&self) -> Option<Instant> {
        match self.state {
            State::Open { probe_at } => Some(probe_at),
            _ => None,
        }
    }

    /// `worker` takes one message to probe.
    pub fn probing(&mut self, worker: usize) {
        self.state = State::HalfOpen { worker };
    }

    /// The probe's outcome. Returns the new state: closed after a success, open again with a
    /// longer cool-down after a failure, open with the same cool-down when the probe said
    /// nothing (no message, or an outcome that does not speak of the dependency).
    pub fn probed(&mut self, now: Instant, probe: &Probe) -> State {
        match probe {
            Probe::Succeeded => self.close(now),
            Probe::Failed(_) => {
                self.cooldown = self.next_cooldown();
                self.state = State::Open {
                    probe_at: now + self.cooldown,
                };
            }
            // Another message may say more, at once.
            Probe::Inconclusive => self.state = State::Open { probe_at: now },
            Probe::Empty | Probe::Lost => {
                self.state = State::Open {
                    probe_at: now + self.cooldown,
                }
            }
        }
        self.state
    }

    /// Closes the breaker (a probe succeeded, or the operator resumed): workers take messages
    /// again, and the outcomes seen so far are forgotten.
    pub fn close(&mut self, now: Instant) {
        if self.state != State::Closed {
            self.closed_at = Some(now);
        }
        self.state = State::Closed;
        self.opened_at = None;
        self.recent.clear();
    }

    /// The cool-down after the current one: doubled, at most `max_cooldown`.
    fn next_cooldown(&self) -> Duration {
        self.cooldown
            .saturating_mul(2)
            .clamp(self.settings.cooldown, self.settings.max_cooldown)
    }

    /// Keeps the last `outcomes` outcomes.
    fn trim(&mut self) {
        while self.recent.len() > self.settings.outcomes as usize {
            self.recent.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> config::BreakerConfig {
        config::BreakerConfig::default()
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn failures_of_several_messages_trip_it_at_the_fifth_when_nothing_succeeded() {
        let t = Instant::now();
        let mut breaker = Breaker::new(settings());
        for (i, message) in [1, 2, 3, 4].into_iter().enumerate() {
            assert_eq!(breaker.failed(t + secs(i as u64), message, 0), None);
        }
        let trip = breaker
            .failed(t + secs(4), 5, 0)
            .expect("the fifth failure trips it");
        assert_eq!(
            trip,
            Trip {
                failures: 5,
                messages: 5,
                outcomes: 5,
                cooldown: secs(5)
            }
        );
        assert_eq!(
            trip.describe(),
            "5 of the last 5 outcomes failed, of 5 messages"
        );
        assert_eq!(
            breaker.state(),
            State::Open {
                probe_at: t + secs(9)
            }
        );
    }

    #[test]
    fn after_hours_of_acks_it_trips_as_soon_as_failures_fill_the_recent_outcomes() {
        let t = Instant::now();
        let mut breaker = Breaker::new(settings());
        breaker.sample(t, 1_000_000);
        // 16 of the last 20 outcomes: the 16th failure trips it, whatever came before.
        for i in 0..15 {
            assert_eq!(breaker.failed(t + secs(1), i, 1_000_000), None);
        }
        let trip = breaker
            .failed(t + secs(1), 15, 1_000_000)
            .expect("16 of 20");
        assert_eq!((trip.failures, trip.outcomes), (16, 20));
    }

    #[test]
    fn a_handler_that_fails_now_and_then_never_trips_it() {
        let t = Instant::now();
        let mut breaker = Breaker::new(settings());
        // Two failures in three outcomes, for a long time: under the ratio of 80%.
        let mut acked = 0;
        for i in 0..1000 {
            if i % 3 == 2 {
                acked += 1;
                breaker.sample(t + Duration::from_millis(i), acked);
            } else {
                assert_eq!(breaker.failed(t + Duration::from_millis(i), i, acked), None);
            }
        }
    }

    #[test]
    fn one_message_failing_again_and_again_never_trips_it() {
        let t = Instant::now();
        let mut breaker = Breaker::new(settings());
        for i in 0..100 {
            assert_eq!(
                breaker.failed(t + Duration::from_millis(i * 10), 7, 0),
                None
            );
        }
        // Two poison messages are still fewer than min_messages.
        for i in 0..100 {
            assert_eq!(breaker.failed(t + secs(1), 7 + i % 2, 0), None);
        }
        assert_eq!(breaker.state(), State::Closed);
    }

    #[test]
    fn outcomes_older_than_the_window_are_forgotten() {
        let t = Instant::now();
        let mut breaker = Breaker::new(settings());
        for i in 0..4 {
            breaker.failed(t, i, 0);
        }
        assert_eq!(
            breaker.failed(t + secs(61), 9, 0),
            None,
            "the four are too old"
        );
        assert_eq!(breaker.recent.len(), 1);
    }

    #[test]
    fn a_failed_probe_doubles_the_cooldown_up_to_the_cap_and_a_success_closes_it() {
        let t = Instant::now();
        let mut breaker = Breaker::new(settings());
        for i in 0..5 {
            breaker.failed(t, i, 0);
        }
        let mut now = t;
        let mut waits = Vec::new();
        for _ in 0..6 {
            let at = breaker.probe_at().expect("open");
            waits.push(at - now);
            now = at;
            breaker.probing(1);
            assert_eq!(breaker.state(), State::HalfOpen { worker: 1 });
            breaker.probed(now, &Probe::Failed("exit status 1".into()));
        }
        assert_eq!(waits, [5, 10, 20, 40, 60, 60].map(secs));
        // An empty queue or a lost worker tries again after the same wait.
        breaker.probing(2);
        breaker.probed(now, &Probe::Empty);
        assert_eq!(breaker.probe_at(), Some(now + secs(60)));
        breaker.probing(2);
        assert_eq!(
            breaker.probed(now, &Probe::Inconclusive),
            State::Open { probe_at: now }
        );
        breaker.probing(2);
        assert_eq!(breaker.probed(now, &Probe::Succeeded), State::Closed);
        assert!(breaker.recent.is_empty(), "a closed breaker starts afresh");
    }

    #[test]
    fn a_trip_soon_after_closing_continues_the_backoff() {
        let t = Instant::now();
        let mut breaker = Breaker::new(settings());
        for i in 0..5 {
            breaker.failed(t, i, 0);
        }
        breaker.probing(1);
        breaker.probed(t + secs(5), &Probe::Failed("x".into()));
        breaker.probing(1);
        breaker.probed(t + secs(15), &Probe::Succeeded);
        let soon = (0..5).find_map(|i| breaker.failed(t + secs(20), 10 + i, 0));
        assert_eq!(soon.map(|trip| trip.cooldown), Some(secs(20)));
        breaker.close(t + secs(40));
        let later = (0..5).find_map(|i| breaker.failed(t + secs(200), 20 + i, 0));
        assert_eq!(later.map(|trip| trip.cooldown), Some(secs(5)));
    }

    #[test]
    fn a_disabled_breaker_never_trips() {
        let t = Instant::now();
        let mut breaker = Breaker::new(config::BreakerConfig {
            enabled: false,
            ..settings()
        });
        for i in 0..50 {
            assert_eq!(breaker.failed(t, i, 0), None);
        }
    }
}
