//! Runs outlive their connections: the run log, attach and replay, detach, cancel, one run per chat, the history a
//! page re-attaches from. Through the real binary, on SQLite and on PostgreSQL.

use std::time::Duration;

use agentd::store::{ChatOwner, RunStatus, STALE_RUN_ERROR};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::common::db::TestDb;
use crate::common::runs::{assert_whole, ended, final_output, paced, run_id_of, take};
use crate::common::{Agentd, Events, PATIENCE, deltas, metric, new_chat, types};

on_both_backends!(
    a_client_that_reconnects_gets_exactly_the_missing_events_then_the_live_ones,
    a_finished_run_replays_the_same_events_and_ends,
    every_event_a_client_received_is_in_the_log_after_a_kill,
    attaching_to_an_ended_run_whose_log_was_left_open_ends_it,
    a_runs_end_the_store_refused_for_a_while_is_logged_once_it_takes_it,
    a_claimed_run_whose_log_has_its_end_is_ended_not_continued,
    a_run_nobody_follows_stops_after_the_detach_grace,
    a_run_re_attached_within_the_grace_completes,
    cancel_busy_chats_and_bad_resume_inputs_get_their_statuses,
    the_history_names_the_run_going_so_a_page_can_re_attach,
);

async fn a_client_that_reconnects_gets_exactly_the_missing_events_then_the_live_ones(db: TestDb) {
    let server = Agentd::spawn_on(db.url(), &[]).await;
    let chat = new_chat();
    let mut first = server.stream(&chat, paced(40, 30)).await;
    let mut seen = take(&mut first, 10).await;
    drop(first);
    let run = run_id_of(&seen);
    // Events went on while nobody was connected; they are replayed, then the live ones follow.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let last = seen.last().unwrap().0.clone();
    let mut again = server.follow(&chat, &run, Some(&last)).await;
    seen.extend(again.rest().await);
    assert_whole(&run, &seen);
    assert_eq!(deltas(&seen), final_output(&seen));
    assert_eq!(
        types(&seen).iter().filter(|t| *t == "model_delta").count(),
        40
    );

    // `?after=` is the same as `Last-Event-ID`, and a second follower of a finished run gets the same events.
    let replay = Events::new(server.attach(&chat, &run, None, Some("10")).await)
        .rest()
        .await;
    assert_eq!(replay, seen[10..]);
}

async fn a_finished_run_replays_the_same_events_and_ends(db: TestDb) {
    let server = Agentd::spawn_on(db.url(), &[]).await;
    let chat = new_chat();
    let body = json!({"question": "q", "model": "test:deltas=5,tool=current_time"});
    let original = server.stream(&chat, body).await.rest().await;
    let run = run_id_of(&original);
    let replay = server.follow(&chat, &run, None).await.rest().await;
    assert_eq!(replay, original);
    assert_whole(&run, &replay);
    let metrics = server.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.lines().any(|l| l == "agentd_replays_total 1"),
        "{metrics}"
    );
}

/// A chat whose run's process was killed after its client received 15 events: the chat, and those events.
async fn killed_mid_run(db: &TestDb) -> (String, Vec<(String, Value)>) {
    let mut server = Agentd::spawn_on(db.url(), &[]).await;
    let chat = new_chat();
    let mut stream = server.stream(&chat, paced(1000, 20)).await;
    let received = take(&mut stream, 15).await;
    server.kill().await;
    (chat, received)
}

async fn every_event_a_client_received_is_in_the_log_after_a_kill(db: TestDb) {
    let (_, received) = killed_mid_run(&db).await;
    let run: Uuid = run_id_of(&received).parse().unwrap();
    let logged = db.open().await.events_after(run, 0).await.unwrap();
    assert!(logged.len() >= received.len(), "{} logged", logged.len());
    for ((id, event), (seq, json)) in received.iter().zip(&logged) {
        assert_eq!(id, &format!("{run}:{seq}"));
        assert_eq!(event, &serde_json::from_str::<Value>(json).unwrap());
    }
}

