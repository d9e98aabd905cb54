//! An SSE load generator for agentd's stream route (and anything that speaks the same protocol).
//!
//! Ordinary HTTP benchmarkers time whole responses and cannot see open streams. This one opens many concurrent
//! streams (ramping at a set rate), parses their events as they arrive, and reports: streams held open, errors by
//! kind, events per second, the time from request to `run_started` and to the first `model_delta`, and the server's
//! memory (RSS from `/proc/<pid>/status`) idle, at checkpoints, and per stream.
//!
//! Each stream is its own hyper HTTP/1 client connection, bound to one of several loopback source addresses
//! (127.0.0.2, 127.0.0.3, ...) so that the ephemeral-port range of one address is not what stops a large run; or,
//! with `h2`, a stream of an HTTP/2 connection shared with others. When
//! a machine limit does stop it (the client's open files, ports), the report says which.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

mod fleet;
mod parse;
mod stream;

use stream::one_stream;

pub use parse::{EventKind, EventParser};
pub use stream::H2Connections;

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub target: SocketAddr,
    /// Streams to open.
    pub streams: usize,
    /// New streams per second; 0 opens them as fast as possible.
    pub ramp_per_sec: f64,
    /// At most this many streams in flight at once (a new one starts when one ends).
    pub concurrency: usize,
    pub model: String,
    pub question: String,
    /// Loopback source addresses to spread connections over.
    pub sources: Vec<IpAddr>,
    pub bearer: Option<String>,
    /// After every stream was opened, keep them this long (or until all have ended), then stop; `None` waits for
    /// every stream to end.
    pub hold: Option<Duration>,
    /// Stop opening new streams after this many errors.
    pub stop_after_errors: usize,
    /// Server process whose memory is read.
    pub server_pid: Option<u32>,
    /// Open-stream counts at which the server's RSS is read (after a short settle). The ramp waits meanwhile, then
    /// goes on at its rate.
    pub rss_checkpoints: Vec<usize>,
    /// How long a stream may wait for its response head before it counts as an error.
    pub response_timeout: Duration,
    /// Counts streams that got `run_started` or failed, for a caller waiting on this run from outside.
    pub settled: Option<Arc<AtomicUsize>>,
    /// GET this path instead of POSTing a question (attach to a run: a replay).
    pub path: Option<String>,
    /// POST to `target`, then follow each run from this other replica's attach route and measure that stream.
    pub follow_at: Option<SocketAddr>,
    /// With `follow_at`: close the run's own stream once the follower is set up (the client moved), rather than
    /// keep reading it (a second client).
    pub leave_producer: bool,
    /// Each stream is a client that follows `reconnect` and lost connections to its run's `done`, retrying 503s, and
    /// checks it saw every event once (rolling restarts).
    pub follow_reconnect: bool,
    /// Chats made beforehand (over gRPC, for a token's caller); `None`: a new id per stream (dev mode makes it).
    pub chats: Option<Arc<ChatPool>>,
    /// Streams share these HTTP/2 connections (prior knowledge) rather than each opening its own HTTP/1.1 one.
    pub h2: Option<Arc<H2Connections>>,
}

/// Chats handed to streams in turn; a chat has one run at a time, so there are as many as streams in flight.
#[derive(Debug)]
pub struct ChatPool {
    ids: Vec<uuid::Uuid>,
    next: AtomicUsize,
}

impl ChatPool {
    pub fn new(ids: Vec<uuid::Uuid>) -> Self {
        assert!(!ids.is_empty(), "a chat pool needs a chat");
        Self {
            ids,
            next: AtomicUsize::new(0),
        }
    }

    /// The chat for the next stream.
    pub fn take(&self) -> uuid::Uuid {
        self.ids[self.next.fetch_add(1, Ordering::Relaxed) % self.ids.len()]
    }
}

/// The chat a new stream asks in.
pub(crate) fn chat_for(plan: &Plan) -> uuid::Uuid {
    plan.chats
        .as_ref()
        .map_or_else(uuid::Uuid::new_v4, |pool| pool.take())
}

