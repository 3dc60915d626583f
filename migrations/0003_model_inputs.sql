-- A graph's inputs (ONNX), recorded at upload so a job's dataset is checked against them at
-- submit: [{name, dtype, shape}] with null for a symbolic axis. NULL for weight-only formats
-- and for models stored before this column existed (their datasets are checked when the job
-- runs).
ALTER TABLE models ADD COLUMN inputs_json TEXT;
