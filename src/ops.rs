//! The operator's commands, run from a worker host: `warren check-config` (the configuration as
//! `warren run` reads it, with passwords masked, and with `--connect` the broker, the queues and
//! the handler program checked), `warren stats` (ready messages and consumers of every queue of
//! the [`Topology`]) and `warren dead-letters list | requeue | purge`.
//!
//! None of them creates a queue (they look with passive declares) or consumes the work queue, and
//! only `dead-letters purge` deletes messages. A message taken from the dead-letter queue is held
//! unacked until it is put back or its copy in the work queue is confirmed, so a crash at any
//! point leaves it in the dead-letter queue, or in both queues, and never in neither. Broker calls
//! are in `amqp.rs` and header names in `retry.rs`; this module decides what to look at, writes
//! what it finds to the given output, and sorts failures into exit codes.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::io::Write;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{select, Receiver, TryRecvError};

use crate::amqp::{AmqpError, Confirmed, Header, QueueSpec, QueueState, Session};
use crate::config::{self, Config, HandlerConfig, HandlerKind, UrlSource};
use crate::retry::{self, Needed, Topology};
use crate::{exit, Failure};

/// How often `warren stats --watch` refreshes.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// How long `dead-letters requeue` waits for the broker to confirm one copy (time blocked by a
/// broker alarm does not count), as a worker waits for a retry's copy.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// `warren check-config`: checks `config` as `warren run` does (the caller has loaded it with
/// [`crate::load_config`]), writes the effective configuration to `out`, and with `connect`
/// checks the broker nodes, the queues and the handler program, one line each.
///
/// Returns [`exit::CHECK_FAILED`] if a check failed; an unreachable broker is
/// [`Failure::Unavailable`] and a refused login [`Failure::Misconfigured`].
pub fn check_config(config: &Config, connect: bool, out: &mut dyn Write) -> Result<u8, Failure> {
    let handler = config.handler()?;
    emit(out, &effective(config, handler))?;
    if !connect {
        return Ok(exit::OK);
    }
    let mut checks = Checks::default();
    emit(out, "\n")?;
    let program = match handler.kind.argv() {
        None => Ok("kind dots runs no program".to_string()),
        Some(argv) => config::resolve_program(&argv[0])
            .map(|path| format!("program {} exists and is executable", path.display())),
    };
    checks.report(out, "handler", program)?;

    let name = format!("warren check-config pid {}", std::process::id());
    let mut session = None;
    let mut unreachable = None;
    for (node, url) in config.broker.urls.iter().enumerate() {
        match Session::open(&config.broker, node, &name) {
            Ok(opened) => {
                checks.report(out, &format!("node {url}"), Ok("connected".to_string()))?;
                match session {
                    None => session = Some(opened),
                    Some(_) => close(opened),
                }
            }
            Err(e) => {
                checks.report(out, &format!("node {url}"), Err(e.to_string()))?;
                if e.is_fatal() {
                    return Err(Failure::Misconfigured(e.to_string()));
                }
                unreachable = Some(e);
            }
        }
    }
    let Some(mut session) = session else {
        return Err(Failure::Unavailable(
            unreachable.expect("invariant: a config names at least one node"),
        ));
    };
    let topology = Topology::new(&config.queue, &config.retry);
    // With queue.declare = false nothing missing will be declared: each line says what the
    // operator must make, as `warren run` would when it refuses to start.
    let declare = config.queue.declare;
    let must_make = |needed: &Needed<'_>| {
        format!(
            "missing; queue.declare = false, so the operator must make it: {}",
            needed.properties()
        )
    };
    for needed in topology.needed() {
        let (what, found) = match needed {
            Needed::Queue { kind, spec } => {
                let found = match session.inspect(&spec.name).map_err(broker)? {
                    Some(state) => Ok(format!(
                        "exists, {} ready, {} consumers",
                        state.ready, state.consumers
                    )),
                    None if declare => {
                        Err("missing; warren run declares it when it starts".to_string())
                    }
                    None => Err(must_make(&needed)),
                };
                let kind = if kind == "dead" { "dead-letter" } else { kind };
                (format!("{kind} queue {}", spec.name), found)
            }
            // warren run declares the exchanges it is to bind to; they are checked only when it
            // may not.
            Needed::Exchange(_) if declare => continue,
            Needed::Exchange(binding) => {
                let found = match session.exists(needed.lookup()).map_err(broker)? {
                    true => Ok("exists".to_string()),
                    false => Err(must_make(&needed)),
                };
                (format!("exchange {}", binding.exchange), found)
            }
        };
        checks.report(out, &what, found)?;
    }
    close(session);
    let summary = match checks.failed {
        0 => format!("all {} checks passed\n", checks.run),
        failed => format!("{failed} of {} checks failed\n", checks.run),
    };
    emit(out, &summary)?;
    Ok(if checks.failed == 0 {
        exit::OK
    } else {
        exit::CHECK_FAILED
    })
}

