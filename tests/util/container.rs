//! [`Container`]: a throwaway systemd (Debian's, the host's own), booted as PID 1 of new pid,
//! mount, uts, ipc and cgroup namespaces, for tests/systemd.rs to install the freshly built
//! package in and drive warren's units with `systemctl`. It shares the host's network, so that
//! its units reach the test broker on 127.0.0.1.
//!
//! `boot-container.sh`, beside this file, builds the container's root (an overlay of the host's
//! root whose writable layer is a tmpfs of the container's own: nothing it does writes a host
//! file; every host unit but systemd's own masked: the broker and the other daemons of the host
//! can be neither started nor stopped from inside) and execs systemd. Each container runs in a
//! cgroup of its own in the host's cgroup2 hierarchy, which becomes the root of its cgroup
//! namespace, so that containers booted side by side do not share one tree.
//!
//! Everything inside is reached through `nsenter` into PID 1's namespaces, after checking that
//! the PID still is the container's ([`Container::enter`]): a reused PID must never make a
//! command meant for the container run on the host. Dropping a `Container`, also when a test
//! panics, powers it off (SIGRTMIN+3 to PID 1), kills what is left if that takes too long,
//! and removes the cgroups left behind. If the test process itself is killed, the kernel kills
//! the container with it (a parent-death signal on `unshare`, and `--kill-child`).
//!
//! A host where the namespaces cannot be made fails the test with a line that says so; none skip.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::wait_until;

/// The capabilities the container does without: none of them is systemd's business here, and
/// some could reach the host (its clock, its modules, its network's configuration: the network is
/// shared).
const DROPPED_CAPABILITIES: &str = "-sys_module,-sys_time,-sys_rawio,-net_admin,-mac_admin,\
    -mac_override,-audit_control,-sys_pacct,-wake_alarm,-block_suspend";

/// The target the container boots: basic.target and nothing else of the host's.
const TARGET: &str = "warren-test.target";

/// How long systemd may take to boot, and to power off before what is left is killed.
const BOOT_WAIT: Duration = Duration::from_secs(30);
const POWEROFF_WAIT: Duration = Duration::from_secs(20);

/// The prefix of the host cgroups the containers run in.
const CGROUP_PREFIX: &str = "warren-systemd-test";

const PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A systemd booted in namespaces of its own; powered off when dropped.
pub struct Container {
    name: String,
    /// `unshare`, whose child is PID 1.
    unshare: Child,
    /// PID 1 as the host numbers it.
    pid1: u32,
    /// PID 1's mount namespace, as `/proc/PID/ns/mnt` names it: checked before every `nsenter`.
    mount_ns: PathBuf,
    /// The host cgroup that is the container's cgroup root.
    cgroup: PathBuf,
    /// Covered by the container's tmpfs (the overlay's layers); empty on the host.
    scratch: tempfile::TempDir,
    /// What `unshare`, the boot script and systemd write before the journal runs.
    log: tempfile::NamedTempFile,
}

