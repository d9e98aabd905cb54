//! The shutdown sequence, through the real binary and real signals.

use std::io::Write;
use std::time::Duration;

use crate::common::{Agentd, new_chat, types};
use serde_json::{Value, json};
use sqlx::Connection;

/// A run that takes about `seconds` to finish.
fn slow(seconds: u32) -> Value {
    json!({"question": "q", "model": format!("test:deltas={},delay_ms=100", seconds * 10)})
}

#[tokio::test]
async fn sigterm_lets_open_streams_finish_and_refuses_new_ones() {
    let mut server = Agentd::spawn(&[("DRAIN_TIMEOUT", "60"), ("SHUTDOWN_TIMEOUT", "90")]).await;
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut stream = server.stream(&new_chat(), slow(4)).await;
        assert_eq!(stream.next_data().await["type"], "run_started");
        streams.push(stream);
    }

    server.signal("TERM");
    server.wait_for_log("draining").await;

    let refused = server.ask(&new_chat(), json!({"question": "q"})).await;
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    assert_eq!(refused.headers()["connection"], "close");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["detail"], "Service is shutting down");
    // The page tells a deploy from a full replica by it.
    assert_eq!(body["code"], "shutting_down");
    assert_eq!(server.get("/readyz").await.status(), 503);
    assert_eq!(server.get("/healthz").await.status(), 200);

    for mut stream in streams {
        let events = stream.rest().await;
        let kinds = types(&events);
        assert_eq!(kinds.iter().filter(|t| *t == "model_delta").count(), 40);
        assert_eq!(
            kinds[kinds.len() - 3..],
            ["final_answer", "run_completed", "done"]
        );
    }
    assert!(server.exit_status().await.success());
    let logs = server.log_text();
    assert!(logs.contains("drained: no stream is open"), "{logs}");
    assert!(logs.contains("shutdown complete"), "{logs}");
}

#[tokio::test]
async fn a_stream_longer_than_the_drain_is_interrupted_visibly() {
    let mut server = Agentd::spawn(&[("DRAIN_TIMEOUT", "1"), ("SHUTDOWN_TIMEOUT", "20")]).await;
    let chat = new_chat();
    let mut stream = server.stream(&chat, slow(100)).await;
    let started = stream.next_data().await;
    server.signal("TERM");

    let events = stream.rest().await;
    let kinds = types(&events);
    assert_eq!(kinds[kinds.len() - 2..], ["run_interrupted", "done"]);
    assert!(kinds[..kinds.len() - 2].iter().all(|t| t == "model_delta"));
    let interrupted = &events[events.len() - 2].1;
    assert_eq!(interrupted["reason"], "shutdown");
    let run_id = started["run_id"].as_str().unwrap();
    assert_eq!(
        interrupted["resume"],
        format!("/agents/chats/{chat}/runs/{run_id}/stream")
    );
    assert!(server.exit_status().await.success());
    assert!(server.log_text().contains("drain timeout reached"));
}

