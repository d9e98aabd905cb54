//! The session store: chats, their messages and their runs.
//!
//! [`SessionStore`] is what the rest of the code uses; [`sqlite`] (the embedded default) and [`postgres`] (for several
//! replicas sharing one store) implement it with the same behaviour, checked by one test suite run against both.
//!
//! Writes that must agree happen in one transaction: starting a run stores the run row and the user's prompt (and
//! sets the chat's `initial_message` from its first prompt); finishing a run stores its messages, its end state and
//! usage, and adds the usage to the chat's totals. Each transaction first updates the chat row, which takes the write
//! lock up front (so concurrent runs of one chat never race for a message index) and checks the chat still exists.
//!
//! Crash recovery works by lease: each process has an instance id (stored as the run's owner) and refreshes
//! `heartbeat_at` of the runs it is driving, three times per lease; a run still `running` whose heartbeat is older
//! than the lease belongs to a process that is gone (or lost its run without recording the end), and any replica marks
//! it `interrupted`, keeping its partial answer. A live run always has a fresh heartbeat, so no replica marks another
//! live replica's runs, nor its own.

pub mod postgres;
pub mod sqlite;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use uuid::Uuid;

use crate::model::{Message, Usage};

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Where the store lives, as configured; nothing is opened until [`open`].
#[derive(Debug, Clone)]
pub enum StoreConfig {
    Sqlite(sqlx::sqlite::SqliteConnectOptions),
    Postgres(sqlx::postgres::PgConnectOptions),
}

impl StoreConfig {
    pub fn backend(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }
}

/// Connects and applies the migrations of the configured backend.
pub async fn open(config: &StoreConfig) -> Result<Arc<dyn SessionStore>, StoreError> {
    Ok(match config {
        StoreConfig::Sqlite(options) => Arc::new(sqlite::SqliteStore::open(options.clone()).await?),
        StoreConfig::Postgres(options) => Arc::new(postgres::PgStore::open(options.clone()).await?),
    })
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("chat {0} not found")]
    ChatNotFound(Uuid),
    #[error("run {0} not found")]
    RunNotFound(Uuid),
    #[error("stored data is not readable: {0}")]
    Corrupt(String),
}

/// Who a chat belongs to; a chat is found for a caller only when all three match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatOwner {
    pub org_id: String,
    pub user_id: String,
    pub canvas_id: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Chat {
    pub id: Uuid,
    pub owner: ChatOwner,
    /// The first prompt of the chat, once there is one.
    pub initial_message: Option<String>,
    /// Usage summed over every run of the chat.
    pub totals: Usage,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
    /// The status of the chat's newest run; `None` before its first run.
    pub latest_run_status: Option<RunStatus>,
}

impl Chat {
    /// A chat just created: no message, no run, no usage yet.
    fn new(id: Uuid, owner: ChatOwner, created_at: OffsetDateTime) -> Self {
        Self {
            id,
            owner,
            initial_message: None,
            totals: Usage::default(),
            created_at,
            updated_at: created_at,
            latest_run_status: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    /// Position in the chat, from 0, unique per chat.
    pub index: i64,
    pub message: Message,
    /// The run that produced it.
    pub run_id: Option<Uuid>,
    pub created_at: OffsetDateTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    Running,
    Completed,
    Failed,
    Interrupted,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Interrupted => "interrupted",
        }
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RunStatus {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "running" => Self::Running,
            "completed" => Self::Completed,
            "failed" => Self::Failed,
            "interrupted" => Self::Interrupted,
            other => return Err(StoreError::Corrupt(format!("unknown run status {other:?}"))),
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub id: Uuid,
    pub chat_id: Uuid,
    pub model: String,
    pub status: RunStatus,
    pub error: Option<String>,
    pub usage: Usage,
    /// The answer as far as it was saved; the whole answer once the run ended.
    pub output: String,
    /// The process that runs (or ran) it.
    pub owner_instance: String,
    pub created_at: OffsetDateTime,
    pub finished_at: Option<OffsetDateTime>,
}

/// A run about to start, with the user's prompt.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub id: Uuid,
    pub chat_id: Uuid,
    pub model: String,
    pub owner_instance: String,
    pub prompt: String,
}

/// How a run ended, and what it leaves behind.
#[derive(Debug, Clone)]
pub struct RunEnd {
    /// Anything but `Running`.
    pub status: RunStatus,
    pub error: Option<String>,
    pub output: String,
    pub usage: Usage,
    /// The messages the run added after the prompt (assistant answers, tool results); empty unless completed.
    pub messages: Vec<Message>,
}

pub trait SessionStore: Send + Sync + fmt::Debug {
    /// Succeeds when the store answers a trivial query.
    fn ping(&self) -> StoreFuture<'_, ()>;

