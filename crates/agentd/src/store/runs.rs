//! Runs and their leases: every query once, for both backends.

use std::time::Duration;

use uuid::Uuid;

use super::chats::append_messages;
use super::db::{Arg, Row};
use super::{NewRun, Run, RunEnd, STALE_RUN_ERROR, SessionStore, StoreError, to_i64, usage_from};
use crate::model::Message;

fn run_from(row: &Row) -> Result<Run, StoreError> {
    let status: String = row.get("status")?;
    Ok(Run {
        id: row.uuid("id")?,
        chat_id: row.uuid("chat_id")?,
        model: row.get("model")?,
        status: status.parse()?,
        error: row.get("error")?,
        usage: usage_from(
            row.get("input_tokens")?,
            row.get("output_tokens")?,
            row.get("total_tokens")?,
        ),
        output: row.get("partial_output")?,
        owner_instance: row.get("owner_instance")?,
        created_at: row.time("created_at")?,
        finished_at: row.opt_time("finished_at")?,
    })
}

impl SessionStore {
    /// Stores the run as `running` and its prompt as the chat's next message, in one transaction.
    pub async fn start_run(&self, run: &NewRun) -> Result<(), StoreError> {
        let mut tx = self.db.begin().await?;
        let chat = tx
            .execute(
                "UPDATE agent_chats SET updated_at = {now}, initial_message = COALESCE(initial_message, $1) \
                 WHERE id = $2",
                &[Arg::Text(&run.prompt), Arg::Id(run.chat_id)],
            )
            .await?;
        if chat == 0 {
            return Err(StoreError::ChatNotFound(run.chat_id));
        }
        // The chat row is locked by the update above, so two starts cannot both see the chat idle.
        let going = tx
            .fetch_optional(
                "SELECT id FROM agent_chat_runs WHERE chat_id = $1 AND status = 'running' LIMIT 1",
                &[Arg::Id(run.chat_id)],
            )
            .await?;
        if let Some(going) = going {
            return Err(StoreError::ChatBusy(going.uuid("id")?));
        }
        tx.execute(
            "INSERT INTO agent_chat_runs (id, chat_id, model, status, owner_instance, heartbeat_at, created_at) \
             VALUES ($1, $2, $3, 'running', $4, {now}, {now})",
            &[
                Arg::Id(run.id),
                Arg::Id(run.chat_id),
                Arg::Text(&run.model),
                Arg::Text(&run.owner_instance),
            ],
        )
        .await?;
        let prompt = Message::User {
            content: run.prompt.clone(),
        };
        append_messages(&mut tx, run.chat_id, run.id, &[prompt]).await?;
        if let Some(first) = &run.first_event {
            tx.execute(
                "INSERT INTO agent_run_events (run_id, seq, last_seq, events) VALUES ($1, 1, 1, $2)",
                &[Arg::Id(run.id), Arg::Text(first)],
            )
            .await?;
        }
        tx.commit().await
    }

    /// Saves the answer so far of a running run.
    pub async fn save_partial(&self, run_id: Uuid, output: &str) -> Result<(), StoreError> {
        self.db
            .write()
            .await?
            .execute(
                "UPDATE agent_chat_runs SET partial_output = $1 WHERE id = $2",
                &[Arg::Text(output), Arg::Id(run_id)],
            )
            .await?;
        Ok(())
    }

