//! The rolling restart a deploy does: PostgreSQL, haproxy with `/readyz` health checks in front of 3 replicas, and a
//! fleet of independent clients that keep asking while the replicas are restarted one by one (SIGTERM, wait for exit,
//! start again, wait until haproxy sees it ready). Every client must see every event of each of its runs exactly
//! once, the text equal to the final answer, and every run must be stored completed; the only error a client may meet
//! is a 503 it retries.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use agentd::store::RunStatus;
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::common::db::TestDb;
use crate::common::haproxy::Haproxy;
use crate::common::{Agentd, PATIENCE, deltas, free_port, new_chat};

/// Clients, each with its own chat, asking one question after another.
const CLIENTS: usize = 300;
/// How long a client waits before trying again after a 503 or a refused connection.
const RETRY: Duration = Duration::from_millis(100);

/// What one client saw of one run.
struct Seen {
    run_id: String,
    events: Vec<(String, Value)>,
}

/// What one client met along the way.
#[derive(Default)]
struct Client {
    runs: Vec<Seen>,
    retried_503: usize,
    reconnects: usize,
    errors: Vec<String>,
}

/// One question to the end, through the load balancer: follows `reconnect` (and a connection that ends without
/// `done`) by re-attaching with `Last-Event-ID`; retries 503s.
async fn ask(http: &reqwest::Client, lb: &str, chat: &str, body: &Value, client: &mut Client) {
    let deadline = tokio::time::Instant::now() + 3 * PATIENCE;
    let post = format!("{lb}/agents/chats/{chat}/stream");
    let mut response = loop {
        assert!(tokio::time::Instant::now() < deadline, "never started");
        match http.post(&post).json(body).send().await {
            Ok(r) if r.status() == 200 => break r,
            Ok(r) if r.status() == 503 => client.retried_503 += 1,
            Ok(r) => {
                client.errors.push(format!("POST answered {}", r.status()));
                return;
            }
            Err(error) => client.errors.push(format!("POST failed: {error}")),
        }
        tokio::time::sleep(RETRY).await;
    };
    let mut seen = Seen {
        run_id: String::new(),
        events: Vec::new(),
    };
    loop {
        let mut stream = response.bytes_stream().eventsource();
        // Where and after which event to re-attach, as the `reconnect` event says.
        let mut resume: Option<(String, String)> = None;
        while let Some(event) = stream.next().await {
            let event = match event {
                Ok(event) => event,
                Err(error) => {
                    client.errors.push(format!("stream broke: {error}"));
                    break;
                }
            };
            let data: Value = serde_json::from_str(&event.data).expect("JSON data");
            match data["type"].as_str() {
                Some("reconnect") => {
                    client.reconnects += 1;
                    let path = data["resume"].as_str().unwrap().to_owned();
                    let last = data["last_event_id"].as_str().unwrap().to_owned();
                    resume = Some((path, last));
                }
                Some("run_started") => {
                    seen.run_id = data["run_id"].as_str().unwrap().to_owned();
                    seen.events.push((event.id, data));
                }
                Some("done") => {
                    seen.events.push((event.id, data));
                    client.runs.push(seen);
                    return;
                }
                _ => seen.events.push((event.id, data)),
            }
        }
        let (path, last) = match resume {
            Some(resume) => resume,
            None => {
                client
                    .errors
                    .push(format!("run {} ended without done", seen.run_id));
                let Some((last, _)) = seen.events.last() else {
                    return;
                };
                let path = format!("/agents/chats/{chat}/runs/{}/stream", seen.run_id);
                (path, last.clone())
            }
        };
        response = loop {
            assert!(tokio::time::Instant::now() < deadline, "never re-attached");
            tokio::time::sleep(RETRY).await;
            match http
                .get(format!("{lb}{path}"))
                .header("last-event-id", &last)
                .send()
                .await
            {
                Ok(r) if r.status() == 200 => break r,
                Ok(r) if r.status() == 503 => client.retried_503 += 1,
                Ok(r) => {
                    client
                        .errors
                        .push(format!("re-attach answered {}", r.status()));
                    return;
                }
                Err(error) => client.errors.push(format!("re-attach failed: {error}")),
            }
        };
    }
}

