"""The README's walkthrough through a Python client generated from the served openapi.yaml
by openapi-python-client, as an MLOps pipeline would call modelpress: upload a model and an
evaluation dataset, submit a pipeline with an eval block, follow the job, download
model.onnx and run it in onnxruntime.

Usage: walkthrough.py BASE_URL MODEL.onnx EVAL.npz OUT_DIR   (the generated package
`modelpress_client` on PYTHONPATH). Exits non-zero, saying why, on any step that fails.
"""
import os
import sys
import time

import numpy as np
import onnxruntime as ort
from modelpress_client import Client
from modelpress_client.api.default import (
    get_v1_jobs_id,
    get_v1_jobs_id_artifacts_name,
    post_v1_datasets,
    post_v1_jobs,
    post_v1_models,
)
from modelpress_client.models import Dataset, Job, JobSpec, JobState, Model
from modelpress_client.types import File

base, model_path, dataset_path, out_dir = sys.argv[1:5]
client = Client(base_url=base, timeout=120.0, raise_on_unexpected_status=True)

with open(model_path, "rb") as f:
    model = post_v1_models.sync(
        client=client, body=File(payload=f, file_name="mnist-8.onnx"), name="mnist-8.onnx"
    )
assert isinstance(model, Model), model
print(f"model {model.id}: {model.format_}, {model.parameter_count} parameters")

with open(dataset_path, "rb") as f:
    dataset = post_v1_datasets.sync(client=client, body=File(payload=f), name="eval.npz")
assert isinstance(dataset, Dataset), dataset
print(f"dataset {dataset.id}: {dataset.rows} rows")

spec = JobSpec.from_dict(
    {
        "model_id": str(model.id),
        "pipeline": [
            {"method": "quantize", "bits": 8, "granularity": "channel", "roles": ["weight"]}
        ],
        "eval": {"dataset_id": str(dataset.id), "metric": "top1"},
        "latency": False,
    }
)
job = post_v1_jobs.sync(client=client, body=spec)
assert isinstance(job, Job), job
print(f"job {job.id}: {job.state.value}")

terminal = {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}
deadline = time.monotonic() + 300
while job.state not in terminal:
    if time.monotonic() > deadline:
        sys.exit(f"job {job.id} still {job.state.value} after 300 s")
    time.sleep(0.2)
    job = get_v1_jobs_id.sync(job.id, client=client)
    assert isinstance(job, Job), job
if job.state != JobState.SUCCEEDED:
    sys.exit(f"job {job.id} ended {job.state.value}: {job.error}")

summary = job.summary.to_dict()
evaluation = summary["evaluation"]
print(f"ratio {summary['ratio']:.2f}, top-1 {evaluation['original']} -> {evaluation['compressed']}")
assert summary["ratio"] > 1.5, summary
assert abs(evaluation["original"] - evaluation["compressed"]) < 0.05, evaluation
names = [a.name for a in job.artifacts]
assert "model.onnx" in names and "report.json" in names, names

artifact = get_v1_jobs_id_artifacts_name.sync(job.id, "model.onnx", client=client)
assert isinstance(artifact, File), artifact
onnx_path = os.path.join(out_dir, "model.onnx")
with open(onnx_path, "wb") as f:
    f.write(artifact.payload.read())
session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
feed = {
    i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], dtype=np.float32)
    for i in session.get_inputs()
}
outputs = session.run(None, feed)
print(f"model.onnx runs in onnxruntime: output shape {outputs[0].shape}")
print("walkthrough: ok")
