"""onnx_quantize on the example digits CNN's ONNX export, against a real MLflow server over HTTP
in local mode (the entry point as a subprocess): dynamic, static with each calibration method,
search, node exclusion, and bad calibration data refused before anything is logged."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import MlflowServer, run_step


def _download(uri: str, server: MlflowServer, dest: Path) -> Path:
    import mlflow

    mlflow.set_tracking_uri(server.uri)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))


def _spec(example_model: dict[str, Any], example_onnx: dict[str, Any], experiment: str, **fields: Any) -> dict[str, Any]:
    return {"model_uri": example_onnx["artifacts"]["onnx_model"],
            "calibration_data_uri": example_model["artifacts"]["calibration_data"],
            "eval_data_uri": example_model["artifacts"]["eval_data"],
            "context": {"experiment_name": experiment}, **fields}


def _outputs(model_dir: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _graph(model_dir: Path) -> Any:
    import onnx

    return onnx.load(str(model_dir / "model.onnx"), load_external_data=False)


@pytest.fixture(scope="module")
def fp32(mlflow_server, example_model, example_onnx, tmp_path_factory) -> dict[str, Any]:
    """The fp32 ONNX model's folder, its outputs on the eval split, and the eval split."""
    tmp = tmp_path_factory.mktemp("onnx-quantize-fp32")
    folder = _download(example_onnx["artifacts"]["onnx_model"], mlflow_server, tmp / "model")
    data = np.load(_download(example_model["artifacts"]["eval_data"], mlflow_server, tmp / "eval"))
    return {"folder": folder, "x": data["x"], "y": data["y"], "logits": _outputs(folder, data["x"])}


def test_dynamic_int8_shrinks_the_model_and_still_agrees(mlflow_server, example_model, example_onnx, fp32, tmp_path):
    run = run_step("onnx_quantize", _spec(example_model, example_onnx, "tests-onnx-quantize", mode="dynamic",
                                          calibration_data_uri=None), mlflow_server.env())
    assert run.returncode == 0, run.output[-3000:]
    m = run.result["metrics"]
    assert m["size_ratio"] == pytest.approx(m["quantized_bytes"] / m["source_bytes"])
    assert m["size_ratio"] < 0.5, m  # fp32 weights -> int8: about a quarter plus scales and graph
    assert m["quantized_nodes.ConvInteger"] == 2 and m["quantized_nodes.MatMulInteger"] == 2
    assert m["fp32_latency_ms"] > 0 and m["int8_latency_ms"] > 0
    assert run.result["info"]["chosen_config"] == "dynamic_s8_per_channel"
    assert run.result["info"]["evaluated_on"] == "eval_data_uri"

    folder = _download(run.result["artifacts"]["onnx_model"], mlflow_server, tmp_path / "q")
    assert (folder / "MLmodel").is_file()
    logits = _outputs(folder, fp32["x"])
    agreement = float(np.mean(logits.argmax(1) == fp32["logits"].argmax(1)))
    assert agreement >= 0.95
    assert m["top1_agreement"] == pytest.approx(agreement)
    on_disk = sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".onnx", ".data"))
    assert on_disk < 0.5 * sum(p.stat().st_size for p in fp32["folder"].iterdir() if p.suffix in (".onnx", ".data"))


