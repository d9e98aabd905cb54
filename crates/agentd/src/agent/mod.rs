//! The run loop: model ↔ tools, events out.
//!
//! A run is driven by its own task ([`drive`]) and sends numbered [`RunEvent`]s into a channel that the response body
//! reads. The task races every step against two signals: the client going away (the body was dropped) and the shutdown
//! deadline. Whatever ends the run, the task ends with it: a client that leaves stops the model at its next await, and
//! the shutdown deadline ends the stream with `run_interrupted` + `done`.

pub mod tools;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::metrics::{Metrics, RunOutcome};
use crate::model::{Message, Model, ModelEvent, ModelRequest, ToolCall, Usage};

/// How many model steps (each answer or round of tool calls) a run may take before it is failed.
const MAX_STEPS: usize = 10;

/// One event of the SSE protocol; serialized as the `data:` JSON of the event.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RunEvent {
    RunStarted {
        chat_id: String,
        run_id: Uuid,
        model: String,
        canvas_id: Option<String>,
    },
    ModelDelta {
        content: String,
    },
    ToolStarted {
        tool_name: String,
        tool_call_id: String,
        args: serde_json::Value,
    },
    ToolFinished {
        tool_name: String,
        tool_call_id: String,
        elapsed_ms: u64,
    },
    FinalAnswer {
        output: String,
        usage: Usage,
    },
    RunCompleted {
        elapsed_ms: u64,
    },
    RunFailed {
        error: String,
    },
    RunInterrupted {
        reason: &'static str,
        /// Where a client can pick the run up again, with `Last-Event-ID` set to this event's id.
        resume: String,
    },
    Done,
}

/// An event with its place in the run: the SSE id is `<run_id>:<seq>`, and `seq` starts at 1.
pub type Numbered = (u64, RunEvent);

/// Everything a run needs, decided before its stream starts.
#[derive(Debug)]
pub struct RunContext {
    pub chat_id: String,
    pub canvas_id: Option<String>,
    pub run_id: Uuid,
    /// The model id as the client will see it in `run_started`.
    pub model_id: String,
    pub model: Arc<dyn Model>,
    /// Earlier messages of the chat, oldest first.
    pub history: Vec<Message>,
    pub question: String,
    /// Cancelled when the response body is dropped: nobody is reading any more.
    pub client_gone: CancellationToken,
    /// Cancelled at the drain deadline: end the stream now, visibly.
    pub interrupt: CancellationToken,
    pub metrics: Arc<Metrics>,
}

/// Why the loop stopped before the model finished.
#[derive(Debug)]
enum Stop {
    Failed(String),
    Interrupted,
    Disconnected,
}

/// Numbers events and hands them to the response body.
struct Emitter {
    tx: mpsc::Sender<Numbered>,
    seq: u64,
}

impl Emitter {
    async fn emit(&mut self, event: RunEvent) -> Result<(), Stop> {
        self.seq += 1;
        self.tx
            .send((self.seq, event))
            .await
            .map_err(|_| Stop::Disconnected)
    }
}

/// What the run has produced so far; kept outside the cancellable loop so an interrupted run still has it.
#[derive(Debug, Default)]
struct Progress {
    output: String,
    usage: Usage,
}

/// Drives one run to its end, sending its events into `tx`.
pub async fn drive(ctx: RunContext, tx: mpsc::Sender<Numbered>) -> RunOutcome {
    let started = Instant::now();
    let mut out = Emitter { tx, seq: 0 };
    let outcome = run(&ctx, &mut out, started).await;
    ctx.metrics.run_finished(outcome);
    tracing::info!(run_id = %ctx.run_id, chat_id = %ctx.chat_id, outcome = outcome.as_str(),
        elapsed_ms = started.elapsed().as_millis() as u64, "run ended");
    outcome
}