impl Container {
    /// Boots a container named after `what`, and waits until its systemd is `running`. Panics,
    /// naming what is missing, on a host where that cannot be done.
    pub fn boot(what: &str) -> Container {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("warren-{what}");
        refuse_unless_possible();
        remove_stale_cgroups();

        let cgroup =
            cgroup2_parent().join(format!("{CGROUP_PREFIX}-{}-{n}-{what}", std::process::id()));
        fs::create_dir(&cgroup)
            .unwrap_or_else(|e| panic!("create the cgroup {}: {e}", cgroup.display()));
        let scratch = tempfile::tempdir().expect("create a temporary directory");
        let log = tempfile::NamedTempFile::new().expect("create the container's log file");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/util/boot-container.sh");

        let mut command = Command::new("sh");
        // The shell moves itself into the container's cgroup, then becomes unshare: the cgroup
        // namespace unshare makes is rooted where it runs.
        command
            .args([
                "-c",
                r#"echo $$ >"$1/cgroup.procs" && shift && exec "$@""#,
                "sh",
            ])
            .arg(&cgroup)
            .args([
                "unshare",
                "--pid",
                "--fork",
                "--kill-child",
                "--mount",
                "--uts",
                "--ipc",
                "--cgroup",
                "setpriv",
                "--bounding-set",
                DROPPED_CAPABILITIES,
                "env",
                "-i",
                PATH,
                "sh",
            ])
            .arg(&script)
            .arg(&name)
            .arg(scratch.path())
            .arg(TARGET)
            .stdin(Stdio::null())
            .stdout(log.reopen().expect("open the container's log"))
            .stderr(log.reopen().expect("open the container's log"));
        // If the test process dies without dropping the container, the kernel kills unshare,
        // and unshare's --kill-child kills PID 1, which takes the whole pid namespace with it.
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent's.
        unsafe {
            use std::os::unix::process::CommandExt;
            command.pre_exec(|| {
                rustix::process::set_parent_process_death_signal(Some(
                    rustix::process::Signal::KILL,
                ))
                .map_err(std::io::Error::from)
            });
        }
        let unshare = match command.spawn() {
            Ok(child) => child,
            Err(e) => {
                let _ = fs::remove_dir(&cgroup);
                panic!("start unshare for the systemd container: {e}");
            }
        };

        let mut container = Container {
            name,
            unshare,
            pid1: 0,
            mount_ns: PathBuf::new(),
            cgroup,
            scratch,
            log,
        };
        container.wait_for_systemd();
        container.wait_running();
        container
    }

