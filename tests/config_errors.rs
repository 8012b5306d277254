//! How the `warren` binary refuses a bad configuration or command line: a configuration problem
//! exits 78 (EX_CONFIG) with exactly one error line on stderr that names the file, the line and
//! the key, so an operator can fix it without reading the source; a bad command line exits 64
//! (EX_USAGE); and `WARREN_CONFIG` names the file when `--config` does not. None of these needs
//! the broker, so these tests neither take the broker lock nor connect to it; but one, a handler
//! timeout that could outlast the broker's `consumer_timeout`, holds the lock shared to ask the
//! broker that warren did not connect.

mod util;

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::thread;
use std::time::Duration;

use util::{line_of, BrokerLock, ConfigFile, Warren};

/// The start of every config here. The broker URL points where nothing listens, so that a
/// warren that wrongly accepted a config could not touch the test broker; it would retry until
/// [`warren`] kills it and fails the test.
const BROKER: &str =
    "[broker]\nurl = \"amqp://guest:guest@127.0.0.1:1/%2f\"\nconnect_timeout = \"1s\"\n";

/// A config that `warren run` accepts.
fn valid() -> String {
    format!("{BROKER}\n[queue]\nname = \"jobs\"\n\n[handler]\nkind = \"dots\"\n")
}

/// A config whose handler runs `program`.
fn command_handler(program: &Path) -> String {
    format!(
        "{BROKER}\n[queue]\nname = \"jobs\"\n\n[handler]\nkind = \"command\"\ncommand = [\"{}\", \"--flag\"]\n",
        program.display()
    )
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, text).expect("write the config file");
    path
}

/// How a run of the binary ended.
struct Ran {
    status: ExitStatus,
    stderr: String,
}

/// Runs the binary with `args` and `WARREN_CONFIG` set to `env_config`, if given. Kills it and
/// panics if it has not exited within 10 s: every case here must be refused at once.
fn warren(args: &[&str], env_config: Option<&Path>) -> Ran {
    let mut command = util::warren_command(args);
    command.stdout(Stdio::null());
    if let Some(path) = env_config {
        command.env("WARREN_CONFIG", path);
    }
    let mut child = command.spawn().expect("start warren");
    let mut pipe = child.stderr.take().expect("stderr is piped");
    let reader = thread::spawn(move || {
        let mut stderr = Vec::new();
        let _ = pipe.read_to_end(&mut stderr);
        String::from_utf8_lossy(&stderr).into_owned()
    });
    let Some(status) = util::wait_or_kill(&mut child, Duration::from_secs(10)) else {
        panic!(
            "warren {args:?} was not refused: still running after 10 s; stderr:\n{}",
            reader.join().unwrap_or_default()
        );
    };
    Ran {
        status,
        stderr: reader.join().expect("the stderr reader"),
    }
}

/// Runs `warren run --config PATH` and checks that it exits 78 with a single error line, which
/// it returns.
fn run_rejects(path: &Path) -> String {
    one_config_error(warren(&["run", "--config", path.to_str().unwrap()], None))
}

/// Checks that `ran` exited 78 with a single ERROR line on stderr, and returns that line.
fn one_config_error(ran: Ran) -> String {
    let stderr = ran.stderr;
    assert_eq!(
        ran.status.code(),
        Some(78),
        "a configuration problem exits 78 (EX_CONFIG); stderr:\n{stderr}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "stderr is one line, the error:\n{stderr}");
    assert!(
        lines[0].contains("ERROR"),
        "the line is logged as an error: {stderr}"
    );
    lines[0].to_string()
}

fn assert_ends_with(line: &str, expected: &str) {
    assert!(
        line.ends_with(expected),
        "the error line\n  {line}\nshould end with\n  {expected}"
    );
}

/// Writes `text` to `name` in `dir` and checks that `warren run` refuses it with an error line
/// that ends with the file, the number of the line that contains `needle`, and `error`.
fn assert_rejected_at(dir: &Path, name: &str, text: &str, needle: &str, error: &str) {
    let path = write(dir, name, text);
    assert_ends_with(
        &run_rejects(&path),
        &format!("] {}:{}: {error}", path.display(), line_of(text, needle)),
    );
}

/// Writes `text` to `name` in `dir` and checks that `warren run` refuses it with an error line
/// that contains the file, the number of the line that contains `needle`, and `error`.
fn assert_rejected_containing(dir: &Path, name: &str, text: &str, needle: &str, error: &str) {
    let path = write(dir, name, text);
    let line = run_rejects(&path);
    let at = format!("] {}:{}: {error}", path.display(), line_of(text, needle));
    assert!(
        line.contains(&at),
        "the error should contain {at:?}: {line}"
    );
}

#[test]
fn a_missing_config_file_is_named_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.toml");
    assert_ends_with(
        &run_rejects(&path),
        &format!(
            "] {}: cannot read: No such file or directory (os error 2)",
            path.display()
        ),
    );
}

#[test]
fn a_toml_syntax_error_names_the_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let text = valid().replace("kind = \"dots\"", "kind = \"dots\" oops");
    assert_rejected_containing(dir.path(), "syntax.toml", &text, "oops", "handler.kind: ");
}

#[test]
fn an_unknown_key_is_named_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!("{}\n[workers]\ncolour = 3\n", valid());
    assert_rejected_containing(
        dir.path(),
        "unknown.toml",
        &text,
        "colour",
        "workers.colour: unknown field `colour`",
    );
}

#[test]
fn zero_workers_in_the_file_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!("{}\n[workers]\ncount = 0\n", valid());
    assert_rejected_at(
        dir.path(),
        "zero.toml",
        &text,
        "count = 0",
        "workers.count: must be at least 1, not 0",
    );
}

