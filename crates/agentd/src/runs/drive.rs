//! One run's task, from `run_started` to `done`: races the engine against the shutdown deadline, the stop button and
//! nobody following, then stores how the run ended and appends its last events to the log.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::engine::{self, Failure, RunContext, Stop, millis};
use super::events::{RunEvent, resume_path};
use super::log::{LiveLog, RunWriter};
use super::recorder::Recorder;
use crate::metrics::RunOutcome;
use crate::store::RunStatus;

/// Drives one run to its end, appending its events to the log.
pub(super) async fn drive(ctx: RunContext, mut out: RunWriter) -> RunOutcome {
    let started = Instant::now();
    let _live = ctx.live.enter(ctx.run_id);
    let (outcome, failure) = run(&ctx, &mut out, started).await;
    ctx.metrics.run_finished(outcome, failure.map(|f| f.code));
    tracing::info!(run_id = %ctx.run_id, chat_id = %ctx.chat_id, outcome = outcome.as_str(),
        elapsed_ms = started.elapsed().as_millis() as u64, "run ended");
    outcome
}

async fn run(
    ctx: &RunContext,
    out: &mut RunWriter,
    started: Instant,
) -> (RunOutcome, Option<Failure>) {
    // `run_started` is already in the log: it was stored with the run.
    let live = Arc::clone(out.live());
    let mut recorder = Recorder::new(ctx.store.clone(), ctx.run_id);
    let result = tokio::select! {
        biased;
        _ = ctx.interrupt.cancelled() => Err(Stop::Interrupted),
        _ = live.cancel.cancelled() => Err(Stop::Cancelled),
        _ = live.unlogged.cancelled() => Err(Stop::StoreFailed),
        () = unfollowed(ctx, &live) => Err(Stop::Detached),
        result = engine::agent_loop(ctx, out, &mut recorder) => result,
    };
    let (mut outcome, status, mut failure, reason) = match result {
        Ok(()) => (RunOutcome::Completed, RunStatus::Completed, None, None),
        Err(Stop::Failed(failure)) => {
            tracing::warn!(run_id = %ctx.run_id, code = failure.code.as_str(), error = %failure.message, "run failed");
            (RunOutcome::Failed, RunStatus::Failed, Some(failure), None)
        }
        Err(Stop::StoreFailed) => (
            RunOutcome::Failed,
            RunStatus::Failed,
            Some(Failure::store("the run")),
            None,
        ),
        Err(Stop::Interrupted) => (
            RunOutcome::Interrupted,
            RunStatus::Interrupted,
            None,
            Some(("shutdown", "the service shut down before the run ended")),
        ),
        Err(Stop::Cancelled) => (
            RunOutcome::Cancelled,
            RunStatus::Interrupted,
            None,
            Some(("cancelled", "the run was cancelled")),
        ),
        Err(Stop::Detached) => (
            RunOutcome::Detached,
            RunStatus::Interrupted,
            None,
            Some(("detached", "nobody followed the run for DETACH_GRACE")),
        ),
    };
    let error = match (&failure, reason) {
        (Some(failure), _) => Some(failure.message.clone()),
        (None, Some((_, why))) => Some(why.to_owned()),
        (None, None) => None,
    };
    let end = match recorder.finish(status, error).await {
        Ok(end) => Some(end),
        Err(store_error) => {
            tracing::error!(run_id = %ctx.run_id, error = %store_error, "could not store how the run ended");
            if outcome == RunOutcome::Completed {
                outcome = RunOutcome::Failed;
                failure = Some(Failure::store("the answer"));
            }
            None
        }
    };
    let last = match (end, &failure, reason) {
        (_, Some(failure), _) => RunEvent::RunFailed {
            error: failure.message.clone(),
            code: failure.code.as_str(),
        },
        (_, None, Some((reason, _))) => RunEvent::RunInterrupted {
            reason,
            resume: resume_path(ctx.chat_id, ctx.run_id),
        },
        (Some(end), None, None) => {
            out.emit(&RunEvent::FinalAnswer {
                output: end.output,
                usage: end.usage,
            })
            .await;
            RunEvent::RunCompleted {
                elapsed_ms: millis(started.elapsed()),
            }
        }
        (None, None, None) => unreachable!("a completed run that could not be stored has failed"),
    };
    out.emit(&last).await;
    out.emit(&RunEvent::Done).await;
    (outcome, failure)
}

/// Completes when nobody has followed the run for `DETACH_GRACE`: no follower here, and no other replica noted one.
async fn unfollowed(ctx: &RunContext, live: &LiveLog) {
    loop {
        live.unfollowed().await;
        tokio::time::sleep(ctx.detach_grace).await;
        if live.followers() > 0 {
            continue;
        }
        let window = ctx.lease.max(ctx.detach_grace);
        match ctx.store.followed_within(ctx.run_id, window).await {
            Ok(true) => {
                // Someone follows it elsewhere; look again after another grace.
                tokio::time::sleep(ctx.detach_grace.max(Duration::from_secs(1))).await;
            }
            Ok(false) => return,
            Err(error) => {
                tracing::warn!(run_id = %ctx.run_id, %error, "could not tell whether the run is followed elsewhere");
                return;
            }
        }
    }
}
