//! Reloading the configuration of a running warren (`warren reload`, SIGHUP, the units'
//! ExecReload=): the worker count and the handler apply without dropping a running task, a bad
//! file is refused with one line while the running configuration stays, and keys that need a
//! restart are named.

mod util;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use nix::sys::signal::Signal;
use util::{
    line_of, publish_ok, queue_counts, recorded, wait_until, warren_command, BrokerLock,
    ConfigFile, Warren,
};

fn reload(config: &Path) -> Output {
    warren_command(&["reload", "--config", config.to_str().expect("a UTF-8 path")])
        .output()
        .expect("run warren reload")
}

/// A handler that records `<name> start <body>` and `<name> end <body>` in `log`, sleeping 2s
/// for a body that starts with `slow`.
fn handler(broker: &BrokerLock, name: &str, log: &Path) -> PathBuf {
    broker.script(
        &format!("{name}.sh"),
        &format!(
            "body=$(cat)\necho \"{name} start $body\" >> '{log}'\n\
             case \"$body\" in slow*) sleep 2 ;; esac\necho \"{name} end $body\" >> '{log}'",
            log = log.display()
        ),
    )
}

#[test]
fn a_reload_applies_workers_and_handler_without_dropping_a_task_and_refuses_a_bad_file() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("reload");
    let log = broker.dir.path().join("calls");
    let socket = broker.dir.path().join("control.sock");
    let file = |workers: usize, handler: &Path| {
        ConfigFile::new(&queue)
            .workers(workers)
            .command(handler)
            .control(&socket)
    };
    let (a, b) = (handler(&broker, "A", &log), handler(&broker, "B", &log));
    let config = broker.dir.path().join("reload.toml");
    // The producer has a file of its own: the daemon's is broken on purpose below.
    let producer = ConfigFile::new(&queue).write_in(broker.dir.path());
    file(1, &a).write_to(&config);
    let warren = Warren::run(&config, &[]);
    warren.wait_consuming(&queue, 1);

    publish_ok(&producer, &["slow-1"]);
    wait_until(Duration::from_secs(10), "slow-1 to start", || {
        recorded(&log).contains(&"A start slow-1".to_string())
    });
    file(3, &b).set("breaker.cooldown", "2s").write_to(&config);
    let reloaded = reload(&config);
    assert!(reloaded.status.success(), "{reloaded:?}");
    let answer = String::from_utf8_lossy(&reloaded.stdout);
    assert!(
        answer.starts_with(&format!(
            "reloaded {}: workers.count 1 → 3, handler.command changed, breaker.cooldown 5s → 2s",
            fs::canonicalize(&config).unwrap().display()
        )),
        "{answer}"
    );
    warren.wait_consuming(&queue, 3);
    // The running task finished with the handler it started with.
    wait_until(Duration::from_secs(10), "slow-1 to end", || {
        recorded(&log).contains(&"A end slow-1".to_string())
    });
    publish_ok(&producer, &["x-1", "x-2", "x-3"]);
    wait_until(Duration::from_secs(10), "the new handler", || {
        ["x-1", "x-2", "x-3"]
            .iter()
            .all(|x| recorded(&log).contains(&format!("B end {x}")))
    });
    assert!(
        !recorded(&log)
            .iter()
            .any(|l| l.starts_with("A ") && l.contains(" x-")),
        "{:#?}",
        recorded(&log)
    );

    // A bad file: exit 78 with one line naming the file, the line and the key; nothing changes.
    let bad = file(0, &b);
    bad.write_to(&config);
    let refused = reload(&config);
    assert_eq!(refused.status.code(), Some(78), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "reload.toml:{}: workers.count: must be at least 1, not 0",
            line_of(&bad.text(), "count = 0")
        )),
        "{stderr}"
    );
    // The daemon refuses it too when it reads the file itself, on SIGHUP.
    warren.signal(Signal::SIGHUP);
    let line = warren.wait_for_log("reload refused: ", Duration::from_secs(10));
    assert!(
        line.contains("workers.count: must be at least 1, not 0"),
        "{line}"
    );
    assert!(line.contains("the running configuration stays"), "{line}");
    assert_eq!(queue_counts(&queue).1, 3);
    publish_ok(&producer, &["y-1"]);
    wait_until(
        Duration::from_secs(10),
        "y-1 with the running handler",
        || recorded(&log).contains(&"B end y-1".to_string()),
    );

    // SIGHUP reloads a good file (warren's standard input is not a terminal here), and names
    // what needs a restart.
    file(2, &b).set("retry.max_attempts", 7).write_to(&config);
    warren.signal(Signal::SIGHUP);
    let line = warren.wait_for_log("workers.count 3 → 2", Duration::from_secs(10));
    assert!(
        line.ends_with("; not applied, they need a restart: retry"),
        "{line}"
    );
    warren.wait_consuming(&queue, 2);
    warren.wait_for_log("worker-3 retired", Duration::from_secs(10));
    warren.stop(Duration::from_secs(10));
}

#[test]
fn a_reload_needs_no_broker_url_only_the_file() {
    // The units' ExecReload= runs where the unit's credential cannot be read
    // (systemd/systemd#35227): `warren reload` must not read it, nor WARREN_BROKER_URL. Here the
    // credential is a directory, which no one can read as a file, and the variable is no URL.
    let broker = BrokerLock::shared();
    let queue = broker.queue("reload-no-url");
    let socket = broker.dir.path().join("control.sock");
    let credentials = broker.dir.path().join("credentials");
    fs::create_dir_all(credentials.join("broker-url")).unwrap();
    let config = ConfigFile::new(&queue)
        .workers(1)
        .dots()
        .control(&socket)
        .write_in(broker.dir.path());
    let warren = Warren::run(&config, &[]);
    warren.wait_consuming(&queue, 1);

    let reloaded = warren_command(&["reload", "--config", config.to_str().unwrap()])
        .env("CREDENTIALS_DIRECTORY", &credentials)
        .output()
        .expect("run warren reload");
    assert!(reloaded.status.success(), "{reloaded:?}");
    let paused = warren_command(&["pause", "--config", config.to_str().unwrap()])
        .env("WARREN_BROKER_URL", "not a url")
        .output()
        .expect("run warren pause");
    assert!(paused.status.success(), "{paused:?}");
    warren.stop(Duration::from_secs(10));
}
