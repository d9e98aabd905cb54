//! The run log: every event of a run is stored before any client receives it, and released to followers from there.
//!
//! A producer ([`RunWriter`]) numbers each event, keeps it in memory for the followers on this process, and hands it
//! to the one writer task of the process ([`write()`]). The writer takes whatever events all runs have ready, commits
//! them in one transaction (one row per run per batch: a group commit, never a transaction per event), and only then
//! moves each run's committed mark, which is what followers read up to. So a client never sees an event the store
//! does not have, and every follower of a run, whenever it attached, sees the same events with the same ids.
//!
//! Followers on this process read the events from memory ([`Source::Local`]). A follower of a run produced elsewhere
//! (another replica, or a process that is gone) reads them from the store ([`Source::Stored`]), woken by PostgreSQL
//! notifications (one listener connection per process, `listen`) and, as a safety net, by a slow poll.
//!
//! If a commit fails, its runs are committed one by one, so one run whose rows cannot be stored (its chat was deleted
//! mid-run) does not cost the others their durability. What still fails (the store is down) is released anyway, and
//! the failure logged and counted: the clients that are following see their run end visibly (it fails at its next
//! write) rather than hang, though those events are not in the log for a later replay.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::events::RunEvent;
use crate::metrics::Metrics;
use crate::store::{CANCEL_CHANNEL, EVENTS_CHANNEL, LogRow, RECORD_SEPARATOR, SessionStore};

/// Events the writer may have queued before producers wait: room for every run to have a burst ready.
const QUEUE: usize = 65_536;
/// Most events in one commit.
const MAX_BATCH: usize = 16_384;
/// How long the listener waits before connecting again after its connection failed.
const LISTEN_RETRY: Duration = Duration::from_secs(1);

/// One event on its way to the writer.
#[derive(Debug)]
struct Append {
    run_id: Uuid,
    seq: u64,
    json: Arc<str>,
    /// The run's `done`: after it commits, the run leaves the in-memory log.
    last: bool,
}

/// A run produced on this process: its events so far, how far they are committed, and its stop button.
#[derive(Debug)]
pub struct LiveLog {
    /// Event `seq` is at index `seq - 1`.
    events: Mutex<Vec<Arc<str>>>,
    /// The seq up to which the events are committed; followers of this run hold its receivers.
    committed: watch::Sender<u64>,
    /// Cancelled to stop the run on purpose.
    pub cancel: CancellationToken,
    /// Cancelled when the run's events could not be stored: the run stops rather than go on unlogged.
    pub unlogged: CancellationToken,
}

impl LiveLog {
    /// Events `from..=to`, all committed.
    pub(super) fn slice(&self, from: u64, to: u64) -> Vec<(u64, Arc<str>)> {
        let events = self.events.lock().expect("run log lock");
        (from..=to)
            .filter_map(|seq| {
                let at = usize::try_from(seq).ok()?.checked_sub(1)?;
                events.get(at).map(|json| (seq, Arc::clone(json)))
            })
            .collect()
    }

    /// Local followers attached now.
    pub fn followers(&self) -> usize {
        self.committed.receiver_count()
    }

    /// Completes when no local follower is left.
    pub async fn unfollowed(&self) {
        self.committed.closed().await;
    }

    pub fn last_seq(&self) -> u64 {
        *self.committed.borrow()
    }
}

/// The process's run log: the in-memory logs of live runs, the watches of runs followed from elsewhere, and the
/// queue to the writer. Cheap to clone.
#[derive(Debug, Clone)]
pub struct RunLog {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: SessionStore,
    queue: mpsc::Sender<Append>,
    live: Mutex<HashMap<Uuid, Arc<LiveLog>>>,
    /// Runs produced elsewhere with followers here: their last committed seq and latest events, as notifications
    /// tell them.
    remote: Mutex<HashMap<Uuid, Arc<RemoteRun>>>,
    metrics: Arc<Metrics>,
}

