"""Issue 12 item 3: a cached task is found on the Airflow worker and starts no step process.

Operators run in this process against the real MLflow server (local mode). The first run of each
task starts its step; later runs with the same spec, inputs and code reuse it from the worker: the
launcher is replaced by one that fails the test if called, the task log names the worker-side hit,
and the reuse run carries the tags (``modelopt.verdict`` included) and the XCom a step-side hit
gives. A changed parameter, input or code digest, ``force``, and an input without a recorded digest
all start the step.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from airflow_modelopt import caching
from airflow_modelopt.operators import launchers, worker_cache
from airflow_modelopt.operators.base import ModelOptOperator
from airflow_modelopt.operators.torch_to_onnx import TorchToOnnxOperator
from airflow_modelopt.operators.validate import ValidateEquivalenceOperator

#: The session's example export (fixture ``example_onnx``) lives there: the export below is its twin.
EXPERIMENT = "tests-example"
#: Tags that differ between any two runs of the same task in different DAG runs.
PER_RUN_TAGS = {caching.TAG_RUN_ID, caching.PARENT_TAG, caching.TAG_CACHE_LOOKUP, "mlflow.runName", "mlflow.user",
                "mlflow.source.name", "mlflow.source.type", "mlflow.source.git.commit"}
LOG = logging.getLogger("tests.worker_cache")


class StepLaunched(Exception):
    """Raised by the stub launcher: the task would have started a step process."""


class _Hook:
    def __init__(self, uri: str) -> None:
        self.uri = uri

    def tracking_config(self) -> Any:
        from airflow_modelopt.hooks.mlflow import TrackingConfig

        return TrackingConfig(self.uri, {"MLFLOW_TRACKING_URI": self.uri}, source="test")

    def get_connection(self, conn_id: str) -> Any:
        raise LookupError(conn_id)


@pytest.fixture(autouse=True)
def task_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """The operators' task log through a standard logger, so caplog reads it."""
    monkeypatch.setattr(ModelOptOperator, "log", property(lambda self: LOG))


def _execute(operator: Any, server: Any, dag_run: str, caplog: pytest.LogCaptureFixture) -> tuple[dict, str]:
    operator.__dict__["mlflow_hook"] = _Hook(server.uri)
    ti = SimpleNamespace(try_number=1, dag_id="worker_cache_dag", run_id=dag_run, task_id=operator.task_id)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOG.name):
        try:
            output = operator.execute({"ti": ti, "dag_run": SimpleNamespace(run_id=dag_run)})
        except StepLaunched as exc:
            exc.add_note("task log:\n" + "\n".join(r.getMessage() for r in caplog.records
                                                   if "worker" in r.getMessage()))
            raise
    return output, caplog.text


def _no_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on, a step process the task would start raises StepLaunched instead."""

    def launch(self: Any, context: Any) -> Any:
        raise StepLaunched(self.request.spec.step)

    monkeypatch.setattr(launchers.LocalLauncher, "launch", launch)


def _export(model_uri: str, data_uri: str, **kwargs: Any) -> TorchToOnnxOperator:
    """The twin of the session's example export (tests/conftest.py ``example_onnx``)."""
    return TorchToOnnxOperator(task_id="export", model_uri=model_uri, data_uri=data_uri, execution_mode="local",
                               experiment_name=EXPERIMENT, retries=0, **kwargs)


def _comparable(output: dict) -> dict:
    return {k: v for k, v in output.items()
            if k not in ("mlflow_run_id", "parent_run_id", "duration_s", "cache_hit", "cached_from_run_id")}


def _assert_worker_hit(out: dict, log: str, first: dict, client: Any, dag_run: str) -> None:
    assert "Cache hit on the worker" in log and "no step process started" in log, log[-2000:]
    assert out["cache_hit"] and out["cache_key"] == first["cache_key"]
    assert out["cached_from_run_id"] == (first["cached_from_run_id"] or first["mlflow_run_id"])
    assert _comparable(out) == _comparable(first)
    run = client.get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags[caching.TAG_CACHE_LOOKUP] == "worker"
    assert run.data.tags[caching.PARENT_TAG] == out["parent_run_id"]
    parent = client.get_run(out["parent_run_id"]).data.tags
    assert parent[caching.TAG_ROLE] == "dag_run" and parent[caching.TAG_RUN_ID] == dag_run
    logged = json.loads(Path(client.download_artifacts(out["mlflow_run_id"], caching.RESULT_ARTIFACT)).read_text())
    assert logged == out, "the reuse run's result.json is not the task's XCom"


