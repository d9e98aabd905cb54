//! The run service: where a run starts, lives and ends, apart from any HTTP response.
//!
//! [`RunService`] holds what every run needs once (the store, the providers, the tools, metrics, limits) and offers
//! [`RunService::start`]: check the request, authorize the caller on the chat, admit the stream, store the run and
//! its prompt, and spawn the run. The route only extracts the request and turns the [`RunHandle`] into SSE.
//!
//! A run is driven by its own task and sends numbered events ([`events`]) into a channel that the response body
//! reads. The task races every step against two signals: the client going away (the body was dropped) and the
//! shutdown deadline (the run service's shutdown component is stopped). Whatever ends the run, the task ends with it: a client that
//! leaves stops the model at its next await, and the shutdown deadline ends the stream with `run_interrupted` +
//! `done`. What is stored when is the recorder's business; the model ↔ tools loop is the engine's; the
//! leases that let another replica tell a dead run from a live one are [`lease`]'s.

mod engine;
pub mod events;
pub mod lease;
mod recorder;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};
use uuid::Uuid;

use crate::auth::{AuthError, Identity};
use crate::metrics::{Metrics, RunOutcome};
use crate::model::{Message, Model, ModelPolicy, ModelSpec, Providers};
use crate::stages::Component;
use crate::store::{ChatOwner, NewRun, RunStatus, SessionStore, StoreError};
use crate::stream_tracker::{Rejection, StreamGuard, StreamTracker};
use crate::tools::{ToolContext, ToolRegistry};
pub use engine::Failure;
use engine::{Emitter, Stop};
use events::{Numbered, RunEvent, resume_path};
pub use lease::LiveRuns;
use recorder::Recorder;
pub use recorder::SAVE_EVERY;

/// Events a run may have ready before it waits for the client to read; enough to batch writes, small per stream.
const EVENT_BUFFER: usize = 32;

/// What a run needs from the process, given once at start.
#[derive(Debug)]
pub struct RunServiceParts {
    pub store: SessionStore,
    pub providers: Providers,
    pub tools: ToolRegistry,
    pub models: ModelPolicy,
    pub metrics: Arc<Metrics>,
    pub tracker: StreamTracker,
    /// Model steps (each answer or round of tool calls) allowed before a run is failed (`AGENT_MAX_STEPS`).
    pub max_steps: usize,
    /// This process, as the owner of the runs it drives (see the store's leases).
    pub instance_id: Arc<str>,
}

/// Starts runs and keeps track of the ones this process drives; cheap to clone.
#[derive(Debug, Clone)]
pub struct RunService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    parts: RunServiceParts,
    live: LiveRuns,
    /// Stopped at the drain deadline: every run still going ends with `run_interrupted`. Its tracker holds every
    /// run task, so shutdown waits for each to record its end.
    component: Component,
}

/// What a client asks for: a question, and the model if not the default.
#[derive(Debug, Clone)]
pub struct RunRequest {
    pub question: String,
    pub model: Option<ModelSpec>,
}

/// Why a run did not start; each is an HTTP error before any event.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("model {0:?} is not one this service offers")]
    ModelNotAllowed(String),
    #[error("unknown tool {0:?}")]
    UnknownTool(String),
    #[error(transparent)]
    Unauthorized(AuthError),
    /// The chat does not exist or is not the caller's; the two are not told apart.
    #[error("chat not found")]
    ChatNotFound,
    #[error("not admitted: {0:?}")]
    Rejected(Rejection),
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for StartError {
    fn from(error: StoreError) -> Self {
        match error {
            // Deleted between the lookup and the write.
            StoreError::ChatNotFound(_) => Self::ChatNotFound,
            other => Self::Store(other),
        }
    }
}

/// A started run as its first follower sees it: the events, and what must end when the follower leaves.
#[derive(Debug)]
pub struct RunHandle {
    pub run_id: Uuid,
    pub events: mpsc::Receiver<Numbered>,
    /// Keeps the stream counted for the drain until the follower is dropped.
    pub guard: StreamGuard,
    /// Tells the run its client is gone when dropped.
    pub client: DropGuard,
}

/// Who a request acts for in dev mode: chats are created for this owner on demand.
pub fn dev_owner() -> ChatOwner {
    ChatOwner {
        org_id: "dev-org".to_owned(),
        user_id: "dev-user".to_owned(),
        canvas_id: "dev-canvas".to_owned(),
    }
}

