//! SQLite scripts of several run starts, ends or releases: one transaction, one trip to the writer's thread.
//!
//! Every SQLite write goes through its one writer connection, on a thread of its own: each statement sent is a
//! wake-up of that thread and of the task waiting for it, and each commit appends every page it touched to the WAL.
//! Starts, ends and releases that arrive together are sent as one script: `BEGIN IMMEDIATE`, each one's statements
//! with its own arguments, `COMMIT`. A script's text depends on how many it holds, so there are a few sizes, each
//! prepared once, and a batch is sent as scripts of those sizes, the largest first.

use super::StoreError;
use super::db::{Arg, Conn};
use super::row::Row;

/// How many a script holds, largest first; a batch is sent as scripts of these sizes.
pub(super) const SCRIPT_SIZES: [usize; 5] = [16, 8, 4, 2, 1];

/// The most a batch sent as scripts holds.
pub(super) const MAX_SCRIPT: usize = SCRIPT_SIZES[0];

/// The scripts of one kind of statements, one per size in [`SCRIPT_SIZES`].
pub(super) struct Scripts(Vec<String>);

impl Scripts {
    /// The scripts of `block`: the statements of one (`$1`..`$args` its arguments; `{place}` its place in the
    /// script, which tags the rows it answers with).
    pub fn new(block: &str, args: usize) -> Self {
        Self(
            SCRIPT_SIZES
                .iter()
                .map(|&size| {
                    let mut script = String::from("BEGIN IMMEDIATE; ");
                    for place in 0..size {
                        let statements = block.replace("{place}", &place.to_string());
                        script.push_str(&renumbered(&statements, place * args));
                    }
                    script.push_str("COMMIT");
                    script
                })
                .collect(),
        )
    }

    /// The script of `size` (one of [`SCRIPT_SIZES`]).
    pub fn of(&self, size: usize) -> &str {
        let at = SCRIPT_SIZES
            .iter()
            .position(|&of| of == size)
            .expect("a script of one of the sizes");
        &self.0[at]
    }
}

/// Takes from the front of `waiting` (not empty) what one call makes: all of it on PostgreSQL (one call of a function
/// that takes them all), the largest script's worth that fits on SQLite.
pub(super) fn take_call<T>(postgres: bool, waiting: &mut Vec<T>) -> Vec<T> {
    let size = if postgres {
        waiting.len()
    } else {
        script_size(waiting.len())
    };
    let rest = waiting.split_off(size);
    std::mem::replace(waiting, rest)
}

/// The size of the script that takes the first of `waiting` (at least one): the largest that fits.
fn script_size(waiting: usize) -> usize {
    SCRIPT_SIZES
        .into_iter()
        .find(|&size| size <= waiting)
        .unwrap_or(1)
}

/// Runs `script` on `conn` (the writer): the rows of all its statements. A statement that failed leaves the script's
/// transaction open on the connection (which is closed rather than given back): it is rolled back, so that what the
/// script held can be made again one by one on it. Nothing to roll back is no harm.
pub(super) async fn run(
    conn: &mut Conn,
    script: &str,
    args: &[Arg<'_>],
) -> Result<Vec<Row>, StoreError> {
    let ran = conn.script(script, args).await;
    if ran.is_err() {
        let _ = conn.execute("ROLLBACK", &[]).await;
    }
    ran
}

/// `sql` with each `$N` made `$(N + offset)`.
fn renumbered(sql: &str, offset: usize) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut rest = sql;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..=at]);
        rest = &rest[at + 1..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let n: usize = rest[..digits].parse().expect("a placeholder's number");
        out.push_str(&(n + offset).to_string());
        rest = &rest[digits..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_of_a_script_reads_its_own_arguments() {
        assert_eq!(
            renumbered("a = $1 AND b = $12, $2", 12),
            "a = $13 AND b = $24, $14"
        );
        let scripts = Scripts::new("SELECT {place} AS place, $1, $3; ", 3);
        assert_eq!(
            scripts.of(2),
            "BEGIN IMMEDIATE; SELECT 0 AS place, $1, $3; SELECT 1 AS place, $4, $6; COMMIT"
        );
    }

    #[test]
    fn a_batch_goes_in_the_largest_scripts_that_fit() {
        let calls = |postgres: bool, waiting: usize| {
            let mut waiting: Vec<usize> = (0..waiting).collect();
            let mut calls = Vec::new();
            while !waiting.is_empty() {
                calls.push(take_call(postgres, &mut waiting));
            }
            calls
        };
        assert_eq!(calls(false, 1), [vec![0]]);
        let sizes: Vec<usize> = calls(false, 23).iter().map(Vec::len).collect();
        assert_eq!(sizes, [16, 4, 2, 1]);
        assert_eq!(calls(false, 32)[1], (16..32).collect::<Vec<_>>());
        assert_eq!(calls(true, 23), [(0..23).collect::<Vec<_>>()]);
    }
}
