//! Reading runs in tests: shaping a paced run, taking events, checking a run's ids and its answer, waiting for its end.

use std::time::Duration;

use agentd::store::{RunStatus, SessionStore};
use serde_json::{Value, json};
use uuid::Uuid;

use super::{Events, PATIENCE, types};

/// A run of `n` deltas, one every `ms` milliseconds.
pub fn paced(n: u32, ms: u32) -> Value {
    json!({"question": "q", "model": format!("test:deltas={n},delay_ms={ms}")})
}

/// Reads `n` events; returns them.
pub async fn take(stream: &mut Events, n: usize) -> Vec<(String, Value)> {
    let mut events = Vec::new();
    for _ in 0..n {
        events.push(stream.next().await.expect("the stream goes on"));
    }
    events
}

pub fn run_id_of(events: &[(String, Value)]) -> String {
    events[0].1["run_id"].as_str().unwrap().to_owned()
}

/// Checks the ids are `<run>:1`, `<run>:2`, ... with no gap and no repeat, and the stream ends with one `done`.
pub fn assert_whole(run: &str, events: &[(String, Value)]) {
    for (i, (id, _)) in events.iter().enumerate() {
        assert_eq!(id, &format!("{run}:{}", i + 1), "event {i} of {events:?}");
    }
    let kinds = types(events);
    assert_eq!(kinds.iter().filter(|k| *k == "done").count(), 1);
    assert_eq!(kinds.last().unwrap(), "done");
}

pub fn final_output(events: &[(String, Value)]) -> String {
    events
        .iter()
        .find(|(_, e)| e["type"] == "final_answer")
        .expect("a final answer")
        .1["output"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Waits until the stored run has left `running`.
pub async fn ended(store: &SessionStore, run: &str) -> agentd::store::Run {
    let run: Uuid = run.parse().unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let stored = store.get_run(run).await.unwrap().unwrap();
        if stored.status != RunStatus::Running {
            return stored;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the run never ended"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
