//! The one writer task of a process: group commits of what all runs have ready, then their release to followers.

use std::collections::HashMap;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Append, Halt, RunLog};
use crate::runs::live::shrink_if_sparse;
use crate::store::LogRow;

/// Most events in one commit.
const MAX_BATCH: usize = 16_384;
/// Room for events the writer keeps between commits when nothing is waiting.
const KEPT_BATCH: usize = 256;

/// The receiving end of the writer's queue.
#[derive(Debug)]
pub struct WriterQueue(pub(super) mpsc::Receiver<Append>);

/// The writer: commits what all runs have ready, in batches, until `stop` and the queue is empty.
pub async fn write(log: RunLog, mut queue: WriterQueue, stop: CancellationToken) {
    let mut batch = Vec::new();
    loop {
        let first = tokio::select! {
            biased;
            first = queue.0.recv() => first,
            () = stop.cancelled() => queue.0.try_recv().ok(),
        };
        let Some(first) = first else { return };
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.0.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        commit(&log, &mut batch).await;
        // Nothing waiting: the room a burst's batches took goes back (up to 16,384 events, about 1 MB).
        if queue.0.is_empty() {
            batch.shrink_to(KEPT_BATCH);
        }
    }
}

/// How many more times a group commit waits for a busy store before its runs fail.
const BUSY_RETRIES: u32 = 3;

/// Commits one batch, then releases it to the followers.
async fn commit(log: &RunLog, batch: &mut Vec<Append>) {
    let mut rows: Vec<LogRow> = Vec::new();
    let mut row_of: HashMap<Uuid, usize> = HashMap::new();
    let mut finished = Vec::new();
    for append in batch.iter() {
        match row_of.get(&append.run_id) {
            Some(&at) => {
                let row = &mut rows[at];
                row.last_seq = append.seq;
                row.events.push('\n');
                row.events.push_str(&append.json);
            }
            None => {
                row_of.insert(append.run_id, rows.len());
                rows.push(LogRow {
                    run_id: append.run_id,
                    epoch: append.epoch,
                    seq: append.seq,
                    last_seq: append.seq,
                    events: append.json.to_string(),
                });
            }
        }
        if append.last {
            finished.push(append.run_id);
        }
    }
    let started = Instant::now();
    let mut result = log.inner.store.append_events(&rows).await;
    // A store busy past the pool's wait (its one SQLite writer taken by a burst of run starts) is not down: the batch
    // waits its turn again rather than fail runs that are going.
    for attempt in 1..=BUSY_RETRIES {
        if !matches!(&result, Err(error) if error.is_busy()) {
            break;
        }
        tracing::warn!(
            attempt,
            events = batch.len(),
            "the store was busy for a group commit; waiting again"
        );
        result = log.inner.store.append_events(&rows).await;
    }
    let metrics = &log.inner.metrics;
    // Runs whose rows were not stored: the ones that moved on (claimed elsewhere, or gone) and, when the commit
    // failed, the ones the store would not take.
    let mut refused = Vec::new();
    let mut failed = Vec::new();
    match result {
        Ok(moved) => {
            metrics.log_committed(batch.len(), rows.len(), started.elapsed());
            refused = moved;
        }
        Err(error) => {
            // One run's rows can fail the whole batch (a value the store refuses): then commit run by run, so only
            // the runs whose rows cannot be stored go unlogged. A store that cannot be reached fails them all.
            if error.is_unavailable() {
                failed.extend(rows.iter().map(|row| row.run_id));
            } else {
                tracing::warn!(%error, events = batch.len(), runs = rows.len(),
                    "a group commit failed; committing its runs one by one");
                for row in &rows {
                    match log
                        .inner
                        .store
                        .append_events(std::slice::from_ref(row))
                        .await
                    {
                        Ok(moved) => refused.extend(moved),
                        Err(_) => failed.push(row.run_id),
                    }
                }
            }
            if !failed.is_empty() {
                metrics.log_commit_failed();
                tracing::error!(%error, runs = ?failed,
                    "could not commit run events; releasing them to their followers unlogged and stopping those runs");
            }
        }
    }
    // Runs whose chat was deleted: what they still emit goes to their followers here, unlogged.
    let mut deleted = Vec::new();
    for &run_id in &refused {
        if fenced(log, run_id).await {
            deleted.push(run_id);
        }
    }
    for &run_id in &failed {
        if let Some(run) = log.live(run_id) {
            run.halt(Halt::Unlogged);
        }
    }
    {
        let mut live = log.inner.live.lock().expect("run log lock");
        for row in rows
            .iter()
            .filter(|row| !refused.contains(&row.run_id) || deleted.contains(&row.run_id))
        {
            if let Some(run) = live.get(&row.run_id) {
                run.committed.send_replace(row.last_seq);
            }
        }
        for run_id in finished {
            live.remove(&run_id);
        }
        shrink_if_sparse(&mut live);
    }
    // A run taken over here may also have followers that attached while it was produced elsewhere.
    let followed_here = !log.inner.remote.lock().expect("run log lock").is_empty();
    if followed_here {
        for row in rows
            .iter()
            .filter(|row| !refused.contains(&row.run_id) && !failed.contains(&row.run_id))
        {
            log.notified(row.run_id, row.seq, row.last_seq, Some(&row.events));
        }
    }
    batch.clear();
}

/// A run's append was refused: if it still exists, another process holds it now, and this one stops producing it
/// (its followers here read on from the store); if it is gone, its chat was deleted: the run stops. Returns whether
/// it is gone.
async fn fenced(log: &RunLog, run_id: Uuid) -> bool {
    match log.inner.store.get_run(run_id).await {
        Ok(Some(_)) => {
            log.lost_lease(run_id);
            false
        }
        Ok(None) => {
            if let Some(run) = log.live(run_id) {
                run.halt(Halt::Deleted);
            }
            true
        }
        Err(_) => {
            if let Some(run) = log.live(run_id) {
                run.halt(Halt::Unlogged);
            }
            false
        }
    }
}