/// Everything a run needs, decided before its stream starts.
#[derive(Debug)]
struct RunContext {
    chat_id: Uuid,
    canvas_id: Option<String>,
    run_id: Uuid,
    /// The model id as the client will see it in `run_started`.
    model_id: String,
    model: Arc<dyn Model>,
    /// Earlier messages of the chat, oldest first.
    history: Vec<Message>,
    question: String,
    /// Cancelled when the response body is dropped: nobody is reading any more.
    client_gone: CancellationToken,
    interrupt: CancellationToken,
    metrics: Arc<Metrics>,
    store: SessionStore,
    live: LiveRuns,
    tools: ToolRegistry,
    /// Who the run acts for, as tools see it.
    tool_context: ToolContext,
    max_steps: usize,
}

impl RunService {
    /// The service; its runs are the tasks of `component`, and stop when it is told to.
    pub fn new(parts: RunServiceParts, component: Component) -> Self {
        Self {
            inner: Arc::new(Inner {
                parts,
                live: LiveRuns::default(),
                component,
            }),
        }
    }

    /// The runs this process drives now.
    pub fn live(&self) -> &LiveRuns {
        &self.inner.live
    }

    pub fn tools(&self) -> &ToolRegistry {
        &self.inner.parts.tools
    }

    /// Starts a run of `request` in `chat_id` for `caller`. Everything that can be refused is refused here, before
    /// any event: a service that is not admitting says so before the store is asked anything.
    pub async fn start(
        &self,
        caller: Identity,
        chat_id: Uuid,
        request: RunRequest,
    ) -> Result<RunHandle, StartError> {
        let parts = &self.inner.parts;
        parts.tracker.admitting().map_err(|r| self.rejected(r))?;
        let model = request
            .model
            .unwrap_or_else(|| parts.models.default.clone());
        if !parts.models.allows(&model) {
            return Err(StartError::ModelNotAllowed(model.to_string()));
        }
        if let ModelSpec::Test(options) = &model
            && let Some(tool) = &options.tool
            && parts.tools.get(tool).is_none()
        {
            return Err(StartError::UnknownTool(tool.clone()));
        }
        if matches!(caller, Identity::Dev) && !model.is_test() {
            return Err(StartError::Unauthorized(AuthError::TokenRequired(
                model.to_string(),
            )));
        }
        let found = parts.store.get_chat(chat_id).await?;
        let chat = match (&caller, found) {
            (Identity::Token(caller), Some(chat)) if caller.owns(&chat) => Some(chat),
            (Identity::Dev, Some(chat)) if chat.owner == dev_owner() => Some(chat),
            (Identity::Dev, None) => None,
            _ => return Err(StartError::ChatNotFound),
        };
        // Counted before anything is written, so a refused stream leaves nothing behind.
        let guard = parts.tracker.try_admit().map_err(|r| self.rejected(r))?;
        let chat = match chat {
            Some(chat) => chat,
            None => parts.store.ensure_chat(chat_id, &dev_owner()).await?,
        };
        // The first prompt and `initial_message` are stored together: a chat without one has no history to load.
        let history = if chat.initial_message.is_none() {
            Vec::new()
        } else {
            let messages = parts.store.messages(chat.id).await?;
            messages.into_iter().map(|m| m.message).collect()
        };
        let run_id = Uuid::new_v4();
        let model_id = model.to_string();
        parts
            .store
            .start_run(&NewRun {
                id: run_id,
                chat_id,
                model: model_id.clone(),
                owner_instance: parts.instance_id.to_string(),
                prompt: request.question.clone(),
            })
            .await?;
        parts.metrics.stream_admitted();

        let tool_context = match &caller {
            Identity::Token(caller) => ToolContext {
                bearer: Some(caller.token.clone()),
                org_id: caller.org_id.clone(),
            },
            Identity::Dev => ToolContext {
                bearer: None,
                org_id: dev_owner().org_id,
            },
        };
        let client_gone = CancellationToken::new();
        let (tx, events) = mpsc::channel(EVENT_BUFFER);
        let ctx = RunContext {
            chat_id,
            canvas_id: Some(chat.owner.canvas_id),
            run_id,
            model_id,
            model: model.build(&parts.providers),
            history,
            question: request.question,
            client_gone: client_gone.clone(),
            interrupt: self.inner.component.stop.clone(),
            metrics: Arc::clone(&parts.metrics),
            store: parts.store.clone(),
            live: self.inner.live.clone(),
            tools: parts.tools.clone(),
            tool_context,
            max_steps: parts.max_steps,
        };
        tracing::info!(%run_id, %chat_id, model = %ctx.model_id, "run admitted");
        self.inner.component.tasks.spawn(drive(ctx, tx));
        Ok(RunHandle {
            run_id,
            events,
            guard,
            client: client_gone.drop_guard(),
        })
    }

