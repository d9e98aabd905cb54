//! Test harness: the real `agentd` binary on a free port, real HTTP and SSE clients, real signals.
//!
//! The server is started with `HTTP_ADDR=127.0.0.1:0` and JSON logs; the harness reads the bound address from the
//! "agentd is serving" log line, so no test guesses a port or sleeps to let the server start.

/// Runs each named test against both backends.
macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(super::TestDb::sqlite()).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(super::TestDb::postgres().await).await;
                }
            )*
        }
    };
}

pub mod apt;
pub mod browser;
pub mod db;
pub mod h2;
pub mod haproxy;
pub mod runs;
pub mod upstream;

use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventsource_stream::{Event, EventStream, Eventsource};
use futures_util::{Stream, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// How long any single wait in a test may take before the test fails; generous for a busy 2-core machine.
pub const PATIENCE: Duration = Duration::from_secs(30);

pub struct Agentd {
    child: Child,
    /// `http://<addr>` of the gRPC listener.
    pub grpc: String,
    /// The SQLite database made for this server when the test named none.
    _own_db: Option<db::TestDb>,
    pub base: String,
    /// Every log line the server wrote to stderr, parsed.
    logs: Arc<Mutex<Vec<Value>>>,
    /// Bumped on each new log line.
    log_count: watch::Receiver<usize>,
    /// Whether the harness reads the server's stderr (see [`Agentd::stop_reading_logs`]).
    reading_logs: watch::Sender<bool>,
    pub http: reqwest::Client,
}

impl Agentd {
    /// Starts the binary with `env` on a fresh SQLite store and waits until it serves.
    pub async fn spawn(env: &[(&str, &str)]) -> Self {
        let db = db::TestDb::sqlite();
        let mut server = Self::spawn_on(db.url(), env).await;
        server._own_db = Some(db);
        server
    }

    /// Starts the binary with `env` on the store at `database_url` and waits until it serves.
    pub async fn spawn_on(database_url: &str, env: &[(&str, &str)]) -> Self {
        Self::start(database_url, env, None).await
    }

    /// Starts the binary on a fresh SQLite store with its open-file limit (soft and hard) set to `limit`.
    pub async fn spawn_with_open_file_limit(limit: u32, env: &[(&str, &str)]) -> Self {
        let db = db::TestDb::sqlite();
        let mut server = Self::start(db.url(), env, Some(limit)).await;
        server._own_db = Some(db);
        server
    }

    async fn start(database_url: &str, env: &[(&str, &str)], fd_limit: Option<u32>) -> Self {
        let mut env = env.to_vec();
        env.push(("DATABASE_URL", database_url));
        let mut command = command(&env);
        if let Some(limit) = fd_limit {
            // Through a shell, whose `ulimit` lowers both limits before agentd starts.
            let script = format!(
                "ulimit -n {limit} && exec {} serve",
                env!("CARGO_BIN_EXE_agentd")
            );
            let std = command.as_std_mut();
            let mut wrapped = std::process::Command::new("sh");
            wrapped.args(["-c", &script]).env_clear();
            wrapped.envs(
                std.get_envs()
                    .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v.to_owned()))),
            );
            command = Command::from(wrapped);
            command
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .kill_on_drop(true);
        }
        let mut child = command.spawn().expect("agentd starts");
        let (reading_logs, reading) = watch::channel(true);
        let (logs, log_count) = collect_logs(&mut child, reading);
        let mut server = Self {
            child,
            grpc: String::new(),
            _own_db: None,
            base: String::new(),
            logs,
            log_count,
            reading_logs,
            http: reqwest::Client::new(),
        };
        let serving = server.wait_for_log("agentd is serving").await;
        server.base = format!("http://{}", serving["http_addr"].as_str().unwrap());
        server.grpc = format!("http://{}", serving["grpc_addr"].as_str().unwrap());
        server
    }

    /// Runs `agentd serve` with `env` and expects it to exit on its own; returns its status and stderr.
    pub async fn run_to_exit(env: &[(&str, &str)]) -> (ExitStatus, String) {
        let output = tokio::time::timeout(PATIENCE, command(env).output())
            .await
            .expect("agentd exits")
            .unwrap();
        (
            output.status,
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("agentd is running")
    }

    /// Sends a real signal (`TERM`, `INT`, `KILL`) to the server process.
    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .args([format!("-{name}"), self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} failed");
    }

    /// Stops reading the server's stderr, as a log collector that stalls: once the pipe is full, the server's writes
    /// to it wait until [`Agentd::resume_reading_logs`].
    pub fn stop_reading_logs(&self) {
        self.reading_logs.send_replace(false);
    }

    pub fn resume_reading_logs(&self) {
        self.reading_logs.send_replace(true);
    }

    /// Waits for the process to exit on its own, and for every line it logged to be read.
    pub async fn exit_status(&mut self) -> ExitStatus {
        let status = tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("agentd exits in time")
            .unwrap();
        // Its stderr closed with it, but the lines it wrote last may not have been read yet: the reader is done once
        // the counter's sender is gone.
        let read_all = async { while self.log_count.changed().await.is_ok() {} };
        tokio::time::timeout(PATIENCE, read_all)
            .await
            .expect("the log is read to its end");
        status
    }

    /// The first log line whose message contains `needle`, waiting for it if needed.
    pub async fn wait_for_log(&mut self, needle: &str) -> Value {
        self.wait_for_log_where(|line| line["message"].as_str().is_some_and(|m| m.contains(needle)))
            .await
            .unwrap_or_else(|| panic!("no log line {needle:?}; logs:\n{}", self.log_text()))
    }

    /// The first log line that matches, waiting for it if needed; `None` if the server exits first or takes too long.
    pub async fn wait_for_log_where(&mut self, matches: impl Fn(&Value) -> bool) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Some(line) = self.logs.lock().unwrap().iter().find(|l| matches(l)) {
                return Some(line.clone());
            }
            match tokio::time::timeout_at(deadline, self.log_count.changed()).await {
                Ok(Ok(())) => {}
                _ => return None,
            }
        }
    }

    /// Every line logged so far, parsed.
    pub fn log_lines(&self) -> Vec<Value> {
        self.logs.lock().unwrap().clone()
    }

    /// Everything logged so far, one JSON object per line.
    pub fn log_text(&self) -> String {
        let logs = self.logs.lock().unwrap();
        logs.iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).send().await.unwrap()
    }

    /// Sends SIGKILL and waits for the process to be gone.
    pub async fn kill(&mut self) {
        self.child.kill().await.unwrap();
    }

    /// POSTs a question to the stream route of `chat`.
    pub async fn ask(&self, chat: &str, body: Value) -> reqwest::Response {
        self.http
            .post(self.url(&format!("/agents/chats/{chat}/stream")))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// Attaches to a run: `GET .../runs/{run}/stream`, with `Last-Event-ID` and `?after=` when given.
    pub async fn attach(
        &self,
        chat: &str,
        run: &str,
        last_event_id: Option<&str>,
        after: Option<&str>,
    ) -> reqwest::Response {
        let mut url = self.url(&format!("/agents/chats/{chat}/runs/{run}/stream"));
        if let Some(after) = after {
            url = format!("{url}?after={after}");
        }
        let mut request = self.http.get(url);
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        request.send().await.unwrap()
    }

    /// Attaches and expects a stream.
    pub async fn follow(&self, chat: &str, run: &str, last_event_id: Option<&str>) -> Events {
        let response = self.attach(chat, run, last_event_id, None).await;
        assert_eq!(response.status(), 200, "{:?}", response.text().await);
        Events::new(response)
    }

    /// `POST .../runs/{run}/cancel`.
    pub async fn cancel(&self, chat: &str, run: &str) -> reqwest::Response {
        self.http
            .post(self.url(&format!("/agents/chats/{chat}/runs/{run}/cancel")))
            .send()
            .await
            .unwrap()
    }

    /// POSTs a question and expects a stream.
    pub async fn stream(&self, chat: &str, body: Value) -> Events {
        let response = self.ask(chat, body).await;
        assert_eq!(response.status(), 200, "{:?}", response.text().await);
        Events::new(response)
    }
}

