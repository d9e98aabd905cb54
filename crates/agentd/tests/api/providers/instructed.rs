//! An agent you can instruct: the system prompt (`AGENT_INSTRUCTIONS`) each provider receives, and a structured final
//! answer (`OUTPUT_SCHEMA`) whose `answer` streams as it is generated.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{CANVAS, ORG, Setup, answer_of, setup_with};
use crate::common::upstream::{Reply, anthropic, openai};
use crate::common::{Agentd, deltas, types};

const INSTRUCTIONS: &str = "You build workflows for {org_id} on canvas {canvas_id}.\n\
Mode: {context.mode}; canvas version: {context.canvas_version}.";

const SCHEMA: &str = r#"{"type": "object", "required": ["answer", "proposal"], "additionalProperties": false,
  "properties": {"answer": {"type": "string"}, "proposal": {"type": ["object", "null"]}}}"#;

/// A setup with instructions and an output schema, in files that live as long as it does.
async fn instructed() -> (Setup, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let instructions = dir.path().join("instructions.md");
    let schema = dir.path().join("schema.json");
    std::fs::write(&instructions, INSTRUCTIONS).unwrap();
    std::fs::write(&schema, SCHEMA).unwrap();
    let setup = setup_with(&[
        ("AGENT_INSTRUCTIONS", instructions.to_str().unwrap()),
        ("OUTPUT_SCHEMA", schema.to_str().unwrap()),
    ])
    .await;
    (setup, dir)
}

/// Asks with an `agent_context` in build mode; returns every event with the time it arrived.
async fn ask_timed(s: &Setup, chat: &str, model: &str) -> Vec<(Instant, (String, Value))> {
    let body = json!({"question": "Add a step", "model": model,
        "agent_context": {"enabled": true, "mode": "build", "canvas_version": "v9"}});
    let response = s
        .server
        .http
        .post(s.server.url(&format!("/agents/chats/{chat}/stream")))
        .bearer_auth(&s.token)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut events = crate::common::Events::new(response);
    let mut timed = Vec::new();
    while let Some(event) = events.next().await {
        timed.push((Instant::now(), event));
    }
    timed
}

fn rendered() -> String {
    format!("You build workflows for {ORG} on canvas {CANVAS}.\nMode: build; canvas version: v9.")
}

/// The structured answer `{"answer": <pieces joined>, "proposal": {...}}` as OpenAI content frames, one per piece.
fn openai_json_frames(pieces: &[String]) -> Vec<String> {
    let mut frames = vec![openai::text("{\"answer\": \"")];
    frames.extend(pieces.iter().map(|p| openai::text(p)));
    frames.push(openai::text("\", \"proposal\": {\"steps\": 1}}"));
    frames.push(openai::usage(20, 55));
    frames.push(openai::done());
    frames
}

#[tokio::test]
async fn openai_gets_the_instructions_and_the_schema_and_the_answer_streams_as_it_is_written() {
    let (s, _files) = instructed().await;
    let pieces: Vec<String> = (0..50).map(|i| format!("word{i} ")).collect();
    s.fake.script([Reply::Paced(
        openai_json_frames(&pieces),
        Duration::from_millis(100),
    )]);
    let chat = s.chat().await;
    let timed = ask_timed(&s, &chat, "openai:gpt-test").await;
    let events: Vec<(String, Value)> = timed.iter().map(|(_, e)| e.clone()).collect();

    // The answer streamed as the model wrote it: many deltas, spread over the five seconds.
    let at: Vec<Instant> = timed
        .iter()
        .filter(|(_, (_, e))| e["type"] == "model_delta")
        .map(|(t, _)| *t)
        .collect();
    assert!(at.len() >= 40, "{} deltas", at.len());
    assert!(
        at[at.len() - 1] - at[0] >= Duration::from_secs(3),
        "{:?}",
        at[at.len() - 1] - at[0]
    );
    let output = &answer_of(&events)["output"];
    assert_eq!(output["proposal"], json!({"steps": 1}));
    assert_eq!(deltas(&events), output["answer"].as_str().unwrap());
    assert_eq!(deltas(&events), pieces.concat());

    let request = &s.fake.seen("/v1/chat/completions")[0].body;
    assert_eq!(
        request["messages"][0],
        json!({"role": "system", "content": rendered()})
    );
    assert_eq!(request["response_format"]["type"], "json_schema");
    assert_eq!(
        request["response_format"]["json_schema"]["schema"]["required"],
        json!(["answer", "proposal"])
    );
}

