//! Run starts, committed together when they arrive together.
//!
//! A run start is a transaction of its own. On SQLite every write goes through its one writer connection: each
//! commit appends every page it touched to the WAL (a dozen: the tails of four tables, their indexes) and takes a trip
//! to the connection's thread. On PostgreSQL each start took a pooled connection, a round trip and a commit, and the
//! server's process its share of the box's cores. In a burst (a deploy's clients coming back, thousands of new
//! streams a second) the starts queued for connections faster than they were committed, and past 3 s of waiting they
//! were refused. Here the starts waiting when a connection is free are committed in one transaction: on SQLite in
//! scripts of 1, 2, 4, 8 or 16 starts (each one trip), the pages they share written once; on PostgreSQL in one call of
//! `agent_start_runs` (see its migration), several such calls at once on as many connections. A start alone is a
//! batch of one, as before.
//!
//! Nothing about a start changes: each one's statements run in order after the ones before it in its batch, in the
//! same transaction, so two starts of one chat see each other (the second finds the chat busy). A batch that fails
//! leaves nothing: its transaction rolls back, and its starts are made again one by one, so only the start the store
//! refuses fails.

use std::collections::VecDeque;
use std::sync::OnceLock;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::db::{Arg, Conn, Db};
use super::row::Row;
use super::scripts::{self, MAX_SCRIPT, Scripts, take_call};
use super::{ACQUIRE_TIMEOUT, NewRun, StoreError, each_alone_if_refused, json_text, like, queued};
use crate::model::Message;

/// The most starts committed in one batch; on SQLite a batch is run as scripts (`scripts.rs`), the largest first.
const MAX_BATCH: usize = MAX_SCRIPT;

/// The arguments of one start in a script: `$1`..`$12` for the first, `$13`..`$24` for the second, and so on.
const ARGS_PER_START: usize = 12;

/// One start's statements (`{place}`: its place in the script, which tags the rows it reads). The reads come first,
/// tagged by `kind`; the writes that follow happen only for a chat that exists and has no run going (a refused start
/// writes nothing). The chat is made first when `$12` is 1 (dev mode, a chat nobody made).
const START: &str = "INSERT INTO agent_chats (id, org_id, user_id, canvas_id, created_at, updated_at) \
     SELECT $2, $9, $10, $11, {now}, {now} WHERE $12 = 1 ON CONFLICT (id) DO NOTHING; \
     SELECT {place} AS start, 'chat' AS kind, NULL AS value FROM agent_chats \
     WHERE id = $2 AND org_id = $9 AND user_id = $10 AND canvas_id = $11; \
     SELECT {place} AS start, 'busy' AS kind, id AS value FROM agent_chat_runs \
     WHERE chat_id = $2 AND status = 'running' AND EXISTS (SELECT 1 FROM agent_chats \
     WHERE id = $2 AND org_id = $9 AND user_id = $10 AND canvas_id = $11) LIMIT 1; \
     SELECT {place} AS start, 'message' AS kind, message AS value FROM agent_chat_messages WHERE chat_id = $2 \
     AND EXISTS (SELECT 1 FROM agent_chats \
     WHERE id = $2 AND org_id = $9 AND user_id = $10 AND canvas_id = $11) ORDER BY message_index; \
     INSERT INTO agent_chat_runs (id, chat_id, model, status, owner_instance, agent_context, \
     heartbeat_at, created_at) SELECT $3, $2, $4, 'running', $5, $6, {now}, {now} \
     WHERE EXISTS (SELECT 1 FROM agent_chats \
     WHERE id = $2 AND org_id = $9 AND user_id = $10 AND canvas_id = $11) AND NOT EXISTS \
     (SELECT 1 FROM agent_chat_runs WHERE chat_id = $2 AND status = 'running'); \
     UPDATE agent_chats SET updated_at = {now}, initial_message = COALESCE(initial_message, $1) \
     WHERE id = $2 AND EXISTS (SELECT 1 FROM agent_chat_runs WHERE id = $3); \
     INSERT INTO agent_chat_messages (chat_id, message_index, message, run_id, created_at) \
     SELECT $2, next, $7, $3, {now} FROM (SELECT COALESCE(MAX(message_index) + 1, 0) AS next \
     FROM agent_chat_messages WHERE chat_id = $2) WHERE EXISTS (SELECT 1 FROM agent_chat_runs WHERE id = $3); \
     INSERT INTO agent_run_events (run_id, seq, last_seq, events) SELECT $3, 1, 1, $8 \
     WHERE $8 IS NOT NULL AND EXISTS (SELECT 1 FROM agent_chat_runs WHERE id = $3); ";

