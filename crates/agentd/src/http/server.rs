//! The accept loop: one hyper HTTP/1 connection task per client, all of them stoppable.
//!
//! The service speaks HTTP/1.1 only (SSE needs nothing more, and browsers' six-connection limit per origin is per
//! host). Serving the router from our own loop through hyper's `http1` builder, rather than `axum::serve`'s
//! auto-detecting builder, keeps each idle connection small and lets shutdown reach every connection task: on `stop`
//! the listener closes, each connection finishes the response it is writing and closes, and idle keep-alive
//! connections close at once.

use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A client must send its request head within this time, or its connection is closed.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// After a failed `accept` (for example out of file descriptors), wait this long before trying again rather than spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `router` on `listener` until `stop` is cancelled and every connection has closed.
///
/// `connections` tracks the connection tasks, so the caller can report how many are still open.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    stop: CancellationToken,
    connections: TaskTracker,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        // Many small SSE frames per write: flattening them into one buffer beats vectored writes of 16 at a time.
        .writev(false);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        let (socket, _peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "accept failed; retrying");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        if let Err(error) = socket.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY");
        }
        let connection = builder.serve_connection(
            TokioIo::new(socket),
            TowerToHyperService::new(router.clone()),
        );
        let stop = stop.clone();
        connections.spawn(async move {
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = result {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}
