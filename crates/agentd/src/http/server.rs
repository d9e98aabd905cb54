//! The accept loop: one hyper connection task per client, all of them stoppable.
//!
//! A client speaks HTTP/1.1, or HTTP/2 without TLS when it opens with HTTP/2's preface ("prior knowledge", as a load
//! balancer or proxy configured for it does): its streams then share one connection, and each holds no socket and
//! no connection buffers of its own. Serving the router from our own loop through hyper's `http1` and `http2`
//! builders, rather than `axum::serve`'s auto-detecting builder (which reads the first bytes into a buffer of its own
//! for every connection), keeps each idle connection small and lets shutdown reach every connection task: on `stop`
//! the listener closes, each connection finishes the responses it is writing and closes (an HTTP/2 one sends GOAWAY
//! first, so its client opens no new stream on it), and idle connections close at once.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use axum::response::Response;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use hyper::Request;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// A client must send its request head within this time, or its connection is closed (a request body has its own
/// bound, `http/stream.rs`).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The first bytes an HTTP/2 client sends without TLS (RFC 9113, section 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Streams one HTTP/2 connection may carry at once; a client with more opens another connection (a load balancer
/// does so by itself). Admission still bounds the streams of the whole process.
const H2_MAX_STREAMS: u32 = 1_000;

/// An HTTP/2 connection that answers no PING within this time, sent after as long without a frame, is closed: a load
/// balancer gone without a word would otherwise keep its streams open.
const H2_KEEP_ALIVE: Duration = Duration::from_secs(20);

/// After a failed `accept`, wait this long before trying again rather than spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How long a refusal may take; it holds the spare descriptor meanwhile.
const REFUSAL_TIMEOUT: Duration = Duration::from_millis(500);

/// `EMFILE` / `ENFILE` on Linux: the process or the system is out of file descriptors.
const OUT_OF_FDS: [i32; 2] = [24, 23];

/// What a client gets when the process has no file descriptor left for its connection: a clear refusal it can retry
/// elsewhere, written before its request is read, instead of a connection left hanging in the backlog.
const NO_FDS_RESPONSE: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
retry-after: 1\r\nconnection: close\r\ncontent-length: 66\r\n\r\n\
{\"detail\":\"Stream limit reached (open-file limit); retry shortly\"}";

/// Serves `router` on `listener` until `stop` is cancelled; each connection then finishes the response it is writing.
/// When `handoff` is cancelled, the connections open at that moment close the same way (their streams end with
/// `reconnect`, and idle ones close at once); connections accepted later get their answer (a 503 for a new stream)
/// and close.
///
/// `connections` tracks the connection tasks, so the caller can wait for them and report how many are still open.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    stop: CancellationToken,
    handoff: CancellationToken,
    connections: TaskTracker,
) {
    let builders = Arc::new(Builders::new());
    // One descriptor held in reserve, given up for a moment to refuse a connection when none is left.
    let mut spare = std::fs::File::open("/dev/null").ok();
    // Cancelled by the stop or the handoff, whichever comes first: a connection checks it every time it wakes (for
    // every event it writes), so it watches this one token rather than both.
    let closing = stop.child_token();
    tokio::spawn({
        let (handoff, closing) = (handoff.clone(), closing.clone());
        async move {
            tokio::select! {
                () = handoff.cancelled() => closing.cancel(),
                () = closing.cancelled() => {}
            }
        }
    });
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        let (socket, _peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error)
                if error
                    .raw_os_error()
                    .is_some_and(|code| OUT_OF_FDS.contains(&code)) =>
            {
                tracing::warn!(%error, "open-file limit reached; refusing a connection with 503");
                drop(spare.take());
                if let Ok((socket, _)) = listener.accept().await {
                    refuse(socket).await;
                }
                spare = std::fs::File::open("/dev/null").ok();
                if spare.is_none() {
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
                continue;
            }
            Err(error) => {
                tracing::warn!(%error, "accept failed; retrying");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        if let Err(error) = socket.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY");
        }
        // A connection accepted once the handoff began closes at the stop only.
        let closing = if handoff.is_cancelled() {
            stop.clone()
        } else {
            closing.clone()
        };
        connections.spawn(serve_connection(
            socket,
            router.clone(),
            Arc::clone(&builders),
            closing,
            connections.clone(),
        ));
    }
    drop(listener);
}

