//! The engine: model ↔ tools. Asks the model, runs the tools it calls (in parallel), gives it the results and asks
//! again, until it answers without tools or the step limit is reached; every event goes to the run log ([`RunWriter`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::events::RunEvent;
use super::history::tool_label;
use super::live::LiveRuns;
use super::log::RunWriter;
use super::recorder::Recorder;
use crate::error::ErrorCode;
use crate::instructions::{OutputSchema, answer_so_far};
use crate::metrics::Metrics;
use crate::model::{Message, Model, ModelError, ModelEvent, ModelRequest, ToolCall};
use crate::store::SessionStore;
use crate::tools::{ToolContext, ToolRegistry, ToolResult};

/// Everything a run needs, decided before its stream starts.
#[derive(Debug)]
pub(super) struct RunContext {
    pub chat_id: Uuid,
    pub run_id: Uuid,
    /// The fencing epoch this process holds the run under.
    pub epoch: u64,
    /// Whether the shutdown deadline releases the run for another replica (`SHUTDOWN_MODE=handoff`) rather than
    /// interrupting it.
    pub handoff: bool,
    /// `CLIENT_COMPAT=seed`: an interrupted run also sends `run_failed` before `done`.
    pub seed_clients: bool,
    /// The agent's instructions for this run (the system prompt), rendered.
    pub system: Option<String>,
    /// The final answer's schema (`OUTPUT_SCHEMA`): its `answer` streams, the whole object is the result.
    pub output_schema: Option<OutputSchema>,
    /// When the run started, wherever that was (a continued run started before this process took it over).
    pub started: Instant,
    pub model: Arc<dyn Model>,
    /// Stopped at the drain deadline.
    pub interrupt: CancellationToken,
    pub metrics: Arc<Metrics>,
    pub store: SessionStore,
    pub live: LiveRuns,
    pub tools: ToolRegistry,
    /// Who the run acts for, as tools see it.
    pub tool_context: ToolContext,
    pub max_steps: usize,
    /// How long the run goes on with nobody following it (`DETACH_GRACE`).
    pub detach_grace: Duration,
    /// How recent another replica's note that it follows the run must be (`RUN_LEASE`).
    pub lease: Duration,
}

/// What the run asks: made into the run's [`Opening`], the conversation it sends the model, so the chat's history is
/// held once for as long as the run lasts, not once more beside that conversation.
#[derive(Debug)]
pub(super) struct Prompt {
    /// Earlier messages of the chat, oldest first.
    pub history: Vec<Message>,
    pub question: String,
}

/// A failure that ends a run: its code (from the error table) and what the user is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub code: ErrorCode,
    pub message: String,
}

impl From<ModelError> for Failure {
    fn from(error: ModelError) -> Self {
        Self {
            code: error.code(),
            message: error.to_string(),
        }
    }
}

impl Failure {
    /// The store could not keep what the run produced.
    pub fn store(what: &str) -> Self {
        Self {
            code: ErrorCode::StoreFailed,
            message: format!("the session store failed; {what} could not be saved"),
        }
    }
}

/// Why the loop stopped before the model finished.
#[derive(Debug)]
pub(super) enum Stop {
    Failed(Failure),
    /// The store failed while the answer streamed.
    StoreFailed,
    /// The shutdown deadline.
    Interrupted,
    /// The stop button.
    Cancelled,
    /// The shutdown deadline in handoff mode: another replica continues the run.
    Released,
    /// Another process holds the run now.
    Fenced,
    /// The run's chat was deleted.
    Deleted,
    /// Nobody followed the run for `DETACH_GRACE`.
    Detached,
}

/// Where a run picks up when it is continued after its producer was gone; empty for a new run.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Resumed {
    /// Messages after the prompt: the model's answers and the tool results of the steps so far.
    pub steps: Vec<Message>,
    /// The answer's text so far, across steps.
    pub output: String,
    /// The answer so far of the step that was cut: continued, never repeated.
    pub partial: String,
    /// Tool calls of the last step that started and have no result (their step is the last of `steps`).
    pub unfinished: Vec<ToolCall>,
}

/// The conversation a run opens with: the prompt, and for a continued run what it picks up, made into the messages the
/// model is sent and what the loop goes on from. Made before the run's task polls (see [`super::drive::drive`]) and
/// handed down boxed, to be taken apart as the loop begins: each future it passes through keeps its arguments in its
/// state for as long as the run lasts, and a run's task is what a parked stream mostly costs.
#[derive(Debug)]
pub(super) struct Opening {
    messages: Vec<Message>,
    /// The model's answers among the messages picked up: the steps already done.
    steps_done: usize,
    /// The answer so far of the step that was cut.
    partial: String,
    /// Tool calls of the last step that started and have no result.
    unfinished: Vec<ToolCall>,
}