/// Restarts 3 replicas one by one under `CLIENTS` clients asking `model` again and again, in `mode`.
async fn rolling_restart(mode: &str, drain: &str, model: &str) {
    let db = TestDb::postgres().await;
    let addrs: Vec<SocketAddr> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port()).parse().unwrap())
        .collect();
    let env = |addr: &SocketAddr| -> Vec<(String, String)> {
        [
            ("HTTP_ADDR", addr.to_string()),
            ("SHUTDOWN_MODE", mode.to_owned()),
            // Longer than haproxy takes to see /readyz fail (200 ms checks).
            ("SHUTDOWN_DELAY", "0.6".to_owned()),
            ("DRAIN_TIMEOUT", drain.to_owned()),
            ("SHUTDOWN_TIMEOUT", "30".to_owned()),
            ("RUN_LEASE", "5".to_owned()),
            ("DETACH_GRACE", "10".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    };
    let start = |addr: SocketAddr| {
        let env = env(&addr);
        let url = db.url().to_owned();
        async move {
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            Agentd::spawn_on(&url, &env).await
        }
    };
    let mut replicas = Vec::new();
    for addr in &addrs {
        replicas.push(start(*addr).await);
    }
    let lb = Haproxy::start(&addrs).await;

    let rolled = Arc::new(AtomicBool::new(false));
    let body = json!({"question": "q", "model": model});
    let http = reqwest::Client::new();
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let (http, lb, body, rolled) = (
            http.clone(),
            lb.base.clone(),
            body.clone(),
            Arc::clone(&rolled),
        );
        clients.push(tokio::spawn(async move {
            // Spread the first questions over a second, as real clients arrive.
            tokio::time::sleep(Duration::from_millis((i * 1000 / CLIENTS) as u64)).await;
            let chat = new_chat();
            let mut client = Client::default();
            loop {
                ask(&http, &lb, &chat, &body, &mut client).await;
                if rolled.load(Ordering::SeqCst) || !client.errors.is_empty() {
                    return client;
                }
            }
        }));
    }

    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut stopped = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        replicas[i].signal("TERM");
        let status = replicas[i].exit_status().await;
        assert!(status.success(), "replica {i} exited with {status}");
        stopped.push(std::mem::replace(&mut replicas[i], start(*addr).await));
        // haproxy checks every 200 ms and needs one success.
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    rolled.store(true, Ordering::SeqCst);

    // What every replica, stopped or running, logged about a run: for a failure's message.
    let story = |run_id: &str| -> String {
        stopped
            .iter()
            .chain(&replicas)
            .enumerate()
            .flat_map(|(i, r)| {
                r.log_text()
                    .lines()
                    .filter(|l| l.contains(run_id))
                    .map(|l| format!("[{i}] {l}"))
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let store = db.open().await;
    let mut runs = 0;
    let (mut retried, mut reconnects) = (0, 0);
    for client in clients {
        let client = client.await.unwrap();
        assert!(client.errors.is_empty(), "{:?}", client.errors);
        retried += client.retried_503;
        reconnects += client.reconnects;
        for Seen { run_id, events } in &client.runs {
            for (i, (id, _)) in events.iter().enumerate() {
                assert_eq!(
                    id,
                    &format!("{run_id}:{}", i + 1),
                    "event {i} of run {run_id}"
                );
            }
            let output = events
                .iter()
                .find(|(_, e)| e["type"] == "final_answer")
                .unwrap_or_else(|| {
                    panic!(
                        "run {run_id} has no final answer: {:?}\n{}",
                        &events[events.len().saturating_sub(3)..],
                        story(run_id)
                    )
                })
                .1["output"]
                .as_str()
                .unwrap()
                .to_owned();
            assert_eq!(deltas(events), output, "run {run_id}");
            let stored = store
                .get_run(run_id.parse::<Uuid>().unwrap())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(stored.status, RunStatus::Completed, "run {run_id}");
            assert_eq!(stored.output, output);
            runs += 1;
        }
    }
    assert!(runs >= CLIENTS, "{runs} runs");
    eprintln!(
        "{mode}: {runs} runs completed; {reconnects} reconnects followed, {retried} 503s retried"
    );
    if mode == "handoff" {
        assert!(reconnects > 0, "the rollout moved streams");
    }
    drop(lb);
}

#[tokio::test]
async fn a_rolling_restart_in_handoff_mode_loses_and_repeats_nothing_with_answers_longer_than_the_drain()
 {
    // Answers of 8 s against a 2 s drain: each restart releases runs that a peer continues.
    rolling_restart("handoff", "2", "test:deltas=80,delay_ms=100").await;
}

#[tokio::test]
async fn a_rolling_restart_in_drain_mode_completes_answers_shorter_than_the_drain() {
    rolling_restart("drain", "6", "test:deltas=20,delay_ms=100").await;
}
