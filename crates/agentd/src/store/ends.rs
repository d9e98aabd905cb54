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
//!
//! Releases go the same way: at the shutdown deadline of a replica draining in handoff mode, every run it drives is
//! released at once (its epoch raised, no owner) and announced, so that a replica following it continues it. Each was
//! a commit and its announcement another; on PostgreSQL the releases waiting at the same moment now go in one call of
//! `agent_release_runs` (up to 256), announced with its commit.

use std::time::Instant;

use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::db::{Arg, Conn, Db, Row};
use super::runs::end_args;
use super::{RELEASED_CHANNEL, RunEnd, StoreError, each_alone_if_refused, like, queued};
use super::{json_text, to_i64};
use crate::model::Message;

/// The most ends committed in one call.
const MAX_ENDS: usize = 16;

/// The most releases committed in one call. A release is a few bytes, and they come all at once (every run of a
/// replica at its shutdown deadline); each call's commit announces them, and PostgreSQL commits announcements one at a
/// time, each waiting for the one before to reach the disk: fewer, larger calls.
const MAX_RELEASES: usize = 256;

/// What is asked of a run held under an epoch.
#[derive(Debug)]
enum Ask {
    /// Its end.
    End(RunEnd),
    /// Its release, for another replica to continue it (see [`super::SessionStore::release`]).
    Release,
}

/// An end or a release waiting for its turn; answered [`StoreError::Fenced`] when the run is no longer held under
/// its epoch.
#[derive(Debug)]
struct Pending {
    run_id: Uuid,
    epoch: u64,
    ask: Ask,
    queued: Instant,
    answer: oneshot::Sender<Result<(), StoreError>>,
}

/// Where run ends queue for a connection; cheap to clone. The task committing them ends when the last clone is
/// dropped.
#[derive(Debug, Clone)]
pub(super) struct Ends(mpsc::UnboundedSender<Pending>);

impl Ends {
    /// Starts committing the ends and releases queued here, on `db`'s connections for them ([`Db::ender`]).
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
            ask: Ask::End(end.clone()),
            queued: Instant::now(),
            answer,
        })
        .await
    }

    /// Releases run `run_id`, held under `epoch`, and announces it; whether it was still held.
    pub async fn release(&self, run_id: Uuid, epoch: u64) -> Result<bool, StoreError> {
        let released = queued(&self.0, |answer| Pending {
            run_id,
            epoch,
            ask: Ask::Release,
            queued: Instant::now(),
            answer,
        })
        .await;
        match released {
            Ok(()) => Ok(true),
            Err(StoreError::Fenced(_)) => Ok(false),
            Err(error) => Err(error),
        }
    }
}