/// A run marked ended whose log has no `done` (its process was killed, and the replica that marked it interrupted
/// could not end its log) is ended when a client attaches: the events so far, then `run_interrupted` and `done`, now
/// in the log for every later client. (A follower used to wait for a `done` that never came.)
async fn attaching_to_an_ended_run_whose_log_was_left_open_ends_it(db: TestDb) {
    let (chat, received) = killed_mid_run(&db).await;
    let run = run_id_of(&received);
    // Marked interrupted as a replica marks the runs of a stopped process, which then failed to end its log.
    let mark = |now: &str| {
        format!(
            "UPDATE agent_chat_runs SET status = 'interrupted', error = '{STALE_RUN_ERROR}', \
             epoch = epoch + 1, finished_at = {now}"
        )
    };
    db.execute(
        &mark("CAST(unixepoch('subsec') * 1000 AS INTEGER)"),
        &mark("now()"),
    )
    .await;

    let second = Agentd::spawn_on(db.url(), &[]).await;
    let attached = tokio::time::timeout(PATIENCE, async {
        second.follow(&chat, &run, None).await.rest().await
    })
    .await
    .expect("the stream ends");
    assert_whole(&run, &attached);
    assert_eq!(attached[..received.len()], received[..]);
    let kinds = types(&attached);
    assert_eq!(&kinds[kinds.len() - 2..], ["run_interrupted", "done"]);
    let interrupted = &attached[attached.len() - 2].1;
    assert_eq!(interrupted["reason"], "stopped");
    assert_eq!(
        interrupted["resume"],
        format!("/agents/chats/{chat}/runs/{run}/stream")
    );
    // The end is in the log: a later client gets the same events, and the answer so far is stored.
    assert_eq!(
        second.follow(&chat, &run, None).await.rest().await,
        attached
    );
    let stored = ended(&db.open().await, &run).await;
    assert_eq!(stored.status, RunStatus::Interrupted);
    assert_eq!(stored.output, deltas(&attached));
}

/// Makes the store refuse every row that carries a run's `done`, until the trigger is dropped.
async fn refuse_ends(db: &TestDb) {
    db.execute(
        "CREATE TRIGGER refuse_ends BEFORE INSERT ON agent_run_events \
         WHEN NEW.events LIKE '%\"type\":\"done\"%' BEGIN SELECT RAISE(ABORT, 'ends refused'); END",
        "CREATE FUNCTION refuse_ends() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
         IF NEW.events LIKE '%\"type\":\"done\"%' THEN RAISE EXCEPTION 'ends refused'; END IF; \
         RETURN NEW; END $$; \
         CREATE TRIGGER refuse_ends BEFORE INSERT ON agent_run_events \
         FOR EACH ROW EXECUTE FUNCTION refuse_ends()",
    )
    .await;
}

/// Events the store still does not take when the process stops are lost, and the log names their runs; the process
/// does not wait for the store to take them.
#[tokio::test]
async fn events_the_store_never_took_are_said_lost_when_the_process_stops() {
    let db = TestDb::sqlite();
    let mut server = Agentd::spawn_on(db.url(), &[]).await;
    refuse_ends(&db).await;
    let events = server
        .stream(
            &new_chat(),
            json!({"question": "q", "model": "test:deltas=3"}),
        )
        .await
        .rest()
        .await;
    assert_eq!(types(&events).last().unwrap(), "done");
    let run = run_id_of(&events);
    server.signal("TERM");
    assert!(server.exit_status().await.success());
    let lost = server
        .log_text()
        .lines()
        .find(|line| line.contains("stopping with run events the store did not take"))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no line on the lost events:\n{}", server.log_text()));
    assert!(lost.contains(&run), "{lost}");
}

