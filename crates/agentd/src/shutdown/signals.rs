//! The signals that start a shutdown: SIGTERM and SIGINT from the operating system, or a test's own trigger; SIGQUIT,
//! which skips the delay and the drain; and the ones that must not kill the process by their default action (SIGHUP,
//! SIGUSR1, SIGUSR2), which are logged and ignored: settings are read at start only.

use std::fmt;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

/// A request to stop, from the operating system or from a test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Terminate,
    Interrupt,
    /// Stop now: no delay, no drain; what is still going is ended (or released) visibly, as at the drain deadline.
    Quit,
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Terminate => "SIGTERM",
            Self::Interrupt => "SIGINT",
            Self::Quit => "SIGQUIT",
        })
    }
}

/// Listens for SIGTERM and SIGINT from now on. Install before announcing the service, so a signal sent as soon as the
/// service is up is never met by the default action (dying mid-stream).
pub fn os_signals() -> std::io::Result<mpsc::Receiver<Signal>> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut quit = signal(SignalKind::quit())?;
    let mut ignored = [
        ("SIGHUP", signal(SignalKind::hangup())?),
        ("SIGUSR1", signal(SignalKind::user_defined1())?),
        ("SIGUSR2", signal(SignalKind::user_defined2())?),
    ];
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let stray =
                futures_util::future::select_all(ignored.iter_mut().map(|(name, stream)| {
                    Box::pin(async move { stream.recv().await.map(|()| *name) })
                }));
            let received = tokio::select! {
                Some(()) = terminate.recv() => Signal::Terminate,
                Some(()) = interrupt.recv() => Signal::Interrupt,
                Some(()) = quit.recv() => Signal::Quit,
                (Some(name), _, _) = stray => {
                    tracing::warn!(signal = name, "signal received and ignored: settings are read at start only");
                    continue;
                }
                else => break,
            };
            if tx.send(received).await.is_err() {
                break;
            }
        }
    });
    Ok(rx)
}
