//! The run loop: model ↔ tools, events out.
//!
//! A run is driven by its own task ([`drive`]) and sends numbered [`RunEvent`]s into a channel that the response body
//! reads. The task races every step against two signals: the client going away (the body was dropped) and the shutdown
//! deadline. Whatever ends the run, the task ends with it: a client that leaves stops the model at its next await, and
//! the shutdown deadline ends the stream with `run_interrupted` + `done`.
//!
//! Everything a run produces goes to the store. The run row and the prompt are stored before the stream starts (by
//! the route). While the answer streams, the answer so far is saved at most every [`SAVE_EVERY`] while it changes, so
//! a crash loses at most the text of the last 250 ms. How the run ended is stored before the client is told: the
//! answer's messages and usage for a completed run, the error for a failed one, and the partial answer for a run
//! interrupted by the shutdown deadline or by its client leaving.

pub mod tools;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::metrics::{Metrics, RunOutcome};
use crate::model::{Message, Model, ModelEvent, ModelRequest, ToolCall, Usage};
use crate::store::{RunEnd, RunStatus, SessionStore};
use tools::{ToolContext, ToolRegistry};

/// How often the answer so far is saved while it grows: the most text a crash can lose.
pub const SAVE_EVERY: Duration = Duration::from_millis(250);

/// One event of the SSE protocol; serialized as the `data:` JSON of the event.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RunEvent {
    RunStarted {
        chat_id: Uuid,
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

/// An event with its place in the run: the SSE id is `<run_id>:<seq>`, and `seq` starts at 1. Boxed, because the
/// channel to the response body allocates its slots 32 at a time per stream: 16 bytes a slot instead of ~100.
pub type Numbered = (u64, Box<RunEvent>);

/// Everything a run needs, decided before its stream starts.
#[derive(Debug)]
pub struct RunContext {
    pub chat_id: Uuid,
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
    pub store: Arc<dyn SessionStore>,
    /// The runs this process drives; the run is in it until `drive` returns.
    pub live: LiveRuns,
    pub tools: Arc<ToolRegistry>,
    /// Who the run acts for, as tools see it.
    pub tool_context: ToolContext,
    /// Model steps (each answer or round of tool calls) allowed before the run is failed (`AGENT_MAX_STEPS`).
    pub max_steps: usize,
}

/// The runs this process is driving now; their leases are the ones it keeps fresh.
#[derive(Debug, Clone, Default)]
pub struct LiveRuns(Arc<Mutex<HashSet<Uuid>>>);

impl LiveRuns {
    pub fn ids(&self) -> Vec<Uuid> {
        self.0
            .lock()
            .expect("live runs lock")
            .iter()
            .copied()
            .collect()
    }

    fn enter(&self, run_id: Uuid) -> LiveRun {
        self.0.lock().expect("live runs lock").insert(run_id);
        LiveRun {
            runs: self.clone(),
            run_id,
        }
    }
}

/// Removes its run from [`LiveRuns`] when dropped.
struct LiveRun {
    runs: LiveRuns,
    run_id: Uuid,
}

impl Drop for LiveRun {
    fn drop(&mut self) {
        self.runs
            .0
            .lock()
            .expect("live runs lock")
            .remove(&self.run_id);
    }
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
            .send((self.seq, Box::new(event)))
            .await
            .map_err(|_| Stop::Disconnected)
    }
}

/// What the run has produced so far; kept outside the cancellable loop so an interrupted run still has it.
#[derive(Debug)]
struct Progress {
    /// The answer text so far, across steps.
    output: String,
    usage: Usage,
    /// Messages added after the prompt: the model's answers and the tool results.
    messages: Vec<Message>,
    /// How much of `output` the store has.
    saved_len: usize,
    save_tick: tokio::time::Interval,
}

impl Progress {
    fn new() -> Self {
        let mut save_tick =
            tokio::time::interval_at(tokio::time::Instant::now() + SAVE_EVERY, SAVE_EVERY);
        save_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            output: String::new(),
            usage: Usage::default(),
            messages: Vec::new(),
            saved_len: 0,
            save_tick,
        }
    }

    fn unsaved(&self) -> bool {
        self.output.len() != self.saved_len
    }

    /// Saves the answer so far if it grew since the last save.
    async fn save(&mut self, ctx: &RunContext) -> Result<(), Stop> {
        if !self.unsaved() {
            return Ok(());
        }
        ctx.store
            .save_partial(ctx.run_id, &self.output)
            .await
            .map_err(|error| {
                tracing::error!(run_id = %ctx.run_id, %error, "could not save the answer so far");
                Stop::Failed("the session store failed; the run could not be saved".to_owned())
            })?;
        self.saved_len = self.output.len();
        Ok(())
    }
}

/// Drives one run to its end, sending its events into `tx`.
pub async fn drive(ctx: RunContext, tx: mpsc::Sender<Numbered>) -> RunOutcome {
    let started = Instant::now();
    let _live = ctx.live.enter(ctx.run_id);
    let mut out = Emitter { tx, seq: 0 };
    let outcome = run(&ctx, &mut out, started).await;
    ctx.metrics.run_finished(outcome);
    tracing::info!(run_id = %ctx.run_id, chat_id = %ctx.chat_id, outcome = outcome.as_str(),
        elapsed_ms = started.elapsed().as_millis() as u64, "run ended");
    outcome
}

