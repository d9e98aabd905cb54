//! Errors a client can see before a stream starts, and how each maps onto HTTP: a status from the error table
//! ([`crate::error::ErrorCode`]) and a JSON body `{"detail": ...}`. Errors after a stream started are `run_failed`
//! events. A client's mistake gets its real status and a clear message; an internal error gets a generic body and is
//! logged once, with its cause, where it happens.

use std::borrow::Cow;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::json;

use crate::auth::AuthError;
use crate::error::ErrorCode;
use crate::runs::RunError;
use crate::store::{RunStatus, StoreError};
use crate::stream_tracker::Rejection;

/// What the client is told to wait before retrying a refused stream, in seconds. A replica that is shutting down is
/// already out of the load balancer by then, so the retry lands elsewhere.
const RETRY_AFTER_SECONDS: &str = "1";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("request body failed validation")]
    Validation(Vec<FieldError>),
    #[error("request body is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("request body must be JSON (content-type: application/json)")]
    UnsupportedMediaType,
    #[error("request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("the request body did not arrive within {seconds} s")]
    RequestTimeout { seconds: u64 },
    #[error("could not read the request body")]
    BadBody,
    #[error("Not authenticated: {0}")]
    Unauthorized(AuthError),
    #[error("more than one Authorization header")]
    DuplicateAuthorization,
    #[error("Not Found")]
    RouteNotFound,
    /// The chat does not exist or is not the caller's; the two are not told apart.
    #[error("Chat not found")]
    ChatNotFound,
    /// The run does not exist or is not of this chat; the two are not told apart.
    #[error("Run not found")]
    RunNotFound,
    #[error("The chat has a run going; attach to it or wait for it to end")]
    ChatBusy { run_id: uuid::Uuid },
    #[error("The run already ended ({status})")]
    RunEnded { status: RunStatus },
    #[error("The run's events are no longer kept; its answer is in the chat's messages")]
    LogSwept,
    /// The session store did not answer; the cause is logged where it happened.
    #[error("Session store is unavailable; retry shortly")]
    StoreUnavailable,
    /// The store refused the request; a retry cannot help. The cause is logged where it happened.
    #[error("The session store refused the request")]
    StoreRefused,
    #[error("Method Not Allowed")]
    MethodNotAllowed,
    #[error("Service is shutting down")]
    ShuttingDown,
    #[error("Stream limit reached ({limit} open streams); retry shortly")]
    AtCapacity { limit: usize },
}

/// One field's problem, in the shape FastAPI clients of the seed already parse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// Where the problem is, e.g. `["body", "question"]`.
    pub loc: Vec<Cow<'static, str>>,
    pub msg: String,
    /// A stable machine-readable kind, e.g. `missing`, `string_too_long`.
    #[serde(rename = "type")]
    pub kind: &'static str,
}

impl FieldError {
    pub fn body(field: &'static str, kind: &'static str, msg: impl Into<String>) -> Self {
        Self {
            loc: if field.is_empty() {
                vec!["body".into()]
            } else {
                vec!["body".into(), field.into()]
            },
            msg: msg.into(),
            kind,
        }
    }

    /// A field nested in the body, e.g. `["body", "agent_context", "mode"]`.
    pub fn nested(
        path: &[&'static str],
        key: Option<String>,
        kind: &'static str,
        msg: impl Into<String>,
    ) -> Self {
        let mut loc: Vec<Cow<'static, str>> = vec!["body".into()];
        loc.extend(path.iter().map(|p| Cow::Borrowed(*p)));
        loc.extend(key.map(Cow::Owned));
        Self {
            loc,
            msg: msg.into(),
            kind,
        }
    }

    /// Where to resume a run: the `Last-Event-ID` header or the `after` query parameter.
    pub fn resume(field: &'static str, kind: &'static str, msg: impl Into<String>) -> Self {
        Self {
            loc: if field == "after" {
                vec!["query".into(), "after".into()]
            } else {
                vec!["header".into(), field.into()]
            },
            msg: msg.into(),
            kind,
        }
    }

    /// The path itself, when its parameters cannot be read (say, `%ff`: not UTF-8).
    pub fn unreadable_path() -> Self {
        Self {
            loc: vec!["path".into()],
            msg: "Path parameters should be valid UTF-8".to_owned(),
            kind: "string_unicode",
        }
    }

    pub fn path(param: &'static str, kind: &'static str, msg: impl Into<String>) -> Self {
        Self {
            loc: vec!["path".into(), param.into()],
            msg: msg.into(),
            kind,
        }
    }
}

impl ApiError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Validation(_) => ErrorCode::InvalidRequest,
            Self::MalformedJson(_) => ErrorCode::MalformedJson,
            Self::BadBody => ErrorCode::BadBody,
            Self::UnsupportedMediaType => ErrorCode::UnsupportedMediaType,
            Self::PayloadTooLarge { .. } => ErrorCode::PayloadTooLarge,
            Self::RequestTimeout { .. } => ErrorCode::RequestTimeout,
            Self::Unauthorized(_) => ErrorCode::Unauthenticated,
            Self::RouteNotFound => ErrorCode::RouteNotFound,
            Self::ChatNotFound => ErrorCode::ChatNotFound,
            Self::RunNotFound => ErrorCode::RunNotFound,
            Self::ChatBusy { .. } => ErrorCode::ChatBusy,
            Self::RunEnded { .. } => ErrorCode::RunEnded,
            Self::LogSwept => ErrorCode::LogSwept,
            Self::MethodNotAllowed => ErrorCode::MethodNotAllowed,
            Self::ShuttingDown => ErrorCode::ShuttingDown,
            Self::AtCapacity { .. } => ErrorCode::AtCapacity,
            Self::StoreUnavailable => ErrorCode::StoreUnavailable,
            Self::StoreRefused => ErrorCode::StoreRefused,
            Self::DuplicateAuthorization => ErrorCode::BadRequest,
        }
    }

    pub fn status(&self) -> StatusCode {
        self.code().info().http
    }
}