#[tokio::test]
async fn the_drain_progress_line_names_the_oldest_runs() {
    let mut server = Agentd::spawn(&[("DRAIN_TIMEOUT", "6"), ("SHUTDOWN_TIMEOUT", "20")]).await;
    let mut old = server.stream(&new_chat(), slow(100)).await;
    let old_run = old.next_data().await["run_id"].as_str().unwrap().to_owned();
    let mut young = server.stream(&new_chat(), slow(100)).await;
    let young_run = young.next_data().await["run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    server.signal("TERM");

    let progress = server.wait_for_log("draining: streams still open").await;
    assert_eq!(progress["open_streams"], 2);
    assert_eq!(progress["runs"], 2);
    let named = progress["oldest_runs"].as_str().unwrap();
    let (at_old, at_young) = (named.find(&old_run), named.find(&young_run));
    assert!(at_old.is_some() && at_young.is_some(), "{named}");
    assert!(at_old < at_young, "oldest first: {named}");
    drop((old, young));
    assert!(server.exit_status().await.success());
}

#[tokio::test]
async fn a_second_signal_during_the_drain_closes_at_once() {
    let mut server = Agentd::spawn(&[("DRAIN_TIMEOUT", "120"), ("SHUTDOWN_TIMEOUT", "150")]).await;
    let mut stream = server.stream(&new_chat(), slow(100)).await;
    stream.next_data().await;
    server.signal("TERM");
    server.wait_for_log("draining").await;
    server.signal("INT");

    let kinds = types(&stream.rest().await);
    assert_eq!(kinds[kinds.len() - 2..], ["run_interrupted", "done"]);
    // The harness gives up long before the 120 s drain would end.
    assert!(server.exit_status().await.success());
    assert!(server.log_text().contains("second signal during the drain"));
}

#[tokio::test]
async fn during_the_shutdown_delay_streams_are_still_admitted_while_readiness_fails() {
    let mut server = Agentd::spawn(&[
        ("SHUTDOWN_DELAY", "120"),
        ("DRAIN_TIMEOUT", "5"),
        ("SHUTDOWN_TIMEOUT", "150"),
    ])
    .await;
    server.signal("TERM");
    server.wait_for_log("shutdown signal received").await;

    assert_eq!(server.get("/readyz").await.status(), 503);
    let events = server
        .stream(&new_chat(), json!({"question": "q"}))
        .await
        .rest()
        .await;
    assert_eq!(types(&events).last().unwrap(), "done");

    // A second signal skips the rest of the delay.
    server.signal("TERM");
    assert!(server.exit_status().await.success());
    assert!(
        server
            .log_text()
            .contains("second signal during the shutdown delay")
    );
}

#[tokio::test]
async fn a_client_that_disconnected_does_not_hold_the_drain() {
    let mut server = Agentd::spawn(&[
        ("DRAIN_TIMEOUT", "120"),
        ("SHUTDOWN_TIMEOUT", "150"),
        ("DETACH_GRACE", "0"),
    ])
    .await;
    let mut stream = server.stream(&new_chat(), slow(100)).await;
    stream.next_data().await;
    drop(stream);
    let ended = server
        .wait_for_log_where(|l| l["message"] == "run ended")
        .await
        .expect("the run ends when its client leaves (no detach grace)");
    assert_eq!(ended["outcome"], "detached");

    server.signal("TERM");
    assert!(server.exit_status().await.success());
    assert!(server.log_text().contains("drained: no stream is open"));
}

/// A run whose client left waits for one to attach; the drain waits for streams, not for it, and the run is
/// interrupted at the drain's end.
#[tokio::test]
async fn a_detached_run_does_not_hold_the_drain_either() {
    let mut server = Agentd::spawn(&[("DRAIN_TIMEOUT", "120"), ("SHUTDOWN_TIMEOUT", "150")]).await;
    let mut stream = server.stream(&new_chat(), slow(100)).await;
    stream.next_data().await;
    drop(stream);
    server.wait_for_log("run admitted").await;
    server.signal("TERM");
    assert!(server.exit_status().await.success());
    let logs = server.log_text();
    assert!(logs.contains("drained: no stream is open"), "{logs}");
    assert!(logs.contains("\"outcome\":\"interrupted\""), "{logs}");
}

#[tokio::test]
async fn nothing_open_means_sigterm_exits_zero() {
    let mut server = Agentd::spawn(&[]).await;
    server.signal("TERM");
    assert!(server.exit_status().await.success());
}

/// A client that stops reading keeps its response from ever finishing; the hard deadline still ends the process.
#[tokio::test]
async fn the_shutdown_timeout_ends_the_process_whatever_is_stuck() {
    let mut server = Agentd::spawn(&[
        ("DRAIN_TIMEOUT", "1"),
        ("SHUTDOWN_TIMEOUT", "3"),
        ("TEST_MODEL_MAX_DELTAS", "10000000"),
    ])
    .await;
    let addr = server.base.trim_start_matches("http://").to_owned();
    let body = json!({"question": "q", "model": "test:deltas=10000000"}).to_string();
    let mut socket = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        socket,
        "POST /agents/chats/{}/stream HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        new_chat(),
        body.len()
    )
    .unwrap();
    server.wait_for_log("run admitted").await;
    // More than the socket buffers can hold, so the response cannot finish while the client does not read.
    let deadline = tokio::time::Instant::now() + crate::common::PATIENCE;
    loop {
        let metrics = server.get("/metrics").await.text().await.unwrap();
        let events: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("agentd_run_log_events_total "))
            .map_or(0.0, |n| n.parse().unwrap());
        if events >= 500_000.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the run stalled at {events} events"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    server.signal("TERM");
    let status = server.exit_status().await;
    assert_eq!(status.code(), Some(1), "{}", server.log_text());
    let stuck = server.wait_for_log("shutdown timeout reached").await;
    assert_eq!(stuck["open_streams"], 1);
    // The run itself ended (it writes to the log, not to the client); the connection to a client that does not read
    // is what is stuck, and the watchdog names its stage.
    let pending = stuck["pending"].as_str().unwrap();
    assert!(pending.contains("(\"http\", "), "{pending}");
    drop(socket);
}

