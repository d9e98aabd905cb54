//! Where the two backends differ: connections, how values are bound and read (rows: `row.rs`), and a few SQL
//! fragments.
//!
//! Queries are written once, with `$N` placeholders (SQLite reads `$N` as the Nth argument too) and `{token}`s for
//! the fragments that differ ([`sql`]). Values are bound as [`Arg`]s and read through [`Row`], which turn them
//! into each backend's own types: SQLite keeps ids as UUID text, times as Unix milliseconds and messages as JSON
//! text; PostgreSQL has `uuid`, `timestamptz` and `jsonb`. Times come from the database (`{now}`), so PostgreSQL
//! replicas with skewed clocks still agree on which heartbeats are stale.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use sqlx::pool::PoolConnection;
use sqlx::postgres::Postgres;
use sqlx::sqlite::Sqlite;
use sqlx::types::Json;
use sqlx::{AssertSqlSafe, Transaction};
use tokio::sync::Semaphore;
use uuid::Uuid;

use super::StoreError;
use super::postgres::{self, PgDb};
use super::row::{Row, rows};
use super::sqlite::SqliteDb;
use super::waits::PoolWaits;
use crate::model::Message;

/// The configured backend's connections, and how long taking one made requests wait.
#[derive(Debug, Clone)]
pub(super) struct Db {
    pub pools: Pools,
    waits: PoolWaits,
    turns: Turns,
}

/// The turns requests take to wait for a pooled connection (see [`Db::in_turn`]): as many as the pool has connections,
/// for the reads' pool and the writes' (on PostgreSQL one pool, so the same turns).
#[derive(Debug, Clone)]
struct Turns {
    read: Arc<Semaphore>,
    write: Arc<Semaphore>,
}

