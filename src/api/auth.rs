//! The authorization middleware: resolves a request's API key to a [`Caller`] and checks its
//! scope (keys, scopes and tenants are `crate::auth`'s).

use crate::auth::{hash_key, Caller, Scope, KEY_PREFIX};
use crate::error::{ApiError, ErrorCode};
use crate::state::AppState;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;

/// A key's `last_used_at` is written at most this often (a write per request would not pay).
const TOUCH_EVERY_MS: i64 = 60_000;

/// Routes that answer without a key: liveness, readiness, the API's description, the
/// dashboard's static page and the manifests' public key (they hold no data; the page's
/// API calls carry the key).
fn is_public(path: &str) -> bool {
    matches!(
        path,
        "/healthz"
            | "/readyz"
            | "/openapi.yaml"
            | "/"
            | "/assets/app.js"
            | "/assets/style.css"
            | "/v1/signing-key"
    )
}

fn unauthorized(msg: &str) -> Response {
    use axum::response::IntoResponse;
    let mut r = ApiError::new(ErrorCode::Unauthorized, msg).into_response();
    r.headers_mut().insert(
        axum::http::header::WWW_AUTHENTICATE,
        axum::http::HeaderValue::from_static("Bearer"),
    );
    r
}

/// The middleware: resolves the caller, checks its scope, and logs the key's use (its id,
/// never the key).
pub async fn authorize(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    use axum::response::IntoResponse;
    let path = req.uri().path().to_string();
    if is_public(&path) {
        req.extensions_mut().insert(Caller::anonymous());
        return next.run(req).await;
    }
    let header = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or("").to_string());
    let caller = match header {
        Some(h) => {
            // The scheme is case-insensitive (RFC 9110, 11.1).
            let Some(key) = h
                .split_once(' ')
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, key)| key.trim())
                .filter(|k| k.starts_with(KEY_PREFIX) && k.len() <= 128)
            else {
                return unauthorized("the Authorization header must be `Bearer mp_…`");
            };
            match state.keys.key_by_hash(&hash_key(key)).await {
                Ok(Some(k)) => {
                    let now = crate::util::now_ms();
                    if k.last_used_at.is_none_or(|t| now - t > TOUCH_EVERY_MS) {
                        if let Err(e) = state.keys.touch_key(k.id, now).await {
                            tracing::warn!(error = %e, key_id = %k.id, "could not record a key's use");
                        }
                    }
                    tracing::info!(key_id = %k.id, tenant = %k.tenant_id, method = %req.method(), path = %path, "api key used");
                    Caller {
                        tenant: k.tenant_id,
                        scope: Scope::parse(&k.scope).unwrap_or(Scope::Read),
                        key_id: Some(k.id),
                    }
                }
                Ok(None) => return unauthorized("unknown or revoked API key"),
                Err(e) => return ApiError::from(e).into_response(),
            }
        }
        None => {
            let keyed = match state.keys.any_active_key().await {
                Ok(k) => k,
                Err(e) => return ApiError::from(e).into_response(),
            };
            if keyed && !(path == "/metrics" && state.loopback) {
                return unauthorized(
                    "this server requires an API key: send `Authorization: Bearer mp_…` (create one with `modelpress keys create --tenant NAME`)",
                );
            }
            if !keyed && !state.loopback && !state.config.allow_anonymous {
                // startup refuses this; a key revoked since then leads here.
                return unauthorized("this server requires an API key");
            }
            Caller::anonymous()
        }
    };
    // /metrics shows every tenant's counts: open on loopback, an admin key elsewhere.
    let needed = match (path == "/metrics", state.loopback) {
        (true, true) => None,
        (true, false) => Some(Scope::Admin),
        // The webhook secret lets its holder forge the tenant's webhooks.
        _ if path == "/v1/webhook-secret" => Some(Scope::Admin),
        _ => Some(Scope::needed_for(req.method())),
    };
    if let Some(needed) = needed.filter(|n| caller.scope < *n) {
        return ApiError::new(
            ErrorCode::Forbidden,
            format!(
                "this key's scope is {}; {} {} needs {}",
                caller.scope.as_str(),
                req.method(),
                path.chars().take(200).collect::<String>(),
                needed.as_str()
            ),
        )
        .into_response();
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}
