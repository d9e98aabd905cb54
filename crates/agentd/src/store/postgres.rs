//! The shared store: PostgreSQL through a connection pool, for several replicas. The queries are the same as
//! SQLite's (`chats.rs`, `runs.rs`); `db.rs` says where the backends differ.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use super::StoreError;

/// How long a request waits for a connection before the store counts as unavailable.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
const MAX_CONNECTIONS: u32 = 16;

/// Connects and applies the PostgreSQL migrations.
pub(super) async fn open(options: PgConnectOptions) -> Result<PgPool, StoreError> {
    let pool = PgPoolOptions::new()
        .max_connections(MAX_CONNECTIONS)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_with(options)
        .await?;
    sqlx::migrate!("../../migrations/postgres")
        .run(&pool)
        .await?;
    Ok(pool)
}
