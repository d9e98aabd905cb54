//! Test databases: a fresh SQLite file, or a fresh database on a throwaway PostgreSQL server.
//!
//! PostgreSQL: with `AGENTD_TEST_DATABASE_URL` set (an admin URL of a running server), each test creates its own
//! database there. Otherwise the first test that needs one starts a throwaway cluster (`initdb` + `pg_ctl`, as the
//! `postgres` user when running as root) on a free port, shared by the tests of this test binary, and a watcher
//! process stops it and removes its files when the test binary exits. A missing PostgreSQL fails the test.

use super::free_port;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use agentd::store::{self, Run, SessionStore, StoreConfig};
use sqlx::Connection;
use uuid::Uuid;

pub enum TestDb {
    Sqlite {
        _dir: tempfile::TempDir,
        url: String,
    },
    Postgres {
        url: String,
    },
}

impl TestDb {
    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("agentd.db").display());
        Self::Sqlite { _dir: dir, url }
    }

    /// A new, empty database on the shared PostgreSQL server.
    pub async fn postgres() -> Self {
        Self::postgres_on(&shared_admin_url()).await
    }

    /// A new, empty database on the server of `admin_url`.
    pub async fn postgres_on(admin_url: &str) -> Self {
        let name = format!("agentd_test_{}", Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect(admin_url)
            .await
            .expect("connect to PostgreSQL");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .unwrap();
        let (base, _) = admin_url
            .rsplit_once('/')
            .expect("an admin URL names a database");
        Self::Postgres {
            url: format!("{base}/{name}"),
        }
    }

    /// Runs `ALTER DATABASE <this database> <change>` (PostgreSQL): a setting for the connections opened after it,
    /// or its owner.
    pub async fn alter_database(&self, change: &str) {
        let Self::Postgres { url } = self else {
            panic!("ALTER DATABASE is PostgreSQL's");
        };
        let (_, name) = url.rsplit_once('/').expect("the URL names the database");
        let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "ALTER DATABASE {name} {change}"
        )))
        .execute(&mut conn)
        .await
        .unwrap();
    }

    /// Another process's connection to this SQLite database, holding its write lock (`BEGIN IMMEDIATE`) until it
    /// ends the transaction or is dropped.
    pub async fn hold_write_lock(&self) -> sqlx::SqliteConnection {
        let Self::Sqlite { url, .. } = self else {
            panic!("the write lock held here is SQLite's");
        };
        let mut conn = sqlx::SqliteConnection::connect(url).await.unwrap();
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut conn)
            .await
            .unwrap();
        conn
    }

    /// The size of this SQLite database's WAL file now (0 when there is none).
    pub fn wal_bytes(&self) -> u64 {
        std::fs::metadata(self.wal_path())
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// Where this SQLite database's WAL is.
    fn wal_path(&self) -> String {
        let Self::Sqlite { url, .. } = self else {
            panic!("the WAL is SQLite's");
        };
        format!("{}-wal", url.trim_start_matches("sqlite://"))
    }

    /// This SQLite database's WAL as it is now: its salt (new whenever SQLite starts the WAL over, writing its frames
    /// from the start again) and how many commits it holds since it started.
    pub fn wal_commits(&self) -> (u32, usize) {
        let wal = std::fs::read(self.wal_path()).unwrap_or_default();
        if wal.len() < 32 {
            return (0, 0);
        }
        // Big-endian words: the header's page size and salt; each frame's page, the database's size in pages after
        // it when it commits a transaction (0 otherwise), and the salt of the WAL it was written in.
        let word = |at: usize| u32::from_be_bytes(wal[at..at + 4].try_into().unwrap());
        let page = match word(8) {
            1 => 65_536,
            size => size as usize,
        };
        let salt = (word(16), word(20));
        let mut commits = 0;
        let mut at = 32;
        while at + 24 + page <= wal.len() && (word(at + 8), word(at + 12)) == salt {
            if word(at + 4) != 0 {
                commits += 1;
            }
            at += 24 + page;
        }
        (salt.0, commits)
    }

    /// A reader of this SQLite database in a transaction begun just after a commit of its own: while it is open,
    /// SQLite cannot start the WAL over (new commits go after the ones in it), unless a checkpoint copied that
    /// commit back before the reader began (the salt of [`Self::wal_commits`] tells).
    pub async fn pin_wal(&self) -> sqlx::SqliteConnection {
        let mut conn = sqlx::SqliteConnection::connect(self.url()).await.unwrap();
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS wal_pin (at INTEGER); INSERT INTO wal_pin VALUES (1); BEGIN; \
             SELECT count(*) FROM wal_pin",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        conn
    }

    pub fn url(&self) -> &str {
        match self {
            Self::Sqlite { url, .. } | Self::Postgres { url } => url,
        }
    }

    /// Opens (and migrates) the store, as agentd would.
    pub async fn open(&self) -> SessionStore {
        let config = match self {
            Self::Sqlite { url, .. } => StoreConfig::Sqlite(url.parse().unwrap()),
            Self::Postgres { url } => StoreConfig::Postgres(url.parse().unwrap()),
        };
        store::open(&config).await.expect("the store opens")
    }

    /// Records migration `version` as applied, as an agentd newer than this build would have.
    pub async fn record_newer_migration(&self, version: i64) {
        let insert = "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
                      VALUES ($1, 'from a newer agentd', TRUE, $2, 0)";
        let checksum = vec![0_u8; 48];
        match self {
            Self::Sqlite { url, .. } => {
                let mut conn = sqlx::SqliteConnection::connect(url).await.unwrap();
                sqlx::query(insert)
                    .bind(version)
                    .bind(checksum)
                    .execute(&mut conn)
                    .await
                    .unwrap();
            }
            Self::Postgres { url } => {
                let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
                sqlx::query(insert)
                    .bind(version)
                    .bind(checksum)
                    .execute(&mut conn)
                    .await
                    .unwrap();
            }
        }
    }

    /// Runs `sqlite` or `postgres`, whichever is this database's dialect, on a connection of its own: rows put there as
    /// no agentd would, or in numbers its API would take long to make.
    pub async fn execute(&self, sqlite: &str, postgres: &str) {
        match self {
            Self::Sqlite { url, .. } => {
                let mut conn = sqlx::SqliteConnection::connect(url).await.unwrap();
                sqlx::raw_sql(sqlx::AssertSqlSafe(sqlite.to_owned()))
                    .execute(&mut conn)
                    .await
                    .unwrap();
            }
            Self::Postgres { url } => {
                let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
                sqlx::raw_sql(sqlx::AssertSqlSafe(postgres.to_owned()))
                    .execute(&mut conn)
                    .await
                    .unwrap();
            }
        }
    }

    /// Makes every run's heartbeat `seconds` older, as if its process had stopped refreshing it that long ago.
    pub async fn age_heartbeats(&self, seconds: i64) {
        match self {
            Self::Sqlite { url, .. } => {
                let mut conn = sqlx::SqliteConnection::connect(url).await.unwrap();
                sqlx::query("UPDATE agent_chat_runs SET heartbeat_at = heartbeat_at - ?")
                    .bind(seconds * 1000)
                    .execute(&mut conn)
                    .await
                    .unwrap();
            }
            Self::Postgres { url } => {
                let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
                sqlx::query("UPDATE agent_chat_runs SET heartbeat_at = heartbeat_at - make_interval(secs => $1)")
                    .bind(seconds as f64)
                    .execute(&mut conn)
                    .await
                    .unwrap();
            }
        }
    }
}

