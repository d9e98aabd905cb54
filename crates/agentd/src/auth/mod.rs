//! Scoped JWTs, as the main application mints them for the browser.
//!
//! [`verify`] is the one check, used by the HTTP stream route (through the extractor in `http/auth.rs`) and available to
//! gRPC. Only HS256 with `JWT_SECRET` is accepted: the header's `alg` is read first and anything else (`none`,
//! HS512, RS256, ...) is refused before any key is used, so there is no algorithm switch. `aud` must equal
//! `JWT_AUDIENCE`; `exp` is required and checked, `nbf` checked when present, with `JWT_LEEWAY` (default 0) of
//! tolerance; `token_type` must be `scoped` and `purpose` `agent-builder`; `sub` and `org_id` must be non-blank;
//! `scopes` a non-empty list of strings (blanks dropped, duplicates removed). A chat is the caller's when its org and
//! user are the token's and its canvas is in the scopes as `canvases:read:<id>`.
//!
//! Every failure says which rule failed and never repeats the token; the token is never logged.

use std::collections::HashSet;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value, json};

use crate::secret::Secret;
use crate::store::ChatOwner;

pub const TOKEN_TYPE: &str = "scoped";
pub const PURPOSE: &str = "agent-builder";
const CANVAS_SCOPE_PREFIX: &str = "canvases:read:";

/// How tokens are checked; no secret means dev mode.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// `JWT_SECRET`; `None` = dev mode (unauthenticated requests for the test model only).
    pub secret: Option<Secret>,
    pub audience: String,
    pub leeway: Duration,
}

/// Who a request speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A verified token.
    Token(Caller),
    /// Dev mode (no `JWT_SECRET`): nobody in particular; allowed the test model only.
    Dev,
}

/// Who a verified token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub org_id: String,
    pub user_id: String,
    /// Non-empty, without blanks or duplicates, in the token's order.
    pub scopes: Vec<String>,
    /// The token itself, forwarded by HTTP tools acting for the caller.
    pub token: Secret,
}

impl Caller {
    /// True when a chat of `owner` is this caller's: same org and user, and its canvas in the scopes.
    pub fn owns(&self, owner: &ChatOwner) -> bool {
        owner.org_id == self.org_id
            && owner.user_id == self.user_id
            && self.scopes.iter().any(|scope| {
                scope
                    .strip_prefix(CANVAS_SCOPE_PREFIX)
                    .is_some_and(|canvas| canvas == owner.canvas_id)
            })
    }

    /// The owner of every chat this caller may use, when the scopes name one canvas (the usual browser token): a
    /// store that checks it can then start a run without the chat being looked up first.
    pub fn sole_owner(&self) -> Option<ChatOwner> {
        let mut canvases = self
            .scopes
            .iter()
            .filter_map(|scope| scope.strip_prefix(CANVAS_SCOPE_PREFIX));
        let canvas = canvases.next()?;
        canvases.next().is_none().then(|| ChatOwner {
            org_id: self.org_id.clone(),
            user_id: self.user_id.clone(),
            canvas_id: canvas.to_owned(),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("malformed Authorization header: expected \"Bearer <token>\"")]
    MalformedHeader,
    #[error("malformed token")]
    Malformed,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet (nbf is in the future)")]
    NotYetValid,
    #[error("wrong audience")]
    WrongAudience,
    #[error("wrong algorithm {0:?}: only HS256 is accepted")]
    WrongAlgorithm(String),
    #[error("bad signature")]
    BadSignature,
    #[error("missing claim {0}")]
    MissingClaim(String),
    #[error("claim {claim} {problem}")]
    BadClaim {
        claim: &'static str,
        problem: &'static str,
    },
    /// Dev mode runs only the built-in model without a token.
    #[error("model {0:?} needs a valid token; without JWT_SECRET only the test model runs")]
    TokenRequired(String),
}

/// The token of an `Authorization` value `Bearer <token>`: the scheme in any case, the token non-blank. HTTP and gRPC
/// read their headers with it alike.
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Checks `token` against every rule above.
pub fn verify(
    token: &str,
    secret: &Secret,
    audience: &str,
    leeway: Duration,
) -> Result<Caller, AuthError> {
    let algorithm = header_algorithm(token)?;
    if algorithm != "HS256" {
        return Err(AuthError::WrongAlgorithm(algorithm));
    }
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_audience(&[audience]);
    validation.set_required_spec_claims(&["exp", "aud"]);
    validation.validate_nbf = true;
    validation.leeway = leeway.as_secs();
    let key = DecodingKey::from_secret(secret.expose().as_bytes());
    let claims = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation)
        .map_err(|e| match e.into_kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            ErrorKind::InvalidAudience => AuthError::WrongAudience,
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::InvalidAlgorithm => AuthError::WrongAlgorithm("not HS256".to_owned()),
            ErrorKind::MissingRequiredClaim(claim) => AuthError::MissingClaim(claim),
            _ => AuthError::Malformed,
        })?
        .claims;
    expect_text(&claims, "token_type", TOKEN_TYPE)?;
    expect_text(&claims, "purpose", PURPOSE)?;
    Ok(Caller {
        user_id: non_blank(&claims, "sub")?,
        org_id: non_blank(&claims, "org_id")?,
        scopes: scopes(&claims)?,
        token: Secret::new(token),
    })
}