@pytest.mark.parametrize(("method", "fields"), [
    ("MinMax", {"quant_format": "QDQ"}),
    ("Entropy", {"quant_format": "QOperator"}),
    ("Percentile", {"quant_format": "QDQ", "activation_type": "int8", "activation_symmetric": True,
                    "per_channel": False, "calibration_percentile": 99.99}),
])
def test_static_int8_with_each_calibration_method_agrees_with_fp32(
        mlflow_server, example_model, example_onnx, fp32, tmp_path, method, fields):
    run = run_step("onnx_quantize", _spec(example_model, example_onnx, "tests-onnx-quantize",
                                          calibration_method=method, **fields), mlflow_server.env())
    assert run.returncode == 0, run.output[-3000:]
    folder = _download(run.result["artifacts"]["onnx_model"], mlflow_server, tmp_path / "q")
    logits = _outputs(folder, fp32["x"])
    agreement = float(np.mean(logits.argmax(1) == fp32["logits"].argmax(1)))
    assert agreement >= 0.95, f"{method}: top-1 agreement with fp32 {agreement}"
    assert run.result["metrics"]["top1_agreement"] == pytest.approx(agreement)
    assert run.result["metrics"]["size_ratio"] < 0.5
    assert run.result["info"]["calibration"] == {"method": method, "samples": 200, "batch_size": 1}

    graph = _graph(folder)
    ops = [n.op_type for n in graph.graph.node]
    if fields["quant_format"] == "QOperator":
        assert ops.count("QLinearConv") == 2 and "Conv" not in ops
        assert run.result["metrics"]["quantized_nodes.QLinearConv"] == 2
    else:
        assert ops.count("Conv") == 2 and "QuantizeLinear" in ops and "QLinearConv" not in ops
        assert run.result["metrics"]["quantized_nodes.qdq.Conv"] == 2
    if fields.get("activation_type") == "int8":  # symmetric int8 activations: zero points 0, type int8
        import onnx

        inits = {i.name: i for i in graph.graph.initializer}
        zero_points = [inits[n.input[2]] for n in graph.graph.node if n.op_type == "QuantizeLinear"]
        assert zero_points and all(z.data_type == onnx.TensorProto.INT8 for z in zero_points)
        assert all(not onnx.numpy_helper.to_array(z).any() for z in zero_points)

    client = mlflow_server.client()
    tags = client.get_run(run.result["mlflow_run_id"]).data.tags
    assert tags["modelopt.status"] == "succeeded"
    assert tags["modelopt.onnx_quantize.config"] == run.result["info"]["chosen_config"]


def test_search_logs_every_configuration_and_keeps_the_fastest_that_passes(
        mlflow_server, example_model, example_onnx, tmp_path):
    configs = ["qdq_u8s8_per_channel", "qdq_u8u8_per_tensor", "qoperator_u8s8_per_channel", "dynamic_u8_per_tensor"]
    run = run_step("onnx_quantize", _spec(example_model, example_onnx, "tests-onnx-quantize", mode="search",
                                          search_configs=configs, timed_runs=15, warmup_runs=2,
                                          latency_statistic="min"),
                   mlflow_server.env())
    assert run.returncode == 0, run.output[-3000:]
    result = run.result
    metrics = result["metrics"]
    for name in configs:
        assert metrics[f"search.{name}.latency_ms"] > 0
        assert 0 <= metrics[f"search.{name}.top1_agreement"] <= 1
        assert f"search.{name}.accuracy_drop" in metrics  # the eval split has labels

    record = json.loads(_download(result["artifacts"]["search_results"], mlflow_server, tmp_path / "s").read_text())
    tried = {c["config"]: c for c in record["configurations"]}
    assert list(tried) == configs
    assert record["gates"] == {"max_accuracy_drop": 0.02}  # labels present: default accuracy-drop gate
    chosen = result["info"]["chosen_config"]
    assert record["chosen"] == chosen and tried[chosen]["passed"]
    assert tried[chosen]["accuracy_drop"] <= 0.02
    assert all(c["latency_ms"] == c["latency"]["min_ms"] <= c["latency"]["p50_ms"] for c in tried.values())
    fastest_passing = min((c for c in tried.values() if c["passed"]), key=lambda c: c["latency_ms"])
    assert chosen == fastest_passing["config"]
    assert metrics["int8_latency_ms"] == pytest.approx(tried[chosen]["latency_ms"])

    table = _download(result["artifacts"]["search_table"], mlflow_server, tmp_path / "t").read_text()
    assert all(f"| {name} |" in table for name in configs) and "| fp32 (source) |" in table

    run_info = mlflow_server.client().get_run(result["mlflow_run_id"])
    assert run_info.data.tags["modelopt.onnx_quantize.config"] == chosen
    # a CNN has no attention: no fused configurations were added (list(tried) == configs above)
    assert run_info.data.tags["modelopt.onnx_quantize.transformer_fusion"] == (
        "not applied: no attention in the graph (auto)")
    assert run_info.data.metrics[f"search.{chosen}.latency_ms"] == pytest.approx(tried[chosen]["latency_ms"])


