//! The session store: chats, their messages and their runs.
//!
//! [`SessionStore`] is what the rest of the code uses, on SQLite (the embedded default, `sqlite.rs`) or PostgreSQL (for
//! several replicas sharing one store, `postgres.rs`). Every query is written once (`chats.rs`, `runs.rs`) with
//! `$N` placeholders; `db.rs` binds and reads values in each backend's types (UUID text and Unix milliseconds in
//! SQLite, `uuid` and `timestamptz` in PostgreSQL) and fills the few SQL fragments that differ. One test suite checks
//! the same behaviour on both.
//!
//! Writes that must agree happen in one transaction: starting a run stores the run row and the user's prompt (and
//! sets the chat's `initial_message` from its first prompt; the starts waiting for a connection at the same moment
//! are committed together, each as if alone, on PostgreSQL in one call of a function doing the same statements, see
//! `starts.rs`); finishing a run stores its messages, its end state and usage, and adds the usage to the chat's
//! totals (the ends waiting at the same moment are committed together likewise, see `ends.rs`). A start first locks
//! its chat (so concurrent runs of one chat never race for a message index) and checks the chat still exists.
//!
//! Transactions that lock several rows lock them in one order, so that none waits for another in a circle: runs
//! before chats, each by id. Run ends committed together (`ends.rs`) lock their runs, then their chats; the heartbeat,
//! a claim, the follower notes and the marking of stale runs lock runs only; run starts lock chats only (an existing
//! run is only read); deleting a chat locks its runs first.
//! A statement updating several runs locks them by id in a subquery that it joins by key (`UPDATE ... FROM (SELECT id
//! ... ORDER BY id FOR UPDATE) AS locked WHERE id = locked.<id>`): whatever the plan, each locked run is then updated
//! through its key once. With the subquery under `IN`, PostgreSQL planned the sweep of stale runs on a new database's
//! empty store (a plan each connection keeps for any parameters until the table is analyzed) as a loop that read the
//! locked runs again for each running run: 3.4 s for a crashed peer's 5,000 runs, holding them all, against 40 ms.
//!
//! Crash recovery works by lease: each process has an instance id (stored as the run's owner) and refreshes
//! `heartbeat_at` of the runs it is driving, three times per lease; a run still `running` whose heartbeat is older
//! than the lease belongs to a process that is gone (or lost its run without recording the end), and any replica marks
//! it `interrupted`, keeping its partial answer. A live run always has a fresh heartbeat, so no replica marks another
//! live replica's runs, nor its own.

/// SQL for the seq of the last event stored for the run whose id is the SQL expression `$run` (0 when it has none):
/// the `last_seq` of its last row, found by the log's key. Not the largest `last_seq` of its rows, which reads every
/// row: a run paced as a model answers stores about one event to a row, thousands by its end, and every client
/// attaching to it (all of a replica's at once, at a handoff) read them all.
macro_rules! last_seq_of {
    ($run:literal) => {
        concat!(
            "CAST(COALESCE((SELECT e.last_seq FROM agent_run_events e WHERE e.run_id = ",
            $run,
            " ORDER BY e.seq DESC LIMIT 1), 0) AS BIGINT)"
        )
    };
}

mod chats;
mod db;
mod ends;
mod events;
mod listen;
mod postgres;
mod row;
mod runs;
mod scripts;
mod sqlite;
mod starts;
mod waits;

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use sqlx::migrate::{Migrate, Migrator};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::model::{Message, Usage};
use db::{Db, Pools};
pub use events::{
    CANCEL_CHANNEL, EVENTS_CHANNEL, EventsPage, LogRow, RECORD_SEPARATOR, RELEASED_CHANNEL,
};
pub use listen::Listener;
pub use waits::PoolWaits;

/// How long a request waits for a pooled connection (a run start, for its turn: see `starts.rs`) before the store
/// counts as unavailable (503 `store_unavailable`).
const ACQUIRE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

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
pub async fn open(config: &StoreConfig) -> Result<SessionStore, StoreError> {
    let db = match config {
        StoreConfig::Sqlite(options) => Pools::Sqlite(sqlite::open(options.clone()).await?),
        StoreConfig::Postgres(options) => Pools::Postgres(postgres::open(options.clone()).await?),
    };
    let db = Db::new(db);
    let starts = starts::Starts::spawn(db.clone());
    let ends = ends::Ends::spawn(db.clone());
    Ok(SessionStore(Arc::new(Shared { db, starts, ends })))
}

/// The session store, on whichever backend was configured; cheap to clone: the clones share one set of pools and
/// queues, and a clone is a pointer (runs, followers and the run log each keep one for as long as they last).
///
/// Its methods are grouped by aggregate: chats and their messages (`chats.rs`), runs and their leases (`runs.rs`).
/// One concrete type rather than a trait per aggregate: there is one implementation, written once over both
/// backends (`db.rs` hides where they differ), so a trait would only add boxed futures or generics.
#[derive(Debug, Clone)]
pub struct SessionStore(Arc<Shared>);

