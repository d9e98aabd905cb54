//! Clients over HTTP/2 without TLS ("prior knowledge"), as a load balancer that speaks HTTP/2 to agentd sends them:
//! many streams on one connection. Through the real binary and real signals.

use std::time::Duration;

use agentd::store::RunStatus;
use serde_json::{Value, json};

use crate::common::db::TestDb;
use crate::common::h2::{H2Connection, json as body_of};
use crate::common::haproxy::{Haproxy, handoff_replicas};
use crate::common::runs::{assert_whole, ended, paced, run_id_of, take};
use crate::common::{Agentd, Events, established_to, metric, new_chat, types};

/// Checks a whole run: ids in order, `deltas` deltas, and the answer, its completion and `done` at the end.
fn assert_completed(events: &[(String, Value)], deltas: usize) {
    assert_whole(&run_id_of(events), events);
    let kinds = types(events);
    assert_eq!(
        kinds[kinds.len() - 3..],
        ["final_answer", "run_completed", "done"],
        "{:?}",
        &events[events.len().saturating_sub(3)..]
    );
    assert_eq!(kinds.iter().filter(|t| *t == "model_delta").count(), deltas);
}

#[tokio::test]
async fn streams_of_one_http2_connection_each_carry_the_whole_protocol() {
    let server = Agentd::spawn(&[]).await;
    let connection = H2Connection::open(&server).await;
    // The second stream opens while the first is still going: both on the one connection at once.
    let mut first = connection.stream(&new_chat(), paced(20, 20)).await;
    let mut second = connection.stream(&new_chat(), paced(20, 20)).await;
    assert_eq!(first.headers["content-type"], "text/event-stream");
    assert_eq!(first.headers["cache-control"], "no-cache");
    let mut a = take(&mut first, 2).await;
    let mut b = take(&mut second, 2).await;
    a.extend(first.rest().await);
    b.extend(second.rest().await);
    assert_completed(&a, 20);
    assert_completed(&b, 20);
    assert_ne!(run_id_of(&a), run_id_of(&b));
    assert!(
        !connection.is_closed(),
        "the connection outlives its streams"
    );
}

#[tokio::test]
async fn errors_over_http2_are_json_with_a_detail_and_end_only_their_stream() {
    let server = Agentd::spawn(&[("MAX_STREAMS", "1")]).await;
    let connection = H2Connection::open(&server).await;
    let missing = connection.send("GET", "/nope", &Value::Null).await.unwrap();
    assert_eq!(missing.status(), 404);
    assert!(body_of(missing).await["detail"].is_string());
    let path = format!("/agents/chats/{}/stream", new_chat());
    let invalid = connection
        .send("POST", &path, &json!({"question": 3}))
        .await
        .unwrap();
    assert_eq!(invalid.status(), 422);
    assert_eq!(body_of(invalid).await["detail"][0]["loc"][1], "question");

    let mut open = connection.stream(&new_chat(), paced(100, 50)).await;
    assert_eq!(open.next_data().await["type"], "run_started");
    let refused = connection
        .send("POST", &path, &json!({"question": "q"}))
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    // HTTP/2 has no `connection` header: the refusal ends its stream, not the connection the others share.
    assert!(refused.headers().get("connection").is_none());
    let detail = body_of(refused).await["detail"].to_string();
    assert!(detail.contains("limit reached"), "{detail}");
    assert_eq!(open.next_data().await["type"], "model_delta");
}

#[tokio::test]
async fn a_stream_reset_by_its_client_ends_its_run_and_not_the_others() {
    let db = TestDb::sqlite();
    let server = Agentd::spawn_on(db.url(), &[("DETACH_GRACE", "0")]).await;
    let connection = H2Connection::open(&server).await;
    // Nothing to write for a minute: the server learns the client left from the reset alone.
    let mut leaving = connection.stream(&new_chat(), paced(2, 60_000)).await;
    let mut staying = connection.stream(&new_chat(), paced(30, 30)).await;
    let left = run_id_of(&take(&mut leaving, 1).await);
    let mut seen = take(&mut staying, 1).await;
    drop(leaving);
    let stored = tokio::time::timeout(Duration::from_secs(5), ended(&db.open().await, &left))
        .await
        .expect("the run stopped within seconds of its only client resetting its stream");
    assert_eq!(stored.status, RunStatus::Interrupted);
    seen.extend(staying.rest().await);
    assert_completed(&seen, 30);
    assert!(!connection.is_closed());
}

