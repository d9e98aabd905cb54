//! Admission and counting of open SSE streams.
//!
//! Every stream the service answers is counted here from the moment its handler admits it until the response body
//! that owns its [`StreamGuard`] is dropped. Admission (are we shutting down? are we over the limit?) and counting are
//! one atomic step under one lock, so a drain that starts between "admitted" and "response returned" still sees the
//! stream, and no stream can slip in after [`StreamTracker::begin_shutdown`].
//!
//! The guard releases in `Drop`, so every path releases exactly once: a body that completes, a client that goes away,
//! a body that is never polled, a handler that panics after admission.

use std::sync::Arc;

use tokio::sync::watch;
use tokio::time::Instant;

/// Why a stream was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The service has begun shutting down; the client should go to another replica.
    ShuttingDown,
    /// `MAX_STREAMS` streams are already open.
    AtCapacity { limit: usize },
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every stream was released.
    Drained,
    /// The deadline passed with this many streams still open.
    TimedOut { open: usize },
}

/// File descriptors a stream holds, counted in hundredths: a stream on a connection it shares with others (HTTP/2)
/// holds a share of that connection's descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Held(usize);

impl Held {
    pub const NONE: Self = Self(0);

    /// `n` whole descriptors.
    pub const fn descriptors(n: usize) -> Self {
        Self(n * 100)
    }

    /// A stream's share of one descriptor that at most `among` streams share (rounded up).
    pub const fn share_of_one(among: usize) -> Self {
        Self(100usize.div_ceil(among))
    }

    #[must_use]
    pub const fn and(self, other: Self) -> Self {
        Self(self.0 + other.0)
    }
}

/// The counted state; only ever changed under the watch channel's lock.
#[derive(Debug, Clone, Copy, Default)]
struct State {
    /// Streams admitted and not yet released.
    open: usize,
    /// File descriptors those streams hold: the client's socket, and the provider's (or a share of it) when the run
    /// streams from one.
    held: Held,
    /// Set once by `begin_shutdown`; from then on nothing is admitted.
    shutting_down: bool,
}

/// Shared handle to the stream count; cheap to clone.
#[derive(Debug, Clone)]
pub struct StreamTracker {
    /// The state lives in a watch channel: its lock makes admit-and-count atomic, and its receivers let a drain wait
    /// for the count to reach zero without polling.
    state: Arc<watch::Sender<State>>,
    /// Admission limit (`MAX_STREAMS`); `None` = unlimited.
    limit: Option<usize>,
    /// File descriptors streams may hold in all (the open-file limit less a reserve); `None` = unlimited.
    descriptors: Option<Held>,
}

impl StreamTracker {
    pub fn new(limit: Option<usize>) -> Self {
        Self::with_descriptors(limit, None)
    }

    /// A tracker that also keeps the descriptors its streams hold within `descriptors`.
    pub fn with_descriptors(limit: Option<usize>, descriptors: Option<usize>) -> Self {
        Self {
            state: Arc::new(watch::Sender::new(State::default())),
            limit,
            descriptors: descriptors.map(Held::descriptors),
        }
    }

    /// Admits one stream holding one descriptor (its client's socket) and counts it, or says why not, in one step.
    pub fn try_admit(&self) -> Result<StreamGuard, Rejection> {
        self.try_admit_holding(Held::descriptors(1))
    }

    /// Admits one stream that will hold `descriptors` (2 for a run streaming from a provider over HTTP/1.1: the
    /// client's socket and the provider's), or says why not, in one step: a stream is refused before it starts
    /// rather than fail later for want of a descriptor.
    pub fn try_admit_holding(&self, descriptors: Held) -> Result<StreamGuard, Rejection> {
        let mut verdict = Ok(());
        self.state.send_if_modified(|state| {
            verdict = self.verdict(state, descriptors);
            if verdict.is_err() {
                return false;
            }
            state.open += 1;
            state.held = state.held.and(descriptors);
            true
        });
        verdict.map(|()| StreamGuard {
            state: Arc::clone(&self.state),
            descriptors,
        })
    }

