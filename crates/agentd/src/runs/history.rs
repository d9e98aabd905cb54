//! A chat's history as a UI shows it: prompts as `user`, answer text as `assistant`, each tool call as one `tool`
//! entry with a readable label; tool results are folded into their call. The gRPC API and the HTTP history route
//! both show this view.

use serde::Serialize;
use time::OffsetDateTime;

use crate::model::Message;
use crate::store::StoredMessage;

/// One line of the history.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    /// `<message index>-<part>`: stable across reloads.
    pub id: String,
    /// `user`, `assistant` or `tool`.
    pub role: &'static str,
    pub content: String,
    /// The tool call's id (`tool` entries), else "".
    pub tool_call_id: String,
    /// `completed` for a tool call, else "".
    pub tool_status: &'static str,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// How a tool call reads in a UI ("Used tool current time"): in the history and on the `tool_started` and
/// `tool_finished` events alike.
pub fn tool_label(tool_name: &str) -> String {
    format!("Used tool {}", tool_name.replace('_', " "))
}

/// The entries of `messages`, in order.
pub fn entries(messages: &[StoredMessage]) -> Vec<Entry> {
    let mut flat = Vec::new();
    for stored in messages {
        let entry = |part: usize,
                     role: &'static str,
                     content: String,
                     tool_call_id: String,
                     tool_status: &'static str| Entry {
            id: format!("{}-{part}", stored.index),
            role,
            content,
            tool_call_id,
            tool_status,
            created_at: stored.created_at,
        };
        match &stored.message {
            Message::User { content } => {
                flat.push(entry(0, "user", content.clone(), String::new(), ""))
            }
            Message::Assistant {
                content,
                tool_calls,
            } => {
                for (i, call) in tool_calls.iter().enumerate() {
                    let label = tool_label(&call.name);
                    flat.push(entry(i + 1, "tool", label, call.id.clone(), "completed"));
                }
                if !content.is_empty() {
                    flat.push(entry(0, "assistant", content.clone(), String::new(), ""));
                }
            }
            Message::ToolResult { .. } => {}
        }
    }
    flat
}