#[tokio::test]
async fn sigterm_lets_http2_streams_finish_refuses_new_ones_and_closes_the_connection() {
    let mut server = Agentd::spawn(&[("DRAIN_TIMEOUT", "60"), ("SHUTDOWN_TIMEOUT", "90")]).await;
    let connection = H2Connection::open(&server).await;
    let mut stream = connection.stream(&new_chat(), paced(40, 50)).await;
    let mut seen = take(&mut stream, 1).await;

    server.signal("TERM");
    server.wait_for_log("draining").await;
    let path = format!("/agents/chats/{}/stream", new_chat());
    let refused = connection
        .send("POST", &path, &json!({"question": "q"}))
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(body_of(refused).await["detail"], "Service is shutting down");

    seen.extend(stream.rest().await);
    assert_completed(&seen, 40);
    assert!(server.exit_status().await.success());
    connection.closed().await;
}

#[tokio::test]
async fn a_handoff_ends_http2_streams_with_reconnect_and_closes_the_connection() {
    let mut server = Agentd::spawn(&[
        ("SHUTDOWN_MODE", "handoff"),
        ("DRAIN_TIMEOUT", "1"),
        ("SHUTDOWN_TIMEOUT", "10"),
    ])
    .await;
    let connection = H2Connection::open(&server).await;
    let chat = new_chat();
    let mut stream = connection.stream(&chat, paced(150, 20)).await;
    let mut seen = take(&mut stream, 5).await;

    server.signal("TERM");
    let reconnect = until_reconnect(&mut stream, &mut seen).await;
    let run = run_id_of(&seen);
    assert_eq!(reconnect["last_event_id"], seen.last().unwrap().0.as_str());
    assert_eq!(
        reconnect["resume"],
        format!("/agents/chats/{chat}/runs/{run}/stream")
    );
    connection.closed().await;
    assert!(server.exit_status().await.success());
}

/// Reads on until `reconnect`, adding the events before it to `seen`; the stream must end right after it.
async fn until_reconnect(stream: &mut Events, seen: &mut Vec<(String, Value)>) -> Value {
    loop {
        let (id, event) = stream.next().await.expect("a reconnect before the end");
        if event["type"] == "reconnect" {
            assert!(stream.next().await.is_none(), "the stream ends after it");
            return event;
        }
        seen.push((id, event));
    }
}

/// haproxy in front of two replicas, speaking HTTP/2 to them: the streams of many clients (HTTP/1.1 to haproxy) reach
/// a replica on a few connections, and a handoff moves them to the other replica with nothing lost or repeated.
#[tokio::test]
async fn behind_haproxy_speaking_http2_clients_share_connections_and_a_handoff_loses_nothing() {
    const CLIENTS: usize = 20;
    // Long enough that streams are still going when the replica stops, however long the clients took to start.
    const DELTAS: u32 = 160;
    let db = TestDb::postgres().await;
    let (addrs, mut replicas) = handoff_replicas(db.url(), &[]).await;
    let lb = Haproxy::start_http2(&addrs).await;
    let http = reqwest::Client::new();
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let chat = new_chat();
        let response = http
            .post(format!("{}/agents/chats/{chat}/stream", lb.base))
            .json(&paced(DELTAS, 50))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let mut stream = Events::new(response);
        let seen = take(&mut stream, 2).await;
        clients.push((stream, seen));
    }
    let connections: usize = addrs.iter().map(|addr| established_to(addr.port())).sum();
    assert!(
        connections < CLIENTS / 2,
        "{connections} connections to the replicas for {CLIENTS} streams"
    );

    // Stop a replica that streams; its clients get `reconnect` and attach again through haproxy.
    let mut producer = None;
    for (i, replica) in replicas.iter().enumerate() {
        let metrics = replica.get("/metrics").await.text().await.unwrap();
        if metric(&metrics, "agentd_open_streams") > 0 {
            producer = Some(i);
        }
    }
    let mut stopping = replicas.remove(producer.expect("a replica streams"));
    stopping.signal("TERM");
    // Every client reads on at once, as real ones do: a client that re-attaches only once another's stream has ended
    // comes after its run was released and, nobody following it, interrupted.
    let followed = clients.into_iter().map(|(mut stream, mut seen)| {
        let (http, base) = (&http, &lb.base);
        async move {
            let mut moved = 0;
            loop {
                let (id, event) = stream
                    .next()
                    .await
                    .expect("the stream goes on to done or reconnect");
                if event["type"] == "reconnect" {
                    moved += 1;
                    let response = http
                        .get(format!("{base}{}", event["resume"].as_str().unwrap()))
                        .header("last-event-id", event["last_event_id"].as_str().unwrap())
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), 200);
                    stream = Events::new(response);
                    continue;
                }
                let done = event["type"] == "done";
                seen.push((id, event));
                if done {
                    break;
                }
            }
            assert_completed(&seen, DELTAS as usize);
            moved
        }
    });
    let moved: usize = futures_util::future::join_all(followed)
        .await
        .into_iter()
        .sum();
    assert!(moved > 0, "the stopped replica's clients were handed over");
    assert!(stopping.exit_status().await.success());
}
