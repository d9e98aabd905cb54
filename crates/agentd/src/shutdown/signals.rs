//! The signals that start a shutdown: SIGTERM and SIGINT from the operating system, or a test's own trigger.

use std::fmt;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

/// A request to stop, from the operating system or from a test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Terminate,
    Interrupt,
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Terminate => "SIGTERM",
            Self::Interrupt => "SIGINT",
        })
    }
}

/// Listens for SIGTERM and SIGINT from now on. Install before announcing the service, so a signal sent as soon as the
/// service is up is never met by the default action (dying mid-stream).
pub fn os_signals() -> std::io::Result<mpsc::Receiver<Signal>> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let received = tokio::select! {
                Some(()) = terminate.recv() => Signal::Terminate,
                Some(()) = interrupt.recv() => Signal::Interrupt,
                else => break,
            };
            if tx.send(received).await.is_err() {
                break;
            }
        }
    });
    Ok(rx)
}
