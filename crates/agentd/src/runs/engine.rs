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
use super::lease::LiveRuns;
use super::log::RunWriter;
use super::recorder::Recorder;
use crate::error::ErrorCode;
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
    /// When the run started, wherever that was (a continued run started before this process took it over).
    pub started: Instant,
    /// The model id as the client will see it in `run_started`.
    pub model_id: String,
    pub model: Arc<dyn Model>,
    /// Earlier messages of the chat, oldest first.
    pub history: Vec<Message>,
    pub question: String,
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

/// What a tool call cut by the loss of its producer gives the model when the tool may not be run twice.
const CUT_TOOL_CALL: &str = "the tool call was interrupted before its result arrived; it may or may not have taken \
effect, and it was not run again";

/// Asks the model, runs the tools it calls, gives their results back, until it answers without tools; a continued
/// run first finishes what `resumed` left open.
pub(super) async fn agent_loop(
    ctx: &RunContext,
    out: &mut RunWriter,
    recorder: &mut Recorder,
    resumed: Resumed,
) -> Result<(), Stop> {
    let definitions = ctx.tools.definitions();
    let mut messages = ctx.history.clone();
    messages.push(Message::User {
        content: ctx.question.clone(),
    });
    let steps_done = resumed
        .steps
        .iter()
        .filter(|m| matches!(m, Message::Assistant { .. }))
        .count();
    messages.extend(resumed.steps.iter().cloned());
    recorder.messages = resumed.steps;
    recorder.output = resumed.output;
    let mut partial = resumed.partial;
    if !resumed.unfinished.is_empty() {
        let results = run_tools(ctx, out, resumed.unfinished, Rerun::IfIdempotent).await;
        messages.extend(results.iter().cloned());
        recorder.messages.extend(results);
    }
    for _ in steps_done..ctx.max_steps {
        // A step cut mid-answer is continued: the model gets its answer so far as its own turn.
        let mut text = std::mem::take(&mut partial);
        let mut request = ModelRequest {
            messages: messages.clone(),
            tools: definitions.clone(),
        };
        if !text.is_empty() {
            request.messages.push(Message::Assistant {
                content: text.clone(),
                tool_calls: Vec::new(),
            });
        }
        let continued = !text.is_empty();
        let mut stream = ctx.model.stream(request);
        let mut calls = Vec::new();
        loop {
            let event = stream.next().await;
            let Some(event) = event else { break };
            match event.map_err(|e| Stop::Failed(e.into()))? {
                ModelEvent::TextDelta(content) if content.is_empty() => {}
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
                    out.emit(&RunEvent::ModelDelta { content }).await;
                    // Counted once in the log, so a stored partial answer is what followers were sent.
                    recorder.output.push_str(&text[start..]);
                }
                ModelEvent::ToolCall(call) => calls.push(call),
                ModelEvent::Usage(usage) => recorder.usage += usage,
            }
        }
        let answer = Message::Assistant {
            content: text,
            tool_calls: calls.clone(),
        };
        messages.push(answer.clone());
        recorder.messages.push(answer);
        if calls.is_empty() {
            return Ok(());
        }
        for call in &calls {
            out.emit(&RunEvent::ToolStarted {
                tool_name: call.name.clone(),
                tool_label: tool_label(&call.name),
                tool_call_id: call.id.clone(),
                args: call.args.clone(),
            })
            .await;
        }
        let results = run_tools(ctx, out, calls, Rerun::Always).await;
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

/// Whether a tool call is run: always for a new call; for one cut by the loss of the run's producer, only when the
/// tool may be run twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rerun {
    Always,
    IfIdempotent,
}

/// Runs `calls` in parallel and emits each one's `tool_finished` (with its result, for the log) as it ends; returns
/// the results as messages, in the order they finished.
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
        out.emit(&RunEvent::ToolFinished {
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
