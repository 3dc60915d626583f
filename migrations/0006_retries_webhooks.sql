-- A job whose attempt failed for a reason that may pass (a full disk, a lost database write)
-- goes back to the queue with a backoff: it is not claimed before `not_before` (unix ms).
ALTER TABLE jobs ADD COLUMN not_before INTEGER;

-- Signed webhooks: one secret per tenant (HMAC-SHA256 key), made on first use.
CREATE TABLE tenant_secrets (
    tenant_id      TEXT PRIMARY KEY REFERENCES tenants(id),
    webhook_secret TEXT NOT NULL,
    created_at     INTEGER NOT NULL
);

-- The durable outbox: a delivery is written in the same transaction as the job's terminal
-- state (the trigger below), so no path that ends a job can forget it and a restart loses
-- none. A delivery task POSTs pending rows and retries with backoff until the configured
-- time after `created_at` has passed (MODELPRESS_WEBHOOK_GIVE_UP_SECS), then records `gave_up`.
CREATE TABLE webhook_deliveries (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id          TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    tenant_id       TEXT NOT NULL REFERENCES tenants(id),
    url             TEXT NOT NULL,
    event           TEXT NOT NULL,              -- job.succeeded | job.failed | job.cancelled
    state           TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'gave_up')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    locked_until    INTEGER,
    last_status     INTEGER,
    last_error      TEXT,
    created_at      INTEGER NOT NULL,
    delivered_at    INTEGER
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (state, next_attempt_at);
CREATE INDEX webhook_deliveries_by_job ON webhook_deliveries (job_id);

CREATE TRIGGER jobs_terminal_webhook AFTER UPDATE OF state ON jobs
WHEN NEW.state IN ('succeeded', 'failed', 'cancelled')
 AND OLD.state NOT IN ('succeeded', 'failed', 'cancelled')
 AND json_extract(NEW.spec_json, '$.webhook.url') IS NOT NULL
BEGIN
    INSERT INTO webhook_deliveries (job_id, tenant_id, url, event, next_attempt_at, created_at)
    VALUES (
        NEW.id, NEW.tenant_id, json_extract(NEW.spec_json, '$.webhook.url'), 'job.' || NEW.state,
        CAST(unixepoch('subsec') * 1000 AS INTEGER),
        CAST(unixepoch('subsec') * 1000 AS INTEGER)
    );
END;