/// Waits until `count` statements of the test's database wait for a row lock (`what` waits, for the failure's message).
pub async fn until_statements_wait_for_locks(
    check: &mut sqlx::PgConnection,
    count: i64,
    what: &str,
) {
    let deadline = tokio::time::Instant::now() + super::PATIENCE;
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
             AND datname = current_database()",
        )
        .fetch_one(&mut *check)
        .await
        .unwrap();
        if waiting >= count {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: {waiting} of {count} waiting for a held row"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The chat's runs, oldest first: the runs its messages name (a run stores its prompt when it starts).
pub async fn runs_of(store: &SessionStore, chat_id: uuid::Uuid) -> Vec<Run> {
    let mut ids = Vec::new();
    for message in store.messages(chat_id).await.unwrap() {
        if let Some(id) = message.run_id.filter(|id| !ids.contains(id)) {
            ids.push(id);
        }
    }
    let mut runs = Vec::new();
    for id in ids {
        runs.push(
            store
                .get_run(id)
                .await
                .unwrap()
                .expect("a run its messages name"),
        );
    }
    runs
}

fn shared_admin_url() -> String {
    static SHARED: OnceLock<String> = OnceLock::new();
    SHARED
        .get_or_init(|| match std::env::var("AGENTD_TEST_DATABASE_URL") {
            Ok(url) => url,
            Err(_) => Box::leak(Box::new(PgServer::start())).admin_url(),
        })
        .clone()
}

/// A throwaway PostgreSQL cluster, stopped and removed when the test process exits.
pub struct PgServer {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
}

impl PgServer {
    pub fn start() -> Self {
        let bin = pg_bin();
        let dir = tempfile::Builder::new()
            .prefix("agentd-pg")
            .tempdir()
            .unwrap();
        if running_as_root() {
            run_ok(
                Command::new("chown")
                    .args(["-R", "postgres"])
                    .arg(dir.path()),
            );
        }
        let data = dir.path().join("data");
        as_postgres(&format!(
            "{} -D {} -U postgres --auth=trust --no-sync -E UTF8 >/dev/null",
            bin.join("initdb").display(),
            data.display()
        ));
        let server = Self {
            bin,
            dir,
            port: free_port(),
        };
        server.start_again();
        server.stop_when_tests_exit();
        server
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server (again), on the same port and data.
    pub fn start_again(&self) {
        as_postgres(&format!(
            "{} -D {} -l {} -w -o \"-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off -c max_connections=500\" start >/dev/null",
            self.bin.join("pg_ctl").display(),
            self.data().display(),
            self.dir.path().join("log").display(),
            self.port,
            self.dir.path().display(),
        ));
    }

    /// Stops the server at once, cutting its connections.
    pub fn stop(&self) {
        as_postgres(&format!(
            "{} -D {} -m immediate -w stop >/dev/null",
            self.bin.join("pg_ctl").display(),
            self.data().display()
        ));
    }

    /// Tests never drop a shared server, so a watcher process cleans up after the test binary.
    #[allow(clippy::zombie_processes)] // the watcher must outlive this process; init reaps it
    fn stop_when_tests_exit(&self) {
        let stop = format!(
            "{} -D {} -m immediate stop",
            self.bin.join("pg_ctl").display(),
            self.data().display()
        );
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop}; rm -rf {dir}",
            pid = std::process::id(),
            stop = as_postgres_command(&stop),
            dir = self.dir.path().display(),
        );
        Command::new("sh")
            .args(["-c", &script])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start the PostgreSQL watcher");
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The newest installed PostgreSQL's binaries, or `PG_BIN`.
fn pg_bin() -> PathBuf {
    if let Ok(bin) = std::env::var("PG_BIN") {
        return PathBuf::from(bin);
    }
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<PathBuf> = std::fs::read_dir(root)
        .unwrap_or_else(|_| {
            panic!(
                "PostgreSQL is not installed ({} is missing); see the README",
                root.display()
            )
        })
        .filter_map(|entry| entry.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().expect("an installed PostgreSQL with initdb")
}

fn running_as_root() -> bool {
    let out = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

/// PostgreSQL refuses to run as root: run its tools as the `postgres` user then.
fn as_postgres_command(command: &str) -> String {
    if running_as_root() {
        format!("su postgres -s /bin/sh -c '{command}'")
    } else {
        command.to_owned()
    }
}

fn as_postgres(command: &str) {
    run_ok(Command::new("sh").args(["-c", &as_postgres_command(command)]));
}

fn run_ok(command: &mut Command) {
    let status = command.status().expect("the command runs");
    assert!(status.success(), "{command:?} failed: {status}");
}
