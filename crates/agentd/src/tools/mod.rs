//! Tools a model may call: the built-in `current_time`, and HTTP tools declared in `TOOLS_FILE` (`http.rs`).
//!
//! Args are checked against the tool's JSON Schema first (`schema.rs`, full draft 2020-12). A tool that fails (bad
//! args, an error status, a timeout, an unknown name) gives the model an error result ([`ToolError`]) to read; it
//! never fails the run by itself.

mod http;
mod schema;

pub use schema::ArgsSchema;

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::model::ToolDefinition;
use crate::secret::Secret;

/// What a tool call gives back to the model: a JSON answer, or an error the model can read.
pub type ToolResult = Result<Value, ToolError>;

/// Why a tool call failed, by kind; its text is what the model reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ToolError {
    #[error("there is no tool named {0:?}")]
    Unknown(String),
    /// The args broke the tool's schema; the text names the argument.
    #[error("{0}")]
    InvalidArgs(String),
    #[error("the tool's URL {0}")]
    BadUrl(String),
    #[error("the tool timed out after {0} ms")]
    Timeout(u128),
    #[error("the tool's service could not be reached")]
    Unreachable,
    #[error("the tool's answer could not be read")]
    UnreadableAnswer,
    #[error("the tool's service answered {status}: {body}")]
    ErrorStatus { status: u16, body: String },
    #[error("the tool failed: {0}")]
    Internal(String),
}

impl ToolError {
    /// A stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Unknown(_) => "unknown_tool",
            Self::InvalidArgs(_) => "invalid_args",
            Self::BadUrl(_) => "bad_url",
            Self::Timeout(_) => "timeout",
            Self::Unreachable => "unreachable",
            Self::UnreadableAnswer => "unreadable_answer",
            Self::ErrorStatus { .. } => "error_status",
            Self::Internal(_) => "internal",
        }
    }
}

/// Who the run acts for, so tools can act for them too.
#[derive(Debug, Clone, Default)]
pub struct ToolContext {
    /// The caller's bearer token, forwarded by HTTP tools; `None` in dev mode and when no HTTP tool is declared.
    pub bearer: Option<Secret>,
    pub org_id: String,
    /// The canvas version the client shows (`agent_context.canvas_version`): `{context.canvas_version}` in a tool's
    /// URL, query or body.
    pub canvas_version: Option<String>,
}

pub trait Tool: Send + Sync + std::fmt::Debug {
    fn definition(&self) -> ToolDefinition;
    /// Whether calling it twice has the effect of calling it once (a call cut by a takeover is made again).
    fn idempotent(&self) -> bool {
        true
    }
    /// Whether it acts as the caller, sending their bearer token on.
    fn uses_caller_token(&self) -> bool {
        false
    }
    fn call<'a>(
        &'a self,
        args: Value,
        ctx: &'a ToolContext,
    ) -> Pin<Box<dyn Future<Output = ToolResult> + Send + 'a>>;
}

/// One tool with its compiled schema, built once.
#[derive(Debug)]
struct Entry {
    schema: ArgsSchema,
    tool: Arc<dyn Tool>,
}

/// Every tool a run may offer, by name.
#[derive(Debug, Clone)]
pub struct ToolRegistry {
    /// Each tool, at the place of its definition in `definitions`.
    tools: Arc<[Entry]>,
    /// The tools' definitions (names, descriptions, schemas), as every run offers them to the model: made once and
    /// shared, not copied into each run (a run holds them for as long as it lasts).
    definitions: Arc<[ToolDefinition]>,
    /// Whether a tool sends the caller's bearer token on: only then does a run keep a copy of it.
    uses_caller_token: bool,
}

impl Default for ToolRegistry {
    /// The built-in tools only.
    fn default() -> Self {
        Self::of(built_ins())
    }
}

fn built_ins() -> Vec<(ToolDefinition, Entry)> {
    let mut tools = Vec::new();
    add(&mut tools, Arc::new(CurrentTime)).expect("the built-in schema compiles");
    tools
}

fn add(tools: &mut Vec<(ToolDefinition, Entry)>, tool: Arc<dyn Tool>) -> Result<(), String> {
    let definition = tool.definition();
    let schema = ArgsSchema::compile(&definition.parameters).map_err(|e| {
        format!(
            "tool {:?}: parameters is not a valid JSON Schema: {e}",
            definition.name
        )
    })?;
    tools.push((definition, Entry { schema, tool }));
    Ok(())
}

impl ToolRegistry {
    /// The built-ins plus the tools declared in `file` (YAML or JSON: `{"tools": [...]}`); reads the file.
    pub fn load(file: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        let declared = http::parse(&text).map_err(|e| format!("{}: {e}", file.display()))?;
        let mut tools = built_ins();
        for tool in declared {
            let name = tool.definition().name;
            if tools.iter().any(|(definition, _)| definition.name == name) {
                return Err(format!(
                    "{}: tool {name:?} is declared twice",
                    file.display()
                ));
            }
            add(&mut tools, tool).map_err(|e| format!("{}: {e}", file.display()))?;
        }
        Ok(Self::of(tools))
    }

