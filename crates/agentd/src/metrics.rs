//! Prometheus metrics, served at `GET /metrics` in the text exposition format.
//!
//! | metric | kind | meaning |
//! |---|---|---|
//! | `agentd_open_streams` | gauge | streams admitted and not yet released |
//! | `agentd_streams_admitted_total` | counter | streams admitted |
//! | `agentd_streams_rejected_total{reason}` | counter | streams refused: `shutdown` or `limit` |
//! | `agentd_runs_total{outcome}` | counter | runs ended: `completed`, `failed`, `interrupted` (shutdown), `cancelled`, `detached` (nobody followed) |
//! | `agentd_followers` | gauge | clients following a run now (streams of the POST and of attach) |
//! | `agentd_replays_total` | counter | attaches served (replay, then follow) |
//! | `agentd_run_log_events_total` | counter | events committed to the run log |
//! | `agentd_run_log_rows_total` | counter | rows written to the run log (consecutive events of a run share one) |
//! | `agentd_run_log_batch_events` | histogram | events per group commit |
//! | `agentd_run_log_commit_seconds` | histogram | how long a group commit took |
//! | `agentd_run_log_commit_failures_total` | counter | group commits that failed (their events were released, and kept to commit again) |
//! | `agentd_run_log_kept_events` | gauge | events the store did not take, kept to commit again until it does |
//! | `agentd_run_log_reads_total` | counter | pages of the run log read from the store by followers (replays, and runs produced elsewhere whose events the notifications did not carry) |
//! | `agentd_run_failures_total{code}` | counter | runs failed, by error code (see [`crate::error::ErrorCode`]) |
//! | `agentd_tool_failures_total{kind}` | counter | tool calls that gave the model an error, by kind |
//! | `agentd_drain_duration_seconds` | gauge | how long the last drain took (0 until one ran) |
//! | `agentd_store_acquire_seconds` | histogram | how long a request waited for a pooled store connection |
//! | `agentd_store_acquire_timeouts_total` | counter | requests that gave up waiting for one (answered "store unavailable") |
//! | `agentd_provider_clients{provider}` | gauge | HTTP clients open to a provider (over HTTP/2, a connection each, carrying up to 100 streams) |
//! | `agentd_provider_streams{provider}` | gauge | streams to a provider now |
//! | `agentd_log_lines_dropped_total` | counter | log lines dropped because stderr did not take them as fast as they came (see [`crate::telemetry`]) |

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::error::ErrorCode;
use crate::store::PoolWaits;
use crate::stream_tracker::Rejection;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ProviderLabels {
    provider: &'static str,
}

/// A provider's HTTP clients and the streams they carry, read when the metrics are scraped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderLoad {
    /// As a model spec names it: `openai`, `anthropic`.
    pub provider: &'static str,
    pub clients: usize,
    pub streams: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RejectLabels {
    reason: &'static str,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    Completed,
    Failed,
    Interrupted,
    Cancelled,
    Detached,
    /// Released at the drain deadline in handoff mode, for another replica to continue.
    HandedOff,
    /// Another process claimed it (this one had lost its lease): it stopped here without a word.
    Fenced,
    /// Its chat was deleted mid-run.
    Deleted,
}

