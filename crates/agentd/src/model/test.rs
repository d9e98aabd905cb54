//! The built-in `test` model: deterministic, offline, paced on request.
//!
//! It lets the service run its main job with no network and no key, and lets tests and benchmarks shape a run:
//! `test:deltas=N,delay_ms=N,tool=NAME,fail_after=N` streams N text deltas with a pause before each, asks for the
//! named tool once first, and fails after N deltas when asked; `clock=1` stamps each delta with the time it was
//! produced, for the benchmark's delivery-latency figures.

use std::fmt;
use std::time::Duration;

use futures_util::stream;

use super::{Message, Model, ModelError, ModelEvent, ModelRequest, ModelStream, ToolCall, Usage};

/// The words the answer is made of, cycled; the answer is the same for every run with the same options.
const WORDS: [&str; 12] = [
    "Agents", "answer", "in", "small", "pieces", "so", "the", "reader", "sees", "progress",
    "right", "away.",
];

const MAX_DELTAS: u32 = 10_000_000;
const MAX_DELAY_MS: u64 = 3_600_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestOptions {
    /// Number of `model_delta`s in the answer.
    pub deltas: u32,
    /// Pause before each delta.
    pub delay: Duration,
    /// Built-in tool the model calls once before answering.
    pub tool: Option<String>,
    /// Fail the run after this many deltas.
    pub fail_after: Option<u32>,
    /// The answer is the instructions (the system prompt) the model was given, a word per delta.
    pub echo: bool,
    /// Each delta's text is the wall-clock time it was produced (`@<unix nanoseconds> `), so a benchmark can tell how
    /// long a delta took to reach a client.
    pub clock: bool,
}

impl Default for TestOptions {
    fn default() -> Self {
        Self {
            deltas: 8,
            delay: Duration::ZERO,
            tool: None,
            fail_after: None,
            clock: false,
            echo: false,
        }
    }
}

impl TestOptions {
    pub(super) fn parse(raw: &str) -> Result<Self, String> {
        let mut options = Self::default();
        for pair in raw.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("option {pair:?} is not key=value"))?;
            let number = || -> Result<u64, String> {
                value
                    .parse::<u64>()
                    .map_err(|_| format!("option {key} needs a whole number, got {value:?}"))
            };
            match key {
                "deltas" => {
                    let n = number()?;
                    if n == 0 || n > u64::from(MAX_DELTAS) {
                        return Err(format!("deltas must be between 1 and {MAX_DELTAS}"));
                    }
                    options.deltas = n as u32;
                }
                "delay_ms" => {
                    let n = number()?;
                    if n > MAX_DELAY_MS {
                        return Err(format!("delay_ms must be at most {MAX_DELAY_MS}"));
                    }
                    options.delay = Duration::from_millis(n);
                }
                // Whether the tool exists is checked against the service's tools where the request arrives.
                "tool" if value.is_empty() => return Err("tool needs a name".to_owned()),
                "tool" => options.tool = Some(value.to_owned()),
                "fail_after" => {
                    options.fail_after = Some(number()?.min(u64::from(MAX_DELTAS)) as u32)
                }
                "clock" => options.clock = number()? != 0,
                "echo" => options.echo = number()? != 0,
                _ => return Err(format!("unknown option {key:?}")),
            }
        }
        Ok(options)
    }
}

/// Writes the options that differ from the defaults, so `test` stays `test`.
impl fmt::Display for TestOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let default = Self::default();
        let mut parts = Vec::new();
        if self.deltas != default.deltas {
            parts.push(format!("deltas={}", self.deltas));
        }
        if self.delay != default.delay {
            parts.push(format!("delay_ms={}", self.delay.as_millis()));
        }
        if let Some(tool) = &self.tool {
            parts.push(format!("tool={tool}"));
        }
        if let Some(n) = self.fail_after {
            parts.push(format!("fail_after={n}"));
        }
        if self.clock {
            parts.push("clock=1".to_owned());
        }
        if self.echo {
            parts.push("echo=1".to_owned());
        }
        if !parts.is_empty() {
            write!(f, ":{}", parts.join(","))?;
        }
        Ok(())
    }
}

#[derive(Debug)]
pub(super) struct TestModel {
    options: TestOptions,
}

impl TestModel {
    pub(super) fn new(options: TestOptions) -> Self {
        Self { options }
    }
}

