//! A follower: replays a run's events after a given seq, then follows the live run to its `done`, with no gap and no
//! repeat at the seam. Any number of followers may read one run; the POST's own stream is simply the first.
//!
//! The seam holds because a follower marks its wake-up signal as seen *before* it reads: events committed after the
//! read always wake it again, and it always reads from the seq after the last one it sent.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures_core::Stream;
use uuid::Uuid;

use super::log::{Halt, RunLog, Source};
use crate::metrics::Metrics;

/// How often a follower reading from the store looks again when no notification came (a safety net: PostgreSQL
/// notifications wake it at once).
const POLL_EVERY: Duration = Duration::from_secs(5);

/// The JSON of the last event of every run.
pub(super) const DONE: &str = r#"{"type":"done"}"#;

/// Whether a run's events, `(seq, json)` as the store gives them, end with its `done`.
pub(super) fn ends(events: &[(u64, String)]) -> bool {
    events.last().is_some_and(|(_, json)| json == DONE)
}

/// One run's events for one client, from a given seq on.
#[derive(Debug)]
pub struct Follower {
    run_id: Uuid,
    source: Source,
    /// Where to read on when the run leaves this process, and the store it reads (the log's: a clone of the store
    /// here would add its size to every open stream's state).
    log: RunLog,
    /// The next seq to send.
    next: u64,
    pending: VecDeque<(u64, Arc<str>)>,
    /// Whether to read the store before waiting again: at the start, after a full page (there may be more), after
    /// the listener reconnected, at the poll, and when the notifications did not carry the events it needs next.
    look: bool,
    /// The listener's reconnections this follower has caught up with (the remote run counts them).
    catch_ups: u64,
    ended: bool,
    attached: Attached,
}

/// Counts the follower in the metrics while it exists.
#[derive(Debug)]
struct Attached(Arc<Metrics>);

impl Drop for Attached {
    fn drop(&mut self) {
        self.0.follower_detached();
    }
}

impl Follower {
    /// A follower of `run_id` that sends the events after `after` (0: from the start).
    pub fn new(run_id: Uuid, log: RunLog, after: u64, metrics: Arc<Metrics>) -> Self {
        metrics.follower_attached();
        Self {
            run_id,
            source: log.source(run_id),
            log,
            next: after + 1,
            pending: VecDeque::new(),
            look: true,
            catch_ups: 0,
            ended: false,
            attached: Attached(metrics),
        }
    }

    pub fn run_id(&self) -> Uuid {
        self.run_id
    }

    /// Whether the run is produced on this process (its events come from memory).
    pub fn is_local(&self) -> bool {
        matches!(self.source, Source::Local(..))
    }

    /// The next event, `(seq, json)`; `None` after `done`.
    pub async fn next_event(&mut self) -> Option<(u64, Arc<str>)> {
        loop {
            if let Some(event) = self.next_ready() {
                return Some(event);
            }
            if self.ended {
                return None;
            }
            match &mut self.source {
                Source::Local(live, committed) => {
                    let upto = committed.seen();
                    if upto >= self.next {
                        self.pending.extend(live.slice(self.next, upto));
                        continue;
                    }
                    tokio::select! {
                        () = committed.changed() => {}
                        // Another process produces the run now: read on from the store.
                        _ = live.halted_for(&[Halt::Moved]) => {
                            self.source = self.log.stored_source(self.run_id);
                        }
                    }
                }
                Source::Stored(run, wake) => {
                    // Once caught up, a follower reads what the notifications carried, and the store only for
                    // what they did not carry: not once per commit of the run.
                    let committed = wake.seen();
                    if run.catch_ups() != self.catch_ups {
                        // The listener reconnected: what was committed meanwhile is in the store only.
                        self.catch_ups = run.catch_ups();
                        self.look = true;
                    }
                    if committed >= self.next {
                        if let Some(events) = run.recent_from(self.next) {
                            self.pending.extend(events);
                            continue;
                        }
                        self.look = true;
                    }
                    if self.look {
                        self.attached.0.log_read();
                        // Boxed: a read of the store is rare once a follower is caught up, and the room for it would
                        // otherwise be part of every open stream's state.
                        match Box::pin(self.log.store().events_page(self.run_id, self.next - 1))
                            .await
                        {
                            Ok(page) => {
                                // Anything committed after this read is notified, and wakes this follower.
                                self.look = page.full;
                                if !page.events.is_empty() {
                                    self.pending.extend(
                                        page.events
                                            .into_iter()
                                            .map(|(seq, json)| (seq, json.into())),
                                    );
                                    continue;
                                }
                            }
                            Err(error) => {
                                tracing::warn!(run_id = %self.run_id, %error, "could not read the run log; trying again")
                            }
                        }
                    }
                    tokio::select! {
                        // A newer seq, or a catch-up; a seq this follower already has is a notification that came
                        // after the read that found its events: nothing to do.
                        () = wake.changed() => {}
                        () = tokio::time::sleep(POLL_EVERY) => self.look = true,
                    }
                }
            }
        }
    }

    /// The next event if this follower already holds it (read with the ones before it), without waiting.
    pub fn next_ready(&mut self) -> Option<(u64, Arc<str>)> {
        let (seq, json) = self.pending.pop_front()?;
        self.next = seq + 1;
        if &*json == DONE {
            self.ended = true;
            self.pending.clear();
        }
        Some((seq, for_clients(json)))
    }

    /// The seq of the last event sent (0 before the first).
    pub fn last_sent(&self) -> u64 {
        self.next - 1
    }

    /// The events as a stream, for a response body.
    pub fn into_stream(self) -> impl Stream<Item = (u64, Arc<str>)> + Send {
        futures_util::stream::unfold(self, |mut follower| async move {
            let event = follower.next_event().await?;
            Some((event, follower))
        })
    }
}

/// An event as clients see it: the log keeps each tool call's result on its `tool_finished` (so a run can be
/// continued elsewhere), which is for the model, not for clients. The result is the event's last field, and a JSON
/// string never holds `,"result":` unescaped, so cutting there leaves the event exactly as it is without it.
fn for_clients(json: Arc<str>) -> Arc<str> {
    if !json.starts_with(TOOL_FINISHED) {
        return json;
    }
    match json.find(RESULT_FIELD) {
        Some(at) => format!("{}}}", &json[..at]).into(),
        None => json,
    }
}

/// How the JSON of a `tool_finished` event starts, and where its stored result begins.
const TOOL_FINISHED: &str = r#"{"type":"tool_finished""#;
const RESULT_FIELD: &str = r#","result":"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_never_see_a_tool_result() {
        let stored: Arc<str> =
            r#"{"type":"tool_finished","tool_name":"t","elapsed_ms":3,"result":"{\"secret\":1}"}"#
                .into();
        assert_eq!(
            &*for_clients(stored),
            r#"{"type":"tool_finished","tool_name":"t","elapsed_ms":3}"#
        );
        let delta: Arc<str> = r#"{"type":"model_delta","content":"result"}"#.into();
        assert!(Arc::ptr_eq(&for_clients(Arc::clone(&delta)), &delta));
    }
}