/// A start waiting for its turn.
#[derive(Debug)]
struct Pending {
    run: NewRun,
    make_chat: bool,
    queued: Instant,
    answer: oneshot::Sender<Result<Vec<Message>, StoreError>>,
}

/// Where run starts queue for a connection; cheap to clone. The task committing them ends when the last clone is
/// dropped.
#[derive(Debug, Clone)]
pub(super) struct Starts(mpsc::UnboundedSender<Pending>);

impl Starts {
    /// Starts committing the starts queued here, on `db`'s connections for them ([`Db::starter`]), on the runtime of
    /// the store's queues ([`Db::runtime`]).
    pub fn spawn(db: Db) -> Self {
        let (queue, queued) = mpsc::unbounded_channel();
        db.runtime().spawn(commit_starts(db, queued));
        Self(queue)
    }

    /// Starts `run` (making its chat first when `make_chat` and none has its id): the chat's history before its
    /// prompt, once the start is committed.
    pub async fn start(&self, run: NewRun, make_chat: bool) -> Result<Vec<Message>, StoreError> {
        queued(&self.0, |answer| Pending {
            run,
            make_chat,
            queued: Instant::now(),
            answer,
        })
        .await
    }
}

/// Commits what is queued, a batch at a time, until every [`Starts`] is dropped.
async fn commit_starts(db: Db, mut queued: mpsc::UnboundedReceiver<Pending>) {
    let mut waiting: VecDeque<Pending> = VecDeque::new();
    loop {
        if waiting.is_empty() {
            match queued.recv().await {
                Some(first) => waiting.push_back(first),
                None => return,
            }
        }
        while waiting.len() < MAX_BATCH {
            match queued.try_recv() {
                Ok(next) => waiting.push_back(next),
                Err(_) => break,
            }
        }
        // A start waits for its turn as long as a request waits for any pooled connection, then is refused as one
        // is (503 `store_unavailable`).
        let limit = ACQUIRE_TIMEOUT;
        while waiting.front().is_some_and(|p| p.queued.elapsed() >= limit) {
            let late = waiting.pop_front().expect("checked above");
            db.waits().gave_up(late.queued);
            let _ = late.answer.send(Err(sqlx::Error::PoolTimedOut.into()));
        }
        let Some(oldest) = waiting.front().map(|p| p.queued) else {
            continue;
        };
        let deadline = tokio::time::Instant::from_std(oldest + limit);
        let conn = match tokio::time::timeout_at(deadline, db.starter()).await {
            Ok(Ok(conn)) => conn,
            // The oldest start's time is up (the pool's own limit, counted from later, is no sooner): it is refused
            // above, and the others wait on.
            Err(_) | Ok(Err(StoreError::Database(sqlx::Error::PoolTimedOut))) => continue,
            // The store is closed: every start waiting finds it so.
            Ok(Err(error)) => {
                for pending in waiting.drain(..) {
                    let _ = pending.answer.send(Err(like(&error)));
                }
                continue;
            }
        };
        // A start whose request is gone (its client left while it waited) is not made: nobody would drive its run.
        waiting.retain(|p| !p.answer.is_closed());
        let batch: Vec<Pending> = waiting.drain(..waiting.len().min(MAX_BATCH)).collect();
        for pending in &batch {
            db.waits().waited(pending.queued);
        }
        // On its own task, so that the next batch can take another connection meanwhile (PostgreSQL; SQLite's next
        // one waits for the writer to come back).
        tokio::spawn(commit_batch(conn, batch));
    }
}