/// hyper's connection settings, made once and shared by every connection task.
#[derive(Debug)]
struct Builders {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

impl Builders {
    fn new() -> Self {
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            // A client that shuts its write side after the request still gets its answer.
            .half_close(true)
            // Many small SSE frames per write: flattening them into one buffer beats vectored writes of 16 at a time.
            .writev(false);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_concurrent_streams(H2_MAX_STREAMS)
            .keep_alive_interval(H2_KEEP_ALIVE)
            .keep_alive_timeout(H2_KEEP_ALIVE);
        Self { http1, http2 }
    }
}

/// Serves one client's connection until it ends, or until `closing` (then it finishes the responses it is writing).
/// An HTTP/1.1 connection is served by a task of its own, tracked by `connections`: the one long-lived task per
/// HTTP/1.1 stream then holds the connection alone, not this one's room for telling the protocols apart.
async fn serve_connection(
    socket: TcpStream,
    router: Router,
    builders: Arc<Builders>,
    closing: CancellationToken,
    connections: TaskTracker,
) {
    let protocol = tokio::select! {
        protocol = tokio::time::timeout(HEADER_READ_TIMEOUT, opens_with_h2_preface(&socket)) => protocol,
        () = closing.cancelled() => return,
    };
    match protocol {
        Ok(Ok(false)) => {
            connections.spawn(serve_http1(socket, router, builders, closing));
        }
        // Boxed: this task, one per connection while it is told apart, keeps only a pointer's room for it.
        Ok(Ok(true)) => Box::pin(serve_http2(socket, router, builders, closing)).await,
        // Nothing sent in time, or the connection failed before anything was read: nothing to answer.
        Err(_) | Ok(Err(_)) => {}
    }
}

/// Drives a connection, either protocol, to its end. Once `closed` is ready it finishes the responses it is writing
/// and closes (an HTTP/2 one sends GOAWAY first, so its client opens no new stream on it). An error is the client's
/// doing or the network's, so it is logged at debug level only.
///
/// A function returning the future rather than an `async fn`, which would keep room for its arguments twice: the
/// future is part of the task of every HTTP/1.1 connection, for as long as its stream lasts.
fn until_closed<'a, C, F>(
    mut connection: Pin<&'a mut C>,
    mut closed: Pin<&'a mut F>,
) -> impl Future<Output = ()> + Send + 'a
where
    C: GracefulConnection<Error = hyper::Error> + Send,
    F: Future<Output = ()> + Send,
{
    let mut shutting = false;
    std::future::poll_fn(move |cx| {
        if !shutting && closed.as_mut().poll(cx).is_ready() {
            connection.as_mut().graceful_shutdown();
            shutting = true;
        }
        if let Err(error) = ready!(connection.as_mut().poll(cx)) {
            tracing::debug!(%error, "connection ended with an error");
        }
        Poll::Ready(())
    })
}

