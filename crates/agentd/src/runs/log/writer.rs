//! The one writer task of a process: group commits of what all runs have ready, then their release to followers.

use std::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Halt, Pending, RunLog};
use crate::runs::live::shrink_if_sparse;
use crate::store::LogRow;

/// Most events in one commit.
const MAX_BATCH: usize = 16_384;

/// The receiving end of the writer's queue.
#[derive(Debug)]
pub struct WriterQueue(pub(super) mpsc::Receiver<Pending>);

/// The writer: commits what all runs have ready, in batches, until `stop` and nothing is left to take.
pub async fn write(log: RunLog, mut queue: WriterQueue, stop: CancellationToken) {
    // Runs with events to take: those told of, and those a full batch left events of.
    let mut runs = Vec::new();
    loop {
        if runs.is_empty() {
            let first = tokio::select! {
                biased;
                first = queue.0.recv() => first,
                () = stop.cancelled() => queue.0.try_recv().ok(),
            };
            let Some(first) = first else { return };
            runs.push(first);
        }
        while let Ok(next) = queue.0.try_recv() {
            runs.push(next);
        }
        commit(&log, &mut runs).await;
    }
}

/// Takes the events of `runs` not taken yet, at most [`MAX_BATCH`] in all, as one row per run; a run with events left
/// over stays in `runs`. Also returns the runs whose `done` is taken, and how many events were.
pub(super) fn take(runs: &mut Vec<Pending>) -> (Vec<LogRow>, Vec<Uuid>, usize) {
    let mut rows = Vec::with_capacity(runs.len());
    let mut finished = Vec::new();
    let mut taken = 0;
    runs.retain(|pending| {
        let mut events = pending.live.events.lock().expect("run log lock");
        let from = events.taken;
        let to = events.all.len().min(from + (MAX_BATCH - taken));
        if to > from {
            let mut text =
                String::with_capacity(events.all[from..to].iter().map(|e| e.len() + 1).sum());
            for (i, json) in events.all[from..to].iter().enumerate() {
                if i > 0 {
                    text.push('\n');
                }
                text.push_str(json);
            }
            rows.push(LogRow {
                run_id: pending.run_id,
                epoch: pending.epoch,
                seq: from as u64 + 1,
                last_seq: to as u64,
                events: text,
            });
            events.taken = to;
            taken += to - from;
        }
        let left = to < events.all.len();
        if !left {
            events.queued = false;
            if events.finished && to > from {
                finished.push(pending.run_id);
            }
        }
        left
    });
    (rows, finished, taken)
}

/// How many more times a group commit waits for a busy store before its runs fail.
const BUSY_RETRIES: u32 = 3;

/// Commits what `runs` have ready (up to a batch), then releases it to the followers.
async fn commit(log: &RunLog, runs: &mut Vec<Pending>) {
    let (rows, finished, events) = take(runs);
    if rows.is_empty() {
        return;
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
            events,
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
            metrics.log_committed(events, rows.len(), started.elapsed());
            refused = moved;
        }
        Err(error) => {
            // One run's rows can fail the whole batch (a value the store refuses): then commit run by run, so only
            // the runs whose rows cannot be stored go unlogged. A store that cannot be reached fails them all.
            if error.is_unavailable() {
                failed.extend(rows.iter().map(|row| row.run_id));
            } else {
                tracing::warn!(%error, events, runs = rows.len(),
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::sync::watch;
    use tokio_util::sync::CancellationToken;
    use uuid::Uuid;

    use super::{MAX_BATCH, take};
    use crate::runs::log::{Events, LiveLog, Pending};

    /// A run told of with `count` events not taken yet (the last its `done` when `finished`).
    fn pending(count: usize, finished: bool) -> Pending {
        let live = Arc::new(LiveLog {
            events: Mutex::new(Events {
                all: (1..=count)
                    .map(|seq| Arc::from(format!("{{\"n\":{seq}}}")))
                    .collect(),
                taken: 0,
                queued: true,
                finished,
            }),
            committed: watch::Sender::new(0),
            halts: Default::default(),
            halted: CancellationToken::new(),
        });
        Pending {
            run_id: Uuid::new_v4(),
            epoch: 1,
            live,
        }
    }

    fn state(pending: &Pending) -> (usize, bool) {
        let events = pending.live.events.lock().unwrap();
        (events.taken, events.queued)
    }

    #[test]
    fn a_batch_takes_up_to_its_size_and_leaves_the_rest_for_the_next() {
        let (long, short) = (pending(MAX_BATCH + 10, true), pending(3, false));
        let (long_id, short_id) = (long.run_id, short.run_id);
        let live = [Arc::clone(&long.live), Arc::clone(&short.live)];
        let mut runs = vec![long, short];

        let (rows, finished, taken) = take(&mut runs);
        assert_eq!(taken, MAX_BATCH);
        assert_eq!(rows.len(), 1, "the long run filled the batch");
        assert_eq!(
            (rows[0].run_id, rows[0].seq, rows[0].last_seq),
            (long_id, 1, MAX_BATCH as u64)
        );
        let lines: Vec<&str> = rows[0].events.split('\n').collect();
        assert_eq!(lines.len(), MAX_BATCH);
        assert_eq!(
            (lines[0], lines[MAX_BATCH - 1]),
            ("{\"n\":1}", &*format!("{{\"n\":{MAX_BATCH}}}"))
        );
        assert!(finished.is_empty(), "the done is not taken yet");
        assert_eq!(runs.len(), 2, "both runs have events left");
        assert_eq!(state(&runs[0]), (MAX_BATCH, true));

        let (rows, finished, taken) = take(&mut runs);
        assert_eq!(taken, 13);
        let spans: Vec<(Uuid, u64, u64)> =
            rows.iter().map(|r| (r.run_id, r.seq, r.last_seq)).collect();
        assert_eq!(
            spans,
            [
                (long_id, MAX_BATCH as u64 + 1, MAX_BATCH as u64 + 10),
                (short_id, 1, 3)
            ]
        );
        assert_eq!(rows[1].events, "{\"n\":1}\n{\"n\":2}\n{\"n\":3}");
        assert_eq!(finished, [long_id], "the long run's done is taken");
        assert!(runs.is_empty());
        for live in &live {
            let events = live.events.lock().unwrap();
            assert!(!events.queued, "a new event tells the writer again");
            assert_eq!(events.taken, events.all.len());
        }
    }
}
