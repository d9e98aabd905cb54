//! Liveness, readiness and metrics.

use std::time::Duration;

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

/// How long readiness waits for the store to answer before calling it unreachable.
const STORE_PING_TIMEOUT: Duration = Duration::from_secs(2);

/// 200 while serving; 503 from the moment a shutdown signal arrives, and while the store is unreachable or does not
/// take writes (say, another process holds SQLite's write lock).
pub async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    let unavailable = |detail: &str| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "detail": detail })),
        )
    };
    if !state.lifecycle.is_serving() {
        return unavailable("Service is shutting down");
    }
    let probe = async {
        state.store.ping().await?;
        state.store.ping_write().await
    };
    match tokio::time::timeout(STORE_PING_TIMEOUT, probe).await {
        Ok(Ok(())) => (StatusCode::OK, Json(json!({"status": "ready"}))),
        Ok(Err(error)) => {
            tracing::warn!(%error, "readiness: the session store is unreachable");
            unavailable("Session store is unavailable")
        }
        Err(_) => {
            tracing::warn!("readiness: the session store did not answer in time");
            unavailable("Session store is unavailable")
        }
    }
}

pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state
            .metrics
            .render(state.tracker.open(), &state.runs.provider_load()),
    )
}
