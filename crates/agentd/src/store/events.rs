//! The run log in the store: the events of every run, appended in group commits and read back in order.
//!
//! A row holds consecutive events of one run, `seq` to `last_seq`, as their compact JSON joined by newlines (JSON
//! never holds a raw newline, so splitting gives back each event exactly). A group commit writes one row per run
//! per batch, all in one transaction; with PostgreSQL the same statement notifies every replica of each run's new
//! last seq (`agentd_run_events`, delivered on commit), so a group commit is one round trip.

use std::time::Duration;

use uuid::Uuid;

use super::db::{Arg, Conn};
use super::row::Row;
use super::{SessionStore, StoreError, json_text, to_i64, to_ms};

/// The channel a PostgreSQL commit notifies: one record per run, separated by [`RECORD_SEPARATOR`], each
/// `<run_id> <seq> <last_seq>` followed, when the run is followed on another replica and they fit, by a newline and
/// the events' JSON, one per line. Followers on other replicas read the events from the notification and go to the
/// store only when they were not carried. Events of a run nobody follows elsewhere are not carried: every replica
/// listening would receive them for nothing.
pub const EVENTS_CHANNEL: &str = "agentd_run_events";
/// Between the records of an events notification (ASCII RS: JSON never holds it raw).
pub const RECORD_SEPARATOR: char = '\u{1e}';
/// Largest events text a notification carries for one run; larger ones are read from the store.
const CARRIED_BYTES: usize = 3_000;
/// The channel a cancel is sent on: the run id.
pub const CANCEL_CHANNEL: &str = "agentd_run_cancel";
/// The channel a released run is announced on (its producer drained in handoff mode): the run id.
pub const RELEASED_CHANNEL: &str = "agentd_run_released";

/// How far before where the last sweep got to the next one looks again: a stopped process's run is marked finished a
/// moment before a peer appends its last events, and PostgreSQL stamps a run's end with the time its transaction began.
const SWEEP_OVERLAP: Duration = Duration::from_secs(60);
/// Runs a sweep reads per step.
const SWEEP_STEP: i64 = 1_000;

/// Events read per query when replaying.
const REPLAY_PAGE: i64 = 1_000;

/// Events read back from the log: `(seq, json)` in order, and whether the read stopped at a page's end.
#[derive(Debug)]
pub struct EventsPage {
    pub events: Vec<(u64, String)>,
    pub full: bool,
}

/// Consecutive events of one run, ready to store.
#[derive(Debug, Clone)]
pub struct LogRow {
    pub run_id: Uuid,
    /// The epoch the producer holds the run under; the row is refused when the run's epoch moved on.
    pub epoch: u64,
    pub seq: u64,
    pub last_seq: u64,
    /// The events' JSON, one per line.
    pub events: String,
}

/// Whose connection an append takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Appender {
    /// The run log's writer: its group commits go on the run log's connection, which it keeps from one to the next.
    LogWriter,
    /// Anyone else: a connection of the pool.
    Other,
}

impl SessionStore {
    /// The run log's group commit: appends `rows` in one transaction (and, with PostgreSQL, notifies the replicas when
    /// it commits), on the run log's connection. A row whose run is no longer held under its epoch (claimed by another
    /// process, or gone) is not stored: returns those runs.
    ///
    /// Only the run log's writer calls it, one commit at a time: PostgreSQL keeps the connection out of its pool
    /// between commits, so a second caller would wait in the pool for it. Others use [`Self::append_events_apart`].
    pub async fn append_events(&self, rows: &[LogRow]) -> Result<Vec<Uuid>, StoreError> {
        self.append(rows, Appender::LogWriter).await
    }

    /// The run log's writer has had nothing to commit for a while: the connection it keeps between commits goes back
    /// to the pool (PostgreSQL; see [`super::db::Db::log_idle`]).
    pub fn log_writer_idle(&self) {
        self.0.db.log_idle();
    }

    /// Whether a connection is kept out of the pool for the run log's next commit (PostgreSQL).
    pub fn log_connection_kept(&self) -> bool {
        self.0.db.log_kept()
    }

    /// Appends `rows` as [`Self::append_events`] does, on a connection of the pool: for rows written apart from the
    /// run log's writer (the end of a stopped process's run, which another replica writes).
    pub async fn append_events_apart(&self, rows: &[LogRow]) -> Result<Vec<Uuid>, StoreError> {
        self.append(rows, Appender::Other).await
    }

