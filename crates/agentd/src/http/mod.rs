//! The HTTP side: router, shared state, one file per route group, and the accept loop that serves them.

mod auth;
pub mod error;
mod health;
mod page;
mod runs;
pub mod server;
mod sse_out;
mod stream;
mod stream_request;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderMap, HeaderName, Method, header};
use axum::routing::{get, post};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::auth::AuthConfig;
use crate::config::CorsOrigins;
use crate::metrics::Metrics;
use crate::runs::RunService;
use crate::shutdown::Lifecycle;
use crate::store::SessionStore;
use crate::stream_tracker::StreamTracker;
use crate::web::{Page, PageSettings};
use error::ApiError;

/// Largest request body accepted; a question is at most 2,000 characters, so this is generous.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// An idle stream gets an SSE comment this often, so proxies do not time it out.
pub const KEEP_ALIVE_EVERY: Duration = Duration::from_secs(15);

/// What every handler can reach; cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState {
    /// Starts runs; the routes only translate between HTTP and it.
    pub runs: RunService,
    /// Read by `/readyz`: ready only while serving.
    pub lifecycle: Arc<Lifecycle>,
    /// Counted streams, shown by `/metrics`.
    pub tracker: StreamTracker,
    pub metrics: Arc<Metrics>,
    /// Pinged by `/readyz`.
    pub store: SessionStore,
    pub auth: Arc<AuthConfig>,
}

pub fn router(state: AppState, cors: &CorsOrigins) -> Router {
    let html = Arc::new(Page::new(&PageSettings {
        needs_token: state.auth.secret.is_some(),
        models: state.runs.models().offered(),
        embed_origins: match cors {
            CorsOrigins::Any => Vec::new(),
            CorsOrigins::List(list) => list.clone(),
        },
    }));
    let assets = html.clone();
    Router::new()
        .route(
            "/",
            get(move |headers: HeaderMap| async move { page::index(&html, &headers) }),
        )
        .route(
            "/assets/{file}",
            get(
                move |axum::extract::Path(file): axum::extract::Path<String>,
                      headers: HeaderMap| async move {
                    page::asset(&assets, &file, &headers)
                },
            ),
        )
        .route("/agents/chats/{chat_id}/stream", post(stream::stream))
        .route(
            "/agents/chats/{chat_id}/runs/{run_id}/stream",
            get(runs::attach),
        )
        .route(
            "/agents/chats/{chat_id}/runs/{run_id}/cancel",
            post(runs::cancel),
        )
        .route("/agents/chats/{chat_id}/messages", get(runs::messages))
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

/// Path parameters, read like axum's `Path`, but a path that cannot be read (a parameter that is not UTF-8) is the
/// same 422 JSON error as a bad id, not a plain-text 400.
pub(crate) struct PathIds<T>(pub T);

impl<S, T> axum::extract::FromRequestParts<S> for PathIds<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = error::ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(ids)| Self(ids))
            .map_err(|_| error::ApiError::Validation(vec![error::FieldError::unreadable_path()]))
    }
}
