-- API keys: only a sha256 of each key is kept (keys are 256 random bits, so a fast hash
-- suffices). A key belongs to one tenant and has one scope; a revoked key stays listed.
CREATE TABLE api_keys (
    id           TEXT PRIMARY KEY,               -- uuid v7, shown by `keys list`, used by `keys revoke`
    tenant_id    TEXT NOT NULL REFERENCES tenants(id),
    scope        TEXT NOT NULL CHECK (scope IN ('read', 'write', 'admin')),
    prefix       TEXT NOT NULL,                  -- the key's first characters, to recognise it
    hash         TEXT NOT NULL UNIQUE,           -- sha256 hex of the whole key
    created_at   INTEGER NOT NULL,
    revoked_at   INTEGER,
    last_used_at INTEGER
);