/// What the clones of a [`SessionStore`] share.
#[derive(Debug)]
struct Shared {
    db: Db,
    /// Where run starts queue for a connection, to be committed together.
    starts: starts::Starts,
    /// Where run ends queue for a connection, to be committed together.
    ends: ends::Ends,
}

impl SessionStore {
    /// Succeeds when the store answers a trivial query.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.0.db.read().await?.execute("SELECT 1", &[]).await?;
        Ok(())
    }

    /// Succeeds when the store takes a write: a write transaction that changes nothing, rolled back (with SQLite it
    /// needs the write lock, which another process may hold).
    pub async fn ping_write(&self) -> Result<(), StoreError> {
        let mut tx = self.0.db.begin().await?;
        tx.execute("UPDATE agent_chats SET id = id WHERE 1 = 0", &[])
            .await?;
        Ok(())
    }

    /// Opens every pooled PostgreSQL connection and readies it for a burst of runs: on each, a chat is made, a run
    /// started in it and ended with an answer of a few KB, and all of it rolled back, so nothing is left behind; on
    /// the run log's connection a run is started and a group commit of its events made, rolled back too. A new
    /// PostgreSQL connection is a new server process: its first run start reads the catalog and compiles the run
    /// functions (`agent_start_runs`, `agent_finish_runs` and the ones they call; tens of milliseconds under load), its
    /// first long answer and run log row take the server's paths for long values (compression) for the first time, and
    /// a process that just started (a deploy) would otherwise make the first burst of requests pay that on every
    /// connection at once. A connection the pool opens later (after one was lost) gets ready on its first use.
    ///
    /// When the server refuses some of the connections (its `max_connections`, or a limit on the role or the
    /// database), the pool shrinks to the number it granted (see `postgres::PgDb::resize`), with a warning.
    ///
    /// SQLite has nothing to ready (its connections are in this process).
    pub async fn warm_up(&mut self) -> Result<(), StoreError> {
        if !self.0.db.is_postgres() {
            return Ok(());
        }
        let wanted = postgres::MAX_CONNECTIONS;
        let mut transactions = self.begin_all(wanted).await;
        let granted = transactions.iter().filter(|tx| tx.is_ok()).count() as u32;
        if granted > 0
            && granted < wanted
            && let shared =
                Arc::get_mut(&mut self.0).expect("a store is warmed up before it is shared")
            && let Pools::Postgres(db) = &mut shared.db.pools
        {
            tracing::warn!(
                connections = granted,
                wanted,
                "the store's server refused some connections; the pool keeps to those it granted"
            );
            drop(transactions);
            db.resize(granted).await;
            // The tasks of the starts and ends took their connections from the pool replaced.
            shared.starts = starts::Starts::spawn(shared.db.clone());
            shared.ends = ends::Ends::spawn(shared.db.clone());
            transactions = self.begin_all(granted).await;
        }
        let warmed =
            futures_util::future::join_all(transactions.into_iter().map(|tx| async move {
                let mut tx = tx?;
                let warmed = rehearse_run(&mut tx).await;
                tx.rollback().await?;
                warmed
            }));
        // The run log's connection: a run started and a group commit of its events, rolled back (nothing stored or
        // notified).
        let logged = async {
            let mut tx = self.0.db.begin_log().await?;
            let run = rehearse_start(&mut tx).await?;
            let events = vec![REHEARSED_EVENT; REHEARSED_EVENTS].join("\n");
            let row = events::LogRow {
                run_id: run.id,
                epoch: 1,
                seq: 2,
                last_seq: 1 + REHEARSED_EVENTS as u64,
                events,
            };
            if events::append_on(&mut tx, &[row]).await?.is_empty() {
                return Err(StoreError::Corrupt(
                    "the run log did not store a run's events in the warm-up".to_owned(),
                ));
            }
            tx.rollback().await
        };
        let (warmed, logged) = tokio::join!(warmed, logged);
        logged?;
        warmed.into_iter().collect()
    }

    /// `count` transactions held at once, so each is on a connection of its own.
    async fn begin_all(&self, count: u32) -> Vec<Result<db::Conn, StoreError>> {
        futures_util::future::join_all((0..count).map(|_| self.0.db.begin())).await
    }

    /// The runtime its queues of run starts and ends run on, and the run log's writer and listener with them
    /// ([`crate::runtime::for_store`]).
    pub fn runtime(&self) -> tokio::runtime::Handle {
        self.0.db.runtime()
    }

    /// How long requests wait for a pooled connection, for the metrics.
    pub fn pool_waits(&self) -> &PoolWaits {
        self.0.db.waits()
    }

    /// The process will close soon: the shutdown's drain began. On SQLite the WAL is kept small from then on, so that
    /// emptying it into the database file at the end (`close`) is short.
    pub fn closing_soon(&self) {
        self.0.db.closing_soon();
    }

    /// Closes every connection; waits for those in use to be returned.
    pub async fn close(&self) {
        self.0.db.close().await;
    }
}

