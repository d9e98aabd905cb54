//! The HTTP side: router, shared state, one file per route group, and the accept loop that serves them.

mod health;
pub mod server;
mod stream;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, Method, header};
use axum::routing::{get, post};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::agent::LiveRuns;
use crate::agent::tools::ToolRegistry;
use crate::auth::AuthConfig;
use crate::config::CorsOrigins;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::model::{ModelPolicy, Providers};
use crate::shutdown::Lifecycle;
use crate::store::SessionStore;
use crate::stream_tracker::StreamTracker;

/// Largest request body accepted; a question is at most 2,000 characters, so this is generous.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// An idle stream gets an SSE comment this often, so proxies do not time it out.
pub const KEEP_ALIVE_EVERY: Duration = Duration::from_secs(15);

/// What every handler can reach; cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState {
    pub tracker: StreamTracker,
    pub lifecycle: Arc<Lifecycle>,
    pub metrics: Arc<Metrics>,
    /// Which models requests may name, and the one used when they name none.
    pub models: Arc<ModelPolicy>,
    pub providers: Providers,
    pub tools: Arc<ToolRegistry>,
    /// Model steps a run may take.
    pub max_steps: usize,
    /// Cancelled at the drain deadline; every run still going ends with `run_interrupted`.
    pub interrupt: CancellationToken,
    /// Every run task, so shutdown can wait for each to record its end.
    pub runs: TaskTracker,
    pub store: Arc<dyn SessionStore>,
    /// This process, as the owner of the runs it drives (see the store's leases).
    pub instance_id: Arc<str>,
    /// The runs this process is driving, whose leases it keeps fresh.
    pub live_runs: LiveRuns,
    pub auth: Arc<AuthConfig>,
}

pub fn router(state: AppState, cors: &CorsOrigins) -> Router {
    Router::new()
        .route("/agents/chats/{chat_id}/stream", post(stream::stream))
        .route("/healthz", get(health::live))
        .route("/health", get(health::live))
        .route("/readyz", get(health::ready))
        .route("/metrics", get(health::metrics))
        .fallback(|| async { ApiError::RouteNotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(cors_layer(cors))
        .with_state(state)
}

fn cors_layer(origins: &CorsOrigins) -> CorsLayer {
    let allow_origin = match origins {
        CorsOrigins::Any => AllowOrigin::any(),
        CorsOrigins::List(list) => AllowOrigin::list(list.iter().filter_map(|o| o.parse().ok())),
    };
    CorsLayer::new()
        .allow_origin(allow_origin)
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("last-event-id"),
        ])
        .max_age(Duration::from_secs(600))
}