impl RunOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Interrupted => "interrupted",
            Self::Cancelled => "cancelled",
            Self::Detached => "detached",
            Self::HandedOff => "handed_off",
            Self::Fenced => "fenced",
            Self::Deleted => "deleted",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CodeLabels {
    code: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Set from the stream tracker when scraped, so it can never disagree with the real count.
    open_streams: Gauge,
    admitted: Counter,
    rejected: Family<RejectLabels, Counter>,
    runs: Family<OutcomeLabels, Counter>,
    run_failures: Family<CodeLabels, Counter>,
    tool_failures: Family<KindLabels, Counter>,
    drain_seconds: Gauge<f64, AtomicU64>,
    followers: Gauge,
    replays: Counter,
    log_events: Counter,
    log_rows: Counter,
    log_batch: Histogram,
    log_commit: Histogram,
    log_failures: Counter,
    log_kept: Gauge,
    log_reads: Counter,
    taken_over: Counter,
    continued_tokens: Counter,
    fencing_rejections: Counter,
    /// Set from the providers' lanes when scraped, like `open_streams`.
    provider_clients: Family<ProviderLabels, Gauge>,
    provider_streams: Family<ProviderLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let open_streams = Gauge::default();
        let admitted = Counter::default();
        let rejected: Family<RejectLabels, Counter> = Family::default();
        // Every series from the start, so a dashboard sees 0 rather than nothing before the first refusal.
        for reason in ["shutdown", "limit"] {
            let _ = rejected.get_or_create(&RejectLabels { reason });
        }
        let runs = Family::default();
        let run_failures = Family::default();
        let tool_failures = Family::default();
        let drain_seconds = Gauge::default();
        let followers = Gauge::default();
        let replays = Counter::default();
        let log_events = Counter::default();
        let log_rows = Counter::default();
        let log_batch = Histogram::new(exponential_buckets(1.0, 4.0, 9));
        let log_commit = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        let log_failures = Counter::default();
        let log_kept = Gauge::default();
        let log_reads = Counter::default();
        let taken_over = Counter::default();
        let continued_tokens = Counter::default();
        let fencing_rejections = Counter::default();
        registry.register(
            "agentd_runs_taken_over",
            "Runs whose producer was gone, continued here",
            taken_over.clone(),
        );
        registry.register(
            "agentd_continued_tokens",
            "Output tokens of runs continued here after a takeover",
            continued_tokens.clone(),
        );
        registry.register(
            "agentd_fencing_rejections",
            "Writes of a producer that had lost its run's lease, refused",
            fencing_rejections.clone(),
        );
        registry.register(
            "agentd_followers",
            "Clients following a run now",
            followers.clone(),
        );
        registry.register("agentd_replays", "Attaches served", replays.clone());
        registry.register(
            "agentd_run_log_events",
            "Events committed to the run log",
            log_events.clone(),
        );
        registry.register(
            "agentd_run_log_rows",
            "Rows written to the run log",
            log_rows.clone(),
        );
        registry.register(
            "agentd_run_log_batch_events",
            "Events per group commit",
            log_batch.clone(),
        );
        registry.register(
            "agentd_run_log_commit_seconds",
            "Group commit time",
            log_commit.clone(),
        );
        registry.register(
            "agentd_run_log_commit_failures",
            "Group commits that failed",
            log_failures.clone(),
        );
        registry.register(
            "agentd_run_log_kept_events",
            "Events the store did not take, kept to commit again",
            log_kept.clone(),
        );
        registry.register(
            "agentd_run_log_reads",
            "Pages of the run log read from the store by followers",
            log_reads.clone(),
        );
        registry.register(
            "agentd_open_streams",
            "Streams admitted and not yet released",
            open_streams.clone(),
        );
        registry.register(
            "agentd_streams_admitted",
            "Streams admitted",
            admitted.clone(),
        );
        registry.register(
            "agentd_streams_rejected",
            "Streams refused, by reason",
            rejected.clone(),
        );
        registry.register("agentd_runs", "Runs ended, by outcome", runs.clone());
        registry.register(
            "agentd_run_failures",
            "Runs failed, by error code",
            run_failures.clone(),
        );
        registry.register(
            "agentd_tool_failures",
            "Tool calls that failed, by kind",
            tool_failures.clone(),
        );
        registry.register(
            "agentd_drain_duration_seconds",
            "How long the last drain of open streams took",
            drain_seconds.clone(),
        );
        let provider_clients = Family::<ProviderLabels, Gauge>::default();
        registry.register(
            "agentd_provider_clients",
            "HTTP clients open to a provider (over HTTP/2, a connection each)",
            provider_clients.clone(),
        );
        let provider_streams = Family::<ProviderLabels, Gauge>::default();
        registry.register(
            "agentd_provider_streams",
            "Streams to a provider now",
            provider_streams.clone(),
        );
        Self {
            registry,
            open_streams,
            admitted,
            rejected,
            runs,
            run_failures,
            tool_failures,
            drain_seconds,
            followers,
            replays,
            log_events,
            log_rows,
            log_batch,
            log_commit,
            log_failures,
            log_kept,
            log_reads,
            taken_over,
            continued_tokens,
            fencing_rejections,
            provider_clients,
            provider_streams,
        }
    }
}

impl Metrics {
    /// These metrics, and how long requests waited for a connection of the store's pool.
    pub fn with_store(mut self, waits: &PoolWaits) -> Self {
        self.registry.register(
            "agentd_store_acquire_seconds",
            "Time waited for a pooled store connection",
            waits.seconds.clone(),
        );
        self.registry.register(
            "agentd_store_acquire_timeouts",
            "Requests that gave up waiting for a store connection",
            waits.timeouts.clone(),
        );
        self
    }

