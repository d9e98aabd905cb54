//! Real model providers and tools, against a local fake provider that speaks each real streaming wire format.

use std::time::Duration;

use crate::common::upstream::{FakeUpstream, Reply, anthropic, openai};
use crate::common::{Agentd, Events, deltas, types};
use agentd::auth;
use agentd::grpc::proto::agents_client::AgentsClient;
use agentd::grpc::proto::{
    CreateAgentChatRequest, DescribeAgentChatRequest, DescribeOrganizationAgentUsageRequest,
};
use agentd::secret::Secret;
use serde_json::{Value, json};

const SECRET: &str = "provider-tests-secret";
const ORG: &str = "acme";
const USER: &str = "alice";
const CANVAS: &str = "canvas-1";

struct Setup {
    server: Agentd,
    fake: FakeUpstream,
    token: String,
    _tools: tempfile::TempDir,
}

fn tools_file(fake: &FakeUpstream) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let base = &fake.base;
    let yaml = format!(
        r#"tools:
  - name: list_nodes
    description: The nodes of a canvas.
    url: "{base}/api/canvases/{{canvas}}/nodes"
    query: [limit]
    parameters:
      type: object
      required: [canvas]
      properties:
        canvas: {{type: string, pattern: "^canvas-[0-9]+$"}}
        limit: {{type: integer, minimum: 1}}
  - name: together_a
    description: Answers only alongside together_b.
    url: "{base}/api/together/a"
  - name: together_b
    description: Answers only alongside together_a.
    url: "{base}/api/together/b"
  - name: broken
    description: Always fails.
    url: "{base}/api/broken"
  - name: slow
    description: Takes too long.
    url: "{base}/api/slow"
    timeout_ms: 300
"#
    );
    std::fs::write(dir.path().join("tools.yaml"), yaml).unwrap();
    dir
}

async fn setup() -> Setup {
    let fake = FakeUpstream::start().await;
    let tools = tools_file(&fake);
    let tools_path = tools.path().join("tools.yaml");
    let server = Agentd::spawn(&[
        ("JWT_SECRET", SECRET),
        ("OPENAI_BASE_URL", &format!("{}/v1", fake.base)),
        ("OPENAI_API_KEY", "sk-test-key"),
        ("ANTHROPIC_BASE_URL", &fake.base),
        ("ANTHROPIC_API_KEY", "ak-test-key"),
        ("AI_MODELS", "openai:gpt-test,anthropic:claude-test"),
        ("MODEL_IDLE_TIMEOUT", "1"),
        ("TOOLS_FILE", tools_path.to_str().unwrap()),
    ])
    .await;
    let secret = Secret::new(SECRET);
    let token = auth::mint(
        &secret,
        "superplane_api",
        ORG,
        USER,
        CANVAS,
        Duration::from_secs(600),
    );
    Setup {
        server,
        fake,
        token,
        _tools: tools,
    }
}

impl Setup {
    async fn chat(&self) -> String {
        let mut grpc = AgentsClient::connect(self.server.grpc.clone())
            .await
            .unwrap();
        let request = CreateAgentChatRequest {
            org_id: ORG.into(),
            canvas_id: CANVAS.into(),
            user_id: USER.into(),
        };
        grpc.create_agent_chat(request)
            .await
            .unwrap()
            .into_inner()
            .chat
            .unwrap()
            .id
    }

    async fn ask(&self, chat: &str, model: &str, question: &str) -> reqwest::Response {
        self.server
            .http
            .post(self.server.url(&format!("/agents/chats/{chat}/stream")))
            .bearer_auth(&self.token)
            .json(&json!({"question": question, "model": model}))
            .send()
            .await
            .unwrap()
    }

    async fn run(&self, chat: &str, model: &str, question: &str) -> Vec<(String, Value)> {
        let response = self.ask(chat, model, question).await;
        assert_eq!(response.status(), 200);
        Events::new(response).rest().await
    }

