//! One stream of the load generator, from connect to its last event: the request (a POST of a question, or a GET
//! of a run's attach route), optionally following the run from another replica, and the events counted as they come.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use super::{EventKind, EventParser, Plan, Stats, connect_error, unix_ns};
use std::sync::atomic::Ordering;

pub(super) type Response = hyper::Response<hyper::body::Incoming>;

/// Connects from `source` to `target` (or takes a stream of a shared HTTP/2 connection, with `shared`), sends
/// `request`, and returns the response (status 200) and its connection task.
pub(super) async fn open(
    source: IpAddr,
    target: SocketAddr,
    request: Request<Full<Bytes>>,
    timeout: Duration,
    stop: &CancellationToken,
    shared: Option<&H2Connections>,
) -> Result<(Response, tokio::task::JoinHandle<()>), String> {
    let (sent, connection): (Sent, _) = match shared {
        Some(shared) => {
            let mut sender = shared.sender(source, target).await?;
            // The connection is the others' too: ending this stream resets it, and the connection stays.
            (
                Box::pin(async move { sender.send_request(request).await }),
                tokio::spawn(async {}),
            )
        }
        None => {
            let tcp = connect(source, target).await?;
            let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .map_err(|_| "handshake".to_owned())?;
            let connection = tokio::spawn(async move {
                let _ = connection.await;
            });
            (
                Box::pin(async move { sender.send_request(request).await }),
                connection,
            )
        }
    };
    let response = tokio::select! {
        response = tokio::time::timeout(timeout, sent) => response,
        () = stop.cancelled() => { connection.abort(); return Err(String::new()) }
    };
    let response = match response {
        Ok(Ok(response)) => response,
        Ok(Err(_)) => {
            connection.abort();
            return Err("request failed".to_owned());
        }
        Err(_) => {
            connection.abort();
            return Err("no response in time".to_owned());
        }
    };
    if response.status() != 200 {
        connection.abort();
        return Err(format!("http {}", response.status().as_u16()));
    }
    Ok((response, connection))
}

/// A request in flight, on either protocol.
type Sent = Pin<Box<dyn Future<Output = hyper::Result<Response>> + Send>>;

