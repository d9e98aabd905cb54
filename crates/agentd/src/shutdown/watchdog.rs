//! The hard deadline: a plain thread that ends the process at `SHUTDOWN_TIMEOUT`, naming what was still running.

use std::sync::Arc;
use std::time::Duration;

use super::{EXIT_FORCED, Lifecycle};
use crate::stages::Stages;
use crate::stream_tracker::StreamTracker;
use crate::telemetry;

/// How long the lines logged before the forced exit may take to be written: the exit is already late.
const LOG_FLUSH: Duration = Duration::from_millis(200);

/// Ends the process at `timeout` from now if it is still running then, saying what is left. A plain thread, so a
/// blocked or overloaded runtime cannot hold it up.
pub(super) fn spawn(
    timeout: Duration,
    lifecycle: Arc<Lifecycle>,
    tracker: StreamTracker,
    stages: Arc<Stages>,
) {
    let spawned = std::thread::Builder::new()
        .name("shutdown-watchdog".into())
        .spawn(move || {
            std::thread::sleep(timeout);
            tracing::error!(phase = ?lifecycle.phase(), open_streams = tracker.open(),
                pending = ?stages.pending(), timeout_s = timeout.as_secs_f64(),
                "shutdown timeout reached with work still running; exiting");
            telemetry::flush(LOG_FLUSH);
            std::process::exit(EXIT_FORCED);
        });
    if let Err(error) = spawned {
        tracing::error!(%error, "could not start the shutdown watchdog; SHUTDOWN_TIMEOUT is not enforced");
    }
}