    fn of(tools: Vec<(ToolDefinition, Entry)>) -> Self {
        let uses_caller_token = tools
            .iter()
            .any(|(_, entry)| entry.tool.uses_caller_token());
        let (definitions, tools): (Vec<_>, Vec<_>) = tools.into_iter().unzip();
        Self {
            definitions: definitions.into(),
            tools: tools.into(),
            uses_caller_token,
        }
    }

    fn entry(&self, name: &str) -> Option<&Entry> {
        self.definitions
            .iter()
            .position(|definition| definition.name == name)
            .map(|at| &self.tools[at])
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Tool>> {
        self.entry(name).map(|entry| &entry.tool)
    }

    /// Whether a tool sends the caller's bearer token on (an HTTP tool does; the built-ins do not).
    pub fn uses_caller_token(&self) -> bool {
        self.uses_caller_token
    }

    pub fn definitions(&self) -> Arc<[ToolDefinition]> {
        Arc::clone(&self.definitions)
    }

    /// Whether the named tool may be called again after a cut call; an unknown tool may not.
    pub fn idempotent(&self, name: &str) -> bool {
        self.entry(name)
            .is_some_and(|entry| entry.tool.idempotent())
    }

    /// Runs the named tool; an unknown name or bad args are an error result.
    pub async fn call(&self, name: &str, args: Value, ctx: &ToolContext) -> ToolResult {
        let entry = self
            .entry(name)
            .ok_or_else(|| ToolError::Unknown(name.to_owned()))?;
        entry.schema.check(&args).map_err(ToolError::InvalidArgs)?;
        entry.tool.call(args, ctx).await
    }
}

/// Tells the model the current UTC time; harmless and offline.
#[derive(Debug)]
struct CurrentTime;

impl Tool for CurrentTime {
    fn definition(&self) -> ToolDefinition {
        ToolDefinition {
            name: "current_time".to_owned(),
            description: "The current date and time in UTC (RFC 3339).".to_owned(),
            parameters: json!({"type": "object", "properties": {}, "additionalProperties": false}),
        }
    }

    fn call<'a>(
        &'a self,
        _args: Value,
        _ctx: &'a ToolContext,
    ) -> Pin<Box<dyn Future<Output = ToolResult> + Send + 'a>> {
        Box::pin(async {
            let now = time::OffsetDateTime::now_utc();
            let utc = now
                .format(&time::format_description::well_known::Rfc3339)
                .map_err(|e| ToolError::Internal(format!("could not format the time: {e}")))?;
            Ok(json!({ "utc": utc }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn current_time_answers_an_rfc3339_utc_time() {
        let registry = ToolRegistry::default();
        let answer = registry
            .call("current_time", json!({}), &ToolContext::default())
            .await
            .unwrap();
        let utc = answer["utc"].as_str().unwrap();
        assert!(
            time::OffsetDateTime::parse(utc, &time::format_description::well_known::Rfc3339)
                .is_ok()
        );
        assert!(
            registry
                .call("nope", json!({}), &ToolContext::default())
                .await
                .is_err()
        );
        let extra = registry
            .call("current_time", json!({"x": 1}), &ToolContext::default())
            .await;
        assert_eq!(
            extra.unwrap_err().to_string(),
            "args.x is not a known argument"
        );
    }

    #[test]
    fn a_tools_file_is_checked_when_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tools.yaml");
        std::fs::write(
            &path,
            "tools:\n  - name: list_nodes\n    description: Nodes of a canvas\n    url: http://127.0.0.1:1/canvases/{canvas}/nodes\n    parameters:\n      type: object\n      required: [canvas]\n      properties:\n        canvas: {type: string}\n",
        )
        .unwrap();
        let registry = ToolRegistry::load(&path).unwrap();
        assert!(registry.get("list_nodes").is_some());
        assert!(registry.get("current_time").is_some());
        assert!(
            registry.uses_caller_token(),
            "an HTTP tool sends the caller's token on"
        );
        assert!(
            !ToolRegistry::default().uses_caller_token(),
            "the built-ins do not"
        );
        for (text, error) in [
            (
                "tools:\n  - name: x\n    description: d\n    url: ftp://nope\n",
                "must start with http",
            ),
            (
                "tools:\n  - name: current_time\n    description: d\n    url: http://x\n",
                "declared twice",
            ),
            (
                "tools: [{name: x, description: d, url: http://x, color: red}]",
                "unknown field",
            ),
            (
                "tools: [{name: x, description: d, url: http://x, parameters: {type: object, properties: {n: {minimum: one}}}}]",
                "not a valid JSON Schema",
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            let got = ToolRegistry::load(&path).unwrap_err();
            assert!(got.contains(error), "{text}: {got}");
        }
    }
}
