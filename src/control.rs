//! The control socket: a Unix socket on which `warren run` takes the operator's `warren pause`,
//! `warren resume` and `warren reload`, and the client side that sends them.
//!
//! One request per connection, one line of JSON each way: `{"command": "pause", "config":
//! "/etc/warren/orders.toml"}`, answered by `{"message": "paused: ..."}` (with `"refusal":
//! "config"` or `"busy"` when the daemon refused). The request
//! names the client's configuration file, and the server refuses one that is not its own, so that
//! two configurations that happen to share a socket path cannot steer each other's daemon. The
//! socket is made mode 0660 in `/run/warren` (systemd's RuntimeDirectory for the units) unless
//! `control.socket` says otherwise. This module moves requests and answers; what they do is the
//! caller's (`lib.rs`, then the supervisor).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config;

/// How long either side waits for the other's line. The server's answer can take as long as
/// the supervisor's (10 s at most), and a reload reads the configuration first.
const LINE_WAIT: Duration = Duration::from_secs(30);
/// The longest request line read.
const MAX_REQUEST: u64 = 64 * 1024;

/// What the operator asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Command {
    Pause,
    Resume,
    Reload,
}

/// Why a request was refused, as the client sorts it into an exit code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Refusal {
    /// The configuration is at fault: a reloaded file that does not validate, or a socket
    /// shared by two configurations.
    Config,
    /// warren cannot do it now (it is stopping).
    Busy,
}

#[derive(Serialize, Deserialize)]
struct Request {
    command: Command,
    config: PathBuf,
}

/// The daemon's answer: its line, and why it refused, if it did.
#[derive(Serialize, Deserialize)]
struct Answer {
    message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refusal: Option<Refusal>,
}

/// What the daemon answers to a command: one line, or the refusal and its line.
pub type Response = Result<String, (Refusal, String)>;

/// A listening control socket. Dropping it removes the socket file; the thread that answers on
/// it ends with the process.
pub struct Server {
    path: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Listens on `control.socket` for the daemon of the configuration at `config_path`, and answers
/// each command with `handle`, on a thread of its own.
///
/// A socket that cannot be made is an error (exit 78) when the file sets `control.socket`; when
/// the path is only the default one (`/run/warren/<name>.sock`, which a user without root may not
/// create), it is a warning and `None`: warren runs without it, and SIGHUP still reloads.
pub fn serve(
    control: &config::Control,
    config_path: &Path,
    handle: impl Fn(Command) -> Response + Send + 'static,
) -> Result<Option<Server>, String> {
    let path = &control.socket;
    let listener = match listen(path) {
        Ok(listener) => listener,
        Err(e) if control.explicit => return Err(format!("control.socket: {e}")),
        Err(e) => {
            log::warn!(
                "no control socket: {e}; warren pause, resume and reload cannot reach this process \
                 (set control.socket to a path it may create; SIGHUP still reloads)"
            );
            return Ok(None);
        }
    };
    let own = canonical(config_path);
    thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let answered = stream.and_then(|stream| answer(stream, &own, &handle));
                if let Err(e) = answered {
                    log::debug!("control socket: {e}");
                }
            }
        })
        .map_err(|e| format!("cannot start the control thread: {e}"))?;
    log::debug!(
        "listening for warren pause, resume and reload on {}",
        path.display()
    );
    Ok(Some(Server { path: path.clone() }))
}

/// Binds `path`, replacing a socket file that no process listens on any more (one a killed
/// warren left behind), but never one that another process still answers on.
fn listen(path: &Path) -> Result<UnixListener, String> {
    let shown = path.display();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let listener = match UnixListener::bind(path) {
        Ok(listener) => listener,
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            if UnixStream::connect(path).is_ok() {
                return Err(format!(
                    "another process listens on {shown}: give each warren run its own control.socket"
                ));
            }
            std::fs::remove_file(path).map_err(|e| format!("cannot replace {shown}: {e}"))?;
            UnixListener::bind(path).map_err(|e| format!("cannot listen on {shown}: {e}"))?
        }
        Err(e) => return Err(format!("cannot listen on {shown}: {e}")),
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| format!("cannot set the mode of {shown}: {e}"))?;
    Ok(listener)
}

