//! The one writer task of a process: group commits of what all runs have ready, then their release to followers.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Append, Halt, RunLog};
use crate::metrics::Metrics;
use crate::runs::live::shrink_if_sparse;
use crate::runs::named;
use crate::store::{LogRow, StoreError};

/// Most events in one commit.
const MAX_BATCH: usize = 16_384;
/// Room for events the writer keeps between commits when nothing is waiting.
const KEPT_BATCH: usize = 256;

/// How long after its last commit the writer gives the run log's connection back to the store's pool (PostgreSQL keeps
/// it out of the pool between commits): one idle that long is checked before the next commit anyway, and it would
/// keep the buffers of the burst's last commits (up to 256 KB) for as long as no other commit comes.
const IDLE: Duration = Duration::from_secs(1);

/// The receiving end of the writer's queue.
#[derive(Debug)]
pub struct WriterQueue(pub(super) mpsc::Receiver<Append>);

/// The writer: commits what all runs have ready, in batches, until `stop` and the queue is empty. Rows the store did
/// not take are kept and committed again (see `Kept`).
pub async fn write(log: RunLog, mut queue: WriterQueue, stop: CancellationToken) {
    let mut batch = Vec::new();
    let mut kept = Kept::default();
    // When the connection goes back; armed by each commit that leaves nothing waiting.
    let idle = tokio::time::sleep(IDLE);
    tokio::pin!(idle);
    let mut holding = false;
    loop {
        let first = tokio::select! {
            biased;
            first = queue.0.recv() => first,
            () = stop.cancelled() => queue.0.try_recv().ok(),
            () = kept.due() => {
                kept.retry(&log).await;
                holding = true;
                idle.as_mut().reset(tokio::time::Instant::now() + IDLE);
                continue;
            }
            () = &mut idle, if holding => {
                holding = false;
                log.store().log_writer_idle();
                continue;
            }
        };
        let Some(first) = first else {
            kept.last_try(&log).await;
            return;
        };
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.0.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        commit(&log, &mut batch, &mut kept).await;
        if kept.is_due() {
            kept.retry(&log).await;
        }
        // Nothing waiting: the room a burst's batches took goes back (up to 16,384 events, about 1 MB).
        if queue.0.is_empty() {
            batch.shrink_to(KEPT_BATCH);
            // While more is waiting the next commit follows at once: the timer is set only when a wait may begin.
            holding = true;
            idle.as_mut().reset(tokio::time::Instant::now() + IDLE);
        }
    }
}

/// How many more times a group commit waits for a busy store before its runs fail.
const BUSY_RETRIES: u32 = 3;

/// Commits one batch, then releases it to the followers. The events of a run whose earlier rows the store did not take
/// are kept behind those rows, not committed before them.
async fn commit(log: &RunLog, batch: &mut Vec<Append>, kept: &mut Kept) {
    let mut rows: Vec<LogRow> = Vec::new();
    let mut row_of: HashMap<Uuid, usize> = HashMap::new();
    let mut finished = Vec::new();
    // Events kept without a try: released to the followers here, as failed ones are.
    let mut held_back = Vec::new();
    for append in batch.iter() {
        if append.last {
            finished.push(append.run_id);
        }
        if kept.join(append) {
            held_back.push((append.run_id, append.seq));
            continue;
        }
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
    }
    let started = Instant::now();
    let stored = store(log, &rows).await;
    if stored.whole && !rows.is_empty() {
        log.inner.metrics.log_committed(
            batch.len() - held_back.len(),
            rows.len(),
            started.elapsed(),
        );
    }
    if let Some(error) = &stored.error {
        log.inner.metrics.log_commit_failed();
        tracing::error!(%error, runs = stored.failed.len(), first = ?named(stored.failed.iter().copied()),
            "could not commit run events; released to their followers, kept to commit again, and those runs stopped");
    }
    // Runs whose chat was deleted: what they still emit goes to their followers here, unlogged.
    let mut deleted = HashSet::new();
    for &run_id in &stored.moved {
        if fenced(log, run_id).await {
            deleted.insert(run_id);
        }
    }
    for &run_id in &stored.failed {
        if let Some(run) = log.live(run_id) {
            run.halt(Halt::Unlogged);
        }
    }
    kept.keep(
        &log.inner.metrics,
        rows.iter()
            .filter(|row| stored.failed.contains(&row.run_id)),
    );
    {
        let mut live = log.inner.live.lock().expect("run log lock");
        let released = rows
            .iter()
            .filter(|row| !stored.moved.contains(&row.run_id) || deleted.contains(&row.run_id))
            .map(|row| (row.run_id, row.last_seq))
            .chain(held_back);
        for (run_id, last_seq) in released {
            if let Some(run) = live.get(&run_id) {
                run.committed.set(last_seq);
            }
        }
        for run_id in finished {
            live.remove(&run_id);
        }
        shrink_if_sparse(&mut live);
    }
    notify_followed_here(log, &rows, &stored);
    batch.clear();
}