/// Whether the client opened with [`H2_PREFACE`]: peeks at what it sent (reading nothing) until that differs from the
/// preface, or is all of it. A client that closes before sending anything is treated as HTTP/1.
async fn opens_with_h2_preface(socket: &TcpStream) -> io::Result<bool> {
    let mut head = [0u8; H2_PREFACE.len()];
    let mut pause = Duration::from_millis(1);
    loop {
        let n = socket.peek(&mut head).await?;
        if n == 0 || head[..n] != H2_PREFACE[..n] {
            return Ok(false);
        }
        if n == H2_PREFACE.len() {
            return Ok(true);
        }
        // A part of the preface, the rest still in flight (a client sends it in one write, so this is rare): a socket
        // whose bytes were only peeked at stays readable, so wait, longer each time, rather than spin.
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Serves an HTTP/1.1 connection: the connection is made before the task is spawned, and the task's future holds it,
/// the wait for `closing` and [`until_closed`]'s few bytes, nothing more. An `async fn` would keep its arguments
/// (and copies of them) beside the connection made from them, for as long as the connection's stream lasts.
fn serve_http1(
    socket: TcpStream,
    router: Router,
    builders: Arc<Builders>,
    closing: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let socket = Arc::new(socket);
    let peer = Peer(Arc::clone(&socket));
    // Each request carries the client's end of the connection, for a stream to watch.
    let service = hyper::service::service_fn(move |mut request| {
        request.extensions_mut().insert(peer.clone());
        answer(&router, request)
    });
    let mut connection = builders
        .http1
        .serve_connection(TokioIo::new(JsonParseErrors::new(socket)), service);
    async move {
        let closed = std::pin::pin!(closing.cancelled());
        // Polled where the block holds it: moved into the future that polls it, it would be kept there twice.
        until_closed(Pin::new(&mut connection), closed).await;
    }
}

/// An HTTP/2 connection: its requests carry no [`Peer`], since the socket is every stream's; a client that leaves one
/// stream resets it, and hyper then drops that response at once.
async fn serve_http2(
    socket: TcpStream,
    router: Router,
    builders: Arc<Builders>,
    closing: CancellationToken,
) {
    let service = hyper::service::service_fn(move |request| answer(&router, request));
    let mut connection = builders
        .http2
        .serve_connection(TokioIo::new(socket), service);
    let closed = std::pin::pin!(closing.cancelled());
    until_closed(Pin::new(&mut connection), closed).await;
}

/// The router's answer to `request`, boxed. hyper keeps room for the future a connection's service returns for as
/// long as the connection (HTTP/1.1) or the stream (HTTP/2) lasts, which for an SSE stream is long after the answer
/// began; the router's future, holding the request, is a few hundred bytes. Boxed, that room is a pointer's, and the
/// box goes once the response is made.
fn answer(
    router: &Router,
    request: Request<Incoming>,
) -> BoxFuture<'static, Result<Response, Infallible>> {
    router.clone().oneshot(request).boxed()
}

/// Reads the request head (so the answer does not race it, and closing does not reset the connection), writes the
/// canned 503 and closes; bounded, since it holds the one spare descriptor.
async fn refuse(mut socket: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut head = Vec::with_capacity(1024);
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
            let n = socket.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        while matches!(socket.try_read(&mut buf), Ok(n) if n > 0) {}
        socket.write_all(NO_FDS_RESPONSE).await?;
        socket.shutdown().await
    };
    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, exchange).await;
}

/// The client's end of a connection, shared by hyper and the responses on it: an SSE stream can wait many seconds
/// between writes, and hyper does not read while it answers (it lets a client shut its write side after the request
/// and still get the answer), so only a stream that watches the socket notices a client that went away before its
/// next write (see `http/stream.rs`).
#[derive(Debug, Clone)]
pub struct Peer(Arc<TcpStream>);

impl Peer {
    /// Whether the client has shut its side of the connection (gone, or only done sending) or the connection failed:
    /// `true` then; `false` once the client sent more (a pipelined request, which hyper reads after this response),
    /// after which the connection is not watched. Reads nothing, keeps no future: it is polled by the connection's
    /// own task (hyper polls the response body there), whose wake-up it registers for the socket's next readiness.
    pub fn poll_closed(&self, cx: &mut Context<'_>) -> Poll<bool> {
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        match ready!(self.0.poll_peek(cx, &mut buf)) {
            Ok(0) | Err(_) => Poll::Ready(true),
            Ok(_) => Poll::Ready(false),
        }
    }
}

/// A client's socket, as hyper reads and writes it. hyper answers a request head it cannot parse by itself (400, 414
/// or 431), before the router sees anything, with no body; this gives that answer the JSON body every other error
/// has. hyper writes such an answer in one write (the connection flattens its writes), which is all it sends.
#[derive(Debug)]
struct JsonParseErrors {
    /// Shared with the connection's [`Peer`].
    socket: Arc<TcpStream>,
    /// An answer rewritten with its body, and how much of it is written.
    pending: Option<(Vec<u8>, usize)>,
}

impl JsonParseErrors {
    fn new(socket: Arc<TcpStream>) -> Self {
        Self {
            socket,
            pending: None,
        }
    }

