//! A fake model provider on a local port that speaks the real streaming wire formats: the OpenAI Chat Completions
//! stream at `/v1/chat/completions` and the Anthropic Messages stream at `/v1/messages`. Each request takes the next
//! scripted reply and is recorded. `/api/...` routes play the product's API for HTTP tools. It speaks HTTP/1.1, and
//! HTTP/2 without TLS to a client that starts with it (prior knowledge).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::stream;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use serde_json::{Value, json};
use tokio::sync::{Barrier, Notify};

/// What the fake answers one model request with.
pub enum Reply {
    /// An error status, with an optional `Retry-After`.
    Status(u16, Option<u64>),
    /// These raw SSE frames, then the stream ends.
    Frames(Vec<String>),
    /// These frames, then silence with the connection held open.
    FramesThenStall(Vec<String>),
    /// These frames, then one more text frame every 100 ms for as long as the client listens.
    FramesThenForever(Vec<String>, fn(&str) -> String),
    /// These frames, one after another with this pause before each, then the stream ends.
    Paced(Vec<String>, Duration),
}

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Value,
    /// HTTP/1.1, or HTTP/2 when the client spoke it (h2c).
    pub version: Version,
}

#[derive(Clone, Default)]
struct Shared {
    replies: Arc<Mutex<VecDeque<Reply>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Notified when a streaming answer's connection is dropped by the client.
    closed: Arc<Notify>,
    barrier: Arc<Option<Barrier>>,
}

pub struct FakeUpstream {
    pub base: String,
    shared: Shared,
}

impl FakeUpstream {
    pub async fn start() -> Self {
        let (shared, router) = Self::router();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        Self { base, shared }
    }

    /// The same fake over TLS, at `https://localhost:<port>`: HTTP/2 or HTTP/1.1 as the client's ALPN asks, with a
    /// certificate for localhost signed by the test CA (`fixtures/provider-ca.pem`, which a client must be told to
    /// trust: `SSL_CERT_FILE`).
    pub async fn start_tls() -> Self {
        let (shared, router) = Self::router();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!(
            "https://localhost:{}",
            listener.local_addr().unwrap().port()
        );
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls_settings()));
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let (acceptor, router) = (acceptor.clone(), router.clone());
                tokio::spawn(async move {
                    // A client that does not trust the certificate ends here.
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
                    let io = TokioIo::new(tls);
                    let service = TowerToHyperService::new(router);
                    let _ = if h2 {
                        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, service)
                            .await
                    } else {
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .await
                    };
                });
            }
        });
        Self { base, shared }
    }

    fn router() -> (Shared, Router) {
        let shared = Shared {
            barrier: Arc::new(Some(Barrier::new(2))),
            ..Shared::default()
        };
        let router = Router::new()
            .route("/v1/chat/completions", post(model))
            .route("/v1/messages", post(model))
            .route("/api/canvases/{canvas}/nodes", get(nodes))
            .route("/api/together/{name}", get(together))
            .route("/api/broken", get(broken))
            .route("/api/slow", get(slow))
            .with_state(shared.clone());
        (shared, router)
    }

    /// The port the fake listens on.
    pub fn port(&self) -> u16 {
        self.base.rsplit(':').next().unwrap().parse().unwrap()
    }

    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.shared.replies.lock().unwrap().extend(replies);
    }

    /// Every request so far whose path starts with `prefix`.
    pub fn seen(&self, prefix: &str) -> Vec<Seen> {
        let seen = self.shared.seen.lock().unwrap();
        seen.iter()
            .filter(|s| s.path.starts_with(prefix))
            .cloned()
            .collect()
    }

    /// Waits until a streaming answer's connection is closed by agentd.
    pub async fn wait_closed(&self) {
        tokio::time::timeout(super::PATIENCE, self.shared.closed.notified())
            .await
            .expect("the upstream connection is closed");
    }
}

fn record(shared: &Shared, version: Version, path: String, headers: HeaderMap, body: Value) {
    shared.seen.lock().unwrap().push(Seen {
        path,
        headers,
        body,
        version,
    });
}

async fn model(
    State(shared): State<Shared>,
    uri: axum::http::Uri,
    version: Version,
    headers: HeaderMap,
    body: String,
) -> Response {
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    record(&shared, version, uri.path().to_owned(), headers, body);
    let reply = shared
        .replies
        .lock()
        .unwrap()
        .pop_front()
        .expect("a scripted reply");
    let sse = |body: Body| {
        Response::builder()
            .header("content-type", "text/event-stream")
            .body(body)
            .unwrap()
    };
    match reply {
        Reply::Status(code, retry_after) => {
            let mut response = (
                StatusCode::from_u16(code).unwrap(),
                r#"{"error":"scripted"}"#,
            )
                .into_response();
            if let Some(seconds) = retry_after {
                response
                    .headers_mut()
                    .insert("retry-after", seconds.to_string().parse().unwrap());
            }
            response
        }
        Reply::Frames(frames) => sse(Body::from(frames.concat())),
        Reply::Paced(frames, pause) => {
            let paced = stream::unfold(frames.into_iter(), move |mut frames| async move {
                let frame = frames.next()?;
                tokio::time::sleep(pause).await;
                Some((Ok::<_, std::io::Error>(frame), frames))
            });
            sse(Body::from_stream(paced))
        }
        Reply::FramesThenStall(frames) => {
            let head = stream::iter(frames.into_iter().map(Ok::<_, std::io::Error>));
            sse(Body::from_stream(futures_util::StreamExt::chain(
                head,
                stream::pending(),
            )))
        }
        Reply::FramesThenForever(frames, frame) => {
            let head = stream::iter(frames.into_iter().map(Ok::<_, std::io::Error>));
            let guard = ClosedGuard(Arc::clone(&shared.closed));
            let tail = stream::unfold((0u64, guard), move |(i, guard)| async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Some((Ok(frame(&format!(" more{i}"))), (i + 1, guard)))
            });
            sse(Body::from_stream(futures_util::StreamExt::chain(
                head, tail,
            )))
        }
    }
}

