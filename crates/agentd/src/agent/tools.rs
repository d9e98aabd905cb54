//! Tools a model may call: the built-in `current_time`, and HTTP tools declared in `TOOLS_FILE`.
//!
//! An HTTP tool calls the product's API on the caller's behalf: it forwards the caller's bearer token and
//! `x-organization-id`, fills `{arg}` placeholders of its URL, puts the args it names in the query or a JSON body,
//! and gives the JSON answer to the model. Args are checked against the tool's schema first. A tool that fails (bad
//! args, an error status, a timeout) gives the model an error result; it never fails the run by itself.
//!
//! The schema check covers the subset of JSON Schema tools use: `type` (object, string, integer, number, boolean,
//! array), `properties`, `required`, `enum` and `additionalProperties: false`; other keywords are not checked.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::config::Secret;
use crate::model::ToolDefinition;

/// What a tool call gives back to the model: a JSON answer, or an error message the model can read.
pub type ToolResult = Result<Value, String>;

/// Default time an HTTP tool may take.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of a failing tool's answer is shown to the model.
const ERROR_BODY: usize = 500;

/// Who the run acts for, so tools can act for them too.
#[derive(Debug, Clone, Default)]
pub struct ToolContext {
    /// The caller's bearer token, forwarded by HTTP tools; `None` in dev mode.
    pub bearer: Option<Secret>,
    pub org_id: String,
}

pub trait Tool: Send + Sync + std::fmt::Debug {
    fn definition(&self) -> ToolDefinition;
    fn call<'a>(
        &'a self,
        args: Value,
        ctx: &'a ToolContext,
    ) -> Pin<Box<dyn Future<Output = ToolResult> + Send + 'a>>;
}

/// Every tool a run may offer, by name.
#[derive(Debug, Clone)]
pub struct ToolRegistry {
    /// Each tool with its definition, built once: lookups by name and the definitions every run offers the model
    /// would otherwise rebuild them (names, descriptions, schemas) on every call.
    tools: Vec<(ToolDefinition, Arc<dyn Tool>)>,
}

impl Default for ToolRegistry {
    /// The built-in tools only.
    fn default() -> Self {
        let mut registry = Self { tools: Vec::new() };
        registry.add(Arc::new(CurrentTime));
        registry
    }
}

