//! The shared store: PostgreSQL through a connection pool, for several replicas. Times come from the database's
//! clock (`now()`), so replicas with skewed clocks still agree on which heartbeats are stale.

use std::time::Duration;

use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::types::Json;
use uuid::Uuid;

use super::{
    Chat, ChatOwner, NewRun, Run, RunEnd, STALE_RUN_ERROR, SessionStore, StoreError, StoreFuture,
    StoredMessage, to_i64, usage_from,
};
use crate::model::{Message, Usage};

/// How long a request waits for a connection before the store counts as unavailable.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
const MAX_CONNECTIONS: u32 = 16;

/// The columns `chat_from` reads (a macro, so queries stay string literals).
macro_rules! chat_columns {
    () => {
        "id, org_id, user_id, canvas_id, initial_message, total_input_tokens, total_output_tokens, total_tokens, \
         created_at, updated_at, (SELECT r.status FROM agent_chat_runs r WHERE r.chat_id = agent_chats.id \
         ORDER BY r.created_at DESC, r.id DESC LIMIT 1) AS latest_run_status"
    };
}

/// The columns `run_from` reads.
macro_rules! run_columns {
    () => {
        "id, chat_id, model, status, error, input_tokens, output_tokens, total_tokens, partial_output, \
         owner_instance, created_at, finished_at"
    };
}

#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    pub async fn open(options: PgConnectOptions) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await?;
        sqlx::migrate!("../../migrations/postgres")
            .run(&pool)
            .await?;
        Ok(Self { pool })
    }
}

fn chat_from(row: &PgRow) -> Result<Chat, StoreError> {
    Ok(Chat {
        id: row.try_get("id")?,
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
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        latest_run_status: row
            .try_get::<Option<String>, _>("latest_run_status")?
            .map(|s| s.parse())
            .transpose()?,
    })
}

fn run_from(row: &PgRow) -> Result<Run, StoreError> {
    let status: String = row.try_get("status")?;
    Ok(Run {
        id: row.try_get("id")?,
        chat_id: row.try_get("chat_id")?,
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
        created_at: row.try_get("created_at")?,
        finished_at: row.try_get("finished_at")?,
    })
}

impl PgStore {
    async fn fetch_chat(&self, id: Uuid) -> Result<Option<Chat>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            chat_columns!(),
            " FROM agent_chats WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(chat_from).transpose()
    }

    /// Inserts the chat unless its id exists; the new chat, or `None` when it existed.
    async fn insert_chat(&self, id: Uuid, owner: &ChatOwner) -> Result<Option<Chat>, StoreError> {
        let created: Option<time::OffsetDateTime> = sqlx::query_scalar(
            "INSERT INTO agent_chats (id, org_id, user_id, canvas_id) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (id) DO NOTHING RETURNING created_at",
        )
        .bind(id)
        .bind(&owner.org_id)
        .bind(&owner.user_id)
        .bind(&owner.canvas_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(created.map(|at| Chat::new(id, owner.clone(), at)))
    }
}

