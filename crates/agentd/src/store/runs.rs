//! Runs and their leases: every query once, for both backends.

use std::time::Duration;

use uuid::Uuid;

use super::db::Arg;
use super::row::Row;
use super::{
    ChatOwner, NewRun, Run, RunEnd, STALE_RUN_ERROR, SessionStore, StoreError, to_i64, to_ms,
    usage_from,
};
use crate::model::Message;

/// `running`, for the statements that find runs by their key. Bound, not written in the statement: PostgreSQL plans
/// each statement once per connection for any parameters, as a replica starts, maybe on a store with no run running;
/// a statement saying `status = 'running'` could then be planned to read every running run through the index of the
/// running runs (its predicate is the statement's), and kept that plan however many ran later (see the migration
/// `run_ends_read_their_row`).
const RUNNING: Arg<'static> = Arg::Text("running");

/// The most runs whose heartbeat one statement refreshes. One statement for all of them, with 10,000 running,
/// took 0.7 s on PostgreSQL, and every run ending meanwhile waited for it (the store's connections with them, until
/// other runs' ends gave up waiting for one). Since it updates the runs it locks by key, such a statement takes 0.1 to
/// 0.25 s alone (planned on a full or an empty store), 500 runs 8 to 28 ms.
const HEARTBEATS_AT_ONCE: usize = 500;

/// The columns [`run_from`] reads.
macro_rules! run_columns {
    () => {
        "id, chat_id, model, status, error, input_tokens, output_tokens, total_tokens, partial_output, \
         owner_instance, epoch, agent_context, created_at, finished_at"
    };
}

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
        epoch: u64::try_from(row.get::<i64>("epoch")?).unwrap_or(0),
        agent_context: row.get("agent_context")?,
        created_at: row.time("created_at")?,
        finished_at: row.opt_time("finished_at")?,
    })
}

/// A run's id and epoch, as a claim or a stop returns them.
fn id_and_epoch(row: &Row) -> Result<(Uuid, u64), StoreError> {
    Ok((
        row.uuid("id")?,
        u64::try_from(row.get::<i64>("epoch")?).unwrap_or(0),
    ))
}

/// The run, its epoch and how it ended: `$1` to `$8` of both backends' statements that end a run.
pub(super) fn end_args(run_id: Uuid, epoch: u64, end: &RunEnd) -> Vec<Arg<'_>> {
    vec![
        Arg::Id(run_id),
        Arg::Int(to_i64(epoch)),
        Arg::Text(end.status.as_str()),
        Arg::OptText(end.error.as_deref()),
        Arg::Text(&end.output),
        Arg::Int(to_i64(end.usage.input_tokens)),
        Arg::Int(to_i64(end.usage.output_tokens)),
        Arg::Int(to_i64(end.usage.total_tokens)),
    ]
}

impl SessionStore {
    /// Stores the run as `running` and its prompt as the chat's next message, in one transaction; returns the chat's
    /// messages before the prompt (the history the run goes on from), read under the same lock.
    ///
    /// The starts waiting for a connection at the same moment are committed together, each answered as if alone
    /// (`starts.rs`): on PostgreSQL in one call of `agent_start_runs` (one round trip, the same statements as SQLite's:
    /// see its migration), on SQLite in scripts of its statements, each one trip to its writer's thread.
    pub async fn start_run(&self, run: &NewRun) -> Result<Vec<Message>, StoreError> {
        self.0.starts.start(run.clone(), false).await
    }

    /// [`Self::start_run`], making first the chat (of `run.owner`) if none has its id, as dev mode does for a stream to
    /// a chat nobody made, in the start's own transaction.
    pub async fn start_run_making_its_chat(
        &self,
        run: &NewRun,
    ) -> Result<Vec<Message>, StoreError> {
        self.0.starts.start(run.clone(), true).await
    }

    /// Saves the answer so far of a running run.
    pub async fn save_partial(&self, run_id: Uuid, output: &str) -> Result<(), StoreError> {
        self.0
            .db
            .write()
            .await?
            .execute(
                "UPDATE agent_chat_runs SET partial_output = $1 WHERE id = $2",
                &[Arg::Text(output), Arg::Id(run_id)],
            )
            .await?;
        Ok(())
    }