/// What became of rows given to the store.
#[derive(Debug, Default)]
struct Stored {
    /// Committed in one go.
    whole: bool,
    /// Runs whose rows were refused: the run moved on (claimed by another process, or gone).
    moved: HashSet<Uuid>,
    /// Runs whose rows the store did not take, and why.
    failed: HashSet<Uuid>,
    error: Option<StoreError>,
}

impl Stored {
    /// Whether the store took the rows of `run_id`.
    fn took(&self, run_id: Uuid) -> bool {
        !self.moved.contains(&run_id) && !self.failed.contains(&run_id)
    }
}

/// Stores `rows` in one group commit. One run's rows can fail the whole commit (a value the store refuses): then it
/// commits run by run, so only the runs whose rows cannot be stored go unlogged. A store that cannot be reached fails
/// them all.
async fn store(log: &RunLog, rows: &[LogRow]) -> Stored {
    let store = &log.inner.store;
    let mut result = store.append_events(rows).await;
    // A store busy past the pool's wait (its one SQLite writer taken by a burst of run starts) is not down: the rows
    // wait their turn again rather than fail runs that are going.
    for attempt in 1..=BUSY_RETRIES {
        if !matches!(&result, Err(error) if error.is_busy()) {
            break;
        }
        tracing::warn!(
            attempt,
            runs = rows.len(),
            "the store was busy for a group commit; waiting again"
        );
        result = store.append_events(rows).await;
    }
    let error = match result {
        Ok(moved) => {
            return Stored {
                whole: true,
                moved: moved.into_iter().collect(),
                ..Stored::default()
            };
        }
        Err(error) => error,
    };
    let mut stored = Stored::default();
    if error.is_unavailable() {
        stored.failed.extend(rows.iter().map(|row| row.run_id));
    } else {
        tracing::warn!(%error, runs = rows.len(), "a group commit failed; committing its runs one by one");
        for row in rows {
            match store.append_events(std::slice::from_ref(row)).await {
                Ok(moved) => stored.moved.extend(moved),
                Err(_) => {
                    stored.failed.insert(row.run_id);
                }
            }
        }
    }
    if !stored.failed.is_empty() {
        stored.error = Some(error);
    }
    stored
}

/// Tells the followers here of runs produced elsewhere (a run taken over here may also have followers that attached
/// while it was produced elsewhere) of the rows the store took.
fn notify_followed_here(log: &RunLog, rows: &[LogRow], stored: &Stored) {
    if log.inner.remote.lock().expect("run log lock").is_empty() {
        return;
    }
    for row in rows.iter().filter(|row| stored.took(row.run_id)) {
        log.notified(row.run_id, row.seq, row.last_seq, Some(&row.events));
    }
}

/// The first wait before kept rows are committed again; it doubles after each failed try, up to [`KEPT_RETRY_MAX`].
const KEPT_RETRY_FIRST: Duration = Duration::from_millis(500);
const KEPT_RETRY_MAX: Duration = Duration::from_secs(5);

