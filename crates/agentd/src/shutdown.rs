//! The shutdown sequence, top to bottom.
//!
//! States: serving → (SIGTERM/SIGINT) → stopping → draining → closing → exit.
//!
//! 1. The first signal is logged and `/readyz` answers 503 at once. For `SHUTDOWN_DELAY` nothing else changes, so load
//!    balancers can take the replica out while it still serves.
//! 2. Draining: new streams are refused (503, `Retry-After`, `Connection: close`); the listener stays open so that
//!    answer can be given, and the other routes keep working. Open streams run on; every 5 s a log line says how many.
//!    The drain ends when none is left or at `DRAIN_TIMEOUT`.
//! 3. Closing: every run still going ends with `run_interrupted` + `done`; when their bodies are released and the runs
//!    have recorded their end, the HTTP server stops (idle keep-alive connections close), the gRPC server stops
//!    (in-flight calls get `GRPC_SHUTDOWN_GRACE`, then are cut), run leases stop being refreshed, the store closes
//!    last, and the process exits 0.
//!
//! gRPC answers all through 1 and 2 (the main application may still list chats), while its health service says
//! NOT_SERVING from the first signal.
//!
//! A second signal during 1 or 2 goes straight to 3. A watchdog thread started by the first signal ends the process at
//! `SHUTDOWN_TIMEOUT` with [`EXIT_FORCED`], logging what was still running, however stuck the runtime is: a timeout
//! around a future would not stop tasks that were spawned.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use tonic_health::server::HealthReporter;

use crate::config::ShutdownBudget;
use crate::grpc;
use crate::metrics::Metrics;
use crate::runs::RunService;
use crate::store::SessionStore;
use crate::stream_tracker::{DrainOutcome, StreamTracker};

/// Exit code when the hard deadline ends the process with work still running.
pub const EXIT_FORCED: i32 = 1;

/// Where the process is in its life; read by `/readyz` and by the watchdog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Serving = 0,
    /// Signal received, `SHUTDOWN_DELAY` running: still admitting, readiness off.
    Stopping = 1,
    Draining = 2,
    Closing = 3,
}

#[derive(Debug, Default)]
pub struct Lifecycle {
    phase: AtomicU8,
}

impl Lifecycle {
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Serving,
            1 => Phase::Stopping,
            2 => Phase::Draining,
            _ => Phase::Closing,
        }
    }

    pub fn is_serving(&self) -> bool {
        self.phase() == Phase::Serving
    }

    fn enter(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Release);
    }
}

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

/// Everything the sequence stops, in the order it stops them.
#[derive(Debug)]
pub struct Stoppable {
    pub lifecycle: Arc<Lifecycle>,
    pub tracker: StreamTracker,
    pub metrics: Arc<Metrics>,
    /// Interrupted at the drain deadline: runs still going end with `run_interrupted`.
    pub runs: RunService,
    /// Cancelled to stop the HTTP accept loop and close its connections.
    pub http_stop: CancellationToken,
    pub http_connections: TaskTracker,
    pub http_server: JoinHandle<()>,
    /// Says NOT_SERVING from the first signal.
    pub grpc_health: HealthReporter,
    /// Cancelled to stop the gRPC server once HTTP has stopped.
    pub grpc_stop: CancellationToken,
    pub grpc_server: JoinHandle<Result<(), tonic::transport::Error>>,
    /// How long in-flight gRPC calls may take once gRPC stops; then they are cut.
    pub grpc_grace: Duration,
    /// Cancelled to stop refreshing run leases, once no run is left.
    pub leases_stop: CancellationToken,
    pub leases: JoinHandle<()>,
    /// Closed last, after every run has written its end.
    pub store: SessionStore,
}

