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
//! the failure logged and counted: the clients that are following see their run end visibly (it stops, and fails)
//! rather than hang. The writer keeps those rows, with the run's later events behind them, and commits them again
//! until the store takes them, so a client that attaches later replays the same events, the run's end included.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, mpsc};
use uuid::Uuid;

use super::events::RunEvent;
use super::live::shrink_if_sparse;
use crate::metrics::Metrics;
use crate::store::SessionStore;
use crate::tools::ToolContext;

mod committed;
mod listen;
mod writer;

pub use committed::{Committed, Follow};
pub use listen::listen;
pub use writer::{WriterQueue, write};

/// Events the writer may have queued before producers wait: room for every run to have a burst ready.
const QUEUE: usize = 65_536;

/// One event on its way to the writer.
#[derive(Debug)]
struct Append {
    run_id: Uuid,
    epoch: u64,
    seq: u64,
    json: Arc<str>,
    /// The run's `done`: after it commits, the run leaves the in-memory log.
    last: bool,
}

/// A run produced on this process: its events so far, how far they are committed, and what stops it early.
#[derive(Debug)]
pub struct LiveLog {
    /// Event `seq` is at index `seq - 1`.
    events: Mutex<Vec<Arc<str>>>,
    /// The seq up to which the events are committed; followers of this run watch it.
    committed: Arc<Committed>,
    /// The reasons the run halted for, a bit per [`Halt`], set through [`LiveLog::halt`]. (Bits and a wake-up held
    /// in place rather than a cancellation token per reason: every open stream has a live log, and each token is an
    /// allocation of its own.)
    halts: AtomicU8,
    /// Wakes whoever waits for a halt, at each halt.
    halting: Notify,
}

/// Why a run produced here stops before its end; when several happen, the first in this order counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Halt {
    /// The run left this process (released for another replica, or claimed by one because this process lost its
    /// lease): the producer stops without a word, and followers here read on from the store.
    Moved,
    /// The run's chat was deleted: the run stops, and its last events go to the followers here without being logged
    /// (there is nothing left to log them in).
    Deleted,
    /// Stopped on purpose.
    Cancelled,
    /// The run's events could not be stored: the run stops rather than go on unlogged.
    Unlogged,
}

const HALTS: [Halt; 4] = [Halt::Moved, Halt::Deleted, Halt::Cancelled, Halt::Unlogged];

impl Halt {
    /// Its bit in a live log's halts.
    const fn bit(self) -> u8 {
        1 << self as u8
    }
}

impl LiveLog {
    /// Stops the run for `why`.
    pub fn halt(&self, why: Halt) {
        self.halts.fetch_or(why.bit(), Ordering::AcqRel);
        self.halting.notify_waiters();
    }

    /// Whether the run halted for `why`.
    pub fn has_halted_for(&self, why: Halt) -> bool {
        self.halts.load(Ordering::Acquire) & why.bit() != 0
    }

    /// Waits until the run halts for one of `reasons`; returns the first of them, in [`Halt`]'s order, it halted for.
    ///
    /// Not an `async fn`: the future keeps the reasons as a bit mask, not the slice, and it is part of every open
    /// stream's state (the run's task waits on it, and so does each follower).
    pub fn halted_for(&self, reasons: &[Halt]) -> impl Future<Output = Halt> + Send + '_ {
        let wanted = reasons.iter().fold(0, |bits, &why| bits | why.bit());
        async move {
            loop {
                // Made before the bits are read: a halt after the read wakes it, even before it is first polled.
                let halting = self.halting.notified();
                let halted = self.halts.load(Ordering::Acquire) & wanted;
                if let Some(why) = HALTS.into_iter().find(|&why| halted & why.bit() != 0) {
                    return why;
                }
                halting.await;
            }
        }
    }

    /// Waits until the run halts; returns why.
    pub fn halted(&self) -> impl Future<Output = Halt> + Send + '_ {
        self.halted_for(&HALTS)
    }

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
        self.committed.followers()
    }

    /// Completes when no local follower is left.
    pub async fn unfollowed(&self) {
        self.committed.unfollowed().await;
    }

    pub fn last_seq(&self) -> u64 {
        self.committed.get()
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
    /// Woken when a run followed here may be claimable now (its producer released it).
    claimable: tokio::sync::Notify,
}