/// Counts the checks of `check-config --connect` as it writes them.
#[derive(Default)]
struct Checks {
    run: usize,
    failed: usize,
}

impl Checks {
    fn report(
        &mut self,
        out: &mut dyn Write,
        what: &str,
        found: Result<String, String>,
    ) -> Result<(), Failure> {
        self.run += 1;
        let line = match found {
            Ok(found) => format!("ok    {what}: {found}\n"),
            Err(problem) => {
                self.failed += 1;
                format!("FAIL  {what}: {problem}\n")
            }
        };
        emit(out, &line)
    }
}

/// The configuration as TOML, with every default filled in and every password masked: what
/// `warren run` would use.
fn effective(config: &Config, handler: &HandlerConfig) -> String {
    let mut shown = config.clone();
    let mut handler = handler.clone();
    if let HandlerKind::Command { argv, .. } | HandlerKind::Pipe { argv, .. } = &mut handler.kind {
        for arg in argv {
            *arg = mask(config, arg);
        }
    }
    shown.handler = Some(handler);
    let toml = toml::to_string(&shown).expect("invariant: a configuration serializes as TOML");
    let mut document: toml_edit::DocumentMut =
        toml.parse().expect("invariant: serialized TOML parses");

    // What the keys cannot say, as a comment under the table's header.
    let mut notes: Vec<(&[&str], String)> = Vec::new();
    if config.broker.url_source != UrlSource::File {
        let source = &config.broker.url_source;
        let note = format!("From {source} (it overrides the file).");
        notes.push((&["broker"], note));
    }
    if let Some(tls) = &config.broker.tls {
        if tls.settings.ca_file.is_none() {
            let note = "No ca_file: the system's CAs are trusted.".to_string();
            notes.push((&["broker", "tls"], note));
        }
    }
    let argv = shown.handler.as_ref().and_then(|h| h.kind.argv());
    if let Some(program) = argv.map(|argv| &argv[0]) {
        if let (false, Ok(path)) = (program.contains('/'), config::resolve_program(program)) {
            let note = format!("The program found in PATH: {}", path.display());
            notes.push((&["handler"], note));
        }
    }
    let topology = Topology::new(&config.queue, &config.retry);
    let retries: Vec<&str> = topology.retries.iter().map(|q| q.name.as_str()).collect();
    if !retries.is_empty() {
        notes.push((&["retry"], format!("Retry queues: {}.", retries.join(", "))));
    }
    if !config.control.explicit {
        let socket = config.control.socket.display();
        let note = format!("socket is not set: named after the file, {socket:?}.");
        notes.push((&["control"], note));
    }
    if config.metrics.listen.is_none() {
        let note = "listen is not set: no HTTP endpoint.".to_string();
        notes.push((&["metrics"], note));
    }
    for (path, note) in notes {
        let table = path.iter().try_fold(document.as_table_mut(), |table, key| {
            table.get_mut(key).and_then(|item| item.as_table_mut())
        });
        // The header's suffix is written as it is, after the `]`.
        let table = table.expect("invariant: every note's table is serialized");
        table
            .decor_mut()
            .set_suffix(format!("\n# {}", one_line(&note)));
    }

    format!(
        "# The configuration warren run would use, read from {}: every default filled in,\n\
         # every password shown as ***.\n\n{document}",
        config.path.display()
    )
}

