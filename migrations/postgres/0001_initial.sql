-- The PostgreSQL schema: the same tables, columns and meaning as the SQLite migrations
-- 0001–0006 in the folder above, in PostgreSQL's own types (uuid ids, bigint unix
-- milliseconds, boolean flags). JSON documents stay text, byte for byte as written.
-- Later changes get a migration here and one beside the SQLite ones.

CREATE TABLE tenants (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
INSERT INTO tenants (id, name, created_at) VALUES ('default', 'default', 0);

CREATE TABLE models (
    id              UUID PRIMARY KEY,            -- uuid v7: sorts by creation time
    tenant_id       TEXT NOT NULL REFERENCES tenants(id),
    name            TEXT NOT NULL,
    format          TEXT NOT NULL,
    size_bytes      BIGINT NOT NULL,
    sha256          TEXT NOT NULL,
    tensor_count    BIGINT NOT NULL,
    parameter_count BIGINT NOT NULL,
    blob_key        TEXT NOT NULL,
    tensors_json    TEXT NOT NULL,
    inputs_json     TEXT,                        -- [{name, dtype, shape}] of an ONNX graph's inputs
    created_at      BIGINT NOT NULL              -- unix milliseconds
);
CREATE INDEX models_by_tenant ON models (tenant_id, id);

CREATE TABLE jobs (
    id                  UUID PRIMARY KEY,
    tenant_id           TEXT NOT NULL REFERENCES tenants(id),
    model_id            UUID NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    state               TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    spec_json           TEXT NOT NULL,
    progress            DOUBLE PRECISION NOT NULL DEFAULT 0,
    stage               TEXT,
    attempts            BIGINT NOT NULL DEFAULT 0,
    max_attempts        BIGINT NOT NULL,
    lease_owner         TEXT,
    lease_expires_at    BIGINT,
    cancel_requested    BOOLEAN NOT NULL DEFAULT FALSE,
    idempotency_key     TEXT,
    request_fingerprint TEXT,
    error_code          TEXT,
    error_message       TEXT,
    summary_json        TEXT,
    created_at          BIGINT NOT NULL,
    started_at          BIGINT,
    finished_at         BIGINT,
    not_before          BIGINT,                  -- a failed attempt's backoff: not claimed before this
    UNIQUE (tenant_id, idempotency_key)
);
-- The claim reads the oldest queued job: a partial index keeps that read small however many
-- finished jobs the table holds.
CREATE INDEX jobs_claim ON jobs (id) WHERE state = 'queued';
CREATE INDEX jobs_running_lease ON jobs (lease_expires_at) WHERE state = 'running';
CREATE INDEX jobs_by_tenant ON jobs (tenant_id, id);
CREATE INDEX jobs_by_model ON jobs (model_id, state);

CREATE TABLE artifacts (
    job_id     UUID NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    tenant_id  TEXT NOT NULL REFERENCES tenants(id),
    name       TEXT NOT NULL,
    blob_key   TEXT NOT NULL,
    size_bytes BIGINT NOT NULL,
    sha256     TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (job_id, name)
);
CREATE INDEX artifacts_by_tenant ON artifacts (tenant_id);

CREATE TABLE datasets (
    id          UUID PRIMARY KEY,
    tenant_id   TEXT NOT NULL REFERENCES tenants(id),
    name        TEXT NOT NULL,
    size_bytes  BIGINT NOT NULL,
    sha256      TEXT NOT NULL,
    rows        BIGINT,                          -- common axis-0 length; NULL when the arrays differ
    has_labels  BOOLEAN NOT NULL,
    arrays_json TEXT NOT NULL,
    blob_key    TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);
CREATE INDEX datasets_by_tenant ON datasets (tenant_id, id);

CREATE TABLE sensitivity_cache (
    model_id   UUID NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    dataset_id UUID NOT NULL REFERENCES datasets(id) ON DELETE CASCADE,
    tenant_id  TEXT NOT NULL REFERENCES tenants(id),
    key        TEXT NOT NULL,
    doc        TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (model_id, dataset_id, key)
);

CREATE TABLE api_keys (
    id           UUID PRIMARY KEY,
    tenant_id    TEXT NOT NULL REFERENCES tenants(id),
    scope        TEXT NOT NULL CHECK (scope IN ('read', 'write', 'admin')),
    prefix       TEXT NOT NULL,
    hash         TEXT NOT NULL UNIQUE,
    created_at   BIGINT NOT NULL,
    revoked_at   BIGINT,
    last_used_at BIGINT
);

CREATE TABLE tenant_secrets (
    tenant_id      TEXT PRIMARY KEY REFERENCES tenants(id),
    webhook_secret TEXT NOT NULL,
    created_at     BIGINT NOT NULL
);

CREATE TABLE webhook_deliveries (
    id              BIGSERIAL PRIMARY KEY,
    job_id          UUID NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    tenant_id       TEXT NOT NULL REFERENCES tenants(id),
    url             TEXT NOT NULL,
    event           TEXT NOT NULL,
    state           TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'gave_up')),
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    locked_until    BIGINT,
    last_status     BIGINT,
    last_error      TEXT,
    created_at      BIGINT NOT NULL,
    delivered_at    BIGINT
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (state, next_attempt_at);
CREATE INDEX webhook_deliveries_by_job ON webhook_deliveries (job_id);

