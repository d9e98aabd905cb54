//! `upstream`: a fake model provider for the benchmark that is never the bottleneck. It answers every
//! `POST /v1/chat/completions` with an OpenAI Chat Completions stream rendered once at start (`--deltas` text chunks,
//! then the finish reason, the usage and `[DONE]`): all at once, or one chunk every `--pace-ms`; a request for a model
//! whose name has `hold` in it gets the first chunk and then nothing while the client stays (a stream parked at the
//! provider). `GET /stats` tells how many connections are open and were opened, and how many answers were given.
//! It speaks HTTP/1.1 and, to a client that starts with it, HTTP/2 without TLS (prior knowledge, h2c).
//!
//! Prints `upstream listening on <addr>` on stdout once it accepts connections.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpSocket;

#[derive(Debug, Parser)]
#[command(
    name = "upstream",
    about = "A fast fake OpenAI-compatible streaming provider"
)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: SocketAddr,
    /// Text chunks per answer.
    #[arg(long, default_value_t = 500)]
    deltas: usize,
    /// Pause before each chunk, in ms (0: the whole answer at once).
    #[arg(long, default_value_t = 0)]
    pace_ms: u64,
}

#[derive(Debug, Default)]
struct Counters {
    open: AtomicU64,
    opened: AtomicU64,
    answers: AtomicU64,
}

/// The answer, rendered once.
#[derive(Debug)]
struct Script {
    frames: Vec<Bytes>,
    whole: Bytes,
    pace: Option<Duration>,
}

impl Script {
    fn new(args: &Args) -> Self {
        let chunk = |delta: serde_json::Value, finish: serde_json::Value| {
            let body = serde_json::json!({
                "id": "chatcmpl-bench", "object": "chat.completion.chunk", "model": "bench",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            });
            Bytes::from(format!("data: {body}\n\n"))
        };
        let mut frames: Vec<Bytes> = (0..args.deltas)
            .map(|i| {
                let word = ["Agents ", "answer ", "in ", "small ", "pieces "][i % 5];
                chunk(
                    serde_json::json!({"content": word}),
                    serde_json::Value::Null,
                )
            })
            .collect();
        frames.push(chunk(serde_json::json!({}), serde_json::json!("stop")));
        let usage = serde_json::json!({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "choices": [],
            "usage": {"prompt_tokens": 12, "completion_tokens": args.deltas, "total_tokens": 12 + args.deltas}});
        frames.push(Bytes::from(format!("data: {usage}\n\n")));
        frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
        let whole = Bytes::from(frames.concat());
        Self {
            frames,
            whole,
            pace: (args.pace_ms > 0).then(|| Duration::from_millis(args.pace_ms)),
        }
    }
}

/// The answer's body: the rendered frames, paced or held as the script says.
struct Answer {
    script: Arc<Script>,
    hold: bool,
    next: usize,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Body for Answer {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let script = Arc::clone(&self.script);
        if self.hold {
            if self.next == 0 {
                self.next = 1;
                return Poll::Ready(Some(Ok(Frame::data(script.frames[0].clone()))));
            }
            // Parked: the client's leaving drops the body.
            return Poll::Pending;
        }
        let Some(pace) = script.pace else {
            if self.next == 0 {
                self.next = 1;
                return Poll::Ready(Some(Ok(Frame::data(script.whole.clone()))));
            }
            return Poll::Ready(None);
        };
        if self.next >= script.frames.len() {
            return Poll::Ready(None);
        }
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(pace)));
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.sleep = None;
        let frame = script.frames[self.next].clone();
        self.next += 1;
        Poll::Ready(Some(Ok(Frame::data(frame))))
    }
}

type Reply = Response<http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>>;

async fn handle(
    request: Request<Incoming>,
    script: Arc<Script>,
    counters: Arc<Counters>,
) -> Result<Reply, Infallible> {
    let path = request.uri().path().to_owned();
    // Read the whole request, as a provider does.
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let hold = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["model"].as_str().map(|m| m.contains("hold")))
        .unwrap_or(false);
    if path == "/stats" {
        let stats = serde_json::json!({
            "connections_open": counters.open.load(Ordering::Relaxed),
            "connections_opened": counters.opened.load(Ordering::Relaxed),
            "answers": counters.answers.load(Ordering::Relaxed),
        });
        let body = http_body_util::Full::new(Bytes::from(stats.to_string()));
        return Ok(Response::new(body.boxed_unsync()));
    }
    counters.answers.fetch_add(1, Ordering::Relaxed);
    let body = Answer {
        script,
        hold,
        next: 0,
        sleep: None,
    };
    Ok(Response::builder()
        .header("content-type", "text/event-stream")
        .body(body.boxed_unsync())
        .expect("a valid response"))
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    bench::raise_open_file_limit();
    let script = Arc::new(Script::new(&args));
    let counters = Arc::new(Counters::default());
    // A backlog as large as agentd's: a burst of new streams is not slowed by dropped connection requests here.
    let socket = if args.addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .expect("a socket");
    socket.bind(args.addr).expect("the address binds");
    let listener = socket.listen(4096).expect("the socket listens");
    println!(
        "upstream listening on {}",
        listener.local_addr().expect("a bound address")
    );
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = socket.set_nodelay(true);
        let (script, counters) = (Arc::clone(&script), Arc::clone(&counters));
        counters.open.fetch_add(1, Ordering::Relaxed);
        counters.opened.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let service = hyper::service::service_fn({
                let counters = Arc::clone(&counters);
                move |request| handle(request, Arc::clone(&script), Arc::clone(&counters))
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new());
            builder
                .http2()
                .timer(TokioTimer::new())
                // A provider's own limit would queue streams beyond it; this one is never the bottleneck.
                .max_concurrent_streams(1_000_000);
            let _ = builder
                .serve_connection(TokioIo::new(socket), service)
                .await;
            counters.open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}