/// The `alg` of the token's header, read before anything else is trusted.
fn header_algorithm(token: &str) -> Result<String, AuthError> {
    let header = token.split('.').next().ok_or(AuthError::Malformed)?;
    let bytes = URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .map_err(|_| AuthError::Malformed)?;
    let header: Value = serde_json::from_slice(&bytes).map_err(|_| AuthError::Malformed)?;
    match header.get("alg") {
        Some(Value::String(alg)) => Ok(alg.clone()),
        _ => Err(AuthError::Malformed),
    }
}

fn claim<'a>(claims: &'a Map<String, Value>, name: &'static str) -> Result<&'a Value, AuthError> {
    claims
        .get(name)
        .filter(|v| !v.is_null())
        .ok_or_else(|| AuthError::MissingClaim(name.to_owned()))
}

fn expect_text(
    claims: &Map<String, Value>,
    name: &'static str,
    expected: &'static str,
) -> Result<(), AuthError> {
    match claim(claims, name)? {
        Value::String(value) if value == expected => Ok(()),
        _ => Err(AuthError::BadClaim {
            claim: name,
            problem: if name == "token_type" {
                "must be \"scoped\""
            } else {
                "must be \"agent-builder\""
            },
        }),
    }
}

fn non_blank(claims: &Map<String, Value>, name: &'static str) -> Result<String, AuthError> {
    match claim(claims, name)? {
        Value::String(value) if value.trim().is_empty() => Err(AuthError::BadClaim {
            claim: name,
            problem: "is blank",
        }),
        // Compared exactly with the chat's owner: `" alice "` is not alice.
        Value::String(value) if value.trim() != value || value.contains('\0') => {
            Err(AuthError::BadClaim {
                claim: name,
                problem: "has surrounding whitespace or a NUL character",
            })
        }
        Value::String(value) => Ok(value.clone()),
        _ => Err(AuthError::BadClaim {
            claim: name,
            problem: "must be a string",
        }),
    }
}

fn scopes(claims: &Map<String, Value>) -> Result<Vec<String>, AuthError> {
    let not_a_list = AuthError::BadClaim {
        claim: "scopes",
        problem: "must be a list of strings",
    };
    let Value::Array(items) = claim(claims, "scopes")? else {
        return Err(not_a_list);
    };
    let mut seen = HashSet::new();
    let mut scopes = Vec::new();
    for item in items {
        let Value::String(scope) = item else {
            return Err(not_a_list);
        };
        let scope = scope.trim();
        if !scope.is_empty() && seen.insert(scope) {
            scopes.push(scope.to_owned());
        }
    }
    if scopes.is_empty() {
        return Err(AuthError::BadClaim {
            claim: "scopes",
            problem: "is empty",
        });
    }
    Ok(scopes)
}

/// A token as the main application mints it, for one canvas; for trying things out and for scripts.
pub fn mint(
    secret: &Secret,
    audience: &str,
    org_id: &str,
    user_id: &str,
    canvas_id: &str,
    ttl: Duration,
) -> String {
    let now = jsonwebtoken::get_current_timestamp();
    let claims = json!({
        "sub": user_id,
        "org_id": org_id,
        "aud": audience,
        "iat": now,
        "nbf": now,
        "exp": now + ttl.as_secs(),
        "token_type": TOKEN_TYPE,
        "purpose": PURPOSE,
        "scopes": [format!("{CANVAS_SCOPE_PREFIX}{canvas_id}")],
    });
    let key = EncodingKey::from_secret(secret.expose().as_bytes());
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key)
        .expect("HS256 signing cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> Secret {
        Secret::new("test-secret")
    }

    #[test]
    fn a_minted_token_verifies_and_owns_its_canvas_only() {
        let token = mint(
            &secret(),
            "aud",
            "org",
            "user",
            "canvas-1",
            Duration::from_secs(60),
        );
        let caller = verify(&token, &secret(), "aud", Duration::ZERO).unwrap();
        assert_eq!(caller.org_id, "org");
        assert_eq!(caller.user_id, "user");
        assert_eq!(caller.scopes, ["canvases:read:canvas-1"]);
        assert_eq!(
            verify(&token, &secret(), "other", Duration::ZERO),
            Err(AuthError::WrongAudience)
        );
        assert_eq!(
            verify(&token, &Secret::new("nope"), "aud", Duration::ZERO),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn garbage_is_malformed_and_says_nothing_of_the_token() {
        for token in ["", "abc", "a.b.c", "e30.e30.sig"] {
            let err = verify(token, &secret(), "aud", Duration::ZERO).unwrap_err();
            assert!(
                matches!(
                    err,
                    AuthError::Malformed | AuthError::WrongAlgorithm(_) | AuthError::BadSignature
                ),
                "{token}: {err}"
            );
        }
    }
}
