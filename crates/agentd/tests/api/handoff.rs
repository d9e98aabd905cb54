//! A deploy neither waits for nor cuts an answer: the handoff drain, takeover of a run whose producer is gone (drained,
//! killed, or paused past its lease), fencing, and cut tool calls. Through the real binary and real signals.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use agentd::store::RunStatus;
use axum::Router;
use axum::routing::{get, post};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::common::db::TestDb;
use crate::common::runs::{assert_whole, ended, final_output, paced, run_id_of, take};
use crate::common::{Agentd, Events, PATIENCE, deltas, free_port, metric, new_chat, types};

/// The test model's answer of `n` deltas.
fn answer(n: u32) -> String {
    (0..n).map(agentd::model::delta_text).collect()
}

/// Ids `<run>:1`, `<run>:2`, ... with no gap and no repeat, ending with the one `done`, after `run_completed`; the text
/// on screen is the answer.
fn assert_whole_and_completed(run: &str, events: &[(String, Value)]) {
    assert_whole(run, events);
    let kinds = types(events);
    assert_eq!(&kinds[kinds.len() - 2..], ["run_completed", "done"]);
    assert_eq!(
        deltas(events),
        final_output(events),
        "the text on screen is the answer"
    );
}

/// Follows the advertised `resume` path on `server` with `Last-Event-ID`, to the end.
async fn resume(server: &Agentd, reconnect: &Value) -> Vec<(String, Value)> {
    let response = server
        .http
        .get(server.url(reconnect["resume"].as_str().unwrap()))
        .header(
            "last-event-id",
            reconnect["last_event_id"].as_str().unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    Events::new(response).rest().await
}

/// Reads on until the `reconnect` event; returns the events before it, and it. The stream must end right after.
async fn until_reconnect(stream: &mut Events) -> (Vec<(String, Value)>, Value) {
    let mut events = Vec::new();
    loop {
        let (id, event) = stream.next().await.expect("a reconnect before the end");
        if event["type"] == "reconnect" {
            assert!(
                stream.next().await.is_none(),
                "the stream ends after reconnect"
            );
            return (events, event);
        }
        events.push((id, event));
    }
}

const HANDOFF: [(&str, &str); 4] = handoff_with_lease("2");

/// Handoff mode, a one-second drain, and a lease of `lease` seconds.
const fn handoff_with_lease(lease: &'static str) -> [(&'static str, &'static str); 4] {
    [
        ("SHUTDOWN_MODE", "handoff"),
        ("DRAIN_TIMEOUT", "1"),
        ("SHUTDOWN_TIMEOUT", "10"),
        ("RUN_LEASE", lease),
    ]
}

#[tokio::test]
async fn a_handoff_drain_sends_reconnect_and_a_restarted_process_continues_the_run() {
    let db = TestDb::sqlite();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut env = HANDOFF.to_vec();
    env.push(("HTTP_ADDR", &addr));
    let mut first = Agentd::spawn_on(db.url(), &env).await;
    let chat = new_chat();
    let mut stream = first.stream(&chat, paced(150, 20)).await;
    let mut seen = take(&mut stream, 10).await;
    let run = run_id_of(&seen);

    first.signal("TERM");
    let (before, reconnect) = until_reconnect(&mut stream).await;
    seen.extend(before);
    assert_eq!(reconnect["last_event_id"], seen.last().unwrap().0.as_str());
    assert_eq!(
        reconnect["resume"],
        format!("/agents/chats/{chat}/runs/{run}/stream")
    );
    assert_eq!(reconnect["retry_ms"], 250);
    // The process releases the run at DRAIN_TIMEOUT instead of interrupting it, and exits cleanly.
    assert!(first.exit_status().await.success());
    let store = db.open().await;
    let released = store.get_run(run.parse().unwrap()).await.unwrap().unwrap();
    assert_eq!(released.status, RunStatus::Running);
    assert_eq!(released.owner_instance, "", "released, not interrupted");

    // The next process on the same store continues it for the client that re-attaches, at the next delta.
    let second = Agentd::spawn_on(db.url(), &env).await;
    seen.extend(resume(&second, &reconnect).await);
    assert_whole_and_completed(&run, &seen);
    assert_eq!(deltas(&seen), answer(150));
    let stored = ended(&store, &run).await;
    assert_eq!(stored.status, RunStatus::Completed);
    assert_eq!(stored.output, answer(150));
    let metrics = second.get("/metrics").await.text().await.unwrap();
    assert_eq!(metric(&metrics, "agentd_runs_taken_over_total"), 1);
}

#[tokio::test]
async fn a_handoff_moves_the_followers_to_a_peer_which_continues_the_run_at_the_drain_deadline() {
    let db = TestDb::postgres().await;
    let mut a = Agentd::spawn_on(db.url(), &HANDOFF).await;
    let b = Agentd::spawn_on(db.url(), &HANDOFF).await;
    let chat = new_chat();
    let mut stream = a.stream(&chat, paced(200, 20)).await;
    let mut seen = take(&mut stream, 5).await;
    let run = run_id_of(&seen);

    a.signal("TERM");
    let (before, reconnect) = until_reconnect(&mut stream).await;
    seen.extend(before);
    // The client is on B at once, while A still produces the run into the log; at A's DRAIN_TIMEOUT, B takes it over.
    seen.extend(resume(&b, &reconnect).await);
    assert!(a.exit_status().await.success());
    assert_whole_and_completed(&run, &seen);
    assert_eq!(deltas(&seen), answer(200));
    let store = db.open().await;
    assert_eq!(ended(&store, &run).await.status, RunStatus::Completed);
    let released = a
        .wait_for_log_where(|l| l["run_id"] == run.as_str() && l["message"] == "run ended")
        .await
        .unwrap();
    assert_eq!(released["outcome"], "handed_off");
    let metrics = b.get("/metrics").await.text().await.unwrap();
    assert_eq!(metric(&metrics, "agentd_runs_taken_over_total"), 1);
}

/// A deploy releases all of a replica's runs at once; the peer that follows them continues every one within the lease,
/// while a third replica watches for runs nobody holds. (Continued one after another, the last of 200 runs waited past
/// the lease with no heartbeat, and the third replica marked them interrupted under their followers.)
#[tokio::test]
async fn a_peer_continues_every_run_a_deploy_releases_at_once() {
    const RUNS: usize = 200;
    let db = TestDb::postgres().await;
    let env = handoff_with_lease("1");
    let mut a = Agentd::spawn_on(db.url(), &env).await;
    let b = Agentd::spawn_on(db.url(), &env).await;
    let _watching = Agentd::spawn_on(db.url(), &env).await;
    let mut runs = Vec::new();
    for _ in 0..RUNS {
        let chat = new_chat();
        let mut own = a.stream(&chat, paced(600, 20)).await;
        let run = run_id_of(&take(&mut own, 1).await);
        let on_b = b.follow(&chat, &run, None).await;
        runs.push((run, own, on_b));
    }

    a.signal("TERM");
    assert!(a.exit_status().await.success());
    let store = db.open().await;
    for (run, own, mut on_b) in runs {
        drop(own);
        let seen = on_b.rest().await;
        assert_whole_and_completed(&run, &seen);
        assert_eq!(deltas(&seen), answer(600));
        assert_eq!(ended(&store, &run).await.status, RunStatus::Completed);
    }
    let metrics = b.get("/metrics").await.text().await.unwrap();
    assert_eq!(
        metric(&metrics, "agentd_runs_taken_over_total"),
        RUNS as u64
    );
}

/// A replica that continues a run it took over never claims it again while it drives it, however late its heartbeat:
/// claimed again, the run had two producers in one process, whose events interleaved in its log. (On a busy machine
/// the heartbeat of a run taken over can fall behind the lease; here the heartbeats are made old on purpose.)
#[tokio::test]
async fn a_run_taken_over_is_not_claimed_again_by_the_replica_that_drives_it() {
    let db = TestDb::postgres().await;
    let env = handoff_with_lease("1");
    let mut a = Agentd::spawn_on(db.url(), &env).await;
    let b = Agentd::spawn_on(db.url(), &env).await;
    let chat = new_chat();
    let mut own = a.stream(&chat, paced(300, 20)).await;
    let run = run_id_of(&take(&mut own, 1).await);
    let mut on_b = b.follow(&chat, &run, None).await;
    let mut seen = take(&mut on_b, 5).await;
    a.signal("TERM");
    assert!(a.exit_status().await.success());
    drop(own);
    // B drives the run now; its heartbeat looks older than the lease again and again while it does.
    let run_id: Uuid = run.parse().unwrap();
    let store = db.open().await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while store.get_run(run_id).await.unwrap().unwrap().epoch < 3 {
        assert!(tokio::time::Instant::now() < deadline, "never taken over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..40 {
        db.age_heartbeats(10).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    seen.extend(on_b.rest().await);
    assert_whole_and_completed(&run, &seen);
    assert_eq!(deltas(&seen), answer(300));
    let metrics = b.get("/metrics").await.text().await.unwrap();
    assert_eq!(metric(&metrics, "agentd_runs_taken_over_total"), 1);
}

/// A replica that ends the logs of a crashed process's runs (thousands, nobody following them) still claims a run a
/// peer's deploy releases meanwhile, and keeps noting the runs it follows, while a third replica watches for runs nobody
/// holds. (Ended one after another in the loop that claims runs, they held it for seconds, and the third replica marked
/// the released run interrupted under its follower.)
#[tokio::test]
async fn a_peer_claims_a_released_run_while_it_ends_the_runs_of_a_crashed_process() {
    use sqlx::Connection;
    const CRASHED_RUNS: i64 = 5_000;
    let db = TestDb::postgres().await;
    // The follower's lease is the shortest, so it is the one that finds the crashed process's runs; the producer's is
    // long, so it leaves them alone.
    let mut producer = Agentd::spawn_on(db.url(), &handoff_with_lease("30")).await;
    let mut follower = Agentd::spawn_on(db.url(), &handoff_with_lease("1")).await;
    let _watching = Agentd::spawn_on(db.url(), &handoff_with_lease("3")).await;
    let chat = new_chat();
    let mut own = producer.stream(&chat, paced(300, 20)).await;
    let run = run_id_of(&take(&mut own, 1).await);
    let mut on_follower = follower.follow(&chat, &run, None).await;
    let mut seen = take(&mut on_follower, 5).await;

    // A process that stopped two seconds ago left its runs, on a chat of their own.
    let mut conn = sqlx::PgConnection::connect(db.url()).await.unwrap();
    let crashed_chat = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO agent_chats (id, org_id, user_id, canvas_id) VALUES ($1, 'o', 'u', 'c')",
    )
    .bind(crashed_chat)
    .execute(&mut conn)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO agent_chat_runs (id, chat_id, model, status, owner_instance, heartbeat_at) \
         SELECT gen_random_uuid(), $1, 'test', 'running', 'crashed', now() - interval '2 seconds' \
         FROM generate_series(1, $2)",
    )
    .bind(crashed_chat)
    .bind(CRASHED_RUNS)
    .execute(&mut conn)
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let interrupted: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM agent_chat_runs WHERE chat_id = $1 AND status = 'interrupted'",
        )
        .bind(crashed_chat)
        .fetch_one(&mut conn)
        .await
        .unwrap();
        if interrupted == CRASHED_RUNS {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never marked interrupted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // While the follower ends their logs, the producer is deployed: it releases its run at its drain's deadline.
    producer.signal("TERM");
    assert!(producer.exit_status().await.success());
    drop(own);
    seen.extend(on_follower.rest().await);
    assert_whole_and_completed(&run, &seen);
    assert_eq!(deltas(&seen), answer(300));
    let store = db.open().await;
    assert_eq!(ended(&store, &run).await.status, RunStatus::Completed);
    // Every crashed run's log ends, for a client that comes late.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let unended: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM agent_chat_runs r WHERE r.chat_id = $1 AND NOT EXISTS \
             (SELECT 1 FROM agent_run_events e WHERE e.run_id = r.id)",
        )
        .bind(crashed_chat)
        .fetch_one(&mut conn)
        .await
        .unwrap();
        if unended == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{unended} logs never ended"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = follower.get("/metrics").await.text().await.unwrap();
    assert_eq!(metric(&metrics, "agentd_runs_taken_over_total"), 1);
    // The log says how many it marked, and names the first few.
    let marked = follower
        .wait_for_log_where(|l| {
            l["message"] == "marked interrupted the runs of a stopped process that nobody follows"
        })
        .await
        .unwrap();
    assert_eq!(marked["count"], CRASHED_RUNS);
    assert_eq!(
        marked["runs"].as_str().unwrap().matches('-').count(),
        20 * 4
    );
    // Ending them took no connection that the run log's group commits were waiting for.
    assert_eq!(metric(&metrics, "agentd_store_acquire_timeouts_total"), 0);
}