/// A run produced elsewhere, as the notifications of its commits tell it: its last committed seq, and the events
/// they carried (the latest few, in order), so its followers here need not read the store for each commit.
#[derive(Debug)]
pub struct RemoteRun {
    committed: Arc<Committed>,
    recent: Mutex<VecDeque<(u64, Arc<str>)>>,
    /// How many times the listener reconnected while the run was followed here: notifications may have been missed
    /// each time, so followers read the store once more.
    catch_ups: AtomicU64,
    /// Who last attached here to follow it: a continuation after a takeover acts for them (the bearer token is
    /// never stored, so only a client that is here can lend it).
    caller: Mutex<Option<ToolContext>>,
}

/// Events of a remote run kept from notifications, per run.
const REMOTE_RECENT: usize = 1_024;

impl RemoteRun {
    pub(super) fn catch_ups(&self) -> u64 {
        self.catch_ups.load(Ordering::Acquire)
    }

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

    /// Events `seq..` arrived in a notification; kept when they follow on from what is kept (events already kept,
    /// told twice, are skipped).
    fn carried(&self, seq: u64, events: &str) {
        let mut recent = self.recent.lock().expect("run log lock");
        let next = recent.back().map(|(last, _)| last + 1);
        if next.is_some_and(|next| seq > next) {
            recent.clear();
        }
        for (i, json) in events.split('\n').enumerate() {
            let at = seq + i as u64;
            if next.is_none_or(|next| at >= next) {
                recent.push_back((at, json.into()));
            }
        }
        while recent.len() > REMOTE_RECENT {
            recent.pop_front();
        }
    }
}

/// Where a follower reads a run's events.
#[derive(Debug)]
pub enum Source {
    Local(Arc<LiveLog>, Follow),
    /// From the notifications' events when they have them, else from the store.
    Stored(Arc<RemoteRun>, Follow),
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
                claimable: tokio::sync::Notify::new(),
            }),
        };
        (log, WriterQueue(rx))
    }

    /// Starts the in-memory log of a run produced here under `epoch`, and its writer; `events` are the run's events
    /// so far, already stored (`run_started` for a new run; everything before a takeover). An earlier producer of the
    /// run here stops.
    pub fn produce(&self, run_id: Uuid, epoch: u64, events: Vec<Arc<str>>) -> RunWriter {
        let seq = events.len() as u64;
        let live = Arc::new(LiveLog {
            events: Mutex::new(events),
            committed: Committed::new(seq),
            halts: AtomicU8::new(0),
            halting: Notify::new(),
        });
        let before = self
            .inner
            .live
            .lock()
            .expect("run log lock")
            .insert(run_id, Arc::clone(&live));
        // One producer of a run per process: one still going here (which the claim that started this one fenced)
        // stops, its followers reading on from the store.
        if let Some(before) = before {
            tracing::warn!(%run_id, "a run produced here was produced again; the earlier producer stops");
            before.halt(Halt::Moved);
        }
        RunWriter {
            log: self.clone(),
            run_id,
            epoch,
            live,
            queue: self.inner.queue.clone(),
            seq,
        }
    }

    /// The run left this process (released, or claimed elsewhere): its producer stops, its followers here read on
    /// from the store, and new followers go there too.
    pub fn moved(&self, run_id: Uuid) {
        let live = {
            let mut live = self.inner.live.lock().expect("run log lock");
            let moved = live.remove(&run_id);
            shrink_if_sparse(&mut live);
            moved
        };
        if let Some(live) = live {
            live.halt(Halt::Moved);
        }
    }

    /// Another process holds the run now (its append was refused, or its heartbeat found the lease gone): this one
    /// stops producing it.
    pub fn lost_lease(&self, run_id: Uuid) {
        self.inner.metrics.fenced();
        tracing::warn!(%run_id, "this process lost the run's lease; another one continues it");
        self.moved(run_id);
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
            let follow = live.committed.follow();
            return Source::Local(live, follow);
        }
        self.stored_source(run_id)
    }

    /// The store the log is committed to.
    pub(super) fn store(&self) -> &SessionStore {
        &self.inner.store
    }

    /// Where to read the events of a run produced elsewhere: the notifications' events, else the store.
    pub(super) fn stored_source(&self, run_id: Uuid) -> Source {
        let mut remote = self.inner.remote.lock().expect("run log lock");
        let run = remote.entry(run_id).or_insert_with(|| {
            Arc::new(RemoteRun {
                committed: Committed::new(0),
                recent: Mutex::default(),
                catch_ups: AtomicU64::new(0),
                caller: Mutex::default(),
            })
        });
        Source::Stored(Arc::clone(run), run.committed.follow())
    }

    /// `caller` follows the run here: a takeover of it acts for them.
    pub(super) fn followed_by(&self, run_id: Uuid, caller: ToolContext) {
        if let Some(run) = self.inner.remote.lock().expect("run log lock").get(&run_id) {
            *run.caller.lock().expect("run log lock") = Some(caller);
        }
    }

    /// Runs produced elsewhere that are followed here, with who follows them: what this process may take over.
    pub(super) fn followed_with_callers(&self) -> Vec<(Uuid, ToolContext)> {
        self.followed_here()
            .iter()
            .filter_map(|(id, run)| {
                let caller = run.caller.lock().expect("run log lock").clone()?;
                Some((*id, caller))
            })
            .collect()
    }

    /// Completes when a run followed here may have become claimable (its producer released it).
    pub(super) async fn claimable(&self) {
        self.inner.claimable.notified().await;
    }

    /// Runs produced elsewhere that have a follower here, so their producers know someone still reads them.
    pub fn followed_remotely(&self) -> Vec<Uuid> {
        self.followed_here().keys().copied().collect()
    }

    /// The runs produced elsewhere, locked, once those nobody here follows any more are dropped.
    fn followed_here(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Arc<RemoteRun>>> {
        let mut remote = self.inner.remote.lock().expect("run log lock");
        remote.retain(|_, run| run.committed.followers() > 0);
        shrink_if_sparse(&mut remote);
        remote
    }

    /// The run's events are committed up to `seq` by someone else (a notification said so, or the lease loop ended
    /// a dead run's log): its followers here read on.
    pub fn committed_elsewhere(&self, run_id: Uuid, seq: u64) {
        if let Some(run) = self.inner.remote.lock().expect("run log lock").get(&run_id) {
            run.committed.raise(seq);
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
            run.catch_ups.fetch_add(1, Ordering::AcqRel);
            run.committed.wake();
        }
    }

    /// A run was released by its producer: if it is followed here, look at once whether to take it over.
    fn released(&self, run_id: Uuid) {
        if self
            .inner
            .remote
            .lock()
            .expect("run log lock")
            .contains_key(&run_id)
        {
            self.inner.claimable.notify_one();
        }
    }

    fn cancel_here(&self, run_id: Uuid) {
        if let Some(live) = self.live(run_id) {
            live.halt(Halt::Cancelled);
        }
    }
}

