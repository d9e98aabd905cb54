//! Runs are durable: what the binary streams is what the store keeps, through crashes, shutdowns, disconnects and
//! store outages, on SQLite and on PostgreSQL.

use crate::common::db::{PgServer, TestDb, runs_of, until_statements_wait_for_locks};
use crate::common::{Agentd, Events, deltas, new_chat, types};
use agentd::grpc::proto::ListAgentChatsRequest;
use agentd::grpc::proto::agents_client::AgentsClient;
use agentd::model::Message;
use agentd::store::{ChatOwner, RunStatus};
use std::time::Duration;

use serde_json::{Value, json};
use uuid::Uuid;

/// A run of `n` deltas, one every 100 ms.
fn slow(n: u32) -> Value {
    json!({"question": "q", "model": format!("test:deltas={n},delay_ms=100")})
}

/// Reads the stream up to and including its `n`th `model_delta`; returns the run id and the text so far.
async fn read_deltas(stream: &mut Events, n: usize) -> (Uuid, String) {
    let started = stream.next_data().await;
    let run_id = started["run_id"].as_str().unwrap().parse().unwrap();
    let mut text = String::new();
    for _ in 0..n {
        let event = stream.next_data().await;
        assert_eq!(event["type"], "model_delta");
        text.push_str(event["content"].as_str().unwrap());
    }
    (run_id, text)
}

#[tokio::test]
async fn the_second_run_of_a_chat_gets_the_first_exchange_and_the_rows_match_the_stream() {
    let db = TestDb::sqlite();
    let server = Agentd::spawn_on(db.url(), &[]).await;
    let chat = new_chat();
    let first = server
        .stream(
            &chat,
            json!({"question": "alpha beta", "model": "test:deltas=3"}),
        )
        .await
        .rest()
        .await;
    let second = server
        .stream(
            &chat,
            json!({"question": "gamma", "model": "test:deltas=4"}),
        )
        .await
        .rest()
        .await;

    // The test model counts the words it is given: the second run was given both questions and the first answer.
    let input = |events: &[(String, Value)]| {
        let answer = events
            .iter()
            .find(|(_, e)| e["type"] == "final_answer")
            .unwrap();
        answer.1["usage"]["input_tokens"].as_u64().unwrap()
    };
    assert_eq!(input(&first), 2);
    assert_eq!(input(&second), 2 + 3 + 1);

    let store = db.open().await;
    let chat_id: Uuid = chat.parse().unwrap();
    let runs = runs_of(&store, chat_id).await;
    assert_eq!(runs.len(), 2);
    assert!(runs.iter().all(|r| r.status == RunStatus::Completed));
    assert_eq!(runs[0].output, deltas(&first));
    assert_eq!(runs[1].output, deltas(&second));
    let messages: Vec<Message> = store
        .messages(chat_id)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.message)
        .collect();
    assert_eq!(
        messages,
        [
            Message::User {
                content: "alpha beta".into()
            },
            Message::Assistant {
                content: deltas(&first),
                tool_calls: vec![]
            },
            Message::User {
                content: "gamma".into()
            },
            Message::Assistant {
                content: deltas(&second),
                tool_calls: vec![]
            },
        ]
    );
    let chat = store.get_chat(chat_id).await.unwrap().unwrap();
    assert_eq!(chat.initial_message.as_deref(), Some("alpha beta"));
    assert_eq!(chat.totals.output_tokens, 7);
    store.close().await;
}

#[tokio::test]
async fn a_tool_call_and_its_result_are_stored_in_order() {
    let db = TestDb::sqlite();
    let server = Agentd::spawn_on(db.url(), &[]).await;
    let chat = new_chat();
    server
        .stream(
            &chat,
            json!({"question": "time?", "model": "test:deltas=2,tool=current_time"}),
        )
        .await
        .rest()
        .await;
    let store = db.open().await;
    let messages: Vec<Message> = store
        .messages(chat.parse().unwrap())
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.message)
        .collect();
    assert_eq!(messages.len(), 4);
    assert!(
        matches!(&messages[1], Message::Assistant { tool_calls, .. } if tool_calls[0].name == "current_time")
    );
    assert!(
        matches!(&messages[2], Message::ToolResult { tool_call_id, content } if tool_call_id == "call_1" && content.contains("utc"))
    );
    assert!(
        matches!(&messages[3], Message::Assistant { content, .. } if content == "Agents answer")
    );
    store.close().await;
}

