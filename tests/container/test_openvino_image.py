"""The torch and openvino images (`make images`) in docker mode for the guide's other targets:
PyTorch-native int8 (torch_quantize, torch image), knowledge distillation (distill in the torch
image, then ONNX int8 in the base image), OpenVINO int8 with NNCF and MNN fp32 (both in the openvino
image), each validated against the PyTorch model and benchmarked in the image holding its runtime,
then promoted: one `modelopt_optimize` run, as a user triggers it. Then two of the promoted
versions become a Triton model repository (triton_package, base image; no Triton server runs here:
its config files are parsed with Triton's own schema)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.container.conftest import IMAGES, optimize_in_docker
from tests.integration.test_dag_local import step_runs_of_latest_dag_run

TARGET_IMAGES = {"torch_int8": "torch", "openvino_int8": "openvino", "mnn_fp32": "openvino"}


@pytest.fixture(scope="module")
def edge_steps(docker_home, mlflow_server, images, example_model) -> dict[str, object]:
    return optimize_in_docker(docker_home, mlflow_server, example_model,
                              [*sorted(TARGET_IMAGES), "distilled_onnx_int8"], "digits-edge-docker")


def test_optimize_dag_builds_torch_openvino_and_mnn_targets_in_their_images(edge_steps, mlflow_server, images):
    steps = edge_steps
    client = mlflow_server.client()
    for target, family in TARGET_IMAGES.items():
        for task in (target, f"validate_{target}", f"benchmark_{target}"):
            tags = steps[f"optimize.{task}"].data.tags
            assert tags["modelopt.image"] == IMAGES[family], task
            assert tags["modelopt.image_digest"] == images[family], task
        validate = steps[f"optimize.validate_{target}"]
        assert validate.data.tags["modelopt.verdict"] == "passed", target
        assert validate.data.metrics["top1_agreement"] >= 0.95, target
        assert steps[f"optimize.benchmark_{target}"].data.metrics["latency_ms_p50"] > 0, target
        version = client.get_model_version_by_alias("digits-edge-docker", target)
        assert version.tags["modelopt.target"] == target
    # distill trains the narrowed student in the torch image; its ONNX int8 is quantized in base.
    for task, family in (("distill", "torch"), ("export_distilled_onnx", "torch"), ("distilled_onnx_int8", "base")):
        assert steps[f"optimize.{task}"].data.tags["modelopt.image"] == IMAGES[family], task
    assert steps["optimize.validate_distilled_onnx_int8"].data.tags["modelopt.verdict"] == "passed"
    assert client.get_model_version_by_alias("digits-edge-docker", "distilled_onnx_int8").tags["modelopt.target"] \
        == "distilled_onnx_int8"
    # int8 stores a byte per weight: the IR and the quantized .pt2 are well under the fp32 source.
    assert steps["optimize.openvino_int8"].data.metrics["size_ratio"] < 0.5
    assert steps["optimize.openvino_int8"].data.metrics["fake_quantize_nodes"] > 0
    assert steps["optimize.mnn_fp32"].data.metrics["size_ratio"] > 0.5  # fp32 weights, another container format
    assert steps["optimize.torch_int8"].data.metrics["accuracy_drop"] <= 0.01


def test_promoted_versions_become_a_triton_repository_in_the_base_image(edge_steps, test_dags_home, mlflow_server,
                                                                         images, tmp_path):
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format

    proc = test_dags_home.run("dags", "test", "modelopt_test_triton_package")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    run = step_runs_of_latest_dag_run(mlflow_server.client(), "modelopt_test_triton_package")[1]["triton_package"]
    assert run.data.tags["modelopt.image"] == IMAGES["base"]
    repo = tmp_path / "repo"
    repo.mkdir()
    local = mlflow_server.client().download_artifacts(run.info.run_id, "triton_repository", str(repo))
    configs = {d.name: text_format.Parse((d / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
               for d in sorted(Path(local).iterdir())}
    assert sorted(configs) == ["digits_distilled_onnx_int8", "digits_openvino_int8"]
    assert configs["digits_distilled_onnx_int8"].platform == "onnxruntime_onnx"
    assert configs["digits_openvino_int8"].backend == "openvino"
    for config in configs.values():
        assert [(i.name, list(i.dims)) for i in config.input] == [("x", [1, 8, 8])]