#[tokio::test]
async fn an_impossible_budget_exits_64_naming_the_values() {
    let (status, stderr) =
        Agentd::run_to_exit(&[("SHUTDOWN_DELAY", "10"), ("DRAIN_TIMEOUT", "300")]).await;
    assert_eq!(status.code(), Some(64));
    for value in [
        "SHUTDOWN_DELAY (10s)",
        "DRAIN_TIMEOUT (300s)",
        "SHUTDOWN_TIMEOUT (310s)",
    ] {
        assert!(stderr.contains(value), "{value} missing from {stderr}");
    }

    let (status, stderr) = Agentd::run_to_exit(&[("TERMINATION_GRACE_PERIOD", "300")]).await;
    assert_eq!(status.code(), Some(64));
    assert!(
        stderr.contains("SHUTDOWN_TIMEOUT (310s)")
            && stderr.contains("TERMINATION_GRACE_PERIOD (300s)")
    );
}

/// From the start of the drain a SQLite store keeps its WAL small, so that emptying it at exit is short: a WAL grown
/// to several MiB while serving is trimmed while a stream still writes through the drain.
#[tokio::test]
async fn the_drain_keeps_a_sqlite_wal_small() {
    let db = crate::common::db::TestDb::sqlite();
    let mut server = Agentd::spawn_on(db.url(), &[("DRAIN_TIMEOUT", "60")]).await;
    // Another connection grows the WAL by about 6 MiB, which is started over only past 32 MiB while serving. (The
    // service's own writes grow it by an amount that depends on how many events each commit takes, which a busy
    // machine changes.)
    let mut other = sqlx::SqliteConnection::connect(db.url()).await.unwrap();
    let grow = "CREATE TABLE ballast (b BLOB); \
                WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100) \
                INSERT INTO ballast SELECT randomblob(60000) FROM n";
    sqlx::raw_sql(grow).execute(&mut other).await.unwrap();
    other.close().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grown = db.wal_bytes();
    assert!(grown > 4 << 20, "{grown} bytes");
    let mut writing = server.stream(&new_chat(), slow(6)).await;
    assert_eq!(writing.next_data().await["type"], "run_started");

    server.signal("TERM");
    server.wait_for_log("draining").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
    while db.wal_bytes() > 2 << 20 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the WAL is still {} bytes ({grown} before the drain)",
            db.wal_bytes()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let events = writing.rest().await;
    assert_eq!(types(&events).last().map(String::as_str), Some("done"));
    assert!(server.exit_status().await.success());
    assert_eq!(db.wal_bytes(), 0, "emptied at exit");
}