/// The text of delta `i`.
pub fn delta_text(i: u32) -> String {
    let word = WORDS[i as usize % WORDS.len()];
    if i == 0 {
        word.to_owned()
    } else {
        format!(" {word}")
    }
}

/// How many deltas of an answer `text` is made of (the answer so far of a continued run).
fn deltas_in(text: &str, clock: bool) -> u32 {
    if clock {
        return u32::try_from(text.matches('@').count()).unwrap_or(u32::MAX);
    }
    let mut len = 0;
    let mut i = 0;
    while len < text.len() {
        len += delta_text(i).len();
        i += 1;
    }
    i
}

/// `@<unix nanoseconds> `: when the delta was produced.
fn clock_text() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("@{now} ")
}

impl Model for TestModel {
    fn stream(&self, request: ModelRequest) -> ModelStream {
        let input_tokens = request.messages.iter().map(words).sum();
        let asked = request
            .messages
            .iter()
            .rposition(|m| matches!(m, Message::User { .. }))
            .unwrap_or(0);
        let answered_tool = request.messages[asked..]
            .iter()
            .any(|m| matches!(m, Message::ToolResult { .. }));
        // A continuation (the answer so far is the last turn) goes on at the next delta exactly.
        let partial = match request.messages.last() {
            Some(Message::Assistant {
                content,
                tool_calls,
            }) if tool_calls.is_empty() => content.as_str(),
            _ => "",
        };
        if let (Some(tool), false) = (&self.options.tool, answered_tool) {
            let call = ToolCall {
                id: "call_1".to_owned(),
                name: tool.clone(),
                args: serde_json::json!({}),
            };
            return Box::pin(stream::iter([
                Ok(ModelEvent::ToolCall(call)),
                Ok(ModelEvent::Usage(Usage::new(input_tokens, 1))),
            ]));
        }
        let TestOptions {
            mut deltas,
            delay,
            fail_after,
            clock,
            echo,
            ..
        } = self.options.clone();
        // `echo=1`: the answer is the instructions it was given, word by word.
        let echoed: Vec<String> = if echo {
            let system = request.system.as_deref().unwrap_or("(no instructions)");
            let words: Vec<&str> = system.split_whitespace().collect();
            deltas = u32::try_from(words.len()).unwrap_or(u32::MAX);
            words
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    if i == 0 {
                        (*w).to_owned()
                    } else {
                        format!(" {w}")
                    }
                })
                .collect()
        } else {
            Vec::new()
        };
        // With an output schema, the answer is written as the JSON object `{"answer": "..."}`, piece by piece.
        let structured = request.output_schema.is_some();
        let first = if structured {
            0
        } else {
            deltas_in(partial, clock).min(deltas)
        };
        // States: 0..deltas a delta each; then (structured) the object's end; then the usage; then the end.
        let closing = deltas.saturating_add(1);
        Box::pin(stream::unfold(first, move |i| {
            let echoed = echoed.clone();
            async move {
                if i == deltas && structured {
                    return Some((Ok(ModelEvent::TextDelta("\"}".to_owned())), closing));
                }
                if i == deltas || i == closing {
                    let usage = Usage::new(input_tokens, u64::from(deltas - first));
                    return Some((Ok(ModelEvent::Usage(usage)), u32::MAX));
                }
                if i > deltas {
                    return None;
                }
                if fail_after == Some(i) {
                    let error = ModelError::TestFailure(i);
                    return Some((Err(error), u32::MAX));
                }
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let mut text = if echo {
                    echoed[i as usize].clone()
                } else if clock {
                    clock_text()
                } else {
                    delta_text(i)
                };
                if structured {
                    let quoted = serde_json::to_string(&text).expect("a string serializes");
                    text = quoted[1..quoted.len() - 1].to_owned();
                    if i == 0 {
                        text = format!("{{\"answer\":\"{text}");
                    }
                }
                Some((Ok(ModelEvent::TextDelta(text)), i + 1))
            }
        }))
    }
}

