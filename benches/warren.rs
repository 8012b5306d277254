//! The full benchmark: `warren run` measured from the outside, as a separate process with its
//! log in a file, the way it runs in production; and, in the same sitting and the same way, a
//! baseline that is nothing but an amiquip consume loop, so that every figure can be read as a
//! ratio to what the client library and the broker allow on this machine. The `consume` part
//! also holds the `command` handler against amqp-consume running the same program per message,
//! the stock tool for the job. `benches/driver/` does the measuring; this file picks the
//! scenarios, interleaves their runs round by round, and prints the report. BENCHMARKS.md says what each figure means and holds the results.
//!
//! Run: `cargo bench --bench warren` (all parts, about five minutes), or some of them with
//! `cargo bench --bench warren -- --messages 20000 --runs 3 --only drain,command,consume,pipe,publish,memory,idle,tls`.
//! The report is Markdown on standard output; progress goes to standard error.

mod driver;
// The tests' helpers, for the extra RabbitMQ node with a TLS listener that the tls part starts.
#[path = "../tests/util/mod.rs"]
mod util;

use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::Duration;

use driver::{Consumer, Error, Measurement, Memory, Scenario};

/// Lines piped to `warren publish --stdin` in each publish run.
const PUBLISH_LINES: usize = 100_000;
/// Tasks drained between the two memory readings.
const MEMORY_MESSAGES: usize = 100_000;
/// The idle CPU measurement window.
const IDLE_WINDOW: Duration = Duration::from_secs(30);
/// The note printed when the pipe handler cannot be measured (yet).
const PIPE_SKIPPED: &str =
    "pipe: skipped (examples/pipe_handler.py missing or kind pipe not supported)";
const DOTS: &str = "kind = \"dots\"";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    Drain,
    Command,
    Consume,
    Pipe,
    Publish,
    Memory,
    Idle,
    Tls,
}

const PARTS: [(&str, Part); 8] = [
    ("drain", Part::Drain),
    ("command", Part::Command),
    ("consume", Part::Consume),
    ("pipe", Part::Pipe),
    ("publish", Part::Publish),
    ("memory", Part::Memory),
    ("idle", Part::Idle),
    ("tls", Part::Tls),
];

struct Flags {
    /// Messages per drain run of the dots handler and the baseline.
    messages: usize,
    runs: usize,
    only: Vec<Part>,
}

fn main() -> ExitCode {
    driver::baseline_worker_if_asked();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warren bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let flags = flags()?;
    println!("{}\n", machine()?);
    let wants = |part| flags.only.contains(&part);
    if [Part::Drain, Part::Command, Part::Consume, Part::Pipe]
        .into_iter()
        .any(wants)
    {
        drain_table(&flags)?;
    }
    if wants(Part::Publish) {
        publish(&flags)?;
    }
    if wants(Part::Memory) {
        memory()?;
    }
    if wants(Part::Idle) {
        idle()?;
    }
    if wants(Part::Tls) {
        tls(&flags)?;
    }
    Ok(())
}

fn flags() -> Result<Flags, String> {
    let usage =
        "use --messages N, --runs N, --only drain,command,consume,pipe,publish,memory,idle,tls";
    let mut flags = Flags {
        messages: 20_000,
        runs: 3,
        only: PARTS.iter().map(|&(_, part)| part).collect(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| format!("{arg} needs a value; {usage}"))
        };
        match arg.as_str() {
            // cargo bench passes --bench to every harness = false target.
            "--bench" => {}
            "--messages" => flags.messages = number(&arg, &value()?)?,
            "--runs" => flags.runs = number(&arg, &value()?)?,
            "--only" => {
                flags.only = value()?
                    .split(',')
                    .map(|name| {
                        PARTS
                            .iter()
                            .find(|&&(known, _)| known == name)
                            .map(|&(_, part)| part)
                            .ok_or_else(|| format!("--only: unknown part {name:?}; {usage}"))
                    })
                    .collect::<Result<_, _>>()?
            }
            other => return Err(format!("unknown argument {other:?}; {usage}")),
        }
    }
    if flags.runs == 0 || flags.messages < 100 {
        return Err("--runs must be at least 1 and --messages at least 100".into());
    }
    Ok(flags)
}