    /// Records how the run ended, its messages, and adds its usage to the chat's totals, in one transaction; refused
    /// ([`StoreError::Fenced`]) unless the run is still running under `epoch`.
    ///
    /// The ends waiting for a connection at the same moment are committed together, each answered as if alone
    /// (`ends.rs`): on PostgreSQL in one call of `agent_finish_runs`, on SQLite in scripts on its writer.
    pub async fn finish_run(
        &self,
        run_id: Uuid,
        epoch: u64,
        end: &RunEnd,
    ) -> Result<(), StoreError> {
        self.0.ends.end(run_id, epoch, end).await
    }

    pub async fn get_run(&self, id: Uuid) -> Result<Option<Run>, StoreError> {
        let row = self
            .0
            .db
            .read()
            .await?
            .fetch_optional(
                concat!(
                    "SELECT ",
                    run_columns!(),
                    " FROM agent_chat_runs WHERE id = $1"
                ),
                &[Arg::Id(id)],
            )
            .await?;
        row.as_ref().map(run_from).transpose()
    }

    /// What following or stopping a run looks up first, in one query: the owner of chat `chat_id` (`None`: no such
    /// chat) and, when run `run_id` is of that chat, the run and the seq of its last stored event.
    pub async fn chat_run(
        &self,
        chat_id: Uuid,
        run_id: Uuid,
    ) -> Result<Option<(ChatOwner, Option<(Run, u64)>)>, StoreError> {
        let row = self
            .0
            .db
            .read()
            .await?
            .fetch_optional(
                concat!(
                    "SELECT c.org_id, c.user_id, c.canvas_id, r.*, ",
                    last_seq_of!("r.id"),
                    " AS last FROM agent_chats c LEFT JOIN (SELECT ",
                    run_columns!(),
                    " FROM agent_chat_runs WHERE id = $2) r ON r.chat_id = c.id WHERE c.id = $1"
                ),
                &[Arg::Id(chat_id), Arg::Id(run_id)],
            )
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let owner = ChatOwner {
            org_id: row.get("org_id")?,
            user_id: row.get("user_id")?,
            canvas_id: row.get("canvas_id")?,
        };
        let run = match row.opt_uuid("id")? {
            Some(_) => Some((
                run_from(&row)?,
                u64::try_from(row.get::<i64>("last")?).unwrap_or(0),
            )),
            None => None,
        };
        Ok(Some((owner, run)))
    }

    /// Refreshes the heartbeat of these runs (the ones `owner` is driving); returns the ones it still holds: a run
    /// missing from the answer was claimed by another process or ended, and its producer here must stop.
    ///
    /// The runs are refreshed `HEARTBEATS_AT_ONCE` to a statement, each its own transaction: a statement holds the
    /// row of every run it refreshed until it commits, and a run that ends meanwhile waits for it to store its end.
    pub async fn heartbeat(&self, owner: &str, runs: &[Uuid]) -> Result<Vec<Uuid>, StoreError> {
        if runs.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.0.db.write().await?;
        let mut held = Vec::with_capacity(runs.len());
        for some in runs.chunks(HEARTBEATS_AT_ONCE) {
            let rows = conn
                .fetch_all(
                    "UPDATE agent_chat_runs SET heartbeat_at = {now} FROM (SELECT id AS held FROM agent_chat_runs \
                     WHERE status = $3 AND {id_in_list} AND owner_instance = $2 ORDER BY id {for_no_key_update}) \
                     AS locked WHERE id = locked.held RETURNING id",
                    &[Arg::Ids(some), Arg::Text(owner), RUNNING],
                )
                .await?;
            for row in &rows {
                held.push(row.uuid("id")?);
            }
        }
        Ok(held)
    }

    /// Claims for `owner` those of `runs` that are running and whose producer is gone (released, or its heartbeat
    /// older than `lease`): raises each one's epoch, so its old producer can write nothing more. Exactly one claimer
    /// wins a run; returns the runs won, with their new epoch.
    pub async fn claim(
        &self,
        runs: &[Uuid],
        lease: Duration,
        owner: &str,
    ) -> Result<Vec<(Uuid, u64)>, StoreError> {
        if runs.is_empty() {
            return Ok(Vec::new());
        }
        let lease_ms = to_ms(lease);
        // The row lock waits for any append in flight under the old epoch, which the raised epoch then refuses.
        let rows = self
            .0
            .db
            .write()
            .await?
            .fetch_all(
                "UPDATE agent_chat_runs SET owner_instance = $3, epoch = epoch + 1, heartbeat_at = {now} \
                 FROM (SELECT id AS won FROM agent_chat_runs WHERE status = $4 AND {id_in_list} \
                 AND (owner_instance = '' OR heartbeat_at < {now} - {ms2}) ORDER BY id {for_update}) AS locked \
                 WHERE id = locked.won RETURNING id, epoch",
                &[Arg::Ids(runs), Arg::Int(lease_ms), Arg::Text(owner), RUNNING],
            )
            .await?;
        rows.iter().map(id_and_epoch).collect()
    }

