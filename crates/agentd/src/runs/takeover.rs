//! Takeover: a run whose producer is gone (it released the run at a handoff drain's deadline, or its process
//! stopped) is continued by a replica that has a follower attached to it.
//!
//! The replica claims the run in the store (see [`crate::store`]: the claim raises the run's fencing epoch, exactly
//! one claimer wins, and the old producer can append nothing more), rebuilds where the run was from its log (the
//! steps so far with their tool results, the answer so far of the step that was cut, and the tool calls that started
//! without a result), and produces on from the next seq, so its followers see one seamless run. The caller's bearer
//! token is never stored: the continuation acts for the client that re-attached here.

use std::time::{Duration, Instant};

use serde::Deserialize;
use uuid::Uuid;

use super::drive::drive;
use super::engine::{Prompt, Resumed};
use super::follow;
use super::{AgentContext, RunService};
use crate::metrics::RunOutcome;
use crate::model::{Message, ModelSpec, ToolCall, Usage};
use crate::store::{RunEnd, RunStatus, StoreError};
use crate::stream_tracker::{Held, Rejection};
use crate::tools::ToolContext;

impl RunService {
    /// Claims the runs followed here whose producer is gone, and continues each one for the client following it.
    pub(super) async fn take_over_followed(&self) {
        let parts = &self.inner.parts;
        // A replica that is shutting down leaves the runs to the others.
        if matches!(
            parts.tracker.admitting(Held::NONE),
            Err(Rejection::ShuttingDown)
        ) {
            return;
        }
        // Not the runs driven here: a follower here of a run this process took over still reads it as it did before,
        // and should the run's heartbeat fall behind (a busy machine), claiming it again would start a second
        // producer of it beside the first.
        let mut followed = self.log().followed_with_callers();
        followed.retain(|(id, _)| !self.live().contains(*id));
        if followed.is_empty() {
            return;
        }
        let ids: Vec<Uuid> = followed.iter().map(|(id, _)| *id).collect();
        let claimed = match parts
            .store
            .claim(&ids, parts.lease, &parts.instance_id)
            .await
        {
            Ok(claimed) => claimed,
            Err(error) => {
                tracing::warn!(%error, "could not claim the followed runs whose producer is gone");
                return;
            }
        };
        // Each run is continued on a task of its own, and counts as driven here (its lease kept fresh) from the claim
        // on: a peer's deploy releases all its runs at once, and continuing them one after another (several reads of
        // the store each) held up this loop, which notes the runs followed here, and kept the last ones past the
        // lease with no heartbeat, so that a third replica marked them interrupted under their followers.
        for (run_id, epoch) in claimed {
            let Some((_, caller)) = followed.iter().find(|(id, _)| *id == run_id) else {
                continue;
            };
            let held = self.live().enter(run_id);
            let (runs, caller) = (self.clone(), caller.clone());
            self.inner.component.tasks.spawn(async move {
                // Counts the run until its own task enters it (the latest entry is the one that counts).
                let _held = held;
                match runs.continuation(run_id, epoch, caller).await {
                    Ok(Some(driven)) => {
                        driven.await;
                    }
                    Ok(None) => {}
                    // Nothing refreshes its lease once this task ends, so it runs out: another claim, or the run is
                    // interrupted.
                    Err(error) => {
                        tracing::error!(%run_id, %error, "claimed a run but could not continue it");
                    }
                }
            });
        }
    }

    /// The task that continues run `run_id`, just claimed under `epoch`, acting for `caller`, once what it needs is
    /// read from the store; `None` when the run's log has its end already (see [`logged_end`]).
    async fn continuation(
        &self,
        run_id: Uuid,
        epoch: u64,
        caller: ToolContext,
    ) -> Result<Option<impl Future<Output = RunOutcome> + Send + use<>>, StoreError> {
        let parts = &self.inner.parts;
        let store = &parts.store;
        let run = store
            .get_run(run_id)
            .await?
            .ok_or(StoreError::RunNotFound(run_id))?;
        let messages = store.messages(run.chat_id).await?;
        let prompt = messages
            .iter()
            .position(|m| m.run_id == Some(run_id) && matches!(m.message, Message::User { .. }))
            .ok_or_else(|| StoreError::Corrupt(format!("run {run_id} has no prompt")))?;
        let Message::User { content: question } = &messages[prompt].message else {
            unreachable!("found as a user message");
        };
        let history = messages[..prompt]
            .iter()
            .map(|m| m.message.clone())
            .collect();
        // The continuation acts in the context the run was asked in.
        let context: AgentContext = run
            .agent_context
            .as_deref()
            .and_then(|json| serde_json::from_str(json).ok())
            .unwrap_or_default();
        let chat = store
            .get_chat(run.chat_id)
            .await?
            .ok_or(StoreError::ChatNotFound(run.chat_id))?;
        let system = self.instructions_for(run.chat_id, &chat.owner, &context);
        let caller = ToolContext {
            canvas_version: context.canvas_version,
            ..caller
        };
        let model = ModelSpec::parse(&run.model)
            .map_err(|e| StoreError::Corrupt(format!("run {run_id}: {e}")))?;
        let events = store.events_of(run_id).await?;
        let resumed = Resumed::from_log(&events);
        if let Some((status, error)) = logged_end(&events) {
            // Its process logged the run's end but could not store it (the store was down): the end is stored now,
            // as the log tells it, rather than the run continued past its `done`.
            let end = RunEnd {
                status,
                error,
                output: resumed.output,
                usage: Usage::default(),
                messages: Vec::new(),
            };
            store.finish_run(run_id, epoch, &end).await?;
            tracing::info!(%run_id, status = status.as_str(),
                "claimed a run whose log had its end; stored that end rather than continue it");
            return Ok(None);
        }
        let after = events.last().map_or(0, |(seq, _)| *seq);
        let writer = parts.log.produce(
            run_id,
            epoch,
            events.into_iter().map(|(_, json)| json.into()).collect(),
        );
        let age = (time::OffsetDateTime::now_utc() - run.created_at)
            .try_into()
            .unwrap_or(Duration::ZERO);
        let started = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
        let ctx = self.context(run.chat_id, run_id, epoch, &model, system, caller, started);
        parts.metrics.run_taken_over();
        tracing::info!(%run_id, chat_id = %run.chat_id, epoch, after_seq = after,
            "took over a run whose producer was gone; continuing it");
        Ok(Some(drive(
            ctx,
            Prompt {
                history,
                question: question.clone(),
            },
            writer,
            resumed,
        )))
    }
}