#[tokio::test]
async fn a_killed_server_leaves_an_interrupted_run_with_its_partial_answer_after_restart() {
    let db = TestDb::sqlite();
    let mut first = Agentd::spawn_on(db.url(), &[("RUN_LEASE", "1")]).await;
    let chat = new_chat();
    let mut stream = first.stream(&chat, slow(1000)).await;
    let (run_id, streamed) = read_deltas(&mut stream, 8).await;
    first.kill().await;
    drop(stream);

    let mut second = Agentd::spawn_on(db.url(), &[("RUN_LEASE", "1")]).await;
    let marked = second
        .wait_for_log("marked interrupted the runs of a stopped process")
        .await;
    assert_eq!(marked["count"], 1);

    let store = db.open().await;
    let run = store.get_run(run_id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Interrupted);
    // The answer so far is read back from the run log, which has every event the client was sent (and perhaps a
    // few more it had not read yet).
    assert!(
        run.output.starts_with(&streamed),
        "{streamed:?} is not a prefix of {:?}",
        run.output
    );
    let chat_id = chat.parse().unwrap();
    assert!(store.get_chat(chat_id).await.unwrap().is_some());
    assert_eq!(
        store.messages(chat_id).await.unwrap()[0].message,
        Message::User {
            content: "q".into()
        }
    );
    // The chat goes on.
    let events = second
        .stream(&chat, json!({"question": "again"}))
        .await
        .rest()
        .await;
    assert_eq!(types(&events).last().unwrap(), "done");
    store.close().await;
}

#[tokio::test]
async fn shutdown_disconnect_and_failure_are_each_stored_with_their_partial_answer() {
    let db = TestDb::sqlite();
    let mut server = Agentd::spawn_on(
        db.url(),
        &[
            ("DRAIN_TIMEOUT", "1"),
            ("SHUTDOWN_TIMEOUT", "20"),
            ("DETACH_GRACE", "0"),
        ],
    )
    .await;

    let failed = server
        .stream(
            &new_chat(),
            json!({"question": "q", "model": "test:fail_after=2"}),
        )
        .await
        .rest()
        .await;
    let failed_id: Uuid = failed[0].1["run_id"].as_str().unwrap().parse().unwrap();

    let mut leaving = server.stream(&new_chat(), slow(1000)).await;
    let (left_id, left_text) = read_deltas(&mut leaving, 3).await;
    drop(leaving);
    server
        .wait_for_log_where(|l| l["outcome"] == "detached")
        .await
        .unwrap();

    let mut cut = server.stream(&new_chat(), slow(1000)).await;
    let (cut_id, _) = read_deltas(&mut cut, 3).await;
    server.signal("TERM");
    let rest = cut.rest().await;
    assert_eq!(
        types(&rest)[types(&rest).len() - 2..],
        ["run_interrupted", "done"]
    );
    assert!(server.exit_status().await.success());

    let store = db.open().await;
    let failed = store.get_run(failed_id).await.unwrap().unwrap();
    assert_eq!(failed.status, RunStatus::Failed);
    assert!(failed.error.unwrap().contains("failed after 2 deltas"));
    assert_eq!(failed.output, "Agents answer");

    let left = store.get_run(left_id).await.unwrap().unwrap();
    assert_eq!(left.status, RunStatus::Interrupted);
    assert!(left.error.unwrap().contains("nobody followed"));
    assert!(left.output.starts_with(&left_text) && !left.output.is_empty());

    let cut = store.get_run(cut_id).await.unwrap().unwrap();
    assert_eq!(cut.status, RunStatus::Interrupted);
    assert!(cut.error.unwrap().contains("shut down"));
    // Everything the client was sent, and nothing it was not.
    let mut sent = String::from("Agents answer in");
    sent.push_str(&deltas(&rest));
    assert_eq!(cut.output, sent);
    store.close().await;
}

