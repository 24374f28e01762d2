"""Promotion against a real MLflow server's Model Registry: registration with lineage, aliases by
policy, idempotent re-runs, failing candidates left out."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_step


def _candidate(target, uri, latency, drop=0.005, passed=True, key=None, size=100_000.0):
    return {"target": target, "model_uri": uri, "passed": passed, "candidate_key": key or f"key-{target}-{uri}",
            "reasons": [] if passed else ["max_accuracy_drop: 0.08 > 0.02"],
            "metrics": {"latency_ms_p50": latency, "model_bytes": size, "accuracy_drop": drop,
                        "candidate_accuracy": 0.97 - drop},
            "source_model_uri": "models:/digits-source/1",
            "lineage": [{"step": "torch_to_onnx", "params": {"opset": 18}}]}


@pytest.fixture(scope="module")
def uris(example_model, example_onnx):
    return {"onnx": example_onnx["artifacts"]["onnx_model"], "torch": example_model["artifacts"]["pytorch_model"],
            "calibration": example_model["artifacts"]["calibration_data"],
            "folder": example_model["artifacts"]["eval_data"].rsplit("/", 1)[0]}  # a plain artifact folder


def _promote(server, name, candidates, force=False, **extra):
    spec = {"registered_model_name": name, "candidates": candidates, **extra,
            "context": {"experiment_name": "tests-promote", "force": force, "dag_id": "promote_test",
                        "run_id": f"manual__{name}"}}
    run = run_step("promote", spec, server.env())
    assert run.returncode == 0, run.output[-3000:]
    return run.result


def test_passing_candidates_registered_with_lineage_and_aliases(mlflow_server, uris):
    name = "digits-promote-a"
    result = _promote(mlflow_server, name, [
        _candidate("onnx_fp32", uris["onnx"], latency=2.0),
        _candidate("torch_fp32", uris["torch"], latency=3.0),
        _candidate("onnx_int8_static", uris["onnx"], latency=1.0, drop=0.09, passed=False),
    ], calibration_data_uri=uris["calibration"])
    client = mlflow_server.client()
    versions = {v.tags["modelopt.target"]: v for v in client.search_model_versions(f"name = '{name}'")}
    assert set(versions) == {"onnx_fp32", "torch_fp32"}, "a failing candidate must not be registered"
    v = versions["onnx_fp32"]
    assert v.tags["modelopt.source_model_uri"] == "models:/digits-source/1"
    assert '"step": "torch_to_onnx"' in v.tags["modelopt.lineage"]
    assert float(v.tags["modelopt.metric.latency_ms_p50"]) == 2.0
    assert v.tags["airflow.dag_id"] == "promote_test"
    assert len(v.tags["modelopt.calibration_data_sha256"]) == 64
    assert client.get_model_version_by_alias(name, "onnx_fp32").version == v.version
    assert client.get_model_version_by_alias(name, "champion").version == v.version  # fastest passing
    assert result["info"]["aliases"]["champion"] == int(v.version)
    assert "onnx_int8_static" in result["info"]["summary_markdown"]
    assert result["metrics"]["registered_now"] == 2.0
    parent = mlflow_server.client().get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["modelopt.outcome"] == "some_failed"


def test_plain_artifact_folder_is_registered_and_downloadable(mlflow_server, uris, tmp_path):
    """TFLite models and TensorRT engines are artifact folders, not MLflow logged models."""
    import mlflow

    name = "digits-promote-folder"
    _promote(mlflow_server, name, [_candidate("tflite_int8", uris["folder"], latency=1.0)])
    mlflow.set_tracking_uri(mlflow_server.uri)
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}@tflite_int8", dst_path=str(tmp_path))
    assert sorted(p.name for p in Path(local).iterdir()) == [
        "calibration.npz", "eval.npz", "train.npz"]


def test_rerun_registers_nothing_twice(mlflow_server, uris):
    name = "digits-promote-b"
    candidates = [_candidate("onnx_fp32", uris["onnx"], latency=2.0)]
    _promote(mlflow_server, name, candidates)
    again = _promote(mlflow_server, name, candidates, force=True)
    assert again["metrics"]["registered_now"] == 0.0
    assert len(mlflow_server.client().search_model_versions(f"name = '{name}'")) == 1
    # without force too: promotion is never answered from the cache (it moves aliases, ends the parent run)
    third = _promote(mlflow_server, name, candidates)
    assert third["cache_hit"] is False and third["metrics"]["registered_now"] == 0.0
    # the version's logged model (MLflow's Models tab) has each of the candidate's metrics, once,
    # not once per promotion (other tests of this module promote the same export too)
    version = mlflow_server.client().get_model_version(name, "1")
    assert version.source.startswith("models:/m-"), version.source
    logged = mlflow_server.client().get_logged_model(version.source[len("models:/"):])
    assert sorted(m.key for m in logged.metrics) == sorted(candidates[0]["metrics"])


def test_champion_moves_only_when_beaten_without_worse_accuracy(mlflow_server, uris):
    name = "digits-promote-c"
    client = mlflow_server.client()
    _promote(mlflow_server, name, [_candidate("onnx_fp32", uris["onnx"], latency=2.0, key="gen1")])
    first = client.get_model_version_by_alias(name, "champion").version

    slower = _promote(mlflow_server, name, [_candidate("onnx_fp32", uris["onnx"], latency=5.0, key="gen2")])
    assert client.get_model_version_by_alias(name, "champion").version == first
    assert "does not beat" in slower["info"]["decision"]
    challenger = client.get_model_version_by_alias(name, "challenger").version
    assert challenger != first
    assert client.get_model_version_by_alias(name, "onnx_fp32").version == challenger  # newest of its target

    faster_but_worse = _promote(mlflow_server, name, [_candidate("onnx_fp32", uris["onnx"], latency=1.0, drop=0.05,
                                                                 key="gen3")])
    assert client.get_model_version_by_alias(name, "champion").version == first
    assert "accuracy drop" in faster_but_worse["info"]["decision"]

    better = _promote(mlflow_server, name, [_candidate("onnx_fp32", uris["onnx"], latency=1.0, key="gen4")])
    assert client.get_model_version_by_alias(name, "champion").version != first
    assert "beats the champion" in better["info"]["decision"]


def test_no_passing_candidate_fails_promotion_and_the_parent_run(mlflow_server, uris):
    """A DAG run in which every candidate failed must not end green: the step fails naming each
    target's reason, nothing is registered, and the parent run ends FAILED with the outcome."""
    name = "digits-promote-d"
    candidates = [_candidate("onnx_fp32", uris["onnx"], latency=1.0, passed=False),
                  {**_candidate("tflite_int8", None, latency=1.0, passed=False),
                   "reasons": ["build task tflite_int8_build did not succeed"]}]
    spec = {"registered_model_name": name, "candidates": candidates,
            "context": {"experiment_name": "tests-promote", "dag_id": "promote_test", "run_id": f"manual__{name}"}}
    run = run_step("promote", spec, mlflow_server.env())
    assert run.returncode == 3, run.output[-3000:]
    assert "no candidate passed" in run.output
    assert "onnx_fp32: max_accuracy_drop: 0.08 > 0.02" in run.output
    assert "tflite_int8: build task tflite_int8_build did not succeed" in run.output
    client = mlflow_server.client()
    assert client.search_model_versions(f"name = '{name}'") == []
    parent = _parent_run(client, name)
    assert parent.info.status == "FAILED"
    assert parent.data.tags["modelopt.outcome"] == "none_passed"
    assert "tflite_int8: build task" in parent.data.tags["modelopt.failed_targets"]
    assert parent.data.metrics["modelopt.candidates_failed"] == 2.0
    assert parent.data.metrics["modelopt.candidates_passed"] == 0.0
    assert "summary/candidates.md" in {a.path for a in client.list_artifacts(parent.info.run_id, "summary")}