/// A run produced elsewhere, as the notifications of its commits tell it: its last committed seq, and the events
/// they carried (the latest few, in order), so its followers here need not read the store for each commit.
#[derive(Debug)]
pub struct RemoteRun {
    committed: watch::Sender<u64>,
    recent: Mutex<VecDeque<(u64, Arc<str>)>>,
}

/// Events of a remote run kept from notifications, per run.
const REMOTE_RECENT: usize = 1_024;

impl RemoteRun {
    /// The run's events from `from` on, if the notifications carried all of them.
    pub(super) fn recent_from(&self, from: u64) -> Option<Vec<(u64, Arc<str>)>> {
        let recent = self.recent.lock().expect("run log lock");
        let first = recent.front()?.0;
        if from < first || from > recent.back()?.0 {
            return None;
        }
        let skip = usize::try_from(from - first).ok()?;
        Some(recent.iter().skip(skip).cloned().collect())
    }

    /// Events `seq..` arrived in a notification; kept when they follow on from what is kept.
    fn carried(&self, seq: u64, events: &str) {
        let mut recent = self.recent.lock().expect("run log lock");
        if recent.back().is_some_and(|(last, _)| last + 1 != seq) {
            recent.clear();
        }
        for (i, json) in events.split('\n').enumerate() {
            recent.push_back((seq + i as u64, json.into()));
        }
        while recent.len() > REMOTE_RECENT {
            recent.pop_front();
        }
    }
}

/// Where a follower reads a run's events.
#[derive(Debug)]
pub enum Source {
    Local(Arc<LiveLog>, watch::Receiver<u64>),
    /// From the notifications' events when they have them, else from the store.
    Stored(Arc<RemoteRun>, watch::Receiver<u64>),
}

impl RunLog {
    /// The log and the receiving end of its writer's queue (for [`write()`]).
    pub fn new(store: SessionStore, metrics: Arc<Metrics>) -> (Self, WriterQueue) {
        let (queue, rx) = mpsc::channel(QUEUE);
        let log = Self {
            inner: Arc::new(Inner {
                store,
                queue,
                live: Mutex::default(),
                remote: Mutex::default(),
                metrics,
            }),
        };
        (log, WriterQueue(rx))
    }

    /// Starts the in-memory log of a run produced here, and its writer; `first` is its first event, already
    /// stored with the run itself.
    pub fn produce(&self, run_id: Uuid, first: String) -> RunWriter {
        let live = Arc::new(LiveLog {
            events: Mutex::new(vec![first.into()]),
            committed: watch::Sender::new(1),
            cancel: CancellationToken::new(),
            unlogged: CancellationToken::new(),
        });
        self.inner
            .live
            .lock()
            .expect("run log lock")
            .insert(run_id, Arc::clone(&live));
        RunWriter {
            run_id,
            live,
            queue: self.inner.queue.clone(),
            seq: 1,
        }
    }

    /// The run, if this process produces it.
    pub fn live(&self, run_id: Uuid) -> Option<Arc<LiveLog>> {
        self.inner
            .live
            .lock()
            .expect("run log lock")
            .get(&run_id)
            .cloned()
    }

    /// Where to read the run's events: from memory when it is produced here, else from the store.
    pub fn source(&self, run_id: Uuid) -> Source {
        if let Some(live) = self.live(run_id) {
            let rx = live.committed.subscribe();
            return Source::Local(live, rx);
        }
        let mut remote = self.inner.remote.lock().expect("run log lock");
        let run = remote.entry(run_id).or_insert_with(|| {
            Arc::new(RemoteRun {
                committed: watch::Sender::new(0),
                recent: Mutex::default(),
            })
        });
        Source::Stored(Arc::clone(run), run.committed.subscribe())
    }