async fn run(ctx: &RunContext, out: &mut Emitter, started: Instant) -> RunOutcome {
    let run_started = RunEvent::RunStarted {
        chat_id: ctx.chat_id.clone(),
        run_id: ctx.run_id,
        model: ctx.model_id.clone(),
        canvas_id: ctx.canvas_id.clone(),
    };
    if out.emit(run_started).await.is_err() {
        return RunOutcome::Disconnected;
    }
    let mut progress = Progress::default();
    let result = tokio::select! {
        biased;
        _ = ctx.client_gone.cancelled() => Err(Stop::Disconnected),
        _ = ctx.interrupt.cancelled() => Err(Stop::Interrupted),
        result = agent_loop(ctx, out, &mut progress) => result,
    };
    let (outcome, last) = match result {
        Ok(()) => {
            let answer = RunEvent::FinalAnswer {
                output: std::mem::take(&mut progress.output),
                usage: progress.usage,
            };
            let completed = RunEvent::RunCompleted {
                elapsed_ms: millis(started.elapsed()),
            };
            (RunOutcome::Completed, vec![answer, completed])
        }
        Err(Stop::Failed(error)) => {
            tracing::warn!(run_id = %ctx.run_id, %error, "run failed");
            (RunOutcome::Failed, vec![RunEvent::RunFailed { error }])
        }
        Err(Stop::Interrupted) => {
            let resume = format!("/agents/chats/{}/runs/{}/stream", ctx.chat_id, ctx.run_id);
            let interrupted = RunEvent::RunInterrupted {
                reason: "shutdown",
                resume,
            };
            (RunOutcome::Interrupted, vec![interrupted])
        }
        Err(Stop::Disconnected) => return RunOutcome::Disconnected,
    };
    for event in last.into_iter().chain([RunEvent::Done]) {
        // The client may still leave while the last events wait for room in the channel.
        let sent = tokio::select! {
            biased;
            _ = ctx.client_gone.cancelled() => Err(Stop::Disconnected),
            sent = out.emit(event) => sent,
        };
        if sent.is_err() {
            return RunOutcome::Disconnected;
        }
    }
    outcome
}

/// Asks the model, runs the tools it calls, gives their results back, until it answers without tools.
async fn agent_loop(
    ctx: &RunContext,
    out: &mut Emitter,
    progress: &mut Progress,
) -> Result<(), Stop> {
    let tools = tools::builtins();
    let definitions: Vec<_> = tools.iter().map(|t| t.definition()).collect();
    let mut messages = ctx.history.clone();
    messages.push(Message::User {
        content: ctx.question.clone(),
    });
    for _ in 0..MAX_STEPS {
        let request = ModelRequest {
            messages: messages.clone(),
            tools: definitions.clone(),
        };
        let mut stream = ctx.model.stream(request);
        let mut text = String::new();
        let mut calls = Vec::new();
        while let Some(event) = stream.next().await {
            match event.map_err(|e| Stop::Failed(e.to_string()))? {
                ModelEvent::TextDelta(content) if content.is_empty() => {}
                ModelEvent::TextDelta(content) => {
                    text.push_str(&content);
                    progress.output.push_str(&content);
                    out.emit(RunEvent::ModelDelta { content }).await?;
                }
                ModelEvent::ToolCall(call) => calls.push(call),
                ModelEvent::Usage(usage) => progress.usage += usage,
            }
        }
        messages.push(Message::Assistant {
            content: text,
            tool_calls: calls.clone(),
        });
        if calls.is_empty() {
            return Ok(());
        }
        for call in &calls {
            out.emit(RunEvent::ToolStarted {
                tool_name: call.name.clone(),
                tool_call_id: call.id.clone(),
                args: call.args.clone(),
            })
            .await?;
        }
        let mut running: FuturesUnordered<_> = calls.into_iter().map(call_tool).collect();
        while let Some((call, result, elapsed)) = running.next().await {
            out.emit(RunEvent::ToolFinished {
                tool_name: call.name.clone(),
                tool_call_id: call.id.clone(),
                elapsed_ms: millis(elapsed),
            })
            .await?;
            let content = match result {
                Ok(value) => value.to_string(),
                Err(error) => serde_json::json!({ "error": error }).to_string(),
            };
            messages.push(Message::ToolResult {
                tool_call_id: call.id,
                content,
            });
        }
    }
    Err(Stop::Failed(format!(
        "the agent stopped after {MAX_STEPS} steps without a final answer"
    )))
}

/// Runs one tool call; a tool that fails gives the model an error result, never fails the run.
async fn call_tool(call: ToolCall) -> (ToolCall, tools::ToolResult, Duration) {
    let started = Instant::now();
    let result = match tools::builtin(&call.name) {
        Some(tool) => tool.call(call.args.clone()).await,
        None => Err(format!("there is no tool named {:?}", call.name)),
    };
    (call, result, started.elapsed())
}

fn millis(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
}
