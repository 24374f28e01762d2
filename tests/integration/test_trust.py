"""Untrusted models run no code (issue 10, finding 1): a crafted .pt2 whose weight entry is a pickle
that runs a shell command, and an MLflow pytorch model saved with pickle, are refused by the steps
that load them (exit 2, naming the file and the opt-in) before any of their code runs; the
explicit opt-in (`trust_model_code`) loads them as before."""

from __future__ import annotations

import os
import pickle
import sys
import zipfile
from pathlib import Path

import numpy as np

from tests.conftest import run_step

pytest_plugins = ("tests.integration._models",)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _crafted_pt2(tmp_path: Path, marker: Path) -> Path:
    """A real ExportedProgram whose first weight is switched to a pickled payload, as an attacker would."""
    import torch

    class Small(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(64, 10)

        def forward(self, x):
            return self.fc(x.flatten(1))

    good = tmp_path / "good.pt2"
    torch.export.save(torch.export.export(Small(), (torch.randn(2, 1, 8, 8),)), good)
    crafted = tmp_path / "crafted.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(crafted, "w") as out:
        for name in src.namelist():
            data = src.read(name)
            if name.endswith("data/weights/weight_0"):
                data = pickle.dumps(_Payload(marker))
            if name.endswith("data/weights/model_weights_config.json"):
                data = data.replace(b'"use_pickle": false', b'"use_pickle": true', 1)
            out.writestr(name, data)
    return crafted


def _validate_spec(reference: Path, candidates, **context):
    return {"reference_uri": str(reference), "candidate_uri": str(candidates.path("onnx_fp32")),
            "data_uri": str(candidates.eval_npz),
            "context": {"experiment_name": "tests-trust", "force": True, **context}}


def test_a_crafted_pt2_is_refused_before_its_code_runs_and_runs_only_with_the_opt_in(candidates, mlflow_server, tmp_path):
    marker = tmp_path / "payload-ran"
    crafted = _crafted_pt2(tmp_path, marker)

    run = run_step("validate", _validate_spec(crafted, candidates), mlflow_server.env())
    assert run.returncode == 2, run.output[-3000:]
    error = run.error
    assert f"reference_uri: {crafted} holds a pickled object that is not a plain tensor" in error
    assert "trust_model_code" in error
    assert not marker.exists(), "the payload ran although the step refused the file"

    run = run_step("torch_to_onnx", {"model_uri": str(crafted), "input_shapes": {"x": [1, 1, 8, 8]},
                                     "context": {"experiment_name": "tests-trust", "force": True}}, mlflow_server.env())
    assert run.returncode == 2, run.output[-3000:]
    assert "trust_model_code" in run.output and not marker.exists()

    run_step("validate", _validate_spec(crafted, candidates, trust_model_code=True), mlflow_server.env())
    assert marker.exists(), "with trust_model_code the archive is loaded as torch.export.load does"


def test_an_mlflow_pytorch_model_saved_with_pickle_needs_the_opt_in(candidates, mlflow_server, tmp_path):
    import mlflow.pytorch
    import torch

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    folder = tmp_path / "pickled_model"
    mlflow.pytorch.save_model(model, str(folder), serialization_format="pickle")
    run = run_step("validate", _validate_spec(folder, candidates), mlflow_server.env())
    assert run.returncode == 2, run.output[-3000:]
    assert "is an MLflow pytorch model saved with pickle; loading it would run code from the file" in run.output
    trusted = run_step("validate", {**_validate_spec(folder, candidates, trust_model_code=True),
                                    "max_accuracy_drop": None, "min_top1_agreement": 0.0}, mlflow_server.env())
    assert "saved with pickle" not in trusted.output  # loaded: the verdict is about the models now


def test_the_example_model_still_loads_without_the_opt_in(candidates, step_env):
    from airflow_modelopt.container.runtimes import load

    runtime = load(candidates.path("pt2"), field="reference_uri")
    with np.load(candidates.eval_npz) as npz:
        out = runtime.run({"x": npz["x"][:4]})
    assert out[0].shape == (4, 10)
    assert sys.modules.get("torch") is not None
