"""The torch and openvino images (`make images`) in docker mode for the guide's other targets:
PyTorch-native int8 (torch_quantize, torch image), OpenVINO int8 with NNCF and MNN fp32 (both in the
openvino image), each validated against the PyTorch model and benchmarked in the image holding its
runtime, then promoted: one `modelopt_optimize` run, as a user triggers it."""

from __future__ import annotations

from tests.container.conftest import IMAGES, optimize_in_docker

TARGET_IMAGES = {"torch_int8": "torch", "openvino_int8": "openvino", "mnn_fp32": "openvino"}


def test_optimize_dag_builds_torch_openvino_and_mnn_targets_in_their_images(docker_home, mlflow_server, images,
                                                                             example_model):
    steps = optimize_in_docker(docker_home, mlflow_server, example_model, sorted(TARGET_IMAGES),
                               "digits-edge-docker")
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
    # int8 stores a byte per weight: the IR and the quantized .pt2 are well under the fp32 source.
    assert steps["optimize.openvino_int8"].data.metrics["size_ratio"] < 0.5
    assert steps["optimize.openvino_int8"].data.metrics["fake_quantize_nodes"] > 0
    assert steps["optimize.mnn_fp32"].data.metrics["size_ratio"] > 0.5  # fp32 weights, another container format
    assert steps["optimize.torch_int8"].data.metrics["accuracy_drop"] <= 0.01
