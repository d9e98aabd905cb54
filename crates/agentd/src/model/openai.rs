//! OpenAI-compatible providers: the Chat Completions stream (`POST {OPENAI_BASE_URL}/chat/completions` with
//! `stream: true`), which OpenAI, vLLM, Ollama, llama.cpp's server and most gateways speak.
//!
//! Text arrives as `choices[0].delta.content`; tool calls as `choices[0].delta.tool_calls[]` fragments, joined by
//! `index` (the arguments are a JSON string sent in pieces); usage in a last chunk (asked for with
//! `stream_options.include_usage`); the stream ends with `data: [DONE]`.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::marker::PhantomData;

use crate::sse::Event;
use serde::Deserialize;
use serde::de::{Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde_json::{Value, json};

mod chunk;

use super::upstream::{self, Providers, Ready, WireParser};
use super::{Message, Model, ModelError, ModelEvent, ModelRequest, ModelStream, ToolCall, Usage};

const PROVIDER: &str = "the OpenAI-compatible model provider";

#[derive(Debug, Clone)]
pub struct OpenAi {
    pub model: String,
    pub providers: Providers,
}

/// What an OpenAI-compatible model is told after the partial answer of a run continued elsewhere.
pub const CONTINUE: &str = "Your previous answer was cut off. Continue it exactly where it stopped, without \
repeating any of it and without any preamble.";

/// The request body, in the provider's own format.
pub fn body(model: &str, request: &ModelRequest) -> Value {
    let messages: Vec<Value> = request
        .messages
        .iter()
        .map(|message| match message {
            Message::User { content } => json!({"role": "user", "content": content}),
            Message::Assistant {
                content,
                tool_calls,
            } => {
                let mut message = json!({
                    "role": "assistant",
                    "content": if content.is_empty() { Value::Null } else { json!(content) },
                });
                if !tool_calls.is_empty() {
                    message["tool_calls"] = tool_calls
                        .iter()
                        .map(|call| {
                            json!({
                                "id": call.id,
                                "type": "function",
                                "function": {"name": call.name, "arguments": call.args.to_string()},
                            })
                        })
                        .collect();
                }
                message
            }
            Message::ToolResult {
                tool_call_id,
                content,
            } => {
                json!({"role": "tool", "tool_call_id": tool_call_id, "content": content})
            }
        })
        .collect();
    let mut messages = messages;
    if let Some(system) = &request.system {
        messages.insert(0, json!({"role": "system", "content": system}));
    }
    if let Some(Message::Assistant {
        content,
        tool_calls,
    }) = request.messages.last()
        && tool_calls.is_empty()
        && !content.is_empty()
    {
        // An answer cut when its producer was lost: the model is asked to go on from where it stopped.
        messages.push(json!({"role": "user", "content": CONTINUE}));
    }
    let mut body = json!({
        "model": model,
        "messages": messages,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if !request.tools.is_empty() {
        body["tools"] = request
            .tools
            .iter()
            .map(|tool| {
                json!({
                    "type": "function",
                    "function": {"name": tool.name, "description": tool.description, "parameters": tool.parameters},
                })
            })
            .collect();
    }
    if let Some(schema) = &request.output_schema {
        // Structured output: the answer is a JSON object of the schema, streamed as the message's content.
        body["response_format"] = json!({
            "type": "json_schema",
            "json_schema": {"name": "final_answer", "schema": schema.as_ref()},
        });
    }
    body
}

impl Model for OpenAi {
    fn stream(&self, request: ModelRequest) -> ModelStream {
        let endpoint = self.providers.openai.clone();
        let url = format!(
            "{}/chat/completions",
            endpoint.base_url.trim_end_matches('/')
        );
        upstream::post_and_stream::<Parser>(
            PROVIDER,
            &self.providers.openai_lane,
            self.providers.idle_timeout,
            url,
            body(&self.model, &request),
            move |post| match &endpoint.api_key {
                Some(key) => post.bearer_auth(key.expose()),
                None => post,
            },
        )
    }
}

/// A tool call being assembled from its fragments.
#[derive(Debug, Default)]
struct PartialCall {
    id: String,
    name: String,
    arguments: String,
}

#[derive(Debug, Default)]
struct Parser {
    calls: BTreeMap<u64, PartialCall>,
    usage: Option<Usage>,
    done: bool,
    /// `finish_reason: length`: the output token limit cut the answer.
    cut: bool,
}

/// One chunk of the stream, read into the fields agentd uses (the rest is skipped, not built): a chunk arrives for
/// every few characters of an answer, so reading it into a generic JSON tree cost more than everything else done with
/// it. Text without escapes is borrowed from the event.
#[derive(Debug, Deserialize)]
struct Chunk<'a> {
    #[serde(default, borrow)]
    choices: FirstChoice<'a>,
    /// In the last chunk when `stream_options.include_usage` asked for it; `null` in the others.
    #[serde(default)]
    usage: Option<Value>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
struct Choice<'a> {
    #[serde(default, borrow)]
    delta: Option<Delta<'a>>,
    #[serde(default, borrow)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Debug, Default, Deserialize)]
struct Delta<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(default)]
    tool_calls: Option<Vec<Fragment>>,
}

/// A piece of a tool call: its `id` and `name` come first, its `arguments` in pieces after.
#[derive(Debug, Deserialize)]
struct Fragment {
    #[serde(default)]
    index: Option<u64>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<FunctionFragment>,
}

#[derive(Debug, Default, Deserialize)]
struct FunctionFragment {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

/// The first of a chunk's `choices` (agentd asks for one), without collecting the array.
#[derive(Debug, Default)]
struct FirstChoice<'a>(Option<Choice<'a>>);

impl<'de: 'a, 'a> Deserialize<'de> for FirstChoice<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct First<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for First<'a> {
            type Value = FirstChoice<'a>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an array of choices")
            }

            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(FirstChoice(None))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let first = seq.next_element()?;
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(FirstChoice(first))
            }
        }
        deserializer.deserialize_any(First(PhantomData))
    }
}