def test_layerwise_search_gives_each_conv_the_weights_of_the_kernel_profiled_faster(
        mlflow_server, example_model, example_onnx, fp32, tmp_path):
    """The layerwise configuration profiles the symmetric- and asymmetric-weight models with ORT's
    per-node profiler and composes one: each QLinearConv's weight zero points match the kernel its
    record says was faster (all zero: symmetric), activations are untouched, and it still agrees."""
    import onnx

    configs = ["qoperator_u8s8_per_channel_layerwise"]
    run = run_step("onnx_quantize", _spec(example_model, example_onnx, "tests-onnx-quantize", mode="search",
                                          search_configs=configs, timed_runs=6, warmup_runs=2),
                   mlflow_server.env())
    assert run.returncode == 0, run.output[-3000:]
    assert "Per-layer kernel choice:" in run.output
    record = json.loads(_download(run.result["artifacts"]["search_results"], mlflow_server, tmp_path / "s").read_text())
    layerwise = record["configurations"][0]["layerwise"]
    assert layerwise["nodes"] == 2 == len(layerwise["per_node"])
    for entry in layerwise["per_node"]:
        assert entry["symmetric_us"] > 0 and entry["asymmetric_us"] > 0
        faster = "asymmetric" if entry["asymmetric_us"] < entry["symmetric_us"] else "symmetric"
        assert entry["chosen"] == faster, entry
    assert layerwise["asymmetric"] == sum(e["chosen"] == "asymmetric" for e in layerwise["per_node"])
    assert layerwise["composed_us"] <= min(layerwise["symmetric_us"], layerwise["asymmetric_us"]) + 1e-6

    folder = _download(run.result["artifacts"]["onnx_model"], mlflow_server, tmp_path / "q")
    graph = onnx.load(str(folder / "model.onnx"))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.graph.initializer}
    chosen = {e["node"]: e["chosen"] for e in layerwise["per_node"]}
    convs = [n for n in graph.graph.node if n.op_type == "QLinearConv"]
    assert {n.name for n in convs} == set(chosen)
    for node in convs:
        weight_zero_points = inits[node.input[5]]
        assert (not weight_zero_points.any()) == (chosen[node.name] == "symmetric"), node.name
    logits = _outputs(folder, fp32["x"])
    assert float(np.mean(logits.argmax(1) == fp32["logits"].argmax(1))) >= 0.95


def test_excluded_node_and_op_type_stay_fp32(mlflow_server, example_model, example_onnx, fp32, tmp_path):
    convs = [n.name for n in _graph(fp32["folder"]).graph.node if n.op_type == "Conv"]
    assert len(convs) == 2
    run = run_step("onnx_quantize", _spec(example_model, example_onnx, "tests-onnx-quantize",
                                          nodes_to_exclude=[convs[1]], op_types_to_exclude=["Gemm"]),
                   mlflow_server.env())
    assert run.returncode == 0, run.output[-3000:]
    graph = _graph(_download(run.result["artifacts"]["onnx_model"], mlflow_server, tmp_path / "q")).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    float_inits = {i.name for i in graph.initializer if i.data_type == 1}
    nodes = {n.name: n for n in graph.node}

    kept = nodes[convs[1]]
    assert kept.op_type == "Conv" and kept.input[1] in float_inits  # fp32 weight, not a DequantizeLinear output
    assert producer[nodes[convs[0]].input[1]] == "DequantizeLinear"  # the other Conv is quantized
    gemms = [n for n in graph.node if n.op_type == "Gemm"]
    assert len(gemms) == 2 and all(g.input[1] in float_inits for g in gemms)

    info = run.result["info"]
    assert info["excluded_nodes"][convs[1]] == "nodes_to_exclude"
    assert {n["name"] for n in info["fp32_nodes"]} == {convs[1], *(g.name for g in gemms)}
    assert run.result["metrics"]["fp32_compute_nodes"] == 3
    assert run.result["metrics"]["top1_agreement"] >= 0.95