#[tokio::test]
async fn another_owners_chat_is_not_found_and_a_bad_chat_id_is_422() {
    let db = TestDb::sqlite();
    let store = db.open().await;
    let theirs = store
        .create_chat(&ChatOwner {
            org_id: "acme".into(),
            user_id: "alice".into(),
            canvas_id: "canvas".into(),
        })
        .await
        .unwrap();
    let server = Agentd::spawn_on(db.url(), &[]).await;
    let response = server
        .ask(&theirs.id.to_string(), json!({"question": "q"}))
        .await;
    assert_eq!(response.status(), 404);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"detail": "Chat not found", "code": "chat_not_found"})
    );
    assert!(runs_of(&store, theirs.id).await.is_empty());

    let response = server.ask("42", json!({"question": "q"})).await;
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["detail"][0]["loc"], json!(["path", "chat_id"]));
    store.close().await;
}

/// A start the store refuses (not one it could not be reached for: a retry cannot help) is a 500 that names it; the
/// chat keeps what it had, and takes the next run once the store does.
#[tokio::test]
async fn a_run_start_the_store_refuses_is_a_500_and_the_chat_keeps_what_it_had() {
    let db = TestDb::sqlite();
    let store = db.open().await;
    let mut server = Agentd::spawn_on(db.url(), &[]).await;
    let chat = new_chat();
    server.stream(&chat, slow(2)).await.rest().await;
    let chat_id: Uuid = chat.parse().unwrap();
    let before = store.messages(chat_id).await.unwrap();
    assert_eq!(before.len(), 2);

    db.execute(
        "CREATE TRIGGER refuse_runs BEFORE INSERT ON agent_chat_runs \
         BEGIN SELECT RAISE(ABORT, 'runs refused'); END",
        "CREATE FUNCTION refuse_runs() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
         RAISE EXCEPTION 'runs refused'; END $$; \
         CREATE TRIGGER refuse_runs BEFORE INSERT ON agent_chat_runs \
         FOR EACH ROW EXECUTE FUNCTION refuse_runs()",
    )
    .await;
    let refused = server.ask(&chat, json!({"question": "again"})).await;
    assert_eq!(refused.status(), 500);
    assert!(!refused.headers().contains_key("retry-after"));
    assert_eq!(
        refused.json::<Value>().await.unwrap(),
        json!({"detail": "The session store refused the request", "code": "store_refused"})
    );
    server.wait_for_log("session store refused a request").await;
    assert_eq!(store.messages(chat_id).await.unwrap().len(), before.len());
    assert_eq!(runs_of(&store, chat_id).await.len(), 1);

    db.execute(
        "DROP TRIGGER refuse_runs",
        "DROP TRIGGER refuse_runs ON agent_chat_runs",
    )
    .await;
    let events = server.stream(&chat, slow(2)).await.rest().await;
    assert_eq!(types(&events).last().unwrap(), "done");
    assert_eq!(store.messages(chat_id).await.unwrap().len(), 4);
    assert_eq!(runs_of(&store, chat_id).await.len(), 2);
    store.close().await;
}

#[tokio::test]
async fn migrate_applies_the_migrations_and_exits() {
    let db = TestDb::sqlite();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentd"))
        .arg("migrate")
        .env_clear()
        .env("DATABASE_URL", db.url())
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("migrations applied"));
    let store = db.open().await;
    assert!(
        store
            .list_chats(&ChatOwner {
                org_id: "o".into(),
                user_id: "u".into(),
                canvas_id: "c".into()
            })
            .await
            .unwrap()
            .is_empty()
    );
    store.close().await;

    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentd"))
        .arg("migrate")
        .env_clear()
        .env("DATABASE_URL", "postgres://agentd:secret@127.0.0.1:1/none")
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("migrations failed"), "{stderr}");
    assert!(!stderr.contains("secret"), "the password leaked: {stderr}");
}