/// Commits what is queued, a batch at a time, until every [`Ends`] is dropped.
async fn commit_ends(db: Db, mut queued: mpsc::UnboundedReceiver<Pending>) {
    while let Some(first) = queued.recv().await {
        let conn = db.ender().await;
        // The ends and releases that queued while the connection was waited for go with the first.
        let mut batch = Vec::new();
        let (mut ends, mut releases) = (0, 0);
        let mut next = Some(first);
        while let Some(pending) = next.take() {
            match pending.ask {
                Ask::End(_) => ends += 1,
                Ask::Release => releases += 1,
            }
            batch.push(pending);
            if conn.is_err() || (ends < MAX_ENDS && releases < MAX_RELEASES) {
                next = queued.try_recv().ok();
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

/// Commits `batch` on `conn` and answers each end and release: on PostgreSQL the ends in one call, the releases in
/// another; on SQLite one by one.
async fn commit_batch(mut conn: Conn, batch: Vec<Pending>) {
    if conn.is_postgres() {
        let (ends, releases): (Vec<Pending>, Vec<Pending>) = batch
            .into_iter()
            .partition(|pending| matches!(pending.ask, Ask::End(_)));
        for asked in [ends, releases] {
            if !asked.is_empty() {
                commit_postgres(&mut conn, asked).await;
            }
        }
        return;
    }
    let mut batch = batch.into_iter();
    while let Some(pending) = batch.next() {
        let done = match &pending.ask {
            Ask::End(end) => finish_run_sqlite(&mut conn, pending.run_id, pending.epoch, end).await,
            Ask::Release => release_run_sqlite(&mut conn, pending.run_id, pending.epoch).await,
        };
        // The writer is busy past its timeout (another process holds the lock) or gone: the ones left find it so,
        // rather than each wait as long again.
        if let Err(error) = &done
            && error.is_unavailable()
        {
            for left in batch.by_ref() {
                let _ = left.answer.send(Err(like(error)));
            }
        }
        let _ = pending.answer.send(done);
    }
}

/// Commits `asked` (all ends, or all releases) in one PostgreSQL call and answers each (see
/// [`each_alone_if_refused`]); a store unavailable answers them all so.
async fn commit_postgres(conn: &mut Conn, asked: Vec<Pending>) {
    match each_alone_if_refused(conn, &asked, call_postgres).await {
        Ok(answers) => {
            for (pending, answer) in asked.into_iter().zip(answers) {
                let _ = pending.answer.send(answer);
            }
        }
        Err(error) => {
            let mut asked = asked.into_iter();
            if let Some(first) = asked.next() {
                for pending in asked {
                    let _ = pending.answer.send(Err(like(&error)));
                }
                let _ = first.answer.send(Err(error));
            }
        }
    }
}

/// One call for `asked`, all ends or all releases: each one's answer.
async fn call_postgres(
    conn: &mut Conn,
    asked: &[Pending],
) -> Result<Vec<Result<(), StoreError>>, StoreError> {
    let ends: Vec<(Uuid, u64, &RunEnd)> = asked
        .iter()
        .filter_map(|pending| match &pending.ask {
            Ask::End(end) => Some((pending.run_id, pending.epoch, end)),
            Ask::Release => None,
        })
        .collect();
    if !ends.is_empty() {
        return finish_runs_postgres(conn, &ends).await;
    }
    let runs: Vec<(Uuid, u64)> = asked
        .iter()
        .map(|pending| (pending.run_id, pending.epoch))
        .collect();
    release_runs_postgres(conn, &runs).await
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
    let json = json_text(&json, "run ends")?;
    let rows = conn
        .fetch_all(
            "SELECT place::BIGINT AS place, ended AS done FROM agent_finish_runs($1::jsonb)",
            &[Arg::Text(&json)],
        )
        .await?;
    answers(&rows, ends.iter().map(|&(run, _, _)| run))
}

/// One release as `agent_release_runs` reads it (see its migration).
#[derive(serde::Serialize)]
struct PgRelease {
    run: Uuid,
    epoch: u64,
}

/// The PostgreSQL releases of `runs` (id, epoch) on `conn`, announced on [`RELEASED_CHANNEL`] as the call commits: one
/// call of `agent_release_runs`. Each one's answer ([`StoreError::Fenced`]: no longer held under that epoch).
async fn release_runs_postgres(
    conn: &mut Conn,
    runs: &[(Uuid, u64)],
) -> Result<Vec<Result<(), StoreError>>, StoreError> {
    let json: Vec<PgRelease> = runs
        .iter()
        .map(|&(run, epoch)| PgRelease { run, epoch })
        .collect();
    let json = json_text(&json, "run releases")?;
    let rows = conn
        .fetch_all(
            "SELECT place::BIGINT AS place, released AS done FROM agent_release_runs($1::jsonb, $2)",
            &[Arg::Text(&json), Arg::Text(RELEASED_CHANNEL)],
        )
        .await?;
    answers(&rows, runs.iter().map(|&(run, _)| run))
}

/// The answers in `rows` (`place`, `done`) of a call for `runs`, in their order: `Fenced` for a run not done.
fn answers(
    rows: &[Row],
    runs: impl ExactSizeIterator<Item = Uuid>,
) -> Result<Vec<Result<(), StoreError>>, StoreError> {
    let runs: Vec<Uuid> = runs.collect();
    let mut answers: Vec<Result<(), StoreError>> = runs
        .iter()
        .map(|_| Err(StoreError::Corrupt("a run with no answer".to_owned())))
        .collect();
    for row in rows {
        let place = usize::try_from(row.get::<i64>("place")?)
            .ok()
            .filter(|&place| place < runs.len())
            .ok_or_else(|| StoreError::Corrupt("a run answered out of place".to_owned()))?;
        answers[place] = if row.get::<bool>("done")? {
            Ok(())
        } else {
            Err(StoreError::Fenced(runs[place]))
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

/// The SQLite release of run `run_id` on `conn` (the writer); nobody else to announce it to.
async fn release_run_sqlite(conn: &mut Conn, run_id: Uuid, epoch: u64) -> Result<(), StoreError> {
    let released = conn
        .execute(
            "UPDATE agent_chat_runs SET owner_instance = '', epoch = epoch + 1, heartbeat_at = {now} \
             WHERE id = $1 AND epoch = $2 AND status = 'running'",
            &[Arg::Id(run_id), Arg::Int(to_i64(epoch))],
        )
        .await?;
    if released == 1 {
        Ok(())
    } else {
        Err(StoreError::Fenced(run_id))
    }
}