/// Reads one request from `stream`, and writes the answer.
fn answer(stream: UnixStream, own: &Path, handle: &impl Fn(Command) -> Response) -> io::Result<()> {
    stream.set_read_timeout(Some(LINE_WAIT))?;
    stream.set_write_timeout(Some(LINE_WAIT))?;
    let mut line = String::new();
    BufReader::new((&stream).take(MAX_REQUEST)).read_line(&mut line)?;
    let outcome = match serde_json::from_str::<Request>(&line) {
        Err(e) => Err((Refusal::Busy, format!("not a request: {e}"))),
        Ok(request) if canonical(&request.config) != own => Err((
            Refusal::Config,
            format!(
                "this control socket belongs to the warren run of {}, not of {}: give each configuration its own control.socket",
                own.display(),
                request.config.display()
            ),
        )),
        Ok(request) => handle(request.command),
    };
    let answer = match outcome {
        Ok(message) => Answer {
            message,
            refusal: None,
        },
        Err((refusal, message)) => Answer {
            message,
            refusal: Some(refusal),
        },
    };
    write_line(&stream, &answer)
}

/// Writes `value` as one line of JSON.
fn write_line(mut stream: &UnixStream, value: &impl Serialize) -> io::Result<()> {
    let mut text = serde_json::to_string(value).expect("invariant: requests and answers serialise");
    text.push('\n');
    stream.write_all(text.as_bytes())
}

/// Why the client's command did not get an answer of the daemon's own.
#[derive(Debug)]
pub enum SendError {
    /// No daemon listens on the socket (or it vanished mid-request): exit 69.
    Unreachable(String),
    /// The daemon refused: exit 78 for [`Refusal::Config`], 75 for [`Refusal::Busy`].
    Declined(Refusal, String),
}

/// Sends `command` to the daemon of the configuration at `config_path`, through
/// `control.socket`, and returns its answer.
pub fn send(
    control: &config::Control,
    config_path: &Path,
    command: Command,
) -> Result<String, SendError> {
    let path = &control.socket;
    let unreachable = |e: io::Error| {
        SendError::Unreachable(format!(
            "no warren run answers on {} ({e}); is warren running with {}? (control.socket names the socket)",
            path.display(),
            config_path.display()
        ))
    };
    let stream = UnixStream::connect(path).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(LINE_WAIT))
        .map_err(unreachable)?;
    stream
        .set_write_timeout(Some(LINE_WAIT))
        .map_err(unreachable)?;
    let request = Request {
        command,
        config: canonical(config_path),
    };
    write_line(&stream, &request).map_err(unreachable)?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .map_err(unreachable)?;
    let answer: Answer = serde_json::from_str(&line).map_err(|e| {
        unreachable(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the answer is not warren's: {e}"),
        ))
    })?;
    match answer.refusal {
        None => Ok(answer.message),
        Some(refusal) => Err(SendError::Declined(refusal, answer.message)),
    }
}

/// `path` made absolute, with links resolved, so that two spellings of one file compare equal.
fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control(dir: &Path) -> config::Control {
        config::Control {
            socket: dir.join("c.sock"),
            explicit: true,
        }
    }

    #[test]
    fn a_command_gets_the_daemons_answer_and_a_stranger_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let own = dir.path().join("w.toml");
        let other = dir.path().join("other.toml");
        std::fs::write(&own, "").unwrap();
        std::fs::write(&other, "").unwrap();
        let control = control(dir.path());
        let server = serve(&control, &own, |command| match command {
            Command::Reload => Err((Refusal::Config, "w.toml:3: bad".into())),
            other => Ok(format!("did {other:?}")),
        })
        .unwrap()
        .expect("listening");
        assert_eq!(send(&control, &own, Command::Pause).unwrap(), "did Pause");
        assert!(matches!(
            send(&control, &own, Command::Reload),
            Err(SendError::Declined(Refusal::Config, line)) if line == "w.toml:3: bad"
        ));
        assert!(matches!(
            send(&control, &other, Command::Pause),
            Err(SendError::Declined(Refusal::Config, line)) if line.contains("belongs to the warren run of")
        ));
        let mode = std::fs::metadata(&control.socket)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o660);

        // A second daemon cannot take the socket from a live one.
        let taken = serve(&control, &own, |_| Ok(String::new())).err().unwrap();
        assert!(taken.contains("another process listens on"), "{taken}");
        drop(server);
        assert!(!control.socket.exists(), "the socket file is removed");
        assert!(matches!(
            send(&control, &own, Command::Pause),
            Err(SendError::Unreachable(why)) if why.contains("no warren run answers on")
        ));
    }

    #[test]
    fn a_socket_left_by_a_dead_process_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let control = control(dir.path());
        drop(UnixListener::bind(&control.socket).unwrap());
        assert!(control.socket.exists());
        let own = dir.path().join("w.toml");
        let _server = serve(&control, &own, |_| Ok("ok".into()))
            .unwrap()
            .expect("listening");
        assert_eq!(send(&control, &own, Command::Resume).unwrap(), "ok");
    }
}
