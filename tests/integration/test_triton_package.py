"""triton_package against a real MLflow server and registry: the example ONNX export (alias
champion) and its OpenVINO IR (alias challenger) become a Triton model repository whose
config.pbtxt files parse with Triton's own schema (tritonclient's model_config_pb2) and whose
version folders hold the model files Triton loads; the tarball holds the same tree. No Triton
server runs here: what is checked is the repository layout and configuration Triton reads."""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MlflowServer, run_step

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")

EXPERIMENT = "tests-triton-package"
NAME = "triton-digits"


def _download(uri: str, server: MlflowServer, dest: Path) -> Path:
    import mlflow

    mlflow.set_tracking_uri(server.uri)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))


def _config(path: Path) -> Any:
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _register(server: MlflowServer, uri: str, alias: str) -> str:
    """Register ``uri`` as the promote step does (a runs:/ artifact folder by its resolved location)."""
    import mlflow

    mlflow.set_tracking_uri(server.uri)
    client = mlflow.MlflowClient()
    if uri.startswith("runs:/"):
        run_id, _, path = uri[len("runs:/"):].partition("/")
        if not client.search_registered_models(f"name = '{NAME}'"):
            client.create_registered_model(NAME)
        source = client.get_run(run_id).info.artifact_uri.rstrip("/") + "/" + path.strip("/")
        version = client.create_model_version(NAME, source, run_id=run_id)
    else:
        version = mlflow.register_model(uri, NAME)
    client.set_registered_model_alias(NAME, alias, version.version)
    return str(version.version)


@pytest.fixture(scope="module")
def registered(mlflow_server, example_model, example_onnx) -> dict[str, str]:
    versions = {"champion": _register(mlflow_server, example_onnx["artifacts"]["onnx_model"], "champion")}
    pytest.importorskip("openvino")
    ov = run_step("openvino_convert", {"model_uri": example_onnx["artifacts"]["onnx_model"],
                                       "context": {"experiment_name": EXPERIMENT}}, mlflow_server.env())
    assert ov.returncode == 0, ov.output[-3000:]
    versions["challenger"] = _register(mlflow_server, ov.result["artifacts"]["openvino_model"], "challenger")
    return versions


def test_repository_for_two_aliases_parses_with_tritons_schema(mlflow_server, registered, tmp_path):
    run = run_step("triton_package", {"registered_model_name": NAME, "aliases": ["champion", "challenger"],
                                      "model_name": "digits", "preferred_batch_sizes": [8],
                                      "context": {"experiment_name": EXPERIMENT}}, mlflow_server.env())
    assert run.returncode == 0, run.output[-3000:]
    repo = _download(run.result["artifacts"]["triton_repository"], mlflow_server, tmp_path / "repo")
    assert sorted(p.name for p in repo.iterdir()) == ["digits_challenger", "digits_champion"]

    onnx = _config(repo / "digits_champion" / "config.pbtxt")
    assert (onnx.name, onnx.platform, onnx.max_batch_size) == ("digits_champion", "onnxruntime_onnx", 64)
    assert [(i.name, model_config_pb2.DataType.Name(i.data_type), list(i.dims)) for i in onnx.input] == [
        ("x", "TYPE_FP32", [1, 8, 8])]
    assert [(o.data_type, list(o.dims)) for o in onnx.output] == [(model_config_pb2.TYPE_FP32, [10])]
    assert list(onnx.dynamic_batching.preferred_batch_size) == [8]
    assert onnx.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    version_dir = repo / "digits_champion" / registered["champion"]
    assert (version_dir / "model.onnx").is_file()
    import onnx as onnx_lib

    from airflow_modelopt.container.runtimes.onnx_backend import onnx_files

    graph = onnx_lib.load(str(version_dir / "model.onnx"), load_external_data=False)
    assert [i.name for i in graph.graph.input] == ["x"]
    assert all(p.is_file() for p in onnx_files(version_dir / "model.onnx"))  # external data came along

    ov = _config(repo / "digits_challenger" / "config.pbtxt")
    assert (ov.backend, ov.platform, ov.default_model_filename) == ("openvino", "", "model.xml")
    assert [o.name for o in ov.output] == [o.name for o in onnx.output]
    ov_dir = repo / "digits_challenger" / registered["challenger"]
    assert sorted(p.name for p in ov_dir.iterdir()) == ["model.bin", "model.xml"]

    tarball = _download(run.result["artifacts"]["triton_repository_tarball"], mlflow_server, tmp_path / "tar")
    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
    assert f"triton_repository/digits_champion/{registered['champion']}/model.onnx" in names
    assert "triton_repository/digits_challenger/config.pbtxt" in names
    info = {m["alias"]: m for m in run.result["info"]["models"]}
    assert info["champion"]["registry_version"] == registered["champion"] and info["challenger"]["format"] == "openvino"


def test_a_missing_alias_is_refused_naming_it(mlflow_server, registered):
    run = run_step("triton_package", {"registered_model_name": NAME, "aliases": ["nobody"],
                                      "context": {"experiment_name": EXPERIMENT}}, mlflow_server.env())
    assert run.returncode == 2, run.output[-3000:]
    assert f"aliases: registered model '{NAME}' has no version with alias 'nobody'" in run.output
