//! The stream route's request body, checked before a run starts: `question`, `model`, `agent_context`, the content
//! type and the time the body may take to arrive. Every problem is an HTTP error (a 422 names each field).

use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode, header};
use bytes::Bytes;
use serde_json::Value;
use std::time::Duration;

use super::MAX_BODY_BYTES;
use super::error::{ApiError, FieldError};
use crate::model::ModelSpec;
use crate::runs::{AgentContext, ContextMode};

const QUESTION_MAX_CHARS: usize = 2000;
const MODEL_MAX_CHARS: usize = 200;
const CANVAS_VERSION_MAX_CHARS: usize = 200;
/// How long a request body may take to arrive, whole.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// The request body, checked: `question` 1–2000 characters, `model` 1–200 characters and known, `agent_context` as
/// the seed checked it (below). Unknown keys at the top are ignored.
#[derive(Debug)]
pub struct StreamRequest {
    pub question: String,
    pub model: Option<ModelSpec>,
    pub context: AgentContext,
}

impl<S: Send + Sync> FromRequest<S> for StreamRequest {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        if !is_json(req.headers().get(header::CONTENT_TYPE)) {
            return Err(ApiError::UnsupportedMediaType);
        }
        // A body announced larger than the limit is refused before any of it is read.
        let announced = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if announced.is_some_and(|length| length > MAX_BODY_BYTES as u64) {
            return Err(ApiError::PayloadTooLarge {
                limit: MAX_BODY_BYTES,
            });
        }
        // A body that trickles in (or stops) holds a connection, and the shutdown with it: it gets a bounded time.
        let read = tokio::time::timeout(BODY_TIMEOUT, Bytes::from_request(req, state));
        let bytes = read
            .await
            .map_err(|_| ApiError::RequestTimeout {
                seconds: BODY_TIMEOUT.as_secs(),
            })?
            .map_err(|rejection| match rejection {
                BytesRejection::FailedToBufferBody(e)
                    if e.status() == StatusCode::PAYLOAD_TOO_LARGE =>
                {
                    ApiError::PayloadTooLarge {
                        limit: MAX_BODY_BYTES,
                    }
                }
                _ => ApiError::BadBody,
            })?;
        let body: Value =
            serde_json::from_slice(&bytes).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
        Self::parse(body).map_err(ApiError::Validation)
    }
}

impl StreamRequest {
    fn parse(body: Value) -> Result<Self, Vec<FieldError>> {
        let Value::Object(mut body) = body else {
            return Err(vec![FieldError::body(
                "",
                "model_attributes_type",
                "body must be a JSON object",
            )]);
        };
        let mut errors = Vec::new();
        let question = match body.remove("question") {
            None | Some(Value::Null) => {
                errors.push(FieldError::body("question", "missing", "Field required"));
                None
            }
            Some(value) => text_field(value, "question", QUESTION_MAX_CHARS, &mut errors),
        };
        let model = match body.remove("model") {
            None | Some(Value::Null) => None,
            Some(value) => {
                text_field(value, "model", MODEL_MAX_CHARS, &mut errors).and_then(|id| {
                    ModelSpec::parse(&id)
                        .map_err(|e| {
                            errors.push(FieldError::body("model", "unknown_model", e.to_string()))
                        })
                        .ok()
                })
            }
        };
        let context = match body.remove("agent_context") {
            None | Some(Value::Null) => Some(AgentContext::default()),
            Some(value) => agent_context(value, &mut errors),
        };
        match (question, context) {
            (Some(question), Some(context)) if errors.is_empty() => Ok(Self {
                question,
                model,
                context,
            }),
            _ => Err(errors),
        }
    }
}

