"""benchmark on the example digits CNN against a real MLflow server: the ORT model through the
entry point (latency percentiles, throughput, fresh-process peak RSS, size, hardware tags, the
report's target flags), TFLite int8 on random inputs in process, zero timed runs refused, an
enforced target failing the task, and the comparison plot logged on a parent run."""

from __future__ import annotations

import re

import pytest

from airflow_modelopt.exceptions import GateFailed
from tests.conftest import run_step

pytest_plugins = ("tests.integration._models",)  # fixtures: candidates, step_env (one build per session)

EXPERIMENT = "tests-benchmark"


def _spec(model, **fields):
    return {"model_uri": str(model), "context": {"experiment_name": EXPERIMENT, "force": True}, "warmup_runs": 5,
            "timed_runs": 30, **fields}


def test_onnx_benchmark_through_the_entry_point(candidates, mlflow_server):
    from tests.integration._models import read_artifact_text

    spec = _spec(candidates.onnx_fp32, data_uri=str(candidates.eval_npz), batch_sizes=[8, 1], threads=1,
                 candidate_name="ORT fp32")
    run = run_step("benchmark", spec, mlflow_server.env())
    assert run.returncode == 0, run.output[-3000:]
    m = run.result["metrics"]
    for b in (1, 8):
        assert 0 < m[f"latency_ms_min_b{b}"] <= m[f"latency_ms_p50_b{b}"] <= m[f"latency_ms_p95_b{b}"] <= m[f"latency_ms_p99_b{b}"]
        assert m[f"throughput_items_per_s_b{b}"] == pytest.approx(b * 1000 / m[f"latency_ms_mean_b{b}"], rel=1e-6)
    assert m["latency_ms_p95"] == m["latency_ms_p95_b1"]  # the headline numbers are the smallest batch's
    files = sorted(p for p in candidates.onnx_fp32.iterdir() if p.suffix in (".onnx", ".data"))
    assert m["model_bytes"] == sum(p.stat().st_size for p in files)  # model.onnx + its external data only
    assert 20 < m["peak_rss_mb"] < 2000 and m["target_peak_memory_met"] == (1.0 if m["peak_rss_mb"] < 500 else 0.0)
    assert m["target_latency_met"] == 1.0 and m["threads"] == 1.0

    tags = mlflow_server.client().get_run(run.result["mlflow_run_id"]).data.tags
    assert tags["modelopt.runtime"].startswith("onnxruntime ") and "CPUExecutionProvider" in tags["modelopt.runtime"]
    assert tags["modelopt.runtime_threads"] == "1" and tags["modelopt.model_format"] == "onnx"
    assert tags["modelopt.hw.cpu_model"] and int(tags["modelopt.hw.physical_cores"]) >= 1
    assert "modelopt.hw.fingerprint" in tags

    report = read_artifact_text(mlflow_server.uri, run.result["mlflow_run_id"], "benchmark/report.md")
    assert re.search(r"^\| 1 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d,.]+ \|$", report, re.M), report
    assert "| latency | p95 latency at batch 1 (ms) | < 100 |" in report
    assert "| throughput | items/s at batch 1 | > 30 |" in report
    assert "| peak_memory | peak RSS of a fresh process (MB) | < 500 |" in report


def test_tflite_int8_benchmark_on_random_inputs(candidates, step_env, mlflow_server):
    from airflow_modelopt.container.runner import run_step as run_in_process

    result = run_in_process("benchmark", _spec(candidates.tflite_int8, batch_sizes=[1, 4]))
    m = result.metrics
    assert m["model_bytes"] == (candidates.tflite_int8 / "model.tflite").stat().st_size
    assert m["latency_ms_mean_b4"] > 0 and m["throughput_items_per_s_b1"] > 30
    assert result.info["format"] == "tflite" and result.info["runtime"].startswith("ai-edge-litert")
    assert result.verdict is None  # targets are flags unless enforced
    # a fresh LiteRT process holds far less than one that imported TensorFlow (this test process)
    assert m["peak_rss_mb"] < 300


def test_zero_timed_runs_is_refused_before_anything_runs(candidates, mlflow_server):
    run = run_step("benchmark", _spec(candidates.onnx_fp32, timed_runs=0), mlflow_server.env())
    assert run.returncode == 2
    assert "timed_runs: Input should be greater than or equal to 1 (got 0)" in run.output


def test_enforced_target_that_is_missed_fails_the_task(candidates, step_env, mlflow_server):
    from airflow_modelopt.container.runner import run_step as run_in_process

    with pytest.raises(GateFailed) as err:
        run_in_process("benchmark", _spec(candidates.onnx_int8, batch_sizes=[1], measure_memory=False,
                                          max_latency_ms=1e-6, enforce_targets=True))
    assert re.search(r"target latency: p95 latency at batch 1 \(ms\) is [\d.]+, needs < 1e-06", str(err.value))


def test_comparison_plot_is_logged_on_the_parent_run(mlflow_server, tmp_path):
    from airflow_modelopt.container.steps.benchmark import log_comparison_plot
    from tests.integration._models import read_artifact_text

    client = mlflow_server.client()
    experiment = client.get_experiment_by_name(EXPERIMENT) or client.get_experiment(client.create_experiment(EXPERIMENT))
    parent = client.create_run(experiment.experiment_id, run_name="dag run").info.run_id
    rows = [{"name": "ort fp32", "latency_ms": 0.05, "size_bytes": 167_000, "accuracy": 0.975},
            {"name": "tflite int8", "latency_ms": 0.006, "size_bytes": 45_000, "accuracy": 0.975},
            {"name": "torch", "latency_ms": 0.3, "size_bytes": 180_000, "accuracy": 0.975}]
    uri = log_comparison_plot(client, parent, rows)
    assert uri == f"runs:/{parent}/comparison/candidates.png"
    names = {a.path for a in client.list_artifacts(parent, "comparison")}
    assert names == {"comparison/candidates.png", "comparison/candidates.json"}
    import json

    data = json.loads(read_artifact_text(mlflow_server.uri, parent, "comparison/candidates.json"))
    assert [r["pareto"] for r in data] == [False, True, False]
