//! The shared store: PostgreSQL through a connection pool, for several replicas. The queries are the same as
//! SQLite's (`chats.rs`, `runs.rs`); `db.rs` says where the backends differ.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, Postgres};
use sqlx::{AssertSqlSafe, Connection, Executor};

use super::{ACQUIRE_TIMEOUT, StoreError};

pub(super) const MAX_CONNECTIONS: u32 = 16;
/// The run log's group commits: one at a time per process, so one connection.
const LOG_CONNECTIONS: u32 = 1;

/// How the connections other than the run log's plan their statements (see [`pool_options`]).
const GENERIC_PLANS: &str = "force_generic_plan";
/// The run log's kept connection keeps its buffers as a statement up to this size grew them; a larger one shrinks them.
const KEPT_BUFFERS: usize = 256 * 1024;
/// A pooled connection idle longer than this is pinged before use.
const CHECK_IDLE_AFTER: Duration = Duration::from_secs(1);

/// When a statement of this process last found its PostgreSQL connection lost, in microseconds since [`EPOCH`] (0:
/// never). A server that restarts, or ends agentd's sessions, takes every connection with it, those used a moment
/// ago too, which [`CHECK_IDLE_AFTER`] lets through unchecked: a connection idle since before the loss is checked
/// before its next use, and the pool replaces it if it is gone. One statement fails; the next ones do not.
static LOST_AT: AtomicU64 = AtomicU64::new(0);
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Notes a statement's `error` that says its connection is gone (see [`LOST_AT`]): the server went away or ended
/// the session (connection exceptions, 08; a shutdown, a crash, a terminated or timed-out session, 57P), or the bytes
/// stopped making sense. A cancelled statement (57014) leaves its connection usable.
pub(super) fn note_if_lost(error: &sqlx::Error) {
    let lost = match error {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(error) => error
            .code()
            .is_some_and(|code| code.starts_with("08") || code.starts_with("57P")),
        _ => false,
    };
    if lost {
        LOST_AT.fetch_max(micros_since_epoch(Instant::now()), Ordering::Relaxed);
    }
}

/// Whether a connection idle for `idle_for` was last used before a connection was found lost.
fn idle_since_a_loss(idle_for: Duration) -> bool {
    let lost = LOST_AT.load(Ordering::Relaxed);
    lost != 0
        && Instant::now()
            .checked_sub(idle_for)
            .is_none_or(|released| micros_since_epoch(released) <= lost)
}

/// Microseconds from [`EPOCH`] to `at`, plus one (so that no time is 0); times before it count as 1.
fn micros_since_epoch(at: Instant) -> u64 {
    let micros = at.saturating_duration_since(*EPOCH).as_micros();
    u64::try_from(micros).unwrap_or(u64::MAX - 1) + 1
}

#[derive(Debug, Clone)]
pub(super) struct PgDb {
    /// Requests, runs and everything else.
    pub pool: PgPool,
    /// The run log's group commits, on a connection of their own: every run's events wait for the commit, which
    /// would otherwise queue for a connection behind a burst of run starts.
    pub log: PgPool,
    /// The `LISTEN` connection (it is never given back), apart from the pool so that it takes none of the pool's.
    pub listen: PgPool,
    /// The run log's connection as the last group commit left it. A connection given back to a pool is checked
    /// there with a round trip to the server, and the next commit waits for it: group commits one after another keep
    /// it instead, and one that comes after a pause takes it from the pool, checked as any other.
    held_log: Arc<Mutex<Option<HeldConnection>>>,
}

#[derive(Debug)]
struct HeldConnection {
    conn: PoolConnection<Postgres>,
    since: Instant,
}

impl PgDb {
    /// The run log's connection kept by the last group commit, if it is fit for the next one without a check: used
    /// under [`CHECK_IDLE_AFTER`] ago, and not since a connection was found lost. One that is not goes back to the
    /// pool (and is checked there).
    pub fn take_log(&self) -> Option<PoolConnection<Postgres>> {
        let held = self.held_log.lock().expect("held connection lock").take()?;
        let idle_for = held.since.elapsed();
        (idle_for <= CHECK_IDLE_AFTER && !idle_since_a_loss(idle_for)).then_some(held.conn)
    }

    /// Keeps the run log's connection for the next group commit (see [`PgDb::take_log`]). Its buffers keep the size
    /// of the statement it sent, as in the pool, only up to [`KEPT_BUFFERS`]: a kept connection may be the last one
    /// a burst used for a long while.
    pub fn keep_log(&self, mut conn: PoolConnection<Postgres>, statement_bytes: usize) {
        if statement_bytes > KEPT_BUFFERS {
            conn.shrink_buffers();
        }
        *self.held_log.lock().expect("held connection lock") = Some(HeldConnection {
            conn,
            since: Instant::now(),
        });
    }