    fn rejected(&self, rejection: Rejection) -> StartError {
        self.inner.parts.metrics.stream_rejected(rejection);
        StartError::Rejected(rejection)
    }
}

/// Drives one run to its end, sending its events into `tx`.
async fn drive(ctx: RunContext, tx: mpsc::Sender<Numbered>) -> RunOutcome {
    let started = Instant::now();
    let _live = ctx.live.enter(ctx.run_id);
    let mut out = Emitter::new(tx);
    let (outcome, failure) = run(&ctx, &mut out, started).await;
    ctx.metrics.run_finished(outcome, failure.map(|f| f.code));
    tracing::info!(run_id = %ctx.run_id, chat_id = %ctx.chat_id, outcome = outcome.as_str(),
        elapsed_ms = started.elapsed().as_millis() as u64, "run ended");
    outcome
}

async fn run(
    ctx: &RunContext,
    out: &mut Emitter,
    started: Instant,
) -> (RunOutcome, Option<Failure>) {
    let run_started = RunEvent::RunStarted {
        chat_id: ctx.chat_id,
        run_id: ctx.run_id,
        model: ctx.model_id.clone(),
        canvas_id: ctx.canvas_id.clone(),
    };
    let mut recorder = Recorder::new(ctx.store.clone(), ctx.run_id);
    let result = match out.emit(run_started).await {
        Err(stop) => Err(stop),
        Ok(()) => tokio::select! {
            biased;
            _ = ctx.client_gone.cancelled() => Err(Stop::Disconnected),
            _ = ctx.interrupt.cancelled() => Err(Stop::Interrupted),
            result = engine::agent_loop(ctx, out, &mut recorder) => result,
        },
    };
    let (mut outcome, status, mut failure) = match result {
        Ok(()) => (RunOutcome::Completed, RunStatus::Completed, None),
        Err(Stop::Failed(failure)) => {
            tracing::warn!(run_id = %ctx.run_id, code = failure.code.as_str(), error = %failure.message, "run failed");
            (RunOutcome::Failed, RunStatus::Failed, Some(failure))
        }
        Err(Stop::StoreFailed) => (
            RunOutcome::Failed,
            RunStatus::Failed,
            Some(Failure::store("the run")),
        ),
        Err(Stop::Interrupted) => (RunOutcome::Interrupted, RunStatus::Interrupted, None),
        Err(Stop::Disconnected) => (RunOutcome::Disconnected, RunStatus::Interrupted, None),
    };
    let error = match (&failure, outcome) {
        (Some(failure), _) => Some(failure.message.clone()),
        (None, RunOutcome::Interrupted) => {
            Some("the service shut down before the run ended".to_owned())
        }
        (None, RunOutcome::Disconnected) => {
            Some("the client disconnected before the run ended".to_owned())
        }
        (None, _) => None,
    };
    let end = match recorder.finish(status, error).await {
        Ok(end) => Some(end),
        Err(store_error) => {
            tracing::error!(run_id = %ctx.run_id, error = %store_error, "could not store how the run ended");
            if outcome == RunOutcome::Completed {
                outcome = RunOutcome::Failed;
                failure = Some(Failure::store("the answer"));
            }
            None
        }
    };
    let last = match (outcome, end, &failure) {
        (RunOutcome::Completed, Some(end), _) => vec![
            RunEvent::FinalAnswer {
                output: end.output,
                usage: end.usage,
            },
            RunEvent::RunCompleted {
                elapsed_ms: millis(started.elapsed()),
            },
        ],
        (RunOutcome::Failed, _, Some(failure)) => vec![RunEvent::RunFailed {
            error: failure.message.clone(),
            code: failure.code.as_str(),
        }],
        (RunOutcome::Interrupted, _, _) => vec![RunEvent::RunInterrupted {
            reason: "shutdown",
            resume: resume_path(ctx.chat_id, ctx.run_id),
        }],
        // Disconnected: nobody is left to tell.
        _ => return (outcome, failure),
    };
    for event in last.into_iter().chain([RunEvent::Done]) {
        // The client may still leave while the last events wait for room in the channel.
        let sent = tokio::select! {
            biased;
            _ = ctx.client_gone.cancelled() => Err(Stop::Disconnected),
            sent = out.emit(event) => sent,
        };
        if sent.is_err() {
            return (RunOutcome::Disconnected, failure);
        }
    }
    (outcome, failure)
}

pub(crate) fn millis(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
}