/// `text` on one line, so that it stays inside a comment.
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

/// `text` with the password of every `scheme://user:password@` URL in it, and the broker's
/// passwords wherever they appear, replaced by `***`. For the handler's command line, which may
/// carry a URL of its own.
fn mask(config: &Config, text: &str) -> String {
    let mut masked = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        masked.push_str(head);
        let end = tail
            .find(|c: char| matches!(c, '/' | '?' | '#') || c.is_whitespace())
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        let secret = authority
            .rfind('@')
            .and_then(|at| authority[..at].find(':').map(|colon| (colon, at)));
        match secret {
            Some((colon, at)) => {
                masked.push_str(&authority[..=colon]);
                masked.push_str("***");
                masked.push_str(&authority[at..]);
            }
            None => masked.push_str(authority),
        }
        rest = &tail[end..];
    }
    masked.push_str(rest);
    config
        .broker
        .urls
        .iter()
        .fold(masked, |text, url| url.redact(&text))
}

/// `warren stats`: ready messages and consumers of the work queue, its retry queues and its
/// dead-letter queue, and the node that answered. With `watch`, again every second, with the
/// change in ready messages per second since the last refresh, until `stop` disconnects; a lost
/// broker is then reported and reconnected to at the next refresh.
pub fn stats(
    config: &Config,
    watch: bool,
    stop: &Receiver<Infallible>,
    out: &mut dyn Write,
) -> Result<u8, Failure> {
    let topology = Topology::new(&config.queue, &config.retry);
    let queues = topology.kinds();
    // The first connection must work, with or without --watch: a wrong URL fails at once.
    let mut session = Some(open_any(config, "stats")?);
    let mut previous: Option<(Instant, Vec<Option<QueueState>>)> = None;
    let start = Instant::now();
    let mut refreshes: u32 = 0;
    loop {
        let now = Instant::now();
        match refresh(config, &mut session, &queues) {
            Ok((node, states)) => {
                let rates = watch.then(|| match &previous {
                    Some((then, before)) => {
                        rates(before, &states, now.duration_since(*then).as_secs_f64())
                    }
                    None => Vec::new(),
                });
                emit(out, &table(&node, &queues, &states, rates.as_deref()))?;
                previous = Some((now, states));
            }
            Err(failure) if !watch => return Err(failure),
            Err(failure) => {
                // Whatever went wrong, the next refresh starts from a fresh connection.
                if let Some((session, _)) = session.take() {
                    close(session);
                }
                previous = None;
                emit(out, &format!("{} {failure}; trying again\n\n", timestamp()))?;
            }
        }
        if !watch {
            break;
        }
        refreshes += 1;
        let next = start + WATCH_INTERVAL * refreshes;
        select! {
            recv(stop) -> _ => break,
            default(next.saturating_duration_since(Instant::now())) => {}
        }
    }
    if let Some((session, _)) = session {
        close(session);
    }
    Ok(exit::OK)
}

/// The node that answered and the state of each of `queues`, connecting first if `session` is
/// `None`.
fn refresh(
    config: &Config,
    session: &mut Option<(Session, usize)>,
    queues: &[(&str, &QueueSpec)],
) -> Result<(String, Vec<Option<QueueState>>), Failure> {
    if session.is_none() {
        *session = Some(open_any(config, "stats")?);
    }
    let (open, _) = session
        .as_mut()
        .expect("invariant: the session was opened just above");
    let states = read_states(open, queues).map_err(broker)?;
    Ok((open.address(), states))
}

