//! Run ends, committed together when they arrive together.
//!
//! A run's end is a transaction of its own: its row, its messages, its chat's totals. When thousands of clients leave
//! together (a burst's answers ending at once, a network blip past `DETACH_GRACE`), their runs end together, and on
//! PostgreSQL each end took a pooled connection, a round trip and a commit: about 2,100 a second on a 2-core box, every
//! connection of the pool taken by them for seconds. Here the ends waiting when a connection is free are committed
//! together: on PostgreSQL in one call of `agent_finish_runs` (see its migration) for up to 16, several such calls at
//! once on as many connections; on SQLite one after another on its one writer, taken once for them all. An end alone
//! is a batch of one, as before.
//!
//! Nothing about an end changes: each is answered as if alone ([`StoreError::Fenced`] for a run no longer held under
//! its epoch). A call that fails leaves nothing (its transaction rolls back), and its ends are made again one by one,
//! so only an end the store refuses fails. The connection is waited for patiently ([`Db::ender`]): no client can be
//! told to retry an end.

use std::time::Instant;

use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::db::{Arg, Conn, Db};
use super::runs::end_args;
use super::{RunEnd, StoreError, like, queued};
use crate::model::Message;

/// The most ends committed in one call.
const MAX_BATCH: usize = 16;

/// An end waiting for its turn.
#[derive(Debug)]
struct Pending {
    run_id: Uuid,
    epoch: u64,
    end: RunEnd,
    queued: Instant,
    answer: oneshot::Sender<Result<(), StoreError>>,
}

/// Where run ends queue for a connection; cheap to clone. The task committing them ends when the last clone is
/// dropped.
#[derive(Debug, Clone)]
pub(super) struct Ends(mpsc::UnboundedSender<Pending>);

impl Ends {
    /// Starts committing the ends queued here, on `db`'s connections for them ([`Db::ender`]).
    pub fn spawn(db: Db) -> Self {
        let (queue, queued) = mpsc::unbounded_channel();
        tokio::spawn(commit_ends(db, queued));
        Self(queue)
    }

    /// Ends run `run_id`, held under `epoch`, as `end` says, once the end is committed.
    pub async fn end(&self, run_id: Uuid, epoch: u64, end: &RunEnd) -> Result<(), StoreError> {
        queued(&self.0, |answer| Pending {
            run_id,
            epoch,
            end: end.clone(),
            queued: Instant::now(),
            answer,
        })
        .await
    }
}

/// Commits what is queued, a batch at a time, until every [`Ends`] is dropped.
async fn commit_ends(db: Db, mut queued: mpsc::UnboundedReceiver<Pending>) {
    while let Some(first) = queued.recv().await {
        let conn = db.ender().await;
        // The ends that queued while the connection was waited for go with the first.
        let mut batch = vec![first];
        let limit = if conn.is_ok() { MAX_BATCH } else { usize::MAX };
        while batch.len() < limit {
            match queued.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        match conn {
            Ok(conn) => {
                for pending in &batch {
                    db.waits().waited(pending.queued);
                }
                // On its own task, so that the next batch can take another connection meanwhile (PostgreSQL).
                tokio::spawn(commit_batch(conn, batch));
            }
            // The store is unreachable (or every connection stayed taken past the patient wait): every end waiting
            // finds it so, rather than each batch wait as long again.
            Err(error) => {
                for pending in batch {
                    db.waits().gave_up(pending.queued);
                    let _ = pending.answer.send(Err(like(&error)));
                }
            }
        }
    }
}

/// Commits `batch` on `conn` and answers each end.
async fn commit_batch(mut conn: Conn, batch: Vec<Pending>) {
    if conn.is_postgres() {
        let ends: Vec<(Uuid, u64, &RunEnd)> = batch
            .iter()
            .map(|pending| (pending.run_id, pending.epoch, &pending.end))
            .collect();
        let answers = finish_runs_postgres(&mut conn, &ends).await;
        let answers = match answers {
            Ok(answers) => answers,
            Err(error) if error.is_unavailable() || ends.len() == 1 => {
                ends.iter().map(|_| Err(like(&error))).collect()
            }
            // Nothing of the call is kept: each end alone, so that only one the store refuses fails.
            Err(_) => {
                let mut answers = Vec::with_capacity(ends.len());
                for end in &ends {
                    let alone = finish_runs_postgres(&mut conn, std::slice::from_ref(end)).await;
                    answers.push(alone.and_then(|mut answer| answer.pop().expect("one answer")));
                }
                answers
            }
        };
        for (pending, answer) in batch.into_iter().zip(answers) {
            let _ = pending.answer.send(answer);
        }
        return;
    }
    let mut batch = batch.into_iter();
    while let Some(pending) = batch.next() {
        let ended = finish_run_sqlite(&mut conn, pending.run_id, pending.epoch, &pending.end).await;
        // The writer is busy past its timeout (another process holds the lock) or gone: the ends left find it so,
        // rather than each wait as long again.
        if let Err(error) = &ended
            && error.is_unavailable()
        {
            for left in batch.by_ref() {
                let _ = left.answer.send(Err(like(error)));
            }
        }
        let _ = pending.answer.send(ended);
    }
}

/// One end as `agent_finish_runs` reads it (see its migration).
#[derive(serde::Serialize)]
struct PgEnd<'a> {
    run: Uuid,
    epoch: u64,
    status: &'a str,
    error: Option<&'a str>,
    output: &'a str,
    input_tokens: u64,
    output_tokens: u64,
    total_tokens: u64,
    messages: &'a [Message],
}

