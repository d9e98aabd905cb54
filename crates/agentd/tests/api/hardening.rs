//! Hostile clients and unlucky operators: stalled bodies, oversized announcements, stray signals.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use agentd::grpc::proto::CreateAgentChatRequest;
use agentd::grpc::proto::agents_client::AgentsClient;

use crate::common::db::TestDb;
use crate::common::{Agentd, PATIENCE, create_chat, metric, new_chat, types};

/// Everything the server writes on `socket` until it closes the connection, as text.
async fn read_answer(socket: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, socket.read_to_end(&mut answer))
        .await
        .expect("an answer in time")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

/// Sends `head` (and `body`) on a raw connection; returns the status line and the JSON body of the answer.
async fn exchange(server: &Agentd, head: String, body: &[u8]) -> (String, Value) {
    let addr = server.base.trim_start_matches("http://");
    let mut socket = TcpStream::connect(addr).await.unwrap();
    socket.write_all(head.as_bytes()).await.unwrap();
    socket.write_all(body).await.unwrap();
    let text = read_answer(&mut socket).await;
    let (head, json) = text.split_once("\r\n\r\n").expect("a whole response");
    let status = head.lines().next().unwrap().to_owned();
    (status, serde_json::from_str(json).expect("a JSON body"))
}

fn post_head(chat: &str, length: u64) -> String {
    format!(
        "POST /agents/chats/{chat}/stream HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: {length}\r\nconnection: close\r\n\r\n"
    )
}

#[tokio::test]
async fn an_oversized_content_length_is_refused_from_the_header_alone() {
    let server = Agentd::spawn(&[]).await;
    let (status, body) = exchange(&server, post_head(&new_chat(), 100_000_000), b"").await;
    assert!(status.contains(" 413 "), "{status}");
    assert!(
        body["detail"].as_str().unwrap().contains("larger than"),
        "{body}"
    );
}