impl WireParser for Parser {
    fn read(&mut self, event: &Event, out: &mut Ready) -> Result<(), ModelError> {
        if event.data.trim() == "[DONE]" {
            self.done = true;
            if self.cut && !self.calls.is_empty() {
                tracing::warn!(provider = PROVIDER, "the output limit cut a tool call");
                return Err(ModelError::TruncatedToolCall(PROVIDER));
            }
            out.extend(std::mem::take(&mut self.calls).into_values().map(|call| {
                let args = if call.arguments.trim().is_empty() {
                    json!({})
                } else {
                    // Arguments that are not JSON reach the tool as a string, which fails its schema check.
                    serde_json::from_str(&call.arguments).unwrap_or(Value::String(call.arguments))
                };
                ModelEvent::ToolCall(ToolCall {
                    id: call.id,
                    name: call.name,
                    args,
                })
            }));
            if self.cut {
                out.push_back(ModelEvent::Truncated);
            }
            out.extend(self.usage.take().map(ModelEvent::Usage));
            return Ok(());
        }
        // Most chunks are a piece of text: read without serde (see `chunk`), the others with it.
        let (finish_reason, content, fragments) = match chunk::plain(&event.data) {
            Some(plain) => (plain.finish_reason.map(Cow::Borrowed), plain.content, None),
            None => {
                let chunk: Chunk<'_> = serde_json::from_str(&event.data).map_err(|error| {
                    tracing::warn!(provider = PROVIDER, %error, "model provider sent an event that is not a chunk");
                    ModelError::BrokenStream(PROVIDER)
                })?;
                if let Some(error) = chunk.error {
                    tracing::warn!(provider = PROVIDER, %error, "model provider failed mid-stream");
                    return Err(ModelError::FailedMidStream(PROVIDER));
                }
                if let Some(usage) = chunk.usage {
                    let n = |key: &str| usage[key].as_u64().unwrap_or(0);
                    self.usage = Some(Usage::new(n("prompt_tokens"), n("completion_tokens")));
                }
                let Some(choice) = chunk.choices.0 else {
                    return Ok(());
                };
                let delta = choice.delta.unwrap_or_default();
                (choice.finish_reason, delta.content, delta.tool_calls)
            }
        };
        if finish_reason.as_deref() == Some("length") {
            self.cut = true;
        }
        if let Some(text) = content.filter(|t| !t.is_empty()) {
            out.push_back(ModelEvent::TextDelta(text.into_owned()));
        }
        for fragment in fragments.unwrap_or_default() {
            let call = self.calls.entry(fragment.index.unwrap_or(0)).or_default();
            if let Some(id) = fragment.id {
                call.id = id;
            }
            let function = fragment.function.unwrap_or_default();
            if let Some(name) = function.name {
                call.name.push_str(&name);
            }
            if let Some(arguments) = function.arguments {
                call.arguments.push_str(&arguments);
            }
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
    use crate::model::ToolDefinition;

    fn event(data: &str) -> Event {
        Event {
            data: data.to_owned(),
            ..Event::default()
        }
    }

    #[test]
    fn text_tool_call_fragments_and_usage_are_assembled() {
        let mut parser = Parser::default();
        let mut events = Vec::new();
        for data in [
            r#"{"choices":[{"delta":{"role":"assistant","content":"Hel"}}]}"#,
            r#"{"choices":[{"delta":{"content":"lo"}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"c1","type":"function","function":{"name":"current_time","arguments":"{\"tz"}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\":\"UTC\"}"}}]}}]}"#,
            r#"{"choices":[{"delta":{},"finish_reason":"tool_calls"}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18}}"#,
            "[DONE]",
        ] {
            events.extend(parser.on_event(&event(data)).unwrap());
        }
        assert!(parser.done());
        assert_eq!(
            events,
            [
                ModelEvent::TextDelta("Hel".into()),
                ModelEvent::TextDelta("lo".into()),
                ModelEvent::ToolCall(ToolCall {
                    id: "c1".into(),
                    name: "current_time".into(),
                    args: json!({"tz": "UTC"}),
                }),
                ModelEvent::Usage(Usage::new(11, 7)),
            ]
        );
    }

    #[test]
    fn a_stream_without_done_or_with_garbage_is_broken() {
        let mut parser = Parser::default();
        parser
            .on_event(&event(r#"{"choices":[{"delta":{"content":"Hi"}}]}"#))
            .unwrap();
        assert!(!parser.done());
        assert!(Parser::default().on_event(&event("{not json")).is_err());
        assert!(
            Parser::default()
                .on_event(&event(r#"{"error":{"message":"boom"}}"#))
                .is_err()
        );
    }

    #[test]
    fn chunks_as_providers_send_them_are_read_whatever_else_they_hold() {
        let mut parser = Parser::default();
        let mut events = Vec::new();
        for data in [
            // Fields agentd does not use, escapes in the text, a second choice (not asked for), `null`s.
            r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","system_fingerprint":null,
               "choices":[{"index":0,"delta":{"role":"assistant","content":"say \"hi\"\n","refusal":null},
               "logprobs":null,"finish_reason":null},{"index":1,"delta":{"content":"other"}}],"usage":null}"#,
            r#"{"choices":null}"#,
            r#"{"choices":[{"delta":null,"finish_reason":"length"}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5},"error":null}"#,
            "[DONE]",
        ] {
            events.extend(parser.on_event(&event(data)).unwrap());
        }
        assert_eq!(
            events,
            [
                ModelEvent::TextDelta("say \"hi\"\n".into()),
                ModelEvent::Truncated,
                ModelEvent::Usage(Usage::new(3, 2)),
            ]
        );
        // A chunk of another shape is a broken stream, not text made up from it.
        for data in [
            r#"{"choices":{"delta":{"content":"x"}}}"#,
            r#"{"choices":[{"delta":{"content":["x"]}}]}"#,
            r#"[1,2]"#,
        ] {
            assert!(
                matches!(
                    Parser::default().on_event(&event(data)),
                    Err(ModelError::BrokenStream(_))
                ),
                "{data}"
            );
        }
    }

    #[test]
    fn history_and_tools_are_sent_in_the_openai_format() {
        let request = ModelRequest {
            system: None,
            output_schema: None,
            messages: vec![
                Message::User {
                    content: "time?".into(),
                },
                Message::Assistant {
                    content: String::new(),
                    tool_calls: vec![ToolCall {
                        id: "c1".into(),
                        name: "current_time".into(),
                        args: json!({}),
                    }],
                },
                Message::ToolResult {
                    tool_call_id: "c1".into(),
                    content: "{\"utc\":\"now\"}".into(),
                },
            ],
            tools: std::sync::Arc::from([ToolDefinition {
                name: "current_time".into(),
                description: "d".into(),
                parameters: json!({"type": "object"}),
            }]),
        };
        let body = body("gpt-x", &request);
        assert_eq!(body["model"], "gpt-x");
        assert_eq!(body["stream"], true);
        assert_eq!(body["messages"][1]["content"], Value::Null);
        assert_eq!(
            body["messages"][1]["tool_calls"][0]["function"]["arguments"],
            "{}"
        );
        assert_eq!(
            body["messages"][2],
            json!({"role": "tool", "tool_call_id": "c1", "content": "{\"utc\":\"now\"}"})
        );
        assert_eq!(body["tools"][0]["function"]["name"], "current_time");
    }
}