/// Appends `messages` to the chat after its last message, inside the caller's transaction (which already holds the
/// chat row's lock, so no other run of the chat takes the same index).
async fn append_messages(
    tx: &mut sqlx::PgConnection,
    chat_id: Uuid,
    run_id: Uuid,
    messages: &[Message],
) -> Result<(), StoreError> {
    for message in messages {
        sqlx::query(
            "INSERT INTO agent_chat_messages (chat_id, message_index, message, run_id) \
             SELECT $1, COALESCE(MAX(message_index) + 1, 0), $2, $3 FROM agent_chat_messages WHERE chat_id = $1",
        )
        .bind(chat_id)
        .bind(Json(message))
        .bind(run_id)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

impl SessionStore for PgStore {
    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            sqlx::query("SELECT 1").execute(&self.pool).await?;
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
                " FROM agent_chats WHERE org_id = $1 AND user_id = $2 AND canvas_id = $3 \
                 ORDER BY created_at DESC, id DESC"
            ))
            .bind(&owner.org_id)
            .bind(&owner.user_id)
            .bind(&owner.canvas_id)
            .fetch_all(&self.pool)
            .await?;
            rows.iter().map(chat_from).collect()
        })
    }

    fn org_usage<'a>(&'a self, org_id: &'a str) -> StoreFuture<'a, Usage> {
        Box::pin(async move {
            let row = sqlx::query(
                "SELECT COALESCE(SUM(total_input_tokens), 0)::BIGINT AS input, \
                 COALESCE(SUM(total_output_tokens), 0)::BIGINT AS output, COALESCE(SUM(total_tokens), 0)::BIGINT AS total \
                 FROM agent_chats WHERE org_id = $1",
            )
            .bind(org_id)
            .fetch_one(&self.pool)
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
            let deleted = sqlx::query("DELETE FROM agent_chats WHERE id = $1")
                .bind(id)
                .execute(&self.pool)
                .await?;
            Ok(deleted.rows_affected() > 0)
        })
    }

    fn messages(&self, chat_id: Uuid) -> StoreFuture<'_, Vec<StoredMessage>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT message_index, message, run_id, created_at FROM agent_chat_messages \
                 WHERE chat_id = $1 ORDER BY message_index",
            )
            .bind(chat_id)
            .fetch_all(&self.pool)
            .await?;
            rows.iter()
                .map(|row| {
                    let Json(message) = row.try_get("message")?;
                    Ok(StoredMessage {
                        index: i64::from(row.try_get::<i32, _>("message_index")?),
                        message,
                        run_id: row.try_get("run_id")?,
                        created_at: row.try_get("created_at")?,
                    })
                })
                .collect()
        })
    }

    fn start_run<'a>(&'a self, run: &'a NewRun) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut tx = self.pool.begin().await?;
            let chat = sqlx::query(
                "UPDATE agent_chats SET updated_at = now(), initial_message = COALESCE(initial_message, $1) \
                 WHERE id = $2",
            )
            .bind(&run.prompt)
            .bind(run.chat_id)
            .execute(&mut *tx)
            .await?;
            if chat.rows_affected() == 0 {
                return Err(StoreError::ChatNotFound(run.chat_id));
            }
            sqlx::query(
                "INSERT INTO agent_chat_runs (id, chat_id, model, status, owner_instance) \
                 VALUES ($1, $2, $3, 'running', $4)",
            )
            .bind(run.id)
            .bind(run.chat_id)
            .bind(&run.model)
            .bind(&run.owner_instance)
            .execute(&mut *tx)
            .await?;
            let prompt = Message::User {
                content: run.prompt.clone(),
            };
            append_messages(&mut tx, run.chat_id, run.id, &[prompt]).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn save_partial<'a>(&'a self, run_id: Uuid, output: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            sqlx::query("UPDATE agent_chat_runs SET partial_output = $1 WHERE id = $2")
                .bind(output)
                .bind(run_id)
                .execute(&self.pool)
                .await?;
            Ok(())
        })
    }

    fn finish_run<'a>(&'a self, run_id: Uuid, end: &'a RunEnd) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut tx = self.pool.begin().await?;
            let chat_id: Option<Uuid> = sqlx::query_scalar(
                "UPDATE agent_chat_runs SET status = $1, error = $2, partial_output = $3, input_tokens = $4, \
                 output_tokens = $5, total_tokens = $6, finished_at = now() WHERE id = $7 RETURNING chat_id",
            )
            .bind(end.status.as_str())
            .bind(&end.error)
            .bind(&end.output)
            .bind(to_i64(end.usage.input_tokens))
            .bind(to_i64(end.usage.output_tokens))
            .bind(to_i64(end.usage.total_tokens))
            .bind(run_id)
            .fetch_optional(&mut *tx)
            .await?;
            let chat_id = chat_id.ok_or(StoreError::RunNotFound(run_id))?;
            sqlx::query(
                "UPDATE agent_chats SET updated_at = now(), total_input_tokens = total_input_tokens + $1, \
                 total_output_tokens = total_output_tokens + $2, total_tokens = total_tokens + $3 WHERE id = $4",
            )
            .bind(to_i64(end.usage.input_tokens))
            .bind(to_i64(end.usage.output_tokens))
            .bind(to_i64(end.usage.total_tokens))
            .bind(chat_id)
            .execute(&mut *tx)
            .await?;
            append_messages(&mut tx, chat_id, run_id, &end.messages).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn get_run(&self, id: Uuid) -> StoreFuture<'_, Option<Run>> {
        Box::pin(async move {
            let row = sqlx::query(concat!(
                "SELECT ",
                run_columns!(),
                " FROM agent_chat_runs WHERE id = $1"
            ))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
            row.as_ref().map(run_from).transpose()
        })
    }

    fn runs(&self, chat_id: Uuid) -> StoreFuture<'_, Vec<Run>> {
        Box::pin(async move {
            let rows = sqlx::query(concat!(
                "SELECT ",
                run_columns!(),
                " FROM agent_chat_runs WHERE chat_id = $1 ORDER BY created_at, id"
            ))
            .bind(chat_id)
            .fetch_all(&self.pool)
            .await?;
            rows.iter().map(run_from).collect()
        })
    }

    fn heartbeat<'a>(&'a self, runs: &'a [Uuid]) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            if runs.is_empty() {
                return Ok(0);
            }
            let updated = sqlx::query(
                "UPDATE agent_chat_runs SET heartbeat_at = now() WHERE status = 'running' AND id = ANY($1)",
            )
            .bind(runs)
            .execute(&self.pool)
            .await?;
            Ok(updated.rows_affected())
        })
    }

    fn interrupt_stale(&self, lease: Duration) -> StoreFuture<'_, Vec<Uuid>> {
        Box::pin(async move {
            let ids = sqlx::query_scalar(
                "UPDATE agent_chat_runs SET status = 'interrupted', error = $1, finished_at = now() \
                 WHERE status = 'running' AND heartbeat_at < now() - make_interval(secs => $2) RETURNING id",
            )
            .bind(STALE_RUN_ERROR)
            .bind(lease.as_secs_f64())
            .fetch_all(&self.pool)
            .await?;
            Ok(ids)
        })
    }

    fn close(&self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(self.pool.close())
    }
}
