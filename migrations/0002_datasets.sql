-- Evaluation and calibration data: one .npz per dataset, arrays named after a model's graph
-- inputs, samples on axis 0, optional int64 `labels`.
CREATE TABLE datasets (
    id          TEXT PRIMARY KEY,                -- uuid v7
    tenant_id   TEXT NOT NULL REFERENCES tenants(id),
    name        TEXT NOT NULL,
    size_bytes  INTEGER NOT NULL,
    sha256      TEXT NOT NULL,
    rows        INTEGER,                         -- common axis-0 length; NULL when the arrays differ (fed whole)
    has_labels  INTEGER NOT NULL,
    arrays_json TEXT NOT NULL,                   -- [{name, dtype, shape}]
    blob_key    TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE INDEX datasets_by_tenant ON datasets (tenant_id, id);