    fn create_chat<'a>(&'a self, owner: &'a ChatOwner) -> StoreFuture<'a, Chat>;

    /// Creates the chat with this id unless it exists; returns the chat either way.
    fn ensure_chat<'a>(&'a self, id: Uuid, owner: &'a ChatOwner) -> StoreFuture<'a, Chat>;

    fn get_chat(&self, id: Uuid) -> StoreFuture<'_, Option<Chat>>;

    /// The owner's chats, newest first.
    fn list_chats<'a>(&'a self, owner: &'a ChatOwner) -> StoreFuture<'a, Vec<Chat>>;

    /// Token usage summed over every chat of the organisation (zeros when it has none).
    fn org_usage<'a>(&'a self, org_id: &'a str) -> StoreFuture<'a, Usage>;

    /// Deletes the chat with its messages and runs; false when there was none.
    fn delete_chat(&self, id: Uuid) -> StoreFuture<'_, bool>;

    /// The chat's messages in order.
    fn messages(&self, chat_id: Uuid) -> StoreFuture<'_, Vec<StoredMessage>>;

    /// Stores the run as `running` and its prompt as the chat's next message, in one transaction.
    fn start_run<'a>(&'a self, run: &'a NewRun) -> StoreFuture<'a, ()>;

    /// Saves the answer so far of a running run.
    fn save_partial<'a>(&'a self, run_id: Uuid, output: &'a str) -> StoreFuture<'a, ()>;

    /// Records how the run ended, its messages, and adds its usage to the chat's totals, in one transaction.
    fn finish_run<'a>(&'a self, run_id: Uuid, end: &'a RunEnd) -> StoreFuture<'a, ()>;

    fn get_run(&self, id: Uuid) -> StoreFuture<'_, Option<Run>>;

    /// The chat's runs, oldest first.
    fn runs(&self, chat_id: Uuid) -> StoreFuture<'_, Vec<Run>>;

    /// Refreshes the heartbeat of these runs (the ones this process is driving); returns how many were running.
    fn heartbeat<'a>(&'a self, runs: &'a [Uuid]) -> StoreFuture<'a, u64>;

    /// Marks `interrupted` every running run whose heartbeat is older than `lease`, keeping its partial answer.
    fn interrupt_stale(&self, lease: Duration) -> StoreFuture<'_, Vec<Uuid>>;

    /// Closes every connection; waits for those in use to be returned.
    fn close(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// What an interrupted run left by a stopped process is told, in its `error`.
pub const STALE_RUN_ERROR: &str = "the process running it stopped before the run ended";

fn encode_message(message: &Message) -> Result<String, StoreError> {
    serde_json::to_string(message)
        .map_err(|e| StoreError::Corrupt(format!("message does not serialize: {e}")))
}

fn decode_message(json: &str) -> Result<Message, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt(format!("stored message: {e}")))
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn usage_from(input: i64, output: i64, total: i64) -> Usage {
    let n = |v: i64| u64::try_from(v).unwrap_or(0);
    Usage {
        input_tokens: n(input),
        output_tokens: n(output),
        total_tokens: n(total),
    }
}
