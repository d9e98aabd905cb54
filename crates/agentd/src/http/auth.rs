//! The HTTP side of auth: who a request speaks for ([`Identity`]), read from its `Authorization` header before the
//! handler runs. The checks themselves are [`crate::auth::verify`], free of HTTP.

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;

use super::AppState;
use super::error::ApiError;
use crate::auth::{AuthError, Identity, bearer_token, verify};

impl FromRequestParts<AppState> for Identity {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Some(secret) = &state.auth.secret else {
            return Ok(Self::Dev);
        };
        let token = bearer(parts)?;
        match verify(token, secret, &state.auth.audience, state.auth.leeway) {
            Ok(caller) => Ok(Self::Token(caller)),
            Err(reason) => {
                tracing::info!(%reason, "token refused");
                Err(ApiError::Unauthorized(reason))
            }
        }
    }
}

fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    let mut given = parts.headers.get_all(header::AUTHORIZATION).iter();
    let value = given
        .next()
        .ok_or(ApiError::Unauthorized(AuthError::Missing))?;
    if given.next().is_some() {
        // Which one counts would depend on who reads the request: none does.
        return Err(ApiError::DuplicateAuthorization);
    }
    let value = value
        .to_str()
        .map_err(|_| ApiError::Unauthorized(AuthError::MalformedHeader))?;
    bearer_token(value).ok_or(ApiError::Unauthorized(AuthError::MalformedHeader))
}
