//! Every failure a client can be told about, in one table of stable codes.
//!
//! [`ErrorCode`] is the table: each kind of failure has one code, with its HTTP status, its gRPC code and whether a
//! retry can help. The HTTP errors (`http/error.rs`), the gRPC statuses (`grpc/`) and the `run_failed` events
//! (`code` beside `error`) all read it, and metrics count run failures by it. A leaf: it imports nothing of the
//! service, so every layer can use it.

use axum::http::StatusCode;

/// One kind of failure a client can see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    InvalidRequest,
    MalformedJson,
    UnsupportedMediaType,
    PayloadTooLarge,
    RequestTimeout,
    BadBody,
    BadRequest,
    Unauthenticated,
    RouteNotFound,
    ChatNotFound,
    RunNotFound,
    ChatBusy,
    RunEnded,
    LogSwept,
    MethodNotAllowed,
    ShuttingDown,
    AtCapacity,
    StoreUnavailable,
    /// The store refused a request for a reason a retry cannot fix.
    StoreRefused,
    ProviderRateLimited,
    ProviderUnavailable,
    ProviderRefused,
    ProviderBrokenStream,
    ProviderStoppedAnswering,
    ProviderFailed,
    ModelFailed,
    MaxStepsReached,
    OutputTruncated,
    InvalidOutput,
    StoreFailed,
    /// Only for clients that know no `run_interrupted` (`CLIENT_COMPAT=seed`): the run was stopped before its end.
    RunInterrupted,
}

/// What the table says of one [`ErrorCode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorInfo {
    /// Stable, machine-readable: clients, logs and metrics may rely on it.
    pub code: &'static str,
    pub http: StatusCode,
    pub grpc: tonic::Code,
    /// Whether the same request, sent again later, can succeed.
    pub retryable: bool,
}

impl ErrorCode {
    pub const ALL: [Self; 31] = [
        Self::InvalidRequest,
        Self::MalformedJson,
        Self::UnsupportedMediaType,
        Self::PayloadTooLarge,
        Self::RequestTimeout,
        Self::BadBody,
        Self::BadRequest,
        Self::Unauthenticated,
        Self::RouteNotFound,
        Self::ChatNotFound,
        Self::RunNotFound,
        Self::ChatBusy,
        Self::RunEnded,
        Self::LogSwept,
        Self::MethodNotAllowed,
        Self::ShuttingDown,
        Self::AtCapacity,
        Self::StoreUnavailable,
        Self::StoreRefused,
        Self::ProviderRateLimited,
        Self::ProviderUnavailable,
        Self::ProviderRefused,
        Self::ProviderBrokenStream,
        Self::ProviderStoppedAnswering,
        Self::ProviderFailed,
        Self::ModelFailed,
        Self::MaxStepsReached,
        Self::OutputTruncated,
        Self::InvalidOutput,
        Self::StoreFailed,
        Self::RunInterrupted,
    ];

    /// The table.
    pub const fn info(self) -> ErrorInfo {
        use tonic::Code as G;
        let (code, http, grpc, retryable) = match self {
            Self::InvalidRequest => ("invalid_request", 422, G::InvalidArgument, false),
            Self::MalformedJson => ("malformed_json", 400, G::InvalidArgument, false),
            Self::UnsupportedMediaType => {
                ("unsupported_media_type", 415, G::InvalidArgument, false)
            }
            Self::PayloadTooLarge => ("payload_too_large", 413, G::InvalidArgument, false),
            Self::RequestTimeout => ("request_timeout", 408, G::DeadlineExceeded, true),
            Self::BadBody => ("bad_body", 400, G::InvalidArgument, false),
            Self::BadRequest => ("bad_request", 400, G::InvalidArgument, false),
            Self::Unauthenticated => ("unauthenticated", 401, G::Unauthenticated, false),
            Self::RouteNotFound => ("route_not_found", 404, G::Unimplemented, false),
            Self::ChatNotFound => ("chat_not_found", 404, G::NotFound, false),
            Self::RunNotFound => ("run_not_found", 404, G::NotFound, false),
            Self::ChatBusy => ("chat_busy", 409, G::FailedPrecondition, true),
            Self::RunEnded => ("run_ended", 409, G::FailedPrecondition, false),
            Self::LogSwept => ("log_swept", 410, G::NotFound, false),
            Self::MethodNotAllowed => ("method_not_allowed", 405, G::Unimplemented, false),
            Self::ShuttingDown => ("shutting_down", 503, G::Unavailable, true),
            Self::AtCapacity => ("at_capacity", 503, G::ResourceExhausted, true),
            Self::StoreUnavailable => ("store_unavailable", 503, G::Unavailable, true),
            Self::StoreRefused => ("store_refused", 500, G::Internal, false),
            Self::ProviderRateLimited => ("provider_rate_limited", 429, G::ResourceExhausted, true),
            Self::ProviderUnavailable => ("provider_unavailable", 503, G::Unavailable, true),
            Self::ProviderRefused => ("provider_refused", 502, G::FailedPrecondition, false),
            Self::ProviderBrokenStream => ("provider_broken_stream", 502, G::Unavailable, true),
            Self::ProviderStoppedAnswering => {
                ("provider_stopped_answering", 504, G::DeadlineExceeded, true)
            }
            Self::ProviderFailed => ("provider_failed", 502, G::Unavailable, true),
            Self::ModelFailed => ("model_failed", 500, G::Internal, false),
            Self::MaxStepsReached => ("max_steps_reached", 500, G::Internal, false),
            Self::InvalidOutput => ("invalid_output", 502, G::Internal, true),
            Self::OutputTruncated => ("model_output_truncated", 502, G::Internal, true),
            Self::StoreFailed => ("store_failed", 503, G::Unavailable, true),
            Self::RunInterrupted => ("run_interrupted", 503, G::Aborted, true),
        };
        let http = match StatusCode::from_u16(http) {
            Ok(status) => status,
            Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ErrorInfo {
            code,
            http,
            grpc,
            retryable,
        }
    }

    pub const fn as_str(self) -> &'static str {
        self.info().code
    }

    /// A gRPC status of this kind with `message`.
    pub fn status(self, message: impl Into<String>) -> tonic::Status {
        tonic::Status::new(self.info().grpc, message)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn every_code_is_distinct_and_snake_case() {
        let codes: HashSet<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(codes.len(), ErrorCode::ALL.len());
        for code in codes {
            assert!(
                code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{code}"
            );
        }
    }

    #[test]
    fn each_code_has_its_wire_mappings() {
        assert_eq!(ErrorCode::ChatNotFound.info().http, StatusCode::NOT_FOUND);
        assert_eq!(
            ErrorCode::ChatNotFound.status("x").code(),
            tonic::Code::NotFound
        );
        assert!(ErrorCode::StoreUnavailable.info().retryable);
        assert!(!ErrorCode::ProviderRefused.info().retryable);
    }
}
