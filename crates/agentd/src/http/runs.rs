//! The routes about one run or a chat's history: attach (replay, then follow), cancel, and the history a reloaded
//! page needs to re-attach.
//!
//! Where to resume is `Last-Event-ID: <run_id>:<seq>` (what an `EventSource` sends by itself when it reconnects) or
//! `?after=<seq>`; with neither, the run replays from its first event. The header wins when both are given.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Extension, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use uuid::Uuid;

use super::AppState;
use super::PathIds;
use super::error::{ApiError, FieldError};
use super::server::Peer;
use super::stream::{parse_id, sse};
use crate::auth::Identity;
use crate::runs::Resume;
use crate::runs::history;

const LAST_EVENT_ID: &str = "last-event-id";

/// `GET /agents/chats/{chat_id}/runs/{run_id}/stream`
pub async fn attach(
    State(state): State<AppState>,
    identity: Identity,
    PathIds((chat_id, run_id)): PathIds<(String, String)>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    peer: Option<Extension<Peer>>,
) -> Result<Response, ApiError> {
    let chat_id = parse_id(&chat_id, "chat_id")?;
    let run_id = parse_id(&run_id, "run_id")?;
    let resume = resume(run_id, &headers, &query)?;
    let handle = state
        .runs
        .attach(&identity, chat_id, run_id, resume)
        .await?;
    Ok(sse(handle, state.lifecycle.handoff.clone(), peer))
}

/// Where to start: the `Last-Event-ID` header, else `?after=`, else the start.
fn resume(
    run_id: Uuid,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
) -> Result<Resume, ApiError> {
    let invalid = |field: &'static str, kind: &'static str, msg: &str| {
        ApiError::Validation(vec![FieldError::resume(field, kind, msg)])
    };
    if let Some(value) = headers.get(LAST_EVENT_ID) {
        let malformed = || {
            invalid(
                LAST_EVENT_ID,
                "event_id_parsing",
                "Last-Event-ID must be <run_id>:<seq>, as the stream's ids are",
            )
        };
        let text = value.to_str().map_err(|_| malformed())?.trim();
        let (run, seq) = text.rsplit_once(':').ok_or_else(malformed)?;
        let run = Uuid::parse_str(run).map_err(|_| malformed())?;
        let after: u64 = seq.parse().map_err(|_| malformed())?;
        if run != run_id {
            return Err(invalid(
                LAST_EVENT_ID,
                "event_id_of_another_run",
                "Last-Event-ID names an event of another run",
            ));
        }
        return Ok(Resume {
            after,
            field: LAST_EVENT_ID,
        });
    }
    let after = match query.get("after") {
        Some(raw) => raw.trim().parse().map_err(|_| {
            invalid(
                "after",
                "int_parsing",
                "after must be the seq of an event (a whole number)",
            )
        })?,
        None => 0,
    };
    Ok(Resume {
        after,
        field: "after",
    })
}

/// `POST /agents/chats/{chat_id}/runs/{run_id}/cancel`: 202 once the run is told to stop; its followers then get
/// `run_interrupted` (reason `cancelled`) and `done`.
pub async fn cancel(
    State(state): State<AppState>,
    identity: Identity,
    PathIds((chat_id, run_id)): PathIds<(String, String)>,
) -> Result<Response, ApiError> {
    let chat_id = parse_id(&chat_id, "chat_id")?;
    let run_id = parse_id(&run_id, "run_id")?;
    state.runs.cancel(&identity, chat_id, run_id).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"run_id": run_id, "status": "cancelling"})),
    )
        .into_response())
}

/// `GET /agents/chats/{chat_id}/messages`: the chat's history, and the run going now with its last seq, so a page
/// that reloads can show the history and re-attach.
pub async fn messages(
    State(state): State<AppState>,
    identity: Identity,
    PathIds(chat_id): PathIds<String>,
) -> Result<Response, ApiError> {
    let chat_id = parse_id(&chat_id, "chat_id")?;
    let found = state.runs.history(&identity, chat_id).await?;
    let run = found.running.map(|(run_id, last_seq)| {
        json!({
            "id": run_id,
            "status": "running",
            "last_seq": last_seq,
            "stream": crate::runs::events::resume_path(chat_id, run_id),
        })
    });
    Ok(Json(json!({
        "chat_id": chat_id,
        "messages": history::entries(&found.messages),
        "run": run,
    }))
    .into_response())
}