def test_some_failed_targets_stay_green_but_say_so_on_the_parent_run(mlflow_server, uris):
    name = "digits-promote-f"
    _promote(mlflow_server, name, [_candidate("onnx_fp32", uris["onnx"], latency=2.0),
                                   _candidate("onnx_int8_static", uris["onnx"], latency=1.0, passed=False)])
    parent = _parent_run(mlflow_server.client(), name)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["modelopt.outcome"] == "some_failed"
    assert parent.data.tags["modelopt.failed_targets"] == "onnx_int8_static: max_accuracy_drop: 0.08 > 0.02"
    assert parent.data.metrics["modelopt.candidates_failed"] == 1.0
    assert parent.data.metrics["modelopt.candidates_passed"] == 1.0


def _parent_run(client, name):
    runs = client.search_runs([client.get_experiment_by_name("tests-promote").experiment_id],
                              filter_string=f"tags.`modelopt.role` = 'dag_run' and tags.`airflow.run_id` = 'manual__{name}'")
    assert len(runs) == 1
    return runs[0]


def test_summary_on_parent_run(mlflow_server, uris):
    result = _promote(mlflow_server, "digits-promote-e", [_candidate("onnx_fp32", uris["onnx"], latency=1.5)])
    parent = result["parent_run_id"]
    names = {a.path for a in mlflow_server.client().list_artifacts(parent, "summary")}
    assert {"summary/candidates.md", "summary/candidates.html", "summary/candidates.json"} <= names
    assert result["artifacts"]["comparison_plot"].endswith(".png")


