//! What an operator tells the agent: its instructions (`AGENT_INSTRUCTIONS`, the system prompt, a template filled per
//! run) and the shape of its final answer (`OUTPUT_SCHEMA`, a JSON Schema whose `answer` string streams to the client
//! as it is written). Both are read once at start; a file that cannot be read or is not valid refuses the start.
//!
//! A leaf: the run service renders and checks with what is here, the providers send it each in their own way.

use std::path::Path;
use std::sync::Arc;

use serde_json::Value;

use crate::tools::ArgsSchema;

/// The placeholders an instructions template may use; each is filled per run.
pub const PLACEHOLDERS: [&str; 7] = [
    "org_id",
    "user_id",
    "canvas_id",
    "chat_id",
    "context.mode",
    "context.enabled",
    "context.canvas_version",
];

/// The instructions template: text with `{placeholder}`s (`{{` and `}}` for literal braces).
#[derive(Debug, Clone)]
pub struct Instructions {
    template: Arc<str>,
}

/// What a template is filled with for one run.
#[derive(Debug, Clone, Default)]
pub struct Fill<'a> {
    pub org_id: &'a str,
    pub user_id: &'a str,
    pub canvas_id: &'a str,
    pub chat_id: &'a str,
    pub mode: &'a str,
    pub enabled: bool,
    pub canvas_version: Option<&'a str>,
}

impl Instructions {
    /// Reads `file`: Markdown or text (the whole file is the template), or YAML / JSON with an `instructions` string.
    pub fn load(file: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        let structured = file
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"));
        let template = if structured {
            let value: serde_yaml::Value =
                serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))?;
            value["instructions"]
                .as_str()
                .ok_or_else(|| format!("{}: needs an `instructions` string", file.display()))?
                .to_owned()
        } else {
            text
        };
        Self::parse(&template).map_err(|e| format!("{}: {e}", file.display()))
    }

    /// Checks every placeholder of `template` is known.
    pub fn parse(template: &str) -> Result<Self, String> {
        render(template, |name| {
            PLACEHOLDERS
                .contains(&name)
                .then(String::new)
                .ok_or_else(|| {
                    format!(
                        "unknown placeholder {{{name}}}; known: {}",
                        PLACEHOLDERS.map(|p| format!("{{{p}}}")).join(", ")
                    )
                })
        })?;
        if template.trim().is_empty() {
            return Err("the instructions are empty".to_owned());
        }
        Ok(Self {
            template: template.into(),
        })
    }

    /// The system prompt of one run.
    pub fn render(&self, fill: &Fill<'_>) -> String {
        render(&self.template, |name| {
            Ok(match name {
                "org_id" => fill.org_id.to_owned(),
                "user_id" => fill.user_id.to_owned(),
                "canvas_id" => fill.canvas_id.to_owned(),
                "chat_id" => fill.chat_id.to_owned(),
                "context.mode" => fill.mode.to_owned(),
                "context.enabled" => fill.enabled.to_string(),
                "context.canvas_version" => fill.canvas_version.unwrap_or_default().to_owned(),
                _ => String::new(),
            })
        })
        .unwrap_or_default()
    }
}

