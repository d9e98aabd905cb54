//! One run's task, from `run_started` to `done`: races the engine against the shutdown deadline, the stop button and
//! nobody following, then stores how the run ended and appends its last events to the log.

use std::sync::Arc;
use std::time::Duration;

use super::engine::{self, Failure, Opening, Prompt, Resumed, RunContext, Stop, millis};
use super::events::{RunEvent, interrupted_for_seed_clients, resume_path};
use super::log::{Halt, LiveLog, RunWriter};
use super::recorder::Recorder;
use crate::metrics::RunOutcome;
use crate::store::{RunStatus, StoreError};

/// Drives one run, asked `prompt`, to its end (or to where another process takes it over), appending its events to
/// the log; `resumed` is where a continued run picks up.
///
/// A block rather than an `async fn`: an `async fn` keeps its arguments twice in its state (as passed, and moved
/// into its body), and this state is the run's task, held for as long as the run lasts. For the same reason the
/// prompt and what a continued run picks up are made into the run's [`Opening`] before the block: the block and the
/// futures it awaits hold a box of it, not the two.
#[allow(clippy::manual_async_fn)] // On purpose: see above.
pub(super) fn drive(
    ctx: RunContext,
    prompt: Prompt,
    mut out: RunWriter,
    resumed: Resumed,
) -> impl Future<Output = RunOutcome> + Send {
    let continued = resumed != Resumed::default();
    let mut recorder = Recorder::default();
    let opening = Opening::new(prompt, resumed, &mut recorder);
    async move {
        let _live = ctx.live.enter(ctx.run_id);
        let result = run(&ctx, opening, &mut out, &mut recorder).await;
        let (outcome, failure, tokens) = conclude(&ctx, &mut out, &mut recorder, result).await;
        ctx.metrics.run_finished(outcome, failure.map(|f| f.code));
        if continued {
            ctx.metrics.continuation_finished(tokens);
        }
        tracing::info!(run_id = %ctx.run_id, chat_id = %ctx.chat_id, outcome = outcome.as_str(),
            elapsed_ms = ctx.started.elapsed().as_millis() as u64, "run ended");
        outcome
    }
}

/// Runs the agent loop until it ends or something stops it: the shutdown deadline, a halt of the run's log (moved,
/// deleted, cancelled, unlogged), or nobody following it.
///
/// What follows (storing the end, the last events) is [`conclude`]'s, a future of its own: the run's task holds one of
/// the two at a time, and what only the end needs takes no room beside the loop while the run lasts.
async fn run(
    ctx: &RunContext,
    opening: Box<Opening>,
    out: &mut RunWriter,
    recorder: &mut Recorder,
) -> Result<(), Stop> {
    // `run_started` (and, for a continued run, everything before) is already in the log.
    let live = Arc::clone(out.live());
    tokio::select! {
        biased;
        _ = ctx.interrupt.cancelled() => Err(if ctx.handoff {
            Stop::Released
        } else {
            Stop::Interrupted
        }),
        why = live.halted() => Err(match why {
            Halt::Moved => Stop::Fenced,
            Halt::Deleted => Stop::Deleted,
            Halt::Cancelled => Stop::Cancelled,
            Halt::Unlogged => Stop::StoreFailed,
        }),
        () = unfollowed(ctx, &live) => Err(Stop::Detached),
        result = engine::agent_loop(ctx, opening, out, recorder) => result,
    }
}

/// Ends the run as `result` says: releases it, leaves it to the process that holds it now, or stores how it ended
/// and appends its last events. Returns the outcome, the failure and the output tokens.
async fn conclude(
    ctx: &RunContext,
    out: &mut RunWriter,
    recorder: &mut Recorder,
    result: Result<(), Stop>,
) -> (RunOutcome, Option<Failure>, u64) {
    let tokens = recorder.usage.output_tokens;
    let (outcome, status, failure, reason) = match result {
        Err(Stop::Released) => return (release(ctx, out).await, None, tokens),
        Err(Stop::Fenced) => {
            tracing::warn!(run_id = %ctx.run_id, "another process holds the run now; stopped producing it here");
            return (RunOutcome::Fenced, None, tokens);
        }
        Err(Stop::Deleted) => {
            // Nothing is left to store it in: the followers are told, and the run ends.
            tracing::info!(run_id = %ctx.run_id, chat_id = %ctx.chat_id, "the run's chat was deleted; run stopped");
            out.emit(RunEvent::RunInterrupted {
                reason: "deleted",
                resume: resume_path(ctx.chat_id, ctx.run_id),
            })
            .await;
            if ctx.seed_clients {
                out.emit(interrupted_for_seed_clients("deleted")).await;
            }
            out.emit(RunEvent::Done).await;
            return (RunOutcome::Deleted, None, tokens);
        }
        other => ended(ctx, other),
    };
    let (outcome, failure) = finish(ctx, out, recorder, outcome, status, failure, reason).await;
    (outcome, failure, tokens)
}