/// Loopback source addresses 127.0.0.2 .. 127.0.0.(1+n).
pub fn loopback_sources(n: usize) -> Vec<IpAddr> {
    (0..n.clamp(1, 250))
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i as u8)))
        .collect()
}

/// Percentiles of a set of durations, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub count: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(mut samples: Vec<Duration>) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_unstable();
        let at = |p: usize| {
            let index = (samples.len() * p).div_ceil(100).saturating_sub(1);
            samples[index.min(samples.len() - 1)].as_secs_f64() * 1000.0
        };
        Self {
            count: samples.len(),
            p50: at(50),
            p90: at(90),
            p99: at(99),
            max: samples[samples.len() - 1].as_secs_f64() * 1000.0,
        }
    }
}

/// What a run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub requested: usize,
    /// Streams that got their `run_started`.
    pub started: usize,
    /// Streams that ended with `done` (`completed` among them ended with `run_completed`).
    pub done: usize,
    pub completed: usize,
    pub interrupted: usize,
    /// Most streams open at once.
    pub max_open: usize,
    pub errors: BTreeMap<String, usize>,
    pub events: u64,
    pub deltas: u64,
    /// From the first request to the end of the run.
    pub seconds: f64,
    /// From the first request to the last event received: the time events were flowing.
    pub active_seconds: f64,
    /// Events (and `model_delta`s) per active second.
    pub events_per_sec: f64,
    pub deltas_per_sec: f64,
    pub to_run_started_ms: Percentiles,
    pub to_first_delta_ms: Percentiles,
    /// For deltas stamped with their production time (the test model's `clock=1`): how long each took to arrive.
    pub delta_delivery_ms: Percentiles,
    /// The same, for the deltas received while every stream was open and none had ended (the steady load, without
    /// the ramp).
    pub delta_delivery_all_open_ms: Percentiles,
    pub rss_idle_kib: Option<u64>,
    /// Server RSS at each checkpoint (streams launched), and after the hold.
    pub rss_kib: BTreeMap<usize, u64>,
    /// (RSS at the checkpoint - idle RSS) / streams open then.
    pub rss_per_stream_kib: BTreeMap<usize, f64>,
    /// Wall-clock time (ns since the Unix epoch) of the last `done` received.
    pub last_done_unix_ns: u64,
    /// What ended the ramp: `target reached`, or the limit or error that stopped it.
    pub stopped_by: String,
    /// With `follow_reconnect`: `reconnect` events followed, 503s retried, connections cut without a `reconnect`,
    /// events missed (gaps in the ids) and received twice, and runs whose text differs from their final answer.
    pub reconnects: u64,
    pub retried_503: u64,
    pub cut: u64,
    pub lost_events: u64,
    pub duplicated_events: u64,
    pub text_mismatches: u64,
}

struct Stats {
    /// When the run began; event times are measured from here.
    began: Instant,
    started: AtomicUsize,
    done: AtomicUsize,
    completed: AtomicUsize,
    interrupted: AtomicUsize,
    open: AtomicUsize,
    max_open: AtomicUsize,
    failed: AtomicUsize,
    events: AtomicU64,
    deltas: AtomicU64,
    last_done_unix_ns: AtomicU64,
    /// Nanoseconds from the start of the run to the last event received.
    last_event_ns: AtomicU64,
    errors: Mutex<BTreeMap<String, usize>>,
    to_started: Mutex<Vec<Duration>>,
    to_first_delta: Mutex<Vec<Duration>>,
    delivery: Mutex<Vec<Duration>>,
    delivery_all_open: Mutex<Vec<Duration>>,
    /// The plan's outside counter of streams started or failed.
    settled: Option<Arc<AtomicUsize>>,
    reconnects: AtomicU64,
    retried: AtomicU64,
    cut: AtomicU64,
    lost: AtomicU64,
    duplicated: AtomicU64,
    mismatched: AtomicU64,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            began: Instant::now(),
            started: AtomicUsize::default(),
            done: AtomicUsize::default(),
            completed: AtomicUsize::default(),
            interrupted: AtomicUsize::default(),
            open: AtomicUsize::default(),
            max_open: AtomicUsize::default(),
            failed: AtomicUsize::default(),
            events: AtomicU64::default(),
            deltas: AtomicU64::default(),
            last_done_unix_ns: AtomicU64::default(),
            last_event_ns: AtomicU64::default(),
            errors: Mutex::default(),
            to_started: Mutex::default(),
            to_first_delta: Mutex::default(),
            delivery: Mutex::default(),
            delivery_all_open: Mutex::default(),
            settled: None,
            reconnects: AtomicU64::default(),
            retried: AtomicU64::default(),
            cut: AtomicU64::default(),
            lost: AtomicU64::default(),
            duplicated: AtomicU64::default(),
            mismatched: AtomicU64::default(),
        }
    }
}

