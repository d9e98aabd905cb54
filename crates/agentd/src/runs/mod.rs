//! The run service: where a run starts, lives and ends, apart from any HTTP response.
//!
//! [`RunService`] holds what every run needs once (the store, the run log, the providers, the tools, metrics, limits)
//! and offers what the routes need: [`RunService::start`] (`start.rs`: check the request, authorize the caller on the
//! chat, admit the stream, store the run and its prompt, spawn the run, and follow it), [`RunService::attach`] (follow
//! a run from any seq, on any replica), [`RunService::cancel`] and [`RunService::history`].
//!
//! A run is driven by its own task (`drive.rs`), which appends its numbered events ([`events`]) to the run log
//! ([`log`]); clients are followers of the log ([`follow`]), never of the task. A client that leaves does not stop
//! the run: it goes on for `DETACH_GRACE` waiting for someone to attach. The shutdown deadline (in `drain` mode), the
//! stop button and nobody following end a run with `run_interrupted` + `done`; in `handoff` mode the deadline releases
//! it instead, and a replica that follows it takes it over (`takeover.rs`). What is stored when is the recorder's
//! business; the model ↔ tools loop is the engine's; the leases that let another replica tell a dead run from a live
//! one are [`lease`]'s.

mod drive;
mod engine;
pub mod events;
pub mod follow;
pub mod history;
pub mod lease;
mod live;
pub mod log;
mod recorder;
mod start;
mod takeover;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use uuid::Uuid;

use crate::auth::{AuthError, Identity};
use crate::instructions::{Instructions, OutputSchema};
use crate::metrics::{Metrics, ProviderLoad};
use crate::model::{Model, ModelPolicy, ModelSpec, Providers};
use crate::stages::Component;
use crate::store::{
    Chat, ChatOwner, Run, RunStatus, STALE_RUN_ERROR, SessionStore, StoreError, StoredMessage,
};
use crate::stream_tracker::{Held, Rejection, StreamGuard, StreamTracker};
use crate::tools::{ToolContext, ToolRegistry};
pub use engine::Failure;
use follow::Follower;
pub use live::LiveRuns;
use log::{Halt, RunLog};

/// How many runs a log line about many of them names (it gives their count too): a crashed peer, or a store outage,
/// can concern thousands.
const LOGGED_RUNS: usize = 20;

/// The first [`LOGGED_RUNS`] of `runs`, for a log line that also gives their count.
fn named(runs: impl IntoIterator<Item = Uuid>) -> Vec<Uuid> {
    runs.into_iter().take(LOGGED_RUNS).collect()
}

/// What a run needs from the process, given once at start.
#[derive(Debug)]
pub struct RunServiceParts {
    pub store: SessionStore,
    pub log: RunLog,
    pub providers: Providers,
    pub tools: ToolRegistry,
    pub models: ModelPolicy,
    pub metrics: Arc<Metrics>,
    pub tracker: StreamTracker,
    /// Model steps (each answer or round of tool calls) allowed before a run is failed (`AGENT_MAX_STEPS`).
    pub max_steps: usize,
    /// This process, as the owner of the runs it drives (see the store's leases).
    pub instance_id: Arc<str>,
    /// How long a run nobody follows goes on waiting for a follower (`DETACH_GRACE`).
    pub detach_grace: Duration,
    /// `RUN_LEASE`: how fresh another replica's note that it follows a run must be.
    pub lease: Duration,
    /// `SHUTDOWN_MODE=handoff`: at the drain deadline runs are released for another replica, not interrupted.
    pub handoff: bool,
    /// `CLIENT_COMPAT=seed`: an interrupted run also sends `run_failed` before `done`.
    pub seed_clients: bool,
    /// `AGENT_INSTRUCTIONS`: the system prompt's template.
    pub instructions: Option<Instructions>,
    /// `OUTPUT_SCHEMA`: what the final answer must be.
    pub output_schema: Option<OutputSchema>,
}

/// Starts runs and keeps track of the ones this process drives; cheap to clone.
#[derive(Debug, Clone)]
pub struct RunService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    parts: RunServiceParts,
    /// The provider models runs were started with, each made once and shared by its runs (see
    /// [`RunService::model`]); as many as the models a client may name (`AI_MODELS`).
    provider_models: Mutex<Vec<(ModelSpec, Arc<dyn Model>)>>,
    live: LiveRuns,
    /// Stopped at the drain deadline: every run still going ends with `run_interrupted`. Its tracker holds every
    /// run task, so shutdown waits for each to record its end.
    component: Component,
}