impl ToolRegistry {
    /// The built-ins plus the tools declared in `file` (YAML or JSON: `{"tools": [...]}`).
    pub fn load(file: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        let spec: ToolsFile =
            serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))?;
        let client = reqwest::Client::new();
        let mut registry = Self::default();
        for tool in spec.tools {
            if registry.get(&tool.name).is_some() {
                return Err(format!(
                    "{}: tool {:?} is declared twice",
                    file.display(),
                    tool.name
                ));
            }
            registry.add(Arc::new(HttpTool::new(tool, client.clone())?));
        }
        Ok(registry)
    }

    fn add(&mut self, tool: Arc<dyn Tool>) {
        self.tools.push((tool.definition(), tool));
    }

    fn entry(&self, name: &str) -> Option<&(ToolDefinition, Arc<dyn Tool>)> {
        self.tools
            .iter()
            .find(|(definition, _)| definition.name == name)
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Tool>> {
        self.entry(name).map(|(_, tool)| tool)
    }

    pub fn definitions(&self) -> Vec<ToolDefinition> {
        self.tools
            .iter()
            .map(|(definition, _)| definition.clone())
            .collect()
    }

    /// Runs the named tool; an unknown name or bad args are an error result.
    pub async fn call(&self, name: &str, args: Value, ctx: &ToolContext) -> ToolResult {
        let (definition, tool) = self
            .entry(name)
            .ok_or_else(|| format!("there is no tool named {name:?}"))?;
        validate(&definition.parameters, &args, "args")?;
        tool.call(args, ctx).await
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
                .map_err(|e| format!("could not format the time: {e}"))?;
            Ok(json!({ "utc": utc }))
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ToolsFile {
    tools: Vec<HttpToolSpec>,
}

/// One tool of the tools file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpToolSpec {
    name: String,
    description: String,
    /// JSON Schema of the args (an object).
    #[serde(default = "empty_object_schema")]
    parameters: Value,
    #[serde(default = "get")]
    method: String,
    /// With `{arg}` placeholders, filled from the args (percent-encoded).
    url: String,
    /// Args sent as query parameters.
    #[serde(default)]
    query: Vec<String>,
    /// Args sent as the JSON body.
    #[serde(default)]
    body: Vec<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

fn empty_object_schema() -> Value {
    json!({"type": "object", "properties": {}})
}

fn get() -> String {
    "GET".to_owned()
}

#[derive(Debug)]
struct HttpTool {
    spec: HttpToolSpec,
    method: reqwest::Method,
    timeout: Duration,
    client: reqwest::Client,
}

impl HttpTool {
    fn new(spec: HttpToolSpec, client: reqwest::Client) -> Result<Self, String> {
        let method = reqwest::Method::from_bytes(spec.method.to_ascii_uppercase().as_bytes())
            .map_err(|_| {
                format!(
                    "tool {:?}: {:?} is not an HTTP method",
                    spec.name, spec.method
                )
            })?;
        if !spec.url.starts_with("http://") && !spec.url.starts_with("https://") {
            return Err(format!(
                "tool {:?}: url must start with http:// or https://",
                spec.name
            ));
        }
        if spec.parameters["type"] != "object" {
            return Err(format!(
                "tool {:?}: parameters must be an object schema",
                spec.name
            ));
        }
        Ok(Self {
            timeout: spec
                .timeout_ms
                .map(Duration::from_millis)
                .unwrap_or(DEFAULT_TIMEOUT),
            method,
            spec,
            client,
        })
    }

    fn url(&self, args: &Map<String, Value>) -> Result<reqwest::Url, String> {
        let mut url = self.spec.url.clone();
        for (name, value) in args {
            url = url.replace(&format!("{{{name}}}"), &percent_encode(&plain(value)));
        }
        if url.contains('{') {
            return Err("the tool's URL needs an argument that was not given".to_owned());
        }
        let mut url =
            reqwest::Url::parse(&url).map_err(|e| format!("the tool's URL is not valid: {e}"))?;
        for name in &self.spec.query {
            if let Some(value) = args.get(name) {
                url.query_pairs_mut().append_pair(name, &plain(value));
            }
        }
        Ok(url)
    }
}

impl Tool for HttpTool {
    fn definition(&self) -> ToolDefinition {
        ToolDefinition {
            name: self.spec.name.clone(),
            description: self.spec.description.clone(),
            parameters: self.spec.parameters.clone(),
        }
    }

    fn call<'a>(
        &'a self,
        args: Value,
        ctx: &'a ToolContext,
    ) -> Pin<Box<dyn Future<Output = ToolResult> + Send + 'a>> {
        Box::pin(async move {
            let args = args.as_object().cloned().unwrap_or_default();
            let mut request = self
                .client
                .request(self.method.clone(), self.url(&args)?)
                .timeout(self.timeout)
                .header("x-organization-id", &ctx.org_id);
            if let Some(token) = &ctx.bearer {
                request = request.bearer_auth(token.expose());
            }
            if !self.spec.body.is_empty() {
                let body: Map<String, Value> = args
                    .iter()
                    .filter(|(name, _)| self.spec.body.contains(name))
                    .map(|(name, value)| (name.clone(), value.clone()))
                    .collect();
                request = request.json(&body);
            }
            let response = request.send().await.map_err(|e| {
                if e.is_timeout() {
                    format!("the tool timed out after {} ms", self.timeout.as_millis())
                } else {
                    "the tool's service could not be reached".to_owned()
                }
            })?;
            let status = response.status();
            let text = response
                .text()
                .await
                .map_err(|_| "the tool's answer could not be read".to_owned())?;
            if !status.is_success() {
                let shown: String = text.chars().take(ERROR_BODY).collect();
                return Err(format!("the tool's service answered {status}: {shown}"));
            }
            Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
        })
    }
}