fn command(env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_agentd"));
    command
        .arg("serve")
        .env_clear()
        .env("HTTP_ADDR", "127.0.0.1:0")
        .env("INTERNAL_GRPC_PORT", "0")
        .env("LOG_FORMAT", "json")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Reads the child's stderr line by line while `reading` is true.
fn collect_logs(
    child: &mut Child,
    mut reading: watch::Receiver<bool>,
) -> (Arc<Mutex<Vec<Value>>>, watch::Receiver<usize>) {
    let stderr = child.stderr.take().unwrap();
    let logs = Arc::new(Mutex::new(Vec::new()));
    let (count_tx, count_rx) = watch::channel(0);
    let sink = Arc::clone(&logs);
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        loop {
            // A harness gone (the sender dropped) leaves the reader reading.
            let _ = reading.wait_for(|reading| *reading).await;
            let Ok(Some(line)) = lines.next_line().await else {
                break;
            };
            let value = serde_json::from_str(&line).unwrap_or(Value::String(line));
            let mut logs = sink.lock().unwrap();
            logs.push(value);
            count_tx.send_replace(logs.len());
        }
    });
    (logs, count_rx)
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ByteStream = std::pin::Pin<Box<dyn Stream<Item = Result<bytes::Bytes, BoxError>> + Send>>;