    /// Waits until unshare's child has exec'd systemd, and records who it is.
    fn wait_for_systemd(&mut self) {
        let deadline = Instant::now() + BOOT_WAIT;
        let children = format!("/proc/{0}/task/{0}/children", self.unshare.id());
        loop {
            if let Ok(Some(status)) = self.unshare.try_wait() {
                panic!(
                    "cannot boot systemd in new pid, mount, uts, ipc and cgroup namespaces on this \
                     host (unshare exited: {status}). The systemd tests need root, a kernel that \
                     allows these namespaces, overlayfs and a cgroup2 hierarchy. What it said:\n{}",
                    self.boot_log()
                );
            }
            let child = fs::read_to_string(&children)
                .ok()
                .and_then(|text| text.split_whitespace().next()?.parse::<u32>().ok());
            if let Some(pid) = child {
                let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
                if exe.ends_with("systemd/systemd") {
                    self.pid1 = pid;
                    self.mount_ns = fs::read_link(format!("/proc/{pid}/ns/mnt"))
                        .expect("read the container's mount namespace");
                    let ours = fs::read_link("/proc/self/ns/mnt").expect("read our namespace");
                    assert_ne!(
                        self.mount_ns, ours,
                        "the container's PID 1 runs in the host's mount namespace"
                    );
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "systemd did not start in the container within {BOOT_WAIT:?}:\n{}",
                self.boot_log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `systemctl is-system-running --wait` says `running`. An early call can fail
    /// to reach systemd's bus, so it is asked again until the deadline.
    fn wait_running(&mut self) {
        let deadline = Instant::now() + BOOT_WAIT;
        let mut last = String::new();
        while Instant::now() < deadline {
            // `--wait` waits for the boot to end, which a stuck boot would never do.
            let out = self.run(&["timeout", "30", "systemctl", "is-system-running", "--wait"]);
            last = format!("{}{}", stdout(&out), stderr(&out))
                .trim()
                .to_string();
            match last.as_str() {
                "running" => return,
                "degraded" => panic!(
                    "the container booted degraded:\n{}\n{}",
                    self.text(&["systemctl", "--failed", "--no-pager"]),
                    self.journal_tail()
                ),
                _ => thread::sleep(Duration::from_millis(100)),
            }
        }
        panic!(
            "the container's systemd was not running within {BOOT_WAIT:?} (last said {last:?}):\n{}",
            self.boot_log()
        );
    }

    /// A command to run `argv` inside the container, as root, with a plain environment; with its
    /// namespaces, root directory and working directory. Panics if PID 1 is no longer the
    /// container's.
    pub fn enter(&self, argv: &[&str]) -> Command {
        let ns = fs::read_link(format!("/proc/{}/ns/mnt", self.pid1)).unwrap_or_default();
        assert_eq!(
            ns, self.mount_ns,
            "the container {} is gone (PID {} is no longer its PID 1)",
            self.name, self.pid1
        );
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--target={}", self.pid1))
            .args([
                "--mount",
                "--uts",
                "--ipc",
                "--pid",
                "--cgroup",
                "--root",
                "--wd",
                "--",
                "env",
                "-i",
                PATH,
                "LANG=C.UTF-8",
                "SYSTEMD_COLORS=0",
            ])
            .args(argv)
            .stdin(Stdio::null());
        command
    }

    /// Runs `argv` inside the container and returns what it did.
    pub fn run(&self, argv: &[&str]) -> Output {
        self.enter(argv)
            .output()
            .unwrap_or_else(|e| panic!("run nsenter for {argv:?}: {e}"))
    }

    /// Runs `argv` inside the container and returns its standard output; panics if it fails.
    pub fn text(&self, argv: &[&str]) -> String {
        let out = self.run(argv);
        assert!(
            out.status.success(),
            "{argv:?} failed in the container ({}): {}{}",
            out.status,
            stdout(&out),
            stderr(&out)
        );
        stdout(&out)
    }

    /// Runs a shell script inside the container; panics if it fails.
    pub fn sh(&self, script: &str) -> String {
        self.text(&["sh", "-euc", script])
    }

    /// `systemctl ARGS` inside the container.
    pub fn systemctl(&self, args: &[&str]) -> Output {
        let mut argv = vec!["systemctl", "--no-pager"];
        argv.extend_from_slice(args);
        self.run(&argv)
    }

    /// One property of `unit`, as `systemctl show --value` gives it.
    pub fn show(&self, unit: &str, property: &str) -> String {
        self.text(&["systemctl", "show", "--value", "--property", property, unit])
            .trim_end()
            .to_string()
    }

    /// Waits until `unit`'s `property` satisfies `condition`; panics with the unit's status and
    /// journal after `timeout`.
    pub fn wait_show(
        &self,
        unit: &str,
        property: &str,
        timeout: Duration,
        condition: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.show(unit, property);
            if condition(&value) {
                return value;
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting on {unit}'s {property} (last {value:?})\n{}",
                    self.status(unit)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until `unit`'s `property` is `value`.
    pub fn wait_property(&self, unit: &str, property: &str, value: &str, timeout: Duration) {
        self.wait_show(unit, property, timeout, |v| v == value);
    }

    /// `systemctl status` and the last of the journal of `unit`, for a failure's message.
    pub fn status(&self, unit: &str) -> String {
        let out = self.systemctl(&["status", "--lines=40", "--full", unit]);
        format!("{}{}", stdout(&out), stderr(&out))
    }

    /// Writes `contents` to `path` inside the container (making its directory), with `mode`.
    pub fn write(&self, path: &str, contents: &[u8], mode: u32) {
        let mut child = self
            .enter(&[
                "sh",
                "-euc",
                r#"mkdir -p "$(dirname "$1")"; cat >"$1"; chmod "$2" "$1""#,
                "sh",
                path,
                &format!("{mode:o}"),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("run nsenter to write {path}: {e}"));
        child
            .stdin
            .take()
            .expect("invariant: stdin is piped")
            .write_all(contents)
            .unwrap_or_else(|e| panic!("write {path} into the container: {e}"));
        let out = child.wait_with_output().expect("wait for nsenter");
        assert!(
            out.status.success(),
            "write {path} in the container: {}",
            stderr(&out)
        );
    }

    /// Reads `path` inside the container, or `None` if it cannot.
    pub fn read(&self, path: &str) -> Option<String> {
        let out = self.run(&["cat", path]);
        out.status.success().then(|| stdout(&out))
    }

    /// Installs the package at `deb` (a host path) with `dpkg -i`, as an operator would.
    pub fn install(&self, deb: &Path) {
        let bytes =
            fs::read(deb).unwrap_or_else(|e| panic!("read the package {}: {e}", deb.display()));
        self.write("/root/warren.deb", &bytes, 0o644);
        let out = self.run(&["dpkg", "-i", "/root/warren.deb"]);
        assert!(
            out.status.success(),
            "dpkg -i {} failed in the container: {}{}",
            deb.display(),
            stdout(&out),
            stderr(&out)
        );
    }

    /// Every line `unit` logged, with its syslog priority, as journald stored them.
    pub fn journal(&self, unit: &str) -> Vec<(u8, String)> {
        let text = self.text(&[
            "journalctl",
            "--no-pager",
            "--output=json",
            "--output-fields=PRIORITY,MESSAGE",
            "--unit",
            unit,
        ]);
        text.lines()
            .filter_map(|line| {
                let entry: serde_json::Value = serde_json::from_str(line).ok()?;
                let priority = entry["PRIORITY"].as_str()?.parse().ok()?;
                let message = entry["MESSAGE"].as_str()?.to_string();
                Some((priority, message))
            })
            .collect()
    }

    /// Waits until a line of `unit`'s journal contains `needle`, and returns it.
    pub fn wait_journal(&self, unit: &str, needle: &str, timeout: Duration) -> (u8, String) {
        let mut found = None;
        wait_until(
            timeout,
            &format!("{unit}'s journal to say {needle:?}"),
            || {
                found = self
                    .journal(unit)
                    .into_iter()
                    .find(|(_, line)| line.contains(needle));
                found.is_some()
            },
        );
        found.expect("invariant: found when the wait ends")
    }

    /// The last 100 lines of the container's journal.
    fn journal_tail(&self) -> String {
        let out = self.run(&["journalctl", "--no-pager", "--boot", "--lines=100"]);
        stdout(&out)
    }

    fn boot_log(&self) -> String {
        fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Whether PID 1 is still the container's.
    fn pid1_is_ours(&self) -> bool {
        self.pid1 != 0
            && fs::read_link(format!("/proc/{}/ns/mnt", self.pid1)).ok()
                == Some(self.mount_ns.clone())
    }

    /// Powers the container off and waits for unshare to exit; kills it if that takes too long.
    fn power_off(&mut self) -> Option<ExitStatus> {
        if self.pid1_is_ours() {
            // SIGRTMIN+3 is systemd's "poweroff": every unit is stopped, then PID 1 exits.
            // SAFETY: kill(2) with a PID checked to be the container's PID 1 just above.
            unsafe {
                libc::kill(self.pid1 as libc::pid_t, libc::SIGRTMIN() + 3);
            }
        }
        let deadline = Instant::now() + POWEROFF_WAIT;
        while Instant::now() < deadline {
            match self.unshare.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) => thread::sleep(Duration::from_millis(50)),
                Err(_) => return None,
            }
        }
        eprintln!(
            "the container {} did not power off within {POWEROFF_WAIT:?}; killing it",
            self.name
        );
        // unshare's --kill-child kills PID 1 with it, and with PID 1 the whole namespace.
        let _ = self.unshare.kill();
        self.unshare.wait().ok()
    }

    /// Removes the container's cgroups, deepest first. They empty once the pid namespace is gone;
    /// the kernel may take a moment to let go of them.
    fn remove_cgroups(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if remove_tree(&self.cgroup) || Instant::now() >= deadline {
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        if self.cgroup.exists() {
            eprintln!(
                "the container's cgroup {} could not be removed",
                self.cgroup.display()
            );
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if thread::panicking() && self.pid1_is_ours() {
            eprintln!(
                "the journal of the container {} as the test failed:\n{}",
                self.name,
                self.journal_tail()
            );
        }
        self.power_off();
        self.remove_cgroups();
        // The scratch directory, empty on the host (its tmpfs was the container's), goes with
        // the TempDir.
    }
}

/// Fails, saying why, where the container cannot be made, before anything is created.
fn refuse_unless_possible() {
    let refuse = |why: &str| -> ! {
        panic!(
            "cannot run the systemd tests on this host: {why}. They boot systemd as PID 1 of new \
             pid, mount, uts, ipc and cgroup namespaces (see tests/util/container.rs)"
        )
    };
    if !rustix::process::geteuid().is_root() {
        refuse("they need root");
    }
    for program in [
        "/lib/systemd/systemd",
        "/usr/bin/unshare",
        "/usr/bin/nsenter",
    ] {
        if !Path::new(program).exists() {
            refuse(&format!(
                "{program} is missing (install systemd and util-linux)"
            ));
        }
    }
    let filesystems = fs::read_to_string("/proc/filesystems").unwrap_or_default();
    for fs in ["overlay", "cgroup2"] {
        if !filesystems
            .lines()
            .any(|l| l.split_whitespace().last() == Some(fs))
        {
            refuse(&format!("the kernel does not offer the {fs} file system"));
        }
    }
    if cgroup2_mount().is_none() {
        refuse("no cgroup2 hierarchy is mounted");
    }
}

/// Where the host's cgroup2 hierarchy is mounted.
fn cgroup2_mount() -> Option<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        // The fields after " - " are the file system type, the source and the options.
        let (before, after) = line.split_once(" - ")?;
        if after.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        before.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// The directory of this process's own cgroup in the cgroup2 hierarchy, under which each
/// container gets one.
fn cgroup2_parent() -> PathBuf {
    let mount = cgroup2_mount().expect("invariant: checked by refuse_unless_possible");
    let ours = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let path = ours
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .unwrap_or("/");
    mount.join(path.trim_start_matches('/'))
}

/// Removes the cgroups of containers whose test process is gone (killed before it could).
fn remove_stale_cgroups() {
    let Ok(entries) = fs::read_dir(cgroup2_parent()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(&format!("{CGROUP_PREFIX}-")) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or_default();
        if !Path::new(&format!("/proc/{pid}")).exists() {
            remove_tree(&entry.path());
        }
    }
}

/// Removes the empty cgroup `dir` and those under it, deepest first; whether it is gone.
fn remove_tree(dir: &Path) -> bool {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&entry.path());
            }
        }
    }
    // A cgroup is removed with rmdir, and only when it holds no process and no cgroup.
    let _ = fs::remove_dir(dir);
    !dir.exists()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The package under test: `WARREN_TEST_DEB`, or what `cargo deb` writes for this version.
/// Panics, saying how to build it, when there is none.
pub fn package() -> PathBuf {
    if let Some(path) = std::env::var_os("WARREN_TEST_DEB") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "WARREN_TEST_DEB names {}, which is not a file",
            path.display()
        );
        return path;
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let arch = Command::new("dpkg")
        .arg("--print-architecture")
        .output()
        .map(|out| stdout(&out).trim().to_string())
        .unwrap_or_else(|_| "amd64".into());
    let path = target.join(format!(
        "debian/warren_{}-1_{arch}.deb",
        env!("CARGO_PKG_VERSION")
    ));
    assert!(
        path.is_file(),
        "no package to install: build it with `cargo deb --locked` (it writes {}), or set \
         WARREN_TEST_DEB to a .deb; `.ci/run systemd` does both",
        path.display()
    );
    path
}