    /// Lets go of a run held under `epoch` (its process is draining in handoff mode): it has no owner until a replica
    /// with a follower claims it, and its epoch is raised; the replicas are told, so one that follows it claims it at
    /// once (PostgreSQL, as the release commits). Returns whether the run was still held. The releases waiting at the
    /// same moment (every run of the process, at its shutdown deadline) are committed together (`ends.rs`).
    pub async fn release(&self, run_id: Uuid, epoch: u64) -> Result<bool, StoreError> {
        self.0.ends.release(run_id, epoch).await
    }

    /// Marks `interrupted` every running run whose producer is gone (heartbeat older than `lease`, or released that
    /// long ago) and that no replica has followed within `lease`, keeping its partial answer; raises its epoch.
    /// Returns the runs, with their new epoch.
    pub async fn interrupt_stale(&self, lease: Duration) -> Result<Vec<(Uuid, u64)>, StoreError> {
        let lease_ms = to_ms(lease);
        let rows = self
            .0
            .db
            .write()
            .await?
            .fetch_all(
                "UPDATE agent_chat_runs SET status = 'interrupted', error = $1, finished_at = {now}, \
                 epoch = epoch + 1 FROM (SELECT id AS stale FROM agent_chat_runs WHERE status = 'running' \
                 AND heartbeat_at < {now} - {ms2} AND (followed_at IS NULL OR followed_at < {now} - {ms2}) \
                 ORDER BY id {for_no_key_update}) AS locked WHERE id = locked.stale RETURNING id, epoch",
                &[Arg::Text(STALE_RUN_ERROR), Arg::Int(lease_ms)],
            )
            .await?;
        rows.iter().map(id_and_epoch).collect()
    }

    /// The chat's run still going, if any.
    pub async fn running_run(&self, chat_id: Uuid) -> Result<Option<Uuid>, StoreError> {
        let row = self
            .0
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

    /// Notes that a follower in this process, not the producer's, attaches to run `run_id`: from then on its group
    /// commits carry the run's events in their notifications (PostgreSQL), where until then they carried only the
    /// seqs stored. The run is locked for update, so the note waits for the group commits in flight for it (they hold
    /// it key-share-locked, and did not see the note): what they store the follower reads from the store, once this
    /// returns; every later commit waits for the note and sees it. Once the run is noted, a note only refreshes the
    /// time (as [`Self::touch_followed`] does), and waits for no commit.
    pub async fn follow_elsewhere(&self, run_id: Uuid) -> Result<(), StoreError> {
        if !self.0.db.is_postgres() {
            return self.touch_followed(&[run_id]).await;
        }
        self.0
            .db
            .write()
            .await?
            .execute(
                "WITH locked AS (SELECT id FROM agent_chat_runs WHERE id = $1 AND status = $2 \
                 AND followed_at IS NULL FOR UPDATE) \
                 UPDATE agent_chat_runs SET followed_at = now() WHERE id = $1 AND status = $2 \
                 AND (SELECT count(*) FROM locked) >= 0",
                &[Arg::Id(run_id), RUNNING],
            )
            .await?;
        Ok(())
    }

    /// Notes that a process other than the producer still has followers of these runs.
    pub async fn touch_followed(&self, runs: &[Uuid]) -> Result<(), StoreError> {
        if runs.is_empty() {
            return Ok(());
        }
        self.0.db
            .write()
            .await?
            .execute(
                "UPDATE agent_chat_runs SET followed_at = {now} FROM (SELECT id AS followed FROM agent_chat_runs \
                 WHERE status = $2 AND {id_in_list} ORDER BY id {for_no_key_update}) AS locked \
                 WHERE id = locked.followed",
                &[Arg::Ids(runs), RUNNING],
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
        let ms = to_ms(within);
        let row = self
            .0
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