    fn verdict(&self, state: &State, descriptors: Held) -> Result<(), Rejection> {
        if state.shutting_down {
            return Err(Rejection::ShuttingDown);
        }
        if let Some(limit) = self.limit
            && state.open >= limit
        {
            return Err(Rejection::AtCapacity { limit });
        }
        if let Some(budget) = self.descriptors
            && state.held.and(descriptors) > budget
        {
            return Err(Rejection::AtCapacity { limit: state.open });
        }
        Ok(())
    }

    /// Whether a stream holding `descriptors` would be admitted now, without counting one: a cheap check that comes
    /// before any work a refused stream would waste. [`Self::try_admit_holding`] still decides, atomically.
    pub fn admitting(&self, descriptors: Held) -> Result<(), Rejection> {
        self.verdict(&self.state.borrow(), descriptors)
    }

    /// Stops admitting streams. Streams already admitted run on.
    pub fn begin_shutdown(&self) {
        self.state.send_modify(|state| state.shutting_down = true);
    }

    /// Streams admitted and not yet released.
    pub fn open(&self) -> usize {
        self.state.borrow().open
    }

    /// Waits until no stream is open or `deadline` passes.
    pub async fn wait_for_drain(&self, deadline: Instant) -> DrainOutcome {
        let mut rx = self.state.subscribe();
        tokio::select! {
            _ = rx.wait_for(|state| state.open == 0) => DrainOutcome::Drained,
            () = tokio::time::sleep_until(deadline) => DrainOutcome::TimedOut { open: self.open() },
        }
    }
}

