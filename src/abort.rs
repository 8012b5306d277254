//! The signal that tells running handlers to give up: [`Abort`], fired by dropping its
//! [`AbortTrigger`] when the shutdown grace runs out or a second stop signal comes. It sits below
//! everything that waits on it (the handlers, the program runner in `child`, the pool), so none
//! of them has to import another for it.

use std::convert::Infallible;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender};
use nix::fcntl::OFlag;

/// Fires when tasks in flight must be abandoned: the shutdown grace has run out, or a second stop
/// signal came. It fires when its [`AbortTrigger`] is dropped, which reaches every clone at once,
/// both as a channel that disconnects (for `select!`) and as a pipe whose write end closes (for
/// `poll`, next to a program's pipes).
#[derive(Clone)]
pub struct Abort {
    receiver: Receiver<Infallible>,
    /// The read end of the pipe: readable (at end of file) once the abort has fired.
    fd: Arc<OwnedFd>,
}

/// Fires its [`Abort`] when dropped.
pub struct AbortTrigger {
    _sender: Sender<Infallible>,
    _write: OwnedFd,
}

impl Abort {
    /// A new abort signal and the trigger that fires it.
    pub fn new() -> io::Result<(AbortTrigger, Abort)> {
        let (sender, receiver) = bounded(0);
        // Close-on-exec: a program that inherited the write end would keep the abort from firing.
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        let trigger = AbortTrigger {
            _sender: sender,
            _write: write,
        };
        Ok((
            trigger,
            Abort {
                receiver,
                fd: Arc::new(read),
            },
        ))
    }

    /// An abort signal that never fires, for running a handler outside a pool.
    pub fn never() -> Abort {
        let (trigger, abort) = Abort::new().expect("invariant: a pipe can be made");
        // Leaking the trigger keeps the signal unfired for the life of the process.
        std::mem::forget(trigger);
        abort
    }

    pub fn receiver(&self) -> &Receiver<Infallible> {
        &self.receiver
    }

    /// Readable once the abort has fired, for `poll`.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Sleeps for `duration` unless the abort fires first. Returns false if it fired.
    pub fn sleep(&self, duration: Duration) -> bool {
        self.receiver
            .recv_timeout(duration)
            .is_err_and(|e| e.is_timeout())
    }
}