/// A run whose last events the store would not take for a while (its end was stored a moment before): its client
/// gets them at once, and the writer keeps them and commits them again until the store takes them, so a client that
/// attached meanwhile gets the run's end then, and a later one the very same events. (They were dropped: the log
/// had no `done`, and every later client waited for one forever.)
async fn a_runs_end_the_store_refused_for_a_while_is_logged_once_it_takes_it(db: TestDb) {
    let server = Agentd::spawn_on(db.url(), &[]).await;
    // The store refuses any row with a run's `done` until the trigger goes.
    refuse_ends(&db).await;
    let chat = new_chat();
    let original = server
        .stream(&chat, json!({"question": "q", "model": "test:deltas=5"}))
        .await
        .rest()
        .await;
    let kinds = types(&original);
    assert_eq!(
        &kinds[kinds.len() - 3..],
        ["final_answer", "run_completed", "done"]
    );
    let run = run_id_of(&original);
    let store = db.open().await;
    assert_eq!(ended(&store, &run).await.status, RunStatus::Completed);
    let logged = store.events_after(run.parse().unwrap(), 0).await.unwrap();
    assert!(logged.len() < original.len(), "{logged:?}");
    let text = server.get("/metrics").await.text().await.unwrap();
    assert!(
        metric(&text, "agentd_run_log_commit_failures_total") >= 1,
        "{text}"
    );
    assert!(metric(&text, "agentd_run_log_kept_events") >= 1, "{text}");

    // A client attaching now gets what is logged, then waits for the rest.
    let mut waiting = server.follow(&chat, &run, None).await;
    assert_eq!(
        take(&mut waiting, logged.len()).await,
        original[..logged.len()]
    );
    db.execute(
        "DROP TRIGGER refuse_ends",
        "DROP TRIGGER refuse_ends ON agent_run_events",
    )
    .await;
    let rest = tokio::time::timeout(PATIENCE, waiting.rest())
        .await
        .expect("the run's end reaches the client once the store takes it");
    assert_eq!(rest, original[logged.len()..]);
    assert_eq!(
        server.follow(&chat, &run, None).await.rest().await,
        original
    );
    let text = server.get("/metrics").await.text().await.unwrap();
    assert_eq!(metric(&text, "agentd_run_log_kept_events"), 0, "{text}");
    // Every event but `run_started` (stored with the run) went through the writer, the kept ones too.
    assert_eq!(
        metric(&text, "agentd_run_log_events_total"),
        original.len() as u64 - 1,
        "{text}"
    );
    store.close().await;
}

/// A run whose log has its end while the store still has it `running`, released (its process could not store the end,
/// the store being down then) is not continued past its `done` by the replica a client attaches to: it stores the end
/// the log tells, and the log stays as it is. (The claim continued it: a second answer after `done`.)
async fn a_claimed_run_whose_log_has_its_end_is_ended_not_continued(db: TestDb) {
    let mut server = Agentd::spawn_on(db.url(), &[]).await;
    let chat = new_chat();
    let mut stream = server.stream(&chat, paced(1000, 20)).await;
    let mut original = take(&mut stream, 5).await;
    let run = run_id_of(&original);
    assert_eq!(server.cancel(&chat, &run).await.status(), 202);
    original.extend(stream.rest().await);
    ended(&db.open().await, &run).await;
    db.execute(
        "UPDATE agent_chat_runs SET status = 'running', owner_instance = '', finished_at = NULL",
        "UPDATE agent_chat_runs SET status = 'running', owner_instance = '', finished_at = NULL",
    )
    .await;

    let replay = tokio::time::timeout(PATIENCE, async {
        server.follow(&chat, &run, None).await.rest().await
    })
    .await
    .expect("the replay ends");
    assert_eq!(replay, original);
    let store = db.open().await;
    let stored = ended(&store, &run).await;
    assert_eq!(stored.status, RunStatus::Interrupted);
    assert_eq!(stored.output, deltas(&original));
    let logged = store.events_after(run.parse().unwrap(), 0).await.unwrap();
    assert_eq!(logged.len(), original.len());
    server
        .wait_for_log("claimed a run whose log had its end")
        .await;
    store.close().await;
}

async fn a_run_nobody_follows_stops_after_the_detach_grace(db: TestDb) {
    let mut server = Agentd::spawn_on(db.url(), &[("DETACH_GRACE", "0.5")]).await;
    let mut stream = server.stream(&new_chat(), paced(1000, 20)).await;
    let run = run_id_of(&take(&mut stream, 3).await);
    drop(stream);
    let stored = ended(&db.open().await, &run).await;
    assert_eq!(stored.status, RunStatus::Interrupted);
    assert!(stored.error.unwrap().contains("nobody followed"));
    assert!(!stored.output.is_empty(), "the partial answer is kept");
    let ended = server
        .wait_for_log_where(|l| l["run_id"] == run.as_str() && l["message"] == "run ended")
        .await
        .unwrap();
    assert_eq!(ended["outcome"], "detached");
}