    /// The connection `appender` appends on (in SQLite both are the one writer).
    async fn appending(&self, appender: Appender) -> Result<Conn, StoreError> {
        match appender {
            Appender::LogWriter => self.0.db.log_write().await,
            Appender::Other => self.0.db.write().await,
        }
    }

    async fn append(&self, rows: &[LogRow], appender: Appender) -> Result<Vec<Uuid>, StoreError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        if self.0.db.is_postgres() {
            return self.append_events_postgres(rows, appender).await;
        }
        // One statement, prepared once, whatever the batch's size: the rows as one JSON array that SQLite unpacks
        // itself (binding thousands of values, in a statement whose text changes with every batch size, costs more
        // than the insert).
        let batch: Vec<(String, u64, u64, &str, u64)> = rows
            .iter()
            .map(|row| {
                (
                    row.run_id.to_string(),
                    row.seq,
                    row.last_seq,
                    row.events.as_str(),
                    row.epoch,
                )
            })
            .collect();
        let batch = json_text(&batch, "run events")?;
        // One statement: atomic as it is, no transaction around it (a BEGIN and a COMMIT are two more trips to the
        // connection's thread per group commit).
        let mut conn = self.appending(appender).await?;
        let inserted = conn
            .fetch_all(
                "INSERT INTO agent_run_events (run_id, seq, last_seq, events) \
                 SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3 FROM json_each($1) \
                 WHERE EXISTS (SELECT 1 FROM agent_chat_runs r WHERE r.id = value ->> 0 AND r.epoch = value ->> 4) \
                 RETURNING run_id",
                &[Arg::Text(&batch)],
            )
            .await?;
        refused_of(rows, &inserted)
    }

    /// The PostgreSQL append: one statement in its own transaction (one round trip, under load each one counts), of
    /// five arrays, prepared once whatever the batch's size. It stores the rows whose run is held under their epoch
    /// and notifies their records, packed into payloads PostgreSQL takes: a chunk of records ends within 4,000 bytes
    /// of where it starts, plus at most one record (3,079 bytes at most), so a payload stays under 7,100 bytes.
    pub(super) async fn append_events_postgres(
        &self,
        rows: &[LogRow],
        appender: Appender,
    ) -> Result<Vec<Uuid>, StoreError> {
        let mut conn = self.appending(appender).await?;
        let inserted = append_on(&mut conn, rows).await?;
        if appender == Appender::LogWriter {
            let bytes: usize = rows.iter().map(|row| row.events.len() + 64).sum();
            self.0.db.done_with_log(conn, bytes);
        }
        refused_of(rows, &inserted)
    }

    /// Up to 1,000 rows (a page) of the run's events after `after`: `(seq, json)` in order.
    pub async fn events_after(
        &self,
        run_id: Uuid,
        after: u64,
    ) -> Result<Vec<(u64, String)>, StoreError> {
        Ok(self.events_page(run_id, after).await?.events)
    }

    /// A page of the run's events after `after`, and whether it was full (there may be more stored after it).
    ///
    /// The page starts at the row holding event `after + 1`: the last row whose first seq is at most that, found by
    /// the log's key, like every row after it. A filter on `last_seq` alone (not in the key) read the run's log from
    /// its first row to skip what came before: every client re-attaching near the end of a long run read all of it,
    /// and replaying one page after another read the log once per page.
    pub async fn events_page(&self, run_id: Uuid, after: u64) -> Result<EventsPage, StoreError> {
        let rows = self
            .0
            .db
            .read()
            .await?
            .fetch_all(
                "SELECT seq, events FROM agent_run_events WHERE run_id = $1 AND seq >= COALESCE(\
                 (SELECT MAX(seq) FROM agent_run_events WHERE run_id = $1 AND seq <= $2 + 1), 0) \
                 AND last_seq > $2 ORDER BY seq LIMIT $3",
                &[
                    Arg::Id(run_id),
                    Arg::Int(to_i64(after)),
                    Arg::Int(REPLAY_PAGE),
                ],
            )
            .await?;
        let full = i64::try_from(rows.len()).is_ok_and(|n| n >= REPLAY_PAGE);
        let mut events = Vec::new();
        for row in rows {
            let first = u64::try_from(row.get::<i64>("seq")?).unwrap_or(0);
            let text: String = row.get("events")?;
            for (i, json) in text.split('\n').enumerate() {
                let seq = first + i as u64;
                if seq > after {
                    events.push((seq, json.to_owned()));
                }
            }
        }
        Ok(EventsPage { events, full })
    }

    /// Every event of the run's log, in order, page by page.
    pub async fn events_of(&self, run_id: Uuid) -> Result<Vec<(u64, String)>, StoreError> {
        let mut events: Vec<(u64, String)> = Vec::new();
        loop {
            let after = events.last().map_or(0, |(seq, _)| *seq);
            let page = self.events_after(run_id, after).await?;
            if page.is_empty() {
                return Ok(events);
            }
            events.extend(page);
        }
    }

    /// The seq of the run's last stored event (0 when it has none).
    pub async fn last_seq(&self, run_id: Uuid) -> Result<u64, StoreError> {
        let row = self
            .0
            .db
            .read()
            .await?
            .fetch_one(
                concat!("SELECT ", last_seq_of!("$1"), " AS last"),
                &[Arg::Id(run_id)],
            )
            .await?;
        Ok(u64::try_from(row.get::<i64>("last")?).unwrap_or(0))
    }

    /// Deletes the events of runs that finished more than `retention` ago; how many rows went.
    ///
    /// It reads on from where the last sweep got to (`agent_run_log_sweep`, shared by the replicas), less
    /// `SWEEP_OVERLAP`, so each sweep reads the runs that finished since the last one rather than every run the
    /// store holds (SQLite held its one writer for about a second per million finished runs, once a minute, and every
    /// run's events waited for it). It goes `SWEEP_STEP` runs at a time, each step short: the first sweep after an
    /// upgrade, or after a long stop, catches up on many.
    pub async fn sweep_events(&self, retention: Duration) -> Result<u64, StoreError> {
        let (retention, overlap) = (to_ms(retention), to_ms(SWEEP_OVERLAP));
        // Where the last step stopped, as the store writes a time (`None`: where the last sweep got to, less the overlap).
        let mut from: Option<String> = None;
        let mut rows = 0;
        loop {
            let mut conn = self.0.db.write().await?;
            // The next runs past `from`, up to the retention: the last one's end is where this step stops.
            let step = conn
                .fetch_one(
                    "SELECT CAST(max(finished_at) AS TEXT) AS upto, count(*) AS runs FROM \
                     (SELECT finished_at FROM agent_chat_runs WHERE finished_at IS NOT NULL \
                     AND finished_at > COALESCE(CAST($3 AS {time}), (SELECT swept_to FROM agent_run_log_sweep) - {ms2}) \
                     AND finished_at <= {now} - {ms1} ORDER BY finished_at LIMIT $4) AS step",
                    &[
                        Arg::Int(retention),
                        Arg::Int(overlap),
                        Arg::OptText(from.as_deref()),
                        Arg::Int(SWEEP_STEP),
                    ],
                )
                .await?;
            let runs: i64 = step.get("runs")?;
            let Some(upto) = step.get::<Option<String>>("upto")? else {
                return Ok(rows);
            };
            // Every run that ended by then, those ended at the same time as the step's last one included. PostgreSQL
            // gets the runs as an array, so that it looks each one up by the log's key: on its plan for any parameters
            // a semi-join read the whole log to find a step's runs.
            let runs_of_step = "SELECT id FROM agent_chat_runs WHERE finished_at IS NOT NULL \
                 AND finished_at > COALESCE(CAST($1 AS {time}), (SELECT swept_to FROM agent_run_log_sweep) - {ms2}) \
                 AND finished_at <= CAST($3 AS {time})";
            let delete = if self.0.db.is_postgres() {
                format!("DELETE FROM agent_run_events WHERE run_id = ANY(ARRAY({runs_of_step}))")
            } else {
                format!("DELETE FROM agent_run_events WHERE run_id IN ({runs_of_step})")
            };
            rows += conn
                .execute(
                    &delete,
                    &[
                        Arg::OptText(from.as_deref()),
                        Arg::Int(overlap),
                        Arg::Text(&upto),
                    ],
                )
                .await?;
            conn.execute(
                "UPDATE agent_run_log_sweep SET swept_to = CAST($1 AS {time}) WHERE swept_to < CAST($1 AS {time})",
                &[Arg::Text(&upto)],
            )
            .await?;
            if runs < SWEEP_STEP {
                return Ok(rows);
            }
            from = Some(upto);
        }
    }

    /// Asks the replica producing the run to cancel it (PostgreSQL; one process has nobody else to ask).
    pub async fn notify_cancel(&self, run_id: Uuid) -> Result<(), StoreError> {
        self.notify_run(CANCEL_CHANNEL, run_id).await
    }

    /// Sends the run id on `channel` to every replica (PostgreSQL; one process has nobody else to tell).
    async fn notify_run(&self, channel: &str, run_id: Uuid) -> Result<(), StoreError> {
        if self.0.db.is_postgres() {
            let mut conn = self.0.db.write().await?;
            notify(&mut conn, channel, &run_id.to_string()).await?;
        }
        Ok(())
    }
}

