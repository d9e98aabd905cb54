//! The Anthropic Messages stream (`POST {ANTHROPIC_BASE_URL}/v1/messages` with `stream: true`).
//!
//! Events: `message_start` (input tokens), `content_block_start` (a text block, or a `tool_use` block with its id and
//! name), `content_block_delta` (`text_delta`, or `input_json_delta` pieces of the tool's input), `content_block_stop`,
//! `message_delta` (output tokens), `message_stop`, `ping`, and `error`. Tool results go back as `tool_result` blocks
//! in a user message; consecutive messages of one role are merged, as the API requires alternating roles.

use std::collections::BTreeMap;

use crate::sse::Event;
use serde_json::{Value, json};

use super::upstream::{self, Providers, Ready, WireParser};
use super::{
    FINAL_ANSWER_TOOL, Message, Model, ModelError, ModelEvent, ModelRequest, ModelStream, ToolCall,
    Usage,
};

const PROVIDER: &str = "the Anthropic model provider";
pub const API_VERSION: &str = "2023-06-01";
/// Longest answer asked for; the Messages API requires a bound.
const MAX_TOKENS: u32 = 4096;

#[derive(Debug, Clone)]
pub struct Anthropic {
    pub model: String,
    pub providers: Providers,
}

/// The request body, in the provider's own format.
pub fn body(model: &str, request: &ModelRequest) -> Value {
    let mut messages: Vec<Value> = Vec::new();
    for message in &request.messages {
        let (role, blocks) = match message {
            Message::User { content } => ("user", vec![json!({"type": "text", "text": content})]),
            Message::Assistant {
                content,
                tool_calls,
            } => {
                let mut blocks = Vec::new();
                if !content.is_empty() {
                    blocks.push(json!({"type": "text", "text": content}));
                }
                blocks.extend(tool_calls.iter().map(
                    |c| json!({"type": "tool_use", "id": c.id, "name": c.name, "input": c.args}),
                ));
                ("assistant", blocks)
            }
            Message::ToolResult {
                tool_call_id,
                content,
            } => (
                "user",
                vec![
                    json!({"type": "tool_result", "tool_use_id": tool_call_id, "content": content}),
                ],
            ),
        };
        if blocks.is_empty() {
            continue;
        }
        match messages.last_mut() {
            Some(last) if last["role"] == role => {
                last["content"]
                    .as_array_mut()
                    .expect("content is a list")
                    .extend(blocks);
            }
            _ => messages.push(json!({"role": role, "content": blocks})),
        }
    }
    // An answer cut when its producer was lost is the last turn: Anthropic continues a prefilled assistant turn,
    // which must not end with whitespace.
    if let Some(last) = messages.last_mut()
        && last["role"] == "assistant"
        && let Some(Value::Object(block)) =
            last["content"].as_array_mut().and_then(|b| b.last_mut())
        && block.get("type") == Some(&json!("text"))
        && let Some(Value::String(text)) = block.get_mut("text")
    {
        let trimmed = text.trim_end().len();
        text.truncate(trimmed);
    }
    let mut body = json!({
        "model": model,
        "max_tokens": MAX_TOKENS,
        "messages": messages,
        "stream": true,
    });
    if let Some(system) = &request.system {
        body["system"] = json!(system);
    }
    let mut tools: Vec<Value> = request
        .tools
        .iter()
        .map(
            |t| json!({"name": t.name, "description": t.description, "input_schema": t.parameters}),
        )
        .collect();
    if let Some(schema) = &request.output_schema {
        // The answer is given by calling this tool, whose arguments are the answer object; a tool must be called.
        tools.push(json!({
            "name": FINAL_ANSWER_TOOL,
            "description": "Give your final answer to the user.",
            "input_schema": schema.as_ref(),
        }));
        body["tool_choice"] = json!({"type": "any"});
    }
    if !tools.is_empty() {
        body["tools"] = Value::Array(tools);
    }
    body
}

