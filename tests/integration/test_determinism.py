"""Rebuilding from the same inputs with the same code gives the same bytes and the same keys:
torch_to_onnx forced twice writes byte-identical model files (a fixed external-data file name,
not a random UUID), and the step downstream of the second export is a cache hit, since input
digests ignore the MLmodel fields MLflow changes on every save."""

from __future__ import annotations

from pathlib import Path

import yaml

from airflow_modelopt.container.tracking import MLMODEL_ENV_FILES, MLMODEL_VOLATILE_FIELDS, digest
from tests.conftest import MlflowServer, run_step

EXPERIMENT = "tests-determinism"


def _download(uri: str, server: MlflowServer, dest: Path) -> Path:
    import mlflow

    mlflow.set_tracking_uri(server.uri)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_forced_rebuild_is_byte_identical_and_downstream_hits_the_cache(mlflow_server, example_model, tmp_path):
    export = {"model_uri": example_model["artifacts"]["model_pt2"], "input_shapes": {"x": [2, 1, 8, 8]},
              "context": {"experiment_name": EXPERIMENT, "force": True}}
    builds = [run_step("torch_to_onnx", export, mlflow_server.env()) for _ in range(2)]
    for build in builds:
        assert build.returncode == 0, build.output[-3000:]
    first, second = (b.result for b in builds)
    assert first["mlflow_run_id"] != second["mlflow_run_id"] and not second["cache_hit"]

    folders = [_download(r["artifacts"]["onnx_model"], mlflow_server, tmp_path / str(i))
               for i, r in enumerate((first, second))]
    files = [_files(f) for f in folders]
    assert sorted(files[0]) == sorted(files[1]), "the model folders hold differently named files"
    assert "model.onnx.data" in files[0], sorted(files[0])
    for name in files[0]:
        if name != "MLmodel" and name not in MLMODEL_ENV_FILES:
            assert files[0][name] == files[1][name], f"{name} differs between two builds of the same inputs"
    mlmodels = [yaml.safe_load(f["MLmodel"]) for f in files]
    assert mlmodels[0] != mlmodels[1], "MLflow stamps each save; the digest must not depend on that"
    for m in mlmodels:
        for key in MLMODEL_VOLATILE_FIELDS:
            m.pop(key, None)
    assert mlmodels[0] == mlmodels[1]
    assert digest(folders[0]) == digest(folders[1])

    def quantize(model_uri: str) -> dict:
        spec = {"model_uri": model_uri, "mode": "dynamic", "context": {"experiment_name": EXPERIMENT}}
        run = run_step("onnx_quantize", spec, mlflow_server.env())
        assert run.returncode == 0, run.output[-3000:]
        return run.result

    downstream = [quantize(r["artifacts"]["onnx_model"]) for r in (first, second)]
    assert downstream[1]["cache_hit"], "the step after a rebuilt export missed the cache"
    assert downstream[1]["cache_key"] == downstream[0]["cache_key"]