    /// Records how the run ended, its messages, and adds its usage to the chat's totals, in one transaction.
    pub async fn finish_run(&self, run_id: Uuid, end: &RunEnd) -> Result<(), StoreError> {
        let (input, output, total) = (
            to_i64(end.usage.input_tokens),
            to_i64(end.usage.output_tokens),
            to_i64(end.usage.total_tokens),
        );
        let mut tx = self.db.begin().await?;
        let row = tx
            .fetch_optional(
                "UPDATE agent_chat_runs SET status = $1, error = $2, partial_output = $3, input_tokens = $4, \
                 output_tokens = $5, total_tokens = $6, finished_at = {now} WHERE id = $7 RETURNING chat_id",
                &[
                    Arg::Text(end.status.as_str()),
                    Arg::OptText(end.error.as_deref()),
                    Arg::Text(&end.output),
                    Arg::Int(input),
                    Arg::Int(output),
                    Arg::Int(total),
                    Arg::Id(run_id),
                ],
            )
            .await?;
        let chat_id = row
            .ok_or(StoreError::RunNotFound(run_id))?
            .uuid("chat_id")?;
        tx.execute(
            "UPDATE agent_chats SET updated_at = {now}, total_input_tokens = total_input_tokens + $1, \
             total_output_tokens = total_output_tokens + $2, total_tokens = total_tokens + $3 WHERE id = $4",
            &[Arg::Int(input), Arg::Int(output), Arg::Int(total), Arg::Id(chat_id)],
        )
        .await?;
        append_messages(&mut tx, chat_id, run_id, &end.messages).await?;
        tx.commit().await
    }

    pub async fn get_run(&self, id: Uuid) -> Result<Option<Run>, StoreError> {
        let row = self
            .db
            .read()
            .await?
            .fetch_optional(
                "SELECT id, chat_id, model, status, error, input_tokens, output_tokens, total_tokens, \
                 partial_output, owner_instance, created_at, finished_at FROM agent_chat_runs WHERE id = $1",
                &[Arg::Id(id)],
            )
            .await?;
        row.as_ref().map(run_from).transpose()
    }

    /// Refreshes the heartbeat of these runs (the ones this process is driving); returns how many were running.
    pub async fn heartbeat(&self, runs: &[Uuid]) -> Result<u64, StoreError> {
        if runs.is_empty() {
            return Ok(0);
        }
        self.db
            .write()
            .await?
            .execute(
                "UPDATE agent_chat_runs SET heartbeat_at = {now} WHERE status = 'running' AND {id_in_list}",
                &[Arg::Ids(runs)],
            )
            .await
    }

    /// Marks `interrupted` every running run whose heartbeat is older than `lease`, keeping its partial answer.
    pub async fn interrupt_stale(&self, lease: Duration) -> Result<Vec<Uuid>, StoreError> {
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        let rows = self
            .db
            .write()
            .await?
            .fetch_all(
                "UPDATE agent_chat_runs SET status = 'interrupted', error = $1, finished_at = {now} \
                 WHERE status = 'running' AND heartbeat_at < {now} - {ms2} RETURNING id",
                &[Arg::Text(STALE_RUN_ERROR), Arg::Int(lease_ms)],
            )
            .await?;
        rows.iter().map(|row| row.uuid("id")).collect()
    }

    /// The chat's run still going, if any.
    pub async fn running_run(&self, chat_id: Uuid) -> Result<Option<Uuid>, StoreError> {
        let row = self
            .db
            .read()
            .await?
            .fetch_optional(
                "SELECT id FROM agent_chat_runs WHERE chat_id = $1 AND status = 'running' \
                 ORDER BY created_at DESC LIMIT 1",
                &[Arg::Id(chat_id)],
            )
            .await?;
        row.map(|row| row.uuid("id")).transpose()
    }

    /// Notes that a process other than the producer has followers of these runs now.
    pub async fn touch_followed(&self, runs: &[Uuid]) -> Result<(), StoreError> {
        if runs.is_empty() {
            return Ok(());
        }
        self.db
            .write()
            .await?
            .execute(
                "UPDATE agent_chat_runs SET followed_at = {now} WHERE status = 'running' AND {id_in_list}",
                &[Arg::Ids(runs)],
            )
            .await?;
        Ok(())
    }

    /// Whether another process noted a follower of the run within `within`.
    pub async fn followed_within(
        &self,
        run_id: Uuid,
        within: Duration,
    ) -> Result<bool, StoreError> {
        let ms = i64::try_from(within.as_millis()).unwrap_or(i64::MAX);
        let row = self
            .db
            .read()
            .await?
            .fetch_optional(
                "SELECT id FROM agent_chat_runs WHERE followed_at > {now} - {ms1} AND id = $2",
                &[Arg::Int(ms), Arg::Id(run_id)],
            )
            .await?;
        Ok(row.is_some())
    }
}