#[test]
fn a_command_handler_whose_program_does_not_exist_names_handler_command_and_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let program = dir.path().join("no-such-job");
    let text = command_handler(&program);
    assert_rejected_at(
        dir.path(),
        "missing.toml",
        &text,
        "command = [",
        &format!(
            "handler.command: program {} does not exist",
            program.display()
        ),
    );
}

#[test]
fn a_command_handler_whose_program_is_not_executable_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let program = dir.path().join("job.sh");
    fs::write(&program, "#!/bin/sh\nexit 0\n").unwrap();
    fs::set_permissions(&program, fs::Permissions::from_mode(0o644)).unwrap();
    let text = command_handler(&program);
    assert_rejected_at(
        dir.path(),
        "plain.toml",
        &text,
        "command = [",
        &format!(
            "handler.command: program {} is not an executable file",
            program.display()
        ),
    );
}

#[test]
fn a_comment_after_a_table_header_does_not_change_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!("{}\n[workers] # how many at once\ncount = 0\n", valid());
    assert_rejected_at(
        dir.path(),
        "commented.toml",
        &text,
        "count = 0",
        "workers.count: must be at least 1, not 0",
    );
}

#[test]
fn a_missing_program_under_a_commented_handler_header_still_names_its_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let program = dir.path().join("no-such-job");
    let text = command_handler(&program).replace("[handler]", "[handler] # what runs per message");
    assert_rejected_at(
        dir.path(),
        "commented-handler.toml",
        &text,
        "command = [",
        &format!(
            "handler.command: program {} does not exist",
            program.display()
        ),
    );
}

#[test]
fn a_recycle_limit_on_a_command_handler_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let program = dir.path().join("job.sh");
    fs::write(&program, "#!/bin/sh\nexit 0\n").unwrap();
    fs::set_permissions(&program, fs::Permissions::from_mode(0o755)).unwrap();
    let text = format!("{}max_tasks = 100\n", command_handler(&program));
    assert_rejected_at(
        dir.path(),
        "recycled-command.toml",
        &text,
        "max_tasks",
        "handler.max_tasks: only kind = \"pipe\" takes max_tasks (it limits the program a pipe handler keeps running)",
    );
}

#[test]
fn zero_workers_on_the_command_line_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "valid.toml", &valid());
    let ran = warren(
        &["run", "--config", path.to_str().unwrap(), "--workers", "0"],
        None,
    );
    assert_eq!(
        ran.status.code(),
        Some(64),
        "--workers 0 exits 64 (EX_USAGE); stderr:\n{}",
        ran.stderr
    );
    assert!(
        ran.stderr.contains("--workers"),
        "stderr names the flag: {}",
        ran.stderr
    );
}

#[test]
fn an_unknown_subcommand_or_flag_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "valid.toml", &valid());
    let config = path.to_str().unwrap();
    for (args, named) in [
        (vec!["frobnicate"], "frobnicate"),
        (
            vec!["run", "--config", config, "--frobnicate"],
            "--frobnicate",
        ),
        (
            vec!["publish", "--config", config, "--frobnicate"],
            "--frobnicate",
        ),
        (vec![], "Usage"),
    ] {
        let ran = warren(&args, None);
        assert_eq!(
            ran.status.code(),
            Some(64),
            "warren {args:?} exits 64 (EX_USAGE); stderr:\n{}",
            ran.stderr
        );
        assert!(
            ran.stderr.contains(named),
            "warren {args:?}: stderr names {named:?}:\n{}",
            ran.stderr
        );
    }
}

#[test]
fn warren_config_names_the_file_when_config_is_absent() {
    let dir = tempfile::tempdir().unwrap();
    let env_text = format!("{}\n[workers]\ncount = 0\n", valid());
    let from_env = write(dir.path(), "from-env.toml", &env_text);
    for subcommand in ["run", "publish"] {
        let line = one_config_error(warren(&[subcommand], Some(&from_env)));
        let at = format!(
            "] {}:{}: workers.count",
            from_env.display(),
            line_of(&env_text, "count = 0")
        );
        assert!(
            line.contains(&at),
            "warren {subcommand} read the file WARREN_CONFIG names, so the error should \
             contain {at:?}: {line}"
        );
    }

    // --config wins over WARREN_CONFIG.
    let flag_text = format!("{}\n[workers]\ncolour = 3\n", valid());
    let from_flag = write(dir.path(), "from-flag.toml", &flag_text);
    let line = one_config_error(warren(
        &["run", "--config", from_flag.to_str().unwrap()],
        Some(&from_env),
    ));
    let at = format!(
        "] {}:{}: workers.colour",
        from_flag.display(),
        line_of(&flag_text, "colour")
    );
    assert!(
        line.contains(&at),
        "--config overrides WARREN_CONFIG, so the error should contain {at:?}: {line}"
    );
}

#[test]
fn a_handler_timeout_that_could_outlast_the_consumer_timeout_is_a_config_error() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("ctimeout");
    let config = ConfigFile::new(&queue)
        .set("broker.consumer_timeout", "1m")
        .dots()
        .set("handler.timeout", "2m")
        .write_in(broker.dir.path());

    let mut warren = Warren::run(&config, &[]);
    assert_eq!(warren.wait_exit(Duration::from_secs(10)).code(), Some(78));
    let log = warren.log();
    assert_eq!(log.len(), 1, "one line: {log:#?}");
    assert!(
        log[0].contains(&format!("{}:", config.display()))
            && log[0].contains("handler.timeout (2m)")
            && log[0].contains("broker.consumer_timeout (1m)"),
        "{}",
        log[0]
    );
    assert!(
        util::connections_named(&format!(" pid {}\"", warren.pid())).is_empty(),
        "nothing connected"
    );
}