impl Opening {
    /// The conversation of `prompt`, picking up where `resumed` left off; what the run had already produced goes to
    /// `recorder`.
    pub fn new(prompt: Prompt, resumed: Resumed, recorder: &mut Recorder) -> Box<Self> {
        let mut messages = prompt.history;
        messages.push(Message::User {
            content: prompt.question,
        });
        let steps_done = resumed
            .steps
            .iter()
            .filter(|m| matches!(m, Message::Assistant { .. }))
            .count();
        messages.extend(resumed.steps.iter().cloned());
        recorder.messages = resumed.steps;
        recorder.output = resumed.output;
        Box::new(Self {
            messages,
            steps_done,
            partial: resumed.partial,
            unfinished: resumed.unfinished,
        })
    }
}

/// What a tool call cut by the loss of its producer gives the model when the tool may not be run twice.
const CUT_TOOL_CALL: &str = "the tool call was interrupted before its result arrived; it may or may not have taken \
effect, and it was not run again";

/// Asks the model the conversation `opening` holds, runs the tools it calls, gives their results back, until it answers
/// without tools; a continued run first finishes the tool calls it left open.
pub(super) async fn agent_loop(
    ctx: &RunContext,
    opening: Box<Opening>,
    out: &mut RunWriter,
    recorder: &mut Recorder,
) -> Result<(), Stop> {
    let Opening {
        mut messages,
        steps_done,
        mut partial,
        unfinished,
    } = *opening;
    let definitions = ctx.tools.definitions();
    if !unfinished.is_empty() {
        let results = Box::pin(run_tools(ctx, out, unfinished, Rerun::IfIdempotent)).await;
        messages.extend(results.iter().cloned());
        recorder.messages.extend(results);
    }
    let schema = ctx.output_schema.as_ref();
    // With an output schema, the answer text sent so far (a continued or repaired step only adds to it).
    let mut shown = String::new();
    let mut repaired = false;
    if schema.is_some() {
        shown = std::mem::take(&mut partial);
    }
    for _ in steps_done..ctx.max_steps {
        // A step cut mid-answer is continued: the model gets its answer so far as its own turn. (With an output
        // schema the step is asked again, and only what extends the text already sent is sent.)
        let mut text = std::mem::take(&mut partial);
        // The request is the stream's from here on (made in a block of its own, so the step's state keeps no room
        // for it while the answer streams).
        let mut stream = {
            let mut request = ModelRequest {
                system: ctx.system.clone(),
                messages: messages.clone(),
                tools: definitions.clone(),
                output_schema: schema.map(|s| Arc::clone(&s.schema)),
            };
            if !text.is_empty() {
                request.messages.push(Message::Assistant {
                    content: text.clone(),
                    tool_calls: Vec::new(),
                });
            }
            ctx.model.stream(request)
        };
        let continued = !text.is_empty();
        let quiet = schema.is_some() && (repaired || !shown.is_empty());
        let mut calls = Vec::new();
        loop {
            let event = stream.next().await;
            let Some(event) = event else { break };
            match event.map_err(|e| Stop::Failed(e.into()))? {
                ModelEvent::TextDelta(content) if content.is_empty() => {}
                ModelEvent::TextDelta(content) if schema.is_some() => {
                    // The model writes a JSON object; its `answer` streams as it grows.
                    text.push_str(&content);
                    if !quiet && let Some(answer) = answer_so_far(&text) {
                        show(out, recorder, &mut shown, &answer).await;
                    }
                }
                ModelEvent::TextDelta(mut content) => {
                    if continued && text.ends_with(char::is_whitespace) {
                        // A continuation may open with the space the cut answer already ends with.
                        content = content.trim_start().to_owned();
                        if content.is_empty() {
                            continue;
                        }
                    }
                    let start = text.len();
                    text.push_str(&content);
                    out.emit(RunEvent::ModelDelta { content }).await;
                    // Counted once in the log, so a stored partial answer is what followers were sent.
                    recorder.output.push_str(&text[start..]);
                }
                ModelEvent::ToolCall(call) => calls.push(call),
                ModelEvent::Usage(usage) => recorder.usage += usage,
                ModelEvent::Truncated => recorder.truncated = true,
            }
        }
        messages.push(Message::Assistant {
            content: text.clone(),
            tool_calls: calls.clone(),
        });
        if calls.is_empty()
            && let Some(schema) = schema
        {
            match schema.check(&text) {
                Ok(object) => {
                    let answer = object["answer"].as_str().unwrap_or_default().to_owned();
                    show(out, recorder, &mut shown, &answer).await;
                    recorder.messages.push(Message::Assistant {
                        content: text,
                        tool_calls: Vec::new(),
                    });
                    recorder.structured = Some(object);
                    return Ok(());
                }
                Err(why) if !repaired => {
                    // One repair round: the model is told what is wrong and answers again.
                    tracing::info!(run_id = %ctx.run_id, %why, "the answer does not match the output schema; asking again");
                    repaired = true;
                    messages.push(Message::User {
                        content: format!(
                            "Your answer does not match the required JSON Schema: {why}. Answer again with only a \
                             JSON object that matches it."
                        ),
                    });
                    continue;
                }
                Err(why) => {
                    return Err(Stop::Failed(Failure {
                        code: ErrorCode::InvalidOutput,
                        message: format!(
                            "the agent's answer did not match the required form: {why}"
                        ),
                    }));
                }
            }
        }
        // The step's answer, stored with the run.
        recorder.messages.push(Message::Assistant {
            content: text,
            tool_calls: calls.clone(),
        });
        if calls.is_empty() {
            return Ok(());
        }
        for call in &calls {
            out.emit(RunEvent::ToolStarted {
                tool_name: call.name.clone(),
                tool_label: tool_label(&call.name),
                tool_call_id: call.id.clone(),
                args: call.args.clone(),
            })
            .await;
        }
        let results = Box::pin(run_tools(ctx, out, calls, Rerun::Always)).await;
        messages.extend(results.iter().cloned());
        recorder.messages.extend(results);
    }
    Err(Stop::Failed(Failure {
        code: ErrorCode::MaxStepsReached,
        message: format!(
            "the agent stopped after {} steps without a final answer",
            ctx.max_steps
        ),
    }))
}