/// The path of a file of `tests/api/fixtures`.
pub fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/api/fixtures")
        .join(name)
}

/// The server side of the fake's TLS: its certificate for localhost and the test CA's above it.
fn tls_settings() -> rustls::ServerConfig {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(fixture("provider-cert.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(fixture("provider-key.pem")).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut settings = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    settings.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    settings
}

/// Tells the test when the body it lives in is dropped: the client closed the connection.
struct ClosedGuard(Arc<Notify>);

impl Drop for ClosedGuard {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

async fn nodes(
    State(shared): State<Shared>,
    Path(canvas): Path<String>,
    version: Version,
    headers: HeaderMap,
) -> impl IntoResponse {
    record(
        &shared,
        version,
        format!("/api/canvases/{canvas}/nodes"),
        headers,
        Value::Null,
    );
    axum::Json(json!({"canvas": canvas, "nodes": ["start", "finish"]}))
}

/// Answers only when two calls are in flight at once: proof the agent runs tool calls concurrently.
async fn together(
    State(shared): State<Shared>,
    Path(name): Path<String>,
    version: Version,
    headers: HeaderMap,
) -> impl IntoResponse {
    record(
        &shared,
        version,
        format!("/api/together/{name}"),
        headers,
        Value::Null,
    );
    let barrier = shared.barrier.as_ref().as_ref().unwrap();
    match tokio::time::timeout(Duration::from_secs(5), barrier.wait()).await {
        Ok(_) => (StatusCode::OK, axum::Json(json!({"together": name}))),
        Err(_) => (
            StatusCode::GATEWAY_TIMEOUT,
            axum::Json(json!({"alone": name})),
        ),
    }
}

async fn broken() -> impl IntoResponse {
    (StatusCode::INTERNAL_SERVER_ERROR, "database on fire")
}

async fn slow() -> impl IntoResponse {
    tokio::time::sleep(Duration::from_secs(10)).await;
    "too late"
}

/// OpenAI Chat Completions frames.
pub mod openai {
    use serde_json::json;

    pub fn text(content: &str) -> String {
        frame(json!({"choices": [{"index": 0, "delta": {"content": content}}]}))
    }

    pub fn tool(index: u32, id: &str, name: &str, arguments: &str) -> String {
        frame(json!({"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": index, "id": id, "type": "function", "function": {"name": name, "arguments": arguments}}
        ]}}]}))
    }

    pub fn usage(prompt: u64, completion: u64) -> String {
        frame(json!({"choices": [], "usage": {
            "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion
        }}))
    }

    pub fn error() -> String {
        frame(
            json!({"error": {"message": "The server had an error", "type": "server_error", "code": 500}}),
        )
    }

    pub fn done() -> String {
        "data: [DONE]\n\n".to_owned()
    }

    fn frame(value: serde_json::Value) -> String {
        format!("data: {value}\n\n")
    }

    /// A whole answer: text pieces, usage, done.
    pub fn answer(pieces: &[&str], prompt: u64, completion: u64) -> Vec<String> {
        let mut frames: Vec<String> = pieces.iter().map(|p| text(p)).collect();
        frames.push(usage(prompt, completion));
        frames.push(done());
        frames
    }
}

/// Anthropic Messages frames.
pub mod anthropic {
    use serde_json::{Value, json};

    fn frame(event: &str, data: Value) -> String {
        format!("event: {event}\ndata: {data}\n\n")
    }

    pub fn start(input_tokens: u64) -> String {
        frame(
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_1", "role": "assistant", "content": [],
                "usage": {"input_tokens": input_tokens, "output_tokens": 1}}}),
        )
    }

    pub fn text_block(index: u32, text: &str) -> Vec<String> {
        vec![
            frame(
                "content_block_start",
                json!({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}),
            ),
            frame("ping", json!({"type": "ping"})),
            text_delta(index, text),
            frame(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": index}),
            ),
        ]
    }

    pub fn text_delta(index: u32, text: &str) -> String {
        frame(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}}),
        )
    }

    pub fn tool_block(index: u32, id: &str, name: &str, input_json: &str) -> Vec<String> {
        let (first, second) = input_json.split_at(input_json.len() / 2);
        let delta = |part: &str| {
            frame(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": part}}),
            )
        };
        vec![
            frame(
                "content_block_start",
                json!({"type": "content_block_start", "index": index,
                    "content_block": {"type": "tool_use", "id": id, "name": name, "input": {}}}),
            ),
            delta(first),
            delta(second),
            frame(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": index}),
            ),
        ]
    }

    pub fn stop(output_tokens: u64, reason: &str) -> Vec<String> {
        vec![
            frame(
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": reason}, "usage": {"output_tokens": output_tokens}}),
            ),
            frame("message_stop", json!({"type": "message_stop"})),
        ]
    }

    pub fn overloaded() -> String {
        frame(
            "error",
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        )
    }
}