#[tokio::test]
async fn a_postgres_outage_gives_503_and_the_service_recovers_without_restart() {
    let pg = PgServer::start();
    let db = TestDb::postgres_on(&pg.admin_url()).await;
    let mut server = Agentd::spawn_on(db.url(), &[]).await;
    let chat = new_chat();
    let events = server
        .stream(&chat, json!({"question": "q"}))
        .await
        .rest()
        .await;
    assert_eq!(types(&events).last().unwrap(), "done");
    let failing = new_chat();
    let mut streaming = server.stream(&failing, slow(1000)).await;
    let (failed_run, _) = read_deltas(&mut streaming, 1).await;

    pg.stop();
    // The run in flight cannot save its answer any more: it ends visibly instead of streaming into the void.
    let rest = streaming.rest().await;
    assert_eq!(
        types(&rest)[types(&rest).len() - 2..],
        ["run_failed", "done"]
    );
    assert!(
        rest[rest.len() - 2].1["error"]
            .as_str()
            .unwrap()
            .contains("session store")
    );
    assert_eq!(rest[rest.len() - 2].1["code"], "store_failed");

    let refused = server.ask(&chat, json!({"question": "q"})).await;
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = refused.json().await.unwrap();
    assert_eq!(
        body["detail"],
        "Session store is unavailable; retry shortly"
    );
    assert_eq!(body["code"], "store_unavailable");
    assert_eq!(server.get("/readyz").await.status(), 503);
    assert_eq!(server.get("/healthz").await.status(), 200);
    let mut grpc = AgentsClient::connect(server.grpc.clone()).await.unwrap();
    let listed = grpc
        .list_agent_chats(ListAgentChatsRequest {
            org_id: "dev-org".into(),
            canvas_id: "dev-canvas".into(),
            user_id: "dev-user".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(listed.code(), tonic::Code::Unavailable);

    pg.start_again();
    assert_eq!(server.get("/readyz").await.status(), 200);
    let events = server
        .stream(&chat, json!({"question": "q"}))
        .await
        .rest()
        .await;
    assert_eq!(types(&events).last().unwrap(), "done");
    let store = db.open().await;
    assert_eq!(runs_of(&store, chat.parse().unwrap()).await.len(), 2);
    let ready: Value = server.get("/readyz").await.json().await.unwrap();
    assert_eq!(ready["status"], "ready");
    // The events the store could not take during the outage were kept and are stored now: a client attaching to the
    // failed run gets every event its first client got, its end included.
    let replay = tokio::time::timeout(Duration::from_secs(15), async {
        server
            .follow(&failing, &failed_run.to_string(), None)
            .await
            .rest()
            .await
    })
    .await
    .expect("the replay ends");
    assert_eq!(replay.len(), rest.len() + 2, "{replay:?}");
    assert_eq!(replay[2..], rest[..]);
    // Its end could not be stored in the outage, so it is still `running` with no heartbeat: once nobody has followed
    // it for a lease, it is marked interrupted as a stopped process's runs are, and its log, which has its end, is left
    // as it is.
    db.execute(
        "UPDATE agent_chat_runs SET heartbeat_at = heartbeat_at - 3600000, followed_at = followed_at - 3600000",
        "UPDATE agent_chat_runs SET heartbeat_at = heartbeat_at - interval '1 hour', \
         followed_at = followed_at - interval '1 hour'",
    )
    .await;
    server
        .wait_for_log("marked interrupted the runs of a stopped process")
        .await;
    assert_eq!(
        store.get_run(failed_run).await.unwrap().unwrap().status,
        RunStatus::Interrupted
    );
    let again = server
        .follow(&failing, &failed_run.to_string(), None)
        .await
        .rest()
        .await;
    assert_eq!(again, replay);
    assert_eq!(
        store.events_after(failed_run, 0).await.unwrap().len(),
        replay.len(),
        "one end in the log"
    );
    store.close().await;
}

/// Runs ending together while the ends before them are held up (their rows locked, as a slow commit holds them: the
/// calls in flight wait, and the ends after them wait their turn) store their ends, however long past a request's
/// wait for a connection (3 s) their turn comes. Before, the ends that waited longer failed: a completed answer reached
/// its client as `run_failed`, and the store kept the run `running` until it was marked stale. The slow waits are
/// noted in two lines, where sqlx wrote one for each.
#[tokio::test]
async fn runs_ending_together_store_their_ends_when_the_store_is_held_up_longer_than_a_request_waits()
 {
    let db = TestDb::postgres().await;
    let mut server = Agentd::spawn_on(db.url(), &[]).await;
    let mut runs = runs_ending_in_3_s(&server).await;
    let locked = lock_runs(&db, &runs).await;
    // The runs end within 3 s; the last ends wait for a connection past 3 s more.
    tokio::time::sleep(Duration::from_secs(8)).await;
    sqlx::query("ROLLBACK")
        .execute(&mut { locked })
        .await
        .unwrap();

    let store = db.open().await;
    for (run, stream) in &mut runs {
        let rest = stream.rest().await;
        assert_eq!(
            types(&rest)[types(&rest).len() - 2..],
            ["run_completed", "done"],
            "{rest:?}"
        );
        let stored = store.get_run(*run).await.unwrap().unwrap();
        assert_eq!(stored.status, RunStatus::Completed);
    }
    let more = server
        .wait_for_log("more requests waited long for a store connection")
        .await;
    assert!(more["requests"].as_u64().unwrap() >= 1, "{more}");
    let logs = server.log_text();
    assert!(!logs.contains("could not store how the run ended"));
    assert_eq!(
        logs.matches("a request waited long for a store connection")
            .count(),
        1
    );
    assert!(!logs.contains("exceeded slow threshold"), "{logs}");
    store.close().await;
}

/// A run whose only follower is on another replica goes on while its producer cannot ask the store whether anyone
/// follows it (every connection of the pool taken past a request's wait, here by run starts waiting for their chats):
/// the follower gets the whole answer. Before, the producer took the failed look-up for "nobody follows" and detached
/// the run, and the follower got `run_interrupted`.
#[tokio::test]
async fn a_run_followed_elsewhere_goes_on_while_its_producer_cannot_ask_the_store() {
    let db = TestDb::postgres().await;
    // The failed look-up is logged at debug level (the busy store itself is noted once for all its waits).
    let mut producer = Agentd::spawn_on(
        db.url(),
        &[
            ("DETACH_GRACE", "2"),
            ("RUST_LOG", "info,agentd::runs=debug"),
        ],
    )
    .await;
    let follower = Agentd::spawn_on(db.url(), &[]).await;
    let chat = new_chat();
    let mut first = producer.stream(&chat, slow(150)).await;
    let (run, _) = read_deltas(&mut first, 1).await;
    let mut elsewhere = follower.follow(&chat, &run.to_string(), None).await;
    assert_eq!(elsewhere.next_data().await["type"], "run_started");

    let (locked, starts) = pool_held_by_starts(&producer, &db).await;
    // The starts hold every connection; the producer's client leaves, and after the grace the producer asks whether a
    // follower elsewhere was noted, which waits 3 s for a connection and fails.
    drop(first);
    producer
        .wait_for_log("could not tell whether the run is followed elsewhere")
        .await;
    sqlx::query("ROLLBACK")
        .execute(&mut { locked })
        .await
        .unwrap();

    let rest = elsewhere.rest().await;
    assert_eq!(
        types(&rest)[types(&rest).len() - 2..],
        ["run_completed", "done"]
    );
    let store = db.open().await;
    assert_eq!(
        store.get_run(run).await.unwrap().unwrap().status,
        RunStatus::Completed
    );
    for start in starts {
        assert_eq!(start.await.unwrap().status(), 200);
    }
    store.close().await;
}

/// Takes every connection of `server`'s pool (16) for as long as the returned connection's transaction lasts: 16
/// chats, each with a run done, locked here; then a question in each, 75 ms apart, whose start waits for its chat on a
/// connection of its own. The questions' responses come once the chats are free.
async fn pool_held_by_starts(
    server: &Agentd,
    db: &TestDb,
) -> (
    sqlx::PgConnection,
    Vec<tokio::task::JoinHandle<reqwest::Response>>,
) {
    use sqlx::Connection;
    let chats: Vec<String> = (0..16).map(|_| new_chat()).collect();
    for chat in &chats {
        server
            .stream(chat, json!({"question": "q"}))
            .await
            .rest()
            .await;
    }
    let mut conn = sqlx::PgConnection::connect(db.url()).await.unwrap();
    sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
    let ids: Vec<Uuid> = chats.iter().map(|chat| chat.parse().unwrap()).collect();
    sqlx::query("SELECT id FROM agent_chats WHERE id = ANY($1) FOR UPDATE")
        .bind(&ids)
        .execute(&mut conn)
        .await
        .unwrap();
    let starts = chats
        .iter()
        .enumerate()
        .map(|(i, chat)| {
            let url = server.url(&format!("/agents/chats/{chat}/stream"));
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(75) * i as u32).await;
                reqwest::Client::new()
                    .post(url)
                    .json(&json!({"question": "again"}))
                    .send()
                    .await
                    .unwrap()
            })
        })
        .collect();
    // Every start waiting for its chat, each on a connection.
    until_statements_wait_for_locks(&mut conn, 16, "the starts").await;
    (conn, starts)
}