/// Sends what `answer` (the answer so far of a structured step) adds to the text already `shown`; nothing when it
/// does not extend it (a repaired answer that says something else is in `final_answer` only).
async fn show(out: &mut RunWriter, recorder: &mut Recorder, shown: &mut String, answer: &str) {
    if answer.len() > shown.len() && answer.starts_with(shown.as_str()) {
        let content = answer[shown.len()..].to_owned();
        shown.push_str(&content);
        recorder.output.push_str(&content);
        out.emit(RunEvent::ModelDelta { content }).await;
    }
}

/// Whether a tool call is run: always for a new call; for one cut by the loss of the run's producer, only when the
/// tool may be run twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rerun {
    Always,
    IfIdempotent,
}

/// Runs `calls` in parallel and emits each one's `tool_finished` (with its result, for the log) as it ends; returns
/// the results as messages, in the order they finished.
///
/// Its callers box it: its state is the largest of the loop's, and inline it would be part of every run's task for
/// as long as the run lasts, tools or not.
async fn run_tools(
    ctx: &RunContext,
    out: &mut RunWriter,
    calls: Vec<ToolCall>,
    rerun: Rerun,
) -> Vec<Message> {
    let mut results = Vec::with_capacity(calls.len());
    let mut running: FuturesUnordered<_> = calls
        .into_iter()
        .map(|call| async move {
            if rerun == Rerun::IfIdempotent && !ctx.tools.idempotent(&call.name) {
                tracing::info!(run_id = %ctx.run_id, tool = %call.name,
                    "a cut tool call is not idempotent; the model is told instead of running it again");
                let cut = serde_json::json!({ "error": CUT_TOOL_CALL });
                return (call, Ok(cut), Duration::ZERO);
            }
            call_tool(ctx, call).await
        })
        .collect();
    while let Some((call, result, elapsed)) = running.next().await {
        let content = match result {
            Ok(value) => value.to_string(),
            Err(error) => serde_json::json!({ "error": error.to_string() }).to_string(),
        };
        out.emit(RunEvent::ToolFinished {
            tool_name: call.name.clone(),
            tool_label: tool_label(&call.name),
            tool_call_id: call.id.clone(),
            elapsed_ms: millis(elapsed),
            result: Some(content.clone()),
        })
        .await;
        results.push(Message::ToolResult {
            tool_call_id: call.id,
            content,
        });
    }
    results
}

/// Runs one tool call; a tool that fails gives the model an error result, never fails the run.
async fn call_tool(ctx: &RunContext, call: ToolCall) -> (ToolCall, ToolResult, Duration) {
    let started = Instant::now();
    let result = ctx
        .tools
        .call(&call.name, call.args.clone(), &ctx.tool_context)
        .await;
    if let Err(error) = &result {
        ctx.metrics.tool_failed(error.kind());
        log_tool_failure(ctx.run_id, &call.name, error);
    }
    (call, result, started.elapsed())
}

fn log_tool_failure(run_id: Uuid, tool: &str, error: &crate::tools::ToolError) {
    tracing::info!(%run_id, tool, kind = error.kind(), %error, "tool call failed; the model is told");
}

pub(crate) fn millis(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
}