impl Stats {
    fn error(&self, kind: impl Into<String>) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        self.settle();
        *self.errors.lock().unwrap().entry(kind.into()).or_default() += 1;
    }

    fn settle(&self) {
        if let Some(settled) = &self.settled {
            settled.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Reads `VmRSS` of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Raises this process's soft open-file limit to the hard one; returns the limit in force.
pub fn raise_open_file_limit() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024)
}

/// Runs the plan to its end and reports.
pub async fn run(plan: Plan) -> Report {
    let stats = Arc::new(Stats {
        settled: plan.settled.clone(),
        ..Stats::default()
    });
    let stop = CancellationToken::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(plan.concurrency.max(1)));
    let rss_idle = plan.server_pid.and_then(rss_kib);
    let mut rss = BTreeMap::new();
    let mut checkpoints: Vec<usize> = plan.rss_checkpoints.clone();
    checkpoints.sort_unstable();
    let started_at = Instant::now();
    // Where the ramp's schedule starts. A pause to read the server's memory moves it on by the pause, so the streams
    // after a checkpoint keep the ramp's rate rather than all set out at once to catch up with it.
    let mut ramp_from = started_at;
    let mut tasks = tokio::task::JoinSet::new();
    let mut stopped_by = "target reached".to_owned();
    let plan = Arc::new(plan);

    for i in 0..plan.streams {
        if plan.ramp_per_sec > 0.0 {
            let due = ramp_from + Duration::from_secs_f64(i as f64 / plan.ramp_per_sec);
            tokio::time::sleep_until(due.into()).await;
        }
        let permit = Arc::clone(&slots)
            .acquire_owned()
            .await
            .expect("the semaphore stays open");
        // Counted once a slot is free: the stream that held it has counted its error by then.
        if stats.failed.load(Ordering::Relaxed) >= plan.stop_after_errors {
            stopped_by = dominant_error(&stats);
            break;
        }
        let (plan_, stats_, stop_) = (Arc::clone(&plan), Arc::clone(&stats), stop.clone());
        tasks.spawn(async move {
            if plan_.follow_reconnect {
                fleet::one_followed(i, &plan_, &stats_, &stop_).await;
            } else {
                one_stream(i, &plan_, &stats_, &stop_).await;
            }
            drop(permit);
        });
        if checkpoints.first() == Some(&(i + 1)) {
            checkpoints.remove(0);
            let paused_at = Instant::now();
            // Wait until every stream launched so far is open (or failed), let the server settle, then read.
            while stats.started.load(Ordering::Relaxed) + stats.failed.load(Ordering::Relaxed)
                < i + 1
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            if let Some(kib) = plan.server_pid.and_then(rss_kib) {
                rss.insert(i + 1, (kib, stats.open.load(Ordering::Relaxed)));
            }
            ramp_from += paused_at.elapsed();
        }
    }
    if let Some(hold) = plan.hold {
        let launched = tasks.len();
        while stats.started.load(Ordering::Relaxed) + stats.failed.load(Ordering::Relaxed)
            < launched
            && !tasks.is_empty()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Streams that all end before the hold is over end it: there is nothing left to hold.
        tokio::select! {
            () = tokio::time::sleep(hold) => {}
            () = async { while tasks.join_next().await.is_some() {} } => {}
        }
        if let Some(kib) = plan.server_pid.and_then(rss_kib) {
            let open = stats.open.load(Ordering::Relaxed);
            rss.entry(launched).or_insert((kib, open));
        }
        stop.cancel();
    }
    while tasks.join_next().await.is_some() {}
    let seconds = started_at.elapsed().as_secs_f64();
    let active_seconds =
        (stats.last_event_ns.load(Ordering::Relaxed) as f64 / 1e9).max(f64::MIN_POSITIVE);

    let errors = stats.errors.lock().unwrap().clone();
    let events = stats.events.load(Ordering::Relaxed);
    let deltas = stats.deltas.load(Ordering::Relaxed);
    let rss_per_stream_kib = rss
        .iter()
        .filter(|(_, (_, open))| *open > 0)
        .filter_map(|(at, (kib, open))| {
            rss_idle.map(|idle| (*at, (*kib as f64 - idle as f64) / *open as f64))
        })
        .collect();
    let rss = rss.into_iter().map(|(at, (kib, _))| (at, kib)).collect();
    Report {
        requested: plan.streams,
        started: stats.started.load(Ordering::Relaxed),
        done: stats.done.load(Ordering::Relaxed),
        completed: stats.completed.load(Ordering::Relaxed),
        interrupted: stats.interrupted.load(Ordering::Relaxed),
        max_open: stats.max_open.load(Ordering::Relaxed),
        errors,
        events,
        deltas,
        seconds,
        active_seconds,
        events_per_sec: events as f64 / active_seconds,
        deltas_per_sec: deltas as f64 / active_seconds,
        to_run_started_ms: Percentiles::of(std::mem::take(&mut stats.to_started.lock().unwrap())),
        delta_delivery_ms: Percentiles::of(std::mem::take(&mut stats.delivery.lock().unwrap())),
        delta_delivery_all_open_ms: Percentiles::of(std::mem::take(
            &mut stats.delivery_all_open.lock().unwrap(),
        )),
        to_first_delta_ms: Percentiles::of(std::mem::take(
            &mut stats.to_first_delta.lock().unwrap(),
        )),
        rss_idle_kib: rss_idle,
        rss_kib: rss,
        rss_per_stream_kib,
        last_done_unix_ns: stats.last_done_unix_ns.load(Ordering::Relaxed),
        stopped_by,
        reconnects: stats.reconnects.load(Ordering::Relaxed),
        retried_503: stats.retried.load(Ordering::Relaxed),
        cut: stats.cut.load(Ordering::Relaxed),
        lost_events: stats.lost.load(Ordering::Relaxed),
        duplicated_events: stats.duplicated.load(Ordering::Relaxed),
        text_mismatches: stats.mismatched.load(Ordering::Relaxed),
    }
}

fn dominant_error(stats: &Stats) -> String {
    let errors = stats.errors.lock().unwrap();
    errors
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(kind, n)| format!("errors: {kind} ({n})"))
        .unwrap_or_else(|| "errors".to_owned())
}

/// Names a connect failure by the machine limit behind it.
fn connect_error(error: &std::io::Error) -> String {
    match error.raw_os_error() {
        Some(24) => "client open-file limit (EMFILE)".to_owned(),
        Some(23) => "system open-file limit (ENFILE)".to_owned(),
        Some(99) => "ephemeral ports exhausted (EADDRNOTAVAIL)".to_owned(),
        Some(111) => "connection refused".to_owned(),
        Some(104) => "connection reset".to_owned(),
        _ => format!("connect: {}", error.kind()),
    }
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_nearest_rank() {
        let samples = (1..=100).map(Duration::from_millis).collect();
        let p = Percentiles::of(samples);
        assert_eq!(
            (p.count, p.p50, p.p90, p.p99, p.max),
            (100, 50.0, 90.0, 99.0, 100.0)
        );
        assert_eq!(Percentiles::of(vec![]), Percentiles::default());
    }
}