/// How a run ended, by its log, when the log ends with `done`: the status and error to store. A run whose log has its
/// end but is still `running` in the store is one whose end its process could not store (the store was down; the
/// run failed for it, and its log got its last events once the store took them again).
fn logged_end(events: &[(u64, String)]) -> Option<(RunStatus, Option<String>)> {
    #[derive(Deserialize)]
    #[serde(tag = "type", rename_all = "snake_case")]
    enum Ending {
        RunFailed {
            error: String,
        },
        RunInterrupted {
            reason: String,
        },
        RunCompleted {},
        #[serde(other)]
        Other,
    }
    if !follow::ends(events) {
        return None;
    }
    let before = &events[..events.len() - 1];
    // The events that end a run come last, before `done`, the first of them the one that counts (a `run_failed` may
    // follow a `run_interrupted` for the seed's clients).
    let mut ending = None;
    for (_, json) in before.iter().rev() {
        match serde_json::from_str::<Ending>(json) {
            Ok(Ending::Other) | Err(_) => break,
            Ok(found) => ending = Some(found),
        }
    }
    Some(match ending {
        Some(Ending::RunCompleted {}) => (RunStatus::Completed, None),
        Some(Ending::RunFailed { error }) => (RunStatus::Failed, Some(error)),
        Some(Ending::RunInterrupted { reason }) => (
            RunStatus::Interrupted,
            Some(format!("the run was interrupted ({reason})")),
        ),
        Some(Ending::Other) | None => (
            RunStatus::Failed,
            Some("the run ended without saying how".to_owned()),
        ),
    })
}

/// The events whose content matters to continue a run.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Logged {
    ModelDelta {
        content: String,
    },
    ToolStarted {
        tool_name: String,
        tool_call_id: String,
        args: serde_json::Value,
    },
    ToolFinished {
        tool_call_id: String,
        result: Option<String>,
    },
    #[serde(other)]
    Other,
}

impl Resumed {
    /// Where a run stood after `events` (its log so far). Within a step, the engine emits the model's text, then every
    /// `tool_started` of the step, then their `tool_finished` as they end; text or a `tool_started` after a
    /// `tool_finished` opens the next step.
    pub(super) fn from_log(events: &[(u64, String)]) -> Self {
        let mut resumed = Self::default();
        let mut text = String::new();
        let mut calls: Vec<ToolCall> = Vec::new();
        let mut results: Vec<Message> = Vec::new();
        for (_, json) in events {
            let Ok(event) = serde_json::from_str::<Logged>(json) else {
                continue;
            };
            match event {
                Logged::ModelDelta { content } => {
                    if !calls.is_empty() {
                        close_step(&mut resumed.steps, &mut text, &mut calls, &mut results);
                    }
                    text.push_str(&content);
                    resumed.output.push_str(&content);
                }
                Logged::ToolStarted {
                    tool_name,
                    tool_call_id,
                    args,
                } => {
                    if !results.is_empty() {
                        close_step(&mut resumed.steps, &mut text, &mut calls, &mut results);
                    }
                    calls.push(ToolCall {
                        id: tool_call_id,
                        name: tool_name,
                        args,
                    });
                }
                Logged::ToolFinished {
                    tool_call_id,
                    result,
                } => results.push(Message::ToolResult {
                    tool_call_id,
                    content: result.unwrap_or_else(|| {
                        serde_json::json!({"error": "the tool's result was not kept"}).to_string()
                    }),
                }),
                Logged::Other => {}
            }
        }
        if calls.is_empty() {
            resumed.partial = text;
        } else {
            resumed.unfinished = calls
                .iter()
                .filter(|call| {
                    !results.iter().any(|r| {
                        matches!(r, Message::ToolResult { tool_call_id, .. } if *tool_call_id == call.id)
                    })
                })
                .cloned()
                .collect();
            close_step(&mut resumed.steps, &mut text, &mut calls, &mut results);
        }
        resumed
    }
}

