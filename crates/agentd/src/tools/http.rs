//! HTTP tools declared in `TOOLS_FILE`: each calls the product's API on the caller's behalf. It forwards the caller's
//! bearer token and `x-organization-id`, fills `{arg}` placeholders of its URL (percent-encoded, so a value stays one
//! path segment), puts the args it names in the query or a JSON body, and gives the JSON answer to the model.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{Tool, ToolContext, ToolError, ToolResult};
use crate::model::ToolDefinition;

/// Default time an HTTP tool may take.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of a failing tool's answer is shown to the model.
const ERROR_BODY: usize = 500;

/// Everything but RFC 3986's unreserved characters is encoded in a path value.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The tools declared in a tools file's text (YAML or JSON), each checked; they share one HTTP client.
pub(super) fn parse(text: &str) -> Result<Vec<Arc<dyn Tool>>, String> {
    let spec: ToolsFile = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
    let client = reqwest::Client::new();
    spec.tools
        .into_iter()
        .map(|tool| Ok(Arc::new(HttpTool::new(tool, client.clone())?) as Arc<dyn Tool>))
        .collect()
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
    /// Whether a call may be made twice with the same effect, so a call cut by the loss of its run's producer is
    /// made again after a takeover; `GET`, `HEAD` and `OPTIONS` tools are by default, others are not.
    #[serde(default)]
    idempotent: Option<bool>,
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

    fn url(&self, args: &Map<String, Value>) -> Result<reqwest::Url, ToolError> {
        let mut url = self.spec.url.clone();
        for (name, value) in args {
            let placeholder = format!("{{{name}}}");
            if !url.contains(&placeholder) {
                continue;
            }
            let value = plain(value);
            // `.` and `..` are not encoded, and would move the request out of its path segment.
            if value == "." || value == ".." {
                return Err(ToolError::BadUrl(format!(
                    "argument {name} may not be {value:?}: it would leave its path segment"
                )));
            }
            let encoded = utf8_percent_encode(&value, SEGMENT).to_string();
            url = url.replace(&placeholder, &encoded);
        }
        if url.contains('{') {
            return Err(ToolError::BadUrl(
                "needs an argument that was not given".to_owned(),
            ));
        }
        let mut url = reqwest::Url::parse(&url)
            .map_err(|e| ToolError::BadUrl(format!("is not valid: {e}")))?;
        for name in &self.spec.query {
            if let Some(value) = args.get(name) {
                url.query_pairs_mut()
                    .append_pair(sent_as(name), &plain(value));
            }
        }
        Ok(url)
    }
}

impl Tool for HttpTool {
    fn uses_caller_token(&self) -> bool {
        true
    }

    fn definition(&self) -> ToolDefinition {
        ToolDefinition {
            name: self.spec.name.clone(),
            description: self.spec.description.clone(),
            parameters: self.spec.parameters.clone(),
        }
    }

    fn idempotent(&self) -> bool {
        self.spec.idempotent.unwrap_or(matches!(
            self.method,
            reqwest::Method::GET | reqwest::Method::HEAD | reqwest::Method::OPTIONS
        ))
    }

    fn call<'a>(
        &'a self,
        args: Value,
        ctx: &'a ToolContext,
    ) -> Pin<Box<dyn Future<Output = ToolResult> + Send + 'a>> {
        Box::pin(async move {
            let mut args = args.as_object().cloned().unwrap_or_default();
            // What the client's context gives, never what the model made up.
            args.retain(|name, _| !name.starts_with(CONTEXT_PREFIX));
            if let Some(version) = &ctx.canvas_version {
                args.insert(CANVAS_VERSION.to_owned(), Value::String(version.clone()));
            }
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
                    .map(|(name, value)| (sent_as(name).to_owned(), value.clone()))
                    .collect();
                request = request.json(&body);
            }
            let response = request.send().await.map_err(|e| {
                if e.is_timeout() {
                    ToolError::Timeout(self.timeout.as_millis())
                } else {
                    ToolError::Unreachable
                }
            })?;
            let status = response.status();
            let text = response
                .text()
                .await
                .map_err(|_| ToolError::UnreadableAnswer)?;
            if !status.is_success() {
                let shown: String = text.chars().take(ERROR_BODY).collect();
                return Err(ToolError::ErrorStatus {
                    status: status.as_u16(),
                    body: shown,
                });
            }
            Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
        })
    }
}

/// Names of what the client's context gives a tool, beside the model's args: `{context.canvas_version}`.
const CONTEXT_PREFIX: &str = "context.";
const CANVAS_VERSION: &str = "context.canvas_version";

/// The name a query parameter or body field is sent under: a context value without its `context.` prefix.
fn sent_as(name: &str) -> &str {
    name.strip_prefix(CONTEXT_PREFIX).unwrap_or(name)
}

/// A value as it goes into a URL: strings without quotes, everything else as JSON.
fn plain(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_values_stay_one_segment() {
        let encode = |v: &str| utf8_percent_encode(v, SEGMENT).to_string();
        assert_eq!(encode("a b/c?d"), "a%20b%2Fc%3Fd");
        assert_eq!(encode("canvas-1_x.y~"), "canvas-1_x.y~");
    }

    #[tokio::test]
    async fn dot_segments_never_leave_their_place_in_the_path() {
        let tools = parse(
            "tools:\n  - name: nodes\n    description: d\n    url: \"http://127.0.0.1:9/api/canvases/{canvas}/nodes\"\n",
        )
        .unwrap();
        let ctx = ToolContext::default();
        for bad in [".", ".."] {
            let result = tools[0].call(json!({"canvas": bad}), &ctx).await;
            assert!(
                matches!(result, Err(ToolError::BadUrl(ref why)) if why.contains("path segment")),
                "{bad}: {result:?}"
            );
        }
        // Encoded dots stay encoded: `%2e%2e` is sent as `%252e%252e`, a name, not a step up.
        let url = HttpTool::new(
            serde_yaml::from_str("name: n\ndescription: d\nurl: \"http://h/a/{x}/b\"\n").unwrap(),
            reqwest::Client::new(),
        )
        .unwrap()
        .url(json!({"x": "%2e%2e"}).as_object().unwrap())
        .unwrap();
        assert_eq!(url.path(), "/a/%252e%252e/b");
    }
}