def test_bad_registered_model_name_is_refused(mlflow_server, uris):
    run = run_step("promote", {"registered_model_name": "no spaces allowed", "candidates": [
        _candidate("onnx_fp32", uris["onnx"], latency=1.0)]}, mlflow_server.env())
    assert run.returncode == 2
    assert "registered_model_name: must be 1-200 characters" in run.output


def _run_with_model_folder(client):
    """A finished run holding one plain artifact folder ``model`` (a promotable candidate)."""
    import tempfile

    exp = client.get_experiment_by_name("tests-promote")
    run = client.create_run(exp.experiment_id if exp else client.create_experiment("tests-promote"))
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "model.bin").write_bytes(b"\0" * 64)
        client.log_artifacts(run.info.run_id, tmp, "model")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def test_missing_candidate_fails_before_anything_is_registered(mlflow_server):
    """One candidate's run does not exist, another's run lacks the artifact: the step exits 2 (not
    retried) naming both targets and what is missing, and registers nothing, not even the good one."""
    client = mlflow_server.client()
    good = _run_with_model_folder(client)
    ghost = "0123456789abcdef0123456789abcdef"
    name = f"digits-promote-missing-{good[:8]}"
    spec = {"registered_model_name": name, "candidates": [
        _candidate("onnx_fp32", f"runs:/{good}/model", latency=1.0),
        _candidate("tflite_int8", f"runs:/{ghost}/model", latency=2.0),
        _candidate("torch_fp32", f"runs:/{good}/no_such_folder", latency=3.0),
    ], "context": {"experiment_name": "tests-promote", "dag_id": "promote_test", "run_id": f"manual__{name}"}}
    run = run_step("promote", spec, mlflow_server.env())
    assert run.returncode == 2, run.output[-3000:]
    assert f"candidate 'tflite_int8': its MLflow run {ghost} does not exist" in run.output
    assert f"candidate 'torch_fp32': its MLflow run {good} has no artifact 'no_such_folder'" in run.output
    assert "'onnx_fp32'" not in run.output.split("modelopt: error:")[-1], "the good candidate is not blamed"
    assert client.search_model_versions(f"name = '{name}'") == []
    parent = _parent_run(client, name)
    assert parent.info.status == "FAILED" and parent.data.tags["modelopt.outcome"] == "error"