/// Twice as many runs as the PostgreSQL pool has connections (16), each running for 3 s, their first delta read. They
/// start 75 ms apart, so that they end apart (ends that arrive together are committed together).
async fn runs_ending_in_3_s(server: &Agentd) -> Vec<(Uuid, Events)> {
    let opened = (0..32).map(|i| async move {
        tokio::time::sleep(Duration::from_millis(75) * i).await;
        let chat = new_chat();
        let mut stream = server.stream(&chat, slow(30)).await;
        let (run, _) = read_deltas(&mut stream, 1).await;
        (run, stream)
    });
    futures_util::future::join_all(opened).await
}

/// Locks the rows of `runs` as a slow commit would hold them, until the returned connection rolls back: the first of
/// their ends to come take connections (as many calls as are made at once) and wait here, the others wait their turn.
async fn lock_runs(db: &TestDb, runs: &[(Uuid, Events)]) -> sqlx::PgConnection {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(db.url()).await.unwrap();
    sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
    let ids: Vec<Uuid> = runs.iter().map(|(run, _)| *run).collect();
    let locked = sqlx::query("SELECT id FROM agent_chat_runs WHERE id = ANY($1) FOR NO KEY UPDATE")
        .bind(&ids)
        .execute(&mut conn)
        .await
        .unwrap();
    assert_eq!(locked.rows_affected(), ids.len() as u64);
    conn
}

