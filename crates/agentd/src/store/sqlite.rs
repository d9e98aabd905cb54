//! The embedded store: one SQLite file, in WAL mode so readers never wait for the writer, with a busy timeout so
//! writers queue rather than fail. Ids are UUID text and times Unix milliseconds (UTC). Meant for one process;
//! replicas share a PostgreSQL store instead. The queries are the same as PostgreSQL's (`chats.rs`, `runs.rs`).

use std::sync::Arc;
use std::time::Duration;

use sqlx::Connection;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use tokio_util::sync::CancellationToken;

use super::{ACQUIRE_TIMEOUT, StoreError};

/// How long a writer waits for another writer before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECTIONS: u32 = 8;

/// How often the WAL is checkpointed into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);
/// WAL frames (pages written) past which a checkpoint starts the WAL over, holding the writer and waiting for its
/// readers: about 32 MiB of 4 KiB pages, as `journal_size_limit`.
const RESTART_AFTER_FRAMES: i64 = 8_192;
/// Once the process is closing ([`SqliteDb::closing_soon`]), the WAL is started over past about 1 MiB, and kept to
/// that size: the WAL is emptied at exit, and truncating a file of up to 32 MiB (the kernel freeing the pages it
/// caches) took 35-60 ms of the time between the last stream's end and the exit. Starting it over this often costs
/// the writer 2-3 ms a time, so not while serving.
const CLOSING_RESTART_AFTER_FRAMES: i64 = 256;
const CLOSING_WAL_LIMIT: &str = "PRAGMA journal_size_limit = 1048576";

#[derive(Debug, Clone)]
pub(super) struct SqliteDb {
    /// Reads, several at once (WAL lets them run beside the writer).
    pub readers: SqlitePool,
    /// Every write, through one connection: SQLite has one writer at a time anyway, and queueing here is far cheaper
    /// than connections retrying for the lock in SQLite's busy handler.
    pub writer: SqlitePool,
    /// The background checkpointer, stopped by `close`.
    checkpoints: Arc<tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
    stop_checkpoints: CancellationToken,
    /// Cancelled by `closing_soon`: the checkpointer keeps the WAL small from then on.
    closing_soon: CancellationToken,
}

/// Opens the file (creating it if missing) and applies the SQLite migrations.
pub(super) async fn open(options: SqliteConnectOptions) -> Result<SqliteDb, StoreError> {
    let options = options
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(BUSY_TIMEOUT)
        .foreign_keys(true);
    // Checkpoints run beside the writer, not inside its commits, where they would stall a run's first write.
    // A file on a local disk does not hang up: no check before each use (a trip to the connection's thread).
    let writer = SqlitePoolOptions::new()
        .max_connections(1)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .acquire_slow_level(log::LevelFilter::Off)
        .test_before_acquire(false)
        .connect_with(
            options
                .clone()
                .pragma("wal_autocheckpoint", "0")
                .pragma("journal_size_limit", "33554432"),
        )
        .await?;
    super::migrate(sqlx::migrate!("../../migrations/sqlite"), &writer).await?;
    let readers = SqlitePoolOptions::new()
        .max_connections(MAX_CONNECTIONS)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .acquire_slow_level(log::LevelFilter::Off)
        .test_before_acquire(false)
        .connect_with(options.clone().read_only(true))
        .await?;
    let checkpointer = SqliteConnection::connect_with(&options).await?;
    let stop_checkpoints = CancellationToken::new();
    let closing_soon = CancellationToken::new();
    let checkpoints = tokio::spawn(checkpoint(
        checkpointer,
        writer.clone(),
        stop_checkpoints.clone(),
        closing_soon.clone(),
    ));
    Ok(SqliteDb {
        readers,
        writer,
        checkpoints: Arc::new(tokio::sync::Mutex::new(Some(checkpoints))),
        stop_checkpoints,
        closing_soon,
    })
}

/// Copies the WAL into the database file every 200 ms without blocking the writer, and empties it at the end; keeps it
/// small once `closing_soon` is cancelled.
async fn checkpoint(
    mut connection: SqliteConnection,
    writer: SqlitePool,
    stop: CancellationToken,
    closing_soon: CancellationToken,
) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The writer keeps the WAL to `CLOSING_WAL_LIMIT` (once closing).
    let mut limited = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => break,
        }
        // (busy, frames in the WAL, frames copied back)
        let frames = match sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(&mut connection)
            .await
        {
            Ok((_, frames, _)) => frames,
            Err(error) => {
                tracing::warn!(%error, "SQLite checkpoint failed");
                continue;
            }
        };
        // A writer that is never idle for a period never finds the WAL all copied back, so SQLite never starts it
        // over: past a bound, start it over on purpose, on the writer's own connection, queued like any write. What
        // is left to copy then is what was written since the passive checkpoint above: the writer is held for 2-3 ms.
        // Not from this connection, where the checkpoint and the writer would wait for each other's lock in SQLite's
        // busy handler, which sleeps in steps of milliseconds; and not by truncating the file, which took 17-19 ms
        // (`journal_size_limit` trims it when SQLite starts it over).
        let restart_after = if closing_soon.is_cancelled() {
            if !limited {
                limited = limit_wal(&writer).await;
            }
            CLOSING_RESTART_AFTER_FRAMES
        } else {
            RESTART_AFTER_FRAMES
        };
        if frames > restart_after {
            restart_wal(&writer, frames).await;
        }
    }
    if let Err(error) = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&mut connection)
        .await
    {
        tracing::warn!(%error, "final SQLite checkpoint failed");
    }
    let _ = connection.close().await;
}

/// Has the writer trim the WAL to 1 MiB whenever it starts it over (SQLite does when its first transaction after a
/// complete checkpoint commits): whether it is done, or need not be (closed).
async fn limit_wal(writer: &SqlitePool) -> bool {
    let limited = async {
        let mut connection = writer.acquire().await?;
        sqlx::query(CLOSING_WAL_LIMIT)
            .execute(&mut *connection)
            .await
    };
    match limited.await {
        Ok(_) | Err(sqlx::Error::PoolClosed) => true,
        Err(error) => {
            tracing::warn!(%error, "SQLite WAL limit not set; trying again");
            false
        }
    }
}

/// Copies the rest of the WAL back and starts it over, holding the writer; waits for readers still in the WAL.
async fn restart_wal(writer: &SqlitePool, frames: i64) {
    let restarted = async {
        let mut connection = writer.acquire().await?;
        sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(RESTART)")
            .fetch_one(&mut *connection)
            .await
    };
    match restarted.await {
        Ok((0, _, _)) => tracing::debug!(frames, "SQLite WAL started over"),
        Ok(_) => tracing::warn!(frames, "SQLite WAL not started over: readers stayed busy"),
        // Closing: the final checkpoint empties it.
        Err(sqlx::Error::PoolClosed) => {}
        Err(error) => tracing::warn!(%error, "SQLite checkpoint failed"),
    }
}

impl SqliteDb {
    /// The process will close soon (its drain began): from now on the WAL is kept small, so that emptying it at the
    /// end is short.
    pub fn closing_soon(&self) {
        self.closing_soon.cancel();
    }

    /// Closes the pools, then empties the WAL into the database file.
    pub async fn close(&self) {
        self.readers.close().await;
        self.writer.close().await;
        self.stop_checkpoints.cancel();
        if let Some(task) = self.checkpoints.lock().await.take() {
            let _ = task.await;
        }
    }
}