#[tokio::test]
async fn anthropic_gets_the_instructions_as_system_and_answers_through_the_final_answer_tool() {
    let (s, _files) = instructed().await;
    let answer = json!({"answer": "Added a step that waits.", "proposal": null}).to_string();
    let mut frames = vec![anthropic::start(30)];
    frames.extend(anthropic::tool_block(0, "toolu_1", "final_answer", &answer));
    frames.extend(anthropic::stop(12, "tool_use"));
    s.fake.script([Reply::Frames(frames)]);
    let chat = s.chat().await;
    let events: Vec<(String, Value)> = ask_timed(&s, &chat, "anthropic:claude-test")
        .await
        .into_iter()
        .map(|(_, e)| e)
        .collect();
    assert!(
        !types(&events).contains(&"tool_started".to_owned()),
        "the answer is no tool call"
    );
    assert_eq!(deltas(&events), "Added a step that waits.");
    assert_eq!(
        answer_of(&events)["output"],
        json!({"answer": "Added a step that waits.", "proposal": null})
    );

    let request = &s.fake.seen("/v1/messages")[0].body;
    assert_eq!(request["system"], rendered());
    assert_eq!(request["tool_choice"], json!({"type": "any"}));
    let final_tool = request["tools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "final_answer")
        .expect("the final_answer tool");
    assert_eq!(
        final_tool["input_schema"]["required"],
        json!(["answer", "proposal"])
    );
}

#[tokio::test]
async fn an_answer_that_does_not_match_gets_one_repair_round_then_fails_with_its_code() {
    let (s, _files) = instructed().await;
    let wrong = |text: &str| {
        vec![
            openai::text(&json!({"answer": text}).to_string()),
            openai::usage(5, 5),
            openai::done(),
        ]
    };
    let right = vec![
        openai::text(&json!({"answer": "Fixed.", "proposal": null}).to_string()),
        openai::usage(5, 5),
        openai::done(),
    ];
    // Repaired: the second answer matches.
    s.fake
        .script([Reply::Frames(wrong("Fixed.")), Reply::Frames(right)]);
    let chat = s.chat().await;
    let events: Vec<(String, Value)> = ask_timed(&s, &chat, "openai:gpt-test")
        .await
        .into_iter()
        .map(|(_, e)| e)
        .collect();
    assert_eq!(answer_of(&events)["output"]["answer"], "Fixed.");
    let repair = &s.fake.seen("/v1/chat/completions")[1].body["messages"];
    let last = &repair.as_array().unwrap().last().unwrap()["content"];
    assert!(last.as_str().unwrap().contains("does not match"), "{last}");

    // Not repaired: the run fails with a code.
    s.fake
        .script([Reply::Frames(wrong("a")), Reply::Frames(wrong("b"))]);
    let chat = s.chat().await;
    let events: Vec<(String, Value)> = ask_timed(&s, &chat, "openai:gpt-test")
        .await
        .into_iter()
        .map(|(_, e)| e)
        .collect();
    let failed = events
        .iter()
        .find(|(_, e)| e["type"] == "run_failed")
        .expect("run_failed");
    assert_eq!(failed.1["code"], "invalid_output");
}

#[tokio::test]
async fn the_test_model_honours_the_instructions_and_the_schema_offline() {
    let dir = tempfile::tempdir().unwrap();
    let instructions = dir.path().join("instructions.yaml");
    std::fs::write(
        &instructions,
        "instructions: |\n  Be brief on {canvas_id}.\n",
    )
    .unwrap();
    let schema = dir.path().join("schema.json");
    std::fs::write(&schema, r#"{"type": "object", "required": ["answer"], "properties": {"answer": {"type": "string"}}}"#)
        .unwrap();
    let server = Agentd::spawn(&[
        ("AGENT_INSTRUCTIONS", instructions.to_str().unwrap()),
        ("OUTPUT_SCHEMA", schema.to_str().unwrap()),
    ])
    .await;
    let events = server
        .stream(
            &crate::common::new_chat(),
            json!({"question": "q", "model": "test:echo=1"}),
        )
        .await
        .rest()
        .await;
    assert_eq!(deltas(&events), "Be brief on dev-canvas.");
    assert_eq!(
        answer_of(&events)["output"],
        json!({"answer": "Be brief on dev-canvas."})
    );

    // A template with an unknown placeholder, or a schema without a string answer, refuses the start.
    std::fs::write(&instructions, "instructions: Hello {who}\n").unwrap();
    let (status, stderr) =
        Agentd::run_to_exit(&[("AGENT_INSTRUCTIONS", instructions.to_str().unwrap())]).await;
    assert_eq!(status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("unknown placeholder {who}"), "{stderr}");
    std::fs::write(&schema, r#"{"type": "object"}"#).unwrap();
    let (status, stderr) =
        Agentd::run_to_exit(&[("OUTPUT_SCHEMA", schema.to_str().unwrap())]).await;
    assert_eq!(status.code(), Some(64), "{stderr}");
}
