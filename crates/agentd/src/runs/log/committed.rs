//! How far a run's events are committed, watched by its followers on this process.
//!
//! A watch of one number, and a count of who watches it. tokio's `watch` channel does this too, but every open stream
//! has one (its run's), and the channel's own allocation is 355 bytes, eight wake-up lists among them for senders with
//! many receivers; a run has one writer and, nearly always, one follower.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::sync::Notify;

/// The committed mark of a run, and who follows it here.
#[derive(Debug)]
pub struct Committed {
    /// The seq up to which the run's events are committed (it only grows, but a wake-up may leave it as it is).
    seq: AtomicU64,
    /// Moved on at every change and every wake-up: a follower has seen what it has seen the version of.
    version: AtomicU64,
    changed: Notify,
    /// The [`Follow`]s there are.
    followers: AtomicUsize,
    /// Woken when the last follower goes.
    unfollowed: Notify,
}

impl Committed {
    pub fn new(seq: u64) -> Arc<Self> {
        Arc::new(Self {
            seq: AtomicU64::new(seq),
            version: AtomicU64::new(0),
            changed: Notify::new(),
            followers: AtomicUsize::new(0),
            unfollowed: Notify::new(),
        })
    }

    /// A new follower, which has seen the mark as it is now.
    pub fn follow(self: &Arc<Self>) -> Follow {
        self.followers.fetch_add(1, Ordering::AcqRel);
        Follow {
            seen: self.version.load(Ordering::Acquire),
            committed: Arc::clone(self),
        }
    }

    pub fn get(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }

    /// Sets the mark to `seq`, and wakes the followers.
    pub fn set(&self, seq: u64) {
        self.seq.store(seq, Ordering::Release);
        self.wake();
    }

    /// Moves the mark on to `seq` if that is further, and then wakes the followers.
    pub fn raise(&self, seq: u64) {
        if self.seq.fetch_max(seq, Ordering::AcqRel) < seq {
            self.wake();
        }
    }

    /// Wakes the followers, as if the mark had changed.
    pub fn wake(&self) {
        self.version.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_waiters();
    }

    pub fn followers(&self) -> usize {
        self.followers.load(Ordering::Acquire)
    }

    /// Completes when no follower is left.
    pub async fn unfollowed(&self) {
        loop {
            // Made before the count is read: the last follower going after the read wakes it.
            let unfollowed = self.unfollowed.notified();
            if self.followers() == 0 {
                return;
            }
            unfollowed.await;
        }
    }
}

/// One follower's watch on a run's committed mark; counted among the run's followers until dropped.
#[derive(Debug)]
pub struct Follow {
    committed: Arc<Committed>,
    /// The version this follower has seen.
    seen: u64,
}

impl Follow {
    /// The mark, which this follower has seen from now on.
    pub fn seen(&mut self) -> u64 {
        // The version before the mark: a change between the two reads wakes the next wait at once, needlessly but
        // harmlessly, rather than not at all.
        self.seen = self.committed.version.load(Ordering::Acquire);
        self.committed.get()
    }

    /// Completes when the mark changed (or the followers were woken) since this follower last saw it; then it has.
    pub async fn changed(&mut self) {
        loop {
            // Made before the version is read: a change after the read wakes it, even before it is first polled.
            let changed = self.committed.changed.notified();
            let version = self.committed.version.load(Ordering::Acquire);
            if version != self.seen {
                self.seen = version;
                return;
            }
            changed.await;
        }
    }

    /// Completes once the mark is at `seq` or beyond.
    pub async fn reached(&mut self, seq: u64) {
        while self.seen() < seq {
            self.changed().await;
        }
    }
}

impl Drop for Follow {
    fn drop(&mut self) {
        if self.committed.followers.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.committed.unfollowed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Long enough for a wake-up that is coming; a wait that hangs fails rather than blocks the suite.
    const SOON: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn a_follower_is_woken_by_each_change_and_by_a_wake_up_and_sees_the_mark() {
        let committed = Committed::new(3);
        let mut follow = committed.follow();
        assert_eq!(follow.seen(), 3);
        // Nothing changed since it saw the mark: the wait waits.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), follow.changed())
                .await
                .is_err()
        );
        // A change made before the wait is not missed.
        committed.set(5);
        tokio::time::timeout(SOON, follow.changed()).await.unwrap();
        assert_eq!(follow.seen(), 5);
        // A change while it waits wakes it.
        let waiter = tokio::spawn(async move {
            follow.changed().await;
            follow
        });
        tokio::task::yield_now().await;
        committed.raise(9);
        let mut follow = tokio::time::timeout(SOON, waiter).await.unwrap().unwrap();
        assert_eq!(follow.seen(), 9);
        // A mark that is not further is no change; a wake-up is one, the mark as it was.
        committed.raise(7);
        assert_eq!(committed.get(), 9);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), follow.changed())
                .await
                .is_err()
        );
        committed.wake();
        tokio::time::timeout(SOON, follow.changed()).await.unwrap();
        assert_eq!(follow.seen(), 9);
        // Waiting to reach a seq ends once the mark gets there.
        let waiter = tokio::spawn(async move { follow.reached(12).await });
        committed.set(10);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        committed.set(12);
        tokio::time::timeout(SOON, waiter).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn the_followers_are_counted_and_the_last_one_to_go_is_noticed() {
        let committed = Committed::new(0);
        // Nobody follows yet: nothing to wait for.
        tokio::time::timeout(SOON, committed.unfollowed())
            .await
            .unwrap();
        let first = committed.follow();
        let second = committed.follow();
        assert_eq!(committed.followers(), 2);
        let watcher = tokio::spawn({
            let committed = Arc::clone(&committed);
            async move { committed.unfollowed().await }
        });
        drop(first);
        tokio::task::yield_now().await;
        assert_eq!(committed.followers(), 1);
        assert!(!watcher.is_finished(), "one follower is left");
        drop(second);
        tokio::time::timeout(SOON, watcher).await.unwrap().unwrap();
        assert_eq!(committed.followers(), 0);
    }
}
