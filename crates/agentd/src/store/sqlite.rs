//! The embedded store: one SQLite file, in WAL mode so readers never wait for the writer, with a busy timeout so
//! writers queue rather than fail. Ids are UUID text and times Unix milliseconds (UTC), taken from this process's
//! clock. Meant for one process; replicas share a PostgreSQL store instead.

use std::time::Duration;

use std::sync::Arc;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{Connection, Row};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{
    Chat, ChatOwner, NewRun, Run, RunEnd, STALE_RUN_ERROR, SessionStore, StoreError, StoreFuture,
    StoredMessage, decode_message, encode_message, to_i64, usage_from,
};
use crate::model::{Message, Usage};

/// How long a writer waits for another writer before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request waits for a free connection before the store counts as unavailable.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
const MAX_CONNECTIONS: u32 = 8;

/// The columns `chat_from` reads (a macro, so queries stay string literals).
macro_rules! chat_columns {
    () => {
        "id, org_id, user_id, canvas_id, initial_message, total_input_tokens, total_output_tokens, total_tokens, \
         created_at, updated_at, (SELECT r.status FROM agent_chat_runs r WHERE r.chat_id = agent_chats.id \
         ORDER BY r.created_at DESC, r.rowid DESC LIMIT 1) AS latest_run_status"
    };
}

/// The columns `run_from` reads.
macro_rules! run_columns {
    () => {
        "id, chat_id, model, status, error, input_tokens, output_tokens, total_tokens, partial_output, \
         owner_instance, created_at, finished_at"
    };
}

/// How often the WAL is checkpointed into the database file; bounds the WAL to what is written in this time.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);

#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// Reads, several at once (WAL lets them run beside the writer).
    readers: SqlitePool,
    /// Every write, through one connection: SQLite has one writer at a time anyway, and queueing here is far cheaper
    /// than connections retrying for the lock in SQLite's busy handler.
    writer: SqlitePool,
    /// The background checkpointer, stopped by `close`.
    checkpoints: Arc<tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
    stop_checkpoints: CancellationToken,
}

impl SqliteStore {
    pub async fn open(options: SqliteConnectOptions) -> Result<Self, StoreError> {
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        // Checkpoints run beside the writer, not inside its commits, where they would stall a run's first write.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(
                options
                    .clone()
                    .pragma("wal_autocheckpoint", "0")
                    .pragma("journal_size_limit", "33554432"),
            )
            .await?;
        sqlx::migrate!("../../migrations/sqlite")
            .run(&writer)
            .await?;
        let readers = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options.clone().read_only(true))
            .await?;
        let checkpointer = SqliteConnection::connect_with(&options).await?;
        let stop_checkpoints = CancellationToken::new();
        let checkpoints = tokio::spawn(checkpoint(checkpointer, stop_checkpoints.clone()));
        Ok(Self {
            readers,
            writer,
            checkpoints: Arc::new(tokio::sync::Mutex::new(Some(checkpoints))),
            stop_checkpoints,
        })
    }
}

/// Copies the WAL into the database file every 200 ms without blocking the writer, and empties it at the end.
async fn checkpoint(mut connection: SqliteConnection, stop: CancellationToken) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => break,
        }
        if let Err(error) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&mut connection)
            .await
        {
            tracing::warn!(%error, "SQLite checkpoint failed");
        }
    }
    if let Err(error) = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&mut connection)
        .await
    {
        tracing::warn!(%error, "final SQLite checkpoint failed");
    }
    let _ = connection.close().await;
}

fn now_ms() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

fn from_ms(ms: i64) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map_err(|e| StoreError::Corrupt(format!("timestamp {ms}: {e}")))
}

fn uuid(row: &SqliteRow, column: &str) -> Result<Uuid, StoreError> {
    let text: String = row.try_get(column)?;
    Uuid::parse_str(&text).map_err(|e| StoreError::Corrupt(format!("{column} {text:?}: {e}")))
}