/// Commits `batch` on `conn` and answers each start: on PostgreSQL in one call, on SQLite in scripts of the sizes
/// above.
async fn commit_batch(mut conn: Conn, mut batch: Vec<Pending>) {
    while !batch.is_empty() {
        let script = take_call(conn.is_postgres(), &mut batch);
        match commit_script(&mut conn, &script).await {
            Ok(answers) => {
                for (pending, answer) in script.into_iter().zip(answers) {
                    let _ = pending.answer.send(answer);
                }
            }
            // The store is busy (another process holds SQLite's lock past the busy timeout) or unreachable, and
            // nothing was written: every start left finds it so, rather than each script wait as long again.
            Err(error) => {
                let mut left = script.into_iter().chain(batch);
                if let Some(first) = left.next() {
                    for pending in left {
                        let _ = pending.answer.send(Err(like(&error)));
                    }
                    let _ = first.answer.send(Err(error));
                }
                return;
            }
        }
    }
}

/// Commits the starts of `script` in one transaction: each one's answer (see [`each_alone_if_refused`]).
async fn commit_script(
    conn: &mut Conn,
    script: &[Pending],
) -> Result<Vec<Result<Vec<Message>, StoreError>>, StoreError> {
    let runs: Vec<(&NewRun, bool)> = script.iter().map(|p| (&p.run, p.make_chat)).collect();
    each_alone_if_refused(conn, &runs, run_script).await
}

/// Runs the starts `runs` in one transaction of their own: each one's history, or why it was refused.
async fn run_script(
    conn: &mut Conn,
    runs: &[(&NewRun, bool)],
) -> Result<Vec<Result<Vec<Message>, StoreError>>, StoreError> {
    if conn.is_postgres() {
        return start_runs_postgres(conn, runs).await;
    }
    let prompts: Vec<Message> = runs
        .iter()
        .map(|(run, _)| Message::User {
            content: run.prompt.clone(),
        })
        .collect();
    let mut args = Vec::with_capacity(runs.len() * ARGS_PER_START);
    for ((run, make_chat), prompt) in runs.iter().zip(&prompts) {
        args.extend([
            Arg::Text(&run.prompt),
            Arg::Id(run.chat_id),
            Arg::Id(run.id),
            Arg::Text(&run.model),
            Arg::Text(&run.owner_instance),
            Arg::OptText(run.agent_context.as_deref()),
            Arg::Message(prompt),
            Arg::OptText(run.first_event.as_deref()),
            Arg::Text(&run.owner.org_id),
            Arg::Text(&run.owner.user_id),
            Arg::Text(&run.owner.canvas_id),
            Arg::Int(i64::from(*make_chat)),
        ]);
    }
    let rows = scripts::run(conn, script(runs.len()), &args).await?;
    read_answers(runs, &rows)
}

/// One start as `agent_start_runs` reads it (see its migration).
#[derive(serde::Serialize)]
struct PgStart<'a> {
    run: Uuid,
    chat: Uuid,
    org: &'a str,
    user: &'a str,
    canvas: &'a str,
    model: &'a str,
    owner: &'a str,
    prompt: &'a str,
    message: Message,
    context: Option<&'a str>,
    first_event: Option<&'a str>,
    make_chat: bool,
}

