//! API keys and tenants.
//!
//! A key is `mp_` followed by 64 hex digits (256 random bits from the OS generator). Only its
//! sha256 is stored, with its tenant and scope. A request carries `Authorization: Bearer KEY`;
//! the middleware resolves it to a [`Caller`] (tenant, scope, key id) that every handler
//! scopes its reads and writes to: another tenant's model, job, dataset or artifact is
//! simply not found.
//!
//! Secure by default: while no unrevoked key exists, requests without a key run as the
//! default tenant, which the server allows only on a loopback address (or with
//! `--allow-anonymous`; `startup` refuses otherwise). Once a key exists, every route but
//! `/healthz`, `/readyz` and the dashboard's static files needs one; `/metrics` stays open on
//! loopback and needs an admin key elsewhere.

use crate::error::{ApiError, ErrorCode};
use crate::queue::{KeyRecord, KeyStore, QueueError};
use crate::state::{AppState, DEFAULT_TENANT};
use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest, Sha256};
use uuid::Uuid;

pub const KEY_PREFIX: &str = "mp_";
/// How many characters of a key `keys list` shows (the prefix and 8 hex digits).
const SHOWN: usize = 11;
/// A key's `last_used_at` is written at most this often (a write per request would not pay).
const TOUCH_EVERY_MS: i64 = 60_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    Read,
    Write,
    Admin,
}

impl Scope {
    pub fn parse(s: &str) -> Option<Scope> {
        match s {
            "read" => Some(Scope::Read),
            "write" => Some(Scope::Write),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
        }
    }
    /// What a request with this method needs: reading needs `read`, changing needs `write`.
    pub fn needed_for(method: &Method) -> Scope {
        if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
            Scope::Read
        } else {
            Scope::Write
        }
    }
}

/// Who is calling: set by [`authorize`] on every request that reaches a handler.
#[derive(Debug, Clone)]
pub struct Caller {
    pub tenant: String,
    pub scope: Scope,
    /// None for an anonymous caller (no key exists yet, or `--allow-anonymous`).
    pub key_id: Option<Uuid>,
}

impl Caller {
    pub fn anonymous() -> Caller {
        Caller {
            tenant: DEFAULT_TENANT.to_string(),
            scope: Scope::Admin,
            key_id: None,
        }
    }
}

/// sha256 hex of a key: what the database keeps.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A fresh key: `mp_` and 256 bits from the OS generator (two v4 UUIDs' random bytes).
pub fn new_key() -> String {
    let mut bytes = Vec::with_capacity(32);
    bytes.extend_from_slice(Uuid::new_v4().as_bytes());
    bytes.extend_from_slice(Uuid::new_v4().as_bytes());
    format!("{KEY_PREFIX}{}", hex::encode(bytes))
}

/// A tenant name: 1 to 64 characters of `[A-Za-z0-9_.-]`.
pub fn valid_tenant(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 64
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Creates a key for `tenant` with `scope`; returns the key (shown once) and its record.
pub async fn create_key(
    keys: &dyn KeyStore,
    tenant: &str,
    scope: Scope,
) -> Result<(String, KeyRecord), QueueError> {
    let key = new_key();
    let record = KeyRecord {
        id: Uuid::now_v7(),
        tenant_id: tenant.to_string(),
        scope: scope.as_str().to_string(),
        prefix: key[..SHOWN].to_string(),
        created_at: crate::queue::now_ms(),
        revoked_at: None,
        last_used_at: None,
    };
    keys.insert_key(&record, &hash_key(&key)).await?;
    Ok((key, record))
}

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
            let Some(key) = h
                .strip_prefix("Bearer ")
                .map(str::trim)
                .filter(|k| k.starts_with(KEY_PREFIX) && k.len() <= 128)
            else {
                return unauthorized("the Authorization header must be `Bearer mp_…`");
            };
            match state.keys.key_by_hash(&hash_key(key)).await {
                Ok(Some(k)) => {
                    let now = crate::queue::now_ms();
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
