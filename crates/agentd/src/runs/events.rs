//! The events of a run: the SSE contract (the README's "The SSE stream") and their numbering.
//!
//! Every event of a run has a `seq`, from 1, and its SSE id is `<run_id>:<seq>`; a client that reconnects names the
//! last id it saw. The JSON of an event is its `data:` line.

use std::cell::RefCell;
use std::sync::Arc;

use serde::Serialize;
use uuid::Uuid;

use crate::json;
use crate::model::Usage;

/// One event of the SSE protocol; serialized as the `data:` JSON of the event.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RunEvent {
    RunStarted {
        chat_id: Uuid,
        run_id: Uuid,
        model: String,
        canvas_id: Option<String>,
    },
    ModelDelta {
        content: String,
    },
    ToolStarted {
        tool_name: String,
        /// What a UI shows for the call; the same text as the history's tool entry.
        tool_label: String,
        tool_call_id: String,
        args: serde_json::Value,
    },
    ToolFinished {
        tool_name: String,
        tool_label: String,
        tool_call_id: String,
        elapsed_ms: u64,
        /// What the tool gave the model, kept in the log for a continuation elsewhere; followers never send it to
        /// clients (see `follow.rs`). Always the last field.
        #[serde(skip_serializing_if = "Option::is_none")]
        result: Option<String>,
    },
    FinalAnswer {
        /// The answer's text; with `OUTPUT_SCHEMA`, the whole validated object (its `answer` is the text).
        output: serde_json::Value,
        usage: Usage,
        /// Present (true) when the model's output token limit cut the answer.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        truncated: bool,
    },
    RunCompleted {
        elapsed_ms: u64,
    },
    RunFailed {
        error: String,
        /// The failure's stable code (see [`crate::error::ErrorCode`]).
        code: &'static str,
    },
    RunInterrupted {
        reason: &'static str,
        /// Where a client can pick the run up again, with `Last-Event-ID` set to this event's id.
        resume: String,
    },
    Done,
    /// Not part of the run (never in its log, no id): this connection ends because its replica is draining in handoff
    /// mode; the client re-attaches at `resume` with `Last-Event-ID: <last_event_id>` after `retry_ms`.
    Reconnect {
        resume: String,
        last_event_id: String,
        retry_ms: u64,
    },
}

impl RunEvent {
    /// The event's JSON, shared: what the run log stores and every follower sends. A `model_delta` whose text JSON
    /// holds as it is (no quote, backslash or control character: nearly every one) is written as it is, without the
    /// serializer, the same bytes it would write; each is written in a buffer of the thread's and copied once into
    /// its shared text.
    pub fn json(&self) -> Arc<str> {
        thread_local! {
            static TEXT: RefCell<String> = const { RefCell::new(String::new()) };
        }
        match self {
            Self::ModelDelta { content } if json::to_escape(content.as_bytes()).is_none() => {
                TEXT.with_borrow_mut(|text| {
                    text.clear();
                    text.push_str(r#"{"type":"model_delta","content":""#);
                    text.push_str(content);
                    text.push_str(r#""}"#);
                    let shared = Arc::from(text.as_str());
                    // A long delta (a continued answer's first) leaves no long buffer behind.
                    if text.capacity() > 4096 {
                        *text = String::new();
                    }
                    shared
                })
            }
            _ => serde_json::to_string(self)
                .expect("run events always serialize")
                .into(),
        }
    }
}

/// An event with its place in the run: the SSE id is `<run_id>:<seq>`, and `seq` starts at 1. Boxed, because the
/// channel to the response body allocates its slots 32 at a time per stream: 16 bytes a slot instead of ~100.
pub type Numbered = (u64, Box<RunEvent>);

/// What a client that knows no `run_interrupted` (`CLIENT_COMPAT=seed`) is told in the `run_failed` that follows it:
/// short and plain (no JSON), by the interruption's reason.
pub fn interrupted_for_seed_clients(reason: &str) -> RunEvent {
    let error = match reason {
        "cancelled" => "The answer was stopped before it was finished.",
        "detached" => "The answer was stopped because nobody was reading it. Please ask again.",
        "deleted" => "The answer was stopped because its chat was deleted.",
        "stopped" => {
            "The answer was cut off because the service stopped unexpectedly. Please ask again."
        }
        _ => "The answer was cut off because the service restarted. Please ask again.",
    };
    RunEvent::RunFailed {
        error: error.to_owned(),
        code: crate::error::ErrorCode::RunInterrupted.as_str(),
    }
}

/// The SSE id of the `seq`th event of a run.
pub fn event_id(run_id: Uuid, seq: u64) -> String {
    format!("{}{seq}", event_id_prefix(run_id))
}

/// What every event id of the run starts with: the id is this and the event's seq.
pub fn event_id_prefix(run_id: Uuid) -> String {
    format!("{run_id}:")
}

/// The path where a client re-attaches to a run.
pub fn resume_path(chat_id: Uuid, run_id: Uuid) -> String {
    format!("/agents/chats/{chat_id}/runs/{run_id}/stream")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A delta's JSON is the serializer's, byte for byte, whether it is written as it is or serialized: for text of
    /// every kind (quotes, backslashes, control characters, any character), and for text long enough to leave the
    /// thread's buffer.
    #[test]
    fn a_deltas_json_is_the_serializers() {
        let mut rng = fastrand::Rng::with_seed(3);
        let pieces = [
            "word ",
            "\"",
            "\\",
            "\n",
            "\u{1}",
            "\u{7f}",
            "é",
            "🙂",
            "</script>",
            "",
        ];
        for round in 0..2_000 {
            let mut content: String = (0..rng.usize(0..8))
                .map(|_| pieces[rng.usize(..pieces.len())])
                .collect();
            if round % 500 == 0 {
                content.push_str(&"long ".repeat(2_000));
            }
            let event = RunEvent::ModelDelta { content };
            assert_eq!(
                &*event.json(),
                serde_json::to_string(&event).unwrap(),
                "{event:?}"
            );
        }
        let other = RunEvent::RunCompleted { elapsed_ms: 5 };
        assert_eq!(&*other.json(), r#"{"type":"run_completed","elapsed_ms":5}"#);
    }
}
