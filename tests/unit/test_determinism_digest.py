"""Input digests (and so cache keys) follow a model's content, not what MLflow stamps on each save."""

from __future__ import annotations

from pathlib import Path

import yaml

from airflow_modelopt.container.tracking import digest


def _mlflow_folder(root: Path, weights: bytes, stamp: str, requirements: str = "onnx==1.23.2\n") -> Path:
    root.mkdir()
    (root / "model.onnx").write_bytes(b"graph")
    (root / "model.onnx.data").write_bytes(weights)
    (root / "requirements.txt").write_text(requirements)
    (root / "MLmodel").write_text(yaml.safe_dump({
        "flavors": {"onnx": {"data": "model.onnx", "onnx_version": "1.23.2"}},
        "utc_time_created": f"2026-01-0{stamp} 10:00:00", "model_uuid": stamp * 32, "model_id": f"m-{stamp}",
        "run_id": stamp * 32, "artifact_path": f"mlflow-artifacts:/{stamp}", "model_size_bytes": 9,
    }))
    return root


def test_same_model_saved_twice_has_one_digest(tmp_path):
    a = _mlflow_folder(tmp_path / "a", b"weights", "1")
    b = _mlflow_folder(tmp_path / "b", b"weights", "2", requirements="onnx\nonnxruntime\n")
    assert (a / "MLmodel").read_bytes() != (b / "MLmodel").read_bytes()
    assert digest(a) == digest(b)


def test_different_weights_or_flavor_change_the_digest(tmp_path):
    a = _mlflow_folder(tmp_path / "a", b"weights", "1")
    assert digest(a) != digest(_mlflow_folder(tmp_path / "b", b"weightz", "1"))
    c = _mlflow_folder(tmp_path / "c", b"weights", "1")
    mlmodel = yaml.safe_load((c / "MLmodel").read_text())
    mlmodel["flavors"]["onnx"]["data"] = "other.onnx"
    (c / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    assert digest(a) != digest(c)


def test_requirements_count_outside_an_mlflow_folder(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "requirements.txt").write_text("a\n")
    before = digest(plain)
    (plain / "requirements.txt").write_text("b\n")
    assert digest(plain) != before
