//! Leases: the runs this process drives keep a fresh heartbeat in the store; runs whose producer is gone are taken over
//! by a replica that follows them, or marked `interrupted` by any replica when nobody does (see [`crate::store`]).

use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::engine::Resumed;
use super::events::{RunEvent, interrupted_for_seed_clients, resume_path};
use super::{RunService, follow, named};
use crate::store::{LogRow, Run, SessionStore, StoreError};

/// How often the events of long-finished runs are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// How many logs of stopped processes' runs are ended at once (four store operations each), leaving the rest of the
/// store's connections to the runs.
const ENDING_AT_ONCE: usize = 4;

/// From now until `stop`, three times per lease (and at once when a run followed here is released): keeps the
/// leases of this process's runs fresh (a run whose lease another process took stops here), notes the runs followed
/// here but produced elsewhere, takes over those whose producer is gone, and marks `interrupted` the runs of stopped
/// processes that nobody follows (ending their logs with `run_interrupted` + `done`, so late followers end too).
/// Once a minute, sweeps the events of runs that finished more than `retention` ago.
///
/// The heartbeat has a loop of its own, beside the rest: taking over or ending many runs at once (a peer's deploy) must
/// not delay this process's own heartbeats past the lease, or its peers would think it gone. The logs of stopped runs
/// are ended beside both, several at a time: a crashed peer may leave thousands, and ending them must not hold up the
/// loop that notes the runs followed here and claims the ones released, or a third replica would mark those
/// interrupted under their followers. The sweep has a loop of its own too.
pub async fn maintain(
    runs: RunService,
    lease: Duration,
    retention: Duration,
    stop: CancellationToken,
) {
    let (stopped, to_end) = mpsc::unbounded_channel();
    tokio::join!(
        keep_leases(&runs, lease, &stop),
        look_after_others(&runs, lease, &stop, stopped),
        end_logs(&runs, to_end),
        sweep(runs.store(), retention, &stop),
    );
}

/// Refreshes the heartbeat of the runs this process drives, every third of the lease; a run whose lease another
/// process took stops here.
async fn keep_leases(runs: &RunService, lease: Duration, stop: &CancellationToken) {
    let (store, live, log) = (runs.store(), runs.live(), runs.log());
    let mut tick = tokio::time::interval(lease / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let driving = live.ids();
        match store.heartbeat(runs.instance_id(), &driving).await {
            Ok(held) => {
                let still = live.ids();
                for run_id in driving {
                    if !held.contains(&run_id) && still.contains(&run_id) {
                        log.lost_lease(run_id);
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "could not refresh the leases of running runs"),
        }
    }
}

/// Notes the runs followed here, takes over those whose producer is gone, and marks interrupted the runs of stopped
/// processes that nobody follows (handing them to `stopped`, whose logs are ended).
async fn look_after_others(
    runs: &RunService,
    lease: Duration,
    stop: &CancellationToken,
    stopped: mpsc::UnboundedSender<Vec<(Uuid, u64)>>,
) {
    let (store, log) = (runs.store(), runs.log());
    let mut tick = tokio::time::interval(lease / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = log.claimable() => {}
            () = stop.cancelled() => return,
        }
        if let Err(error) = store.touch_followed(&log.followed_remotely()).await {
            tracing::warn!(%error, "could not note the runs followed here");
        }
        runs.take_over_followed().await;
        match store.interrupt_stale(lease).await {
            Ok(interrupted) if !interrupted.is_empty() => {
                // The receiver lives as long as this loop.
                let _ = stopped.send(interrupted);
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(%error, "could not look for the runs of stopped processes")
            }
        }
    }
}

/// From now until `stop`, once a minute: deletes the events of runs that finished more than `retention` ago.
async fn sweep(store: &SessionStore, retention: Duration, stop: &CancellationToken) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        match store.sweep_events(retention).await {
            Ok(0) => {}
            Ok(rows) => tracing::info!(rows, "swept the events of finished runs"),
            Err(error) => tracing::warn!(%error, "could not sweep the run log"),
        }
    }
}

/// Ends the logs of the runs marked interrupted, each batch [`ENDING_AT_ONCE`] at a time, until the loop that marks
/// them stops.
async fn end_logs(runs: &RunService, mut to_end: mpsc::UnboundedReceiver<Vec<(Uuid, u64)>>) {
    let (store, log) = (runs.store(), runs.log());
    while let Some(interrupted) = to_end.recv().await {
        // A crashed replica may leave thousands: the log line names the first few.
        let count = interrupted.len();
        let first = named(interrupted.iter().map(|(id, _)| *id));
        futures_util::stream::iter(interrupted)
            .for_each_concurrent(ENDING_AT_ONCE, |(run_id, epoch)| async move {
                match end_stopped(store, run_id, epoch, runs.seed_clients()).await {
                    // Followers here of the dead run read its end at once.
                    Ok(last) => log.committed_elsewhere(run_id, last),
                    Err(error) => {
                        tracing::warn!(%run_id, %error, "could not end the log of a stopped run")
                    }
                }
            })
            .await;
        tracing::warn!(count, runs = ?first,
            "marked interrupted the runs of a stopped process that nobody follows");
    }
}

/// Ends the log of run `run_id`, marked interrupted under `epoch` because its process stopped.
async fn end_stopped(
    store: &SessionStore,
    run_id: Uuid,
    epoch: u64,
    seed_clients: bool,
) -> Result<u64, StoreError> {
    match store.get_run(run_id).await? {
        Some(run) if run.epoch == epoch => end_log(store, &run, seed_clients).await,
        // Deleted with its chat, or moved on since.
        _ => Ok(0),
    }
}

/// Ends the log of a run marked interrupted because its process stopped: stores the answer so far, read back from its
/// log, and appends `run_interrupted` (reason `stopped`) and `done` after its last event, under the run's epoch (the
/// one the mark raised it to). A log that ends with `done` already (its process stored its last events late, once the
/// store took them again, but not how the run ended) is left as it is. Returns the seq of the log's last event.
pub(super) async fn end_log(
    store: &SessionStore,
    run: &Run,
    seed_clients: bool,
) -> Result<u64, StoreError> {
    let events = store.events_of(run.id).await?;
    let last = events.last().map_or(0, |(seq, _)| *seq);
    store
        .save_partial(run.id, &Resumed::from_log(&events).output)
        .await?;
    if follow::ends(&events) {
        return Ok(last);
    }
    let interrupted = RunEvent::RunInterrupted {
        reason: "stopped",
        resume: resume_path(run.chat_id, run.id),
    };
    let mut ending = vec![interrupted];
    if seed_clients {
        ending.push(interrupted_for_seed_clients("stopped"));
    }
    ending.push(RunEvent::Done);
    let count = ending.len() as u64;
    let events = ending
        .iter()
        .map(|event| serde_json::to_string(event).expect("run events always serialize"))
        .collect::<Vec<_>>()
        .join("\n");
    store
        .append_events_apart(&[LogRow {
            run_id: run.id,
            epoch: run.epoch,
            seq: last + 1,
            last_seq: last + count,
            events,
        }])
        .await?;
    Ok(last + count)
}