/// The producing end of one run's log: numbers its events and queues them for the writer.
#[derive(Debug)]
pub struct RunWriter {
    log: RunLog,
    run_id: Uuid,
    epoch: u64,
    live: Arc<LiveLog>,
    queue: mpsc::Sender<Append>,
    seq: u64,
}

impl RunWriter {
    /// Appends `event`: numbered, written out and queued for the writer before this returns; it reaches followers
    /// once committed. What is left to await is a wait for room in the writer's queue, made (boxed) only when the
    /// queue is full, as it nearly never is. The event is not held by the future: a run's task awaits its events for
    /// as long as the run lasts, and an event or a wait held across that would take room in its state all along.
    pub fn emit(&mut self, event: RunEvent) -> impl Future<Output = ()> + Send + '_ {
        self.seq += 1;
        let json = event.json();
        self.live
            .events
            .lock()
            .expect("run log lock")
            .push(Arc::clone(&json));
        let append = Append {
            run_id: self.run_id,
            epoch: self.epoch,
            seq: self.seq,
            json,
            last: matches!(event, RunEvent::Done),
        };
        let full = match self.queue.try_send(append) {
            Err(mpsc::error::TrySendError::Full(append)) => Some(Box::pin(self.queue.send(append))),
            // The queue closes only when the writer is gone, after every run ended.
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => None,
        };
        async move {
            if let Some(send) = full {
                let _ = send.await;
            }
        }
    }

    pub fn live(&self) -> &Arc<LiveLog> {
        &self.live
    }

    /// The run left this process: see [`RunLog::moved`].
    pub fn moved(&self) {
        self.log.moved(self.run_id);
    }

    /// Waits until every event emitted so far is committed (or the run's events could not be stored).
    pub async fn flushed(&self) {
        let mut committed = self.live.committed.follow();
        tokio::select! {
            () = committed.reached(self.seq) => {}
            _ = self.live.halted_for(&[Halt::Unlogged, Halt::Moved]) => {}
        }
    }
}

#[cfg(test)]
mod tests;