/// `agent_context`, as the seed checked it: `enabled` a boolean (default false), `mode` `inspect` (default) or
/// `build`, `canvas_version` a string of at most 200 characters or null; no other key. In `inspect` mode
/// `canvas_version` must be null or blank; `enabled` in `build` mode needs it.
fn agent_context(value: Value, errors: &mut Vec<FieldError>) -> Option<AgentContext> {
    const AT: &[&str] = &["agent_context"];
    let Value::Object(fields) = value else {
        errors.push(FieldError::nested(
            AT,
            None,
            "model_attributes_type",
            "Input should be a valid dictionary or object to extract fields from",
        ));
        return None;
    };
    let before = errors.len();
    let mut context = AgentContext::default();
    for (key, value) in fields {
        match (key.as_str(), value) {
            ("enabled", Value::Bool(enabled)) => context.enabled = enabled,
            ("enabled", _) => errors.push(FieldError::nested(
                AT,
                Some(key),
                "bool_type",
                "Input should be a valid boolean",
            )),
            ("mode", Value::String(mode)) if mode == "inspect" => {
                context.mode = ContextMode::Inspect
            }
            ("mode", Value::String(mode)) if mode == "build" => context.mode = ContextMode::Build,
            ("mode", _) => errors.push(FieldError::nested(
                AT,
                Some(key),
                "literal_error",
                "Input should be 'inspect' or 'build'",
            )),
            ("canvas_version", Value::Null) => {}
            ("canvas_version", Value::String(version)) => {
                if version.contains('\0') {
                    errors.push(FieldError::nested(
                        AT,
                        Some(key),
                        "value_error",
                        "Value error, NUL characters are not allowed",
                    ));
                } else if version.chars().count() > CANVAS_VERSION_MAX_CHARS {
                    errors.push(FieldError::nested(
                        AT,
                        Some(key),
                        "string_too_long",
                        format!("String should have at most {CANVAS_VERSION_MAX_CHARS} characters"),
                    ));
                } else if !version.trim().is_empty() {
                    context.canvas_version = Some(version);
                }
            }
            ("canvas_version", _) => errors.push(FieldError::nested(
                AT,
                Some(key),
                "string_type",
                "Input should be a valid string",
            )),
            _ => errors.push(FieldError::nested(
                AT,
                Some(key),
                "extra_forbidden",
                "Extra inputs are not permitted",
            )),
        }
    }
    if errors.len() > before {
        return None;
    }
    let problem = match (context.mode, context.enabled, &context.canvas_version) {
        (ContextMode::Inspect, _, Some(_)) => {
            Some("canvas_version must be null or blank in inspect mode")
        }
        (ContextMode::Build, true, None) => {
            Some("canvas_version is required when enabled in build mode")
        }
        _ => None,
    };
    if let Some(problem) = problem {
        errors.push(FieldError::nested(
            AT,
            None,
            "value_error",
            format!("Value error, {problem}"),
        ));
        return None;
    }
    Some(context)
}

/// A string field of 1 to `max` characters (Unicode scalar values, not bytes).
fn text_field(
    value: Value,
    field: &'static str,
    max: usize,
    errors: &mut Vec<FieldError>,
) -> Option<String> {
    let Value::String(text) = value else {
        errors.push(FieldError::body(
            field,
            "string_type",
            "Input should be a valid string",
        ));
        return None;
    };
    if text.contains('\0') {
        // Neither store keeps NUL the same way (PostgreSQL refuses it): refused alike, before anything is stored.
        errors.push(FieldError::body(
            field,
            "value_error",
            "Value error, NUL characters are not allowed",
        ));
        return None;
    }
    let chars = text.chars().count();
    if chars == 0 {
        errors.push(FieldError::body(
            field,
            "string_too_short",
            "String should have at least 1 character",
        ));
        return None;
    }
    if chars > max {
        errors.push(FieldError::body(
            field,
            "string_too_long",
            format!("String should have at most {max} characters"),
        ));
        return None;
    }
    Some(text)
}

