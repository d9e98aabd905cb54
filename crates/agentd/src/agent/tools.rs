//! Tools a model may call. Built-in: `current_time`.

use std::future::Future;
use std::pin::Pin;

use serde_json::{Value, json};

use crate::model::ToolDefinition;

/// What a tool call gives back to the model: a JSON answer, or an error message the model can read.
pub type ToolResult = Result<Value, String>;

pub trait Tool: Send + Sync {
    fn definition(&self) -> ToolDefinition;
    fn call(&self, args: Value) -> Pin<Box<dyn Future<Output = ToolResult> + Send + '_>>;
}

/// The built-in tool of this name, if any.
pub fn builtin(name: &str) -> Option<&'static dyn Tool> {
    match name {
        "current_time" => Some(&CurrentTime),
        _ => None,
    }
}

/// Every built-in tool, offered to the model on each run.
pub fn builtins() -> Vec<&'static dyn Tool> {
    vec![&CurrentTime]
}

/// Tells the model the current UTC time; harmless and offline.
struct CurrentTime;

impl Tool for CurrentTime {
    fn definition(&self) -> ToolDefinition {
        ToolDefinition {
            name: "current_time".to_owned(),
            description: "The current date and time in UTC (RFC 3339).".to_owned(),
            parameters: json!({"type": "object", "properties": {}, "additionalProperties": false}),
        }
    }

    fn call(&self, _args: Value) -> Pin<Box<dyn Future<Output = ToolResult> + Send + '_>> {
        Box::pin(async {
            let now = time::OffsetDateTime::now_utc();
            let utc = now
                .format(&time::format_description::well_known::Rfc3339)
                .map_err(|e| format!("could not format the time: {e}"))?;
            Ok(json!({ "utc": utc }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn current_time_answers_an_rfc3339_utc_time() {
        let answer = builtin("current_time")
            .unwrap()
            .call(json!({}))
            .await
            .unwrap();
        let utc = answer["utc"].as_str().unwrap();
        assert!(
            time::OffsetDateTime::parse(utc, &time::format_description::well_known::Rfc3339)
                .is_ok()
        );
        assert!(builtin("nope").is_none());
    }
}