def _bad_npz(tmp_path: Path, name: str, **arrays: np.ndarray) -> str:
    path = tmp_path / f"{name}.npz"
    np.savez(path, **arrays)
    return str(path)


BAD_INPUT = {
    "wrong_name": r"calibration_data_uri: no array for model input 'x' with shape \[N, 1, 8, 8\] \(float32\); "
                  r"the data has arrays \['image', 'y'\]",
    "wrong_shape": r"calibration_data_uri: the array for model input 'x' with shape \[N, 1, 8, 8\] \(float32\) "
                   r"has shape \[50, 1, 16, 16\]: dimension 2 is 16, the model expects 8",
    "empty": r"calibration_data_uri: the array for model input 'x' with shape \[N, 1, 8, 8\] \(float32\) holds no "
             r"samples \(shape \[0, 1, 8, 8\]\): the set is empty",
    "no_arrays": r"calibration_data_uri: .* holds no arrays; expected one array per model input 'x' with shape "
                 r"\[N, 1, 8, 8\]",
    "unknown_node": r"nodes_to_exclude: the model has no node named 'node_conv2d_9'; did you mean",
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_calibration_input_exits_2_naming_the_input_and_logs_nothing_successful(
        mlflow_server, example_model, example_onnx, tmp_path, case):
    rng = np.random.default_rng(0)
    experiment = f"tests-onnx-quantize-bad-{case}"
    fields: dict[str, Any] = {}
    if case == "wrong_name":
        fields["calibration_data_uri"] = _bad_npz(tmp_path, case, image=rng.random((50, 1, 8, 8), np.float32),
                                                  y=np.zeros(50, np.int64))
    elif case == "wrong_shape":
        fields["calibration_data_uri"] = _bad_npz(tmp_path, case, x=rng.random((50, 1, 16, 16), np.float32))
    elif case == "empty":
        fields["calibration_data_uri"] = _bad_npz(tmp_path, case, x=np.zeros((0, 1, 8, 8), np.float32))
    elif case == "no_arrays":
        fields["calibration_data_uri"] = _bad_npz(tmp_path, case)
    else:
        fields["nodes_to_exclude"] = ["node_conv2d_9"]
    run = run_step("onnx_quantize", _spec(example_model, example_onnx, experiment, mode="search", **fields),
                   mlflow_server.env())
    assert run.returncode == 2, run.output[-3000:]
    errors = [line for line in run.output.splitlines() if line.startswith("modelopt: error:")]
    assert len(errors) == 1 and re.search(BAD_INPUT[case], errors[0]), run.output[-2000:]

    client = mlflow_server.client()
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert runs and all(r.data.tags.get("modelopt.status") == "failed" for r in runs)
    assert all(r.info.status == "FAILED" for r in runs)
    assert re.search(BAD_INPUT[case], runs[0].data.tags["modelopt.error"])
    assert client.search_logged_models(experiment_ids=[exp.experiment_id]) == []


# -- transformers: the fused graph ------------------------------------------------------------


@pytest.fixture(scope="module")
def small_transformer(tmp_path_factory) -> dict[str, Any]:
    """The zoo's BERT-tiny-shaped encoder (d 32, 2 heads, 2 layers, 32 tokens), trained briefly,
    exported with the torch.onnx dynamo exporter as torch_to_onnx exports; its data splits."""
    import dataclasses

    import torch

    from airflow_modelopt.container.examples.zoo import ZOO

    entry = dataclasses.replace(ZOO["bert_tiny"], epochs=4)
    parts = entry.splits()
    model = entry.build()
    entry.train(model, parts["train"])
    tmp = tmp_path_factory.mktemp("small-transformer")
    folder = tmp / "model"
    folder.mkdir()
    torch.onnx.export(model.eval(), (torch.from_numpy(parts["calibration"]["x"][:2]),), str(folder / "model.onnx"),
                      input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=18, dynamo=True, external_data=True)
    np.savez(tmp / "calibration.npz", x=parts["calibration"]["x"][:32])
    np.savez(tmp / "eval.npz", **parts["eval"])
    return {"folder": folder, "calibration": str(tmp / "calibration.npz"), "eval": str(tmp / "eval.npz"),
            "x": parts["eval"]["x"], "logits": _outputs(folder, parts["eval"]["x"])}


def _transformer_spec(t: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model_uri": str(t["folder"]), "calibration_data_uri": t["calibration"], "eval_data_uri": t["eval"],
            "timed_runs": 6, "warmup_runs": 1, "context": {"experiment_name": "tests-onnx-quantize-transformer"},
            **fields}


def test_dynamic_int8_of_a_transformer_quantizes_the_fused_graph_and_records_what_fused(
        mlflow_server, small_transformer, tmp_path):
    run = run_step("onnx_quantize", _transformer_spec(small_transformer, mode="dynamic"), mlflow_server.env())
    assert run.returncode == 0, run.output[-3000:]
    info, metrics = run.result["info"], run.result["metrics"]
    assert info["chosen_config"] == "fused_dynamic_s8_per_channel"
    fusion = info["transformer_fusion"]
    assert fusion["applied"] and fusion["attention_blocks"] == 2 and fusion["num_heads"] == [2]
    assert fusion["new_fused_nodes"]["Attention"] == 2 and fusion["new_fused_nodes"]["BiasGelu"] == 2
    assert "SkipLayerNormalization" not in fusion["new_fused_nodes"]  # slower than Add + LayerNorm on CPU
    assert fusion["check"]["max_abs_error"] <= fusion["check"]["tolerance"]  # the fused fp32 graph = the source
    assert metrics["fused_nodes.Attention"] == 2 and metrics["transformer_fusion"] == 1.0

    folder = _download(run.result["artifacts"]["onnx_model"], mlflow_server, tmp_path / "q")
    ops = [n.op_type for n in _graph(folder).graph.node]
    assert ops.count("QAttention") == 2 and "Softmax" not in ops  # attention runs as one int8 kernel per block
    x = small_transformer["x"]  # in the step's evaluation batches: dynamic int8 ranges are per batch
    logits = np.concatenate([_outputs(folder, x[i : i + 32]) for i in range(0, len(x), 32)])
    agreement = float(np.mean(logits.argmax(1) == small_transformer["logits"].argmax(1)))
    assert agreement >= 0.95 and metrics["top1_agreement"] == pytest.approx(agreement)
    assert metrics["size_ratio"] < 0.6

    tags = mlflow_server.client().get_run(run.result["mlflow_run_id"]).data.tags
    assert tags["modelopt.onnx_quantize.transformer_fusion"].startswith("Attention 2, BiasGelu 2")
    assert tags["modelopt.onnx_quantize.transformer_fusion"].endswith("chosen model uses it")


def test_search_tries_dynamic_configurations_fused_and_not(mlflow_server, small_transformer):
    run = run_step("onnx_quantize", _transformer_spec(small_transformer, mode="search", latency_statistic="min",
                                                      search_configs=["dynamic_u8_per_tensor"]), mlflow_server.env())
    assert run.returncode == 0, run.output[-3000:]
    tried = [c["config"] for c in run.result["info"]["search"]]
    assert tried == ["dynamic_u8_per_tensor", "fused_dynamic_u8_per_tensor"]
    assert all(run.result["metrics"][f"search.{c}.top1_agreement"] >= 0.9 for c in tried)


def test_optimize_transformer_off_quantizes_the_graph_as_exported(mlflow_server, small_transformer, tmp_path):
    off = run_step("onnx_quantize", _transformer_spec(small_transformer, mode="dynamic", optimize_transformer="off"),
                   mlflow_server.env())
    assert off.returncode == 0, off.output[-3000:]
    assert off.result["info"]["chosen_config"] == "dynamic_s8_per_channel"
    assert off.result["info"]["transformer_fusion"] == {"applied": False, "reason": "optimize_transformer is 'off'",
                                                        "chosen_config_fused": False}
    ops = [n.op_type for n in _graph(_download(off.result["artifacts"]["onnx_model"], mlflow_server,
                                               tmp_path / "off")).graph.node]
    assert "Softmax" in ops and "QAttention" not in ops