/// What a client asks for: a question, the model if not the default, and its context.
#[derive(Debug, Clone)]
pub struct RunRequest {
    pub question: String,
    pub model: Option<ModelSpec>,
    pub context: AgentContext,
}

/// What the client says about where it is asking from (`agent_context`, as the seed's web client sends it): whether
/// the agent may change the canvas (`build`) or only look at it (`inspect`), and which version of the canvas it shows.
/// Checked at the edge (`http/stream.rs`); tools read `canvas_version` as `{context.canvas_version}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AgentContext {
    pub enabled: bool,
    pub mode: ContextMode,
    /// Non-blank when given.
    pub canvas_version: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContextMode {
    #[default]
    Inspect,
    Build,
}

/// Why a request about a run was refused; each is an HTTP error before any event.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("model {0:?} is not one this service offers")]
    ModelNotAllowed(String),
    #[error("{0}")]
    ModelOverLimit(String),
    #[error("unknown tool {0:?}")]
    UnknownTool(String),
    #[error(transparent)]
    Unauthorized(AuthError),
    /// The chat does not exist or is not the caller's; the two are not told apart.
    #[error("chat not found")]
    ChatNotFound,
    /// The run does not exist or is not of this chat; the two are not told apart.
    #[error("run not found")]
    RunNotFound,
    /// The chat has a run going; one at a time.
    #[error("the chat has a run going")]
    ChatBusy(Uuid),
    /// The run already ended, with this status.
    #[error("the run already ended")]
    RunEnded(RunStatus),
    /// Where to resume is past the run's last event.
    #[error("{field} is past the run's last event ({last})")]
    AfterLast { field: &'static str, last: u64 },
    /// The run ended long enough ago that its events were swept.
    #[error("the run's events are no longer kept")]
    LogSwept,
    #[error("not admitted: {0:?}")]
    Rejected(Rejection),
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for RunError {
    fn from(error: StoreError) -> Self {
        match error {
            // Deleted between the lookup and the write.
            StoreError::ChatNotFound(_) => Self::ChatNotFound,
            StoreError::ChatBusy(run_id) => Self::ChatBusy(run_id),
            other => Self::Store(other),
        }
    }
}

/// A run as one follower sees it: its events from some seq on, and the admission it holds.
#[derive(Debug)]
pub struct RunHandle {
    pub chat_id: Uuid,
    pub follower: Follower,
    /// Keeps the stream counted for the drain until the follower is dropped.
    pub guard: StreamGuard,
}

/// Where a follower starts: after this seq of the run (0: from the start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resume {
    pub after: u64,
    /// Which input named it, for the error when it is past the end.
    pub field: &'static str,
}

/// A chat's history, and its run still going, for a page that (re)loads.
#[derive(Debug)]
pub struct History {
    pub messages: Vec<StoredMessage>,
    /// The run going now and its last committed seq.
    pub running: Option<(Uuid, u64)>,
}

/// Who a request acts for in dev mode: chats are created for this owner on demand.
pub fn dev_owner() -> ChatOwner {
    ChatOwner {
        org_id: "dev-org".to_owned(),
        user_id: "dev-user".to_owned(),
        canvas_id: "dev-canvas".to_owned(),
    }
}

impl RunService {
    /// The service; its runs are the tasks of `component`, and stop when it is told to.
    pub fn new(parts: RunServiceParts, component: Component) -> Self {
        Self {
            inner: Arc::new(Inner {
                parts,
                provider_models: Mutex::default(),
                live: LiveRuns::default(),
                component,
            }),
        }
    }

    /// The runs this process drives now.
    pub fn live(&self) -> &LiveRuns {
        &self.inner.live
    }

    pub fn log(&self) -> &RunLog {
        &self.inner.parts.log
    }

    pub fn store(&self) -> &SessionStore {
        &self.inner.parts.store
    }

    /// Whether an interrupted run also sends `run_failed` (`CLIENT_COMPAT=seed`).
    pub fn seed_clients(&self) -> bool {
        self.inner.parts.seed_clients
    }