/// The PostgreSQL ends `ends` on `conn` (a pooled connection, or a transaction the caller rolls back): one call of
/// `agent_finish_runs`, one round trip and, on a pooled connection, one commit. Each end's answer; when the call
/// fails, nothing of it is kept.
pub(super) async fn finish_runs_postgres(
    conn: &mut Conn,
    ends: &[(Uuid, u64, &RunEnd)],
) -> Result<Vec<Result<(), StoreError>>, StoreError> {
    let json: Vec<PgEnd<'_>> = ends
        .iter()
        .map(|&(run, epoch, end)| PgEnd {
            run,
            epoch,
            status: end.status.as_str(),
            error: end.error.as_deref(),
            output: &end.output,
            input_tokens: end.usage.input_tokens,
            output_tokens: end.usage.output_tokens,
            total_tokens: end.usage.total_tokens,
            messages: &end.messages,
        })
        .collect();
    let json = serde_json::to_string(&json)
        .map_err(|e| StoreError::Corrupt(format!("run ends do not serialize: {e}")))?;
    let rows = conn
        .fetch_all(
            "SELECT place::BIGINT AS place, ended FROM agent_finish_runs($1::jsonb)",
            &[Arg::Text(&json)],
        )
        .await?;
    let mut answers: Vec<Result<(), StoreError>> = ends
        .iter()
        .map(|_| Err(StoreError::Corrupt("a run end with no answer".to_owned())))
        .collect();
    for row in &rows {
        let place = usize::try_from(row.get::<i64>("place")?)
            .ok()
            .filter(|&place| place < ends.len())
            .ok_or_else(|| StoreError::Corrupt("a run end answered out of place".to_owned()))?;
        answers[place] = if row.get::<bool>("ended")? {
            Ok(())
        } else {
            Err(StoreError::Fenced(ends[place].0))
        };
    }
    Ok(answers)
}

/// The SQLite end of run `run_id` on `conn` (the writer): one script with its transaction, one trip to the writer's
/// thread (not one per statement, the writer held while this task waits its turn between them). Each statement goes
/// on only if the one before it changed its row: a run no longer held here (`Fenced`) changes nothing, and its empty
/// transaction commits. The messages go as a JSON array of their JSON texts, stored as they are, in order after the
/// chat's last.
async fn finish_run_sqlite(
    conn: &mut Conn,
    run_id: Uuid,
    epoch: u64,
    end: &RunEnd,
) -> Result<(), StoreError> {
    let texts = end
        .messages
        .iter()
        .map(serde_json::to_string)
        .collect::<Result<Vec<String>, _>>()
        .and_then(|texts| serde_json::to_string(&texts))
        .map_err(|e| StoreError::Corrupt(format!("messages do not serialize: {e}")))?;
    let mut args = end_args(run_id, epoch, end);
    args.push(Arg::Text(&texts));
    let ran = conn
        .script(
            "BEGIN IMMEDIATE; \
             UPDATE agent_chat_runs SET status = $3, error = $4, partial_output = $5, input_tokens = $6, \
             output_tokens = $7, total_tokens = $8, finished_at = {now} \
             WHERE id = $1 AND epoch = $2 AND status = 'running' RETURNING chat_id; \
             UPDATE agent_chats SET updated_at = {now}, total_input_tokens = total_input_tokens + $6, \
             total_output_tokens = total_output_tokens + $7, total_tokens = total_tokens + $8 \
             WHERE id = (SELECT chat_id FROM agent_chat_runs WHERE id = $1) AND changes() = 1; \
             INSERT INTO agent_chat_messages (chat_id, message_index, message, run_id, created_at) \
             SELECT c.id, n.next + m.key, m.value, $1, {now} FROM agent_chats c, \
             (SELECT COALESCE(MAX(message_index) + 1, 0) AS next FROM agent_chat_messages \
             WHERE chat_id = (SELECT chat_id FROM agent_chat_runs WHERE id = $1)) n, json_each($9) m \
             WHERE c.id = (SELECT chat_id FROM agent_chat_runs WHERE id = $1) AND changes() = 1 \
             ORDER BY m.key; \
             COMMIT",
            &args,
        )
        .await;
    let rows = match ran {
        Ok(rows) => rows,
        Err(error) => {
            // A statement that failed leaves its transaction open on the connection (which is closed rather than
            // given back): roll it back, so the next ends can be made on it. Nothing to roll back is no harm.
            let _ = conn.execute("ROLLBACK", &[]).await;
            return Err(error);
        }
    };
    if rows.is_empty() {
        return Err(StoreError::Fenced(run_id));
    }
    Ok(())
}