async fn notify(
    conn: &mut super::db::Conn,
    channel: &str,
    payload: &str,
) -> Result<(), StoreError> {
    conn.execute(
        "SELECT pg_notify($1, $2)",
        &[Arg::Text(channel), Arg::Text(payload)],
    )
    .await?;
    Ok(())
}

/// The runs of `rows` the append did not store (`inserted` holds the `run_id` of each row it stored).
fn refused_of(rows: &[LogRow], inserted: &[Row]) -> Result<Vec<Uuid>, StoreError> {
    let mut stored = std::collections::HashSet::with_capacity(inserted.len());
    for row in inserted {
        stored.insert(row.uuid("run_id")?);
    }
    Ok(rows
        .iter()
        .map(|row| row.run_id)
        .filter(|run_id| !stored.contains(run_id))
        .collect())
}

/// The PostgreSQL group commit's statement on `conn` (see [`SessionStore::append_events_postgres`]): the ids of the
/// runs whose rows it stored, one per row stored.
pub(super) async fn append_on(conn: &mut Conn, rows: &[LogRow]) -> Result<Vec<Row>, StoreError> {
    let run_ids: Vec<Uuid> = rows.iter().map(|row| row.run_id).collect();
    let seqs: Vec<i64> = rows.iter().map(|row| to_i64(row.seq)).collect();
    let last_seqs: Vec<i64> = rows.iter().map(|row| to_i64(row.last_seq)).collect();
    let events: Vec<&str> = rows.iter().map(|row| row.events.as_str()).collect();
    let epochs: Vec<i64> = rows.iter().map(|row| to_i64(row.epoch)).collect();
    // The runs are key-share-locked under their epoch, so a claim (which locks them for update) waits for this
    // commit and then raises the epoch: nothing under the old one can land after it. They are locked by id, as a
    // claim locks them, so the two never wait for each other in a circle. The notifications go out
    // when the statement commits, and only for the rows stored; they carry the events of the runs followed on
    // another replica (`followed_at`, read from the row as locked: a note that a follower attaches, which locks
    // the run for update, is seen here once it commits).
    let carried = i64::try_from(CARRIED_BYTES).unwrap_or(i64::MAX);
    let separator = RECORD_SEPARATOR.to_string();
    conn.fetch_all(
        "WITH batch AS (SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::text[], \
         $5::bigint[]) WITH ORDINALITY AS b (run_id, seq, last_seq, events, epoch, n)), \
         held AS (SELECT r.id, r.followed_at IS NOT NULL AS followed FROM agent_chat_runs r \
         JOIN batch b ON r.id = b.run_id AND r.epoch = b.epoch ORDER BY r.id FOR KEY SHARE OF r), \
         stored AS (INSERT INTO agent_run_events (run_id, seq, last_seq, events) \
         SELECT run_id, seq, last_seq, events FROM batch WHERE run_id IN (SELECT id FROM held) \
         RETURNING run_id), \
         records AS (SELECT n, b.run_id || ' ' || b.seq || ' ' || b.last_seq \
         || CASE WHEN octet_length(b.events) <= $6 \
         AND b.run_id IN (SELECT id FROM held WHERE followed) \
         THEN E'\\n' || b.events ELSE '' END AS record \
         FROM batch b WHERE b.run_id IN (SELECT run_id FROM stored)), \
         chunked AS (SELECT n, record, sum(octet_length(record) + 1) OVER (ORDER BY n) / 4000 AS chunk \
         FROM records), \
         notified AS (SELECT pg_notify($7, string_agg(record, $8 ORDER BY n)) FROM chunked GROUP BY chunk) \
         SELECT run_id FROM stored WHERE (SELECT count(*) FROM notified) >= 0",
        &[
            Arg::Ids(&run_ids),
            Arg::Ints(&seqs),
            Arg::Ints(&last_seqs),
            Arg::Texts(&events),
            Arg::Ints(&epochs),
            Arg::Int(carried),
            Arg::Text(EVENTS_CHANNEL),
            Arg::Text(&separator),
        ],
    )
    .await
}
