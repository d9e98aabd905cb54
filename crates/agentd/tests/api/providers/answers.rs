//! Each provider's wire format: answers, tool calls and history, as the real APIs send and expect them.

use serde_json::json;

use super::{ORG, answer_of, setup};
use crate::common::upstream::{Reply, anthropic, openai};
use crate::common::{deltas, types};

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
async fn a_model_chosen_dot_segment_never_leaves_its_place_in_the_tool_url() {
    let s = setup().await;
    s.fake.script([
        Reply::Frames(vec![
            openai::tool(0, "call_up", "any_canvas_nodes", r#"{"canvas": ".."}"#),
            openai::tool(1, "call_here", "any_canvas_nodes", r#"{"canvas": "."}"#),
            openai::usage(5, 2),
            openai::done(),
        ]),
        Reply::Frames(openai::answer(&["No."], 8, 1)),
    ]);
    let chat = s.chat().await;
    s.run(&chat, "openai:gpt-test", "Look around").await;
    assert!(
        s.fake.seen("/api/").is_empty(),
        "no request left for the tool"
    );
    for call in ["call_up", "call_here"] {
        let told = s.tool_result(1, call);
        assert!(told.contains("path segment"), "{call}: {told}");
    }
}

#[tokio::test]
async fn each_run_talks_to_the_model_it_names_whichever_ran_before_it() {
    // A provider's model is made once and shared by its runs: runs of two models, in turn, on one server.
    let s = setup().await;
    let claude = |text: &str| {
        let mut frames = vec![anthropic::start(1)];
        frames.extend(anthropic::text_block(0, text));
        frames.extend(anthropic::stop(1, "end_turn"));
        Reply::Frames(frames)
    };
    s.fake.script([
        Reply::Frames(openai::answer(&["one"], 1, 1)),
        claude("two"),
        Reply::Frames(openai::answer(&["three"], 1, 1)),
        claude("four"),
    ]);
    let chat = s.chat().await;
    for (model, question, answer) in [
        ("openai:gpt-test", "First?", "one"),
        ("anthropic:claude-test", "Second?", "two"),
        ("openai:gpt-test", "Third?", "three"),
        ("anthropic:claude-test", "Fourth?", "four"),
    ] {
        let events = s.run(&chat, model, question).await;
        assert_eq!(deltas(&events), answer, "{model}");
        assert_eq!(events[0].1["model"], model, "{events:?}");
    }
    let models = |path: &str| -> Vec<String> {
        s.fake
            .seen(path)
            .iter()
            .map(|request| request.body["model"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(models("/v1/chat/completions"), ["gpt-test", "gpt-test"]);
    assert_eq!(models("/v1/messages"), ["claude-test", "claude-test"]);
}
