//! A row of either backend, read in the store's own terms: SQLite keeps ids as UUID text, times as Unix milliseconds
//! and messages as JSON text; PostgreSQL has `uuid`, `timestamptz` and `jsonb`.

use sqlx::postgres::{PgRow, Postgres};
use sqlx::sqlite::{Sqlite, SqliteRow};
use sqlx::types::Json;
use sqlx::{Decode, Row as _, Type};
use time::OffsetDateTime;
use uuid::Uuid;

use super::StoreError;
use crate::model::Message;

/// A row of either backend.
#[derive(Debug)]
pub(super) enum Row {
    Sqlite(SqliteRow),
    Postgres(PgRow),
}

pub(super) fn rows<R>(rows: Vec<R>) -> Vec<Row>
where
    Row: From<R>,
{
    rows.into_iter().map(Row::from).collect()
}

impl From<SqliteRow> for Row {
    fn from(row: SqliteRow) -> Self {
        Self::Sqlite(row)
    }
}

impl From<PgRow> for Row {
    fn from(row: PgRow) -> Self {
        Self::Postgres(row)
    }
}

impl Row {
    /// A column whose type is the same in both backends (text, integers).
    pub fn get<T>(&self, column: &str) -> Result<T, StoreError>
    where
        T: for<'r> Decode<'r, Sqlite>
            + Type<Sqlite>
            + for<'r> Decode<'r, Postgres>
            + Type<Postgres>,
    {
        Ok(match self {
            Self::Sqlite(row) => row.try_get(column)?,
            Self::Postgres(row) => row.try_get(column)?,
        })
    }

    pub fn uuid(&self, column: &str) -> Result<Uuid, StoreError> {
        self.opt_uuid(column)?
            .ok_or_else(|| StoreError::Corrupt(format!("{column} is null")))
    }

    pub fn opt_uuid(&self, column: &str) -> Result<Option<Uuid>, StoreError> {
        match self {
            Self::Sqlite(row) => row
                .try_get::<Option<String>, _>(column)?
                .map(|text| {
                    Uuid::parse_str(&text)
                        .map_err(|e| StoreError::Corrupt(format!("{column} {text:?}: {e}")))
                })
                .transpose(),
            Self::Postgres(row) => Ok(row.try_get(column)?),
        }
    }

    pub fn time(&self, column: &str) -> Result<OffsetDateTime, StoreError> {
        self.opt_time(column)?
            .ok_or_else(|| StoreError::Corrupt(format!("{column} is null")))
    }

    pub fn opt_time(&self, column: &str) -> Result<Option<OffsetDateTime>, StoreError> {
        match self {
            Self::Sqlite(row) => row
                .try_get::<Option<i64>, _>(column)?
                .map(|ms| {
                    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
                        .map_err(|e| StoreError::Corrupt(format!("timestamp {ms}: {e}")))
                })
                .transpose(),
            Self::Postgres(row) => Ok(row.try_get(column)?),
        }
    }

    /// A JSON array of messages (PostgreSQL's `jsonb_agg`).
    pub fn messages(&self, column: &str) -> Result<Vec<Message>, StoreError> {
        self.json(column, "stored messages")
    }

    pub fn message(&self, column: &str) -> Result<Message, StoreError> {
        self.json(column, "stored message")
    }

    /// A JSON column: text in SQLite, `jsonb` in PostgreSQL; `what` names it when it does not read.
    fn json<T>(&self, column: &str, what: &str) -> Result<T, StoreError>
    where
        T: serde::de::DeserializeOwned,
    {
        let corrupt = |e: serde_json::Error| StoreError::Corrupt(format!("{what}: {e}"));
        match self {
            Self::Sqlite(row) => serde_json::from_str(row.try_get(column)?).map_err(corrupt),
            Self::Postgres(row) => {
                let Json(value) = row.try_get(column)?;
                Ok(value)
            }
        }
    }
}