-- The durable outbox, as in SQLite: a delivery is written in the same transaction as the
-- job's terminal state, whichever path ends the job.
CREATE FUNCTION jobs_terminal_webhook() RETURNS trigger AS $$
DECLARE
    url TEXT := NEW.spec_json::jsonb -> 'webhook' ->> 'url';
    now_ms BIGINT := (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT;
BEGIN
    IF url IS NOT NULL THEN
        INSERT INTO webhook_deliveries (job_id, tenant_id, url, event, next_attempt_at, created_at)
        VALUES (NEW.id, NEW.tenant_id, url, 'job.' || NEW.state, now_ms, now_ms);
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER jobs_terminal_webhook AFTER UPDATE OF state ON jobs
FOR EACH ROW
WHEN (NEW.state IN ('succeeded', 'failed', 'cancelled')
      AND OLD.state NOT IN ('succeeded', 'failed', 'cancelled'))
EXECUTE FUNCTION jobs_terminal_webhook();

-- Idle workers in every process LISTEN on this channel: a job that becomes claimable (new,
-- retried, released, requeued by the sweeper) wakes them when its transaction commits.
CREATE FUNCTION jobs_queued_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('modelpress_job_queued', NEW.id::text);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER jobs_queued_notify AFTER INSERT OR UPDATE OF state ON jobs
FOR EACH ROW
WHEN (NEW.state = 'queued')
EXECUTE FUNCTION jobs_queued_notify();

-- Job state events for the event streams of every process, in commit order: a job's
-- `queued` is always announced before the `running` of the worker that claimed it, whichever
-- processes they ran in. (Progress events travel from the worker itself; see
-- `crate::events`.) The payload stays far below NOTIFY's 8000 bytes: an error message is
-- cut to 2000 characters, and of the summary only the ratio and the quality verdict travel.
CREATE FUNCTION jobs_state_notify() RETURNS trigger AS $$
DECLARE
    summary JSONB := NEW.summary_json::jsonb;
BEGIN
    PERFORM pg_notify('modelpress_events', json_build_object(
        'kind', 'job', 'id', NEW.id, 'tenant_id', NEW.tenant_id, 'model_id', NEW.model_id,
        'state', NEW.state, 'progress', NEW.progress, 'stage', NEW.stage,
        'cancel_requested', NEW.cancel_requested, 'attempts', NEW.attempts,
        'max_attempts', NEW.max_attempts, 'error_code', NEW.error_code,
        'error_message', left(NEW.error_message, 2000), 'created_at', NEW.created_at,
        'started_at', NEW.started_at, 'finished_at', NEW.finished_at,
        'ratio', summary -> 'ratio', 'quality', summary -> 'quality')::text);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER jobs_state_notify_insert AFTER INSERT ON jobs
FOR EACH ROW EXECUTE FUNCTION jobs_state_notify();

CREATE TRIGGER jobs_state_notify_update AFTER UPDATE OF state, cancel_requested ON jobs
FOR EACH ROW
WHEN (OLD.state IS DISTINCT FROM NEW.state OR OLD.cancel_requested IS DISTINCT FROM NEW.cancel_requested)
EXECUTE FUNCTION jobs_state_notify();
