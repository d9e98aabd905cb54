//! Notifications between replicas (PostgreSQL `LISTEN`/`NOTIFY`): one connection per process.

use sqlx::postgres::PgListener;

use super::db::Pools;
use super::{SessionStore, StoreError};

/// A connection listening on some channels.
#[derive(Debug)]
pub struct Listener(PgListener);

impl SessionStore {
    /// Listens on `channels`; `None` with SQLite, where one process has nobody to hear from.
    pub async fn listen(&self, channels: &[&str]) -> Result<Option<Listener>, StoreError> {
        let Pools::Postgres(db) = &self.0.db.pools else {
            return Ok(None);
        };
        let mut listener = PgListener::connect_with(&db.listen).await?;
        listener.listen_all(channels.iter().copied()).await?;
        Ok(Some(Listener(listener)))
    }
}

impl Listener {
    /// The next notification as `(channel, payload)`; `None` when the connection was lost, so notifications may
    /// have been missed (the next call connects again).
    pub async fn recv(&mut self) -> Result<Option<(String, String)>, StoreError> {
        Ok(self
            .0
            .try_recv()
            .await?
            .map(|n| (n.channel().to_owned(), n.payload().to_owned())))
    }
}