    /// Writes what is left of a rewritten answer.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, written)) = &mut self.pending {
            if *written == bytes.len() {
                self.pending = None;
                break;
            }
            let n = ready!(write_now(&self.socket, cx, &bytes[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for JsonParseErrors {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.socket.poll_read_ready(cx))?;
            // Into the buffer as it is: zeroing hyper's read buffer first would make its every page resident.
            match self.socket.try_read_buf(buf) {
                Ok(_) => return Poll::Ready(Ok(())),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Poll::Ready(Err(error)),
            }
        }
    }
}

impl AsyncWrite for JsonParseErrors {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        if let Some(answer) = with_json_body(buf) {
            this.pending = Some((answer, 0));
            // Taken whole: what the socket does not take now is written by the flush that follows.
            if let Poll::Ready(Err(error)) = this.poll_pending(cx) {
                return Poll::Ready(Err(error));
            }
            return Poll::Ready(Ok(buf.len()));
        }
        write_now(&this.socket, cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A socket has nothing to flush: what is left is a rewritten answer.
        self.get_mut().poll_pending(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        Poll::Ready(socket2::SockRef::from(&*this.socket).shutdown(std::net::Shutdown::Write))
    }
}

/// Writes what the shared socket takes now, or waits until it can take some.
fn write_now(socket: &TcpStream, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
    loop {
        ready!(socket.poll_write_ready(cx))?;
        match socket.try_write(buf) {
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            written => return Poll::Ready(written),
        }
    }
}

/// hyper's own answer to a head it could not parse (`HTTP/1.1 400|414|431 …` with `content-length: 0`, nothing
/// after the head), with a JSON body instead; `None` for anything else.
fn with_json_body(written: &[u8]) -> Option<Vec<u8>> {
    let detail = match written.get(..12)? {
        b"HTTP/1.1 400" => "The request could not be read as HTTP/1.1",
        b"HTTP/1.1 414" => "The request's URI is too long",
        b"HTTP/1.1 431" => "The request's header fields are too large",
        _ => return None,
    };
    const EMPTY: &[u8] = b"\r\ncontent-length: 0\r\n";
    if !written.ends_with(b"\r\n\r\n") {
        return None;
    }
    let at = memchr::memmem::find(written, EMPTY)?;
    let body = serde_json::json!({
        "detail": detail,
        "code": crate::error::ErrorCode::BadRequest.as_str(),
    })
    .to_string();
    let mut answer = Vec::with_capacity(written.len() + body.len() + 48);
    answer.extend_from_slice(&written[..at]);
    answer.extend_from_slice(
        format!(
            "\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
            body.len()
        )
        .as_bytes(),
    );
    answer.extend_from_slice(&written[at + EMPTY.len()..]);
    answer.extend_from_slice(body.as_bytes());
    Some(answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// What the server sees of a connection whose client writes `parts`, pausing between them, then shuts its side.
    async fn sniffed(parts: &[&'static [u8]]) -> bool {
        use tokio::io::AsyncReadExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let sent = parts.concat();
        let parts = parts.to_vec();
        let writer = tokio::spawn(async move {
            for part in parts {
                client.write_all(part).await.unwrap();
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            client.shutdown().await.unwrap();
            client
        });
        let h2 = opens_with_h2_preface(&server).await.unwrap();
        let _client = writer.await.unwrap();
        // Only peeked at: hyper still reads every byte the client sent.
        let mut read = Vec::new();
        server.read_to_end(&mut read).await.unwrap();
        assert_eq!(read, sent);
        h2
    }

    #[tokio::test]
    async fn the_http2_preface_is_told_from_http1_without_reading_a_byte() {
        assert!(sniffed(&[H2_PREFACE]).await);
        // Split: the rest arrives later, and is waited for.
        assert!(sniffed(&[&H2_PREFACE[..1], &H2_PREFACE[1..10], &H2_PREFACE[10..]]).await);
        assert!(!sniffed(&[b"POST /agents/chats/x/stream HTTP/1.1\r\n"]).await);
        assert!(!sniffed(&[b"P", b"OST / HTTP/1.1\r\n"]).await);
        assert!(!sniffed(&[b"GET / HTTP/1.1\r\n\r\n"]).await);
        // Almost the preface is not the preface.
        assert!(!sniffed(&[b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"]).await);
        // A client that closes before sending anything.
        assert!(!sniffed(&[]).await);
    }

    #[test]
    fn hypers_bare_answers_get_a_json_body_and_nothing_else_changes() {
        let bare =
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let answer = String::from_utf8(with_json_body(bare).unwrap()).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 431 "), "{head}");
        assert!(
            head.contains("\r\ncontent-type: application/json\r\n"),
            "{head}"
        );
        assert!(
            head.contains(&format!("\r\ncontent-length: {}\r\n", body.len())),
            "{head}"
        );
        assert!(head.ends_with("\r\ndate: x"), "{head}");
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["code"], "bad_request");
        assert!(body["detail"].as_str().unwrap().contains("too large"));

        for other in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
            b"data: {\"type\":\"done\"}\n\n",
        ] {
            assert_eq!(with_json_body(other), None, "{}", String::from_utf8_lossy(other));
        }
    }
}
