//! When a provider or a tool fails: retries, messages and codes by kind, tool errors the model reads.

use serde_json::{Value, json};

use super::{CANVAS, ORG, USER, answer_of, setup};
use crate::common::upstream::{FakeUpstream, Reply, anthropic, openai};
use crate::common::{Agentd, Events, PATIENCE, deltas, established_to, metric, types};
use agentd::grpc::proto::DescribeAgentChatRequest;
use agentd::grpc::proto::agents_client::AgentsClient;

#[tokio::test]
async fn failing_tools_become_error_results_and_the_run_still_completes() {
    let s = setup().await;
    s.fake.script([
        Reply::Frames(vec![
            openai::tool(0, "c1", "broken", "{}"),
            openai::tool(1, "c2", "slow", "{}"),
            openai::tool(2, "c3", "list_nodes", r#"{"limit": "many"}"#),
            openai::tool(3, "c4", "no_such_tool", "{}"),
            openai::usage(5, 5),
            openai::done(),
        ]),
        Reply::Frames(openai::answer(&["Sorry, the tools failed."], 9, 4)),
    ]);
    let chat = s.chat().await;
    let events = s.run(&chat, "openai:gpt-test", "Try everything").await;
    assert_eq!(
        types(&events)
            .iter()
            .filter(|t| *t == "tool_finished")
            .count(),
        4
    );
    assert_eq!(types(&events).last().unwrap(), "done");
    assert_eq!(answer_of(&events)["output"], "Sorry, the tools failed.");

    let result = |id: &str| s.tool_result(1, id);
    assert!(
        result("c1").contains("500") && result("c1").contains("database on fire"),
        "{}",
        result("c1")
    );
    assert!(result("c2").contains("timed out"), "{}", result("c2"));
    assert!(
        result("c3").contains("args.canvas is required"),
        "{}",
        result("c3")
    );
    assert!(result("c4").contains("no tool named"), "{}", result("c4"));
    assert!(
        s.fake.seen("/api/canvases").is_empty(),
        "bad args never reach the API"
    );
}

#[tokio::test]
async fn schema_keywords_beyond_types_reach_the_model_as_tool_errors() {
    let s = setup().await;
    s.fake.script([
        Reply::Frames(vec![
            openai::tool(
                0,
                "c1",
                "list_nodes",
                r#"{"canvas": "canvas-1", "limit": 0}"#,
            ),
            openai::tool(1, "c2", "list_nodes", r#"{"canvas": "../admin"}"#),
            openai::usage(5, 5),
            openai::done(),
        ]),
        Reply::Frames(openai::answer(&["Fixed."], 9, 4)),
    ]);
    let chat = s.chat().await;
    let events = s.run(&chat, "openai:gpt-test", "List").await;
    assert_eq!(answer_of(&events)["output"], "Fixed.");
    let result = |id: &str| s.tool_result(1, id);
    assert!(
        result("c1").contains("args.limit: 0 is less than the minimum of 1"),
        "{}",
        result("c1")
    );
    assert!(
        result("c2").contains("args.canvas") && result("c2").contains("does not match"),
        "{}",
        result("c2")
    );
    assert!(
        s.fake.seen("/api/canvases").is_empty(),
        "args that break the schema never reach the API"
    );
    let metrics = s.server.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == "agentd_tool_failures_total{kind=\"invalid_args\"} 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_429_then_success_is_retried_into_one_clean_stream() {
    let s = setup().await;
    s.fake.script([
        Reply::Status(429, Some(0)),
        Reply::Status(503, None),
        Reply::Frames(openai::answer(&["Fine."], 3, 1)),
    ]);
    let chat = s.chat().await;
    let events = s.run(&chat, "openai:gpt-test", "q").await;
    assert_eq!(
        types(&events),
        [
            "run_started",
            "model_delta",
            "final_answer",
            "run_completed",
            "done"
        ]
    );
    assert_eq!(s.fake.seen("/v1/chat/completions").len(), 3);
}

#[tokio::test]
async fn upstream_failures_end_the_run_with_a_message_by_kind() {
    let s = setup().await;
    let chat = s.chat().await;
    // The message and the stable code of the run's `run_failed`.
    let failure = |events: &[(String, Value)]| {
        let kinds = types(events);
        assert_eq!(
            kinds[kinds.len() - 2..],
            ["run_failed", "done"],
            "{kinds:?}"
        );
        let failed = &events[events.len() - 2].1;
        (
            failed["error"].as_str().unwrap().to_owned(),
            failed["code"].as_str().unwrap().to_owned(),
        )
    };

    s.fake.script([
        Reply::Status(429, Some(0)),
        Reply::Status(429, Some(0)),
        Reply::Status(429, Some(0)),
    ]);
    let (error, code) = failure(&s.run(&chat, "openai:gpt-test", "q").await);
    assert!(error.contains("rate limiting"), "{error}");
    assert_eq!(code, "provider_rate_limited");

    s.fake.script([Reply::Status(401, None)]);
    let (error, code) = failure(&s.run(&chat, "openai:gpt-test", "q").await);
    assert!(error.contains("configuration"), "{error}");
    assert_eq!(code, "provider_refused");
    assert_eq!(
        s.fake.seen("/v1/chat/completions").len(),
        4,
        "a refusal is not retried"
    );

    // A failure after the first delta is not retried: the client already has that text.
    s.fake
        .script([Reply::Frames(vec![openai::text("Hel"), openai::error()])]);
    let events = s.run(&chat, "openai:gpt-test", "q").await;
    assert_eq!(deltas(&events), "Hel");
    let (error, code) = failure(&events);
    assert!(error.contains("failed while answering"));
    assert_eq!(code, "provider_failed");
    assert_eq!(s.fake.seen("/v1/chat/completions").len(), 5);

    s.fake.script([
        Reply::Status(503, Some(0)),
        Reply::Status(502, Some(0)),
        Reply::Status(500, Some(0)),
    ]);
    let (error, code) = failure(&s.run(&chat, "openai:gpt-test", "q").await);
    assert!(error.contains("unavailable right now"), "{error}");
    assert_eq!(code, "provider_unavailable");

    let mut overloaded = vec![anthropic::start(3), anthropic::text_delta(0, "Hi")];
    overloaded.push(anthropic::overloaded());
    s.fake.script([Reply::Frames(overloaded)]);
    let (error, code) = failure(&s.run(&chat, "anthropic:claude-test", "q").await);
    assert!(error.contains("overloaded"), "{error}");
    assert_eq!(code, "provider_unavailable");

    s.fake.script([Reply::Frames(vec![
        "data: {\"choices\": [{\"delta\": {\"content\n\n".to_owned(),
    ])]);
    let (error, code) = failure(&s.run(&chat, "openai:gpt-test", "q").await);
    assert!(error.contains("broken answer stream"), "{error}");
    assert_eq!(code, "provider_broken_stream");

    s.fake.script([Reply::Frames(vec![openai::text("cut")])]);
    let (error, code) = failure(&s.run(&chat, "openai:gpt-test", "q").await);
    assert!(error.contains("broken answer stream"), "truncated: {error}");
    assert_eq!(code, "provider_broken_stream");

    s.fake
        .script([Reply::FramesThenStall(vec![openai::text("Hel")])]);
    let (error, code) = failure(&s.run(&chat, "openai:gpt-test", "q").await);
    assert!(error.contains("stopped answering"), "{error}");
    assert_eq!(code, "provider_stopped_answering");
    assert_eq!(s.latest_status(&chat).await, "failed");

    // Metrics count the failures by code.
    let metrics = s.server.get("/metrics").await.text().await.unwrap();
    for line in [
        "agentd_run_failures_total{code=\"provider_rate_limited\"} 1",
        "agentd_run_failures_total{code=\"provider_unavailable\"} 2",
        "agentd_run_failures_total{code=\"provider_broken_stream\"} 2",
        "agentd_run_failures_total{code=\"provider_stopped_answering\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line:?} in\n{metrics}"
        );
    }

    let logs = s.server.log_text();
    assert!(
        logs.contains("\"status\":429") && logs.contains("scripted"),
        "the log keeps the upstream's answer"
    );
}

#[tokio::test]
async fn a_client_disconnect_closes_the_upstream_connection_and_the_run_is_interrupted() {
    let s = setup().await;
    s.fake.script([Reply::FramesThenForever(
        vec![openai::text("Hel")],
        openai::text,
    )]);
    let chat = s.chat().await;
    let mut stream = Events::new(s.ask(&chat, "openai:gpt-test", "Talk forever").await);
    assert_eq!(stream.next_data().await["type"], "run_started");
    assert_eq!(stream.next_data().await["content"], "Hel");
    assert_eq!(stream.next_data().await["content"], " more0");
    drop(stream);

    s.fake.wait_closed().await;
    let mut server = s.server;
    let ended = server
        .wait_for_log_where(|l| l["message"] == "run ended")
        .await
        .unwrap();
    assert_eq!(ended["outcome"], "detached");
    let mut grpc = AgentsClient::connect(server.grpc.clone()).await.unwrap();
    let described = grpc
        .describe_agent_chat(DescribeAgentChatRequest {
            org_id: ORG.into(),
            canvas_id: CANVAS.into(),
            user_id: USER.into(),
            chat_id: chat,
        })
        .await
        .unwrap();
    assert_eq!(
        described.into_inner().chat.unwrap().latest_run_status,
        "interrupted"
    );
}

#[tokio::test]
async fn a_model_outside_the_allow_list_is_422_and_dev_mode_refuses_real_models() {
    let s = setup().await;
    let chat = s.chat().await;
    let response = s.ask(&chat, "openai:gpt-other", "q").await;
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["detail"][0]["loc"], json!(["body", "model"]));
    assert!(
        body["detail"][0]["msg"]
            .as_str()
            .unwrap()
            .contains("openai:gpt-other")
    );
    assert!(s.fake.seen("/v1").is_empty());

    let dev = Agentd::spawn(&[
        ("AI_MODELS", "openai:gpt-test"),
        ("OPENAI_BASE_URL", &format!("{}/v1", s.fake.base)),
    ])
    .await;
    let response = dev
        .ask(
            &crate::common::new_chat(),
            json!({"question": "q", "model": "openai:gpt-test"}),
        )
        .await;
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("only the test model"),
        "{body}"
    );
    assert_eq!(
        dev.ask(&crate::common::new_chat(), json!({"question": "q"}))
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn anthropic_an_overload_inside_the_stream_before_any_text_is_retried_like_a_529() {
    let s = setup().await;
    let mut answer = vec![anthropic::start(3)];
    answer.extend(anthropic::text_block(0, "Fine."));
    answer.extend(anthropic::stop(2, "end_turn"));
    s.fake.script([
        Reply::Frames(vec![anthropic::start(3), anthropic::overloaded()]),
        Reply::Frames(answer),
    ]);
    let chat = s.chat().await;
    let events = s.run(&chat, "anthropic:claude-test", "q").await;
    assert_eq!(crate::common::deltas(&events), "Fine.");
    assert!(crate::common::types(&events).contains(&"run_completed".to_owned()));
    assert_eq!(s.fake.seen("/v1/messages").len(), 2, "retried once");
}

/// The run's `run_failed`: its code.
fn failed_code(events: &[(String, Value)]) -> String {
    events
        .iter()
        .find(|(_, e)| e["type"] == "run_failed")
        .map(|(_, e)| e["code"].as_str().unwrap().to_owned())
        .unwrap_or_else(|| panic!("no run_failed in {events:?}"))
}

/// An OpenAI chunk that ends the choice with `reason`.
fn openai_finish(reason: &str) -> String {
    format!(
        "data: {}\n\n",
        json!({"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})
    )
}

#[tokio::test]
async fn anthropic_a_tool_call_cut_by_the_output_limit_is_never_run_nor_kept() {
    let s = setup().await;
    // The arguments stop mid-way, then the token limit.
    let mut frames = vec![anthropic::start(3)];
    let mut block = anthropic::tool_block(0, "toolu_1", "list_nodes", r#"{"canvas": "canv"#);
    block.pop(); // no content_block_stop: the stream stops inside the arguments
    frames.extend(block);
    frames.extend(anthropic::stop(4096, "max_tokens"));
    s.fake.script([Reply::Frames(frames)]);
    let chat = s.chat().await;
    let events = s.run(&chat, "anthropic:claude-test", "q").await;
    assert_eq!(failed_code(&events), "model_output_truncated");
    assert!(!types(&events).contains(&"tool_started".to_owned()));
    assert!(s.fake.seen("/api/").is_empty(), "the tool was not called");
    assert_eq!(
        s.fake.seen("/v1/messages").len(),
        1,
        "and nothing was sent back with it"
    );
}

#[tokio::test]
async fn openai_a_tool_call_cut_by_the_output_limit_fails_the_run_and_a_cut_text_answer_says_so() {
    let s = setup().await;
    s.fake.script([
        Reply::Frames(vec![
            openai::tool(0, "call_1", "list_nodes", r#"{"canvas": "can"#),
            openai_finish("length"),
            openai::done(),
        ]),
        Reply::Frames(vec![
            openai::text("A long answer that"),
            openai_finish("length"),
            openai::usage(5, 4096),
            openai::done(),
        ]),
    ]);
    let chat = s.chat().await;
    let events = s.run(&chat, "openai:gpt-test", "q").await;
    assert_eq!(failed_code(&events), "model_output_truncated");
    assert!(s.fake.seen("/api/").is_empty());

    let events = s.run(&chat, "openai:gpt-test", "q").await;
    let answer = answer_of(&events);
    assert_eq!(answer["output"], "A long answer that");
    assert_eq!(answer["truncated"], true);
    assert_eq!(s.latest_status(&chat).await, "completed");
}

/// What [`parked_past_the_file_limit`] saw with every stream it could open parked at the provider.
pub(super) struct Parked {
    /// The streams admitted (each reached its provider), still open.
    pub open: Vec<Events>,
    pub refused: usize,
    /// Connections to the fake provider, counted by the system.
    pub connections: usize,
    /// The provider's HTTP clients, by agentd's metrics.
    pub clients: u64,
    pub fake: FakeUpstream,
    /// The server the streams are open on.
    pub server: Agentd,
}

/// Asks `asks` times for a provider stream that stalls after its first text, on a server with `limit` descriptors
/// (128 kept in reserve: 172 for streams of 300); how many were admitted, how many refused, and the connections and
/// clients to the provider while the admitted ones were open; checks that agentd counts the streams its provider
/// clients carry as the ones open. The admitted streams are left open.
pub(super) async fn parked_past_the_file_limit(
    fake: FakeUpstream,
    asks: usize,
    limit: u32,
    extra: &[(&str, &str)],
) -> Parked {
    let stalls = (0..asks).map(|_| Reply::FramesThenStall(vec![openai::text("Hi")]));
    fake.script(stalls);
    let openai_base = format!("{}/v1", fake.base);
    let mut env = vec![
        ("JWT_SECRET", super::SECRET),
        ("AI_MODEL", "openai:gpt-test"),
        ("OPENAI_BASE_URL", openai_base.as_str()),
        ("OPENAI_API_KEY", "sk-test-key"),
    ];
    env.extend_from_slice(extra);
    let server = Agentd::spawn_with_open_file_limit(limit, &env).await;
    let secret = agentd::secret::Secret::new(super::SECRET);
    let token = agentd::auth::mint(
        &secret,
        "superplane_api",
        ORG,
        USER,
        CANVAS,
        std::time::Duration::from_secs(600),
    );
    let mut open = Vec::new();
    let mut refused = 0;
    for _ in 0..asks {
        let chat = crate::common::create_chat(&server, ORG, USER, CANVAS).await;
        let response = server
            .http
            .post(server.url(&format!("/agents/chats/{chat}/stream")))
            .bearer_auth(&token)
            .json(&json!({"question": "q"}))
            .send()
            .await
            .unwrap();
        if response.status() == 503 {
            refused += 1;
            continue;
        }
        assert_eq!(response.status(), 200);
        let mut events = Events::new(response);
        // Every admitted stream reached its provider: run_started, then the provider's first text.
        assert_eq!(events.next_data().await["type"], "run_started");
        let first = events.next_data().await;
        assert_eq!(first["type"], "model_delta", "{first}");
        open.push(events);
    }
    let connections = established_to(fake.port());
    // agentd counts the streams its provider clients carry, and the clients.
    let metrics = server.get("/metrics").await.text().await.unwrap();
    let streams = metric(&metrics, "agentd_provider_streams{provider=\"openai\"}");
    assert_eq!(streams, open.len() as u64, "{metrics}");
    Parked {
        open,
        refused,
        connections,
        clients: metric(&metrics, "agentd_provider_clients{provider=\"openai\"}"),
        fake,
        server,
    }
}

#[tokio::test]
async fn past_the_file_limit_provider_streams_are_refused_before_they_start_never_failed_after() {
    let parked = parked_past_the_file_limit(FakeUpstream::start().await, 100, 300, &[]).await;
    assert_eq!(parked.open.len(), 86, "172 descriptors, two per stream");
    assert_eq!(parked.refused, 14);
    // Over HTTP/1.1 each stream has a connection of its own, all from the lane's one client.
    assert_eq!((parked.connections, parked.clients), (86, 1));
    assert!(
        parked
            .fake
            .seen("/v1/")
            .iter()
            .all(|s| s.version == axum::http::Version::HTTP_11)
    );
}

#[tokio::test]
async fn streams_to_a_provider_over_h2c_share_its_connections_and_are_admitted_with_their_share() {
    let parked = parked_past_the_file_limit(
        FakeUpstream::start().await,
        190,
        300,
        &[("OPENAI_H2C", "1")],
    )
    .await;
    // Each stream holds its client's socket and a hundredth of a provider connection (100 streams at most on each):
    // 170 streams, 170 sockets and two connections, the 172 descriptors there are.
    assert_eq!(parked.open.len(), 170, "172 descriptors, 1.01 per stream");
    assert_eq!(parked.refused, 20);
    assert_eq!((parked.connections, parked.clients), (2, 2));
    let seen = parked.fake.seen("/v1/");
    assert_eq!(seen.len(), 170);
    assert!(
        seen.iter()
            .all(|s| s.version == axum::http::Version::HTTP_2),
        "every answer came over HTTP/2"
    );
}

/// The connections a burst opened to a provider close soon after it ends, the first one too: made anew, since its
/// tables are the burst's size.
#[tokio::test]
async fn a_bursts_connections_to_a_provider_close_once_it_is_over() {
    let mut parked = parked_past_the_file_limit(
        FakeUpstream::start().await,
        101,
        1000,
        &[("OPENAI_H2C", "1"), ("DETACH_GRACE", "0")],
    )
    .await;
    assert_eq!((parked.open.len(), parked.connections), (101, 2));
    // The clients leave: their runs are interrupted, and their provider streams end.
    parked.open.clear();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while established_to(parked.fake.port()) > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} connections to the provider left open",
            established_to(parked.fake.port())
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let metrics = parked.server.get("/metrics").await.text().await.unwrap();
    assert_eq!(
        metric(&metrics, "agentd_provider_clients{provider=\"openai\"}"),
        1,
        "a first client, made anew"
    );
}

#[tokio::test]
async fn streams_to_a_provider_past_what_one_http2_connection_carries_go_on_another() {
    // The fake's HTTP/2 connections carry at most 200 streams at a time (hyper's default): a 201st stream on one
    // would wait for one of the others to end. agentd puts at most 100 on each.
    let parked = parked_past_the_file_limit(
        FakeUpstream::start().await,
        210,
        1000,
        &[("OPENAI_H2C", "1")],
    )
    .await;
    assert_eq!(
        (parked.open.len(), parked.refused),
        (210, 0),
        "every stream reached its provider"
    );
    assert_eq!((parked.connections, parked.clients), (3, 3));
}
