//! The stream route and the other routes, through the real binary.

use crate::common::{Agentd, deltas, metric, new_chat, types};
use serde_json::{Value, json};

#[tokio::test]
async fn a_test_run_streams_the_protocol_in_order_with_increasing_ids() {
    let server = Agentd::spawn(&[]).await;
    let chat = new_chat();
    let mut stream = server
        .stream(&chat, json!({"question": "What is agentd?"}))
        .await;
    assert_eq!(stream.headers["content-type"], "text/event-stream");
    assert_eq!(stream.headers["cache-control"], "no-cache");
    assert_eq!(stream.headers["x-accel-buffering"], "no");
    let events = stream.rest().await;

    let mut expected = vec!["run_started"];
    expected.extend(["model_delta"; 8]);
    expected.extend(["final_answer", "run_completed", "done"]);
    assert_eq!(types(&events), expected);

    let started = &events[0].1;
    let run_id = started["run_id"].as_str().unwrap();
    assert_eq!(started["chat_id"], chat);
    assert_eq!(started["model"], "test");
    assert_eq!(started["canvas_id"], "dev-canvas");
    for (i, (id, _)) in events.iter().enumerate() {
        assert_eq!(id, &format!("{run_id}:{}", i + 1));
    }

    let answer = &events[9].1;
    assert_eq!(answer["output"], deltas(&events));
    assert_eq!(answer["usage"]["output_tokens"], 8);
    let usage = &answer["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(usage["input_tokens"].as_u64().unwrap() + 8)
    );
    assert!(events[10].1["elapsed_ms"].is_u64());
}

#[tokio::test]
async fn a_tool_call_shows_its_start_and_finish_before_the_answer() {
    let server = Agentd::spawn(&[]).await;
    let events = server
        .stream(
            &new_chat(),
            json!({"question": "time?", "model": "test:deltas=2,tool=current_time"}),
        )
        .await
        .rest()
        .await;
    assert_eq!(
        types(&events),
        [
            "run_started",
            "tool_started",
            "tool_finished",
            "model_delta",
            "model_delta",
            "final_answer",
            "run_completed",
            "done"
        ]
    );
    assert_eq!(events[1].1["tool_name"], "current_time");
    // The label a UI shows, on both events, as the history stores it.
    assert_eq!(events[1].1["tool_label"], "Used tool current time");
    assert_eq!(events[2].1["tool_label"], "Used tool current time");
    assert_eq!(events[1].1["tool_call_id"], events[2].1["tool_call_id"]);
    assert_eq!(events[1].1["args"], json!({}));
    assert!(events[2].1["elapsed_ms"].is_u64());
}

#[tokio::test]
async fn a_failing_run_ends_with_run_failed_then_done() {
    let server = Agentd::spawn(&[]).await;
    let events = server
        .stream(
            &new_chat(),
            json!({"question": "q", "model": "test:fail_after=2"}),
        )
        .await
        .rest()
        .await;
    assert_eq!(
        types(&events),
        [
            "run_started",
            "model_delta",
            "model_delta",
            "run_failed",
            "done"
        ]
    );
    assert!(
        events[3].1["error"]
            .as_str()
            .unwrap()
            .contains("failed after 2 deltas")
    );
    assert_eq!(events[3].1["code"], "model_failed");
}

#[tokio::test]
async fn the_default_model_comes_from_ai_model() {
    let server = Agentd::spawn(&[("AI_MODEL", "test:deltas=1")]).await;
    let events = server
        .stream(&new_chat(), json!({"question": "q"}))
        .await
        .rest()
        .await;
    assert_eq!(events[0].1["model"], "test:deltas=1");
    assert_eq!(
        types(&events)
            .iter()
            .filter(|t| *t == "model_delta")
            .count(),
        1
    );
}

