//! Real model providers and tools, against a local fake provider that speaks each real streaming wire format.

use std::time::Duration;

use crate::common::upstream::FakeUpstream;
use crate::common::{Agentd, Events};
use agentd::auth;
use agentd::grpc::proto::agents_client::AgentsClient;
use agentd::grpc::proto::{
    CreateAgentChatRequest, DescribeAgentChatRequest, DescribeOrganizationAgentUsageRequest,
};
use agentd::secret::Secret;
use serde_json::{Value, json};

const SECRET: &str = "provider-tests-secret-of-at-least-32-bytes";
const ORG: &str = "acme";
const USER: &str = "alice";
const CANVAS: &str = "canvas-1";

pub(super) struct Setup {
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
  - name: any_canvas_nodes
    description: The nodes of any canvas, by a name the model chooses.
    url: "{base}/api/canvases/{{canvas}}/nodes"
    parameters:
      type: object
      required: [canvas]
      properties:
        canvas: {{type: string}}
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
    setup_with(&[]).await
}

/// The setup, with more settings.
async fn setup_with(extra: &[(&str, &str)]) -> Setup {
    setup_on(FakeUpstream::start().await, extra).await
}

/// The setup, with `fake` as the provider and more settings.
async fn setup_on(fake: FakeUpstream, extra: &[(&str, &str)]) -> Setup {
    let tools = tools_file(&fake);
    let tools_path = tools.path().join("tools.yaml");
    let openai_base = format!("{}/v1", fake.base);
    let mut env = vec![
        ("JWT_SECRET", SECRET),
        ("OPENAI_BASE_URL", openai_base.as_str()),
        ("OPENAI_API_KEY", "sk-test-key"),
        ("ANTHROPIC_BASE_URL", fake.base.as_str()),
        ("ANTHROPIC_API_KEY", "ak-test-key"),
        ("AI_MODEL", "openai:gpt-test"),
        ("AI_MODELS", "openai:gpt-test,anthropic:claude-test"),
        ("MODEL_IDLE_TIMEOUT", "1"),
        // A client that leaves stops its run at once here; the run log's own tests cover the grace.
        ("DETACH_GRACE", "0"),
        ("TOOLS_FILE", tools_path.to_str().unwrap()),
    ];
    env.extend_from_slice(extra);
    let server = Agentd::spawn(&env).await;
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

mod answers;
mod failures;
mod instructed;
mod tls;