#[tokio::test]
async fn a_client_that_leaves_a_quiet_stream_is_noticed_at_once() {
    // The run has nothing to write for a minute: without watching the client's end, the server would notice it gone
    // only at a failed write, the second keep-alive (30 s) after it left.
    let db = TestDb::sqlite();
    let server = Agentd::spawn_on(db.url(), &[("DETACH_GRACE", "0")]).await;
    let mut stream = server.stream(&new_chat(), paced(2, 60_000)).await;
    let run = run_id_of(&take(&mut stream, 1).await);
    drop(stream);
    let stored = tokio::time::timeout(Duration::from_secs(5), ended(&db.open().await, &run))
        .await
        .expect("the run stopped within seconds of its only client leaving");
    assert_eq!(stored.status, RunStatus::Interrupted);
    assert!(stored.error.unwrap().contains("nobody followed"));
}

async fn a_run_re_attached_within_the_grace_completes(db: TestDb) {
    let server = Agentd::spawn_on(db.url(), &[("DETACH_GRACE", "5")]).await;
    let chat = new_chat();
    let mut stream = server.stream(&chat, paced(30, 30)).await;
    let mut seen = take(&mut stream, 3).await;
    drop(stream);
    let run = run_id_of(&seen);
    let last = seen.last().unwrap().0.clone();
    seen.extend(server.follow(&chat, &run, Some(&last)).await.rest().await);
    assert_whole(&run, &seen);
    assert_eq!(types(&seen)[seen.len() - 2], "run_completed");
    assert_eq!(
        ended(&db.open().await, &run).await.status,
        RunStatus::Completed
    );
}

async fn cancel_busy_chats_and_bad_resume_inputs_get_their_statuses(db: TestDb) {
    let server = Agentd::spawn_on(db.url(), &[]).await;
    let chat = new_chat();
    let mut stream = server.stream(&chat, paced(1000, 20)).await;
    let run = run_id_of(&take(&mut stream, 2).await);

    // One run at a time per chat: the client is told which one to attach to.
    let busy = server.ask(&chat, paced(1, 0)).await;
    assert_eq!(busy.status(), 409);
    let body: Value = busy.json().await.unwrap();
    assert_eq!(body["code"], "chat_busy");
    assert_eq!(body["run_id"], run.as_str());
    assert!(body["detail"].as_str().unwrap().contains("run going"));

    // Where to resume, when it makes no sense, is a 422 naming it.
    let other = Uuid::new_v4();
    let cases: [(Option<String>, Option<&str>, &str); 5] = [
        (Some("garbage".to_owned()), None, "last-event-id"),
        (Some(format!("{other}:3")), None, "last-event-id"),
        (Some(format!("{run}:x")), None, "last-event-id"),
        (None, Some("abc"), "after"),
        (None, Some("999999"), "after"),
    ];
    for (header, after, field) in cases {
        let refused = server.attach(&chat, &run, header.as_deref(), after).await;
        assert_eq!(refused.status(), 422, "{header:?} {after:?}");
        let body: Value = refused.json().await.unwrap();
        assert_eq!(body["detail"][0]["loc"][1], field, "{body}");
    }

    // Not found, the same bytes whether missing or someone else's.
    let store = db.open().await;
    let theirs = store
        .create_chat(&ChatOwner {
            org_id: "other-org".into(),
            user_id: "other-user".into(),
            canvas_id: "other-canvas".into(),
        })
        .await
        .unwrap();
    let body = |response: reqwest::Response| async move {
        assert_eq!(response.status(), 404);
        response.bytes().await.unwrap()
    };
    let missing_chat = body(server.attach(&new_chat(), &run, None, None).await).await;
    let foreign_chat = body(
        server
            .attach(&theirs.id.to_string(), &run, None, None)
            .await,
    )
    .await;
    assert_eq!(missing_chat, foreign_chat);
    let missing_run = body(
        server
            .attach(&chat, &Uuid::new_v4().to_string(), None, None)
            .await,
    )
    .await;
    let own_chat = new_chat();
    server.stream(&own_chat, paced(1, 0)).await.rest().await;
    let run_of_another_chat = body(server.attach(&own_chat, &run, None, None).await).await;
    assert_eq!(missing_run, run_of_another_chat);
    let missing_run: Value = serde_json::from_slice(&missing_run).unwrap();
    assert_eq!(missing_run["code"], "run_not_found");
    assert_eq!(
        body(server.cancel(&theirs.id.to_string(), &run).await).await,
        missing_chat
    );

    // Stop on purpose: every follower sees the run end, and it is stored interrupted.
    let mut second = server.follow(&chat, &run, None).await;
    let cancelled = server.cancel(&chat, &run).await;
    assert_eq!(cancelled.status(), 202);
    for events in [stream.rest().await, second.rest().await] {
        let kinds = types(&events);
        assert_eq!(kinds[kinds.len() - 2..], ["run_interrupted", "done"]);
        assert_eq!(events[events.len() - 2].1["reason"], "cancelled");
    }
    assert_eq!(
        ended(&db.open().await, &run).await.status,
        RunStatus::Interrupted
    );
    let again = server.cancel(&chat, &run).await;
    assert_eq!(again.status(), 409);
    let body: Value = again.json().await.unwrap();
    assert_eq!(body["code"], "run_ended");
    assert_eq!(body["status"], "interrupted");
    // The chat is free again.
    assert_eq!(server.ask(&chat, paced(1, 0)).await.status(), 200);
}