    /// Gives the run log's kept connection back to its pool, if one is kept: the writer has nothing to commit (see
    /// [`super::db::Db::log_idle`]).
    pub fn give_back_log(&self) {
        drop(self.held_log.lock().expect("held connection lock").take());
    }

    pub fn keeps_log(&self) -> bool {
        self.held_log
            .lock()
            .expect("held connection lock")
            .is_some()
    }

    pub async fn close(&self) {
        // A pool closes once its connections are back.
        self.give_back_log();
        self.pool.close().await;
        self.log.close().await;
        self.listen.close().await;
    }

    /// Replaces the pool with one of `connections`, once the server has refused more: a pool sized beyond what the
    /// server grants opens another connection whenever all of its own are in use, and waits out the whole acquire
    /// timeout on a connection the server keeps refusing while one of its own comes back a moment later. A pool of
    /// what the server grants waits for one of its own instead.
    ///
    /// The new pool connects on first use: its connections are the old one's, given back to the server first.
    pub async fn resize(&mut self, connections: u32) {
        let options = self.pool.connect_options();
        self.pool.close().await;
        self.pool = pool_options(connections, GENERIC_PLANS).connect_lazy_with((*options).clone());
    }
}

/// Connects and applies the PostgreSQL migrations.
pub(super) async fn open(options: PgConnectOptions) -> Result<PgDb, StoreError> {
    let pool = pool_options(MAX_CONNECTIONS, GENERIC_PLANS)
        .connect_with(options.clone())
        .await?;
    super::migrate(sqlx::migrate!("../../migrations/postgres"), &pool).await?;
    let log = pool_options(LOG_CONNECTIONS, "force_custom_plan")
        .connect_with(options.clone())
        .await?;
    let listen = pool_options(1, GENERIC_PLANS).connect_with(options).await?;
    Ok(PgDb {
        pool,
        log,
        listen,
        held_log: Arc::default(),
    })
}

fn pool_options(connections: u32, plans: &'static str) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(connections)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        // agentd notes slow waits itself, a few lines for a burst's thousands (`waits::PoolWaits::waited`).
        .acquire_slow_level(log::LevelFilter::Off)
        // The connections are opened and readied before the process serves (`SessionStore::warm_up`) and kept: closed
        // after some idle minutes or at an age, as the pool does by default, a quiet replica's next requests would
        // each wait for a new server process to start and compile the run functions. One that broke is replaced when
        // the check below finds it.
        .idle_timeout(None)
        .max_lifetime(None)
        // The server plans a prepared statement anew for each of its first five runs on a connection before it
        // settles on a plan for any parameters; agentd's statements find rows by key, so the plan for any parameters
        // is the plan, and a connection has it from its first run (its warm-up) rather than after five of a burst's.
        // The run log's group commit is planned at each commit instead (`plans`): it joins thousands of rows to their
        // runs, where reading the runs whole is the better plan while they are few and the worse by far once they are
        // many, and a plan for any parameters, made once on a new database's empty store, read every run there was at
        // each commit for as long as the connection lived.
        .after_connect(move |conn, _| {
            Box::pin(async move {
                conn.execute(AssertSqlSafe(format!("SET plan_cache_mode = {plans}")))
                    .await?;
                Ok(())
            })
        })
        // A connection is checked when it goes back to the pool anyway; one used a moment ago is not checked again on
        // the way out (a round trip before every statement), only one that sat idle long enough for the server to
        // have gone away, or since another was found lost.
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for > CHECK_IDLE_AFTER || idle_since_a_loss(meta.idle_for) {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
        // A connection's buffers grow to its largest statement and answer (a group commit of thousands of events, the
        // lease of every run at the end of a burst) and would keep that size as long as the connection lives: they go
        // back to their first size when it is given back (nothing to do for the usual small ones).
        .after_release(|conn, _| {
            Box::pin(async move {
                conn.shrink_buffers();
                Ok(true)
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_kept_however_long_they_sit_idle() {
        for connections in [1, MAX_CONNECTIONS] {
            let options = pool_options(connections, GENERIC_PLANS);
            assert_eq!(options.get_idle_timeout(), None);
            assert_eq!(options.get_max_lifetime(), None);
            assert_eq!(options.get_max_connections(), connections);
        }
    }
}