def test_cached_export_and_validate_start_no_step_and_match_a_step_side_hit(
        mlflow_server, example_model, example_onnx, monkeypatch, caplog):
    client = mlflow_server.client()
    arts = example_model["artifacts"]

    def validate() -> ValidateEquivalenceOperator:
        return ValidateEquivalenceOperator(
            task_id="validate", reference_uri=arts["model_pt2"], candidate_uri=example_onnx["artifacts"]["onnx_model"],
            data_uri=arts["eval_data"], candidate_format="onnx", atol=1e-4, rtol=1e-3, max_samples=64,
            execution_mode="local", experiment_name=EXPERIMENT, retries=0)

    # The first validation runs its step, which records the digests of its inputs where they live.
    judged, log = _execute(validate(), mlflow_server, "cold", caplog)
    assert "Cache lookup on the worker:" in log and "starting the step" in log, log[-2000:]
    assert judged["verdict"]["passed"] is True
    kind, model_id, tag = caching.digest_record(example_onnx["artifacts"]["onnx_model"])
    assert kind == "model" and len(client.get_logged_model(model_id).tags.get(tag, "")) == 64
    _, run_id, tag = caching.digest_record(arts["eval_data"])
    assert len(client.get_run(run_id).data.tags.get(tag, "")) == 64

    # A step-side hit, the worker's lookup disabled, to compare the worker's with.
    def uncertain(self: Any, spec: Any, **kwargs: Any) -> Any:
        raise worker_cache.Uncertain("disabled by the test")

    with monkeypatch.context() as m:
        m.setattr(worker_cache.WorkerCache, "lookup", uncertain)
        step_hit, _ = _execute(validate(), mlflow_server, "step-side", caplog)
    assert step_hit["cache_hit"] and step_hit["cached_from_run_id"] == judged["mlflow_run_id"]

    _no_step(monkeypatch)
    export, log = _execute(_export(arts["model_pt2"], arts["eval_data"]), mlflow_server, "cached", caplog)
    _assert_worker_hit(export, log, example_onnx, client, "cached")
    out, log = _execute(validate(), mlflow_server, "cached", caplog)
    _assert_worker_hit(out, log, judged, client, "cached")
    assert {k: v for k, v in out.items() if k not in ("mlflow_run_id", "parent_run_id", "duration_s")} == \
        {k: v for k, v in step_hit.items() if k not in ("mlflow_run_id", "parent_run_id", "duration_s")}

    # The worker's reuse run of validate has the tags the step's has, the reused verdict included.
    worker_tags = client.get_run(out["mlflow_run_id"]).data.tags
    step_tags = client.get_run(step_hit["mlflow_run_id"]).data.tags
    assert worker_tags[caching.TAG_VERDICT] == "passed" and step_tags[caching.TAG_CACHE_LOOKUP] == "step"
    assert {k: v for k, v in worker_tags.items() if k not in PER_RUN_TAGS} == \
        {k: v for k, v in step_tags.items() if k not in PER_RUN_TAGS}


def test_a_changed_spec_input_or_code_force_and_unknown_inputs_start_the_step(
        mlflow_server, example_model, example_onnx, monkeypatch, caplog, tmp_path):
    import mlflow

    arts = example_model["artifacts"]
    mlflow.set_tracking_uri(mlflow_server.uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=arts["model_pt2"], dst_path=str(tmp_path)))
    _no_step(monkeypatch)

    # Content, not URI: the same bytes at a local path (hashed on the worker) hit the same run.
    out, log = _execute(_export(str(local), arts["eval_data"]), mlflow_server, "local-copy", caplog)
    assert out["cache_hit"] and out["cache_key"] == example_onnx["cache_key"], log[-2000:]

    def starts_step(operator: Any, why: str, reason: str) -> None:
        with pytest.raises(StepLaunched):
            _execute(operator, mlflow_server, f"miss-{why}", caplog)
        assert "Cache lookup on the worker:" in caplog.text and reason in caplog.text, (why, caplog.text[-2000:])

    starts_step(_export(str(local), arts["eval_data"], opset=17), "spec", "no finished run with cache key")
    changed = tmp_path / "changed.pt2"
    shutil.copy(local, changed)
    with changed.open("ab") as fh:
        fh.write(b"\0")
    starts_step(_export(str(changed), arts["eval_data"]), "input", "no finished run with cache key")
    with monkeypatch.context() as m:
        m.setattr(worker_cache, "local_code_digest", lambda: "0" * 64)
        starts_step(_export(str(local), arts["eval_data"]), "code", "no finished run with cache key")
    # Not an input the worker can vouch for: no digest recorded there, or a name that can move.
    starts_step(_export(f"runs:/{example_model['mlflow_run_id']}/model/other.pt2", arts["eval_data"]),
                "unrecorded", "no content digest recorded")
    starts_step(_export("models:/some-model/1", arts["eval_data"]), "registry", "inputs are hashed by the step")
    with pytest.raises(StepLaunched):  # force: no lookup at all
        _execute(_export(str(local), arts["eval_data"], force=True), mlflow_server, "miss-force", caplog)
    assert "Cache lookup on the worker" not in caplog.text