/// The step so far becomes history: the model's answer with its tool calls, then the results that came back.
fn close_step(
    steps: &mut Vec<Message>,
    text: &mut String,
    calls: &mut Vec<ToolCall>,
    results: &mut Vec<Message>,
) {
    steps.push(Message::Assistant {
        content: std::mem::take(text),
        tool_calls: std::mem::take(calls),
    });
    steps.append(results);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runs::follow::DONE;

    fn log(events: &[&str]) -> Vec<(u64, String)> {
        events
            .iter()
            .enumerate()
            .map(|(i, json)| (i as u64 + 1, (*json).to_owned()))
            .collect()
    }

    const STARTED: &str = r#"{"type":"run_started"}"#;

    #[test]
    fn a_logged_end_is_the_first_of_the_events_that_end_the_run() {
        let delta = r#"{"type":"model_delta","content":"a"}"#;
        assert_eq!(logged_end(&log(&[STARTED, delta])), None);
        assert_eq!(logged_end(&log(&[])), None);
        let failed = r#"{"type":"run_failed","error":"the store failed","code":"store_failed"}"#;
        assert_eq!(
            logged_end(&log(&[STARTED, delta, failed, DONE])),
            Some((RunStatus::Failed, Some("the store failed".to_owned())))
        );
        // The seed's clients also get a `run_failed` after `run_interrupted`: the interruption is what happened.
        let interrupted = r#"{"type":"run_interrupted","reason":"cancelled","resume":"/r"}"#;
        assert_eq!(
            logged_end(&log(&[STARTED, delta, interrupted, failed, DONE])),
            Some((
                RunStatus::Interrupted,
                Some("the run was interrupted (cancelled)".to_owned())
            ))
        );
        let answer = r#"{"type":"final_answer","output":"a","usage":{}}"#;
        let completed = r#"{"type":"run_completed","elapsed_ms":3}"#;
        assert_eq!(
            logged_end(&log(&[STARTED, delta, answer, completed, DONE])),
            Some((RunStatus::Completed, None))
        );
        assert_eq!(
            logged_end(&log(&[STARTED, DONE])),
            Some((
                RunStatus::Failed,
                Some("the run ended without saying how".to_owned())
            ))
        );
    }

    #[test]
    fn a_cut_answer_is_the_partial_text() {
        let resumed = Resumed::from_log(&log(&[
            STARTED,
            r#"{"type":"model_delta","content":"Agents"}"#,
            r#"{"type":"model_delta","content":" answer"}"#,
        ]));
        assert_eq!(resumed.partial, "Agents answer");
        assert_eq!(resumed.output, "Agents answer");
        assert!(resumed.steps.is_empty() && resumed.unfinished.is_empty());
    }

    #[test]
    fn tool_steps_become_history_and_a_call_without_result_is_unfinished() {
        let resumed = Resumed::from_log(&log(&[
            STARTED,
            r#"{"type":"model_delta","content":"Let me look."}"#,
            r#"{"type":"tool_started","tool_name":"a","tool_call_id":"1","args":{}}"#,
            r#"{"type":"tool_started","tool_name":"b","tool_call_id":"2","args":{"x":1}}"#,
            r#"{"type":"tool_finished","tool_name":"b","tool_call_id":"2","elapsed_ms":1,"result":"B"}"#,
        ]));
        assert_eq!(resumed.partial, "");
        assert_eq!(resumed.unfinished.len(), 1);
        assert_eq!(resumed.unfinished[0].id, "1");
        assert_eq!(
            resumed.steps,
            vec![
                Message::Assistant {
                    content: "Let me look.".into(),
                    tool_calls: vec![
                        ToolCall {
                            id: "1".into(),
                            name: "a".into(),
                            args: serde_json::json!({})
                        },
                        ToolCall {
                            id: "2".into(),
                            name: "b".into(),
                            args: serde_json::json!({"x": 1})
                        },
                    ],
                },
                Message::ToolResult {
                    tool_call_id: "2".into(),
                    content: "B".into()
                },
            ]
        );
    }

    #[test]
    fn text_after_the_results_opens_the_next_step() {
        let resumed = Resumed::from_log(&log(&[
            STARTED,
            r#"{"type":"tool_started","tool_name":"a","tool_call_id":"1","args":{}}"#,
            r#"{"type":"tool_finished","tool_name":"a","tool_call_id":"1","elapsed_ms":1,"result":"A"}"#,
            r#"{"type":"model_delta","content":"It is"}"#,
        ]));
        assert_eq!(resumed.steps.len(), 2);
        assert_eq!(resumed.partial, "It is");
        assert!(resumed.unfinished.is_empty());
    }
}
