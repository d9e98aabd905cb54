//! The shutdown sequence, top to bottom.
//!
//! States: serving → (SIGTERM/SIGINT) → stopping → draining → closing → exit.
//!
//! 1. The first signal is logged and `/readyz` answers 503 at once. For `SHUTDOWN_DELAY` nothing else changes, so load
//!    balancers can take the replica out while it still serves.
//! 2. Draining: new streams are refused (503, `Retry-After`, `Connection: close`); the listener stays open so that
//!    answer can be given, and the other routes keep working. Open streams run on; every 5 s a log line says how many,
//!    and names the oldest runs. The drain ends when none is left or at `DRAIN_TIMEOUT`. The store is told the process
//!    will close (SQLite keeps its WAL small from then on, so that emptying it at the end is short).
//! 3. Closing, stage by stage ([`Stage`]; components register in theirs at build time, see [`Stages`]): every run
//!    still going ends with `run_interrupted` + `done` and records its end, and their bodies are released; the HTTP
//!    server stops (idle keep-alive connections close) and the gRPC server stops (in-flight calls get
//!    `GRPC_SHUTDOWN_GRACE`, then are cut); run leases stop being refreshed; the store closes last; the process exits 0.
//!
//! With `SHUTDOWN_MODE=handoff`, step 2 begins by telling every open stream to `reconnect` elsewhere (and closing idle
//! connections); it then waits for the runs still producing here, not for streams, and step 3 releases the runs still
//! going for another replica to continue instead of interrupting them.
//!
//! gRPC answers all through 1 and 2 (the main application may still list chats), while its health service says
//! NOT_SERVING from the first signal.
//!
//! A second signal during 1 or 2 goes straight to 3. A watchdog thread started by the first signal ends the process at
//! `SHUTDOWN_TIMEOUT` with [`EXIT_FORCED`], logging what was still running stage by stage, however stuck the runtime
//! is: a timeout around a future would not stop tasks that were spawned.

mod signals;
mod watchdog;

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic_health::server::HealthReporter;

use tokio_util::sync::CancellationToken;

use crate::config::{ShutdownBudget, ShutdownMode};
use crate::grpc;
use crate::metrics::Metrics;
use crate::runs::LiveRuns;
use crate::stages::{PROGRESS_EVERY, Stage, Stages};
use crate::store::SessionStore;
use crate::stream_tracker::{DrainOutcome, StreamTracker};
pub use signals::{Signal, os_signals};

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
    /// Cancelled when a handoff drain begins: every open stream sends `reconnect` and ends, and idle connections
    /// close.
    pub handoff: CancellationToken,
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

/// What the sequence drives; everything else it stops is registered in [`Stages`].
#[derive(Debug)]
pub struct Shutdown {
    pub lifecycle: Arc<Lifecycle>,
    /// Open streams: admission stops, then the drain waits for them.
    pub tracker: StreamTracker,
    pub metrics: Arc<Metrics>,
    /// The runs this process drives, named by the progress lines.
    pub live_runs: LiveRuns,
    /// Says NOT_SERVING from the first signal.
    pub grpc_health: HealthReporter,
    pub stages: Arc<Stages>,
    /// Told when the drain begins that it will close (it closes in the last stage).
    pub store: SessionStore,
}

/// How long the sequence leaves the watchdog to end the process once the hard deadline is reached.
const WATCHDOG_MARGIN: Duration = Duration::from_secs(1);

/// How many of the oldest runs a progress line names.
const NAMED_RUNS: usize = 3;

