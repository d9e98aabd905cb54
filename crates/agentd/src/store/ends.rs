//! Run ends, committed together when they arrive together.
//!
//! A run's end is a transaction of its own: its row, its messages, its chat's totals. When thousands of clients leave
//! together (a burst's answers ending at once, a network blip past `DETACH_GRACE`), their runs end together, and on
//! PostgreSQL each end took a pooled connection, a round trip and a commit: about 2,100 a second on a 2-core box, every
//! connection of the pool taken by them for seconds. Here the ends waiting together are committed together: on
//! PostgreSQL in one call of `agent_finish_runs` (see its migration) for up to 64, one call at a time while fewer wait
//! (those that come meanwhile go together in the next), several at once on as many connections while more do
//! ([`CALLS_AT_ONCE`]); on SQLite in scripts of 16, 8, 4, 2 or 1 ends on its one writer (`scripts.rs`), each one
//! transaction and one trip to the writer's thread, as starts are. An end alone is a batch of one, as before.
//!
//! Nothing about an end changes: each is answered as if alone ([`StoreError::Fenced`] for a run no longer held under
//! its epoch). A call that fails leaves nothing (its transaction rolls back), and its ends are made again one by one,
//! so only an end the store refuses fails. The connection is waited for patiently ([`Db::ender`]): no client can be
//! told to retry an end.
//!
//! Releases go the same way: at the shutdown deadline of a replica draining in handoff mode, every run it drives is
//! released at once (its epoch raised, no owner) and announced, so that a replica following it continues it. Each was
//! a commit and its announcement another; on PostgreSQL the releases waiting at the same moment now go in one call of
//! `agent_release_runs` (up to 256), announced with its commit; on SQLite in scripts, as ends do.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc, oneshot};
use uuid::Uuid;

use super::db::{Arg, Conn, Db};
use super::row::Row;
use super::runs::end_args;
use super::scripts::{self, Scripts, take_call};
use super::{RELEASED_CHANNEL, RunEnd, StoreError, each_alone_if_refused, like, queued};
use super::{json_text, to_i64};
use crate::model::Message;

/// The most ends committed in one call.
const MAX_ENDS: usize = 64;

/// The most calls of ends (and releases) made at once, each on a connection of its own. While fewer than a call's
/// worth wait, one call is made at a time: the ends that come meanwhile wait for it (up to [`GATHERING`]) and go
/// together in the next, one commit for many, where a call for each connection free took a commit for every few (100
/// runs ending over 0.1 s: 34 calls). A call's worth and more waiting (thousands of clients leaving at once) go on as
/// many connections as this, so that a server with cores to spare ends them sooner.
const CALLS_AT_ONCE: u32 = 4;

