//! The runs this process drives now: what the progress lines name, and whose leases it keeps fresh. A leaf.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use uuid::Uuid;

/// The runs this process is driving now, with when each started; their leases are the ones it keeps fresh.
#[derive(Debug, Clone, Default)]
pub struct LiveRuns(Arc<Mutex<Entries>>);

#[derive(Debug, Default)]
struct Entries {
    /// When each run entered, and the number of that entry.
    runs: HashMap<Uuid, (Instant, u64)>,
    /// The number of the next entry.
    next: u64,
}

impl LiveRuns {
    pub fn ids(&self) -> Vec<Uuid> {
        self.0
            .lock()
            .expect("live runs lock")
            .runs
            .keys()
            .copied()
            .collect()
    }

    /// Whether this process drives the run now.
    pub fn contains(&self, run_id: Uuid) -> bool {
        self.0
            .lock()
            .expect("live runs lock")
            .runs
            .contains_key(&run_id)
    }

    pub fn len(&self) -> usize {
        self.0.lock().expect("live runs lock").runs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `n` runs that have been going longest, oldest first, with their age: what a progress line names.
    pub fn oldest(&self, n: usize) -> Vec<(Uuid, Duration)> {
        let now = Instant::now();
        let mut runs: Vec<(Uuid, Duration)> = self
            .0
            .lock()
            .expect("live runs lock")
            .runs
            .iter()
            .map(|(id, (started, _))| (*id, now.saturating_duration_since(*started)))
            .collect();
        runs.sort_by_key(|run| std::cmp::Reverse(run.1));
        runs.truncate(n);
        runs
    }

    /// Counts the run as live until the returned guard is dropped, or until it enters again and that guard is
    /// dropped: a run entered twice (claimed here, then driven; or claimed again while a fenced task of it ends)
    /// stays live as long as its latest entry.
    pub(super) fn enter(&self, run_id: Uuid) -> LiveRun {
        let mut entries = self.0.lock().expect("live runs lock");
        let entry = entries.next;
        entries.next += 1;
        entries.runs.insert(run_id, (Instant::now(), entry));
        LiveRun {
            runs: self.clone(),
            run_id,
            entry,
        }
    }
}

/// Removes its run from [`LiveRuns`] when dropped, unless the run entered again since.
#[derive(Debug)]
pub(super) struct LiveRun {
    runs: LiveRuns,
    run_id: Uuid,
    entry: u64,
}

impl Drop for LiveRun {
    fn drop(&mut self) {
        let mut entries = self.runs.0.lock().expect("live runs lock");
        if entries
            .runs
            .get(&self.run_id)
            .is_some_and(|(_, entry)| *entry == self.entry)
        {
            entries.runs.remove(&self.run_id);
            shrink_if_sparse(&mut entries.runs);
        }
    }
}

/// Gives back a map's spare room once it fills under a quarter of it. A burst of streams grows a map of runs to its
/// peak, and a map never shrinks by itself: this one would keep that size for the life of the process. Shrinking to
/// twice what it holds leaves room to grow again, and happens again only after as many runs have left.
pub(super) fn shrink_if_sparse<K: Eq + Hash, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > 64 && map.len() < map.capacity() / 4 {
        map.shrink_to(map.len() * 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_oldest_runs_come_first_and_leave_when_done() {
        let live = LiveRuns::default();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let first = live.enter(a);
        tokio::time::advance(Duration::from_secs(3)).await;
        let _second = live.enter(b);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            live.oldest(5),
            vec![(a, Duration::from_secs(4)), (b, Duration::from_secs(1))]
        );
        drop(first);
        assert_eq!(live.ids(), vec![b]);
    }

    #[test]
    fn a_run_entered_again_stays_live_until_its_latest_entry_leaves() {
        let live = LiveRuns::default();
        let run = Uuid::new_v4();
        let first = live.enter(run);
        let again = live.enter(run);
        drop(first);
        assert_eq!(live.ids(), vec![run], "the earlier entry leaving");
        drop(again);
        assert!(live.is_empty());

        let first = live.enter(run);
        let again = live.enter(run);
        drop(again);
        assert!(live.is_empty(), "the latest entry left");
        drop(first);
        assert!(live.is_empty());
    }

    #[test]
    fn the_map_gives_back_its_room_after_a_burst() {
        let live = LiveRuns::default();
        let burst: Vec<LiveRun> = (0..10_000).map(|_| live.enter(Uuid::new_v4())).collect();
        let peak = live.0.lock().unwrap().runs.capacity();
        assert!(peak >= 10_000);
        let stays = live.enter(Uuid::new_v4());
        drop(burst);
        assert_eq!(live.len(), 1);
        assert!(
            live.0.lock().unwrap().runs.capacity() <= 64,
            "room kept after the burst"
        );
        drop(stays);
        assert!(live.is_empty());
    }
}