async fn run(ctx: &RunContext, out: &mut Emitter, started: Instant) -> RunOutcome {
    let run_started = RunEvent::RunStarted {
        chat_id: ctx.chat_id,
        run_id: ctx.run_id,
        model: ctx.model_id.clone(),
        canvas_id: ctx.canvas_id.clone(),
    };
    let mut progress = Progress::new();
    let result = match out.emit(run_started).await {
        Err(stop) => Err(stop),
        Ok(()) => tokio::select! {
            biased;
            _ = ctx.client_gone.cancelled() => Err(Stop::Disconnected),
            _ = ctx.interrupt.cancelled() => Err(Stop::Interrupted),
            result = agent_loop(ctx, out, &mut progress) => result,
        },
    };
    let (mut outcome, status, error) = match result {
        Ok(()) => (RunOutcome::Completed, RunStatus::Completed, None),
        Err(Stop::Failed(error)) => {
            tracing::warn!(run_id = %ctx.run_id, %error, "run failed");
            (RunOutcome::Failed, RunStatus::Failed, Some(error))
        }
        Err(Stop::Interrupted) => (
            RunOutcome::Interrupted,
            RunStatus::Interrupted,
            Some("the service shut down before the run ended".to_owned()),
        ),
        Err(Stop::Disconnected) => (
            RunOutcome::Disconnected,
            RunStatus::Interrupted,
            Some("the client disconnected before the run ended".to_owned()),
        ),
    };
    let end = RunEnd {
        status,
        error: error.clone(),
        output: progress.output,
        usage: progress.usage,
        messages: if status == RunStatus::Completed {
            progress.messages
        } else {
            Vec::new()
        },
    };
    if let Err(store_error) = ctx.store.finish_run(ctx.run_id, &end).await {
        tracing::error!(run_id = %ctx.run_id, error = %store_error, "could not store how the run ended");
        if outcome == RunOutcome::Completed {
            outcome = RunOutcome::Failed;
        }
    }
    let last = match outcome {
        RunOutcome::Completed => vec![
            RunEvent::FinalAnswer {
                output: end.output,
                usage: end.usage,
            },
            RunEvent::RunCompleted {
                elapsed_ms: millis(started.elapsed()),
            },
        ],
        RunOutcome::Failed => vec![RunEvent::RunFailed {
            error: error.unwrap_or_else(|| {
                "the session store failed; the answer could not be saved".to_owned()
            }),
        }],
        RunOutcome::Interrupted => vec![RunEvent::RunInterrupted {
            reason: "shutdown",
            resume: format!("/agents/chats/{}/runs/{}/stream", ctx.chat_id, ctx.run_id),
        }],
        RunOutcome::Disconnected => return outcome,
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
    let definitions = ctx.tools.definitions();
    let mut messages = ctx.history.clone();
    messages.push(Message::User {
        content: ctx.question.clone(),
    });
    for _ in 0..ctx.max_steps {
        let request = ModelRequest {
            messages: messages.clone(),
            tools: definitions.clone(),
        };
        let mut stream = ctx.model.stream(request);
        let mut text = String::new();
        let mut calls = Vec::new();
        loop {
            let event = tokio::select! {
                event = stream.next() => event,
                // Polled only while there is something to save, so an idle stream's task sleeps until the model speaks.
                _ = progress.save_tick.tick(), if progress.unsaved() => {
                    progress.save(ctx).await?;
                    continue;
                }
            };
            let Some(event) = event else { break };
            match event.map_err(|e| Stop::Failed(e.to_string()))? {
                ModelEvent::TextDelta(content) if content.is_empty() => {}
                ModelEvent::TextDelta(content) => {
                    let start = text.len();
                    text.push_str(&content);
                    out.emit(RunEvent::ModelDelta { content }).await?;
                    // Counted once handed to the client, so a stored partial answer is what the client was sent.
                    progress.output.push_str(&text[start..]);
                }
                ModelEvent::ToolCall(call) => calls.push(call),
                ModelEvent::Usage(usage) => progress.usage += usage,
            }
        }
        let answer = Message::Assistant {
            content: text,
            tool_calls: calls.clone(),
        };
        messages.push(answer.clone());
        progress.messages.push(answer);
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
        let mut running: FuturesUnordered<_> =
            calls.into_iter().map(|call| call_tool(ctx, call)).collect();
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
            let result = Message::ToolResult {
                tool_call_id: call.id,
                content,
            };
            messages.push(result.clone());
            progress.messages.push(result);
        }
    }
    Err(Stop::Failed(format!(
        "the agent stopped after {} steps without a final answer",
        ctx.max_steps
    )))
}

/// Runs one tool call; a tool that fails gives the model an error result, never fails the run.
async fn call_tool(ctx: &RunContext, call: ToolCall) -> (ToolCall, tools::ToolResult, Duration) {
    let started = Instant::now();
    let result = ctx
        .tools
        .call(&call.name, call.args.clone(), &ctx.tool_context)
        .await;
    if let Err(error) = &result {
        tracing::info!(run_id = %ctx.run_id, tool = %call.name, %error, "tool call failed; the model is told");
    }
    (call, result, started.elapsed())
}

fn millis(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
}