impl Turns {
    fn of(pools: &Pools) -> Self {
        fn turns<DB: sqlx::Database>(pool: &sqlx::Pool<DB>) -> Arc<Semaphore> {
            Arc::new(Semaphore::new(pool.options().get_max_connections() as usize))
        }
        match pools {
            Pools::Sqlite(db) => Self {
                read: turns(&db.readers),
                write: turns(&db.writer),
            },
            Pools::Postgres(db) => {
                let both = turns(&db.pool);
                Self {
                    read: both.clone(),
                    write: both,
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
pub(super) enum Pools {
    Sqlite(SqliteDb),
    Postgres(PgDb),
}

/// A value to bind, in the store's own terms.
#[derive(Debug)]
pub(super) enum Arg<'a> {
    Id(Uuid),
    /// Several ids, matched by `{id_in_list}`.
    Ids(&'a [Uuid]),
    /// Several integers, for `unnest` (PostgreSQL) or `json_each` (SQLite).
    Ints(&'a [i64]),
    /// Several texts, likewise.
    Texts(&'a [&'a str]),
    Text(&'a str),
    OptText(Option<&'a str>),
    Int(i64),
    Message(&'a Message),
}

/// A connection taken for a few statements, or a transaction.
#[derive(Debug)]
pub(super) enum Conn {
    Sqlite(PoolConnection<Sqlite>),
    Postgres(PoolConnection<Postgres>),
    SqliteTx(Transaction<'static, Sqlite>),
    PostgresTx(Transaction<'static, Postgres>),
}

impl Db {
    pub fn new(pools: Pools) -> Self {
        Self {
            turns: Turns::of(&pools),
            pools,
            waits: PoolWaits::default(),
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self.pools, Pools::Postgres(_))
    }

    /// The runtime this store's queues run on ([`crate::runtime::for_store`]).
    pub fn runtime(&self) -> tokio::runtime::Handle {
        crate::runtime::for_store(self.is_postgres())
    }

    pub fn waits(&self) -> &PoolWaits {
        &self.waits
    }

    /// A connection for reads (in SQLite, one of the read-only pool, beside the writer).
    pub async fn read(&self) -> Result<Conn, StoreError> {
        let acquiring = Self::in_turn(&self.turns.read, || match &self.pools {
            Pools::Sqlite(db) => Box::pin(async { Ok(Conn::Sqlite(db.readers.acquire().await?)) }),
            Pools::Postgres(db) => Box::pin(async { Ok(Conn::Postgres(db.pool.acquire().await?)) }),
        });
        self.waited(Box::pin(acquiring)).await
    }

    /// The connection for a write outside a transaction (in SQLite, the one writer).
    pub async fn write(&self) -> Result<Conn, StoreError> {
        self.waited(Box::pin(Self::in_turn(&self.turns.write, || {
            self.acquire_writer()
        })))
        .await
    }

    /// [`Self::write`]'s connection for run ends, which no client can be told to retry, its wait not counted: the ends
    /// queued for it count theirs ([`super::ends`]). When every connection of the pool is open and in use past the
    /// acquire timeout (thousands of runs ending at once, each batch of ends a commit), it waits on, up to
    /// [`PATIENT_WAIT`] in all, where a request would be refused. A pool that has not all its connections open when it
    /// times out could not open one (the store is unreachable), and the ends fail as a request would.
    pub async fn ender(&self) -> Result<Conn, StoreError> {
        let started = std::time::Instant::now();
        loop {
            match self.acquire_writer().await {
                Err(sqlx::Error::PoolTimedOut)
                    if self.writers_saturated() && started.elapsed() < PATIENT_WAIT => {}
                taken => return noted(self.is_postgres(), taken),
            }
        }
    }

    /// Whether every connection the pool of [`Self::write`] may open is open (all of them in use, if a wait for one
    /// just timed out).
    fn writers_saturated(&self) -> bool {
        fn saturated<DB: sqlx::Database>(pool: &sqlx::Pool<DB>) -> bool {
            pool.size() >= pool.options().get_max_connections()
        }
        match &self.pools {
            Pools::Sqlite(db) => saturated(&db.writer),
            Pools::Postgres(db) => saturated(&db.pool),
        }
    }

    /// [`Self::write`]'s connection for run starts, its wait not counted: the starts queued for it count theirs
    /// ([`super::starts`]).
    pub async fn starter(&self) -> Result<Conn, StoreError> {
        noted(self.is_postgres(), self.acquire_writer().await)
    }

    fn acquire_writer(&self) -> BoxFuture<'_, Result<Conn, sqlx::Error>> {
        match &self.pools {
            Pools::Sqlite(db) => Box::pin(async { Ok(Conn::Sqlite(db.writer.acquire().await?)) }),
            Pools::Postgres(db) => Box::pin(async { Ok(Conn::Postgres(db.pool.acquire().await?)) }),
        }
    }

    /// The connection for the run log's group commits: in SQLite the one writer, in PostgreSQL a connection of their
    /// own.
    pub async fn log_write(&self) -> Result<Conn, StoreError> {
        let acquiring: BoxFuture<'_, Result<Conn, sqlx::Error>> = match &self.pools {
            Pools::Sqlite(db) => Box::pin(async { Ok(Conn::Sqlite(db.writer.acquire().await?)) }),
            Pools::Postgres(db) => {
                if let Some(conn) = db.take_log() {
                    return Ok(Conn::Postgres(conn));
                }
                Box::pin(async { Ok(Conn::Postgres(db.log.acquire().await?)) })
            }
        };
        self.waited(acquiring).await
    }

    /// Gives back the run log's connection after a group commit of `statement_bytes` that succeeded: PostgreSQL keeps
    /// it for the next one (see [`PgDb::take_log`]); SQLite's one writer goes back to its pool, for the other writes.
    pub fn done_with_log(&self, conn: Conn, statement_bytes: usize) {
        if let (Pools::Postgres(db), Conn::Postgres(conn)) = (&self.pools, conn) {
            db.keep_log(conn, statement_bytes);
        }
    }

    /// The run log's writer has had nothing to commit for a while: PostgreSQL's kept connection goes back to its pool
    /// now, where its buffers go back to their first size, rather than with the next commit, which after a burst may
    /// be long in coming (a connection idle that long is checked before the next commit anyway).
    pub fn log_idle(&self) {
        if let Pools::Postgres(db) = &self.pools {
            db.give_back_log();
        }
    }

    /// Whether PostgreSQL keeps a connection for the run log's next commit.
    pub fn log_kept(&self) -> bool {
        matches!(&self.pools, Pools::Postgres(db) if db.keeps_log())
    }

    /// A write transaction, rolled back by [`Conn::rollback`] or when dropped (nothing here commits one).
    pub async fn begin(&self) -> Result<Conn, StoreError> {
        let beginning = Self::in_turn(&self.turns.write, || match &self.pools {
            Pools::Sqlite(db) => Box::pin(async { Ok(Conn::SqliteTx(db.writer.begin().await?)) }),
            Pools::Postgres(db) => Box::pin(async { Ok(Conn::PostgresTx(db.pool.begin().await?)) }),
        });
        self.waited(Box::pin(beginning)).await
    }

    /// A transaction on the run log's own connection (PostgreSQL's; SQLite's writer), rolled back as
    /// [`begin`](Self::begin)'s: the warm-up rehearses a group commit in it.
    pub async fn begin_log(&self) -> Result<Conn, StoreError> {
        match &self.pools {
            Pools::Sqlite(_) => self.begin().await,
            Pools::Postgres(db) => noted(true, db.log.begin().await.map(Conn::PostgresTx)),
        }
    }

    /// Takes a connection with `acquire` once a turn among `turns` is free, within the acquire timeout in all (then
    /// [`sqlx::Error::PoolTimedOut`], as the pool's own wait gives).
    ///
    /// The pool's wait for a connection is a large future (about 14.5 KB on PostgreSQL, boxed by `acquire`), made here
    /// only in a turn, and given back with the turn as soon as it has its connection (the wait for a turn is boxed
    /// too, by the callers, so that their own futures stay small, but it is a few hundred bytes). Thousands of requests waiting at
    /// once (the clients of a burst leaving together, each run's end a write, and before it a read) each held one:
    /// 145 MB for 10,000, each an allocation of its own in the allocator, whose record of it it keeps for good.
    async fn in_turn<'a>(
        turns: &Semaphore,
        acquire: impl FnOnce() -> BoxFuture<'a, Result<Conn, sqlx::Error>>,
    ) -> Result<Conn, sqlx::Error> {
        let taken = tokio::time::timeout(super::ACQUIRE_TIMEOUT, async {
            let _turn = turns.acquire().await.expect("the turns are never closed");
            acquire().await
        });
        taken.await.unwrap_or(Err(sqlx::Error::PoolTimedOut))
    }

    /// Takes a connection, counting the wait (a transaction's `BEGIN` included).
    async fn waited(
        &self,
        acquiring: BoxFuture<'_, Result<Conn, sqlx::Error>>,
    ) -> Result<Conn, StoreError> {
        let started = std::time::Instant::now();
        let taken = acquiring.await;
        if matches!(taken, Err(sqlx::Error::PoolTimedOut)) {
            self.waits.gave_up(started);
        } else {
            self.waits.waited(started);
        }
        // A transaction's `BEGIN` is its first statement.
        noted(self.is_postgres(), taken)
    }

    /// See [`SqliteDb::closing_soon`]; PostgreSQL has nothing to prepare.
    pub fn closing_soon(&self) {
        if let Pools::Sqlite(db) = &self.pools {
            db.closing_soon();
        }
    }

    pub async fn close(&self) {
        match &self.pools {
            Pools::Sqlite(db) => db.close().await,
            Pools::Postgres(db) => db.close().await,
        }
    }
}

/// How long [`Db::ender`] waits in all for a connection of a pool whose every connection is in use.
const PATIENT_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// The SQL of `template` for this backend: its `{token}`s replaced by the backend's fragment.
///
/// | token | SQLite | PostgreSQL |
/// |---|---|---|
/// | `{now}` | Unix milliseconds, from the database | `now()` |
/// | `{ms1}`, `{ms2}` | the milliseconds bound as `$1` / `$2` | an interval of that many milliseconds |
/// | `{id_in_list}` | `id IN` the JSON array bound | `id = ANY` the array bound |
/// | `{order}` | `rowid` (insertion order) | `id` |
/// | `{for_update}` | nothing (one writer at a time) | `FOR UPDATE` |
/// | `{for_no_key_update}` | nothing | `FOR NO KEY UPDATE` (what an update of columns other than the key takes) |
/// | `{time}` | `INTEGER` (Unix milliseconds) | `TIMESTAMPTZ` |
fn sql(conn: &Conn, template: &str) -> String {
    let sqlite = matches!(conn, Conn::Sqlite(_) | Conn::SqliteTx(_));
    let fragments: [(&str, &str); 8] = if sqlite {
        [
            ("{now}", "CAST(unixepoch('subsec') * 1000 AS INTEGER)"),
            ("{ms1}", "$1"),
            ("{ms2}", "$2"),
            ("{id_in_list}", "id IN (SELECT value FROM json_each($1))"),
            ("{order}", "rowid"),
            ("{for_update}", ""),
            ("{for_no_key_update}", ""),
            ("{time}", "INTEGER"),
        ]
    } else {
        [
            ("{now}", "now()"),
            (
                "{ms1}",
                "(CAST($1 AS DOUBLE PRECISION) * interval '1 millisecond')",
            ),
            (
                "{ms2}",
                "(CAST($2 AS DOUBLE PRECISION) * interval '1 millisecond')",
            ),
            ("{id_in_list}", "id = ANY($1)"),
            ("{order}", "id"),
            ("{for_update}", "FOR UPDATE"),
            ("{for_no_key_update}", "FOR NO KEY UPDATE"),
            ("{time}", "TIMESTAMPTZ"),
        ]
    };
    // Most queries hold one token or none: replace only what is there, rather than copy the text once per token.
    let mut sql = template.to_owned();
    for (token, fragment) in fragments {
        if sql.contains(token) {
            sql = sql.replace(token, fragment);
        }
    }
    sql
}

/// Binds `args` in order to a query of either backend (a macro: the two query types share no trait for `bind`).
macro_rules! bind_args {
    ($query:expr, $args:expr, $id:expr, $ids:expr, $list:expr, $message:expr) => {{
        let mut query = $query;
        for arg in $args {
            query = match arg {
                Arg::Id(id) => query.bind($id(*id)),
                Arg::Ids(ids) => query.bind($ids(ids)?),
                Arg::Ints(ints) => query.bind($list(ints)?),
                Arg::Texts(texts) => query.bind($list(texts)?),
                Arg::Text(text) => query.bind(*text),
                Arg::OptText(text) => query.bind(*text),
                Arg::Int(n) => query.bind(*n),
                Arg::Message(message) => query.bind($message(message)?),
            };
        }
        query
    }};
}

fn sqlite_id(id: Uuid) -> String {
    id.to_string()
}

fn sqlite_ids(ids: &[Uuid]) -> Result<String, StoreError> {
    let ids: Vec<String> = ids.iter().map(Uuid::to_string).collect();
    serde_json::to_string(&ids).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn sqlite_message(message: &Message) -> Result<String, StoreError> {
    serde_json::to_string(message)
        .map_err(|e| StoreError::Corrupt(format!("message does not serialize: {e}")))
}

fn sqlite_list<T: serde::Serialize>(items: &[T]) -> Result<String, StoreError> {
    serde_json::to_string(items).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn pg_list<T: Clone>(items: &[T]) -> Result<Vec<T>, StoreError> {
    Ok(items.to_vec())
}

fn pg_ids(ids: &[Uuid]) -> Result<Vec<Uuid>, StoreError> {
    Ok(ids.to_vec())
}

fn pg_message(message: &Message) -> Result<Json<&Message>, StoreError> {
    Ok(Json(message))
}

impl Conn {
    /// Runs a statement; how many rows it changed.
    pub async fn execute(&mut self, template: &str, args: &[Arg<'_>]) -> Result<u64, StoreError> {
        let sql = AssertSqlSafe(sql(self, template));
        let postgres = self.is_postgres();
        // Each backend's query future is boxed: held inline, the largest of them would sit in the state of every
        // future that reads or writes the store (several KiB in every run's task).
        let running: BoxFuture<'_, Result<u64, sqlx::Error>> = match self {
            Self::Sqlite(conn) => {
                let query = sqlite_query(sql, args)?;
                Box::pin(async move { Ok(query.execute(&mut **conn).await?.rows_affected()) })
            }
            Self::SqliteTx(tx) => {
                let query = sqlite_query(sql, args)?;
                Box::pin(async move { Ok(query.execute(&mut **tx).await?.rows_affected()) })
            }
            Self::Postgres(conn) => {
                let query = pg_query(sql, args)?;
                Box::pin(async move { Ok(query.execute(&mut **conn).await?.rows_affected()) })
            }
            Self::PostgresTx(tx) => {
                let query = pg_query(sql, args)?;
                Box::pin(async move { Ok(query.execute(&mut **tx).await?.rows_affected()) })
            }
        };
        noted(postgres, running.await)
    }

    pub async fn fetch_all(
        &mut self,
        template: &str,
        args: &[Arg<'_>],
    ) -> Result<Vec<Row>, StoreError> {
        let sql = AssertSqlSafe(sql(self, template));
        let postgres = self.is_postgres();
        let running: BoxFuture<'_, Result<Vec<Row>, sqlx::Error>> = match self {
            Self::Sqlite(conn) => {
                let query = sqlite_query(sql, args)?;
                Box::pin(async move { Ok(rows(query.fetch_all(&mut **conn).await?)) })
            }
            Self::SqliteTx(tx) => {
                let query = sqlite_query(sql, args)?;
                Box::pin(async move { Ok(rows(query.fetch_all(&mut **tx).await?)) })
            }
            Self::Postgres(conn) => {
                let query = pg_query(sql, args)?;
                Box::pin(async move { Ok(rows(query.fetch_all(&mut **conn).await?)) })
            }
            Self::PostgresTx(tx) => {
                let query = pg_query(sql, args)?;
                Box::pin(async move { Ok(rows(query.fetch_all(&mut **tx).await?)) })
            }
        };
        noted(postgres, running.await)
    }

    pub async fn fetch_optional(
        &mut self,
        template: &str,
        args: &[Arg<'_>],
    ) -> Result<Option<Row>, StoreError> {
        Ok(self.fetch_all(template, args).await?.into_iter().next())
    }

    pub async fn fetch_one(&mut self, template: &str, args: &[Arg<'_>]) -> Result<Row, StoreError> {
        self.fetch_optional(template, args).await?.ok_or_else(|| {
            StoreError::Corrupt("a query that always answers gave no row".to_owned())
        })
    }

    /// Runs `template`, a script of statements that begins and commits its own transaction, in one trip to the
    /// connection (SQLite: one wake-up of its thread and of this task, where a transaction of separate statements
    /// holds the single writer idle between them); the rows of all its statements. A script that fails part-way
    /// may leave its transaction open: the connection is then closed instead of going back to the pool (closing
    /// rolls the transaction back), and the pool opens another.
    pub async fn script(
        &mut self,
        template: &str,
        args: &[Arg<'_>],
    ) -> Result<Vec<Row>, StoreError> {
        let ran = self.fetch_all(template, args).await;
        if ran.is_err() {
            match self {
                Self::Sqlite(conn) => conn.close_on_drop(),
                Self::Postgres(conn) => conn.close_on_drop(),
                Self::SqliteTx(_) | Self::PostgresTx(_) => {}
            }
        }
        ran
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, Self::Postgres(_) | Self::PostgresTx(_))
    }

    /// Rolls a transaction back now (dropped, it would roll back only when its connection is next used); a plain
    /// connection has nothing to roll back.
    pub async fn rollback(self) -> Result<(), StoreError> {
        let rolling_back: BoxFuture<'static, Result<(), sqlx::Error>> = match self {
            Self::SqliteTx(tx) => Box::pin(tx.rollback()),
            Self::PostgresTx(tx) => Box::pin(tx.rollback()),
            Self::Sqlite(_) | Self::Postgres(_) => return Ok(()),
        };
        Ok(rolling_back.await?)
    }
}

/// A statement's `result` as the store's; on PostgreSQL, a connection found lost is noted, so the pool checks the
/// others before their next use.
fn noted<T>(postgres: bool, result: Result<T, sqlx::Error>) -> Result<T, StoreError> {
    if let (true, Err(error)) = (postgres, &result) {
        postgres::note_if_lost(error);
    }
    Ok(result?)
}

type SqliteQuery<'q> = sqlx::query::Query<'q, Sqlite, <Sqlite as sqlx::Database>::Arguments>;
type PgQuery<'q> = sqlx::query::Query<'q, Postgres, <Postgres as sqlx::Database>::Arguments>;

fn sqlite_query<'q>(
    sql: AssertSqlSafe<String>,
    args: &'q [Arg<'q>],
) -> Result<SqliteQuery<'q>, StoreError> {
    Ok(bind_args!(
        sqlx::query::<Sqlite>(sql),
        args,
        sqlite_id,
        sqlite_ids,
        sqlite_list,
        sqlite_message
    ))
}

fn pg_query<'q>(
    sql: AssertSqlSafe<String>,
    args: &'q [Arg<'q>],
) -> Result<PgQuery<'q>, StoreError> {
    Ok(bind_args!(
        sqlx::query::<Postgres>(sql),
        args,
        std::convert::identity,
        pg_ids,
        pg_list,
        pg_message
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Requests waiting together make the pool's large wait for a connection only in a turn: as many at once as there
    /// are turns, however many wait; the others wait for a turn, and get theirs as the first are served.
    #[tokio::test]
    async fn only_requests_in_a_turn_make_the_pools_wait() {
        #[derive(Default)]
        struct Counts {
            made: AtomicUsize,
            in_flight: AtomicUsize,
            most: AtomicUsize,
        }
        let turns = Arc::new(Semaphore::new(4));
        let counts = Arc::new(Counts::default());
        let served = Arc::new(tokio::sync::Notify::new());
        let requests: Vec<_> = (0..100)
            .map(|_| {
                let (turns, counts, served) = (turns.clone(), counts.clone(), served.clone());
                tokio::spawn(async move {
                    Db::in_turn(&turns, || {
                        counts.made.fetch_add(1, Ordering::SeqCst);
                        let now = counts.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                        counts.most.fetch_max(now, Ordering::SeqCst);
                        Box::pin(async {
                            served.notified().await;
                            counts.in_flight.fetch_sub(1, Ordering::SeqCst);
                            Err(sqlx::Error::PoolClosed)
                        })
                    })
                    .await
                })
            })
            .collect();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        // Every request is waiting: four made the pool's wait.
        assert_eq!(counts.made.load(Ordering::SeqCst), 4);
        for _ in 0..1_000 {
            if requests.iter().all(|request| request.is_finished()) {
                break;
            }
            served.notify_waiters();
            tokio::task::yield_now().await;
        }
        for request in requests {
            assert!(matches!(
                request.await.unwrap(),
                Err(sqlx::Error::PoolClosed)
            ));
        }
        assert_eq!(counts.made.load(Ordering::SeqCst), 100);
        assert_eq!(counts.most.load(Ordering::SeqCst), 4);
    }

    /// A request that waits for a turn past the acquire timeout gives up as the pool's own wait does.
    #[tokio::test(start_paused = true)]
    async fn a_request_waiting_past_the_timeout_for_a_turn_gives_up() {
        let turns = Semaphore::new(0);
        let taken = Db::in_turn(&turns, || unreachable!("no turn was free")).await;
        assert!(matches!(taken, Err(sqlx::Error::PoolTimedOut)), "{taken:?}");
    }
}