/// A TCP connection from `source` to `target`.
async fn connect(source: IpAddr, target: SocketAddr) -> Result<tokio::net::TcpStream, String> {
    let socket = tokio::net::TcpSocket::new_v4().map_err(|e| connect_error(&e))?;
    socket
        .bind(SocketAddr::new(source, 0))
        .map_err(|e| connect_error(&e))?;
    let tcp = socket
        .connect(target)
        .await
        .map_err(|e| connect_error(&e))?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// HTTP/2 connections without TLS (prior knowledge) that streams share, as a load balancer speaking HTTP/2 to its
/// backends does: each carries `per_connection` streams in all, then the next stream opens another.
#[derive(Debug)]
pub struct H2Connections {
    per_connection: usize,
    open: tokio::sync::Mutex<Vec<SharedConnection>>,
}

#[derive(Debug)]
struct SharedConnection {
    target: SocketAddr,
    sender: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    streams: usize,
}

impl H2Connections {
    pub fn new(per_connection: usize) -> Self {
        Self {
            per_connection: per_connection.max(1),
            open: tokio::sync::Mutex::default(),
        }
    }

    /// How many connections were opened.
    pub async fn opened(&self) -> usize {
        self.open.lock().await.len()
    }

    async fn sender(
        &self,
        source: IpAddr,
        target: SocketAddr,
    ) -> Result<hyper::client::conn::http2::SendRequest<Full<Bytes>>, String> {
        let mut open = self.open.lock().await;
        if let Some(shared) = open.iter_mut().find(|shared| {
            shared.target == target
                && shared.streams < self.per_connection
                && !shared.sender.is_closed()
        }) {
            shared.streams += 1;
            return Ok(shared.sender.clone());
        }
        let tcp = connect(source, target).await?;
        let (sender, connection) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .timer(hyper_util::rt::TokioTimer::new())
                .handshake(TokioIo::new(tcp))
                .await
                .map_err(|_| "handshake".to_owned())?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        open.push(SharedConnection {
            target,
            sender: sender.clone(),
            streams: 1,
        });
        Ok(sender)
    }
}

/// A request to `target`: the plan's GET path, or a POST of its question to a new chat.
pub(super) fn request(
    plan: &Plan,
    target: SocketAddr,
    chat: uuid::Uuid,
    path: Option<&str>,
) -> Request<Full<Bytes>> {
    let (method, path, body) = match path {
        Some(path) => ("GET", path.to_owned(), String::new()),
        None => (
            "POST",
            format!("/agents/chats/{chat}/stream"),
            serde_json::json!({"question": plan.question, "model": plan.model}).to_string(),
        ),
    };
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", target.to_string())
        .header("content-type", "application/json");
    if let Some(token) = &plan.bearer {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    request
        .body(Full::new(Bytes::from(body)))
        .expect("a valid request")
}

/// Reads `response` until its `run_started`; the run id.
async fn run_id_of(response: &mut Response) -> Option<String> {
    let mut pending = Vec::new();
    while let Some(Ok(frame)) = response.body_mut().frame().await {
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        let mark = b"\"run_id\":\"";
        if let Some(at) = memchr::memmem::find(&pending, mark) {
            let start = at + mark.len();
            let end = start + memchr::memchr(b'"', &pending[start..])?;
            return String::from_utf8(pending[start..end].to_vec()).ok();
        }
    }
    None
}

/// One stream, from connect to its last event (or to `stop`).
pub(super) async fn one_stream(i: usize, plan: &Plan, stats: &Stats, stop: &CancellationToken) {
    let source = plan.sources[i % plan.sources.len()];
    let requested = Instant::now();
    let chat = super::chat_for(plan);
    let first = request(plan, plan.target, chat, plan.path.as_deref());
    let (mut response, mut connection) = match open(
        source,
        plan.target,
        first,
        plan.response_timeout,
        stop,
        plan.h2.as_deref(),
    )
    .await
    {
        Ok(opened) => opened,
        Err(kind) if kind.is_empty() => return,
        Err(kind) => return stats.error(kind),
    };
    if let Some(replica) = plan.follow_at {
        // This client follows the run on the other replica. The run's own stream either stays open (drained) on
        // the producer, a second client of the run, or is closed, as when a client moved to another replica.
        let Some(run) = run_id_of(&mut response).await else {
            connection.abort();
            return stats.error("no run_started");
        };
        let producer = connection;
        let mut drained = response;
        let keep = !plan.leave_producer;
        let drain = tokio::spawn(async move {
            while keep && matches!(drained.body_mut().frame().await, Some(Ok(_))) {}
            producer.abort();
        });
        let path = format!("/agents/chats/{chat}/runs/{run}/stream");
        let follow = request(plan, replica, chat, Some(&path));
        match open(
            source,
            replica,
            follow,
            plan.response_timeout,
            stop,
            plan.h2.as_deref(),
        )
        .await
        {
            Ok((followed, follower)) => {
                response = followed;
                connection = tokio::spawn(async move {
                    let _ = follower.await;
                    drain.abort();
                });
            }
            Err(kind) => {
                drain.abort();
                if !kind.is_empty() {
                    stats.error(kind);
                }
                return;
            }
        }
    }
    let mut parser = EventParser::default();
    let mut seen_started = false;
    let mut seen_delta = false;
    let mut open = false;
    let outcome = loop {
        let frame = tokio::select! {
            frame = response.body_mut().frame() => frame,
            () = stop.cancelled() => break Ok(()),
        };
        let data = match frame {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue,
            },
            Some(Err(_)) => break Err("stream broke"),
            None => break Err("stream ended before done"),
        };
        let mut finished = None;
        let now = u64::try_from(stats.began.elapsed().as_nanos()).unwrap_or(u64::MAX);
        stats.last_event_ns.fetch_max(now, Ordering::Relaxed);
        parser.feed(&data, |kind, event| {
            stats.events.fetch_add(1, Ordering::Relaxed);
            match kind {
                EventKind::RunStarted if !seen_started => {
                    seen_started = true;
                    stats.to_started.lock().unwrap().push(requested.elapsed());
                }
                EventKind::ModelDelta => {
                    stats.deltas.fetch_add(1, Ordering::Relaxed);
                    if let Some(made) = stamp_of(event) {
                        let took = Duration::from_nanos(unix_ns().saturating_sub(made));
                        stats.delivery.lock().unwrap().push(took);
                        // Every stream of the plan open, none ended yet: the steady load, without the ramp.
                        if stats.started.load(Ordering::Relaxed) >= plan.streams
                            && stats.done.load(Ordering::Relaxed) == 0
                        {
                            stats.delivery_all_open.lock().unwrap().push(took);
                        }
                    }
                    if !seen_delta {
                        seen_delta = true;
                        stats
                            .to_first_delta
                            .lock()
                            .unwrap()
                            .push(requested.elapsed());
                    }
                }
                EventKind::RunCompleted => {
                    stats.completed.fetch_add(1, Ordering::Relaxed);
                }
                EventKind::RunInterrupted => {
                    stats.interrupted.fetch_add(1, Ordering::Relaxed);
                }
                EventKind::RunFailed => finished = Some(Err("run_failed")),
                EventKind::Done => {
                    finished.get_or_insert(Ok(()));
                }
                _ => {}
            }
        });
        if seen_started && !open {
            open = true;
            stats.settle();
            stats.started.fetch_add(1, Ordering::Relaxed);
            let now_open = stats.open.fetch_add(1, Ordering::Relaxed) + 1;
            stats.max_open.fetch_max(now_open, Ordering::Relaxed);
        }
        if let Some(outcome) = finished {
            if outcome.is_ok() {
                stats.done.fetch_add(1, Ordering::Relaxed);
                stats
                    .last_done_unix_ns
                    .fetch_max(unix_ns(), Ordering::Relaxed);
            }
            break outcome;
        }
    };
    if open {
        stats.open.fetch_sub(1, Ordering::Relaxed);
    }
    if let Err(kind) = outcome {
        stats.error(kind);
    }
    connection.abort();
}

/// The production time a `clock=1` delta carries (`"content":"@<unix ns> "`).
fn stamp_of(event: &[u8]) -> Option<u64> {
    let mark = b"\"content\":\"@";
    let at = memchr::memmem::find(event, mark)? + mark.len();
    let digits = event[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&event[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamped_deltas_give_their_production_time() {
        let event = br#"id: r:2
data: {"type":"model_delta","content":"@1764070000123456789 "}"#;
        assert_eq!(stamp_of(event), Some(1_764_070_000_123_456_789));
        assert_eq!(
            stamp_of(br#"data: {"type":"model_delta","content":" answer"}"#),
            None
        );
    }
}