impl Shutdown {
    /// Runs the whole sequence after the first `signal`; returns when the process may exit 0.
    pub async fn run(
        self,
        budget: ShutdownBudget,
        first: Signal,
        signals: &mut mpsc::Receiver<Signal>,
    ) -> Outcome {
        let Self {
            lifecycle,
            tracker,
            metrics,
            live_runs,
            grpc_health,
            stages,
            store,
        } = self;
        let hard_deadline = Instant::now() + budget.timeout;
        lifecycle.enter(Phase::Stopping);
        grpc::set_not_serving(&grpc_health).await;
        tracing::info!(signal = %first, open_streams = tracker.open(), delay_s = budget.delay.as_secs_f64(),
            drain_s = budget.drain.as_secs_f64(), timeout_s = budget.timeout.as_secs_f64(),
            "shutdown signal received; readiness is off");
        watchdog::spawn(
            budget.timeout,
            Arc::clone(&lifecycle),
            tracker.clone(),
            Arc::clone(&stages),
        );

        // 1. Keep serving while load balancers notice the failing readiness (SIGQUIT: no delay, no drain).
        let mut hurry = first == Signal::Quit;
        if !budget.delay.is_zero() && !hurry {
            tokio::select! {
                () = tokio::time::sleep(budget.delay) => {}
                Some(again) = signals.recv() => {
                    tracing::warn!(signal = %again, "second signal during the shutdown delay; closing now");
                    hurry = true;
                }
            }
        }

        // 2. Stop admitting; let the open streams finish (drain), or hand them over and let the runs produce on
        // (handoff).
        tracker.begin_shutdown();
        lifecycle.enter(Phase::Draining);
        store.closing_soon();
        if budget.mode == ShutdownMode::Handoff {
            lifecycle.handoff.cancel();
            tracing::info!(
                open_streams = tracker.open(),
                runs = live_runs.len(),
                "handing off: open streams are told to reconnect elsewhere"
            );
        }
        if !hurry && budget.mode == ShutdownMode::Handoff {
            let started = Instant::now();
            tokio::select! {
                () = produce_on(&tracker, &live_runs, started + budget.drain) => {}
                Some(again) = signals.recv() => {
                    tracing::warn!(signal = %again, runs = live_runs.len(),
                        "second signal during the handoff drain; releasing the runs still producing");
                }
            }
            metrics.drain_finished(started.elapsed());
        } else if !hurry {
            let started = Instant::now();
            tracing::info!(
                open_streams = tracker.open(),
                drain_s = budget.drain.as_secs_f64(),
                "draining: new streams are refused, open streams run on"
            );
            tokio::select! {
                outcome = drain(&tracker, &live_runs, started + budget.drain) => match outcome {
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

        // 3. End what is left, visibly, then stop serving, stage by stage: runs, servers, background work, store.
        lifecycle.enter(Phase::Closing);
        for stage in Stage::ALL {
            stages.stop(stage, hard_deadline).await;
            let stuck = stage == Stage::Runs
                && matches!(
                    tracker.wait_for_drain(hard_deadline).await,
                    DrainOutcome::TimedOut { .. }
                );
            if stuck || Instant::now() >= hard_deadline {
                // The watchdog ends the process now, naming what is left; this path only makes sure the exit is
                // non-zero should the watchdog be missing.
                tokio::time::sleep(WATCHDOG_MARGIN).await;
                tracing::error!(open_streams = tracker.open(), pending = ?stages.pending(),
                    "shutdown reached its timeout with work still running");
                return Outcome::Forced;
            }
        }
        tracing::info!("shutdown complete");
        Outcome::Clean
    }
}

/// How a shutdown ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Everything finished inside the budget: exit 0.
    Clean,
    /// The hard deadline cut something: exit [`EXIT_FORCED`].
    Forced,
}

/// Handoff: waits until no run is producing here or `deadline`, saying every 5 s how many runs are still producing and
/// how many followers this replica still has.
async fn produce_on(tracker: &StreamTracker, live_runs: &LiveRuns, deadline: Instant) {
    let mut progress = tokio::time::interval_at(Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
    let mut check = tokio::time::interval(RUNS_CHECK_EVERY);
    loop {
        if live_runs.is_empty() {
            tracing::info!("handed off: no run is producing here");
            return;
        }
        if Instant::now() >= deadline {
            tracing::info!(
                runs = live_runs.len(),
                followers = tracker.open(),
                "drain timeout reached; releasing the runs still producing for another replica to continue"
            );
            return;
        }
        tokio::select! {
            _ = check.tick() => {}
            _ = progress.tick() => {
                let left = deadline.saturating_duration_since(Instant::now());
                tracing::info!(runs = live_runs.len(), followers = tracker.open(), oldest_runs = ?named(live_runs),
                    left_s = left.as_secs(), "handing off: runs still producing");
            }
        }
    }
}

/// How often a handoff drain looks whether runs are still producing.
const RUNS_CHECK_EVERY: Duration = Duration::from_millis(50);

/// The oldest runs, with their age, as a progress line names them.
fn named(live_runs: &LiveRuns) -> Vec<String> {
    live_runs
        .oldest(NAMED_RUNS)
        .into_iter()
        .map(|(run, age)| format!("{run} ({}s)", age.as_secs()))
        .collect()
}

/// Waits for the open streams to end or `deadline`, saying every 5 s how many are open and which runs are oldest.
async fn drain(tracker: &StreamTracker, live_runs: &LiveRuns, deadline: Instant) -> DrainOutcome {
    let mut progress = tokio::time::interval_at(Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
    let drained = tracker.wait_for_drain(deadline);
    tokio::pin!(drained);
    loop {
        tokio::select! {
            outcome = &mut drained => return outcome,
            _ = progress.tick() => {
                let left = deadline.saturating_duration_since(Instant::now());
                tracing::info!(open_streams = tracker.open(), runs = live_runs.len(), oldest_runs = ?named(live_runs),
                    left_s = left.as_secs(), "draining: streams still open");
            }
        }
    }
}