impl From<Rejection> for ApiError {
    fn from(rejection: Rejection) -> Self {
        match rejection {
            Rejection::ShuttingDown => Self::ShuttingDown,
            Rejection::AtCapacity { limit } => Self::AtCapacity { limit },
        }
    }
}

/// A store failure before the stream starts; logged here, once, with its cause.
impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            // Deleted between the lookup and the write.
            StoreError::ChatNotFound(_) => Self::ChatNotFound,
            error if error.is_unavailable() => {
                tracing::error!(%error, "session store unavailable");
                Self::StoreUnavailable
            }
            error => {
                tracing::error!(%error, "session store refused a request");
                Self::StoreRefused
            }
        }
    }
}

/// Why a request about a run was refused, as the client is told it; a store failure is logged here, once, with its
/// cause.
impl From<RunError> for ApiError {
    fn from(error: RunError) -> Self {
        let model_error =
            |kind, msg: String| Self::Validation(vec![FieldError::body("model", kind, msg)]);
        match error {
            RunError::ModelNotAllowed(_) => model_error("model_not_allowed", error.to_string()),
            RunError::ModelOverLimit(_) => model_error("model_over_limit", error.to_string()),
            RunError::UnknownTool(_) => model_error("unknown_tool", error.to_string()),
            RunError::Unauthorized(reason) => Self::Unauthorized(reason),
            RunError::ChatNotFound => Self::ChatNotFound,
            RunError::RunNotFound => Self::RunNotFound,
            RunError::ChatBusy(run_id) => Self::ChatBusy { run_id },
            RunError::RunEnded(status) => Self::RunEnded { status },
            RunError::AfterLast { field, last } => Self::Validation(vec![FieldError::resume(
                field,
                "after_last_event",
                format!("the run's last event is {last}"),
            )]),
            RunError::LogSwept => Self::LogSwept,
            RunError::Rejected(rejection) => rejection.into(),
            RunError::Store(error) => error.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let detail = match &self {
            Self::Validation(errors) => json!(errors),
            other => json!(other.to_string()),
        };
        let mut body = json!({ "detail": detail, "code": self.code().as_str() });
        match &self {
            Self::ChatBusy { run_id } => body["run_id"] = json!(run_id),
            Self::RunEnded { status } => body["status"] = json!(status.as_str()),
            _ => {}
        }
        let mut response = (status, Json(body)).into_response();
        let headers = response.headers_mut();
        match self {
            // Close the connection after the answer: the client's retry should open one to a replica that stays, and
            // a full replica should not hold a descriptor for a client it just turned away.
            Self::ShuttingDown | Self::AtCapacity { .. } => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from_static(RETRY_AFTER_SECONDS),
                );
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Self::Unauthorized(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Self::StoreUnavailable => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from_static(RETRY_AFTER_SECONDS),
                );
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_that_refuses_a_request_is_not_reported_as_down() {
        let refused = ApiError::from(StoreError::Corrupt("bad value".into()));
        assert!(matches!(refused, ApiError::StoreRefused));
        assert_eq!(refused.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let down = ApiError::from(StoreError::Database(sqlx::Error::PoolTimedOut));
        assert!(matches!(down, ApiError::StoreUnavailable));
        assert_eq!(down.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn http_errors_take_their_status_from_the_table() {
        assert_eq!(ApiError::ChatNotFound.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            ApiError::AtCapacity { limit: 1 }.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            ApiError::Validation(Vec::new()).status(),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            ApiError::MethodNotAllowed.status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }
}
