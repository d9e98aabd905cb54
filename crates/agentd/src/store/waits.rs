//! How long requests waited to take a pooled store connection: the metrics, and a note in the log when they waited
//! long.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// A wait for a pooled connection longer than this is noted in the log ([`PoolWaits::waited`]).
const SLOW_WAIT: Duration = Duration::from_secs(2);

/// Slow waits after the first are noted together, once this long after it.
const SLOW_WAITS_NOTED_EVERY: Duration = Duration::from_secs(10);

/// How long requests waited to take a pooled connection, and how many gave up ([`super::StoreError::is_unavailable`]),
/// for the metrics.
#[derive(Debug, Clone)]
pub struct PoolWaits {
    pub seconds: Histogram,
    pub timeouts: Counter,
    /// The slow waits since the first one of the current [`SLOW_WAITS_NOTED_EVERY`], not yet in the log.
    slow: Arc<Mutex<SlowWaits>>,
}

#[derive(Debug, Default)]
struct SlowWaits {
    count: u64,
    longest: Duration,
}

impl PoolWaits {
    /// A request waiting since `since` got its connection.
    ///
    /// A wait past [`SLOW_WAIT`] is noted in the log: the first at once, the ones that follow within
    /// [`SLOW_WAITS_NOTED_EVERY`] in one line at its end. In a burst thousands of requests may wait that long, and a
    /// line for each (sqlx's own note, turned off in the pools' options) would flood the log when it is read most.
    pub(super) fn waited(&self, since: Instant) {
        let waited = since.elapsed();
        self.seconds.observe(waited.as_secs_f64());
        if waited <= SLOW_WAIT {
            return;
        }
        let mut slow = self.slow.lock().expect("slow waits lock");
        if slow.count > 0 {
            slow.count += 1;
            slow.longest = slow.longest.max(waited);
            return;
        }
        // The first of a period: the count starts at 1, so that the next are added up until the period ends.
        slow.count = 1;
        drop(slow);
        tracing::warn!(
            waited_s = waited.as_secs_f64(),
            "a request waited long for a store connection; the next ones are noted together"
        );
        let slow = self.slow.clone();
        tokio::spawn(async move {
            tokio::time::sleep(SLOW_WAITS_NOTED_EVERY).await;
            let noted = std::mem::take(&mut *slow.lock().expect("slow waits lock"));
            if noted.count > 1 {
                tracing::warn!(
                    requests = noted.count - 1,
                    longest_s = noted.longest.as_secs_f64(),
                    within_s = SLOW_WAITS_NOTED_EVERY.as_secs(),
                    over_s = SLOW_WAIT.as_secs(),
                    "more requests waited long for a store connection"
                );
            }
        });
    }

    /// A request waiting since `since` gave up.
    pub(super) fn gave_up(&self, since: Instant) {
        self.waited(since);
        self.timeouts.inc();
    }
}

impl Default for PoolWaits {
    fn default() -> Self {
        Self {
            // 10 µs to about 5 s.
            seconds: Histogram::new(exponential_buckets(0.000_01, 2.5, 15)),
            timeouts: Counter::default(),
            slow: Arc::default(),
        }
    }
}