    /// What the model was told of tool call `id`, in the `request`th request it got (from 0).
    fn tool_result(&self, request: usize, id: &str) -> String {
        let messages = &self.fake.seen("/v1/chat/completions")[request].body["messages"];
        messages
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["tool_call_id"] == id)
            .unwrap()["content"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn latest_status(&self, chat: &str) -> String {
        let mut grpc = AgentsClient::connect(self.server.grpc.clone())
            .await
            .unwrap();
        let request = DescribeAgentChatRequest {
            org_id: ORG.into(),
            canvas_id: CANVAS.into(),
            user_id: USER.into(),
            chat_id: chat.into(),
        };
        grpc.describe_agent_chat(request)
            .await
            .unwrap()
            .into_inner()
            .chat
            .unwrap()
            .latest_run_status
    }

    async fn org_usage(&self) -> (i64, i64, i64) {
        let mut grpc = AgentsClient::connect(self.server.grpc.clone())
            .await
            .unwrap();
        let request = DescribeOrganizationAgentUsageRequest { org_id: ORG.into() };
        let usage = grpc
            .describe_organization_agent_usage(request)
            .await
            .unwrap()
            .into_inner()
            .usage
            .unwrap();
        (
            usage.total_input_tokens,
            usage.total_output_tokens,
            usage.total_tokens,
        )
    }
}

fn answer_of(events: &[(String, Value)]) -> &Value {
    &events
        .iter()
        .find(|(_, e)| e["type"] == "final_answer")
        .expect("a final answer")
        .1
}

#[tokio::test]
async fn openai_a_plain_answer_streams_as_deltas_with_its_usage() {
    let s = setup().await;
    s.fake.script([Reply::Frames(openai::answer(
        &["Hel", "lo ", "there"],
        11,
        7,
    ))]);
    let chat = s.chat().await;
    let events = s.run(&chat, "openai:gpt-test", "Say hello").await;
    assert_eq!(
        types(&events),
        [
            "run_started",
            "model_delta",
            "model_delta",
            "model_delta",
            "final_answer",
            "run_completed",
            "done"
        ]
    );
    assert_eq!(deltas(&events), "Hello there");
    assert_eq!(
        answer_of(&events)["usage"],
        json!({"input_tokens": 11, "output_tokens": 7, "total_tokens": 18})
    );

    let request = &s.fake.seen("/v1/chat/completions")[0];
    assert_eq!(request.headers["authorization"], "Bearer sk-test-key");
    assert_eq!(request.body["model"], "gpt-test");
    assert_eq!(request.body["stream"], true);
    assert_eq!(
        request.body["messages"],
        json!([{"role": "user", "content": "Say hello"}])
    );
    let tools: Vec<&str> = request.body["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"]["name"].as_str().unwrap())
        .collect();
    assert!(
        tools.contains(&"current_time") && tools.contains(&"list_nodes"),
        "{tools:?}"
    );
    assert_eq!(s.org_usage().await, (11, 7, 18));
}

#[tokio::test]
async fn openai_two_tool_calls_run_concurrently_and_the_model_answers_after_them() {
    let s = setup().await;
    s.fake.script([
        Reply::Frames(vec![
            openai::tool(0, "call_a", "together_a", "{}"),
            openai::tool(1, "call_b", "together_b", ""),
            openai::usage(10, 5),
            openai::done(),
        ]),
        Reply::Frames(openai::answer(&["Both ", "answered."], 20, 3)),
    ]);
    let chat = s.chat().await;
    let events = s.run(&chat, "openai:gpt-test", "Call both").await;
    let kinds = types(&events);
    assert_eq!(kinds[1..3], ["tool_started", "tool_started"]);
    assert_eq!(kinds[3..5], ["tool_finished", "tool_finished"]);
    assert_eq!(deltas(&events), "Both answered.");
    assert_eq!(answer_of(&events)["usage"]["input_tokens"], 30);
    assert_eq!(answer_of(&events)["usage"]["output_tokens"], 8);

    // Each tool answered only because the other was running at the same time.
    let second = &s.fake.seen("/v1/chat/completions")[1].body["messages"];
    let results: Vec<&str> = second
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "tool")
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(results.len(), 2);
    assert!(
        results.iter().all(|r| r.contains("together")),
        "{results:?}"
    );
    // The tools acted for the caller.
    for call in s.fake.seen("/api/together") {
        assert_eq!(call.headers["authorization"], format!("Bearer {}", s.token));
        assert_eq!(call.headers["x-organization-id"], ORG);
    }
    assert_eq!(s.org_usage().await, (30, 8, 38));
    assert_eq!(s.latest_status(&chat).await, "completed");
}

