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

use crate::queue::{KeyRecord, KeyStore, QueueError, DEFAULT_TENANT};
use axum::http::Method;
use sha2::{Digest, Sha256};
use uuid::Uuid;

pub const KEY_PREFIX: &str = "mp_";
/// How many characters of a key `keys list` shows (the prefix and 8 hex digits).
const SHOWN: usize = 11;

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
        created_at: crate::util::now_ms(),
        revoked_at: None,
        last_used_at: None,
    };
    keys.insert_key(&record, &hash_key(&key)).await?;
    Ok((key, record))
}
