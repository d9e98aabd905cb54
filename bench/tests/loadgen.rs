//! The load generator counts events and errors exactly, against a tiny local SSE server whose answers are known.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Json, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bench::{H2Connections, Plan, Report, loopback_sources, run};
use serde_json::Value;

const DELTAS: usize = 7;

/// Answers by the requested model: `ok` streams a whole run, `busy` is a 503, `cut` ends before `done`, `fail` ends
/// with `run_failed`.
async fn stream(Json(body): Json<Value>) -> Response {
    let event =
        |kind: &str| format!("id: r:1\ndata: {{\"type\":\"{kind}\",\"content\":\"x\"}}\n\n");
    let mut frames = vec![event("run_started"), ": keep-alive\n\n".to_owned()];
    frames.extend((0..DELTAS).map(|_| event("model_delta")));
    match body["model"].as_str().unwrap() {
        "busy" => return (StatusCode::SERVICE_UNAVAILABLE, "busy").into_response(),
        "cut" => {}
        "fail" => frames.extend([event("run_failed"), event("done")]),
        _ => frames.extend([event("final_answer"), event("run_completed"), event("done")]),
    }
    // One byte at a time for the first frames: events split across reads must still count once.
    let mut chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        frames[0].bytes().map(|b| Ok(vec![b])).collect();
    chunks.extend(frames[1..].iter().map(|f| Ok(f.clone().into_bytes())));
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
        .unwrap()
}

async fn server() -> std::net::SocketAddr {
    serve(Router::new().route("/agents/chats/{chat}/stream", post(stream))).await
}

/// Serves `router` on a loopback port of its own; its address.
async fn serve(router: Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}

async fn go(target: std::net::SocketAddr, streams: usize, model: &str) -> Report {
    run(plan(target, streams, model)).await
}

fn plan(target: std::net::SocketAddr, streams: usize, model: &str) -> Plan {
    Plan {
        target,
        streams,
        ramp_per_sec: 0.0,
        concurrency: streams,
        model: model.to_owned(),
        question: "q".to_owned(),
        sources: loopback_sources(3),
        bearer: None,
        hold: None,
        stop_after_errors: usize::MAX,
        server_pid: Some(std::process::id()),
        rss_checkpoints: vec![streams],
        response_timeout: Duration::from_secs(10),
        settled: None,
        path: None,
        follow_at: None,
        leave_producer: false,
        follow_reconnect: false,
        chats: None,
        h2: None,
    }
}

#[tokio::test]
async fn whole_runs_are_counted_event_by_event() {
    let target = server().await;
    let report = go(target, 25, "ok").await;
    assert_eq!(report.requested, 25);
    assert_eq!(report.started, 25);
    assert_eq!(report.done, 25);
    assert_eq!(report.completed, 25);
    assert_eq!(report.deltas, 25 * DELTAS as u64);
    assert_eq!(
        report.events,
        25 * (DELTAS as u64 + 4),
        "the keep-alive comment is not an event"
    );
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.to_run_started_ms.count, 25);
    assert_eq!(report.to_first_delta_ms.count, 25);
    assert!(report.last_done_unix_ns > 0);
    assert!(report.rss_idle_kib.is_some() && report.rss_kib.values().all(|kib| *kib > 0));
    assert_eq!(report.stopped_by, "target reached");
}

#[tokio::test]
async fn every_kind_of_error_is_counted_exactly() {
    let target = server().await;
    let busy = go(target, 10, "busy").await;
    assert_eq!(busy.errors.get("http 503"), Some(&10));
    assert_eq!(busy.started, 0);

    let cut = go(target, 6, "cut").await;
    assert_eq!(cut.errors.get("stream ended before done"), Some(&6));
    assert_eq!(
        (cut.started, cut.done, cut.deltas),
        (6, 0, 6 * DELTAS as u64)
    );

    let failed = go(target, 4, "fail").await;
    assert_eq!(failed.errors.get("run_failed"), Some(&4));
    assert_eq!(failed.done, 0);

    let refused = go("127.0.0.1:1".parse().unwrap(), 3, "ok").await;
    assert_eq!(refused.errors.get("connection refused"), Some(&3));
}

#[tokio::test]
async fn the_ramp_stops_after_the_allowed_errors_and_says_why() {
    let target = server().await;
    let report = run(Plan {
        target,
        streams: 50,
        ramp_per_sec: 500.0,
        concurrency: 1,
        model: "busy".to_owned(),
        question: "q".to_owned(),
        sources: loopback_sources(1),
        bearer: None,
        hold: None,
        stop_after_errors: 5,
        server_pid: None,
        rss_checkpoints: vec![],
        response_timeout: Duration::from_secs(10),
        settled: None,
        path: None,
        follow_at: None,
        leave_producer: false,
        follow_reconnect: false,
        chats: None,
        h2: None,
    })
    .await;
    assert_eq!(report.errors.get("http 503"), Some(&5));
    assert_eq!(report.stopped_by, "errors: http 503 (5)");
}

#[tokio::test]
async fn streams_sharing_http2_connections_are_counted_the_same() {
    let target = server().await;
    let shared = Arc::new(H2Connections::new(4));
    let report = run(Plan {
        h2: Some(Arc::clone(&shared)),
        ..plan(target, 10, "ok")
    })
    .await;
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(
        (report.started, report.done, report.deltas),
        (10, 10, 10 * DELTAS as u64)
    );
    assert_eq!(shared.opened().await, 3, "4 streams per connection");
}

#[tokio::test]
async fn a_hold_ends_when_every_stream_has() {
    let target = server().await;
    let mut plan = plan(target, 10, "ok");
    plan.hold = Some(Duration::from_secs(3600));
    let report = tokio::time::timeout(Duration::from_secs(60), run(plan))
        .await
        .expect("the streams ended, so the hour's hold did too");
    assert_eq!(report.done, 10);
    assert_eq!(report.events, 10 * (DELTAS as u64 + 4));
}

/// A reading of the server's memory pauses the ramp, and the streams after it keep the ramp's rate: they do not all
/// set out at once to catch up with its schedule, a burst the plan did not ask for.
#[tokio::test]
async fn the_ramp_goes_on_at_its_rate_after_a_memory_reading() {
    async fn noted(State(arrived): State<Arc<Mutex<Vec<Instant>>>>, body: Json<Value>) -> Response {
        arrived.lock().unwrap().push(Instant::now());
        stream(body).await
    }
    let arrived = Arc::new(Mutex::new(Vec::new()));
    let target = serve(
        Router::new()
            .route("/agents/chats/{chat}/stream", post(noted))
            .with_state(Arc::clone(&arrived)),
    )
    .await;

    // 20 a second: the 10 after the reading at 10 are due 50 ms apart, 0.45 s from the first to the last, where the
    // reading alone takes more than a second.
    let report = run(Plan {
        ramp_per_sec: 20.0,
        rss_checkpoints: vec![10],
        ..plan(target, 20, "ok")
    })
    .await;
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.done, 20);
    let mut arrived = arrived.lock().unwrap().clone();
    arrived.sort_unstable();
    let (before, after) = arrived.split_at(10);
    assert!(
        after[0] - before[9] >= Duration::from_secs(1),
        "the ramp waited for the reading"
    );
    let spread = after[9] - after[0];
    assert!(
        spread >= Duration::from_millis(400),
        "the 10 streams after the reading came {spread:?} from the first to the last, not at the ramp's rate"
    );
}