fn number(flag: &str, value: &str) -> Result<usize, String> {
    value
        .parse()
        .map_err(|_| format!("{flag} takes a whole number, not {value:?}"))
}

/// nproc, the CPU model and the broker's version, for the report's first line.
fn machine() -> Result<String, String> {
    let output = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
            .ok_or_else(|| format!("cannot run {program} {}", args.join(" ")))
    };
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo")
        .map_err(|e| format!("cannot read /proc/cpuinfo: {e}"))?;
    let model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".to_string());
    Ok(format!(
        "Machine: {} CPUs (nproc), {model}; RabbitMQ {} on {}; warren {} (cargo bench profile)",
        output("nproc", &[])?,
        output("rabbitmqctl", &["version"])?,
        driver::amqp_url()
            .rsplit_once('@')
            .and_then(|(_, host)| host.split('/').next())
            .unwrap_or("the broker"),
        env!("CARGO_PKG_VERSION"),
    ))
}

/// What a line of the drain table runs.
#[derive(Clone, PartialEq)]
enum Kind {
    /// The bare amiquip loop.
    Baseline,
    /// `warren run` with these `[handler]` keys.
    Warren(String),
    /// amqp-consume with this program per message.
    AmqpConsume(Vec<String>),
}

/// One line of the drain table: warren with one handler, amqp-consume, or the baseline.
struct Row {
    /// For queue names and progress lines.
    name: &'static str,
    /// For the table.
    label: String,
    kind: Kind,
    /// Its program copies each body to its stdout: the log must show every body once.
    echoes: bool,
    workers: usize,
    prefetch: u16,
    messages: usize,
    runs: Vec<Measurement>,
    skipped: bool,
}

impl Row {
    fn warren(
        name: &'static str,
        label: &str,
        handler: String,
        workers: usize,
        messages: usize,
    ) -> Row {
        Row {
            name,
            label: label.to_string(),
            kind: Kind::Warren(handler),
            echoes: false,
            workers,
            prefetch: 1,
            messages,
            runs: Vec::new(),
            skipped: false,
        }
    }

    fn is_baseline(&self) -> bool {
        self.kind == Kind::Baseline
    }

    fn scenario(&self) -> Scenario {
        Scenario {
            name: self.name.to_string(),
            consumer: match &self.kind {
                Kind::Warren(handler) => Consumer::Warren {
                    handler: handler.clone(),
                },
                Kind::AmqpConsume(command) => Consumer::AmqpConsume {
                    command: command.clone(),
                },
                Kind::Baseline => Consumer::Baseline { args: Vec::new() },
            },
            workers: self.workers,
            prefetch: self.prefetch,
            messages: self.messages,
        }
    }

    fn pair(&self) -> (usize, u16) {
        (self.workers, self.prefetch)
    }

    fn rates(&self) -> Vec<f64> {
        self.runs.iter().map(|m| m.rate).collect()
    }

    fn startup(&self) -> f64 {
        median(self.runs.iter().map(|m| m.startup.as_secs_f64()).collect())
    }

    fn shutdown(&self) -> f64 {
        median(self.runs.iter().map(|m| m.shutdown.as_secs_f64()).collect())
    }
}

