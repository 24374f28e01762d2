"""The tensorflow image (`make images`) in docker mode: each TFLite conversion path and Keras pruning.

- modelopt_optimize with the tflite targets: ONNX -> TFLite with onnx2tf (fp16 and full int8),
  validated against the PyTorch model and benchmarked in the same image, then promoted.
- tests/container/dags/tensorflow_image.py: TFMOT pruning of a Keras model, TFLiteConverter on the
  pruned Keras model, and litert-torch from a PyTorch .pt2 (full int8).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from tests.container.conftest import IMAGES, optimize_in_docker
from tests.integration.test_dag_local import step_runs_of_latest_dag_run
from tests.integration.test_prune import KERAS_TRAINER

TF_IMAGE = IMAGES["tensorflow"]


def test_optimize_dag_builds_tflite_targets_in_the_tensorflow_image(docker_home, mlflow_server, images,
                                                                      example_model):
    steps = optimize_in_docker(docker_home, mlflow_server, example_model, ["tflite_fp16", "tflite_int8"],
                               "digits-tflite-docker")
    client = mlflow_server.client()
    for target in ("tflite_fp16", "tflite_int8"):
        for task in (target, f"validate_{target}", f"benchmark_{target}"):
            tags = steps[f"optimize.{task}"].data.tags
            assert tags["modelopt.image"] == TF_IMAGE, task
            assert tags["modelopt.image_digest"] == images["tensorflow"], task
        # The tensorflow image has litert-torch: the PyTorch model converts first, NCHW with a fixed
        # batch of 1, so the benchmark measures batch 1 and names the batch it could not run.
        build = steps[f"optimize.{target}"]
        assert build.data.tags["modelopt.tflite.path"] == "litert_torch"
        assert build.data.tags["modelopt.tflite.converter"].startswith("litert-torch ")
        assert steps[f"optimize.benchmark_{target}"].data.tags["modelopt.benchmark.skipped_batch_sizes"] == "8"
        version = client.get_model_version_by_alias("digits-tflite-docker", target)
        assert version.tags["modelopt.target"] == target
    int8 = steps["optimize.tflite_int8"].data.metrics
    fp16 = steps["optimize.tflite_fp16"].data.metrics
    # Full int8 stores a byte per weight, fp16 two: on the small digits CNN graph overhead remains.
    assert int8["size_ratio"] < 0.4 and fp16["size_ratio"] < 0.6 and int8["size_ratio"] < fp16["size_ratio"]
    assert steps["optimize.validate_tflite_int8"].data.metrics["top1_agreement"] >= 0.95


@pytest.fixture(scope="module")
def keras_inputs(tmp_path_factory, mlflow_server) -> dict[str, str]:
    """A small tf_keras digits CNN and its NHWC splits, logged to the tracking server (containers
    read them over HTTP)."""
    out = tmp_path_factory.mktemp("keras-digits")
    proc = subprocess.run([sys.executable, "-c", KERAS_TRAINER, str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("tests-keras-inputs")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("tests-keras-inputs")
    run_id = client.create_run(experiment_id).info.run_id
    for name in ("model.keras", "train.npz", "eval.npz"):
        client.log_artifact(run_id, str(out / name), "inputs")
    client.set_terminated(run_id)
    return {name: f"runs:/{run_id}/inputs/{name}" for name in ("model.keras", "train.npz", "eval.npz")}


def test_keras_pruning_and_both_other_tflite_paths_run_in_the_tensorflow_image(test_dags_home, mlflow_server, images,
                                                                                keras_inputs, example_model):
    conf = {"keras_model_uri": keras_inputs["model.keras"], "keras_train_uri": keras_inputs["train.npz"],
            "keras_eval_uri": keras_inputs["eval.npz"], "pt2_uri": example_model["artifacts"]["model_pt2"],
            "calibration_uri": example_model["artifacts"]["calibration_data"]}
    proc = test_dags_home.run("dags", "test", "modelopt_test_tensorflow_image", "-c", json.dumps(conf))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "DagRun failed" not in out, out[-4000:]
    _, steps = step_runs_of_latest_dag_run(mlflow_server.client(), "modelopt_test_tensorflow_image")
    assert set(steps) == {"prune_keras", "tflite_from_keras", "tflite_from_pt2"}
    for task, run in steps.items():
        assert run.data.tags["modelopt.image"] == TF_IMAGE, task
        assert run.data.tags["modelopt.image_digest"] == images["tensorflow"], task
        assert run.data.tags["modelopt.status"] == "succeeded", task

    prune = steps["prune_keras"].data.metrics
    assert prune["sparsity"] >= 0.45  # reached, not requested
    assert prune["gzip_bytes_after"] < prune["gzip_bytes_before"]
    assert prune["accuracy_drop"] <= 0.02

    keras_tflite = steps["tflite_from_keras"].data
    assert keras_tflite.tags["modelopt.tflite.path"] == "tflite_converter"
    assert keras_tflite.metrics["top1_agreement"] >= 0.95

    pt2_tflite = steps["tflite_from_pt2"].data
    assert pt2_tflite.tags["modelopt.tflite.path"] == "litert_torch"
    assert pt2_tflite.metrics["size_ratio"] < 0.4
    assert pt2_tflite.metrics["top1_agreement"] >= 0.95

