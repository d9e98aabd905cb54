//! The seed's clients: a stand-in that, like the seed's web client, knows only the seed's event types and drops the
//! others. With `CLIENT_COMPAT=seed`, an interrupted run is never a silent cut for it.

use serde_json::{Value, json};

use crate::common::upstream::FakeUpstream;
use crate::common::{Agentd, Events};

/// The event types the seed's web client handles; it drops any other.
const SEED_TYPES: [&str; 8] = [
    "run_started",
    "model_delta",
    "tool_started",
    "tool_finished",
    "final_answer",
    "run_completed",
    "run_failed",
    "done",
];

/// What the seed's client shows for a stream: the answer text, and the error line if any.
fn seed_client(events: &[(String, Value)]) -> (String, Option<String>) {
    let mut text = String::new();
    let mut error = None;
    for (_, event) in events {
        let kind = event["type"].as_str().unwrap_or_default();
        if !SEED_TYPES.contains(&kind) {
            continue;
        }
        match kind {
            "model_delta" => text.push_str(event["content"].as_str().unwrap()),
            "run_failed" => error = Some(event["error"].as_str().unwrap().to_owned()),
            _ => {}
        }
    }
    (text, error)
}

fn long_run() -> Value {
    json!({"question": "q", "model": "test:deltas=1000,delay_ms=20"})
}

/// Reads until `n` deltas arrived; returns the events so far and the run id.
async fn some_deltas(stream: &mut Events, n: usize) -> (Vec<(String, Value)>, String) {
    let mut events = Vec::new();
    while events
        .iter()
        .filter(|(_, e): &&(String, Value)| e["type"] == "model_delta")
        .count()
        < n
    {
        events.push(stream.next().await.expect("the stream goes on"));
    }
    let run = events[0].1["run_id"].as_str().unwrap().to_owned();
    (events, run)
}

/// The stream of a run cancelled mid-answer, as a client sees it.
async fn cancelled(server: &Agentd) -> Vec<(String, Value)> {
    let chat = crate::common::new_chat();
    let mut stream = server.stream(&chat, long_run()).await;
    let (mut events, run) = some_deltas(&mut stream, 3).await;
    assert_eq!(server.cancel(&chat, &run).await.status(), 202);
    events.extend(stream.rest().await);
    events
}

fn assert_plain_and_short(error: &str) {
    assert!(
        error.chars().count() <= 200 && !error.contains('{'),
        "{error}"
    );
}

#[tokio::test]
async fn without_the_setting_a_seed_client_shows_an_interrupted_run_as_complete() {
    let server = Agentd::spawn(&[]).await;
    let (text, error) = seed_client(&cancelled(&server).await);
    assert!(!text.is_empty());
    assert_eq!(error, None, "the silent cut CLIENT_COMPAT=seed exists for");
}

#[tokio::test]
async fn with_client_compat_seed_a_cancelled_run_shows_an_error_line() {
    let server = Agentd::spawn(&[("CLIENT_COMPAT", "seed")]).await;
    let events = cancelled(&server).await;
    let kinds: Vec<&str> = events
        .iter()
        .map(|(_, e)| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        &kinds[kinds.len() - 3..],
        ["run_interrupted", "run_failed", "done"]
    );
    assert_eq!(events[events.len() - 2].1["code"], "run_interrupted");
    let (text, error) = seed_client(&events);
    assert!(!text.is_empty());
    assert_plain_and_short(&error.expect("an error line"));
}

#[tokio::test]
async fn with_client_compat_seed_a_run_cut_by_the_drain_deadline_shows_an_error_line() {
    let mut server = Agentd::spawn(&[
        ("CLIENT_COMPAT", "seed"),
        ("DRAIN_TIMEOUT", "0.5"),
        ("SHUTDOWN_TIMEOUT", "10"),
    ])
    .await;
    let mut stream = server.stream(&crate::common::new_chat(), long_run()).await;
    let (mut events, _) = some_deltas(&mut stream, 3).await;
    server.signal("TERM");
    events.extend(stream.rest().await);
    let interrupted = events
        .iter()
        .find(|(_, e)| e["type"] == "run_interrupted")
        .unwrap();
    assert_eq!(interrupted.1["reason"], "shutdown");
    let (_, error) = seed_client(&events);
    let error = error.expect("an error line");
    assert_plain_and_short(&error);
    assert!(error.contains("restarted"), "{error}");
    assert!(server.exit_status().await.success());
}

#[tokio::test]
async fn client_compat_seed_refuses_handoff_mode_whose_reconnect_the_seed_cannot_follow() {
    let (status, stderr) = Agentd::run_to_exit(&[
        ("CLIENT_COMPAT", "seed"),
        ("SHUTDOWN_MODE", "handoff"),
        ("DRAIN_TIMEOUT", "5"),
        ("SHUTDOWN_TIMEOUT", "10"),
    ])
    .await;
    assert_eq!(status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("SHUTDOWN_MODE=drain"), "{stderr}");
}

#[tokio::test]
async fn agent_context_is_checked_and_its_canvas_version_reaches_the_tools() {
    let fake = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let tools = dir.path().join("tools.yaml");
    let yaml = format!(
        "tools:\n  - name: canvas_nodes\n    description: The nodes of the canvas version shown.\n    \
         url: \"{}/api/canvases/{{context.canvas_version}}/nodes\"\n",
        fake.base
    );
    std::fs::write(&tools, yaml).unwrap();
    let server = Agentd::spawn(&[("TOOLS_FILE", tools.to_str().unwrap())]).await;

    // Refused as the seed refused it, with the field named.
    let refused = server
        .ask(
            &crate::common::new_chat(),
            json!({"question": "q", "agent_context": {"mode": "inspect", "canvas_version": "v1", "x": 1}}),
        )
        .await;
    assert_eq!(refused.status(), 422);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(
        body["detail"][0]["loc"],
        json!(["body", "agent_context", "x"])
    );
    assert_eq!(body["detail"][0]["type"], "extra_forbidden");

    // A run in build mode: its tool reads the canvas version from the context, not from the model.
    let events = server
        .stream(
            &crate::common::new_chat(),
            json!({
                "question": "q",
                "model": "test:deltas=2,tool=canvas_nodes",
                "agent_context": {"enabled": true, "mode": "build", "canvas_version": "v42"},
            }),
        )
        .await
        .rest()
        .await;
    assert!(events.iter().any(|(_, e)| e["type"] == "tool_finished"));
    let seen = fake.seen("/api/canvases/");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/api/canvases/v42/nodes");
}