fn is_json(content_type: Option<&HeaderValue>) -> bool {
    let Some(Ok(value)) = content_type.map(HeaderValue::to_str) else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
        || (essence.len() > 5
            && essence[..essence.len() - 5].contains('/')
            && essence.ends_with("+json"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn kinds(body: Value) -> Vec<(Vec<&'static str>, &'static str)> {
        // A key named in a location is owned; a test may leak it to compare with literals.
        let leak = |part: std::borrow::Cow<'static, str>| -> &'static str {
            match part {
                std::borrow::Cow::Borrowed(part) => part,
                std::borrow::Cow::Owned(part) => Box::leak(part.into_boxed_str()),
            }
        };
        StreamRequest::parse(body)
            .unwrap_err()
            .into_iter()
            .map(|e| (e.loc.into_iter().map(leak).collect(), e.kind))
            .collect()
    }

    #[test]
    fn a_good_body_parses_and_unknown_keys_are_ignored() {
        let request =
            StreamRequest::parse(json!({"question": "hi", "model": "test:deltas=2", "x": 1}))
                .unwrap();
        assert_eq!(request.question, "hi");
        assert_eq!(request.model.unwrap().to_string(), "test:deltas=2");
        assert!(
            StreamRequest::parse(json!({"question": "hi", "model": null}))
                .unwrap()
                .model
                .is_none()
        );
    }

    #[test]
    fn lengths_count_characters_not_bytes() {
        assert!(StreamRequest::parse(json!({"question": "é".repeat(2000)})).is_ok());
        assert_eq!(
            kinds(json!({"question": "é".repeat(2001)})),
            vec![(vec!["body", "question"], "string_too_long")]
        );
    }

    #[test]
    fn every_bad_field_is_named() {
        assert_eq!(
            kinds(json!({})),
            vec![(vec!["body", "question"], "missing")]
        );
        assert_eq!(
            kinds(json!([1])),
            vec![(vec!["body"], "model_attributes_type")]
        );
        assert_eq!(
            kinds(json!({"question": "", "model": 5})),
            vec![
                (vec!["body", "question"], "string_too_short"),
                (vec!["body", "model"], "string_type")
            ]
        );
        assert_eq!(
            kinds(json!({"question": "q", "model": "m".repeat(201)})),
            vec![(vec!["body", "model"], "string_too_long")]
        );
        assert_eq!(
            kinds(json!({"question": "q", "model": "gpt-9"})),
            vec![(vec!["body", "model"], "unknown_model")]
        );
    }

    #[test]
    fn agent_context_is_checked_as_the_seed_checked_it() {
        let with = |context: Value| json!({"question": "q", "agent_context": context});
        let ok = |context: Value| StreamRequest::parse(with(context)).unwrap().context;
        assert_eq!(ok(json!({})), AgentContext::default());
        assert_eq!(
            ok(json!({"enabled": true, "mode": "build", "canvas_version": "v7"})),
            AgentContext {
                enabled: true,
                mode: ContextMode::Build,
                canvas_version: Some("v7".into())
            }
        );
        assert_eq!(
            ok(json!({"mode": "inspect", "canvas_version": "  "})).canvas_version,
            None
        );
        assert_eq!(
            ok(json!({"mode": "build", "enabled": false})).mode,
            ContextMode::Build
        );
        let at = |field: &'static str| {
            let mut loc = vec!["body", "agent_context"];
            if !field.is_empty() {
                loc.push(field);
            }
            loc
        };
        let refused = |context: Value| kinds(with(context));
        assert_eq!(refused(json!("build")), [(at(""), "model_attributes_type")]);
        assert_eq!(
            refused(json!({"mode": "edit"})),
            [(at("mode"), "literal_error")]
        );
        assert_eq!(
            refused(json!({"enabled": "yes"})),
            [(at("enabled"), "bool_type")]
        );
        assert_eq!(
            refused(json!({"canvas_version": 7})),
            [(at("canvas_version"), "string_type")]
        );
        assert_eq!(
            refused(json!({"mode": "build", "canvas_version": "v".repeat(201)})),
            [(at("canvas_version"), "string_too_long")]
        );
        assert_eq!(
            refused(json!({"extra": 1})),
            [(at("extra"), "extra_forbidden")]
        );
        assert_eq!(
            refused(json!({"mode": "inspect", "canvas_version": "v1"})),
            [(at(""), "value_error")]
        );
        assert_eq!(
            refused(json!({"enabled": true, "mode": "build", "canvas_version": " "})),
            [(at(""), "value_error")]
        );
    }

    #[test]
    fn json_content_types() {
        let ok = |v: &'static str| is_json(Some(&HeaderValue::from_static(v)));
        assert!(ok("application/json"));
        assert!(ok("Application/JSON; charset=utf-8"));
        assert!(ok("application/vnd.api+json"));
        assert!(!ok("text/plain"));
        assert!(!ok("+json"));
        assert!(!is_json(None));
    }
}