/// How a run ended, before it is stored: outcome, status, failure and, for an interruption, its reason and text.
type Ending = (
    RunOutcome,
    RunStatus,
    Option<Failure>,
    Option<(&'static str, &'static str)>,
);

fn ended(ctx: &RunContext, result: Result<(), Stop>) -> Ending {
    match result {
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
        Err(Stop::Released | Stop::Fenced | Stop::Deleted) => unreachable!("handled before"),
    }
}

/// Stores how the run ended, then appends its last events; returns the outcome (a completed run whose end could not
/// be stored has failed).
async fn finish(
    ctx: &RunContext,
    out: &mut RunWriter,
    recorder: &mut Recorder,
    mut outcome: RunOutcome,
    status: RunStatus,
    mut failure: Option<Failure>,
    reason: Option<(&'static str, &'static str)>,
) -> (RunOutcome, Option<Failure>) {
    let error = match (&failure, reason) {
        (Some(failure), _) => Some(failure.message.clone()),
        (None, Some((_, why))) => Some(why.to_owned()),
        (None, None) => None,
    };
    let structured = recorder.structured.take();
    let truncated = recorder.truncated;
    let end = match recorder
        .finish(&ctx.store, ctx.run_id, ctx.epoch, status, error)
        .await
    {
        Ok(end) => Some(end),
        Err(StoreError::Fenced(_)) => {
            // Another process claimed the run meanwhile (this one had lost its lease): it writes the end.
            ctx.metrics.fenced();
            tracing::warn!(run_id = %ctx.run_id, "another process holds the run now; its end is not stored here");
            return (RunOutcome::Fenced, None);
        }
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
            out.emit(RunEvent::FinalAnswer {
                output: structured.unwrap_or(serde_json::Value::String(end.output)),
                usage: end.usage,
                truncated,
            })
            .await;
            RunEvent::RunCompleted {
                elapsed_ms: millis(ctx.started.elapsed()),
            }
        }
        (None, None, None) => unreachable!("a completed run that could not be stored has failed"),
    };
    let interrupted = match &last {
        RunEvent::RunInterrupted { reason, .. } if ctx.seed_clients => {
            Some(interrupted_for_seed_clients(reason))
        }
        _ => None,
    };
    out.emit(last).await;
    if let Some(failed) = interrupted {
        out.emit(failed).await;
    }
    out.emit(RunEvent::Done).await;
    (outcome, failure)
}

/// Lets go of the run at the shutdown deadline in handoff mode: once what it produced is committed, it is released
/// (its epoch raised, no owner) and announced in the same commit, so a replica with a follower continues it from its
/// next seq. A run nobody follows is marked `interrupted` by any replica once its lease has run out.
async fn release(ctx: &RunContext, out: &RunWriter) -> RunOutcome {
    out.flushed().await;
    let outcome = match ctx.store.release(ctx.run_id, ctx.epoch).await {
        Ok(true) => {
            tracing::info!(run_id = %ctx.run_id, "run released for another replica to continue");
            RunOutcome::HandedOff
        }
        Ok(false) => RunOutcome::Fenced,
        Err(error) => {
            tracing::warn!(run_id = %ctx.run_id, %error,
                "could not release the run; another replica takes it over once its lease runs out");
            RunOutcome::HandedOff
        }
    };
    out.moved();
    outcome
}

/// Completes when nobody has followed the run for `DETACH_GRACE`: no follower here, and no other replica noted one.
/// A store that cannot say (busy past a request's wait, or unreachable) is asked again later: a run is detached only
/// when nobody is known to follow it, never because a follower elsewhere could not be looked up.
async fn unfollowed(ctx: &RunContext, live: &LiveLog) {
    loop {
        live.unfollowed().await;
        tokio::time::sleep(ctx.detach_grace).await;
        if live.followers() > 0 {
            continue;
        }
        let window = ctx.lease.max(ctx.detach_grace);
        // Boxed: rarely reached, and inline it would enlarge every run's task.
        match Box::pin(ctx.store.followed_within(ctx.run_id, window)).await {
            Ok(true) => {}
            Ok(false) => return,
            // A store too busy to answer in time is noted once for all its waiting requests (`store::waits`): every
            // run detaching in a burst saying so, every second, would flood the log.
            Err(error) if error.is_unavailable() => {
                tracing::debug!(run_id = %ctx.run_id, %error,
                    "could not tell whether the run is followed elsewhere; the run goes on and is looked at again");
            }
            Err(error) => {
                tracing::warn!(run_id = %ctx.run_id, %error,
                    "could not tell whether the run is followed elsewhere; the run goes on and is looked at again");
            }
        }
        // Someone follows it elsewhere, or may: look again after another grace.
        tokio::time::sleep(ctx.detach_grace.max(Duration::from_secs(1))).await;
    }
}