/// The drain runs: every warren configuration asked for, each followed in every round by the
/// baseline with its workers and prefetch (once per round for each pair).
fn drain_table(flags: &Flags) -> Result<(), String> {
    let m = flags.messages;
    let wants = |part| flags.only.contains(&part);
    let mut rows = Vec::new();
    if wants(Part::Drain) {
        for workers in [1, 2, 4, 8] {
            rows.push(Row::warren("dots", "dots", DOTS.into(), workers, m));
        }
        rows.push(Row {
            prefetch: 10,
            ..Row::warren("dots", "dots", DOTS.into(), 4, m)
        });
    }
    if wants(Part::Command) {
        let handler = "kind = \"command\"\ncommand = [\"/bin/true\"]".to_string();
        for workers in [1, 4] {
            let label = "command `/bin/true`";
            rows.push(Row::warren(
                "command",
                label,
                handler.clone(),
                workers,
                m / 10,
            ));
        }
        // With prefetch 1 the broker's round trip, and its wake-up after a millisecond idle, come
        // on top of every fork and exec; amqp-consume sets no prefetch limit at all.
        rows.push(Row {
            prefetch: 10,
            ..Row::warren("command", "command `/bin/true`", handler, 1, m / 10)
        });
    }
    if wants(Part::Consume) {
        // The same program per message under warren and under amqp-consume, which share the
        // ceiling of one fork and exec per message; /bin/cat also makes both pass each body
        // through, which the runs check in the log.
        let cat = || vec!["/bin/cat".to_string()];
        let handler = "kind = \"command\"\ncommand = [\"/bin/cat\"]".to_string();
        for (workers, prefetch) in [(1, 1), (1, 10), (4, 1)] {
            rows.push(Row {
                prefetch,
                echoes: true,
                ..Row::warren(
                    "consume-warren",
                    CONSUME_WARREN,
                    handler.clone(),
                    workers,
                    m / 10,
                )
            });
            rows.push(Row {
                label: CONSUME_AMQP.into(),
                kind: Kind::AmqpConsume(cat()),
                prefetch,
                echoes: true,
                ..Row::warren("consume-amqp", "", String::new(), workers, m / 10)
            });
        }
    }
    let mut notes = Vec::new();
    if wants(Part::Pipe) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/pipe_handler.py");
        if script.exists() {
            let handler = format!(
                "kind = \"pipe\"\ncommand = [\"python3\", \"{}\"]",
                script.display()
            );
            let label = "pipe `pipe_handler.py`";
            for workers in [1, 4] {
                rows.push(Row::warren("pipe", label, handler.clone(), workers, m / 2));
            }
            rows.push(Row {
                prefetch: 10,
                ..Row::warren("pipe", label, handler, 1, m / 2)
            });
        } else {
            notes.push(PIPE_SKIPPED.to_string());
        }
    }
    // Each warren row is followed by its baseline, the first time that pair comes up in a round.
    let mut order = Vec::new();
    for i in 0..rows.len() {
        order.push(i);
        let (workers, prefetch) = rows[i].pair();
        if !rows
            .iter()
            .any(|r| r.is_baseline() && r.pair() == (workers, prefetch))
        {
            rows.push(Row {
                name: "baseline",
                label: "baseline (amiquip loop)".into(),
                kind: Kind::Baseline,
                echoes: false,
                workers,
                prefetch,
                messages: m,
                runs: Vec::new(),
                skipped: false,
            });
            order.push(rows.len() - 1);
        }
    }

    for round in 1..=flags.runs {
        // Every other round runs in the opposite order, so that no row always comes first.
        let this_round: Vec<usize> = if round % 2 == 1 {
            order.clone()
        } else {
            order.iter().rev().copied().collect()
        };
        for &i in &this_round {
            let row = &mut rows[i];
            if row.skipped {
                continue;
            }
            match driver::measure(&row.scenario()) {
                Ok(measured) => {
                    eprintln!(
                        "round {round}/{}: {} {}w p{} on {}: {} msg/s (drain {}), startup {}, \
                         shutdown {}",
                        flags.runs,
                        row.name,
                        row.workers,
                        row.prefetch,
                        measured.queue,
                        thousands(measured.rate),
                        ms(measured.drain.as_secs_f64()),
                        ms(measured.startup.as_secs_f64()),
                        ms(measured.shutdown.as_secs_f64()),
                    );
                    if row.echoes && measured.echoed != row.messages {
                        return Err(format!(
                            "{} with {} workers, prefetch {}: the log shows {} of the {} bodies \
                             (not one program run per message?)",
                            row.name, row.workers, row.prefetch, measured.echoed, row.messages
                        ));
                    }
                    row.runs.push(measured);
                }
                Err(Error::Misconfigured(why)) if row.name == "pipe" => {
                    eprintln!("pipe: {why}");
                    for row in rows.iter_mut().filter(|r| r.name == "pipe") {
                        row.skipped = true;
                    }
                    notes.push(PIPE_SKIPPED.to_string());
                }
                Err(e) => {
                    return Err(format!(
                        "{} with {} workers, prefetch {}: {e}",
                        row.name, row.workers, row.prefetch
                    ))
                }
            }
        }
    }

    println!(
        "Drain: median of {} runs, interleaved round by round; rate = (messages - workers × \
         prefetch) / (first delivery → queue empty).\n",
        flags.runs
    );
    println!("| consumer | workers | prefetch | messages | rate (median) | min–max | vs baseline | startup (vs baseline) | shutdown (vs baseline) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    // Grouped by workers and prefetch, in the order they were run, the baseline first.
    let mut pairs = Vec::new();
    for &i in &order {
        if !pairs.contains(&rows[i].pair()) {
            pairs.push(rows[i].pair());
        }
    }
    for pair in pairs {
        let base = rows
            .iter()
            .find(|r| r.is_baseline() && r.pair() == pair)
            .expect("invariant: every pair has its baseline row");
        let warren = rows
            .iter()
            .filter(|r| !r.is_baseline() && r.pair() == pair && !r.skipped);
        for row in std::iter::once(base).chain(warren) {
            let rates = row.rates();
            let (low, high) = min_max(&rates);
            let ratio = |value: f64, base: f64| format!("{:.2}", value / base);
            println!(
                "| {} | {} | {} | {} | {} msg/s | {}–{} | {} | {} ({}x) | {} ({}x) |",
                row.label,
                row.workers,
                row.prefetch,
                thousands(row.messages as f64),
                thousands(median(rates.clone())),
                thousands(low),
                thousands(high),
                ratio(median(rates), median(base.rates())),
                ms(row.startup()),
                ratio(row.startup(), base.startup()),
                ms(row.shutdown()),
                ratio(row.shutdown(), base.shutdown()),
            );
        }
    }
    if wants(Part::Consume) {
        consume_table(&rows);
    }
    for note in notes {
        println!("\n{note}");
    }
    println!();
    Ok(())
}