/// Applies this build's migrations. A store that a newer agentd migrated further (this build rolled back to, or a
/// replica of the earlier version restarting during a deploy) is served as it is, with a warning naming what this
/// build does not know: every migration leaves the store usable by the version before it.
async fn migrate<DB>(mut migrator: Migrator, pool: &sqlx::Pool<DB>) -> Result<(), StoreError>
where
    DB: sqlx::Database,
    DB::Connection: Migrate,
{
    migrator.set_ignore_missing(true);
    migrator.run(pool).await?;
    let known: HashSet<i64> = migrator.iter().map(|m| m.version).collect();
    let newer: Vec<i64> = pool
        .acquire()
        .await?
        .list_applied_migrations(&migrator.table_name)
        .await?
        .into_iter()
        .map(|m| m.version)
        .filter(|version| !known.contains(version))
        .collect();
    if !newer.is_empty() {
        tracing::warn!(
            migrations = ?newer,
            "the store has migrations a newer agentd applied; serving it as it is"
        );
    }
    Ok(())
}

/// The event a rehearsed run's answer is made of, and how many of them: an answer as long as real ones often are
/// (a few KB: the run's row and its message are stored compressed, as such answers are) and a run log row as long as
/// an unpaced run's deltas committed together make (compressed with lz4 past 8,160 bytes). Rehearsed with short ones,
/// the first burst after a start was the first time each connection stored long values, on every connection at once.
const REHEARSED_EVENT: &str = r#"{"type":"model_delta","content":"warm-up "}"#;
const REHEARSED_EVENTS: usize = 500;

/// A run's whole course in the store on `conn` (a transaction the caller rolls back): a chat, a run started in it with
/// its first event, and ended with an answer.
async fn rehearse_run(conn: &mut db::Conn) -> Result<(), StoreError> {
    let run = rehearse_start(conn).await?;
    let answer = "warm-up ".repeat(REHEARSED_EVENTS);
    let end = RunEnd {
        status: RunStatus::Completed,
        error: None,
        output: answer.clone(),
        usage: Usage::default(),
        messages: vec![Message::Assistant {
            content: answer,
            tool_calls: Vec::new(),
        }],
    };
    ends::finish_runs_postgres(conn, &[(run.id, 1, &end)])
        .await?
        .pop()
        .expect("one answer per end")
}

/// A chat made on `conn` and a run started in it with its first event (in the caller's transaction): the run.
async fn rehearse_start(conn: &mut db::Conn) -> Result<NewRun, StoreError> {
    let owner = ChatOwner {
        org_id: "warm-up".to_owned(),
        user_id: "warm-up".to_owned(),
        canvas_id: "warm-up".to_owned(),
    };
    let chat = chats::insert_chat_on(conn, Uuid::new_v4(), &owner)
        .await?
        .ok_or_else(|| StoreError::Corrupt("a new chat id was taken".to_owned()))?;
    let run = NewRun {
        id: Uuid::new_v4(),
        chat_id: chat.id,
        owner,
        model: "warm-up".to_owned(),
        owner_instance: "warm-up".to_owned(),
        prompt: "warm-up".to_owned(),
        first_event: Some("{}".to_owned()),
        agent_context: None,
    };
    starts::start_runs_postgres(conn, &[(&run, false)])
        .await?
        .pop()
        .expect("one answer per start")?;
    Ok(run)
}

/// Queues the request `pending` makes of the channel it is answered on, and waits for its answer: how a run start or
/// end waits for the task that commits them (`starts.rs`, `ends.rs`). That task ends with the store; a request it had
/// not reached finds the store closed.
async fn queued<T, A>(
    queue: &tokio::sync::mpsc::UnboundedSender<T>,
    pending: impl FnOnce(tokio::sync::oneshot::Sender<Result<A, StoreError>>) -> T,
) -> Result<A, StoreError> {
    let (answer, answered) = tokio::sync::oneshot::channel();
    if queue.send(pending(answer)).is_err() {
        return Err(sqlx::Error::PoolClosed.into());
    }
    answered
        .await
        .unwrap_or(Err(sqlx::Error::PoolClosed.into()))
}