/// Rows the store did not take (it could not be reached, or refused them), kept and committed again until it takes
/// them, with the run's later events behind them: its followers here had them at once (released unlogged, the run
/// stopped), and a client that attaches later, here or on another replica, gets them from the log, the run's end
/// included, rather than wait for an end that was never stored. Rows of a run that moved on meanwhile (another process
/// holds it, which writes its log now, or its chat was deleted) are dropped.
#[derive(Debug, Default)]
struct Kept {
    /// One row per run: a store outage can leave thousands, and every later event of theirs joins its run's row.
    rows: HashMap<Uuid, LogRow>,
    /// How long after a failed try the next one comes.
    wait: Duration,
    next_try: Option<tokio::time::Instant>,
}

impl Kept {
    fn events(&self) -> u64 {
        self.rows
            .values()
            .map(|row| row.last_seq + 1 - row.seq)
            .sum()
    }

    /// Keeps `rows`, and tries them again soon.
    fn keep<'a>(&mut self, metrics: &Metrics, rows: impl Iterator<Item = &'a LogRow>) {
        let before = self.rows.len();
        self.rows.extend(rows.map(|row| (row.run_id, row.clone())));
        if self.rows.len() == before {
            return;
        }
        if self.next_try.is_none() {
            self.wait = KEPT_RETRY_FIRST;
            self.next_try = Some(tokio::time::Instant::now() + self.wait);
        }
        metrics.log_kept(self.events());
    }

    /// Adds `append` behind its run's kept rows, if it has any.
    fn join(&mut self, append: &Append) -> bool {
        let Some(row) = self.rows.get_mut(&append.run_id) else {
            return false;
        };
        row.last_seq = append.seq;
        row.events.push('\n');
        row.events.push_str(&append.json);
        true
    }

    fn is_due(&self) -> bool {
        self.next_try
            .is_some_and(|at| at <= tokio::time::Instant::now())
    }

    /// Completes when the kept rows are due to be tried again; never while none are kept.
    async fn due(&self) {
        match self.next_try {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }

    /// Commits the kept rows again; the ones that fail again are kept, and tried again after a longer wait.
    async fn retry(&mut self, log: &RunLog) {
        let events = self.events();
        let rows: Vec<LogRow> = self.rows.drain().map(|(_, row)| row).collect();
        let started = Instant::now();
        let stored = store(log, &rows).await;
        if stored.whole {
            log.inner
                .metrics
                .log_committed(events as usize, rows.len(), started.elapsed());
        }
        let taken = rows.iter().filter(|row| stored.took(row.run_id)).count();
        if taken > 0 {
            tracing::info!(
                runs = taken,
                "stored the events of runs that an earlier group commit could not"
            );
        }
        if !stored.moved.is_empty() {
            tracing::warn!(runs = stored.moved.len(), first = ?named(stored.moved.iter().copied()),
                "runs moved on before their kept events were stored; dropped them");
        }
        notify_followed_here(log, &rows, &stored);
        self.rows = rows
            .into_iter()
            .filter(|row| stored.failed.contains(&row.run_id))
            .map(|row| (row.run_id, row))
            .collect();
        if self.rows.is_empty() {
            self.next_try = None;
        } else {
            self.wait = (self.wait * 2).min(KEPT_RETRY_MAX);
            self.next_try = Some(tokio::time::Instant::now() + self.wait);
            if let Some(error) = &stored.error {
                tracing::warn!(%error, runs = self.rows.len(), events = self.events(),
                    retry_in_ms = self.wait.as_millis() as u64, "the store still does not take the kept run events");
            }
        }
        log.inner.metrics.log_kept(self.events());
    }

    /// One more try before the writer stops; what the store still does not take is lost, and said so.
    async fn last_try(&mut self, log: &RunLog) {
        if self.rows.is_empty() {
            return;
        }
        self.retry(log).await;
        if !self.rows.is_empty() {
            tracing::error!(
                runs = self.rows.len(),
                first = ?named(self.rows.keys().copied()),
                events = self.events(),
                "stopping with run events the store did not take; their logs end without them"
            );
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
