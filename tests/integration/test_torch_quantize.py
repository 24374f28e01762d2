"""The torch_quantize step on real models (local mode, real MLflow server): PT2E static int8 of the
example digits CNN within one point of fp32, a .pt2 that a fresh process loads through the runtimes
layer without the model-code opt-in, its ONNX QDQ twin; dynamic int8 whose ONNX export is recorded as
unsupported; bad input refused with exit codes 2 and 5."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from tests.conftest import MlflowServer, run_step

EXPERIMENT = {"experiment_name": "tests-torch-quantize"}


def download(uri: str, tracking_uri: str, dest: Path) -> Path:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))


def quantize(server: MlflowServer, **spec: Any):
    return run_step("torch_quantize", {**spec, "context": EXPERIMENT}, server.env())


def test_static_int8_of_the_example_cnn_stays_within_one_point_and_loads_without_trust(
        mlflow_server, example_model, tmp_path):
    art = example_model["artifacts"]
    run = quantize(mlflow_server, model_uri=art["model_pt2"], calibration_data_uri=art["calibration_data"],
                   eval_data_uri=art["eval_data"])
    assert run.returncode == 0, run.output[-3000:]
    m, info = run.result["metrics"], run.result["info"]
    assert m["fp32_accuracy"] > 0.9
    assert m["accuracy_drop"] <= 0.01, m          # within one point of fp32 on the eval split
    assert m["top1_agreement"] >= 0.98, m
    assert m["quantized_layers"] == 4             # two convolutions, two linear layers
    assert m["int8_bytes"] < m["fp32_bytes"]
    assert info["mode"] == "static" and info["onnx_export"]["exported"] is True
    assert info["onnx_export"]["op_histogram"]["QuantizeLinear"] >= 4
    assert m["onnx_vs_pt2_top1_agreement"] >= 0.98

    # The archive holds int8 weights, not fp32 ones beside them.
    pt2 = download(run.result["artifacts"]["model_pt2_file"], mlflow_server.uri, tmp_path / "int8")
    eval_npz = download(art["eval_data"], mlflow_server.uri, tmp_path / "data")
    # A fresh process without torchao, as validate/benchmark load a pt2 candidate: weights-only, no opt-in.
    probe = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        from airflow_modelopt.container import trust
        from airflow_modelopt.container.runtimes import load
        assert not trust.model_code_allowed()
        with load({str(pt2)!r}) as rt:
            data = np.load({str(eval_npz)!r})
            out = rt.run({{"x": data["x"]}})[0]
            state = __import__("torch").export.load({str(pt2)!r}).state_dict
        print(json.dumps({{"accuracy": float((out.argmax(1) == data["y"]).mean()), "torchao": "torchao" in sys.modules,
                          "dtypes": sorted({{str(t.dtype) for t in state.values()}}),
                          "float_weights": [k for k, t in state.items() if t.dim() >= 2 and t.is_floating_point()]}}))
    """)
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    probed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert probed["torchao"] is False
    assert "torch.int8" in probed["dtypes"] and probed["float_weights"] == []
    assert abs(probed["accuracy"] - m["accuracy"]) < 1e-9

    # The ONNX QDQ twin runs in ONNX Runtime with int8 weights.
    import onnx

    onnx_dir = download(run.result["artifacts"]["onnx_model"], mlflow_server.uri, tmp_path / "onnx")
    model = onnx.load(str(onnx_dir / "model.onnx"))
    int8_inits = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2]
    assert len(int8_inits) == 4


def test_dynamic_int8_records_that_onnx_cannot_express_it(mlflow_server, example_model):
    art = example_model["artifacts"]
    run = quantize(mlflow_server, model_uri=art["model_pt2"], mode="dynamic", eval_data_uri=art["eval_data"])
    assert run.returncode == 0, run.output[-3000:]
    m, info = run.result["metrics"], run.result["info"]
    assert m["top1_agreement"] >= 0.97 and m["quantized_layers"] == 4
    assert info["onnx_export"]["exported"] is False
    assert "choose_qparams" in info["onnx_export"]["reason"]
    assert m["onnx_exported"] == 0.0 and "onnx_model" not in run.result["artifacts"]


def test_bad_input_is_refused_with_one_clear_error(mlflow_server, example_model, tmp_path):
    import torch

    # Calibration samples of the wrong shape: bad input, exit 2, naming the field.
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((8, 3, 8, 8), np.float32))
    art = example_model["artifacts"]
    run = quantize(mlflow_server, model_uri=art["model_pt2"], calibration_data_uri=str(bad),
                   eval_data_uri=art["eval_data"], export_onnx=False)
    assert run.returncode == 2, run.output[-3000:]
    assert "calibration_data_uri: samples of shape {'x': [8, 3, 8, 8]} do not fit the model" in run.output

    # A program without a Conv/Linear layer: nothing becomes int8, the quantizer "failed" (exit 5).
    class Scale(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x.flatten(1) * 2.0)

    program = torch.export.export(Scale(), (torch.zeros(2, 1, 8, 8),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    pt2 = tmp_path / "scale.pt2"
    torch.export.save(program, str(pt2))
    run = quantize(mlflow_server, model_uri=str(pt2), mode="weight_only", eval_data_uri=art["eval_data"],
                   export_onnx=False)
    assert run.returncode == 5, run.output[-3000:]
    assert "found no Conv/Linear layer to quantize" in run.output


def test_static_int8_of_a_residual_cnn_whose_blocks_call_one_relu_twice(mlflow_server, tmp_path):
    """ResNet's BasicBlock applies one ``self.relu`` twice; X86InductorQuantizer refused such a model
    ("Input partition has more than one output node"). Each call is now quantized as its own pattern:
    every convolution and the classifier become int8 within one point of fp32."""
    from tests.integration._models import train_residual_digits

    model, x, y, split = train_residual_digits((8, 16, 32), epochs=4)
    from _bench_common import export_pt2, save_npz  # scripts/ is on sys.path now
    ev, cal = split["eval"], split["calibration"]
    pt2 = export_pt2(model, x[ev], tmp_path / "resnet" / "model.pt2")
    run = quantize(mlflow_server, model_uri=str(pt2), calibration_data_uri=str(save_npz(tmp_path / "cal.npz", x[cal])),
                   eval_data_uri=str(save_npz(tmp_path / "eval.npz", x[ev], y[ev])), export_onnx=False)
    assert run.returncode == 0, run.output[-3000:]
    m = run.result["metrics"]
    assert m["fp32_accuracy"] > 0.9, m
    assert m["quantized_layers"] == 11, m          # 3x3 stem, 3 blocks of 2 convs + 1x1 projection, linear
    assert m["accuracy_drop"] <= 0.01, m
    assert "each call is quantized as its own pattern" in run.output