const CONSUME_WARREN: &str = "warren `command` `/bin/cat`";
const CONSUME_AMQP: &str = "amqp-consume `/bin/cat`";

/// warren's `command` handler against amqp-consume, each running `/bin/cat` per message: the
/// ratio of their medians, and the ratio in each round (the two ran next to each other) with its
/// median, which a sitting whose load drifts moves less.
fn consume_table(rows: &[Row]) {
    println!(
        "\nwarren's `command` handler against amqp-consume, both running `/bin/cat` per message \
         (every body passed through and every message acked, checked):\n"
    );
    println!("| workers | prefetch | warren (median) | amqp-consume (median) | warren / amqp-consume | per round | median per round |");
    println!("|---|---|---|---|---|---|---|");
    let find = |label: &str, pair| rows.iter().find(|r| r.label == label && r.pair() == pair);
    for row in rows.iter().filter(|r| r.label == CONSUME_WARREN) {
        let Some(amqp) = find(CONSUME_AMQP, row.pair()) else {
            continue;
        };
        let (warren, amqp) = (row.rates(), amqp.rates());
        let rounds: Vec<f64> = warren.iter().zip(&amqp).map(|(w, a)| w / a).collect();
        let listed: Vec<String> = rounds.iter().map(|r| format!("{r:.2}")).collect();
        println!(
            "| {} | {} | {} msg/s | {} msg/s | {:.2} | {} | {:.2} |",
            row.workers,
            row.prefetch,
            thousands(median(warren.clone())),
            thousands(median(amqp.clone())),
            median(warren) / median(amqp),
            listed.join(", "),
            median(rounds)
        );
    }
}

