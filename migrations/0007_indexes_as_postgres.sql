-- The indexes PostgreSQL's schema has had from its start (migrations/postgres/0001), here
-- too, so both databases are the same schema (src/queue/schema.rs compares them):
-- - the claim reads the oldest queued job: a partial index keeps that read small however
--   many finished jobs the table holds;
-- - the sweeper reads running jobs by lease expiry;
-- - a tenant's artifacts are counted for its quota.
DROP INDEX jobs_claim;
CREATE INDEX jobs_claim ON jobs (id) WHERE state = 'queued';
CREATE INDEX jobs_running_lease ON jobs (lease_expires_at) WHERE state = 'running';
CREATE INDEX artifacts_by_tenant ON artifacts (tenant_id);