async fn history_of(server: &Agentd, chat: &str) -> Value {
    let response = server.get(&format!("/agents/chats/{chat}/messages")).await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

async fn the_history_names_the_run_going_so_a_page_can_re_attach(db: TestDb) {
    let server = Agentd::spawn_on(db.url(), &[]).await;
    let chat = new_chat();
    let first = server
        .stream(
            &chat,
            json!({"question": "first?", "model": "test:deltas=2"}),
        )
        .await
        .rest()
        .await;
    let mut going = server
        .stream(
            &chat,
            json!({"question": "second?", "model": "test:deltas=1000,delay_ms=20"}),
        )
        .await;
    let seen = take(&mut going, 4).await;
    let run = run_id_of(&seen);

    let history = history_of(&server, &chat).await;
    let roles: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user", "assistant", "user"]);
    assert_eq!(history["messages"][1]["content"], final_output(&first));
    assert_eq!(history["run"]["id"], run.as_str());
    let last_seq = history["run"]["last_seq"].as_u64().unwrap();
    assert!(last_seq >= 4, "{history}");
    // What the history names is where a page picks the run up.
    let stream_path = history["run"]["stream"].as_str().unwrap();
    assert_eq!(
        stream_path,
        format!("/agents/chats/{chat}/runs/{run}/stream")
    );
    let mut picked_up = Events::new(
        server
            .attach(&chat, &run, Some(&format!("{run}:{last_seq}")), None)
            .await,
    );
    let next = picked_up.next().await.unwrap();
    assert_eq!(next.0, format!("{run}:{}", last_seq + 1));

    assert_eq!(server.cancel(&chat, &run).await.status(), 202);
    picked_up.rest().await;
    let history = history_of(&server, &chat).await;
    assert_eq!(history["run"], Value::Null);
    let missing = server
        .get(&format!("/agents/chats/{}/messages", new_chat()))
        .await;
    assert_eq!(missing.status(), 404);
}

/// PostgreSQL, two replicas: a run produced on one is followed on the other from the start and from the middle,
/// event for event, and cancelled from it.
#[tokio::test]
async fn a_run_produced_on_one_replica_is_followed_and_cancelled_on_another() {
    let db = TestDb::postgres().await;
    let a = Agentd::spawn_on(db.url(), &[]).await;
    let b = Agentd::spawn_on(db.url(), &[]).await;
    let chat = new_chat();
    let mut on_a = a.stream(&chat, paced(30, 40)).await;
    let head = take(&mut on_a, 6).await;
    let run = run_id_of(&head);
    let from_start = tokio::spawn({
        let events = b.follow(&chat, &run, None).await;
        async move {
            let mut events = events;
            events.rest().await
        }
    });
    let from_middle = tokio::spawn({
        let events = b.follow(&chat, &run, Some(&head[4].0)).await;
        async move {
            let mut events = events;
            events.rest().await
        }
    });
    let mut all = head;
    all.extend(on_a.rest().await);
    assert_whole(&run, &all);
    assert_eq!(from_start.await.unwrap(), all);
    assert_eq!(from_middle.await.unwrap(), all[5..]);
    // Once caught up, the followers on B read what the notifications carried, not the store at each commit: each
    // reads it once at most, when it attaches (the second may find all it needs in what the first was notified).
    let reads = || async {
        metric(
            &b.get("/metrics").await.text().await.unwrap(),
            "agentd_run_log_reads_total",
        )
    };
    let before = reads().await;
    assert!(
        (1..=2).contains(&before),
        "{before} reads of the store for two followers of a run of about 30 commits"
    );

    let other = new_chat();
    let mut long = a.stream(&other, paced(1000, 20)).await;
    let run = run_id_of(&take(&mut long, 2).await);
    let mut follower = b.follow(&other, &run, None).await;
    let head = take(&mut follower, 3).await;
    assert_eq!(b.cancel(&other, &run).await.status(), 202);
    let rest = long.rest().await;
    assert_eq!(rest[rest.len() - 2].1["reason"], "cancelled");
    let mut followed = head;
    followed.extend(follower.rest().await);
    assert_eq!(followed.last().unwrap().1["type"], "done");
    assert_eq!(
        reads().await - before,
        1,
        "one read of the store for a follower that attached on B, then only notifications"
    );
    assert_eq!(
        ended(&db.open().await, &run).await.status,
        RunStatus::Interrupted
    );
}

/// The events of a run that ended longer than `RUN_LOG_RETENTION` ago are swept; attaching says so, and the answer
/// is still in the history.
#[tokio::test]
async fn attaching_to_a_swept_run_is_410_and_its_answer_stays_in_the_history() {
    let db = TestDb::sqlite();
    let retention = [("RUN_LOG_RETENTION", "0")];
    let chat = new_chat();
    let run = {
        let mut first = Agentd::spawn_on(db.url(), &retention).await;
        let events = first.stream(&chat, paced(3, 0)).await.rest().await;
        first.signal("TERM");
        first.exit_status().await;
        run_id_of(&events)
    };
    // The next start sweeps at once.
    let mut second = Agentd::spawn_on(db.url(), &retention).await;
    second
        .wait_for_log("swept the events of finished runs")
        .await;
    let swept = second.attach(&chat, &run, None, None).await;
    assert_eq!(swept.status(), 410);
    let body: Value = swept.json().await.unwrap();
    assert_eq!(body["code"], "log_swept");
    assert!(body["detail"].as_str().unwrap().contains("chat's messages"));
    let history = history_of(&second, &chat).await;
    assert_eq!(history["messages"][1]["role"], "assistant");
}

#[tokio::test]
async fn the_sqlite_wal_stays_bounded_while_readers_never_stop() {
    // Paced runs keep the one writer committing every few milliseconds, never idle as long as the checkpointer's
    // period: the WAL is never all copied back when a write begins, so SQLite alone never starts it over, and it
    // would grow by every page written (14 GB in a 10-minute soak).
    let db = TestDb::sqlite();
    let wal = std::path::PathBuf::from(format!("{}-wal", db.url().trim_start_matches("sqlite://")));
    let server = std::sync::Arc::new(Agentd::spawn_on(db.url(), &[]).await);
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    let chats: Vec<String> = (0..40).map(|_| new_chat()).collect();
    let mut load = tokio::task::JoinSet::new();
    for chat in chats.clone() {
        let server = std::sync::Arc::clone(&server);
        load.spawn(async move {
            while tokio::time::Instant::now() < until {
                let events = server
                    .stream(
                        &chat,
                        json!({"question": "q", "model": "test:deltas=300,delay_ms=10"}),
                    )
                    .await
                    .rest()
                    .await;
                assert_eq!(types(&events).last().unwrap(), "done");
            }
        });
    }
    for chat in chats.iter().take(4) {
        let (server, chat) = (std::sync::Arc::clone(&server), chat.clone());
        load.spawn(async move {
            while tokio::time::Instant::now() < until {
                let history = server.get(&format!("/agents/chats/{chat}/messages")).await;
                // 404 until the chat's first run made it.
                assert!(matches!(history.status().as_u16(), 200 | 404));
            }
        });
    }
    let mut largest = 0;
    while tokio::time::Instant::now() < until {
        largest = largest.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    while let Some(done) = load.join_next().await {
        done.unwrap();
    }
    println!("largest WAL: {} MiB", largest >> 20);
    assert!(largest < 96 << 20, "the WAL reached {} MiB", largest >> 20);
}

#[tokio::test]
async fn a_run_goes_on_when_the_store_is_busy_longer_than_a_pool_wait() {
    let db = TestDb::sqlite();
    let server = std::sync::Arc::new(Agentd::spawn_on(db.url(), &[]).await);
    let mut slow = server
        .stream(
            &new_chat(),
            json!({"question": "q", "model": "test:deltas=8,delay_ms=1000"}),
        )
        .await;
    assert_eq!(slow.next_data().await["type"], "run_started");
    assert_eq!(slow.next_data().await["type"], "model_delta");

    // Another process takes SQLite's write lock for 4.5 s. A run start (or a lease refresh) then waits for it holding
    // agentd's one writer connection, and the slow run's next group commits wait for that connection longer than
    // the pool's 3 s.
    let mut other = db.hold_write_lock().await;
    let starting = tokio::spawn({
        let server = std::sync::Arc::clone(&server);
        async move {
            server
                .ask(
                    &new_chat(),
                    json!({"question": "q", "model": "test:deltas=1"}),
                )
                .await
                .status()
        }
    });
    tokio::time::sleep(Duration::from_millis(4_500)).await;
    sqlx::query("COMMIT").execute(&mut other).await.unwrap();

    let rest = slow.rest().await;
    assert_eq!(
        types(&rest)[types(&rest).len() - 3..],
        ["final_answer", "run_completed", "done"],
        "{rest:?}"
    );
    // The start that waited behind the lock either got through or was refused cleanly.
    let started = starting.await.unwrap();
    assert!(matches!(started.as_u16(), 200 | 503), "{started}");
    assert!(
        server
            .log_text()
            .contains("the store was busy for a group commit"),
        "the commit did wait past the pool's timeout"
    );
}

#[tokio::test]
async fn group_commits_go_on_while_run_starts_hold_every_pooled_connection_postgres() {
    use sqlx::Connection;
    let db = TestDb::postgres().await;
    let server = std::sync::Arc::new(Agentd::spawn_on(db.url(), &[]).await);
    let busy_chat = new_chat();
    server.stream(&busy_chat, paced(1, 0)).await.rest().await;
    let mut slow = server.stream(&new_chat(), paced(8, 300)).await;
    let mut seen = take(&mut slow, 2).await;
    assert_eq!(types(&seen), ["run_started", "model_delta"]);

    // Another session locks a chat; more starts on it than the pool has connections each wait for the lock holding
    // one, so every pooled connection is taken and more requests queue for one.
    let mut other = sqlx::PgConnection::connect(db.url()).await.unwrap();
    sqlx::query("BEGIN").execute(&mut other).await.unwrap();
    sqlx::query("SELECT 1 FROM agent_chats WHERE id = $1::uuid FOR UPDATE")
        .bind(&busy_chat)
        .execute(&mut other)
        .await
        .unwrap();
    let mut starting = tokio::task::JoinSet::new();
    for _ in 0..24 {
        let server = std::sync::Arc::clone(&server);
        let chat = busy_chat.clone();
        starting.spawn(async move { server.ask(&chat, paced(1, 0)).await.status() });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The slow run's deltas are committed to the log and delivered all the same, while the lock is held.
    let deltas_left = tokio::time::timeout(Duration::from_secs(4), take(&mut slow, 7))
        .await
        .expect("the run's events arrive while run starts hold every pooled connection");
    assert!(
        types(&deltas_left).iter().all(|kind| kind == "model_delta"),
        "{deltas_left:?}"
    );
    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();

    // Then the run ends as any other (its end is stored through the pool), and the starts are answered.
    seen.extend(deltas_left);
    seen.extend(slow.rest().await);
    assert_eq!(
        types(&seen)[types(&seen).len() - 3..],
        ["final_answer", "run_completed", "done"],
        "{seen:?}"
    );
    while let Some(status) = starting.join_next().await {
        let status = status.unwrap();
        assert!(matches!(status.as_u16(), 200 | 409 | 503), "{status}");
    }
}