/// Every refusal before the stream starts: its status, a JSON `detail` and the error's `code`.
#[tokio::test]
async fn bad_requests_get_their_status_a_json_detail_and_a_code() {
    let server = Agentd::spawn(&[]).await;
    let stream_url = server.url(&format!("/agents/chats/{}/stream", new_chat()));
    let post = |content_type: &'static str, body: Vec<u8>| {
        server
            .http
            .post(&stream_url)
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let json = "application/json";
    let cases: Vec<(&str, reqwest::Response, u16, &str, &str)> = vec![
        (
            "malformed JSON",
            post(json, b"{\"question\":".to_vec()).await.unwrap(),
            400,
            "malformed_json",
            "not valid JSON",
        ),
        (
            "no question",
            post(json, b"{}".to_vec()).await.unwrap(),
            422,
            "invalid_request",
            "question",
        ),
        (
            "not an object",
            post(json, b"[]".to_vec()).await.unwrap(),
            422,
            "invalid_request",
            "JSON object",
        ),
        (
            "empty question",
            post(json, br#"{"question":""}"#.to_vec()).await.unwrap(),
            422,
            "invalid_request",
            "at least 1 character",
        ),
        (
            "question too long",
            post(
                json,
                json!({"question": "x".repeat(2001)})
                    .to_string()
                    .into_bytes(),
            )
            .await
            .unwrap(),
            422,
            "invalid_request",
            "at most 2000 characters",
        ),
        (
            "question not a string",
            post(json, br#"{"question":7}"#.to_vec()).await.unwrap(),
            422,
            "invalid_request",
            "valid string",
        ),
        (
            "model too long",
            post(
                json,
                json!({"question": "q", "model": "m".repeat(201)})
                    .to_string()
                    .into_bytes(),
            )
            .await
            .unwrap(),
            422,
            "invalid_request",
            "at most 200 characters",
        ),
        (
            "unknown model",
            post(json, br#"{"question":"q","model":"gpt-nine"}"#.to_vec())
                .await
                .unwrap(),
            422,
            "invalid_request",
            "gpt-nine",
        ),
        (
            // Sent chunked, with no Content-Length to refuse it by (that case is refused from the header alone, in
            // the hardening tests): the limit is found while reading.
            "body over 64 KiB",
            server
                .http
                .post(&stream_url)
                .header("content-type", json)
                .body(reqwest::Body::wrap_stream(futures_util::stream::iter([
                    Ok::<_, std::io::Error>(vec![b' '; 64 * 1024 + 1]),
                ])))
                .send()
                .await
                .unwrap(),
            413,
            "payload_too_large",
            "larger than 65536 bytes",
        ),
        (
            "wrong content type",
            post("text/plain", b"{}".to_vec()).await.unwrap(),
            415,
            "unsupported_media_type",
            "application/json",
        ),
        (
            "unknown route",
            server.get("/nope").await,
            404,
            "route_not_found",
            "Not Found",
        ),
        (
            "wrong method",
            server.http.get(&stream_url).send().await.unwrap(),
            405,
            "method_not_allowed",
            "Method Not Allowed",
        ),
    ];
    for (case, response, status, code, detail) in cases {
        assert_eq!(response.status().as_u16(), status, "{case}");
        assert_eq!(
            response.headers()["content-type"],
            "application/json",
            "{case}"
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], code, "{case}: {body}");
        assert!(
            body["detail"].to_string().contains(detail),
            "{case}: {body}"
        );
    }
}

#[tokio::test]
async fn field_errors_name_the_field() {
    let server = Agentd::spawn(&[]).await;
    let response = server
        .ask(&new_chat(), json!({"question": "", "model": 3}))
        .await;
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    let fields: Vec<&Value> = body["detail"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["loc"])
        .collect();
    assert_eq!(
        fields,
        [&json!(["body", "question"]), &json!(["body", "model"])]
    );
}

#[tokio::test]
async fn streams_over_max_streams_get_503_with_retry_after() {
    let server = Agentd::spawn(&[("MAX_STREAMS", "1")]).await;
    let mut open = server
        .stream(
            &new_chat(),
            json!({"question": "q", "model": "test:deltas=100,delay_ms=100"}),
        )
        .await;
    assert_eq!(open.next_data().await["type"], "run_started");

    let refused = server.ask(&new_chat(), json!({"question": "q"})).await;
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    assert_eq!(refused.headers()["connection"], "close");
    let body: Value = refused.json().await.unwrap();
    assert!(
        body["detail"].as_str().unwrap().contains("limit reached"),
        "{body}"
    );
    assert_eq!(body["code"], "at_capacity");

    drop(open);
    let metrics = server.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("agentd_streams_rejected_total{reason=\"limit\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn health_readiness_and_metrics_answer() {
    let server = Agentd::spawn(&[]).await;
    for path in ["/healthz", "/health", "/readyz"] {
        assert_eq!(server.get(path).await.status(), 200, "{path}");
    }
    server
        .stream(&new_chat(), json!({"question": "q"}))
        .await
        .rest()
        .await;
    let metrics = server.get("/metrics").await;
    assert!(
        metrics.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = metrics.text().await.unwrap();
    for line in [
        "agentd_open_streams 0",
        "agentd_streams_admitted_total 1",
        "agentd_runs_total{outcome=\"completed\"} 1",
        "agentd_store_acquire_timeouts_total 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    // Every store connection the run took was counted as it waited for it.
    assert!(
        metric(&text, "agentd_store_acquire_seconds_count") >= 2,
        "{text}"
    );
}

#[tokio::test]
async fn cors_preflight_allows_the_configured_origin_and_authorization() {
    let server = Agentd::spawn(&[("AGENT_HTTP_CORS_ORIGINS", "https://app.example")]).await;
    let preflight = |origin: &'static str| {
        server
            .http
            .request(
                reqwest::Method::OPTIONS,
                server.url("/agents/chats/c/stream"),
            )
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type",
            )
            .send()
    };
    let allowed = preflight("https://app.example").await.unwrap();
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let headers = allowed.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap();
    assert!(headers.contains("authorization"), "{headers}");
    let other = preflight("https://evil.example").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn the_open_file_limit_caps_streams_and_beyond_it_connections_get_a_clear_503() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let server = Agentd::spawn_with_open_file_limit(256, &[]).await;
    let log = server.log_text();
    assert!(log.contains("\"open_file_limit\":256"), "{log}");
    assert!(log.contains("\"max_streams\":128"), "{log}");

    // Idle keep-alive connections hold a descriptor each, until there is none left for the next client.
    let addr = server.base.trim_start_matches("http://").to_owned();
    let mut held = Vec::new();
    let mut refusal = None;
    for _ in 0..400 {
        let mut socket = tokio::net::TcpStream::connect(&addr).await.unwrap();
        socket
            .write_all(format!("GET /healthz HTTP/1.1\r\nhost: {addr}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut answer = vec![0; 1024];
        let n = tokio::time::timeout(crate::common::PATIENCE, socket.read(&mut answer))
            .await
            .expect("every client gets an answer, none hangs")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
        if answer.starts_with("HTTP/1.1 503") {
            refusal = Some(answer);
            break;
        }
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        held.push(socket);
    }
    let refusal = refusal.expect("the descriptor limit was reached");
    assert!(
        held.len() > 64 && held.len() < 256,
        "{} connections held",
        held.len()
    );
    let (head, body) = refusal.split_once("\r\n\r\n").unwrap();
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "{head}"
    );
    let body: Value = serde_json::from_str(body).unwrap();
    assert!(
        body["detail"].as_str().unwrap().contains("open-file limit"),
        "{body}"
    );
    assert!(server.log_text().contains("open-file limit reached"));

    // Once the clients let go, the server serves again, as the refusal's Retry-After promised.
    drop(held);
    let deadline = tokio::time::Instant::now() + crate::common::PATIENCE;
    loop {
        let status = server.get("/healthz").await.status();
        if status == 200 {
            break;
        }
        assert_eq!(status, 503);
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server never recovered"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