/// How long ends wait for the call in flight before they go on a connection of their own anyway: a call held up (by a
/// lock, or a server slow to answer) holds up the ends after it no longer than this.
const GATHERING: Duration = Duration::from_millis(20);

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
    /// Starts committing the ends and releases queued here, on `db`'s connections for them ([`Db::ender`]), on the
    /// runtime of the store's queues ([`Db::runtime`]).
    pub fn spawn(db: Db) -> Self {
        let (queue, queued) = mpsc::unbounded_channel();
        db.runtime().spawn(commit_ends(db, queued));
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
    let calls = Arc::new(Semaphore::new(CALLS_AT_ONCE as usize));
    while let Some(first) = queued.recv().await {
        // A call's worth goes as soon as a call may; fewer wait until no call is in flight (up to `GATHERING`), and
        // those that come meanwhile go with them.
        let call = if queued.len() + 1 >= MAX_ENDS {
            Arc::clone(&calls).acquire_owned().await
        } else {
            let idle = Arc::clone(&calls).acquire_many_owned(CALLS_AT_ONCE);
            match tokio::time::timeout(GATHERING, idle).await {
                Ok(all) => all.map(|mut all| all.split(1).expect("one of the calls")),
                Err(_) => Arc::clone(&calls).acquire_owned().await,
            }
        }
        .expect("the calls' semaphore is never closed");
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
                tokio::spawn(async move {
                    commit_batch(conn, batch).await;
                    drop(call);
                });
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

/// Commits `batch` on `conn` and answers each end and release: the ends together, then the releases; on PostgreSQL
/// each in one call, on SQLite in scripts (`scripts.rs`).
async fn commit_batch(mut conn: Conn, batch: Vec<Pending>) {
    let (ends, releases): (Vec<Pending>, Vec<Pending>) = batch
        .into_iter()
        .partition(|pending| matches!(pending.ask, Ask::End(_)));
    let mut calls = Vec::new();
    for mut asked in [ends, releases] {
        while !asked.is_empty() {
            calls.push(take_call(conn.is_postgres(), &mut asked));
        }
    }
    let mut calls = calls.into_iter();
    while let Some(asked) = calls.next() {
        if let Err(error) = commit_together(&mut conn, asked).await {
            // The store is unavailable (SQLite's writer busy past its timeout, another process holding its lock; or
            // the server gone): the ones left find it so, rather than each call wait as long again.
            for pending in calls.by_ref().flatten() {
                let _ = pending.answer.send(Err(like(&error)));
            }
        }
    }
}

/// Commits `asked` (all ends, or all releases) in one call and answers each (see [`each_alone_if_refused`]); a store
/// unavailable answers them all so (the first with its own error), and is the error.
async fn commit_together(conn: &mut Conn, asked: Vec<Pending>) -> Result<(), StoreError> {
    match each_alone_if_refused(conn, &asked, call).await {
        Ok(answers) => {
            for (pending, answer) in asked.into_iter().zip(answers) {
                let _ = pending.answer.send(answer);
            }
            Ok(())
        }
        Err(error) => {
            let mut asked = asked.into_iter();
            let first = asked.next();
            for pending in asked {
                let _ = pending.answer.send(Err(like(&error)));
            }
            let left = like(&error);
            if let Some(first) = first {
                let _ = first.answer.send(Err(error));
            }
            Err(left)
        }
    }
}

/// One call for `asked`, all ends or all releases (on SQLite, as many as a script holds): each one's answer.
async fn call(
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
    let postgres = conn.is_postgres();
    if !ends.is_empty() {
        return if postgres {
            finish_runs_postgres(conn, &ends).await
        } else {
            finish_runs_sqlite(conn, &ends).await
        };
    }
    let runs: Vec<(Uuid, u64)> = asked
        .iter()
        .map(|pending| (pending.run_id, pending.epoch))
        .collect();
    if postgres {
        release_runs_postgres(conn, &runs).await
    } else {
        release_runs_sqlite(conn, &runs).await
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
    let json = json_text(&json, "run ends")?;
    let rows = conn
        .fetch_all(
            "SELECT place::BIGINT AS place, ended AS done FROM agent_finish_runs($1::jsonb)",
            &[Arg::Text(&json)],
        )
        .await?;
    answers(&rows, ends.iter().map(|&(run, _, _)| run), unanswered)
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
    answers(&rows, runs.iter().map(|&(run, _)| run), unanswered)
}

/// The answers in `rows` (`place`, `done`) of a call for `runs`, in their order: `Fenced` for a run not done, and
/// `missing` for a run no row answers (a SQLite script answers only the runs it changed; a PostgreSQL call answers
/// each).
fn answers(
    rows: &[Row],
    runs: impl ExactSizeIterator<Item = Uuid>,
    missing: fn(Uuid) -> StoreError,
) -> Result<Vec<Result<(), StoreError>>, StoreError> {
    let runs: Vec<Uuid> = runs.collect();
    let mut answers: Vec<Result<(), StoreError>> =
        runs.iter().map(|&run| Err(missing(run))).collect();
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

/// A run a PostgreSQL call did not answer: its functions answer each.
fn unanswered(_: Uuid) -> StoreError {
    StoreError::Corrupt("a run with no answer".to_owned())
}

/// One SQLite end's statements (see [`Scripts`]). Each goes on only if the one before it changed its row: a run no
/// longer held here (`Fenced`) changes nothing and answers no row. The messages go as one JSON array, each stored as
/// the JSON text SQLite gives of it, in order after the chat's last.
const END: &str = "UPDATE agent_chat_runs SET status = $3, error = $4, partial_output = $5, input_tokens = $6, \
     output_tokens = $7, total_tokens = $8, finished_at = {now} \
     WHERE id = $1 AND epoch = $2 AND status = 'running' RETURNING {place} AS place, TRUE AS done; \
     UPDATE agent_chats SET updated_at = {now}, total_input_tokens = total_input_tokens + $6, \
     total_output_tokens = total_output_tokens + $7, total_tokens = total_tokens + $8 \
     WHERE id = (SELECT chat_id FROM agent_chat_runs WHERE id = $1) AND changes() = 1; \
     INSERT INTO agent_chat_messages (chat_id, message_index, message, run_id, created_at) \
     SELECT c.id, n.next + m.key, m.value, $1, {now} FROM agent_chats c, \
     (SELECT COALESCE(MAX(message_index) + 1, 0) AS next FROM agent_chat_messages \
     WHERE chat_id = (SELECT chat_id FROM agent_chat_runs WHERE id = $1)) n, json_each($9) m \
     WHERE c.id = (SELECT chat_id FROM agent_chat_runs WHERE id = $1) AND changes() = 1 \
     ORDER BY m.key; ";

/// The arguments of one end in a script.
const ARGS_PER_END: usize = 9;

/// One SQLite release's statement: a run no longer held under the epoch answers no row. Nobody else to announce it to.
const RELEASE: &str = "UPDATE agent_chat_runs SET owner_instance = '', epoch = epoch + 1, heartbeat_at = {now} \
     WHERE id = $1 AND epoch = $2 AND status = 'running' RETURNING {place} AS place, TRUE AS done; ";

/// The SQLite ends `ends` on `conn` (the writer), as many as a script holds: one script, one transaction. Each end's
/// answer; when the script fails, nothing of it is kept.
async fn finish_runs_sqlite(
    conn: &mut Conn,
    ends: &[(Uuid, u64, &RunEnd)],
) -> Result<Vec<Result<(), StoreError>>, StoreError> {
    static SCRIPTS: OnceLock<Scripts> = OnceLock::new();
    let texts = ends
        .iter()
        .map(|(_, _, end)| serde_json::to_string(&end.messages))
        .collect::<Result<Vec<String>, _>>()
        .map_err(|e| StoreError::Corrupt(format!("messages do not serialize: {e}")))?;
    let mut args = Vec::with_capacity(ends.len() * ARGS_PER_END);
    for (&(run_id, epoch, end), texts) in ends.iter().zip(&texts) {
        args.extend(end_args(run_id, epoch, end));
        args.push(Arg::Text(texts));
    }
    let script = SCRIPTS.get_or_init(|| Scripts::new(END, ARGS_PER_END));
    let rows = scripts::run(conn, script.of(ends.len()), &args).await?;
    answers(
        &rows,
        ends.iter().map(|&(run, _, _)| run),
        StoreError::Fenced,
    )
}

/// The SQLite releases of `runs` (id, epoch) on `conn` (the writer), as many as a script holds: one script, one
/// transaction. Each one's answer ([`StoreError::Fenced`]: no longer held under that epoch).
async fn release_runs_sqlite(
    conn: &mut Conn,
    runs: &[(Uuid, u64)],
) -> Result<Vec<Result<(), StoreError>>, StoreError> {
    static SCRIPTS: OnceLock<Scripts> = OnceLock::new();
    let args: Vec<Arg<'_>> = runs
        .iter()
        .flat_map(|&(run, epoch)| [Arg::Id(run), Arg::Int(to_i64(epoch))])
        .collect();
    let script = SCRIPTS.get_or_init(|| Scripts::new(RELEASE, 2));
    let rows = scripts::run(conn, script.of(runs.len()), &args).await?;
    answers(&rows, runs.iter().map(|&(run, _)| run), StoreError::Fenced)
}