/// The PostgreSQL starts `runs` on `conn` (a pooled connection, or a transaction the caller rolls back): one call of
/// `agent_start_runs`, one round trip and, on a pooled connection, one commit. Each start's history, or why it was
/// refused; when the call fails, nothing of it is kept.
pub(super) async fn start_runs_postgres(
    conn: &mut Conn,
    runs: &[(&NewRun, bool)],
) -> Result<Vec<Result<Vec<Message>, StoreError>>, StoreError> {
    let starts: Vec<PgStart<'_>> = runs
        .iter()
        .map(|&(run, make_chat)| PgStart {
            run: run.id,
            chat: run.chat_id,
            org: &run.owner.org_id,
            user: &run.owner.user_id,
            canvas: &run.owner.canvas_id,
            model: &run.model,
            owner: &run.owner_instance,
            prompt: &run.prompt,
            message: Message::User {
                content: run.prompt.clone(),
            },
            context: run.agent_context.as_deref(),
            first_event: run.first_event.as_deref(),
            make_chat,
        })
        .collect();
    let starts = json_text(&starts, "run starts")?;
    let rows = conn
        .fetch_all(
            "SELECT place::BIGINT AS place, chat_found, busy_run, history FROM agent_start_runs($1::jsonb)",
            &[Arg::Text(&starts)],
        )
        .await?;
    let mut answers: Vec<Result<Vec<Message>, StoreError>> = runs
        .iter()
        .map(|_| Err(StoreError::Corrupt("a run start with no answer".to_owned())))
        .collect();
    for row in &rows {
        let place = place_of(row, "place", runs.len())?;
        answers[place] = if !row.get::<bool>("chat_found")? {
            Err(StoreError::ChatNotFound(runs[place].0.chat_id))
        } else if let Some(going) = row.opt_uuid("busy_run")? {
            Err(StoreError::ChatBusy(going))
        } else {
            Ok(row.messages("history")?)
        };
    }
    Ok(answers)
}

/// The start (of `starts`) that `row` answers, by its place in the batch in `column`.
fn place_of(row: &Row, column: &str, starts: usize) -> Result<usize, StoreError> {
    usize::try_from(row.get::<i64>(column)?)
        .ok()
        .filter(|&place| place < starts)
        .ok_or_else(|| StoreError::Corrupt("a run start's answer of no start".to_owned()))
}

/// Each start's answer from the rows of its SQLite script.
fn read_answers(
    runs: &[(&NewRun, bool)],
    rows: &[Row],
) -> Result<Vec<Result<Vec<Message>, StoreError>>, StoreError> {
    let mut found = vec![false; runs.len()];
    let mut answers: Vec<Result<Vec<Message>, StoreError>> =
        runs.iter().map(|_| Ok(Vec::new())).collect();
    for row in rows {
        let start = place_of(row, "start", runs.len())?;
        match (row.get::<String>("kind")?.as_str(), &mut answers[start]) {
            ("chat", _) => found[start] = true,
            ("busy", answer) => *answer = Err(StoreError::ChatBusy(row.uuid("value")?)),
            (_, Ok(history)) => history.push(row.message("value")?),
            (_, Err(_)) => {}
        }
    }
    for ((answer, found), (run, _)) in answers.iter_mut().zip(found).zip(runs) {
        if !found {
            *answer = Err(StoreError::ChatNotFound(run.chat_id));
        }
    }
    Ok(answers)
}

/// The script of `starts` starts (one of [`scripts::SCRIPT_SIZES`]): `BEGIN IMMEDIATE`, each start's statements with
/// its own arguments, `COMMIT`.
fn script(starts: usize) -> &'static str {
    static SCRIPTS: OnceLock<Scripts> = OnceLock::new();
    SCRIPTS
        .get_or_init(|| Scripts::new(START, ARGS_PER_START))
        .of(starts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_start_of_a_script_reads_its_own_arguments() {
        let two = script(2);
        assert!(two.starts_with("BEGIN IMMEDIATE; ") && two.ends_with("COMMIT"));
        assert!(two.contains("$24") && !two.contains("$25"));
        assert!(two.contains("SELECT 1 AS start"));
    }
}