fn words(message: &Message) -> u64 {
    let text = match message {
        Message::User { content }
        | Message::Assistant { content, .. }
        | Message::ToolResult { content, .. } => content,
    };
    text.split_whitespace().count() as u64
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;
    use crate::model::ModelSpec;

    fn providers() -> crate::model::Providers {
        let endpoint = crate::model::Endpoint {
            base_url: "http://127.0.0.1:9".into(),
            api_key: None,
            h2c: false,
        };
        crate::model::Providers::new(
            endpoint.clone(),
            endpoint,
            Duration::from_secs(1),
            Duration::from_secs(1),
        )
    }

    fn ask(question: &str) -> ModelRequest {
        ModelRequest {
            system: None,
            output_schema: None,
            messages: vec![Message::User {
                content: question.to_owned(),
            }],
            tools: std::sync::Arc::from([]),
        }
    }

    #[test]
    fn options_parse_and_print_back() {
        let spec =
            ModelSpec::parse("test:deltas=3,delay_ms=20,tool=current_time,fail_after=2").unwrap();
        assert_eq!(
            spec.to_string(),
            "test:deltas=3,delay_ms=20,tool=current_time,fail_after=2"
        );
        assert_eq!(ModelSpec::parse("test").unwrap().to_string(), "test");
        assert_eq!(ModelSpec::parse("test:").unwrap().to_string(), "test");
    }

    #[test]
    fn bad_options_say_what_is_wrong() {
        for (id, reason) in [
            ("test:deltas=0", "deltas must be between 1"),
            ("test:deltas=x", "needs a whole number"),
            ("test:speed=3", "unknown option"),
            ("test:tool=", "tool needs a name"),
            ("test:deltas", "not key=value"),
        ] {
            let err = ModelSpec::parse(id).unwrap_err().to_string();
            assert!(err.contains(reason), "{id}: {err}");
        }
        assert_eq!(
            ModelSpec::parse("gpt").unwrap_err().to_string(),
            "unknown model \"gpt\""
        );
    }

    #[tokio::test]
    async fn answers_in_the_asked_number_of_deltas_then_usage() {
        let model = ModelSpec::parse("test:deltas=3")
            .unwrap()
            .build(&providers());
        let events: Vec<_> = model.stream(ask("two words")).collect().await;
        assert_eq!(
            events,
            vec![
                Ok(ModelEvent::TextDelta("Agents".into())),
                Ok(ModelEvent::TextDelta(" answer".into())),
                Ok(ModelEvent::TextDelta(" in".into())),
                Ok(ModelEvent::Usage(Usage::new(2, 3))),
            ]
        );
    }

    #[tokio::test]
    async fn asks_for_the_tool_first_and_answers_after_its_result() {
        let model = ModelSpec::parse("test:deltas=1,tool=current_time")
            .unwrap()
            .build(&providers());
        let first: Vec<_> = model.stream(ask("time?")).collect().await;
        assert!(matches!(&first[0], Ok(ModelEvent::ToolCall(call)) if call.name == "current_time"));
        let mut request = ask("time?");
        request.messages.push(Message::ToolResult {
            tool_call_id: "call_1".into(),
            content: "now".into(),
        });
        let second: Vec<_> = model.stream(request).collect().await;
        assert_eq!(second[0], Ok(ModelEvent::TextDelta("Agents".into())));
    }

    #[tokio::test]
    async fn a_continuation_goes_on_at_the_next_delta_and_after_the_tool() {
        let model = ModelSpec::parse("test:deltas=4,tool=current_time")
            .unwrap()
            .build(&providers());
        let mut request = ask("time?");
        request.messages.extend([
            Message::Assistant {
                content: String::new(),
                tool_calls: vec![ToolCall {
                    id: "call_1".into(),
                    name: "current_time".into(),
                    args: serde_json::json!({}),
                }],
            },
            Message::ToolResult {
                tool_call_id: "call_1".into(),
                content: "now".into(),
            },
            Message::Assistant {
                content: "Agents answer".into(),
                tool_calls: Vec::new(),
            },
        ]);
        let events: Vec<_> = model.stream(request).collect().await;
        assert_eq!(
            events[..2],
            [
                Ok(ModelEvent::TextDelta(" in".into())),
                Ok(ModelEvent::TextDelta(" small".into())),
            ]
        );
        assert!(matches!(events[2], Ok(ModelEvent::Usage(u)) if u.output_tokens == 2));
        assert_eq!(events.len(), 3);
    }

    #[tokio::test]
    async fn fails_after_the_asked_number_of_deltas() {
        let model = ModelSpec::parse("test:deltas=5,fail_after=2")
            .unwrap()
            .build(&providers());
        let events: Vec<_> = model.stream(ask("q")).collect().await;
        assert_eq!(events.len(), 3);
        assert!(events[2].is_err());
    }
}