impl Model for Anthropic {
    fn stream(&self, request: ModelRequest) -> ModelStream {
        let endpoint = self.providers.anthropic.clone();
        let url = format!("{}/v1/messages", endpoint.base_url.trim_end_matches('/'));
        upstream::post_and_stream::<Parser>(
            PROVIDER,
            &self.providers.anthropic_lane,
            self.providers.idle_timeout,
            url,
            body(&self.model, &request),
            move |post| {
                let post = post.header("anthropic-version", API_VERSION);
                match &endpoint.api_key {
                    Some(key) => post.header("x-api-key", key.expose()),
                    None => post,
                }
            },
        )
    }
}

/// A `tool_use` block being assembled.
#[derive(Debug, Default)]
struct PartialCall {
    id: String,
    name: String,
    input: String,
}

#[derive(Debug, Default)]
struct Parser {
    /// Open tool_use blocks by content block index.
    calls: BTreeMap<u64, PartialCall>,
    input_tokens: u64,
    output_tokens: u64,
    done: bool,
    /// A tool call of this message was given to the run: if the output limit turns out to have cut the message, it
    /// must not be run.
    called: bool,
    /// `stop_reason: max_tokens`: the output token limit cut the answer.
    cut: bool,
}

impl WireParser for Parser {
    fn read(&mut self, event: &Event, out: &mut Ready) -> Result<(), ModelError> {
        let data = upstream::json(PROVIDER, &event.data)?;
        let kind = data["type"].as_str().unwrap_or(&event.event);
        match kind {
            "message_start" => {
                let usage = &data["message"]["usage"];
                self.input_tokens = usage["input_tokens"].as_u64().unwrap_or(0);
                self.output_tokens = usage["output_tokens"].as_u64().unwrap_or(0);
            }
            "content_block_start" => {
                let block = &data["content_block"];
                if block["type"] == "tool_use" {
                    let call = PartialCall {
                        id: block["id"].as_str().unwrap_or_default().to_owned(),
                        name: block["name"].as_str().unwrap_or_default().to_owned(),
                        input: String::new(),
                    };
                    self.calls.insert(data["index"].as_u64().unwrap_or(0), call);
                }
            }
            "content_block_delta" => {
                let delta = &data["delta"];
                match delta["type"].as_str() {
                    Some("text_delta") => {
                        if let Some(text) = delta["text"].as_str().filter(|t| !t.is_empty()) {
                            out.push_back(ModelEvent::TextDelta(text.to_owned()));
                        }
                    }
                    Some("input_json_delta") => {
                        if let Some(call) = self.calls.get_mut(&data["index"].as_u64().unwrap_or(0))
                        {
                            let piece = delta["partial_json"].as_str().unwrap_or_default();
                            if call.name == FINAL_ANSWER_TOOL {
                                // The structured answer, as the JSON text it is being written in.
                                if !piece.is_empty() {
                                    out.push_back(ModelEvent::TextDelta(piece.to_owned()));
                                }
                            } else {
                                call.input.push_str(piece);
                            }
                        }
                    }
                    _ => {}
                }
            }
            "content_block_stop" => {
                if let Some(call) = self
                    .calls
                    .remove(&data["index"].as_u64().unwrap_or(0))
                    .filter(|call| call.name != FINAL_ANSWER_TOOL)
                {
                    let args = if call.input.trim().is_empty() {
                        json!({})
                    } else {
                        serde_json::from_str(&call.input).unwrap_or(Value::String(call.input))
                    };
                    self.called = true;
                    out.push_back(ModelEvent::ToolCall(ToolCall {
                        id: call.id,
                        name: call.name,
                        args,
                    }));
                }
            }
            "message_delta" if data["delta"]["stop_reason"] == "max_tokens" => {
                if self.called || !self.calls.is_empty() {
                    tracing::warn!(provider = PROVIDER, "the output limit cut a tool call");
                    return Err(ModelError::TruncatedToolCall(PROVIDER));
                }
                self.cut = true;
                if let Some(output) = data["usage"]["output_tokens"].as_u64() {
                    self.output_tokens = output;
                }
            }
            "message_delta" => {
                if let Some(output) = data["usage"]["output_tokens"].as_u64() {
                    self.output_tokens = output;
                }
            }
            "message_stop" => {
                self.done = true;
                if self.cut {
                    out.push_back(ModelEvent::Truncated);
                }
                out.push_back(ModelEvent::Usage(Usage::new(
                    self.input_tokens,
                    self.output_tokens,
                )));
            }
            "error" => {
                let error = &data["error"];
                tracing::warn!(provider = PROVIDER, %error, "model provider failed mid-stream");
                return Err(if error["type"] == "overloaded_error" {
                    ModelError::Overloaded(PROVIDER)
                } else {
                    ModelError::FailedMidStream(PROVIDER)
                });
            }
            _ => {}
        }
        Ok(())
    }