fn chat_from(row: &SqliteRow) -> Result<Chat, StoreError> {
    Ok(Chat {
        id: uuid(row, "id")?,
        owner: ChatOwner {
            org_id: row.try_get("org_id")?,
            user_id: row.try_get("user_id")?,
            canvas_id: row.try_get("canvas_id")?,
        },
        initial_message: row.try_get("initial_message")?,
        totals: usage_from(
            row.try_get("total_input_tokens")?,
            row.try_get("total_output_tokens")?,
            row.try_get("total_tokens")?,
        ),
        created_at: from_ms(row.try_get("created_at")?)?,
        updated_at: from_ms(row.try_get("updated_at")?)?,
        latest_run_status: row
            .try_get::<Option<String>, _>("latest_run_status")?
            .map(|s| s.parse())
            .transpose()?,
    })
}

fn run_from(row: &SqliteRow) -> Result<Run, StoreError> {
    let status: String = row.try_get("status")?;
    Ok(Run {
        id: uuid(row, "id")?,
        chat_id: uuid(row, "chat_id")?,
        model: row.try_get("model")?,
        status: status.parse()?,
        error: row.try_get("error")?,
        usage: usage_from(
            row.try_get("input_tokens")?,
            row.try_get("output_tokens")?,
            row.try_get("total_tokens")?,
        ),
        output: row.try_get("partial_output")?,
        owner_instance: row.try_get("owner_instance")?,
        created_at: from_ms(row.try_get("created_at")?)?,
        finished_at: row
            .try_get::<Option<i64>, _>("finished_at")?
            .map(from_ms)
            .transpose()?,
    })
}

impl SqliteStore {
    async fn fetch_chat(&self, id: Uuid) -> Result<Option<Chat>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            chat_columns!(),
            " FROM agent_chats WHERE id = ?"
        ))
        .bind(id.to_string())
        .fetch_optional(&self.readers)
        .await?;
        row.as_ref().map(chat_from).transpose()
    }

    /// Inserts the chat unless its id exists; the new chat, or `None` when it existed.
    async fn insert_chat(&self, id: Uuid, owner: &ChatOwner) -> Result<Option<Chat>, StoreError> {
        let now = now_ms();
        let inserted = sqlx::query(
            "INSERT INTO agent_chats (id, org_id, user_id, canvas_id, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
        )
        .bind(id.to_string())
        .bind(&owner.org_id)
        .bind(&owner.user_id)
        .bind(&owner.canvas_id)
        .bind(now)
        .bind(now)
        .execute(&self.writer)
        .await?;
        if inserted.rows_affected() == 0 {
            return Ok(None);
        }
        Ok(Some(Chat::new(id, owner.clone(), from_ms(now)?)))
    }
}

