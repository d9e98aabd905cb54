//! Liveness, readiness and metrics.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde_json::json;

use super::AppState;

/// 200 while the process lives.
pub async fn live() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// 200 while serving; 503 from the moment a shutdown signal arrives.
pub async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    if state.lifecycle.is_serving() {
        (StatusCode::OK, Json(json!({"status": "ready"})))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"detail": "Service is shutting down"})),
        )
    }
}

pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(state.tracker.open()),
    )
}