    fn done(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str, data: Value) -> Event {
        Event {
            event: kind.to_owned().into(),
            data: data.to_string(),
            ..Event::default()
        }
    }

    #[test]
    fn text_tool_use_and_usage_are_assembled() {
        let mut parser = Parser::default();
        let mut events = Vec::new();
        for (kind, data) in [
            (
                "message_start",
                json!({"type": "message_start", "message": {"usage": {"input_tokens": 12, "output_tokens": 1}}}),
            ),
            (
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ),
            ("ping", json!({"type": "ping"})),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Let me check."}}),
            ),
            (
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ),
            (
                "content_block_start",
                json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_1", "name": "current_time", "input": {}}}),
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"tz\": "}}),
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "\"UTC\"}"}}),
            ),
            (
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 1}),
            ),
            (
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 30}}),
            ),
            ("message_stop", json!({"type": "message_stop"})),
        ] {
            events.extend(parser.on_event(&event(kind, data)).unwrap());
        }
        assert!(parser.done());
        assert_eq!(
            events,
            [
                ModelEvent::TextDelta("Let me check.".into()),
                ModelEvent::ToolCall(ToolCall {
                    id: "toolu_1".into(),
                    name: "current_time".into(),
                    args: json!({"tz": "UTC"}),
                }),
                ModelEvent::Usage(Usage::new(12, 30)),
            ]
        );
    }

    #[test]
    fn errors_and_truncation_are_failures() {
        let overloaded = json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}});
        let err = Parser::default()
            .on_event(&event("error", overloaded))
            .unwrap_err();
        assert!(err.to_string().contains("overloaded"));
        assert_eq!(err.code(), crate::error::ErrorCode::ProviderUnavailable);
        let mut parser = Parser::default();
        parser
            .on_event(&event(
                "message_start",
                json!({"type": "message_start", "message": {"usage": {}}}),
            ))
            .unwrap();
        assert!(!parser.done());
    }

    #[test]
    fn tool_results_merge_into_one_user_turn() {
        let call = |id: &str| ToolCall {
            id: id.into(),
            name: "current_time".into(),
            args: json!({}),
        };
        let request = ModelRequest {
            system: None,
            output_schema: None,
            messages: vec![
                Message::User {
                    content: "time?".into(),
                },
                Message::Assistant {
                    content: String::new(),
                    tool_calls: vec![call("a"), call("b")],
                },
                Message::ToolResult {
                    tool_call_id: "a".into(),
                    content: "1".into(),
                },
                Message::ToolResult {
                    tool_call_id: "b".into(),
                    content: "2".into(),
                },
            ],
            tools: std::sync::Arc::from([]),
        };
        let body = body("claude-x", &request);
        let messages = body["messages"].as_array().unwrap();
        assert_eq!(messages.len(), 3);
        assert_eq!(messages[1]["content"][1]["type"], "tool_use");
        assert_eq!(messages[2]["role"], "user");
        assert_eq!(messages[2]["content"].as_array().unwrap().len(), 2);
        assert_eq!(messages[2]["content"][1]["tool_use_id"], "b");
        assert!(body.get("tools").is_none());
    }
}