/// Makes `batch` with `call` in one transaction on `conn`: each one's answer. When that fails, nothing of it is left
/// (its transaction rolled back), and each is made again alone, so only one the store refuses fails; unless the store
/// is unavailable, which is the error. How run starts and ends made together (`starts.rs`, `ends.rs`) fall back.
async fn each_alone_if_refused<P, A>(
    conn: &mut db::Conn,
    batch: &[P],
    mut call: impl AsyncFnMut(&mut db::Conn, &[P]) -> Result<Vec<Result<A, StoreError>>, StoreError>,
) -> Result<Vec<Result<A, StoreError>>, StoreError> {
    match call(conn, batch).await {
        Ok(answers) => Ok(answers),
        Err(error) if error.is_unavailable() => Err(error),
        Err(error) if batch.len() == 1 => Ok(vec![Err(error)]),
        Err(_) => {
            let mut answers = Vec::with_capacity(batch.len());
            for alone in batch.chunks(1) {
                let answer = call(conn, alone).await;
                answers.push(answer.and_then(|mut answer| answer.pop().expect("one answer each")));
            }
            Ok(answers)
        }
    }
}

/// The same error as `error`, for another start or end that found the store as unavailable (the store's errors are not
/// `Clone`): a pool's own, or its text as an I/O error, which counts as unavailable too.
fn like(error: &StoreError) -> StoreError {
    match error {
        StoreError::Database(sqlx::Error::PoolTimedOut) => sqlx::Error::PoolTimedOut.into(),
        StoreError::Database(sqlx::Error::PoolClosed) => sqlx::Error::PoolClosed.into(),
        StoreError::Database(sqlx::Error::WorkerCrashed) => sqlx::Error::WorkerCrashed.into(),
        other => sqlx::Error::Io(std::io::Error::other(other.to_string())).into(),
    }
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
    /// The run's lease moved on (another process claimed it, or it ended): a stale producer writes nothing.
    #[error("run {0} is no longer held by this process")]
    Fenced(Uuid),
    /// The chat already has a run going (this one).
    #[error("chat has run {0} going")]
    ChatBusy(Uuid),
    #[error("stored data is not readable: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Whether every connection stayed taken for longer than a request may wait for one: the store is busy, and may
    /// well answer a moment later.
    pub fn is_busy(&self) -> bool {
        matches!(self, Self::Database(sqlx::Error::PoolTimedOut))
    }

    /// Whether the store could not be reached at all (as opposed to refusing this request).
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Database(
                sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::WorkerCrashed,
            ) => true,
            // The server itself is going away or out of room: PostgreSQL's connection exceptions (08), insufficient
            // resources such as a full disk (53), operator intervention such as a shutdown (57), system errors (58);
            // SQLite's busy, locked, I/O error and full disk (primary codes 5, 6, 10, 13).
            Self::Database(sqlx::Error::Database(error)) => error.code().is_some_and(|code| {
                ["08", "53", "57", "58"]
                    .iter()
                    .any(|class| code.starts_with(class))
                    || code
                        .parse::<i32>()
                        .is_ok_and(|n| matches!(n & 0xff, 5 | 6 | 10 | 13))
            }),
            _ => false,
        }
    }
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
    /// The process that runs (or ran) it; empty while it is released for another replica to take over.
    pub owner_instance: String,
    /// The fencing epoch of its lease: raised by every claim, release and stop by another process; writes under an
    /// older one are refused.
    pub epoch: u64,
    /// The client's `agent_context`, as JSON.
    pub agent_context: Option<String>,
    pub created_at: OffsetDateTime,
    pub finished_at: Option<OffsetDateTime>,
}

/// A run about to start, with the user's prompt.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub id: Uuid,
    pub chat_id: Uuid,
    /// Whose chat the caller may start a run in: a chat of another owner is [`StoreError::ChatNotFound`], as a missing
    /// one is, and nothing about it is read or written.
    pub owner: ChatOwner,
    pub model: String,
    pub owner_instance: String,
    pub prompt: String,
    /// The run's first event (`run_started`) as its JSON, stored as seq 1 of its log in the same transaction, so the
    /// run start costs one commit; `None` leaves the log empty.
    pub first_event: Option<String>,
    /// The client's `agent_context`, as JSON, kept for a continuation of the run elsewhere.
    pub agent_context: Option<String>,
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

/// What an interrupted run left by a stopped process is told, in its `error`.
pub const STALE_RUN_ERROR: &str = "the process running it stopped before the run ended";

/// `value` as the JSON text a statement is given; `what` names it in the error should it not serialize.
fn json_text(value: &impl serde::Serialize, what: &str) -> Result<String, StoreError> {
    serde_json::to_string(value)
        .map_err(|e| StoreError::Corrupt(format!("{what} do not serialize: {e}")))
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A duration in whole milliseconds, as the queries bind it.
fn to_ms(duration: std::time::Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

fn usage_from(input: i64, output: i64, total: i64) -> Usage {
    let n = |v: i64| u64::try_from(v).unwrap_or(0);
    Usage {
        input_tokens: n(input),
        output_tokens: n(output),
        total_tokens: n(total),
    }
}