    /// This process, as the owner of the runs it drives.
    pub fn instance_id(&self) -> &str {
        &self.inner.parts.instance_id
    }

    /// Follows run `run_id` of `chat_id` for `caller`: its events after `resume`, then the live run to its `done`.
    pub async fn attach(
        &self,
        caller: &Identity,
        chat_id: Uuid,
        run_id: Uuid,
        resume: Resume,
    ) -> Result<RunHandle, RunError> {
        let parts = &self.inner.parts;
        parts
            .tracker
            .admitting(Held::descriptors(1))
            .map_err(|r| self.rejected(r))?;
        let (run, last) = self.find_run(caller, chat_id, run_id).await?;
        if resume.after > last {
            return Err(RunError::AfterLast {
                field: resume.field,
                last,
            });
        }
        if last == 0 && run.status != RunStatus::Running {
            return Err(RunError::LogSwept);
        }
        if run.status == RunStatus::Interrupted && run.error.as_deref() == Some(STALE_RUN_ERROR) {
            self.end_if_left_open(&run, last).await?;
        }
        let guard = parts.tracker.try_admit().map_err(|r| self.rejected(r))?;
        parts.metrics.replay_served();
        let follower = self.follower(run_id, resume.after);
        if !follower.is_local() && run.status == RunStatus::Running {
            // Tell the producer, wherever it is, that this run is followed; should it be gone, this process may
            // continue the run, acting for this caller.
            parts
                .log
                .followed_by(run_id, tool_context(caller, &parts.tools));
            parts.store.follow_elsewhere(run_id).await?;
            if run.owner_instance.is_empty() {
                // Released by a replica that drained: continue it now rather than at the next lease check.
                self.take_over_followed().await;
            }
        }
        Ok(RunHandle {
            chat_id,
            follower,
            guard,
        })
    }

    /// Stops run `run_id` of `chat_id` on purpose, from any replica.
    pub async fn cancel(
        &self,
        caller: &Identity,
        chat_id: Uuid,
        run_id: Uuid,
    ) -> Result<(), RunError> {
        let parts = &self.inner.parts;
        let (run, _) = self.find_run(caller, chat_id, run_id).await?;
        if run.status != RunStatus::Running {
            return Err(RunError::RunEnded(run.status));
        }
        match parts.log.live(run_id) {
            Some(live) => live.halt(Halt::Cancelled),
            None => parts.store.notify_cancel(run_id).await?,
        }
        tracing::info!(%run_id, %chat_id, "run cancel requested");
        Ok(())
    }

    /// Each provider's HTTP clients and the streams they carry now, for the metrics.
    pub fn provider_load(&self) -> Vec<ProviderLoad> {
        self.inner
            .parts
            .providers
            .lanes()
            .into_iter()
            .map(|(provider, lane)| ProviderLoad {
                provider,
                clients: lane.clients(),
                streams: lane.streams(),
            })
            .collect()
    }

    /// Which models requests may name, and the default.
    pub fn models(&self) -> &ModelPolicy {
        &self.inner.parts.models
    }

    /// The chat's messages and its run still going, for `caller`.
    pub async fn history(&self, caller: &Identity, chat_id: Uuid) -> Result<History, RunError> {
        let parts = &self.inner.parts;
        let chat = owned(caller, parts.store.get_chat(chat_id).await?)?;
        let messages = parts.store.messages(chat.id).await?;
        let running = match parts.store.running_run(chat.id).await? {
            Some(run_id) => Some((run_id, self.last_seq(run_id).await?)),
            None => None,
        };
        Ok(History { messages, running })
    }

    /// Run `run_id` of `chat_id` and its last committed seq, when the chat is the caller's and the run is of the
    /// chat. One query to the store; the seq from memory when the run is produced here.
    async fn find_run(
        &self,
        caller: &Identity,
        chat_id: Uuid,
        run_id: Uuid,
    ) -> Result<(Run, u64), RunError> {
        let parts = &self.inner.parts;
        let (_, run) = parts
            .store
            .chat_run(chat_id, run_id)
            .await?
            .filter(|(owner, _)| is_callers(caller, owner))
            .ok_or(RunError::ChatNotFound)?;
        let (run, stored) = run.ok_or(RunError::RunNotFound)?;
        let last = parts
            .log
            .live(run_id)
            .map_or(stored, |live| live.last_seq());
        Ok((run, last))
    }

