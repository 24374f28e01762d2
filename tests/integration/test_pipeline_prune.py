"""`modelopt_optimize` from the trigger form's params, local mode, real MLflow server: the
``pruned_onnx_int8`` target with calibration data that has no labels (inputs only) and labelled
evaluation data. The prune task fine-tunes by distillation from the unpruned model, the pruned int8
ONNX model passes validation within ``max_accuracy_drop`` and is registered; on a worker without a
GPU the up-front check fails the ``tensorrt_fp16`` branch at once, naming why, and nothing of it
is built.

Two trained models: the example digits CNN, and a small residual CNN (BasicBlocks with projection
shortcuts, BatchNorm) on 3x32x32 digit images.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from airflow_modelopt.pipelines import gpu_visible
from tests.integration.test_dag_local import step_runs_of_latest_dag_run

DAG_ID = "modelopt_optimize"
REPO = Path(__file__).resolve().parents[2]
MAX_DROP = 0.02


def download(uri: str, dest: Path) -> Path:
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))


def without_labels(npz: Path, dest: Path) -> Path:
    with np.load(npz) as data:
        np.savez(dest, x=data["x"])
    return dest


def digits_cnn(mlflow_server, example_model, tmp_path: Path) -> dict[str, str]:
    art = example_model["artifacts"]
    calibration = without_labels(download(art["calibration_data"], tmp_path / "cal"), tmp_path / "calibration_x.npz")
    return {"model_uri": art["model_pt2"], "calibration_data_uri": str(calibration), "eval_data_uri": art["eval_data"]}


def residual_cnn(mlflow_server, example_model, tmp_path: Path) -> dict[str, str]:
    """A small ResNet (scripts/_bench_common.py) trained on 3x32x32 digits; .pt2 and .npz files."""
    import torch

    from tests.integration._models import train_residual_digits

    model, x, y, split = train_residual_digits((16, 32, 64), epochs=6)
    from _bench_common import export_pt2, save_npz  # scripts/ is on sys.path now
    ev, cal = split["eval"], split["calibration"]
    with torch.no_grad():
        acc = float((model(torch.from_numpy(x[ev])).argmax(1).numpy() == y[ev]).mean())
    assert acc > 0.9, f"the residual CNN trained to only {acc:.3f}"
    return {"model_uri": str(export_pt2(model, x[ev], tmp_path / "resnet" / "model.pt2")),
            "calibration_data_uri": str(save_npz(tmp_path / "calibration_x.npz", x[cal])),
            "eval_data_uri": str(save_npz(tmp_path / "eval.npz", x[ev], y[ev]))}


MODELS = {"digits_cnn": digits_cnn, "residual_cnn": residual_cnn}


@pytest.fixture(scope="module", params=list(MODELS))
def pruned_dag_run(request, airflow_home, mlflow_server, example_model, tmp_path_factory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp(request.param)
    import mlflow

    mlflow.set_tracking_uri(mlflow_server.uri)
    inputs = MODELS[request.param](mlflow_server, example_model, tmp)
    refused = [] if gpu_visible() else ["tensorrt_fp16"]
    name = f"pruned-{request.param.replace('_', '-')}"
    conf = {**inputs, "targets": ["pruned_onnx_int8", *refused], "registered_model_name": name,
            "max_accuracy_drop": MAX_DROP, "min_top1_agreement": 0.9, "execution_mode": "local"}
    proc = airflow_home.run("dags", "test", DAG_ID, "-c", json.dumps(conf))
    _, steps = step_runs_of_latest_dag_run(mlflow_server.client(), DAG_ID)
    return {"model": request.param, "proc": proc, "steps": steps, "name": name, "refused": refused}


def test_pruned_int8_target_registers_from_unlabelled_calibration_data(pruned_dag_run, mlflow_server):
    steps, output = pruned_dag_run["steps"], pruned_dag_run["proc"].stdout + pruned_dag_run["proc"].stderr
    assert "optimize.prune" in steps, output[-4000:]
    prune = steps["optimize.prune"]
    assert prune.data.tags.get("modelopt.status") == "succeeded", output[-4000:]
    assert prune.data.tags["modelopt.prune.fine_tune_signal"] == "distillation"
    assert prune.data.metrics["params_after"] < 0.6 * prune.data.metrics["params_before"]
    validate = steps["optimize.validate_pruned_onnx_int8"]
    drop = validate.data.metrics["accuracy_drop"]
    print(f"{pruned_dag_run['model']}: prune accuracy {prune.data.metrics['accuracy_before']:.4f} -> "
          f"{prune.data.metrics['accuracy_after']:.4f}; pruned_onnx_int8 accuracy drop {drop:+.4f} "
          f"(params {prune.data.metrics['params_before']:.0f} -> {prune.data.metrics['params_after']:.0f}; "
          f"fine-tune {prune.data.metrics['fine_tune_time_s']:.1f} s)")
    assert validate.data.tags["modelopt.verdict"] == "passed", validate.data.metrics
    assert drop <= MAX_DROP
    version = mlflow_server.client().get_model_version_by_alias(pruned_dag_run["name"], "pruned_onnx_int8")
    assert version.tags["modelopt.target"] == "pruned_onnx_int8"


def test_tensorrt_without_a_gpu_is_refused_up_front(pruned_dag_run):
    if not pruned_dag_run["refused"]:
        pytest.skip("this worker has a GPU: the tensorrt target is not refused")
    output = pruned_dag_run["proc"].stdout + pruned_dag_run["proc"].stderr
    assert "target 'tensorrt_fp16' cannot be built" in output and "needs an NVIDIA GPU" in output, output[-4000:]
    assert not {"optimize.tensorrt_fp16", "optimize.validate_tensorrt_fp16"} & set(pruned_dag_run["steps"])