#[tokio::test]
async fn a_stalled_request_body_gets_408_and_does_not_hold_the_shutdown() {
    let mut server = Agentd::spawn(&[("SHUTDOWN_TIMEOUT", "120"), ("DRAIN_TIMEOUT", "100")]).await;
    let addr = server.base.trim_start_matches("http://").to_owned();
    let stalled = tokio::spawn(async move {
        let mut socket = TcpStream::connect(addr).await.unwrap();
        socket
            .write_all(post_head(&new_chat(), 100).as_bytes())
            .await
            .unwrap();
        socket.write_all(b"{\"q").await.unwrap();
        let mut answer = Vec::new();
        socket.read_to_end(&mut answer).await.unwrap();
        String::from_utf8_lossy(&answer).into_owned()
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let signalled = tokio::time::Instant::now();
    server.signal("TERM");
    let answer = tokio::time::timeout(PATIENCE, stalled)
        .await
        .unwrap()
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"detail\""), "{answer}");
    assert!(answer.contains(r#""code":"request_timeout""#), "{answer}");
    assert!(server.exit_status().await.success());
    // Bounded by the body timeout (10 s), not by SHUTDOWN_TIMEOUT (120 s).
    assert!(
        signalled.elapsed() < Duration::from_secs(30),
        "{:?}",
        signalled.elapsed()
    );
}

#[tokio::test]
async fn hup_and_usr_signals_are_logged_and_ignored_and_quit_stops_at_once_visibly() {
    let mut server = Agentd::spawn(&[("DRAIN_TIMEOUT", "100"), ("SHUTDOWN_TIMEOUT", "120")]).await;
    let chat = new_chat();
    let body = serde_json::json!({"question": "q", "model": "test:deltas=60,delay_ms=20"});
    let mut stream = server.stream(&chat, body).await;
    stream.next().await.unwrap();
    for name in ["HUP", "USR1", "USR2"] {
        server.signal(name);
    }
    // The run goes on to its end: none of them killed the process or stopped the stream.
    let events = stream.rest().await;
    assert_eq!(events.last().unwrap().1["type"], "done");
    assert!(events.iter().any(|(_, e)| e["type"] == "run_completed"));
    for name in ["SIGHUP", "SIGUSR1", "SIGUSR2"] {
        let line = server
            .wait_for_log_where(|l| l["signal"] == name)
            .await
            .unwrap();
        assert!(
            line["message"].as_str().unwrap().contains("ignored"),
            "{line}"
        );
    }

    // SIGQUIT: no drain, the open stream is ended visibly, and the process exits cleanly.
    let body = serde_json::json!({"question": "q", "model": "test:deltas=10000,delay_ms=20"});
    let mut stream = server.stream(&chat, body).await;
    stream.next().await.unwrap();
    server.signal("QUIT");
    let events = stream.rest().await;
    let interrupted = events
        .iter()
        .find(|(_, e)| e["type"] == "run_interrupted")
        .expect("ended visibly");
    assert_eq!(interrupted.1["reason"], "shutdown");
    assert!(server.exit_status().await.success());
}

#[tokio::test]
async fn an_empty_or_short_jwt_secret_refuses_to_start_and_dev_mode_must_be_asked_for() {
    for (secret, says) in [
        ("", "set but empty"),
        ("   ", "set but empty"),
        ("short-secret", "12 bytes; it must be at least 32"),
    ] {
        let (status, stderr) = Agentd::run_to_exit(&[("JWT_SECRET", secret)]).await;
        assert_eq!(status.code(), Some(64), "{secret:?}: {stderr}");
        assert!(stderr.contains(says), "{secret:?}: {stderr}");
        assert!(
            !stderr.contains(secret) || secret.trim().is_empty(),
            "the secret is never printed"
        );
    }
    // Asked for explicitly, an empty secret is dev mode.
    let dev = Agentd::spawn(&[("JWT_SECRET", ""), ("AGENTD_DEV", "1")]).await;
    assert!(dev.log_text().contains("dev mode"));
    let chat = new_chat();
    let body = serde_json::json!({"question": "q", "model": "test:deltas=1"});
    assert_eq!(dev.ask(&chat, body).await.status(), 200);
}

on_both_backends!(
    a_nul_character_is_refused_alike_by_http_and_grpc_on_both_stores,
    deleting_a_chat_mid_run_ends_its_run_cleanly_with_reason_deleted,
);

async fn a_nul_character_is_refused_alike_by_http_and_grpc_on_both_stores(db: TestDb) {
    let server = Agentd::spawn_on(db.url(), &[]).await;
    let chat = new_chat();
    let refused = server
        .ask(
            &chat,
            serde_json::json!({"question": "a\u{0}b", "model": "test"}),
        )
        .await;
    assert_eq!(refused.status(), 422);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(
        body["detail"][0]["loc"],
        serde_json::json!(["body", "question"])
    );
    // Nothing was stored: the same chat id starts cleanly afterwards.
    let events = server
        .stream(
            &chat,
            serde_json::json!({"question": "ab", "model": "test:deltas=1"}),
        )
        .await
        .rest()
        .await;
    assert_eq!(events.last().unwrap().1["type"], "done");

    let mut grpc = AgentsClient::connect(server.grpc.clone()).await.unwrap();
    for (org, says) in [("a\u{0}b", "NUL"), (&*"o".repeat(201), "longer than 200")] {
        let status = grpc
            .create_agent_chat(CreateAgentChatRequest {
                org_id: org.to_owned(),
                canvas_id: "c".into(),
                user_id: "u".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().contains("org_id") && status.message().contains(says),
            "{status:?}"
        );
    }
}

async fn deleting_a_chat_mid_run_ends_its_run_cleanly_with_reason_deleted(db: TestDb) {
    let mut server = Agentd::spawn_on(db.url(), &[]).await;
    let chat = new_chat();
    let body = serde_json::json!({"question": "q", "model": "test:deltas=1000,delay_ms=20"});
    let mut stream = server.stream(&chat, body).await;
    for _ in 0..3 {
        stream.next().await.unwrap();
    }
    // The chats of dev mode belong to the development owner.
    let mut grpc = AgentsClient::connect(server.grpc.clone()).await.unwrap();
    grpc.delete_agent_chat(agentd::grpc::proto::DeleteAgentChatRequest {
        org_id: "dev-org".into(),
        canvas_id: "dev-canvas".into(),
        user_id: "dev-user".into(),
        chat_id: chat.clone(),
    })
    .await
    .unwrap();
    let rest = stream.rest().await;
    let kinds: Vec<&str> = rest
        .iter()
        .map(|(_, e)| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        &kinds[kinds.len() - 2..],
        ["run_interrupted", "done"],
        "{kinds:?}"
    );
    assert_eq!(rest[rest.len() - 2].1["reason"], "deleted");
    assert!(!kinds.contains(&"run_failed"));
    let ended = server
        .wait_for_log_where(|l| l["message"] == "run ended")
        .await
        .unwrap();
    assert_eq!(ended["outcome"], "deleted");
    assert!(
        !server.log_text().contains("\"level\":\"ERROR\""),
        "{}",
        server.log_text()
    );
}

const SECRET: &str = "hardening-tests-secret-of-32-bytes-or-more";

#[tokio::test]
async fn small_protocol_abuses_get_clear_json_errors() {
    let server = Agentd::spawn(&[("JWT_SECRET", SECRET), ("AI_MODELS", "test")]).await;
    let secret = agentd::secret::Secret::new(SECRET);
    let mint = |user: &str| {
        agentd::auth::mint(
            &secret,
            "superplane_api",
            "acme",
            user,
            "canvas-1",
            Duration::from_secs(60),
        )
    };
    let url = server.url(&format!("/agents/chats/{}/stream", new_chat()));
    let body = serde_json::json!({"question": "q"});

    // Two Authorization headers: which one would count is not for the service to guess.
    let two = server
        .http
        .post(&url)
        .header("authorization", format!("Bearer {}", mint("alice")))
        .header("authorization", format!("Bearer {}", mint("mallory")))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(two.status(), 400);
    let detail: Value = two.json().await.unwrap();
    assert_eq!(detail["code"], "bad_request");
    assert!(
        detail["detail"].as_str().unwrap().contains("more than one"),
        "{detail}"
    );

    // A user id with surrounding whitespace is not the user without it.
    let spaced = server
        .http
        .post(&url)
        .bearer_auth(mint(" alice "))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(spaced.status(), 401);
    let detail: Value = spaced.json().await.unwrap();
    assert!(
        detail["detail"].as_str().unwrap().contains("whitespace"),
        "{detail}"
    );

    // A path that is not UTF-8 is the same 422 JSON error as a bad id.
    let unreadable = server
        .http
        .post(server.url("/agents/chats/%ff/stream"))
        .bearer_auth(mint("alice"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(unreadable.status(), 422);
    let detail: Value = unreadable.json().await.unwrap();
    assert_eq!(detail["detail"][0]["loc"], serde_json::json!(["path"]));

    // Every series of refusals is there from the start.
    let metrics = server.get("/metrics").await.text().await.unwrap();
    for reason in ["shutdown", "limit"] {
        let series = format!("agentd_streams_rejected_total{{reason=\"{reason}\"}} 0");
        assert!(
            metrics.lines().any(|l| l == series),
            "{series} in {metrics}"
        );
    }
}

#[tokio::test]
async fn a_client_that_half_closes_after_its_request_gets_its_answer() {
    let server = Agentd::spawn(&[]).await;
    let addr = server.base.trim_start_matches("http://").to_owned();
    let mut socket = TcpStream::connect(addr).await.unwrap();
    socket
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    socket.shutdown().await.unwrap();
    let answer = read_answer(&mut socket).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
}

/// A connection that has sent a stream request for a new chat with `model`, over HTTP/1.1 by hand.
async fn raw_stream(server: &Agentd, model: &str) -> TcpStream {
    let addr = server.base.trim_start_matches("http://");
    let mut socket = TcpStream::connect(addr).await.unwrap();
    let body = json!({"question": "q", "model": model}).to_string();
    let request = format!(
        "POST /agents/chats/{}/stream HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        uuid::Uuid::new_v4(),
        body.len()
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    socket
}

#[tokio::test]
async fn a_client_that_half_closes_after_its_stream_request_gets_the_whole_run() {
    // The server sees the client's end shut at once and writes keep-alives to find out whether it left: this one
    // only stopped sending, reads them as comments, and gets every event.
    let server = Agentd::spawn(&[]).await;
    let mut socket = raw_stream(&server, "test:deltas=3,delay_ms=700").await;
    socket.shutdown().await.unwrap();
    let answer = read_answer(&mut socket).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(": keep-alive"), "{answer}");
    assert_eq!(
        answer.matches(r#""type":"model_delta""#).count(),
        3,
        "{answer}"
    );
    assert!(answer.contains(r#""type":"done""#), "{answer}");
}

#[tokio::test]
async fn a_request_pipelined_behind_a_stream_is_answered_after_it_and_is_not_taken_for_a_close() {
    // The stream watches the client's end for a close; bytes waiting there are the next request, not a close. Sent
    // once the stream has begun, they wait in the socket (hyper reads them after the response).
    let server = Agentd::spawn(&[]).await;
    let mut socket = raw_stream(&server, "test:deltas=3,delay_ms=500").await;
    let mut answers = Vec::new();
    let mut buf = [0u8; 4096];
    let mut read_until = async |socket: &mut TcpStream, answers: &mut Vec<u8>, wanted: &str| {
        while !String::from_utf8_lossy(answers).contains(wanted) {
            let n = socket.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(answers));
            answers.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(
        PATIENCE,
        read_until(&mut socket, &mut answers, "run_started"),
    )
    .await
    .expect("the stream begins in time");
    socket
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::timeout(
        PATIENCE,
        read_until(&mut socket, &mut answers, r#"{"status":"ok"}"#),
    )
    .await
    .expect("both answers in time");
    let answers = String::from_utf8_lossy(&answers);
    let (stream, health) = answers
        .split_once("\r\n0\r\n\r\n")
        .expect("the stream ends first");
    assert_eq!(
        stream.matches(r#""type":"model_delta""#).count(),
        3,
        "{stream}"
    );
    assert!(stream.contains(r#""type":"done""#), "{stream}");
    assert!(!stream.contains(": keep-alive"), "{stream}");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
}

#[tokio::test]
async fn durations_too_long_to_add_to_the_clock_refuse_the_start() {
    for setting in ["SHUTDOWN_DELAY", "SHUTDOWN_TIMEOUT", "DRAIN_TIMEOUT"] {
        let (status, stderr) = Agentd::run_to_exit(&[(setting, "1e19")]).await;
        assert_eq!(status.code(), Some(64), "{setting}: {stderr}");
        assert!(
            stderr.contains("longer than 365 days"),
            "{setting}: {stderr}"
        );
    }
}

#[tokio::test]
async fn the_grpc_token_check_takes_the_scheme_in_any_case_as_http_does() {
    let server = Agentd::spawn(&[("INTERNAL_GRPC_TOKEN", "grpc-token")]).await;
    let channel = tonic::transport::Endpoint::from_shared(server.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let value: tonic::metadata::MetadataValue<_> =
            format!("{scheme} grpc-token").parse().unwrap();
        let mut grpc = AgentsClient::with_interceptor(
            channel.clone(),
            move |mut request: tonic::Request<()>| {
                request
                    .metadata_mut()
                    .insert("authorization", value.clone());
                Ok(request)
            },
        );
        let created = grpc
            .create_agent_chat(CreateAgentChatRequest {
                org_id: "o".into(),
                canvas_id: "c".into(),
                user_id: "u".into(),
            })
            .await;
        assert!(created.is_ok(), "{scheme}: {created:?}");
    }
}

#[tokio::test]
async fn a_stage_slow_to_stop_is_named_while_the_shutdown_waits_for_it() {
    let mut server = Agentd::spawn(&[("GRPC_SHUTDOWN_GRACE", "7")]).await;
    // A gRPC client that opened its connection (preface and settings) and then says nothing more.
    let grpc = server.grpc.trim_start_matches("http://").to_owned();
    let mut held = TcpStream::connect(&grpc).await.unwrap();
    held.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    server.signal("TERM");
    server
        .wait_for_log("stopping: still waiting for this component")
        .await;
    let log = server.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("stopping: still waiting"))
        .unwrap();
    let line: Value = serde_json::from_str(line).unwrap();
    assert_eq!(line["component"], "grpc", "{line}");
    assert!(
        line["pending"]
            .as_str()
            .unwrap()
            .starts_with("[(\"grpc\", 1), (\"run log writer\", 1)"),
        "the pending list names it and what comes after it: {line}"
    );
    // Its grace still bounds it.
    assert!(server.exit_status().await.success());
    assert!(
        server
            .log_text()
            .contains("still running when its time was up; cut")
    );
    drop(held);
}

#[tokio::test]
async fn the_answers_hyper_gives_to_an_unreadable_request_head_are_json_too() {
    let server = Agentd::spawn(&[]).await;
    let addr = server.base.trim_start_matches("http://").to_owned();
    let long_uri = format!("GET /{} HTTP/1.1\r\nhost: x\r\n\r\n", "a".repeat(70_000));
    // More header fields than hyper reads (100).
    let big_header = format!(
        "GET /healthz HTTP/1.1\r\nhost: x\r\n{}\r\n",
        (0..150)
            .map(|i| format!("x-h{i}: v\r\n"))
            .collect::<String>()
    );
    for (request, status) in [
        ("GARBAGE\r\n\r\n".to_owned(), 400),
        (
            "POST /x HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n"
                .to_owned(),
            400,
        ),
        (long_uri, 414),
        (big_header, 431),
    ] {
        let mut socket = TcpStream::connect(&addr).await.unwrap();
        socket.write_all(request.as_bytes()).await.unwrap();
        let text = read_answer(&mut socket).await;
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with(&format!("HTTP/1.1 {status} ")), "{head}");
        assert!(
            head.contains("\r\ncontent-type: application/json\r\n"),
            "{head}"
        );
        let body: Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["code"], "bad_request", "{body}");
        assert!(body["detail"].is_string(), "{body}");
    }
    // The service answers as before afterwards.
    assert_eq!(server.get("/healthz").await.status(), 200);
}

/// Sends its bytes as they are and hands back the answer's, so a test can send a message that does not parse.
#[derive(Debug, Default, Clone, Copy)]
struct RawBytes;

impl tonic::codec::Codec for RawBytes {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Self;
    type Decoder = Self;

    fn encoder(&mut self) -> Self {
        Self
    }

    fn decoder(&mut self) -> Self {
        Self
    }
}

impl tonic::codec::Encoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, n).to_vec()))
    }
}

#[tokio::test]
async fn a_grpc_request_that_does_not_parse_is_an_invalid_argument() {
    let server = Agentd::spawn(&[]).await;
    let channel = tonic::transport::Endpoint::from_shared(server.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    let path = "/Superplane.Internal.Agents.Agents/CreateAgentChat";
    let mut call = async |bytes: Vec<u8>| {
        grpc.ready().await.unwrap();
        grpc.unary(
            tonic::Request::new(bytes),
            tonic::codegen::http::uri::PathAndQuery::from_static(path),
            RawBytes,
        )
        .await
    };
    // The same route answers a well-formed message.
    let valid = prost::Message::encode_to_vec(&CreateAgentChatRequest {
        org_id: "o".into(),
        canvas_id: "c".into(),
        user_id: "u".into(),
    });
    assert!(call(valid).await.is_ok());
    // Field 1, length-delimited, with a length that never ends; then a length past the message's end.
    for broken in [vec![0x0a, 0xff], vec![0x0a, 0x05, b'o']] {
        let status = call(broken).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains("not a valid protobuf message"),
            "{status:?}"
        );
    }
}

#[tokio::test]
async fn the_test_model_is_offered_with_tokens_only_when_named_and_its_size_is_bounded() {
    // With tokens checked, a default test model not named in AI_MODELS refuses the start.
    let (status, stderr) = Agentd::run_to_exit(&[("JWT_SECRET", SECRET)]).await;
    assert_eq!(status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("AI_MODELS"), "{stderr}");

    // With a real default and no list, a request for the test model is refused.
    let server = Agentd::spawn(&[("JWT_SECRET", SECRET), ("AI_MODEL", "openai:gpt-x")]).await;
    let secret = agentd::secret::Secret::new(SECRET);
    let token = agentd::auth::mint(
        &secret,
        "superplane_api",
        "acme",
        "alice",
        "canvas-1",
        Duration::from_secs(60),
    );
    let chat = create_chat(&server, "acme", "alice", "canvas-1").await;
    let refused = server
        .http
        .post(server.url(&format!("/agents/chats/{chat}/stream")))
        .bearer_auth(&token)
        .json(&serde_json::json!({"question": "q", "model": "test:deltas=10000000"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 422);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["detail"][0]["type"], "model_not_allowed", "{body}");

    // In any mode, its size is bounded.
    let dev = Agentd::spawn(&[("TEST_MODEL_MAX_DELTAS", "5")]).await;
    let too_big = dev
        .ask(
            &new_chat(),
            serde_json::json!({"question": "q", "model": "test:deltas=6"}),
        )
        .await;
    assert_eq!(too_big.status(), 422);
    let body: Value = too_big.json().await.unwrap();
    assert_eq!(body["detail"][0]["type"], "model_over_limit", "{body}");
    let within = dev
        .ask(
            &new_chat(),
            serde_json::json!({"question": "q", "model": "test:deltas=5"}),
        )
        .await;
    assert_eq!(within.status(), 200);
}

#[tokio::test]
async fn readiness_sees_a_store_that_does_not_take_writes() {
    use sqlx::Connection;
    let db = TestDb::sqlite();
    let server = Agentd::spawn_on(db.url(), &[]).await;
    assert_eq!(server.get("/readyz").await.status(), 200);
    // Another process takes SQLite's write lock and keeps it.
    let mut other = sqlx::SqliteConnection::connect(db.url()).await.unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut other)
        .await
        .unwrap();
    let held = server.get("/readyz").await;
    assert_eq!(held.status(), 503);
    let body: Value = held.json().await.unwrap();
    assert!(
        body["detail"].as_str().unwrap().contains("unavailable"),
        "{body}"
    );
    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
    assert_eq!(server.get("/readyz").await.status(), 200);
}

/// A burst of new connections larger than the usual listen backlog (128) waits to be accepted instead of having its
/// connection requests dropped (each dropped one costs its client a second or more): here while the process is
/// stopped and accepts nothing at all.
#[tokio::test]
async fn a_burst_of_connections_waits_for_a_busy_server_instead_of_being_dropped() {
    const BURST: usize = 200;
    let server = Agentd::spawn(&[]).await;
    let addr = server.base.trim_start_matches("http://").to_owned();
    server.signal("STOP");
    let connecting = (0..BURST).map(|_| {
        let addr = addr.clone();
        // A dropped connection request is sent again only after a second: two seconds tell queued from dropped.
        tokio::spawn(async move {
            tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await
        })
    });
    let mut sockets = Vec::new();
    for connecting in connecting.collect::<Vec<_>>() {
        if let Ok(Ok(socket)) = connecting.await.unwrap() {
            sockets.push(socket);
        }
    }
    server.signal("CONT");
    assert_eq!(
        sockets.len(),
        BURST,
        "connections queued while not accepting"
    );
    // Each queued connection is served once the process goes on.
    let (first, rest) = sockets.split_first_mut().unwrap();
    for socket in [first, rest.last_mut().unwrap()] {
        socket
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let answer = read_answer(socket).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
}

/// A log collector that stops reading the service's stderr holds up no run: once the pipe is full, the lines wait in
/// the service (bounded, see `telemetry`) and are written, every one, once stderr is read again.
#[tokio::test]
async fn a_stderr_nobody_reads_holds_up_no_run_and_loses_no_line_once_read_again() {
    use futures_util::StreamExt;

    const RUNS: usize = 400;
    // A pipe holds 64 KiB; the harness's reader takes 8 KiB more before it stops.
    const PIPE_AND_READER: usize = 72 * 1024;
    let mut server = Agentd::spawn(&[]).await;
    let before = server.log_lines().len();
    server.stop_reading_logs();
    let run = |_| async {
        let chat = new_chat();
        let question = json!({"question": "hi", "model": "test:deltas=1"});
        let events = server.stream(&chat, question).await.rest().await;
        assert_eq!(types(&events).last().map(String::as_str), Some("done"));
        chat
    };
    let mut chats: Vec<String> = futures_util::stream::iter(0..RUNS)
        .map(run)
        .buffer_unordered(8)
        .collect()
        .await;
    // One more once all those ended: its lines come after theirs.
    let last = run(RUNS).await;
    chats.push(last.clone());

    server.resume_reading_logs();
    server
        .wait_for_log_where(|line| {
            line["message"] == "run ended" && line["chat_id"] == last.as_str()
        })
        .await
        .expect("the last run's end is logged");
    let lines = server.log_lines().split_off(before);
    let bytes: usize = lines.iter().map(|line| line.to_string().len() + 1).sum();
    assert!(
        bytes > 2 * PIPE_AND_READER,
        "{bytes} bytes logged while stderr was not read: the pipe was full long before the runs ended"
    );
    for message in ["run admitted", "run ended"] {
        let logged = lines
            .iter()
            .filter(|line| line["message"] == message)
            .filter(|line| chats.iter().any(|chat| line["chat_id"] == chat.as_str()))
            .count();
        assert_eq!(logged, RUNS + 1, "{message:?} lines");
    }
    assert!(
        !server.log_text().contains("log lines dropped"),
        "{}",
        server.log_text()
    );
    let metrics = server.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("\nagentd_log_lines_dropped_total 0\n"),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "agentd_runs_total{outcome=\"completed\"}"),
        RUNS as u64 + 1
    );
}