    /// Ends the log of `run`, marked interrupted because its process stopped, if `done` is not its last event (`last`):
    /// the replica that marked it could not end its log, or has not yet, and its followers would wait for a `done` that
    /// never comes. Nothing else writes to its log (the mark raised its epoch), and both write the same end, so
    /// whichever comes second only finds the seqs taken. (A run that ended otherwise is left alone: its producer
    /// writes its last events after it stores the end.)
    async fn end_if_left_open(&self, run: &Run, last: u64) -> Result<(), RunError> {
        let parts = &self.inner.parts;
        let tail = parts.store.events_after(run.id, last - 1).await?;
        if follow::ends(&tail) {
            return Ok(());
        }
        match lease::end_log(&parts.store, run, self.seed_clients()).await {
            Ok(ended) => parts.log.committed_elsewhere(run.id, ended),
            // Ended elsewhere meanwhile (its seqs taken): the follower reads that end from the store.
            Err(error) => {
                tracing::warn!(run_id = %run.id, %error, "could not end the log of an ended run")
            }
        }
        Ok(())
    }

    /// The run's last committed seq: from memory when it is produced here, else from the store.
    async fn last_seq(&self, run_id: Uuid) -> Result<u64, RunError> {
        Ok(match self.inner.parts.log.live(run_id) {
            Some(live) => live.last_seq(),
            None => self.inner.parts.store.last_seq(run_id).await?,
        })
    }

    fn follower(&self, run_id: Uuid, after: u64) -> Follower {
        let parts = &self.inner.parts;
        Follower::new(run_id, parts.log.clone(), after, Arc::clone(&parts.metrics))
    }

    fn rejected(&self, rejection: Rejection) -> RunError {
        self.inner.parts.metrics.stream_rejected(rejection);
        RunError::Rejected(rejection)
    }
}

/// Who a run acts for, as `tools` see it. The caller's bearer token only when a tool sends it on: a run keeps its
/// context for as long as it lasts, and a token is a few hundred bytes.
fn tool_context(caller: &Identity, tools: &ToolRegistry) -> ToolContext {
    match caller {
        Identity::Token(caller) => ToolContext {
            bearer: tools.uses_caller_token().then(|| caller.token.clone()),
            org_id: caller.org_id.clone(),
            canvas_version: None,
        },
        Identity::Dev => ToolContext {
            bearer: None,
            org_id: dev_owner().org_id,
            canvas_version: None,
        },
    }
}

/// The chat, when it exists and is the caller's.
fn owned(caller: &Identity, found: Option<Chat>) -> Result<Chat, RunError> {
    found
        .filter(|chat| is_callers(caller, &chat.owner))
        .ok_or(RunError::ChatNotFound)
}

/// Whether a chat of `owner` is the caller's.
fn is_callers(caller: &Identity, owner: &ChatOwner) -> bool {
    match caller {
        Identity::Token(caller) => caller.owns(owner),
        Identity::Dev => *owner == dev_owner(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Caller;
    use crate::secret::Secret;

    /// A run keeps the caller's token for its tools only when one of them sends it on.
    #[test]
    fn a_run_keeps_the_callers_token_only_for_tools_that_send_it_on() {
        let caller = Identity::Token(Caller {
            org_id: "org".into(),
            user_id: "user".into(),
            scopes: vec!["canvas:c".into()],
            token: Secret::new("header.payload.signature"),
        });
        let built_ins = tool_context(&caller, &ToolRegistry::default());
        assert!(built_ins.bearer.is_none());
        assert_eq!(built_ins.org_id, "org");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tools.yaml");
        std::fs::write(
            &file,
            "tools:\n  - name: look\n    description: Looks something up.\n    url: http://127.0.0.1:1/look\n",
        )
        .unwrap();
        let http = tool_context(&caller, &ToolRegistry::load(&file).unwrap());
        assert_eq!(
            http.bearer.as_ref().map(Secret::expose),
            Some("header.payload.signature")
        );
        assert!(
            tool_context(&Identity::Dev, &ToolRegistry::load(&file).unwrap())
                .bearer
                .is_none()
        );
    }
}
