-- A search's per-layer sensitivity table, kept per (model, dataset, what it was measured
-- with) so a later search on the same pair skips re-measuring it. Rows go with their model
-- or dataset.
CREATE TABLE sensitivity_cache (
    model_id   TEXT NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    dataset_id TEXT NOT NULL REFERENCES datasets(id) ON DELETE CASCADE,
    tenant_id  TEXT NOT NULL REFERENCES tenants(id),
    key        TEXT NOT NULL,                    -- sha256 of metric, output, threshold, feed, min_params, settings
    doc        TEXT NOT NULL,                    -- sensitivity.json
    created_at INTEGER NOT NULL,
    PRIMARY KEY (model_id, dataset_id, key)
);