/// The state of each queue, `None` for a queue that does not exist.
fn read_states(
    session: &mut Session,
    queues: &[(&str, &QueueSpec)],
) -> Result<Vec<Option<QueueState>>, AmqpError> {
    queues
        .iter()
        .map(|(_, spec)| session.inspect(&spec.name))
        .collect()
}

/// Ready messages gained (positive) or lost (negative) per second, per queue; `None` where a
/// queue is missing now or was before.
fn rates(
    before: &[Option<QueueState>],
    now: &[Option<QueueState>],
    seconds: f64,
) -> Vec<Option<f64>> {
    before
        .iter()
        .zip(now)
        .map(|(before, now)| match (before, now) {
            (Some(before), Some(now)) if seconds > 0.0 => {
                Some((f64::from(now.ready) - f64::from(before.ready)) / seconds)
            }
            _ => None,
        })
        .collect()
}

/// One refresh of `warren stats`: a line with the time and the node, then one row per queue.
/// `rates` is `Some` under `--watch` (empty on the first refresh, which has nothing to compare
/// with).
fn table(
    node: &str,
    queues: &[(&str, &QueueSpec)],
    states: &[Option<QueueState>],
    rates: Option<&[Option<f64>]>,
) -> String {
    let width = queues
        .iter()
        .map(|(_, spec)| spec.name.len())
        .max()
        .unwrap_or(0)
        .max("QUEUE".len());
    let mut text = format!("{} broker {node}\n", timestamp());
    text.push_str(&format!(
        "{:<width$}  {:<5}  {:>7}  {:>9}",
        "QUEUE", "KIND", "READY", "CONSUMERS"
    ));
    if rates.is_some() {
        text.push_str(&format!("  {:>8}", "READY/S"));
    }
    text.push('\n');
    for (i, ((kind, spec), state)) in queues.iter().zip(states).enumerate() {
        let (ready, consumers) = match state {
            Some(state) => (state.ready.to_string(), state.consumers.to_string()),
            None => ("missing".to_string(), "-".to_string()),
        };
        text.push_str(&format!(
            "{:<width$}  {kind:<5}  {ready:>7}  {consumers:>9}",
            spec.name
        ));
        if let Some(rates) = rates {
            let rate = match rates.get(i).copied().flatten() {
                Some(rate) => format!("{rate:+.1}"),
                None => "-".to_string(),
            };
            text.push_str(&format!("  {rate:>8}"));
        }
        text.push('\n');
    }
    text.push('\n');
    text
}

/// `warren dead-letters list`: writes up to `limit` messages of the dead-letter queue, one line
/// each, and leaves every one of them in the queue. They are taken unacked and put back
/// (requeued) before anything is written, so their order in the queue may change.
pub fn list(config: &Config, limit: u32, out: &mut dyn Write) -> Result<u8, Failure> {
    let dead = &config.queue.dead_letter;
    let (mut session, _) = open_any(config, "dead-letters list")?;
    let Some(state) = session.inspect(dead).map_err(broker)? else {
        return Ok(missing(config, dead, "dead-letter"));
    };
    let mut text = String::new();
    let mut held = Vec::new();
    // At most the messages that were there at the start: those taken stay unacked, so the loop
    // ends even if warren keeps dead-lettering meanwhile.
    while held.len() < state.ready.min(limit) as usize {
        match session.hold(dead).map_err(broker)? {
            Some(message) => {
                text.push_str(&describe(message.delivery()));
                held.push(message);
            }
            None => break,
        }
    }
    let shown = held.len();
    for message in held {
        message.requeue().map_err(broker)?;
    }
    close(session);
    text.push_str(&match (shown, state.ready) {
        (0, _) => format!("dead-letter queue {dead} is empty\n"),
        (shown, ready) if shown as u32 >= ready => format!(
            "listed all {shown} messages of dead-letter queue {dead}; they are all still there\n"
        ),
        (shown, ready) => format!(
            "listed {shown} of {ready} messages of dead-letter queue {dead} (--limit shows more); \
             they are all still there\n"
        ),
    });
    emit(out, &text)?;
    Ok(exit::OK)
}