    /// Runs produced elsewhere that have a follower here, so their producers know someone still reads them.
    pub fn followed_remotely(&self) -> Vec<Uuid> {
        let mut remote = self.inner.remote.lock().expect("run log lock");
        remote.retain(|_, run| run.committed.receiver_count() > 0);
        remote.keys().copied().collect()
    }

    /// The run's events are committed up to `seq` by someone else (a notification said so, or the lease loop ended
    /// a dead run's log): its followers here read on.
    pub fn committed_elsewhere(&self, run_id: Uuid, seq: u64) {
        if let Some(run) = self.inner.remote.lock().expect("run log lock").get(&run_id) {
            run.committed.send_if_modified(|last| {
                let newer = seq > *last;
                *last = (*last).max(seq);
                newer
            });
        }
    }

    /// A notification carried the run's events `seq..=last_seq` (or only their range, when they were too large).
    fn notified(&self, run_id: Uuid, seq: u64, last_seq: u64, events: Option<&str>) {
        let Some(run) = self
            .inner
            .remote
            .lock()
            .expect("run log lock")
            .get(&run_id)
            .cloned()
        else {
            return;
        };
        if let Some(events) = events {
            run.carried(seq, events);
        }
        self.committed_elsewhere(run_id, last_seq);
    }

    /// Wakes every follower that reads from the store, to catch up (after notifications may have been missed).
    fn catch_up_all(&self) {
        for run in self.inner.remote.lock().expect("run log lock").values() {
            run.committed.send_modify(|_| {});
        }
    }

    fn cancel_here(&self, run_id: Uuid) {
        if let Some(live) = self.live(run_id) {
            live.cancel.cancel();
        }
    }
}

/// The producing end of one run's log: numbers its events and queues them for the writer.
#[derive(Debug)]
pub struct RunWriter {
    run_id: Uuid,
    live: Arc<LiveLog>,
    queue: mpsc::Sender<Append>,
    seq: u64,
}

impl RunWriter {
    /// Appends `event`; it reaches followers once committed.
    pub async fn emit(&mut self, event: &RunEvent) {
        self.seq += 1;
        let json: Arc<str> = serde_json::to_string(event)
            .expect("run events always serialize")
            .into();
        self.live
            .events
            .lock()
            .expect("run log lock")
            .push(Arc::clone(&json));
        let append = Append {
            run_id: self.run_id,
            seq: self.seq,
            json,
            last: matches!(event, RunEvent::Done),
        };
        // The queue closes only when the writer is gone, after every run ended.
        let _ = self.queue.send(append).await;
    }

    pub fn live(&self) -> &Arc<LiveLog> {
        &self.live
    }
}

/// The receiving end of the writer's queue.
#[derive(Debug)]
pub struct WriterQueue(mpsc::Receiver<Append>);

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
    }
}

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
    let result = log.inner.store.append_events(&rows).await;
    let metrics = &log.inner.metrics;
    match result {
        Ok(()) => metrics.log_committed(batch.len(), rows.len(), started.elapsed()),
        Err(error) => {
            // One run's rows can fail the whole batch (its chat was deleted mid-run): then commit run by run, so
            // only the runs whose rows cannot be stored go unlogged. A store that cannot be reached fails them all.
            let mut failed = Vec::new();
            if error.is_unavailable() {
                failed.extend(rows.iter().map(|row| row.run_id));
            } else {
                tracing::warn!(%error, events = batch.len(), runs = rows.len(),
                    "a group commit failed; committing its runs one by one");
                for row in &rows {
                    if log
                        .inner
                        .store
                        .append_events(std::slice::from_ref(row))
                        .await
                        .is_err()
                    {
                        failed.push(row.run_id);
                    }
                }
            }
            if !failed.is_empty() {
                metrics.log_commit_failed();
                tracing::error!(%error, runs = ?failed,
                    "could not commit run events; releasing them to their followers unlogged and stopping those runs");
            }
            for run_id in failed {
                if let Some(run) = log.live(run_id) {
                    run.unlogged.cancel();
                }
            }
        }
    }
    let mut live = log.inner.live.lock().expect("run log lock");
    for row in &rows {
        if let Some(run) = live.get(&row.run_id) {
            run.committed.send_replace(row.last_seq);
        }
    }
    for run_id in finished {
        live.remove(&run_id);
    }
    batch.clear();
}