#[tokio::test]
async fn a_follower_on_a_peer_gets_the_rest_of_the_answer_when_the_producer_is_killed() {
    let db = TestDb::postgres().await;
    let mut a = Agentd::spawn_on(db.url(), &HANDOFF).await;
    let b = Agentd::spawn_on(db.url(), &HANDOFF).await;
    let chat = new_chat();
    let mut own = a.stream(&chat, paced(150, 20)).await;
    let run = run_id_of(&take(&mut own, 1).await);
    let mut on_b = b.follow(&chat, &run, None).await;
    let mut seen = take(&mut on_b, 20).await;

    a.kill().await;
    drop(own);
    seen.extend(on_b.rest().await);
    assert_whole_and_completed(&run, &seen);
    assert_eq!(deltas(&seen), answer(150));
    let store = db.open().await;
    let stored = ended(&store, &run).await;
    assert_eq!(stored.status, RunStatus::Completed);
    assert_eq!(stored.epoch, 2, "claimed once");
}

#[tokio::test]
async fn a_producer_paused_past_its_lease_appends_nothing_when_it_wakes() {
    let db = TestDb::postgres().await;
    let mut a = Agentd::spawn_on(db.url(), &HANDOFF).await;
    let b = Agentd::spawn_on(db.url(), &HANDOFF).await;
    let chat = new_chat();
    let mut own = a.stream(&chat, paced(150, 20)).await;
    let run = run_id_of(&take(&mut own, 1).await);
    let mut on_b = b.follow(&chat, &run, None).await;
    let mut seen = take(&mut on_b, 20).await;

    // A stops for longer than its lease: B takes the run over; then A wakes and goes on where it was.
    a.signal("STOP");
    let store = db.open().await;
    let run_id: Uuid = run.parse().unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while store.get_run(run_id).await.unwrap().unwrap().epoch < 2 {
        assert!(tokio::time::Instant::now() < deadline, "never claimed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.signal("CONT");
    seen.extend(on_b.rest().await);
    assert_whole_and_completed(&run, &seen);
    assert_eq!(deltas(&seen), answer(150));
    assert_eq!(ended(&store, &run).await.status, RunStatus::Completed);
    // The log holds each seq once, and exactly what the follower saw.
    let logged = store.events_after(run_id, 0).await.unwrap();
    let seqs: Vec<u64> = logged.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(seqs, (1..=seen.len() as u64).collect::<Vec<_>>());
    // A learnt it had lost the run, and stopped producing it.
    let fenced = a
        .wait_for_log_where(|l| l["run_id"] == run.as_str() && l["message"] == "run ended")
        .await
        .unwrap();
    assert_eq!(fenced["outcome"], "fenced");
    drop(own);
}

/// A tool server whose calls take a while, counting them.
struct SlowTools {
    base: String,
    calls: Arc<AtomicUsize>,
}

impl SlowTools {
    async fn start() -> Self {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = |calls: Arc<AtomicUsize>| {
            move || {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                async move {
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    axum::Json(json!({"call": n}))
                }
            }
        };
        let router = Router::new()
            .route("/look", get(counted(Arc::clone(&calls))))
            .route("/order", post(counted(Arc::clone(&calls))));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        Self { base, calls }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

/// Kills the producer while `tool` is being called, restarts on the same store and re-attaches; returns what the
/// tool calls counted, and the tool result the model was given.
async fn cut_tool_call(tool: &str) -> (usize, String) {
    let tools = SlowTools::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tools.yaml");
    let yaml = format!(
        "tools:\n  - name: look\n    description: Looks something up.\n    url: {base}/look\n  \
         - name: order\n    description: Places an order.\n    method: POST\n    url: {base}/order\n",
        base = tools.base
    );
    std::fs::write(&file, yaml).unwrap();
    let db = TestDb::sqlite();
    let addr = format!("127.0.0.1:{}", free_port());
    let env = [
        ("HTTP_ADDR", addr.as_str()),
        ("RUN_LEASE", "2"),
        ("TOOLS_FILE", file.to_str().unwrap()),
    ];
    let mut first = Agentd::spawn_on(db.url(), &env).await;
    let chat = new_chat();
    let body = json!({"question": "q", "model": format!("test:deltas=3,tool={tool}")});
    let mut stream = first.stream(&chat, body).await;
    let mut seen = take(&mut stream, 2).await;
    assert_eq!(seen[1].1["type"], "tool_started");
    let run = run_id_of(&seen);
    while tools.calls() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.kill().await;
    drop(stream);

    let second = Agentd::spawn_on(db.url(), &env).await;
    let last = seen.last().unwrap().0.clone();
    seen.extend(second.follow(&chat, &run, Some(&last)).await.rest().await);
    assert_whole_and_completed(&run, &seen);
    let finished: Vec<&Value> = seen
        .iter()
        .map(|(_, e)| e)
        .filter(|e| e["type"] == "tool_finished")
        .collect();
    assert_eq!(finished.len(), 1, "{seen:?}");
    assert!(
        finished[0].get("result").is_none(),
        "clients never see tool results"
    );
    let store = db.open().await;
    let messages = store.messages(chat.parse().unwrap()).await.unwrap();
    let result = messages
        .iter()
        .find_map(|m| match &m.message {
            agentd::model::Message::ToolResult { content, .. } => Some(content.clone()),
            _ => None,
        })
        .expect("the tool result is in the history");
    (tools.calls(), result)
}

#[tokio::test]
async fn an_idempotent_tool_cut_by_a_takeover_is_run_again_once() {
    let (calls, result) = cut_tool_call("look").await;
    assert_eq!(calls, 2, "once before the kill, once after the takeover");
    assert_eq!(result, r#"{"call":2}"#);
}

#[tokio::test]
async fn a_non_idempotent_tool_cut_by_a_takeover_is_reported_to_the_model_not_run_again() {
    let (calls, result) = cut_tool_call("order").await;
    assert_eq!(calls, 1);
    assert!(result.contains("interrupted"), "{result}");
}
