-- Every table that holds a user's things carries tenant_id from the start; one default
-- tenant exists until API keys and tenants arrive.
CREATE TABLE tenants (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
INSERT INTO tenants (id, name, created_at) VALUES ('default', 'default', 0);

CREATE TABLE models (
    id              TEXT PRIMARY KEY,            -- uuid v7: sorts by creation time
    tenant_id       TEXT NOT NULL REFERENCES tenants(id),
    name            TEXT NOT NULL,
    format          TEXT NOT NULL,
    size_bytes      INTEGER NOT NULL,
    sha256          TEXT NOT NULL,
    tensor_count    INTEGER NOT NULL,
    parameter_count INTEGER NOT NULL,
    blob_key        TEXT NOT NULL,
    tensors_json    TEXT NOT NULL,
    created_at      INTEGER NOT NULL             -- unix milliseconds
);
CREATE INDEX models_by_tenant ON models (tenant_id, id);

CREATE TABLE jobs (
    id                  TEXT PRIMARY KEY,
    tenant_id           TEXT NOT NULL REFERENCES tenants(id),
    model_id            TEXT NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    state               TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    spec_json           TEXT NOT NULL,
    progress            REAL NOT NULL DEFAULT 0,
    stage               TEXT,
    attempts            INTEGER NOT NULL DEFAULT 0,
    max_attempts        INTEGER NOT NULL,
    lease_owner         TEXT,
    lease_expires_at    INTEGER,
    cancel_requested    INTEGER NOT NULL DEFAULT 0,
    idempotency_key     TEXT,
    request_fingerprint TEXT,
    error_code          TEXT,
    error_message       TEXT,
    summary_json        TEXT,
    created_at          INTEGER NOT NULL,
    started_at          INTEGER,
    finished_at         INTEGER,
    UNIQUE (tenant_id, idempotency_key)
);
CREATE INDEX jobs_claim ON jobs (state, id);
CREATE INDEX jobs_by_tenant ON jobs (tenant_id, id);
CREATE INDEX jobs_by_model ON jobs (model_id, state);

CREATE TABLE artifacts (
    job_id     TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    tenant_id  TEXT NOT NULL REFERENCES tenants(id),
    name       TEXT NOT NULL,
    blob_key   TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    sha256     TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (job_id, name)
);
