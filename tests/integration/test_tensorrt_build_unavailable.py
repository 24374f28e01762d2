"""tensorrt_build on this machine, against a real MLflow server over HTTP.

This machine has no GPU and cannot install TensorRT, which is what most Airflow workers look
like: the real entry point must fail the TensorRT branch at once with a clear message and the
non-retryable exit code, leaving no run marked succeeded. The success path runs in-process
through the real runner and MLflow with a FAKE ``tensorrt`` module (mocked because it cannot
be installed here; see tests/unit/test_tensorrt_build_fake_trt.py) on the real example ONNX
model, so the artifact layout a validate/benchmark task reads is checked end to end.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from airflow_modelopt.container.steps import tensorrt_build
from tests.conftest import run_step

EXPERIMENT = "tests-tensorrt"

#: What the step says on a worker without TensorRT and/or a GPU.
NEEDS_GPU = (r"TensorRT target needs an NVIDIA GPU and the tensorrt package; this worker has "
             r"(neither|an NVIDIA GPU .* but not the tensorrt package|the tensorrt package .* but no NVIDIA GPU)")

requires_missing_tensorrt = pytest.mark.skipif(
    tensorrt_build.unavailable_reason() is None,
    reason="TensorRT and a GPU are available here: tests/gpu/test_tensorrt_gpu.py covers this machine",
)


def _runs(client, experiment: str, status: str | None = None) -> list:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    query = "tags.`modelopt.step` = 'tensorrt_build'"
    if status:
        query += f" and tags.`modelopt.status` = '{status}'"
    return client.search_runs([exp.experiment_id], filter_string=query)


@requires_missing_tensorrt
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_without_gpu_or_tensorrt_the_step_fails_clearly_and_is_not_retried(mlflow_server, example_model,
                                                                           example_onnx, precision):
    experiment = f"{EXPERIMENT}-unavailable-{precision}"
    spec = {"model_uri": example_onnx["artifacts"]["onnx_model"], "precision": precision,
            "context": {"experiment_name": experiment}}
    if precision == "int8":
        spec["calibration_data_uri"] = example_model["artifacts"]["calibration_data"]
    run = run_step("tensorrt_build", spec, mlflow_server.env(), timeout=300)

    assert run.returncode == 6, run.output[-3000:]
    assert tensorrt_build.UnsupportedHere.exit_code == 6 and tensorrt_build.UnsupportedHere.retryable is False
    assert run.result is None
    error_lines = [line for line in run.output.splitlines() if line.startswith("modelopt: error: ")]
    assert len(error_lines) == 1, run.output[-3000:]
    import re

    assert re.search(NEEDS_GPU, error_lines[0]), error_lines[0]
    assert "Not retried" in error_lines[0] and "tensorrt" in error_lines[0]
    assert "Traceback" not in run.output, "an expected refusal is a message, not a crash"

    client = mlflow_server.client()
    assert _runs(client, experiment, "succeeded") == []
    failed = _runs(client, experiment, "failed")
    assert len(failed) == 1
    assert "UnsupportedHere: TensorRT target needs an NVIDIA GPU" in failed[0].data.tags["modelopt.error"]
    assert failed[0].info.status == "FAILED"
    assert "tensorrt_engine" not in {a.path for a in client.list_artifacts(failed[0].info.run_id)}


def test_with_a_fake_tensorrt_the_step_logs_engine_signature_and_timing_cache(mlflow_server, example_model,
                                                                              example_onnx, monkeypatch, tmp_path):
    """The whole step in-process through the real runner and MLflow server; only TensorRT and the
    GPU are fakes (they cannot exist here)."""
    import mlflow
    import numpy as np

    from airflow_modelopt.container.runner import run_step as run_in_process
    from tests.unit.test_tensorrt_build_fake_trt import FakeDeviceMemory, FakeState, make_fake_trt

    state = FakeState()
    fake = make_fake_trt(state)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    memory = FakeDeviceMemory()
    gpu = tensorrt_build.GpuInfo(count=1, names=["Fake GPU"], compute_capabilities=["8.9"], memory_mb=[24000],
                                 cuda_python=True)
    monkeypatch.setattr(tensorrt_build, "check_environment",
                        lambda spec: tensorrt_build.Environment(fake, fake.__version__, gpu, memory))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)

    spec = {"model_uri": example_onnx["artifacts"]["onnx_model"], "precision": "int8",
            "calibration_data_uri": example_model["artifacts"]["calibration_data"], "calibration_batches": 4,
            "context": {"experiment_name": f"{EXPERIMENT}-fake"}}
    first = run_in_process("tensorrt_build", spec)

    assert state.parse_paths and Path(state.parse_paths[0]).name == "model.onnx"
    assert any(f.endswith(".data") for f in state.parse_dir_files[0]), "the external data lies beside the graph"
    mlflow.set_tracking_uri(mlflow_server.uri)
    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=first.artifacts["tensorrt_engine_files"],
                                                      dst_path=str(tmp_path / "engine")))
    assert sorted(p.name for p in folder.iterdir()) == ["calibration.cache", "model.engine",
                                                        "modelopt_signature.json", "timing.cache"]
    sig = json.loads((folder / "modelopt_signature.json").read_text())
    assert sig["format"] == "tensorrt" and sig["inputs"][0]["shape"] == [None, 1, 8, 8]
    assert sig["outputs"][0]["shape"] == [None, 10]

    cal = np.load(mlflow.artifacts.download_artifacts(artifact_uri=example_model["artifacts"]["calibration_data"],
                                                      dst_path=str(tmp_path / "cal")))
    fed = [a for _, a in memory.copies]
    assert len(fed) == 4 and first.metrics["calibration_batches"] == 4
    np.testing.assert_array_equal(np.concatenate(fed), cal["x"][:32].astype(np.float32))
    assert first.metrics["timing_cache_reused"] == 0
    assert first.metrics["onnx_bytes"] > 100_000, "the graph and its external weights (the CNN has >30k parameters)"

    # A second build starting from the first one's timing cache reuses it and saves the grown cache.
    again = {**spec, "precision": "fp16", "timing_cache_uri": first.artifacts["timing_cache"]}
    del again["calibration_data_uri"], again["calibration_batches"]
    second = run_in_process("tensorrt_build", again)
    assert second.metrics["timing_cache_reused"] == 1
    assert state.created_caches[-1] == (folder / "timing.cache").read_bytes()
    cache = Path(mlflow.artifacts.download_artifacts(artifact_uri=second.artifacts["timing_cache"],
                                                     dst_path=str(tmp_path / "cache2")))
    assert cache.read_bytes() == (folder / "timing.cache").read_bytes() + b"|timed-by-this-build"
    status = mlflow_server.client().get_run(second.mlflow_run_id).data.tags["modelopt.status"]
    assert status == "succeeded"