/// Proof that one stream is counted; releases it when dropped.
#[derive(Debug)]
pub struct StreamGuard {
    state: Arc<watch::Sender<State>>,
    descriptors: Held,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.state.send_modify(|state| {
            state.open -= 1;
            state.held = Held(state.held.0 - self.descriptors.0);
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    #[test]
    fn nested_guards_count_and_release_each_once() {
        let tracker = StreamTracker::new(None);
        let a = tracker.try_admit().unwrap();
        let b = tracker.try_admit().unwrap();
        let c = tracker.clone().try_admit().unwrap();
        assert_eq!(tracker.open(), 3);
        drop(b);
        assert_eq!(tracker.open(), 2);
        drop(a);
        drop(c);
        assert_eq!(tracker.open(), 0);
    }

    #[test]
    fn limit_rejects_and_frees_a_slot_on_release() {
        let tracker = StreamTracker::new(Some(2));
        let a = tracker.try_admit().unwrap();
        let _b = tracker.try_admit().unwrap();
        assert_eq!(
            tracker.try_admit().unwrap_err(),
            Rejection::AtCapacity { limit: 2 }
        );
        assert_eq!(tracker.open(), 2, "a rejected stream is not counted");
        drop(a);
        assert!(tracker.try_admit().is_ok());
    }

    #[test]
    fn streams_that_hold_a_provider_socket_count_it_against_the_descriptors() {
        let two = Held::descriptors(2);
        let tracker = StreamTracker::with_descriptors(None, Some(5));
        let a = tracker.try_admit_holding(two).unwrap();
        let _b = tracker.try_admit_holding(two).unwrap();
        assert!(tracker.admitting(two).is_err());
        assert!(
            tracker.try_admit_holding(two).is_err(),
            "4 held, 2 more would pass 5"
        );
        let _c = tracker.try_admit_holding(Held::descriptors(1)).unwrap();
        assert_eq!(tracker.open(), 3);
        drop(a);
        assert!(tracker.try_admit_holding(two).is_ok());
    }

    #[test]
    fn streams_sharing_a_connection_count_their_share_of_it() {
        // A client's socket and a hundredth of a provider's connection each: 2 descriptors hold 1 stream, not 2.
        let shared = Held::descriptors(1).and(Held::share_of_one(100));
        let tracker = StreamTracker::with_descriptors(None, Some(2));
        let _a = tracker.try_admit_holding(shared).unwrap();
        assert!(tracker.try_admit_holding(shared).is_err());
        // 99 such streams take 99 sockets and 99 hundredths: 100 descriptors, all there is.
        let tracker = StreamTracker::with_descriptors(None, Some(100));
        let held: Vec<_> = (0..99)
            .map(|_| tracker.try_admit_holding(shared).unwrap())
            .collect();
        assert!(tracker.admitting(shared).is_err());
        assert!(tracker.admitting(Held::share_of_one(100)).is_ok());
        drop(held);
        assert_eq!(tracker.open(), 0);
        assert_eq!(Held::share_of_one(3), Held(34), "rounded up");
    }

    #[test]
    fn nothing_is_admitted_after_begin_shutdown() {
        let tracker = StreamTracker::new(Some(10));
        let held = tracker.try_admit().unwrap();
        tracker.begin_shutdown();
        assert_eq!(tracker.try_admit().unwrap_err(), Rejection::ShuttingDown);
        assert_eq!(tracker.open(), 1);
        drop(held);
        assert_eq!(tracker.open(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn drain_with_nothing_open_returns_at_once() {
        let tracker = StreamTracker::new(None);
        tracker.begin_shutdown();
        let started = Instant::now();
        assert_eq!(tracker.wait_for_drain(far()).await, DrainOutcome::Drained);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_every_stream() {
        let tracker = StreamTracker::new(None);
        let first = tracker.try_admit().unwrap();
        let second = tracker.try_admit().unwrap();
        tracker.begin_shutdown();
        let releaser = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(7)).await;
            drop(first);
            tokio::time::sleep(Duration::from_secs(7)).await;
            drop(second);
        });
        let started = Instant::now();
        assert_eq!(tracker.wait_for_drain(far()).await, DrainOutcome::Drained);
        assert_eq!(started.elapsed(), Duration::from_secs(14));
        releaser.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn drain_times_out_with_the_count_still_held() {
        let tracker = StreamTracker::new(None);
        let _held = tracker.try_admit().unwrap();
        tracker.begin_shutdown();
        let deadline = Instant::now() + Duration::from_secs(12);
        assert_eq!(
            tracker.wait_for_drain(deadline).await,
            DrainOutcome::TimedOut { open: 1 }
        );
        assert_eq!(Instant::now(), deadline);
        assert_eq!(tracker.open(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_count_taken_before_the_body_runs_blocks_the_drain() {
        let tracker = StreamTracker::new(None);
        // The handler admitted the stream and built its body, but nothing has polled the body yet.
        let guard = tracker.try_admit().unwrap();
        let body = futures_util::stream::once(async move {
            let _guard = guard;
        });
        tracker.begin_shutdown();
        let deadline = Instant::now() + Duration::from_secs(1);
        assert_eq!(
            tracker.wait_for_drain(deadline).await,
            DrainOutcome::TimedOut { open: 1 }
        );
        drop(body);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_dropped_unpolled_releases() {
        let tracker = StreamTracker::new(None);
        let guard = tracker.try_admit().unwrap();
        let body = futures_util::stream::once(async move {
            let _guard = guard;
        });
        tracker.begin_shutdown();
        drop(body);
        assert_eq!(tracker.open(), 0);
        assert_eq!(tracker.wait_for_drain(far()).await, DrainOutcome::Drained);
    }

    #[test]
    fn a_panic_after_admission_releases() {
        let tracker = StreamTracker::new(None);
        let inner = tracker.clone();
        let result = std::panic::catch_unwind(move || {
            let _guard = inner.try_admit().unwrap();
            panic!("handler failed after admission");
        });
        assert!(result.is_err());
        assert_eq!(tracker.open(), 0);
    }
}