/// An SSE response, read event by event.
pub struct Events {
    pub headers: reqwest::header::HeaderMap,
    inner: EventStream<ByteStream>,
}

impl Events {
    pub fn new(response: reqwest::Response) -> Self {
        let headers = response.headers().clone();
        Self::of(headers, response.bytes_stream())
    }

    /// The events of a response's body read as `bytes`.
    pub fn of<E: Into<BoxError>>(
        headers: reqwest::header::HeaderMap,
        bytes: impl Stream<Item = Result<bytes::Bytes, E>> + Send + 'static,
    ) -> Self {
        let bytes: ByteStream = Box::pin(bytes.map(|chunk| chunk.map_err(Into::into)));
        Self {
            headers,
            inner: bytes.eventsource(),
        }
    }

    /// The next event as (id, JSON data), or `None` at the end of the stream.
    pub async fn next(&mut self) -> Option<(String, Value)> {
        let next = tokio::time::timeout(PATIENCE, self.inner.next())
            .await
            .expect("an event arrives in time")?;
        let Event { id, data, .. } = next.expect("a well-formed event stream");
        Some((id, serde_json::from_str(&data).expect("event data is JSON")))
    }

    /// The next event's JSON data, which must exist.
    pub async fn next_data(&mut self) -> Value {
        self.next().await.expect("the stream goes on").1
    }

    /// Reads to the end of the stream.
    pub async fn rest(&mut self) -> Vec<(String, Value)> {
        let mut events = Vec::new();
        while let Some(event) = self.next().await {
            events.push(event);
        }
        events
    }
}

/// A chat created over gRPC for `org`, `user` and `canvas`; its id.
pub async fn create_chat(server: &Agentd, org: &str, user: &str, canvas: &str) -> String {
    let mut grpc = agentd::grpc::proto::agents_client::AgentsClient::connect(server.grpc.clone())
        .await
        .unwrap();
    let request = agentd::grpc::proto::CreateAgentChatRequest {
        org_id: org.into(),
        canvas_id: canvas.into(),
        user_id: user.into(),
    };
    grpc.create_agent_chat(request)
        .await
        .unwrap()
        .into_inner()
        .chat
        .unwrap()
        .id
}

/// The value of the metric `name` (with its labels, if any: `name{label="value"}`) in a `/metrics` text; 0 when it
/// is absent.
pub fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

/// A port nobody listens on now.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A new chat id.
pub fn new_chat() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The text of every `model_delta`, joined.
pub fn deltas(events: &[(String, Value)]) -> String {
    events
        .iter()
        .filter(|(_, e)| e["type"] == "model_delta")
        .map(|(_, e)| e["content"].as_str().unwrap())
        .collect()
}

/// The `type` of each event.
pub fn types(events: &[(String, Value)]) -> Vec<String> {
    events
        .iter()
        .map(|(_, e)| e["type"].as_str().unwrap().to_owned())
        .collect()
}

/// Established TCP connections whose local port is `port` (the server's ends of its clients' connections), for a set
/// of connections that stays put while they are counted.
///
/// `/proc/net/tcp` is not read in one go: while other tests open and close connections, a read may list a socket
/// twice or pass one by. So the sockets are told apart by inode, and three reads are joined.
pub fn established_to(port: u16) -> usize {
    let mut sockets = std::collections::HashSet::new();
    for _ in 0..3 {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
        for line in table.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields[1].rsplit(':').next().unwrap();
            if u16::from_str_radix(local_port, 16) == Ok(port) && fields[3] == "01" {
                sockets.insert(fields[9].to_owned());
            }
        }
    }
    sockets.len()
}
