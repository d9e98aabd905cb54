//! Chats and their messages: every query once, for both backends.

use uuid::Uuid;

use super::db::{Arg, Conn};
use super::row::Row;
use super::{Chat, ChatOwner, SessionStore, StoreError, StoredMessage, usage_from};
use crate::model::Usage;

/// The columns [`chat_from`] reads; the status of the chat's newest run comes along.
macro_rules! chat_columns {
    () => {
        "id, org_id, user_id, canvas_id, initial_message, total_input_tokens, total_output_tokens, total_tokens, \
         created_at, updated_at, (SELECT r.status FROM agent_chat_runs r WHERE r.chat_id = agent_chats.id \
         ORDER BY r.created_at DESC, r.{order} DESC LIMIT 1) AS latest_run_status"
    };
}

fn chat_from(row: &Row) -> Result<Chat, StoreError> {
    Ok(Chat {
        id: row.uuid("id")?,
        owner: ChatOwner {
            org_id: row.get("org_id")?,
            user_id: row.get("user_id")?,
            canvas_id: row.get("canvas_id")?,
        },
        initial_message: row.get("initial_message")?,
        totals: usage_from(
            row.get("total_input_tokens")?,
            row.get("total_output_tokens")?,
            row.get("total_tokens")?,
        ),
        created_at: row.time("created_at")?,
        updated_at: row.time("updated_at")?,
        latest_run_status: row
            .get::<Option<String>>("latest_run_status")?
            .map(|s| s.parse())
            .transpose()?,
    })
}

impl SessionStore {
    pub async fn create_chat(&self, owner: &ChatOwner) -> Result<Chat, StoreError> {
        let id = Uuid::new_v4();
        self.insert_chat(id, owner)
            .await?
            .ok_or(StoreError::ChatNotFound(id))
    }

    /// Inserts the chat unless its id exists; the new chat, or `None` when it existed.
    async fn insert_chat(&self, id: Uuid, owner: &ChatOwner) -> Result<Option<Chat>, StoreError> {
        insert_chat_on(&mut self.0.db.write().await?, id, owner).await
    }

    pub async fn get_chat(&self, id: Uuid) -> Result<Option<Chat>, StoreError> {
        let row = self
            .0
            .db
            .read()
            .await?
            .fetch_optional(
                concat!(
                    "SELECT ",
                    chat_columns!(),
                    " FROM agent_chats WHERE id = $1"
                ),
                &[Arg::Id(id)],
            )
            .await?;
        row.as_ref().map(chat_from).transpose()
    }

    /// The owner's chats, newest first.
    pub async fn list_chats(&self, owner: &ChatOwner) -> Result<Vec<Chat>, StoreError> {
        let rows = self
            .0
            .db
            .read()
            .await?
            .fetch_all(
                concat!(
                    "SELECT ",
                    chat_columns!(),
                    " FROM agent_chats WHERE org_id = $1 AND user_id = $2 AND canvas_id = $3 \
                     ORDER BY created_at DESC, {order} DESC"
                ),
                &[
                    Arg::Text(&owner.org_id),
                    Arg::Text(&owner.user_id),
                    Arg::Text(&owner.canvas_id),
                ],
            )
            .await?;
        rows.iter().map(chat_from).collect()
    }

    /// Token usage summed over every chat of the organisation (zeros when it has none).
    pub async fn org_usage(&self, org_id: &str) -> Result<Usage, StoreError> {
        let row = self
            .0
            .db
            .read()
            .await?
            .fetch_one(
                "SELECT CAST(COALESCE(SUM(total_input_tokens), 0) AS BIGINT) AS input, \
                 CAST(COALESCE(SUM(total_output_tokens), 0) AS BIGINT) AS output, \
                 CAST(COALESCE(SUM(total_tokens), 0) AS BIGINT) AS total FROM agent_chats WHERE org_id = $1",
                &[Arg::Text(org_id)],
            )
            .await?;
        Ok(usage_from(
            row.get("input")?,
            row.get("output")?,
            row.get("total")?,
        ))
    }

    /// Deletes the chat with its messages and runs; false when there was none. Its runs are locked before it, as
    /// every transaction locks runs before chats (see the module `store`), so that a run of it ending meanwhile does
    /// not wait for the delete while the delete waits for it.
    pub async fn delete_chat(&self, id: Uuid) -> Result<bool, StoreError> {
        let deleted = self
            .0
            .db
            .write()
            .await?
            .execute(
                "WITH runs AS (SELECT id FROM agent_chat_runs WHERE chat_id = $1 ORDER BY id {for_update}) \
                 DELETE FROM agent_chats WHERE id = $1 AND (SELECT count(*) FROM runs) >= 0",
                &[Arg::Id(id)],
            )
            .await?;
        Ok(deleted > 0)
    }

    /// The chat's messages in order.
    pub async fn messages(&self, chat_id: Uuid) -> Result<Vec<StoredMessage>, StoreError> {
        let rows = self
            .0
            .db
            .read()
            .await?
            .fetch_all(MESSAGES, &[Arg::Id(chat_id)])
            .await?;
        rows.iter()
            .map(|row| {
                Ok(StoredMessage {
                    index: row.get("message_index")?,
                    message: row.message("message")?,
                    run_id: row.opt_uuid("run_id")?,
                    created_at: row.time("created_at")?,
                })
            })
            .collect()
    }
}

/// The chat's messages in order, with their index, run and time.
const MESSAGES: &str = "SELECT CAST(message_index AS BIGINT) AS message_index, message, run_id, created_at \
                        FROM agent_chat_messages WHERE chat_id = $1 ORDER BY message_index";

/// Inserts the chat on `conn` unless its id exists; the new chat, or `None` when it existed.
pub(super) async fn insert_chat_on(
    conn: &mut Conn,
    id: Uuid,
    owner: &ChatOwner,
) -> Result<Option<Chat>, StoreError> {
    let row = conn
        .fetch_optional(
            "INSERT INTO agent_chats (id, org_id, user_id, canvas_id, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, {now}, {now}) ON CONFLICT (id) DO NOTHING RETURNING created_at",
            &[
                Arg::Id(id),
                Arg::Text(&owner.org_id),
                Arg::Text(&owner.user_id),
                Arg::Text(&owner.canvas_id),
            ],
        )
        .await?;
    row.map(|row| Ok(Chat::new(id, owner.clone(), row.time("created_at")?)))
        .transpose()
}
