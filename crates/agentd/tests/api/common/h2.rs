//! A client of the server over HTTP/2 without TLS ("prior knowledge"), as a load balancer that speaks HTTP/2 to its
//! backends is: one connection, every request a stream of it.

use axum::body::Body;
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::Value;
use tokio::task::JoinHandle;

use super::{Agentd, Events, PATIENCE};

/// One HTTP/2 connection to a server.
pub struct H2Connection {
    sender: SendRequest<String>,
    authority: String,
    /// The connection's task; it ends when the connection closes.
    connection: JoinHandle<()>,
}

impl H2Connection {
    pub async fn open(server: &Agentd) -> Self {
        let authority = server.base.trim_start_matches("http://").to_owned();
        let socket = tokio::net::TcpStream::connect(&authority)
            .await
            .expect("the server accepts a connection");
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(socket))
            .await
            .expect("the server speaks HTTP/2 to a client that opens with its preface");
        let connection = tokio::spawn(async move {
            let _ = connection.await;
        });
        Self {
            sender,
            authority,
            connection,
        }
    }

    /// Sends `method path` with a JSON `body` (none when `Null`) as a new stream of this connection.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        body: &Value,
    ) -> hyper::Result<Response<Incoming>> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.authority));
        let body = if body.is_null() {
            String::new()
        } else {
            request = request.header("content-type", "application/json");
            body.to_string()
        };
        let request = request.body(body).expect("a valid request");
        let mut sender = self.sender.clone();
        tokio::time::timeout(PATIENCE, sender.send_request(request))
            .await
            .expect("an answer in time")
    }

    /// Asks `chat` a question (`body`) and returns its event stream, which must have started.
    pub async fn stream(&self, chat: &str, body: Value) -> Events {
        let response = self
            .send("POST", &format!("/agents/chats/{chat}/stream"), &body)
            .await
            .expect("the stream is answered");
        assert_eq!(response.status(), StatusCode::OK);
        events(response)
    }

    /// Whether the connection is closed.
    pub fn is_closed(&self) -> bool {
        self.connection.is_finished()
    }

    /// Waits until the server closes the connection.
    pub async fn closed(self) {
        tokio::time::timeout(PATIENCE, self.connection)
            .await
            .expect("the connection closes in time")
            .expect("the connection's task ends by itself");
    }
}

/// A response's body as events.
pub fn events(response: Response<Incoming>) -> Events {
    let (parts, body) = response.into_parts();
    Events::of(parts.headers, Body::new(body).into_data_stream())
}

/// A response's body as JSON.
pub async fn json(response: Response<Incoming>) -> Value {
    let body = axum::body::to_bytes(Body::new(response.into_body()), 1 << 20)
        .await
        .expect("a whole body");
    serde_json::from_slice(&body).expect("a JSON body")
}