/// Appends `messages` to the chat after its last message, inside the caller's transaction.
async fn append_messages(
    tx: &mut sqlx::SqliteConnection,
    chat_id: Uuid,
    run_id: Uuid,
    messages: &[Message],
    now: i64,
) -> Result<(), StoreError> {
    for message in messages {
        sqlx::query(
            "INSERT INTO agent_chat_messages (chat_id, message_index, message, run_id, created_at) \
             SELECT ?1, COALESCE(MAX(message_index) + 1, 0), ?2, ?3, ?4 FROM agent_chat_messages WHERE chat_id = ?1",
        )
        .bind(chat_id.to_string())
        .bind(encode_message(message)?)
        .bind(run_id.to_string())
        .bind(now)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

impl SessionStore for SqliteStore {
    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            sqlx::query("SELECT 1").execute(&self.readers).await?;
            Ok(())
        })
    }

    fn create_chat<'a>(&'a self, owner: &'a ChatOwner) -> StoreFuture<'a, Chat> {
        Box::pin(async move {
            let id = Uuid::new_v4();
            self.insert_chat(id, owner)
                .await?
                .ok_or(StoreError::ChatNotFound(id))
        })
    }

    fn ensure_chat<'a>(&'a self, id: Uuid, owner: &'a ChatOwner) -> StoreFuture<'a, Chat> {
        Box::pin(async move {
            if let Some(chat) = self.insert_chat(id, owner).await? {
                return Ok(chat);
            }
            self.fetch_chat(id)
                .await?
                .ok_or(StoreError::ChatNotFound(id))
        })
    }

    fn get_chat(&self, id: Uuid) -> StoreFuture<'_, Option<Chat>> {
        Box::pin(self.fetch_chat(id))
    }

    fn list_chats<'a>(&'a self, owner: &'a ChatOwner) -> StoreFuture<'a, Vec<Chat>> {
        Box::pin(async move {
            let rows = sqlx::query(concat!(
                "SELECT ",
                chat_columns!(),
                " FROM agent_chats WHERE org_id = ? AND user_id = ? AND canvas_id = ? \
                 ORDER BY created_at DESC, rowid DESC"
            ))
            .bind(&owner.org_id)
            .bind(&owner.user_id)
            .bind(&owner.canvas_id)
            .fetch_all(&self.readers)
            .await?;
            rows.iter().map(chat_from).collect()
        })
    }

    fn org_usage<'a>(&'a self, org_id: &'a str) -> StoreFuture<'a, Usage> {
        Box::pin(async move {
            let row = sqlx::query(
                "SELECT COALESCE(SUM(total_input_tokens), 0) AS input, \
                 COALESCE(SUM(total_output_tokens), 0) AS output, COALESCE(SUM(total_tokens), 0) AS total \
                 FROM agent_chats WHERE org_id = ?",
            )
            .bind(org_id)
            .fetch_one(&self.readers)
            .await?;
            Ok(usage_from(
                row.try_get("input")?,
                row.try_get("output")?,
                row.try_get("total")?,
            ))
        })
    }

    fn delete_chat(&self, id: Uuid) -> StoreFuture<'_, bool> {
        Box::pin(async move {
            let deleted = sqlx::query("DELETE FROM agent_chats WHERE id = ?")
                .bind(id.to_string())
                .execute(&self.writer)
                .await?;
            Ok(deleted.rows_affected() > 0)
        })
    }

    fn messages(&self, chat_id: Uuid) -> StoreFuture<'_, Vec<StoredMessage>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT message_index, message, run_id, created_at FROM agent_chat_messages \
                 WHERE chat_id = ? ORDER BY message_index",
            )
            .bind(chat_id.to_string())
            .fetch_all(&self.readers)
            .await?;
            rows.iter()
                .map(|row| {
                    let run_id: Option<String> = row.try_get("run_id")?;
                    Ok(StoredMessage {
                        index: row.try_get("message_index")?,
                        message: decode_message(row.try_get("message")?)?,
                        run_id: run_id
                            .map(|id| {
                                Uuid::parse_str(&id).map_err(|e| StoreError::Corrupt(e.to_string()))
                            })
                            .transpose()?,
                        created_at: from_ms(row.try_get("created_at")?)?,
                    })
                })
                .collect()
        })
    }

    fn start_run<'a>(&'a self, run: &'a NewRun) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let now = now_ms();
            let mut tx = self.writer.begin().await?;
            let chat = sqlx::query(
                "UPDATE agent_chats SET updated_at = ?, initial_message = COALESCE(initial_message, ?) WHERE id = ?",
            )
            .bind(now)
            .bind(&run.prompt)
            .bind(run.chat_id.to_string())
            .execute(&mut *tx)
            .await?;
            if chat.rows_affected() == 0 {
                return Err(StoreError::ChatNotFound(run.chat_id));
            }
            sqlx::query(
                "INSERT INTO agent_chat_runs (id, chat_id, model, status, owner_instance, heartbeat_at, created_at) \
                 VALUES (?, ?, ?, 'running', ?, ?, ?)",
            )
            .bind(run.id.to_string())
            .bind(run.chat_id.to_string())
            .bind(&run.model)
            .bind(&run.owner_instance)
            .bind(now)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            let prompt = Message::User {
                content: run.prompt.clone(),
            };
            append_messages(&mut tx, run.chat_id, run.id, &[prompt], now).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn save_partial<'a>(&'a self, run_id: Uuid, output: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            sqlx::query("UPDATE agent_chat_runs SET partial_output = ? WHERE id = ?")
                .bind(output)
                .bind(run_id.to_string())
                .execute(&self.writer)
                .await?;
            Ok(())
        })
    }

    fn finish_run<'a>(&'a self, run_id: Uuid, end: &'a RunEnd) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let now = now_ms();
            let mut tx = self.writer.begin().await?;
            let chat_id: Option<String> = sqlx::query_scalar(
                "UPDATE agent_chat_runs SET status = ?, error = ?, partial_output = ?, input_tokens = ?, \
                 output_tokens = ?, total_tokens = ?, finished_at = ? WHERE id = ? RETURNING chat_id",
            )
            .bind(end.status.as_str())
            .bind(&end.error)
            .bind(&end.output)
            .bind(to_i64(end.usage.input_tokens))
            .bind(to_i64(end.usage.output_tokens))
            .bind(to_i64(end.usage.total_tokens))
            .bind(now)
            .bind(run_id.to_string())
            .fetch_optional(&mut *tx)
            .await?;
            let chat_id = chat_id.ok_or(StoreError::RunNotFound(run_id))?;
            let chat_id =
                Uuid::parse_str(&chat_id).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            sqlx::query(
                "UPDATE agent_chats SET updated_at = ?, total_input_tokens = total_input_tokens + ?, \
                 total_output_tokens = total_output_tokens + ?, total_tokens = total_tokens + ? WHERE id = ?",
            )
            .bind(now)
            .bind(to_i64(end.usage.input_tokens))
            .bind(to_i64(end.usage.output_tokens))
            .bind(to_i64(end.usage.total_tokens))
            .bind(chat_id.to_string())
            .execute(&mut *tx)
            .await?;
            append_messages(&mut tx, chat_id, run_id, &end.messages, now).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn get_run(&self, id: Uuid) -> StoreFuture<'_, Option<Run>> {
        Box::pin(async move {
            let row = sqlx::query(concat!(
                "SELECT ",
                run_columns!(),
                " FROM agent_chat_runs WHERE id = ?"
            ))
            .bind(id.to_string())
            .fetch_optional(&self.readers)
            .await?;
            row.as_ref().map(run_from).transpose()
        })
    }

    fn runs(&self, chat_id: Uuid) -> StoreFuture<'_, Vec<Run>> {
        Box::pin(async move {
            let rows = sqlx::query(concat!(
                "SELECT ",
                run_columns!(),
                " FROM agent_chat_runs WHERE chat_id = ? ORDER BY created_at, rowid"
            ))
            .bind(chat_id.to_string())
            .fetch_all(&self.readers)
            .await?;
            rows.iter().map(run_from).collect()
        })
    }

    fn heartbeat<'a>(&'a self, runs: &'a [Uuid]) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            if runs.is_empty() {
                return Ok(0);
            }
            let ids: Vec<String> = runs.iter().map(Uuid::to_string).collect();
            let updated = sqlx::query(
                "UPDATE agent_chat_runs SET heartbeat_at = ? \
                 WHERE status = 'running' AND id IN (SELECT value FROM json_each(?))",
            )
            .bind(now_ms())
            .bind(serde_json::to_string(&ids).expect("strings serialize"))
            .execute(&self.writer)
            .await?;
            Ok(updated.rows_affected())
        })
    }

    fn interrupt_stale(&self, lease: Duration) -> StoreFuture<'_, Vec<Uuid>> {
        Box::pin(async move {
            let now = now_ms();
            let cutoff = now - i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
            let ids: Vec<String> = sqlx::query_scalar(
                "UPDATE agent_chat_runs SET status = 'interrupted', error = ?, finished_at = ? \
                 WHERE status = 'running' AND heartbeat_at < ? RETURNING id",
            )
            .bind(STALE_RUN_ERROR)
            .bind(now)
            .bind(cutoff)
            .fetch_all(&self.writer)
            .await?;
            ids.iter()
                .map(|id| Uuid::parse_str(id).map_err(|e| StoreError::Corrupt(e.to_string())))
                .collect()
        })
    }

    fn close(&self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            self.readers.close().await;
            self.writer.close().await;
            self.stop_checkpoints.cancel();
            if let Some(task) = self.checkpoints.lock().await.take() {
                let _ = task.await;
            }
        })
    }
}