/// Fills each `{name}` of `template` with `value(name)`; `{{` and `}}` are literal braces.
fn render(
    template: &str,
    mut value: impl FnMut(&str) -> Result<String, String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(at) = rest.find(['{', '}']) {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("{{") {
            out.push('{');
            rest = after;
        } else if let Some(after) = tail.strip_prefix("}}") {
            out.push('}');
            rest = after;
        } else if let Some(after) = tail.strip_prefix('{') {
            let end = after
                .find('}')
                .ok_or("an opening brace is never closed (write {{ for a literal one)")?;
            out.push_str(&value(after[..end].trim())?);
            rest = &after[end + 1..];
        } else {
            return Err("a closing brace was never opened (write }} for a literal one)".to_owned());
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// The schema a run's final answer must match; its `answer` string is what streams to the client.
#[derive(Debug, Clone)]
pub struct OutputSchema {
    pub schema: Arc<Value>,
    checker: Arc<ArgsSchema>,
}

impl OutputSchema {
    /// Reads `file` (JSON): an object schema with a string property `answer`.
    pub fn load(file: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        let schema: Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))?;
        Self::new(schema).map_err(|e| format!("{}: {e}", file.display()))
    }

    pub fn new(schema: Value) -> Result<Self, String> {
        if schema["type"] != "object" || schema["properties"]["answer"]["type"] != "string" {
            return Err(
                "must be an object schema with a string property `answer` (the text that streams)"
                    .to_owned(),
            );
        }
        let checker = ArgsSchema::compile(&schema)?;
        Ok(Self {
            schema: Arc::new(schema),
            checker: Arc::new(checker),
        })
    }

    /// The answer of a finished step, when it is a JSON object of the schema; else why not.
    pub fn check(&self, text: &str) -> Result<Value, String> {
        let value: Value = serde_json::from_str(text.trim())
            .map_err(|e| format!("the answer is not a JSON object: {e}"))?;
        self.checker
            .check(&value)
            .map_err(|e| e.replacen("args", "the answer", 1))?;
        Ok(value)
    }
}

/// The `answer` string of a JSON object that is still being written, as far as it can be read: the partial text is
/// closed (an open string, open brackets) and parsed. An incomplete escape at the very end is left for later, so the
/// text only ever grows.
pub fn answer_so_far(partial: &str) -> Option<String> {
    let mut closing = Vec::new();
    let mut in_string = false;
    let mut escape = false;
    let mut cut = partial.len();
    for (at, c) in partial.char_indices() {
        if in_string {
            if escape {
                escape = false;
            } else if c == '\\' {
                escape = true;
                cut = at;
            } else if c == '"' {
                in_string = false;
            }
            if !escape {
                cut = partial.len();
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '{' => closing.push('}'),
            '[' => closing.push(']'),
            '}' | ']' => {
                closing.pop();
            }
            _ => {}
        }
    }
    let mut text = partial[..cut].to_owned();
    if in_string {
        // A `\u` escape not yet complete is dropped too.
        if let Some(at) = text.rfind("\\u")
            && text.len() - at < 6
            && !text[..at].ends_with('\\')
        {
            text.truncate(at);
        }
        text.push('"');
    }
    while let Some(c) = closing.pop() {
        text.push(c);
    }
    let value: Value = serde_json::from_str(&text).ok()?;
    value["answer"].as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn placeholders_are_filled_and_unknown_ones_refused() {
        let template = Instructions::parse(
            "You help {org_id} on canvas {canvas_id} ({context.mode}, version {context.canvas_version}). {{not}}",
        )
        .unwrap();
        let text = template.render(&Fill {
            org_id: "acme",
            canvas_id: "c1",
            mode: "build",
            canvas_version: Some("v7"),
            ..Fill::default()
        });
        assert_eq!(
            text,
            "You help acme on canvas c1 (build, version v7). {not}"
        );
        let refused = Instructions::parse("Hello {user}").unwrap_err();
        assert!(refused.contains("unknown placeholder {user}"), "{refused}");
        assert!(Instructions::parse("an { open").is_err());
        assert!(Instructions::parse("  ").is_err());
    }

    #[test]
    fn the_answer_is_read_as_it_is_written_and_only_grows() {
        let whole = r#"{"answer": "Hi \"you\"\n\u00e9 done", "proposal": {"a": [1, 2]}}"#;
        let mut last = String::new();
        for end in 0..=whole.len() {
            if !whole.is_char_boundary(end) {
                continue;
            }
            if let Some(answer) = answer_so_far(&whole[..end]) {
                assert!(
                    answer.starts_with(&last),
                    "{last:?} then {answer:?} at {end}"
                );
                last = answer;
            }
        }
        assert_eq!(last, "Hi \"you\"\n\u{e9} done");
        assert_eq!(answer_so_far(r#"{"proposal": null, "answ"#), None);
    }

    #[test]
    fn an_output_schema_needs_a_string_answer_and_checks_finished_answers() {
        assert!(OutputSchema::new(json!({"type": "object"})).is_err());
        let schema = OutputSchema::new(json!({
            "type": "object",
            "required": ["answer", "proposal"],
            "properties": {"answer": {"type": "string"}, "proposal": {"type": ["object", "null"]}},
        }))
        .unwrap();
        assert!(schema.check(r#"{"answer": "a", "proposal": null}"#).is_ok());
        let error = schema.check(r#"{"answer": "a"}"#).unwrap_err();
        assert!(error.contains("proposal"), "{error}");
        assert!(schema.check("plain text").is_err());
    }
}