/// Runs the whole sequence after the first `signal`; returns when the process may exit 0.
pub async fn shut_down(
    parts: Stoppable,
    budget: ShutdownBudget,
    first: Signal,
    signals: &mut mpsc::Receiver<Signal>,
) {
    let Stoppable {
        lifecycle,
        tracker,
        metrics,
        runs,
        http_stop,
        http_connections,
        http_server,
        grpc_health,
        grpc_stop,
        mut grpc_server,
        grpc_grace,
        leases_stop,
        leases,
        store,
    } = parts;
    let hard_deadline = Instant::now() + budget.timeout;
    lifecycle.enter(Phase::Stopping);
    grpc::set_not_serving(&grpc_health).await;
    tracing::info!(signal = %first, open_streams = tracker.open(), delay_s = budget.delay.as_secs_f64(),
        drain_s = budget.drain.as_secs_f64(), timeout_s = budget.timeout.as_secs_f64(),
        "shutdown signal received; readiness is off");
    spawn_watchdog(
        budget.timeout,
        Arc::clone(&lifecycle),
        tracker.clone(),
        runs.clone(),
        http_connections.clone(),
    );

    // 1. Keep serving while load balancers notice the failing readiness.
    let mut hurry = false;
    if !budget.delay.is_zero() {
        tokio::select! {
            () = tokio::time::sleep(budget.delay) => {}
            Some(again) = signals.recv() => {
                tracing::warn!(signal = %again, "second signal during the shutdown delay; closing now");
                hurry = true;
            }
        }
    }

    // 2. Stop admitting; let the open streams finish.
    tracker.begin_shutdown();
    lifecycle.enter(Phase::Draining);
    if !hurry {
        let started = Instant::now();
        tracing::info!(
            open_streams = tracker.open(),
            drain_s = budget.drain.as_secs_f64(),
            "draining: new streams are refused, open streams run on"
        );
        tokio::select! {
            outcome = tracker.wait_for_drain(started + budget.drain) => match outcome {
                DrainOutcome::Drained => tracing::info!(took_ms = started.elapsed().as_millis() as u64,
                    "drained: no stream is open"),
                DrainOutcome::TimedOut { open } => tracing::warn!(open_streams = open,
                    "drain timeout reached; interrupting the streams still open"),
            },
            Some(again) = signals.recv() => {
                tracing::warn!(signal = %again, open_streams = tracker.open(),
                    "second signal during the drain; interrupting the streams still open");
            }
        }
        metrics.drain_finished(started.elapsed());
    }

    // 3. End what is left, visibly, then stop serving.
    lifecycle.enter(Phase::Closing);
    runs.interrupt_all();
    if let DrainOutcome::TimedOut { open } = tracker.wait_for_drain(hard_deadline).await {
        // Unreachable in practice: the watchdog ends the process at the same deadline.
        tracing::error!(
            open_streams = open,
            "streams still open at the shutdown timeout"
        );
    }
    runs.wait_for_runs().await;
    http_stop.cancel();
    if let Err(error) = http_server.await {
        tracing::error!(%error, "the HTTP server task failed");
    }
    grpc_stop.cancel();
    match tokio::time::timeout(grpc_grace, &mut grpc_server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(error))) => tracing::error!(%error, "the gRPC server failed"),
        Ok(Err(error)) => tracing::error!(%error, "the gRPC server task failed"),
        Err(_) => {
            grpc_server.abort();
            tracing::warn!(
                grace_s = grpc_grace.as_secs_f64(),
                "gRPC calls still running after the grace; cut"
            );
        }
    }
    leases_stop.cancel();
    if let Err(error) = leases.await {
        tracing::error!(%error, "the lease task failed");
    }
    store.close().await;
    tracing::info!("shutdown complete");
}

/// Ends the process at `timeout` from now if it is still running then, saying what is left. A plain thread, so a
/// blocked or overloaded runtime cannot hold it up.
fn spawn_watchdog(
    timeout: Duration,
    lifecycle: Arc<Lifecycle>,
    tracker: StreamTracker,
    runs: RunService,
    connections: TaskTracker,
) {
    let spawned = std::thread::Builder::new()
        .name("shutdown-watchdog".into())
        .spawn(move || {
            std::thread::sleep(timeout);
            tracing::error!(phase = ?lifecycle.phase(), open_streams = tracker.open(), runs = runs.running(),
                connections = connections.len(), timeout_s = timeout.as_secs_f64(),
                "shutdown timeout reached with work still running; exiting");
            std::process::exit(EXIT_FORCED);
        });
    if let Err(error) = spawned {
        tracing::error!(%error, "could not start the shutdown watchdog; SHUTDOWN_TIMEOUT is not enforced");
    }
}
