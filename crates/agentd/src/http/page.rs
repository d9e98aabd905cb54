//! `GET /` and `GET /assets/{file}`: the web chat page ([`crate::web`]), with its security and cache headers.
//!
//! Every file goes out with a strict Content-Security-Policy (scripts and styles from this origin only, no inline
//! script, requests to this origin only), `nosniff` and no referrer. The HTML is revalidated on every load (`no-cache`
//! with an `ETag`, so a new deploy's page is picked up at once); the script and style sheet carry a hash of their
//! content in their names and are cached for a year.

use std::sync::Arc;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use crate::web::{Asset, Page};

/// `GET /`
pub fn index(page: &Page, request: &HeaderMap) -> Response {
    serve(page, &page.index, request)
}

/// `GET /assets/{file}`: only the names the current page refers to; any other is the usual 404.
pub fn asset(page: &Arc<Page>, file: &str, request: &HeaderMap) -> Response {
    match page.asset(&format!("/assets/{file}")) {
        Some(asset) => serve(page, asset, request),
        None => ApiError::RouteNotFound.into_response(),
    }
}

fn serve(page: &Page, asset: &Asset, request: &HeaderMap) -> Response {
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tags| {
            tags.split(',')
                .any(|tag| tag.trim() == asset.etag || tag.trim() == "*")
        });
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        asset.body.clone().into_response()
    };
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(if asset.immutable {
            "public, max-age=31536000, immutable"
        } else {
            "no-cache"
        }),
    );
    if let Ok(etag) = HeaderValue::from_str(&asset.etag) {
        headers.insert(header::ETAG, etag);
    }
    if let Ok(csp) = HeaderValue::from_str(&page.csp) {
        headers.insert(header::CONTENT_SECURITY_POLICY, csp);
    }
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}