#[tokio::test]
async fn anthropic_answers_and_round_trips_a_tool_call_then_gets_the_history_in_its_format() {
    let s = setup().await;
    let mut first = vec![anthropic::start(12)];
    first.extend(anthropic::text_block(0, "Checking."));
    first.extend(anthropic::tool_block(
        1,
        "toolu_1",
        "list_nodes",
        r#"{"canvas": "canvas-1", "limit": 5}"#,
    ));
    first.extend(anthropic::stop(9, "tool_use"));
    let mut second = vec![anthropic::start(30)];
    second.extend(anthropic::text_block(0, "Two nodes."));
    second.extend(anthropic::stop(4, "end_turn"));
    let mut third = vec![anthropic::start(40)];
    third.extend(anthropic::text_block(0, "Still two."));
    third.extend(anthropic::stop(3, "end_turn"));
    s.fake.script([
        Reply::Frames(first),
        Reply::Frames(second),
        Reply::Frames(third),
    ]);

    let chat = s.chat().await;
    let events = s
        .run(&chat, "anthropic:claude-test", "What is on my canvas?")
        .await;
    assert_eq!(
        types(&events),
        [
            "run_started",
            "model_delta",
            "tool_started",
            "tool_finished",
            "model_delta",
            "final_answer",
            "run_completed",
            "done"
        ]
    );
    assert_eq!(
        events[2].1["args"],
        json!({"canvas": "canvas-1", "limit": 5})
    );
    assert_eq!(answer_of(&events)["output"], "Checking.Two nodes.");
    assert_eq!(answer_of(&events)["usage"]["total_tokens"], 12 + 9 + 30 + 4);

    let requests = s.fake.seen("/v1/messages");
    assert_eq!(requests[0].headers["x-api-key"], "ak-test-key");
    assert_eq!(requests[0].headers["anthropic-version"], "2023-06-01");
    assert_eq!(requests[0].body["model"], "claude-test");
    let nodes = s.fake.seen("/api/canvases/canvas-1/nodes");
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].headers["x-organization-id"], ORG);

    // The second run of the chat sends the first exchange, tool call and result included, as Anthropic messages.
    s.run(&chat, "anthropic:claude-test", "And now?").await;
    let history = &s.fake.seen("/v1/messages")[2].body["messages"];
    let roles: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user", "assistant", "user", "assistant", "user"]);
    assert_eq!(
        history[1]["content"][0],
        json!({"type": "text", "text": "Checking."})
    );
    assert_eq!(history[1]["content"][1]["type"], "tool_use");
    assert_eq!(
        history[1]["content"][1]["input"],
        json!({"canvas": "canvas-1", "limit": 5})
    );
    assert_eq!(history[2]["content"][0]["type"], "tool_result");
    assert_eq!(history[2]["content"][0]["tool_use_id"], "toolu_1");
    assert!(
        history[2]["content"][0]["content"]
            .as_str()
            .unwrap()
            .contains("finish")
    );
    assert_eq!(history[3]["content"][0]["text"], "Two nodes.");
    assert_eq!(history[4]["content"][0]["text"], "And now?");
}

#[tokio::test]
async fn openai_history_includes_tool_calls_and_results_in_its_format() {
    let s = setup().await;
    s.fake.script([
        Reply::Frames(vec![
            openai::tool(0, "call_1", "current_time", "{}"),
            openai::usage(5, 2),
            openai::done(),
        ]),
        Reply::Frames(openai::answer(&["Noon."], 8, 1)),
        Reply::Frames(openai::answer(&["Later."], 9, 1)),
    ]);
    let chat = s.chat().await;
    s.run(&chat, "openai:gpt-test", "Time?").await;
    s.run(&chat, "openai:gpt-test", "And now?").await;
    let history = &s.fake.seen("/v1/chat/completions")[2].body["messages"];
    let roles: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user", "assistant", "tool", "assistant", "user"]);
    assert_eq!(history[1]["tool_calls"][0]["id"], "call_1");
    assert_eq!(
        history[1]["tool_calls"][0]["function"]["name"],
        "current_time"
    );
    assert_eq!(history[2]["tool_call_id"], "call_1");
    assert!(history[2]["content"].as_str().unwrap().contains("utc"));
    assert_eq!(history[3]["content"], "Noon.");
}

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
    assert_eq!(ended["outcome"], "disconnected");
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