/// `warren publish --stdin` with [`PUBLISH_LINES`] lines, `--runs` times.
fn publish(flags: &Flags) -> Result<(), String> {
    let mut rates = Vec::new();
    for run in 1..=flags.runs {
        let rate = driver::publish_stdin(PUBLISH_LINES).map_err(|e| format!("publish: {e}"))?;
        eprintln!("publish {run}/{}: {} msg/s", flags.runs, thousands(rate));
        rates.push(rate);
    }
    let (low, high) = min_max(&rates);
    println!(
        "- Publish: `warren publish --stdin` with {} lines: {} msg/s (min–max {}–{}), median of {} \
         runs; the process's wall time, start and connection included; the queue held every \
         line afterwards.",
        thousands(PUBLISH_LINES as f64),
        thousands(median(rates)),
        thousands(low),
        thousands(high),
        flags.runs
    );
    Ok(())
}

/// What TLS costs: draining no-op tasks with 4 workers (prefetch 1 and 10) and `warren publish
/// --stdin`, over `amqp://` and over `amqps://` to the same node, an extra RabbitMQ node with
/// both listeners started for the bench (by the tests' helper), interleaved run by run.
fn tls(flags: &Flags) -> Result<(), String> {
    const LINES: usize = PUBLISH_LINES / 5;
    let certs = util::certs::Certs::generate();
    let conf = certs.tls_conf(&certs.server_cert, &certs.server_key, false);
    let cluster = util::nodes::Cluster::start_with(1, &conf);
    let node = cluster.node(0);
    let tls_keys = format!(
        "url = \"{}\"\n\n[broker.tls]\nca_file = \"{}\"",
        node.amqps_url(),
        certs.ca_cert.display()
    );
    // The driver reads the broker from the environment: this node's plain listener, or its TLS
    // listener through the [broker] keys.
    std::env::set_var("WARREN_TEST_AMQP_URL", node.amqp_url());
    std::env::set_var(driver::NODE_ENV, node.name());
    let modes = [("amqp://", None), ("amqps://", Some(tls_keys))];
    // Rates by mode, then by what: prefetch 1, prefetch 10, publish.
    let mut rates = [[(); 3].map(|()| Vec::new()), [(); 3].map(|()| Vec::new())];
    for run in 1..=flags.runs {
        for (mode, (name, keys)) in modes.iter().enumerate() {
            match keys {
                Some(keys) => std::env::set_var(driver::BROKER_ENV, keys),
                None => std::env::remove_var(driver::BROKER_ENV),
            }
            for (what, prefetch) in [1, 10].into_iter().enumerate() {
                let measured = driver::measure(&Scenario {
                    name: "tls".into(),
                    consumer: Consumer::Warren {
                        handler: DOTS.into(),
                    },
                    workers: 4,
                    prefetch,
                    messages: flags.messages,
                })
                .map_err(|e| format!("tls: {name} drain: {e}"))?;
                eprintln!(
                    "tls {run}/{} {name} prefetch {prefetch}: {} msg/s",
                    flags.runs,
                    thousands(measured.rate)
                );
                rates[mode][what].push(measured.rate);
            }
            let rate =
                driver::publish_stdin(LINES).map_err(|e| format!("tls: {name} publish: {e}"))?;
            eprintln!(
                "tls {run}/{} {name} publish: {} msg/s",
                flags.runs,
                thousands(rate)
            );
            rates[mode][2].push(rate);
        }
    }
    std::env::remove_var(driver::BROKER_ENV);
    std::env::remove_var("WARREN_TEST_AMQP_URL");
    std::env::remove_var(driver::NODE_ENV);
    println!(
        "\n| TLS, one extra node (medians of {} interleaved runs) | `amqp://` | `amqps://` | amqps / amqp |\n|---|---|---|---|",
        flags.runs
    );
    let labels = [
        "dots (no-op), 4 workers, prefetch 1".to_string(),
        "dots (no-op), 4 workers, prefetch 10".to_string(),
        format!(
            "`warren publish --stdin`, {} lines",
            thousands(LINES as f64)
        ),
    ];
    for (what, label) in labels.iter().enumerate() {
        let plain = median(rates[0][what].clone());
        let tls = median(rates[1][what].clone());
        println!(
            "| {label} | {} msg/s | {} msg/s | {:.2} |",
            thousands(plain),
            thousands(tls),
            tls / plain
        );
    }
    Ok(())
}