/// Follows the store's notifications (PostgreSQL): new events of runs followed here, and cancels of runs produced
/// here. One connection for the whole process; after it reconnects, every follower catches up from the store.
pub async fn listen(log: RunLog, stop: CancellationToken) {
    let mut listener = None;
    loop {
        if listener.is_none() {
            match log
                .inner
                .store
                .listen(&[EVENTS_CHANNEL, CANCEL_CHANNEL])
                .await
            {
                Ok(Some(connected)) => {
                    listener = Some(connected);
                    log.catch_up_all();
                }
                // One process (SQLite): nothing to listen to.
                Ok(None) => return,
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for run events; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(LISTEN_RETRY) => continue,
                        () = stop.cancelled() => return,
                    }
                }
            }
        }
        let connected = listener.as_mut().expect("connected above");
        let received = tokio::select! {
            received = connected.recv() => received,
            () = stop.cancelled() => return,
        };
        match received {
            // The connection dropped (the next call reconnects): notifications may have been missed.
            Ok(None) => log.catch_up_all(),
            Ok(Some((channel, payload))) if channel == CANCEL_CHANNEL => {
                if let Ok(run_id) = Uuid::parse_str(&payload) {
                    log.cancel_here(run_id);
                }
            }
            Ok(Some((_, payload))) => {
                for record in payload.split(RECORD_SEPARATOR) {
                    if let Some((run_id, seq, last_seq, events)) = parse_record(record) {
                        log.notified(run_id, seq, last_seq, events);
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, "lost the run events listener; reconnecting");
                listener = None;
            }
        }
    }
}

/// One record of an events notification: `<run_id> <seq> <last_seq>`, then a newline and the events' JSON (one per
/// line) when they fitted.
fn parse_record(record: &str) -> Option<(Uuid, u64, u64, Option<&str>)> {
    let (head, events) = match record.split_once('\n') {
        Some((head, events)) => (head, Some(events)),
        None => (record, None),
    };
    let mut parts = head.split(' ');
    let run_id = Uuid::parse_str(parts.next()?).ok()?;
    let seq = parts.next()?.parse().ok()?;
    let last_seq = parts.next()?.parse().ok()?;
    Some((run_id, seq, last_seq, events))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notified_events_are_kept_in_order_and_a_gap_starts_over() {
        let run = RemoteRun {
            committed: watch::Sender::new(0),
            recent: Mutex::default(),
        };
        run.carried(1, "{\"a\":1}\n{\"a\":2}");
        run.carried(3, "{\"a\":3}");
        let from_two: Vec<u64> = run
            .recent_from(2)
            .unwrap()
            .iter()
            .map(|(seq, _)| *seq)
            .collect();
        assert_eq!(from_two, [2, 3]);
        assert!(run.recent_from(4).is_none());
        run.carried(7, "{\"a\":7}");
        assert!(
            run.recent_from(3).is_none(),
            "a gap: what came before is dropped"
        );
        assert_eq!(&*run.recent_from(7).unwrap()[0].1, "{\"a\":7}");
    }

    #[test]
    fn records_carry_their_events_when_they_fit() {
        let id = Uuid::new_v4();
        let with = format!("{id} 4 5\n{{}}\n{{}}");
        assert_eq!(parse_record(&with), Some((id, 4, 5, Some("{}\n{}"))));
        assert_eq!(parse_record(&format!("{id} 4 5")), Some((id, 4, 5, None)));
        assert_eq!(parse_record("garbage"), None);
    }
}