#[tokio::test]
async fn two_replicas_on_one_postgres_each_recover_only_dead_runs() {
    let db = TestDb::postgres().await;
    let lease = [("RUN_LEASE", "2")];
    let mut doomed = Agentd::spawn_on(db.url(), &lease).await;
    let mut survivor = Agentd::spawn_on(db.url(), &lease).await;

    let mut dead_stream = doomed.stream(&new_chat(), slow(1000)).await;
    let (dead_run, _) = read_deltas(&mut dead_stream, 3).await;
    // The survivor's own run outlives the lease several times over.
    let mut live_stream = survivor.stream(&new_chat(), slow(80)).await;
    let (live_run, _) = read_deltas(&mut live_stream, 3).await;

    doomed.kill().await;
    drop(dead_stream);
    let marked = survivor
        .wait_for_log("marked interrupted the runs of a stopped process")
        .await;
    assert_eq!(marked["runs"], format!("[{dead_run}]"));

    let store = db.open().await;
    assert_eq!(
        store.get_run(dead_run).await.unwrap().unwrap().status,
        RunStatus::Interrupted
    );
    assert_eq!(
        store.get_run(live_run).await.unwrap().unwrap().status,
        RunStatus::Running
    );

    let rest = live_stream.rest().await;
    assert_eq!(
        types(&rest)[types(&rest).len() - 3..],
        ["final_answer", "run_completed", "done"]
    );
    let live = store.get_run(live_run).await.unwrap().unwrap();
    assert_eq!(live.status, RunStatus::Completed);
    let sweeps = survivor
        .log_text()
        .matches("marked interrupted the runs")
        .count();
    assert_eq!(sweeps, 1, "only the dead run was ever marked");
    store.close().await;
}
