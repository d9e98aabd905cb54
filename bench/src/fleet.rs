//! A stream of a client that never loses an answer, for rolling-restart runs: it POSTs its question (through a load
//! balancer), follows `reconnect` (and a connection lost before `done`) by attaching again with `Last-Event-ID`,
//! retries 503s, and checks what it got: every event of its run once, in order, and the text equal to the final
//! answer. Gaps, repeats and mismatches are counted, never hidden.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::body::Body;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::stream::{open, request};
use super::{EventParser, Plan, Stats};

/// How long a client waits before trying again after a 503 or a refused connection.
const RETRY: Duration = Duration::from_millis(100);
/// How long a client keeps trying to start or re-attach before it counts as lost.
const GIVE_UP: Duration = Duration::from_secs(120);

/// What one client has seen of its run.
#[derive(Default)]
struct Seen {
    run_id: String,
    /// The next seq expected.
    next: u64,
    text: String,
    output: Option<String>,
    completed: bool,
    done: bool,
    /// From a `reconnect`: where to attach, after which id, after how long.
    reconnect: Option<(String, String, Duration)>,
}

impl Seen {
    fn take(&mut self, raw: &[u8], stats: &Stats) {
        let text = String::from_utf8_lossy(raw);
        let (mut id, mut data) = (None, None);
        for line in text.lines() {
            if let Some(value) = line.strip_prefix("id:") {
                id = Some(value.trim_start().to_owned());
            } else if let Some(value) = line.strip_prefix("data:") {
                data = Some(value.trim_start().to_owned());
            }
        }
        let Some(Ok(event)) = data.map(|d| serde_json::from_str::<Value>(&d)) else {
            return;
        };
        let kind = event["type"].as_str().unwrap_or_default();
        if kind == "reconnect" {
            stats.reconnects.fetch_add(1, Ordering::Relaxed);
            let retry = Duration::from_millis(event["retry_ms"].as_u64().unwrap_or(1_000));
            let resume = event["resume"].as_str().unwrap_or_default().to_owned();
            let last = event["last_event_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            self.reconnect = Some((resume, last, retry));
            return;
        }
        let Some(seq) = id
            .as_deref()
            .and_then(|id| id.rsplit_once(':'))
            .and_then(|(_, seq)| seq.parse::<u64>().ok())
        else {
            return;
        };
        if seq < self.next {
            stats.duplicated.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if seq > self.next {
            stats.lost.fetch_add(seq - self.next, Ordering::Relaxed);
        }
        self.next = seq + 1;
        stats.events.fetch_add(1, Ordering::Relaxed);
        match kind {
            "run_started" => {
                self.run_id = event["run_id"].as_str().unwrap_or_default().to_owned();
            }
            "model_delta" => {
                stats.deltas.fetch_add(1, Ordering::Relaxed);
                self.text
                    .push_str(event["content"].as_str().unwrap_or_default());
            }
            "final_answer" => self.output = event["output"].as_str().map(str::to_owned),
            "run_completed" => self.completed = true,
            "run_interrupted" => {
                stats.interrupted.fetch_add(1, Ordering::Relaxed);
            }
            "done" => self.done = true,
            _ => {}
        }
    }
}

/// One client's question, to its `done`.
pub(super) async fn one_followed(i: usize, plan: &Plan, stats: &Stats, stop: &CancellationToken) {
    let source = plan.sources[i % plan.sources.len()];
    let chat = crate::chat_for(plan);
    let requested = Instant::now();
    let mut seen = Seen {
        next: 1,
        ..Seen::default()
    };
    let mut attach: Option<(String, String)> = None;
    let mut counted = false;
    loop {
        let deadline = Instant::now() + GIVE_UP;
        let (mut response, connection) = loop {
            let mut next = request(
                plan,
                plan.target,
                chat,
                attach.as_ref().map(|(path, _)| path.as_str()),
            );
            if let Some((_, last)) = &attach {
                next.headers_mut().insert(
                    "last-event-id",
                    last.parse().expect("an id is a header value"),
                );
            }
            match open(
                source,
                plan.target,
                next,
                plan.response_timeout,
                stop,
                plan.h2.as_deref(),
            )
            .await
            {
                Ok(opened) => break opened,
                Err(kind) if kind.is_empty() => return,
                Err(kind) if Instant::now() >= deadline => {
                    return stats.error(format!("gave up: {kind}"));
                }
                Err(kind) => {
                    if kind == "http 503" {
                        stats.retried.fetch_add(1, Ordering::Relaxed);
                    } else if kind != "request failed" && !kind.starts_with("connect") {
                        return stats.error(kind);
                    }
                    tokio::time::sleep(RETRY).await;
                }
            }
        };
        let mut parser = EventParser::default();
        while let Some(Ok(frame)) = response.body_mut().frame().await {
            if let Ok(data) = frame.into_data() {
                parser.feed(&data, |_, raw| seen.take(raw, stats));
            }
            if !counted && !seen.run_id.is_empty() {
                counted = true;
                stats.started.fetch_add(1, Ordering::Relaxed);
                stats.to_started.lock().unwrap().push(requested.elapsed());
                stats.settle();
            }
            if seen.done || response.body().is_end_stream() {
                break;
            }
        }
        connection.abort();
        if seen.done {
            break;
        }
        attach = Some(match seen.reconnect.take() {
            Some((path, last, retry)) => {
                tokio::time::sleep(retry).await;
                (path, last)
            }
            None if seen.run_id.is_empty() => return stats.error("cut before run_started"),
            None => {
                // Cut without being told: count it, and attach again after the last event.
                stats.cut.fetch_add(1, Ordering::Relaxed);
                let path = format!("/agents/chats/{chat}/runs/{}/stream", seen.run_id);
                (path, format!("{}:{}", seen.run_id, seen.next - 1))
            }
        });
    }
    stats.done.fetch_add(1, Ordering::Relaxed);
    stats
        .last_done_unix_ns
        .fetch_max(super::unix_ns(), Ordering::Relaxed);
    if seen.completed {
        stats.completed.fetch_add(1, Ordering::Relaxed);
    }
    // An interrupted run has no final answer to compare with.
    if seen
        .output
        .as_ref()
        .is_some_and(|output| *output != seen.text)
    {
        stats.mismatched.fetch_add(1, Ordering::Relaxed);
    }
}