/// Memory of `warren run` idle with 4 and 32 workers, and before and after draining
/// [`MEMORY_MESSAGES`] tasks with 4; the baseline's with 4 for comparison.
fn memory() -> Result<(), String> {
    let measure = |consumer: Consumer, workers: usize, messages: usize| {
        let name = match consumer {
            Consumer::Warren { .. } => "memory",
            Consumer::Baseline { .. } | Consumer::AmqpConsume { .. } => "memory-baseline",
        };
        let memory = driver::memory(&Scenario {
            name: name.to_string(),
            consumer,
            workers,
            prefetch: 1,
            messages,
        })
        .map_err(|e| format!("memory with {workers} workers: {e}"))?;
        eprintln!("memory {name} {workers}w: {memory:?}");
        Ok::<Memory, String>(memory)
    };
    let warren = || Consumer::Warren {
        handler: DOTS.into(),
    };
    let drained = |memory: &Memory| {
        let after = memory.drained.expect("invariant: a drain was asked for");
        format!(
            "VmRSS {} → {}, VmHWM {} → {}",
            mib(memory.idle.rss_kib),
            mib(after.rss_kib),
            mib(memory.idle.hwm_kib),
            mib(after.hwm_kib)
        )
    };
    let four = measure(warren(), 4, MEMORY_MESSAGES)?;
    let many = measure(warren(), 32, 0)?;
    let base = measure(Consumer::Baseline { args: Vec::new() }, 4, MEMORY_MESSAGES)?;
    let idle = |memory: &Memory| {
        format!(
            "VmRSS {}, VmHWM {}",
            mib(memory.idle.rss_kib),
            mib(memory.idle.hwm_kib)
        )
    };
    let tasks = thousands(MEMORY_MESSAGES as f64);
    println!(
        "- Memory, `warren run` idle (1 s after all workers consume): 4 workers {}; 32 workers {}.",
        idle(&four),
        idle(&many)
    );
    println!("- Memory, `warren run` with 4 workers (dots, no-op), idle → after draining {tasks} tasks: {}.", drained(&four));
    println!(
        "- Memory, baseline with 4 workers, idle → after draining {tasks} tasks: {}.",
        drained(&base)
    );
    Ok(())
}

/// CPU time of `warren run` and of the baseline with 8 idle workers over [`IDLE_WINDOW`].
fn idle() -> Result<(), String> {
    let mut lines = Vec::new();
    for (what, consumer) in [
        (
            "`warren run`",
            Consumer::Warren {
                handler: DOTS.into(),
            },
        ),
        ("baseline", Consumer::Baseline { args: Vec::new() }),
    ] {
        let scenario = Scenario {
            name: "idle".into(),
            consumer,
            workers: 8,
            prefetch: 1,
            messages: 0,
        };
        let cpu = driver::idle_cpu(&scenario, IDLE_WINDOW)
            .map_err(|e| format!("idle CPU of {what}: {e}"))?;
        eprintln!("idle {what}: {cpu:?}");
        lines.push(format!(
            "{what} {:.2} CPU-s, {} ticks of 1/{} s ({:.2}% of one core)",
            cpu.seconds(),
            cpu.ticks,
            cpu.ticks_per_second,
            100.0 * cpu.seconds() / IDLE_WINDOW.as_secs_f64()
        ));
    }
    println!(
        "- Idle CPU (user + system), 8 idle workers over {} s: {}.",
        IDLE_WINDOW.as_secs(),
        lines.join("; ")
    );
    Ok(())
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    match xs.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => xs[n / 2],
        n => (xs[n / 2 - 1] + xs[n / 2]) / 2.0,
    }
}

fn min_max(xs: &[f64]) -> (f64, f64) {
    xs.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(low, high), &x| {
            (low.min(x), high.max(x))
        })
}

/// A rate or a count, rounded, with thousands separators: 12,345.
fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn ms(seconds: f64) -> String {
    format!("{:.1} ms", seconds * 1000.0)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}