/// One line about a dead-lettered message: its id, warren's headers and a body preview.
fn describe(delivery: &crate::amqp::Delivery) -> String {
    let show = |name: &str| match delivery.header(name) {
        None => "-".to_string(),
        Some(Header::Int(i)) => i.to_string(),
        Some(Header::Str(s)) | Some(Header::Other(s)) => quote(&s),
    };
    let reason = match delivery.header(retry::REASON) {
        // A message over a quorum queue's delivery limit is dead-lettered by the broker, which
        // sets only its own x-death.
        None if delivery.header(retry::DEATH).is_some() => {
            quote("dead-lettered by the broker (see its x-death header)")
        }
        _ => show(retry::REASON),
    };
    format!(
        "id={} attempts={} dead-lettered-at={} reason={reason} exit-status={} queue={} body={}\n",
        delivery.message_id().map_or("-".to_string(), quote),
        show(retry::ATTEMPTS),
        show(retry::DEAD_LETTERED_AT),
        show(retry::EXIT_STATUS),
        show(retry::QUEUE),
        crate::logging::preview(delivery.body()),
    )
}

/// `text` in double quotes, with quotes, backslashes and control characters escaped, so that one
/// message stays on one line.
fn quote(text: &str) -> String {
    let mut quoted = String::from("\"");
    for c in text.chars() {
        match c {
            '"' | '\\' => {
                quoted.push('\\');
                quoted.push(c);
            }
            c if c.is_control() => quoted.extend(c.escape_default()),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

/// What `warren dead-letters requeue` moves.
#[derive(Debug, Clone, Default)]
pub struct Requeue {
    /// Move at most this many; `None` for every message in the queue when it starts.
    pub limit: Option<u32>,
    /// Move only messages with these message ids (all of them, if one id is there twice);
    /// empty for any message.
    pub ids: Vec<String>,
    /// For tests only: a pause between a copy's confirm and the ack of its original, so that a
    /// test can kill warren in between. Changes nothing else.
    pub pause_after_confirm: Option<Duration>,
}

/// `warren dead-letters requeue`: moves messages from the dead-letter queue back to the work
/// queue. Each original is held unacked while its copy, without the headers of
/// [`retry::RESET_ON_REQUEUE`], is published with a confirm on a second connection; it is acked
/// only once the copy is confirmed. Messages that `options.ids` does not select are held too (so
/// that they are not taken again) and put back at the end. Stops when `stop` disconnects (exit
/// 130): between two messages, or at once while it waits for a confirm.
pub fn requeue(
    config: &Config,
    options: &Requeue,
    stop: &Receiver<Infallible>,
    out: &mut dyn Write,
) -> Result<u8, Failure> {
    let topology = Topology::new(&config.queue, &config.retry);
    let (dead, work) = (&topology.dead.name, &topology.work.name);
    let (mut source, node) = open_any(config, "dead-letters requeue")?;
    let Some(state) = source.inspect(dead).map_err(broker)? else {
        return Ok(missing(config, dead, "dead-letter"));
    };
    if source.inspect(work).map_err(broker)?.is_none() {
        return Ok(missing(config, work, "work"));
    }
    // The copies go out on a connection of their own: a broker alarm blocks a connection that
    // publishes, and the acks that remove the originals must not wait behind it.
    let name = format!(
        "warren dead-letters requeue publisher pid {}",
        std::process::id()
    );
    let target = Session::open(&config.broker, node, &name).map_err(broker)?;
    let mut moved = Moved::default();
    let ended = move_back(
        &source,
        &target,
        dead,
        work,
        state.ready,
        options,
        stop,
        &mut moved,
    );
    close(target);
    close(source);

    let mut text = format!(
        "moved {} message{} from dead-letter queue {dead} to work queue {work}",
        moved.count,
        if moved.count == 1 { "" } else { "s" }
    );
    let code = match ended {
        Ok(Ended::Done) => {
            text.push('\n');
            emit(out, &text)?;
            let missed: Vec<&str> = options
                .ids
                .iter()
                .filter(|id| !moved.ids.contains(*id))
                .map(String::as_str)
                .collect();
            if missed.is_empty() {
                exit::OK
            } else {
                log::error!(
                    "no message with id {} in dead-letter queue {dead}",
                    missed.join(", ")
                );
                exit::CHECK_FAILED
            }
        }
        Ok(Ended::Interrupted) => {
            text.push_str(" before it was stopped; the others are still there\n");
            emit(out, &text)?;
            exit::INTERRUPTED
        }
        Ok(Ended::NotStored(why)) => {
            text.push_str(" before it had to stop; the others are still there\n");
            emit(out, &text)?;
            return Err(Failure::TempFail(why));
        }
        Err(e) => {
            text.push_str(" before the broker connection failed; the others are still there\n");
            emit(out, &text)?;
            return Err(broker(e));
        }
    };
    Ok(code)
}

/// What `dead-letters requeue` has moved so far.
#[derive(Default)]
struct Moved {
    count: u32,
    /// The message ids of the messages moved.
    ids: BTreeSet<String>,
}

/// Why `move_back` stopped, when the broker connection did not fail.
enum Ended {
    /// The limit was reached, or every message there at the start was looked at.
    Done,
    Interrupted,
    /// The broker refused a copy, or did not confirm it in time; its original was put back.
    NotStored(String),
}

/// The loop of `dead-letters requeue`: takes up to `budget` messages from `dead`, moves those
/// that `options` selects to `work` and puts the others back, counting into `moved` as it goes.
#[allow(clippy::too_many_arguments)]
fn move_back(
    source: &Session,
    target: &Session,
    dead: &str,
    work: &str,
    budget: u32,
    options: &Requeue,
    stop: &Receiver<Infallible>,
    moved: &mut Moved,
) -> Result<Ended, AmqpError> {
    let mut publisher = target.publisher()?;
    let mut kept = Vec::new();
    let mut taken = 0;
    let ended = loop {
        if taken >= budget || options.limit.is_some_and(|limit| moved.count >= limit) {
            break Ended::Done;
        }
        if !matches!(stop.try_recv(), Err(TryRecvError::Empty)) {
            break Ended::Interrupted;
        }
        let Some(message) = source.hold(dead)? else {
            break Ended::Done;
        };
        taken += 1;
        let id = message
            .delivery()
            .message_id()
            .unwrap_or_default()
            .to_string();
        if !options.ids.is_empty() && !options.ids.contains(&id) {
            kept.push(message);
            continue;
        }
        let confirmed = publisher.republish_and_wait(
            message.delivery(),
            work,
            Vec::new(),
            retry::RESET_ON_REQUEUE,
            CONFIRM_TIMEOUT,
            stop,
        )?;
        let shown = if id.is_empty() { "-" } else { id.as_str() };
        match confirmed {
            Confirmed::Stored => {
                if let Some(pause) = options.pause_after_confirm {
                    thread::sleep(pause);
                }
                message.ack()?;
                moved.count += 1;
                moved.ids.insert(id);
            }
            Confirmed::NotStored(why) | Confirmed::Returned(why) => {
                message.requeue()?;
                break Ended::NotStored(format!(
                    "the broker did not store the copy of {shown} in work queue {work}: {why}"
                ));
            }
            // A stop signal ends the wait too, so that Ctrl+C works even while a broker alarm
            // holds the confirm back. The copy may still be stored: that message may then be
            // in both queues.
            Confirmed::TimedOut if !matches!(stop.try_recv(), Err(TryRecvError::Empty)) => {
                message.requeue()?;
                break Ended::Interrupted;
            }
            Confirmed::TimedOut => {
                message.requeue()?;
                break Ended::NotStored(format!(
                    "the broker did not confirm the copy of {shown} in work queue {work} within \
                     {}; it may be there as well as in the dead-letter queue",
                    humantime::format_duration(CONFIRM_TIMEOUT)
                ));
            }
        }
    };
    for message in kept {
        message.requeue()?;
    }
    Ok(ended)
}

/// `warren dead-letters purge`: deletes every ready message of the dead-letter queue, only when
/// `yes` is given (otherwise [`Failure::Usage`], before connecting).
pub fn purge(config: &Config, yes: bool, out: &mut dyn Write) -> Result<u8, Failure> {
    let dead = &config.queue.dead_letter;
    if !yes {
        return Err(Failure::Usage(format!(
            "dead-letters purge deletes every message in dead-letter queue {dead} for good; \
             add --yes to do it"
        )));
    }
    let (mut session, _) = open_any(config, "dead-letters purge")?;
    if session.inspect(dead).map_err(broker)?.is_none() {
        return Ok(missing(config, dead, "dead-letter"));
    }
    let deleted = session.purge(dead).map_err(broker)?;
    close(session);
    emit(
        out,
        &format!(
            "deleted {deleted} message{} from dead-letter queue {dead}\n",
            if deleted == 1 { "" } else { "s" }
        ),
    )?;
    Ok(exit::OK)
}

/// Connects to the first of the broker's nodes that answers, and returns the session and the
/// node's number.
fn open_any(config: &Config, command: &str) -> Result<(Session, usize), Failure> {
    let name = format!("warren {command} pid {}", std::process::id());
    Session::open_any(&config.broker, &name).map_err(broker)
}

/// A broker error as a failure: refused (exit 78) if retrying cannot help, else unavailable (69).
fn broker(e: AmqpError) -> Failure {
    if e.is_fatal() {
        Failure::Misconfigured(e.to_string())
    } else {
        Failure::Unavailable(e)
    }
}

/// Logs that `queue` does not exist and returns the exit code for it.
fn missing(config: &Config, queue: &str, kind: &str) -> u8 {
    let who = if config.queue.declare {
        "warren run declares it when it starts"
    } else {
        "queue.declare = false: the operator must make it (warren check-config --connect says how)"
    };
    log::error!("{kind} queue {queue} does not exist; {who}");
    exit::CHECK_FAILED
}

/// Closes a session that is no longer needed. The work is done by then: a failure to close it
/// cleanly changes nothing but is worth a debug line.
fn close(session: Session) {
    if let Err(e) = session.close() {
        log::debug!("closing the connection: {e}");
    }
}

fn emit(out: &mut dyn Write, text: &str) -> Result<(), Failure> {
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| Failure::Software(format!("cannot write to standard output: {e}")))
}

fn timestamp() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn parse(text: &str) -> Config {
        Config::parse(Path::new("w.toml"), text, None).unwrap()
    }

    #[test]
    fn the_printed_configuration_reads_back_as_the_same_configuration() {
        let text = "[broker]\nurls = [\"amqp://u:pw@n1\", \"amqp://u:pw@n2:5673/v\"]\nheartbeat = \"0\"\n\
                    [queue]\nname = \"jobs\"\ntype = \"quorum\"\n\
                    [handler]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", \"set -e\\n\\n[handler]\\ntrue\"]\ntimeout = \"20m 30s\"\n\
                    [retry]\ndelay = \"250ms\"\n[metrics]\nlisten = \"127.0.0.1:9187\"\n\
                    [[queue.bindings]]\nexchange = \"orders\"\ntype = \"topic\"\nrouting_keys = [\"a.*\"]\n\
                    [[queue.bindings]]\nexchange = \"h\"\ntype = \"headers\"\ndurable = false\narguments = { \"x-match\" = \"any\", n = 1 }\n";
        let config = parse(text);
        let printed = effective(&config, config.handler.as_ref().unwrap());
        assert!(!printed.contains("pw"), "{printed}");
        let back = parse(&printed.replace("***", "pw"));
        assert_eq!(format!("{back:?}"), format!("{config:?}"));

        // The keys of the topology: warren's declare, consumer priority and queue arguments.
        for text in [
            "[queue]\nname = \"jobs\"\nconsumer_priority = -2\narguments = { \"x-single-active-consumer\" = true }\n\
             [[queue.bindings]]\nexchange = \"orders\"\ntype = \"topic\"\nrouting_keys = [\"a.*\"]\n[handler]\nkind = \"dots\"\n",
            "[queue]\nname = \"jobs\"\ndeclare = false\nconsumer_priority = 7\n[handler]\nkind = \"dots\"\n",
        ] {
            let config = parse(text);
            let printed = effective(&config, config.handler.as_ref().unwrap());
            assert!(printed.contains("\ndeclare = "), "{printed}");
            assert!(printed.contains("\nconsumer_priority = "), "{printed}");
            let back = parse(&printed);
            assert_eq!(format!("{back:?}"), format!("{config:?}"), "{printed}");
        }
    }

    #[test]
    fn the_printed_tls_settings_read_back_as_the_same() {
        let text = "[broker]\nurl = \"amqps://u:pw@rabbit\"\n[broker.tls]\nserver_name = \"rabbit.internal\"\n\
                    [queue]\nname = \"jobs\"\n[handler]\nkind = \"dots\"\n";
        let config = parse(text);
        let printed = effective(&config, config.handler.as_ref().unwrap());
        assert!(
            printed.contains("[broker.tls]\n# No ca_file: the system's CAs are trusted.\nserver_name = \"rabbit.internal\"\n"),
            "{printed}"
        );
        let back = parse(&printed.replace("***", "pw"));
        assert_eq!(format!("{back:?}"), format!("{config:?}"));
    }

    #[test]
    fn the_printed_configuration_says_where_the_broker_url_came_from() {
        let text = "[broker]\nurl = \"amqp://u:pw@file\"\n[queue]\nname = \"q\"\n[handler]\nkind = \"dots\"\n";
        let printed = |source: Option<UrlSource>| {
            let url_override = source.map(|source| config::UrlOverride {
                urls: "amqp://u:pw@elsewhere".into(),
                source,
            });
            let config = Config::parse(Path::new("w.toml"), text, url_override).unwrap();
            effective(&config, config.handler.as_ref().unwrap())
        };
        assert!(!printed(None).contains("# From"));
        let credential = UrlSource::Credential("/run/credentials/w/broker-url".into());
        assert!(printed(Some(credential)).contains(
            "[broker]\n# From the systemd credential /run/credentials/w/broker-url (it overrides the file).\nurl = \"amqp://u:***@elsewhere\"\n"
        ));
        assert!(printed(Some(UrlSource::Environment))
            .contains("[broker]\n# From WARREN_BROKER_URL (it overrides the file).\n"));
    }

    #[test]
    fn passwords_in_the_command_line_are_masked() {
        let config = parse("[broker]\nurl = \"amqp://u:hunter2@h\"\n[queue]\nname = \"q\"\n");
        assert_eq!(
            mask(
                &config,
                "--db=postgres://app:s3cr3t@db:5432/x --again hunter2 http://h/p"
            ),
            "--db=postgres://app:***@db:5432/x --again *** http://h/p"
        );
        assert_eq!(mask(&config, "https://user@h/p"), "https://user@h/p");
    }

    #[test]
    fn rates_are_the_change_in_ready_messages_per_second() {
        let state = |ready| {
            Some(QueueState {
                ready,
                consumers: 0,
            })
        };
        assert_eq!(
            rates(
                &[state(10), state(0), None],
                &[state(4), state(3), state(1)],
                2.0
            ),
            [Some(-3.0), Some(1.5), None]
        );
    }

    #[test]
    fn a_header_value_stays_on_one_line() {
        assert_eq!(quote("a \"b\"\n\\"), r#""a \"b\"\n\\""#);
    }
}