    /// These metrics, and the log lines dropped because stderr did not take them (see [`crate::telemetry`]).
    pub fn with_log(mut self, dropped: Counter) -> Self {
        self.registry.register(
            "agentd_log_lines_dropped",
            "Log lines dropped because stderr did not take them as fast as they came",
            dropped,
        );
        self
    }

    pub fn stream_admitted(&self) {
        self.admitted.inc();
    }

    pub fn stream_rejected(&self, rejection: Rejection) {
        let reason = match rejection {
            Rejection::ShuttingDown => "shutdown",
            Rejection::AtCapacity { .. } => "limit",
        };
        self.rejected.get_or_create(&RejectLabels { reason }).inc();
    }

    /// A run ended; `failure` is its error code when it failed.
    pub fn run_finished(&self, outcome: RunOutcome, failure: Option<ErrorCode>) {
        self.runs
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
            .inc();
        if let Some(code) = failure {
            self.run_failures
                .get_or_create(&CodeLabels {
                    code: code.as_str(),
                })
                .inc();
        }
    }

    pub fn tool_failed(&self, kind: &'static str) {
        self.tool_failures.get_or_create(&KindLabels { kind }).inc();
    }

    pub fn follower_attached(&self) {
        self.followers.inc();
    }

    pub fn follower_detached(&self) {
        self.followers.dec();
    }

    pub fn replay_served(&self) {
        self.replays.inc();
    }

    /// A group commit of `events` events in `rows` rows took `took`.
    pub fn log_committed(&self, events: usize, rows: usize, took: std::time::Duration) {
        self.log_events.inc_by(events as u64);
        self.log_rows.inc_by(rows as u64);
        self.log_batch.observe(events as f64);
        self.log_commit.observe(took.as_secs_f64());
    }

    pub fn log_commit_failed(&self) {
        self.log_failures.inc();
    }

    /// The run log's writer keeps `events` the store did not take.
    pub fn log_kept(&self, events: u64) {
        self.log_kept.set(i64::try_from(events).unwrap_or(i64::MAX));
    }

    /// A follower read a page of the run log from the store.
    pub fn log_read(&self) {
        self.log_reads.inc();
    }

    pub fn run_taken_over(&self) {
        self.taken_over.inc();
    }

    /// A run continued here ended, its continuation having produced `tokens` output tokens.
    pub fn continuation_finished(&self, tokens: u64) {
        self.continued_tokens.inc_by(tokens);
    }

    pub fn fenced(&self) {
        self.fencing_rejections.inc();
    }

    pub fn drain_finished(&self, took: std::time::Duration) {
        self.drain_seconds.set(took.as_secs_f64());
    }

    /// The exposition text, with the gauges read at scrape time set first: the open streams, and each provider's
    /// clients and streams.
    pub fn render(&self, open_streams: usize, providers: &[ProviderLoad]) -> String {
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.open_streams.set(count(open_streams));
        for load in providers {
            let labels = ProviderLabels {
                provider: load.provider,
            };
            self.provider_clients
                .get_or_create(&labels)
                .set(count(load.clients));
            self.provider_streams
                .get_or_create(&labels)
                .set(count(load.streams));
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric_with_its_labels() {
        let metrics = Metrics::default();
        metrics.stream_admitted();
        metrics.stream_rejected(Rejection::ShuttingDown);
        metrics.stream_rejected(Rejection::AtCapacity { limit: 1 });
        metrics.run_finished(RunOutcome::Completed, None);
        metrics.run_finished(RunOutcome::Failed, Some(ErrorCode::ProviderRefused));
        metrics.tool_failed("timeout");
        metrics.drain_finished(std::time::Duration::from_millis(1500));
        let providers = [ProviderLoad {
            provider: "openai",
            clients: 2,
            streams: 170,
        }];
        let text = metrics.render(3, &providers);
        for line in [
            "agentd_open_streams 3",
            "agentd_streams_admitted_total 1",
            "agentd_streams_rejected_total{reason=\"shutdown\"} 1",
            "agentd_streams_rejected_total{reason=\"limit\"} 1",
            "agentd_runs_total{outcome=\"completed\"} 1",
            "agentd_run_failures_total{code=\"provider_refused\"} 1",
            "agentd_tool_failures_total{kind=\"timeout\"} 1",
            "agentd_drain_duration_seconds 1.5",
            "agentd_provider_clients{provider=\"openai\"} 2",
            "agentd_provider_streams{provider=\"openai\"} 170",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