/// A value as it goes into a URL: strings without quotes, everything else as JSON.
fn plain(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters, so a value stays one path segment.
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Checks `value` against the subset of JSON Schema named in the module docs.
pub fn validate(schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        return Err(format!(
            "{at} must be one of {}",
            Value::Array(allowed.clone())
        ));
    }
    let Some(kind) = schema["type"].as_str() else {
        return Ok(());
    };
    let fits = match kind {
        "object" => value.is_object(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "array" => value.is_array(),
        "null" => value.is_null(),
        _ => true,
    };
    if !fits {
        return Err(format!("{at} must be of type {kind}"));
    }
    if let (Some(object), "object") = (value.as_object(), kind) {
        let properties = schema["properties"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        for name in schema["required"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if !object.contains_key(name) {
                return Err(format!("{at}.{name} is required"));
            }
        }
        let closed = schema["additionalProperties"] == Value::Bool(false);
        for (name, item) in object {
            match properties.get(name) {
                Some(property) => validate(property, item, &format!("{at}.{name}"))?,
                None if closed => return Err(format!("{at}.{name} is not a known argument")),
                None => {}
            }
        }
    }
    if let (Some(items), Some(schema)) = (value.as_array(), schema.get("items")) {
        for (i, item) in items.iter().enumerate() {
            validate(schema, item, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
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
        assert_eq!(extra.unwrap_err(), "args.x is not a known argument");
    }

    #[test]
    fn the_schema_subset_is_checked() {
        let schema = json!({
            "type": "object",
            "required": ["id"],
            "properties": {
                "id": {"type": "string"},
                "limit": {"type": "integer"},
                "kind": {"enum": ["a", "b"]},
                "tags": {"type": "array", "items": {"type": "string"}},
            },
        });
        assert!(
            validate(
                &schema,
                &json!({"id": "x", "limit": 3, "kind": "a", "tags": ["t"]}),
                "args"
            )
            .is_ok()
        );
        for (args, error) in [
            (json!({}), "args.id is required"),
            (json!({"id": 1}), "args.id must be of type string"),
            (
                json!({"id": "x", "limit": 1.5}),
                "args.limit must be of type integer",
            ),
            (json!({"id": "x", "kind": "c"}), "args.kind must be one of"),
            (
                json!({"id": "x", "tags": [1]}),
                "args.tags[0] must be of type string",
            ),
            (json!("x"), "args must be of type object"),
        ] {
            let got = validate(&schema, &args, "args").unwrap_err();
            assert!(got.starts_with(error), "{args}: {got}");
        }
    }

    #[test]
    fn url_values_stay_one_segment() {
        assert_eq!(percent_encode("a b/c?d"), "a%20b%2Fc%3Fd");
        assert_eq!(percent_encode("canvas-1_x.y~"), "canvas-1_x.y~");
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
        std::fs::write(
            &path,
            "tools:\n  - name: x\n    description: d\n    url: ftp://nope\n",
        )
        .unwrap();
        assert!(
            ToolRegistry::load(&path)
                .unwrap_err()
                .contains("must start with http")
        );
        std::fs::write(
            &path,
            "tools:\n  - name: current_time\n    description: d\n    url: http://x\n",
        )
        .unwrap();
        assert!(
            ToolRegistry::load(&path)
                .unwrap_err()
                .contains("declared twice")
        );
        std::fs::write(
            &path,
            "tools: [{name: x, description: d, url: http://x, color: red}]",
        )
        .unwrap();
        assert!(
            ToolRegistry::load(&path)
                .unwrap_err()
                .contains("unknown field")
        );
    }
}
