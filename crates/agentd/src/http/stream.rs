//! `POST /agents/chats/{chat_id}/stream`: a run, as Server-Sent Events.
//!
//! The route is thin: it parses the body (`stream_request.rs`) and the chat id, asks the run service
//! ([`crate::runs::RunService::start`]) and turns the run's events into SSE; the response is the run's first follower.
//! Everything that can be refused is refused before the stream starts, as an HTTP error. Admission counts the stream
//! before the handler returns, and the [`StreamGuard`] moves into the response body, which releases it when hyper drops
//! the body, whichever way the response ends.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Extension, State};
use axum::http::{HeaderName, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures_core::Stream;
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::error::{ApiError, FieldError};
use super::server::Peer;
use super::sse_out;
use super::stream_request::StreamRequest;
use super::{AppState, KEEP_ALIVE_EVERY, PathIds};
use crate::auth::Identity;
use crate::runs::events::{RunEvent, event_id, event_id_prefix, resume_path};
use crate::runs::{RunHandle, RunRequest};
use crate::stream_tracker::StreamGuard;

pub async fn stream(
    State(state): State<AppState>,
    identity: Identity,
    PathIds(chat_id): PathIds<String>,
    peer: Option<Extension<Peer>>,
    request: StreamRequest,
) -> Result<Response, ApiError> {
    let chat_id = parse_id(&chat_id, "chat_id")?;
    let run = RunRequest {
        question: request.question,
        model: request.model,
        context: request.context,
    };
    let handle = state.runs.start(identity, chat_id, run).await?;
    Ok(sse(handle, state.lifecycle.handoff.clone(), peer))
}

/// A path id, or the 422 naming it.
pub(super) fn parse_id(raw: &str, name: &'static str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| {
        ApiError::Validation(vec![FieldError::path(
            name,
            "uuid_parsing",
            "Input should be a valid UUID",
        )])
    })
}

/// The follower's events as an SSE response. When a handoff drain begins (`handoff`), the stream sends `reconnect`
/// (with the SSE `retry:` field) after the last event it sent, and ends.
///
/// A client that goes away is noticed at the stream's next write, which can be a keep-alive 15 s later, and only the
/// one after that fails; meanwhile the run would count it as a follower (its `DETACH_GRACE` not yet started, its
/// provider request held). So the stream watches the client's end (`peer`, absent outside the server's own loop): once
/// the client has shut it, the stream writes a keep-alive at once and another a second later. A client that left
/// answers the first with a reset, so the second fails and the connection ends; one that only shut its sending side
/// reads them as the comments they are, and gets the rest of its answer.
pub(super) fn sse(
    handle: RunHandle,
    handoff: CancellationToken,
    peer: Option<Extension<Peer>>,
) -> Response {
    let RunHandle {
        follower,
        guard,
        chat_id,
    } = handle;
    let run_id = follower.run_id();
    // One wait for the handoff per stream, registered once: not a new one, and a clone of the process's token, for
    // every event.
    let handoff = Box::pin(handoff.cancelled_owned());
    let probes = match peer {
        Some(Extension(peer)) => Probes::Watching(peer),
        None => Probes::Done,
    };
    let id_prefix = event_id_prefix(run_id);
    // All the stream needs is in its state, which is used where it lies, not moved out into locals: the future keeps
    // what it is given (and a closure what it captures) for as long as the stream is open, and would keep the locals
    // beside it.
    let state = (follower, handoff, probes, id_prefix, chat_id);
    let frames = futures_util::stream::unfold(Some(state), |mut state| async move {
        let (follower, handoff, probes, id_prefix, chat_id) = state.as_mut()?;
        tokio::select! {
            biased;
            () = handoff.as_mut() => {
                let run_id = follower.run_id();
                let reconnect = RunEvent::Reconnect {
                    resume: resume_path(*chat_id, run_id),
                    last_event_id: event_id(run_id, follower.last_sent()),
                    retry_ms: RECONNECT_RETRY.as_millis() as u64,
                };
                let json = serde_json::to_string(&reconnect).expect("run events always serialize");
                let mut frame = BytesMut::new();
                sse_out::put_retry_event(&mut frame, RECONNECT_RETRY, &json);
                Some((frame.freeze(), None))
            }
            next = follower.next_event() => {
                // This event and every one the follower already holds after it, in one frame.
                let (seq, json) = next?;
                let mut frame = BytesMut::with_capacity(sse_out::event_len(id_prefix, &json));
                sse_out::put_event(&mut frame, id_prefix, seq, &json);
                while frame.len() < FRAME_BYTES
                    && let Some((seq, json)) = follower.next_ready()
                {
                    sse_out::put_event(&mut frame, id_prefix, seq, &json);
                }
                Some((frame.freeze(), state))
            }
            () = std::future::poll_fn(|cx| probes.poll_due(cx)) => {
                Some((Bytes::from_static(sse_out::KEEP_ALIVE), state))
            }
        }
    });
    let body = RunStream {
        frames: Box::pin(sse_out::KeepAlive::new(frames, KEEP_ALIVE_EVERY)),
        _guard: guard,
    };
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
            (HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

/// A stream's watch on its client's end of an HTTP/1.1 connection: once the client has shut it, a write at once and
/// another [`PROBE_AGAIN`] later (see [`sse`]). It lies in the stream's state and is polled there: no future or timer
/// of its own until the client shuts its end.
enum Probes {
    /// Waiting for the client to shut its end.
    Watching(Peer),
    /// The first write is due; then the second, timed from the poll after it (the first write made), not before.
    Again(Option<Pin<Box<Sleep>>>),
    /// Nothing more to write: both were written, the client sent more instead, or there is no end to watch (HTTP/2).
    Done,
}

impl Probes {
    /// Ready when a write is due.
    fn poll_due(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self {
            Probes::Watching(peer) => {
                if ready!(peer.poll_closed(cx)) {
                    *self = Probes::Again(None);
                    Poll::Ready(())
                } else {
                    *self = Probes::Done;
                    Poll::Pending
                }
            }
            Probes::Again(timer) => {
                let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(PROBE_AGAIN)));
                ready!(timer.as_mut().poll(cx));
                *self = Probes::Done;
                Poll::Ready(())
            }
            Probes::Done => Poll::Pending,
        }
    }
}

/// How large a frame of events grows before the rest wait for the next one.
const FRAME_BYTES: usize = 16 * 1024;

/// After the client shut its end and the stream wrote at once, how long until the write that fails if it left.
const PROBE_AGAIN: Duration = Duration::from_secs(1);

/// How long a client told to reconnect waits first (`retry_ms`, and the SSE `retry:` field).
const RECONNECT_RETRY: Duration = Duration::from_millis(250);

/// The response body of a follower: the run's events, encoded as SSE, and the admission it holds.
struct RunStream {
    frames: Pin<Box<dyn Stream<Item = Bytes> + Send>>,
    /// Keeps the stream counted for the drain until hyper drops the body.
    _guard: StreamGuard,
}

impl Stream for RunStream {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.frames.as_mut().poll_next(cx).map(|next| next.map(Ok))
    }
}
