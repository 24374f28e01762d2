"""The space-to-depth rewrite of a strided int8 convolution on few channels (a CNN's stem) gives
the same output bit for bit, for the strides, kernels, paddings and weight zero points it accepts,
and leaves alone the convolutions it does not apply to. Real ONNX Runtime quantization and
sessions, on small hand-built convolutions."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from airflow_modelopt.container.steps.onnx_quantize import space_to_depth  # noqa: E402


def _quantized_conv(tmp: Path, *, channels: int, height: int, width: int, kernel: int, stride: int, pad: int,
                    symmetric: bool, group: int = 1, dilation: int = 1) -> tuple[Path, np.ndarray]:
    """A fp32 Conv + Relu quantized with ORT (QOperator, u8 activations, s8 per-channel weights);
    (model path, an input to run it on)."""
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    rng = np.random.default_rng(channels * 100 + kernel * 10 + stride)
    weight = rng.normal(0, 0.3, (16, channels // group, kernel, kernel)).astype(np.float32)
    bias = rng.normal(0, 0.1, 16).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[kernel, kernel], strides=[stride, stride],
                              pads=[pad] * 4, group=group, dilations=[dilation, dilation]),
             helper.make_node("Relu", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                            [1, channels, height, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    fp32, int8 = tmp / "fp32.onnx", tmp / "int8.onnx"
    onnx.save(model, str(fp32))
    samples = [rng.random((1, channels, height, width), np.float32) for _ in range(4)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.left = list(samples)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return {"x": self.left.pop()} if self.left else None

    quantize_static(str(fp32), str(int8), Reader(), quant_format=QuantFormat.QOperator,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                    extra_options={"WeightSymmetric": symmetric})
    return int8, rng.random((1, channels, height, width), np.float32) * 1.2 - 0.1


def _run(model: object, x: np.ndarray) -> np.ndarray:
    data = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize(("channels", "height", "width", "kernel", "stride", "pad", "symmetric"), [
    (3, 32, 32, 7, 2, 3, True),    # a ResNet stem
    (3, 32, 32, 7, 2, 3, False),   # ... with asymmetric weights: the padded taps hold each channel's zero point
    (1, 15, 15, 3, 2, 1, True),    # gray input, odd size
    (4, 17, 20, 5, 2, 2, False),   # non-square, four channels
    (3, 32, 32, 4, 4, 0, True),    # a ViT-style patchify: stride = kernel, no padding
    (2, 19, 19, 3, 3, 1, True),    # stride 3
])
def test_the_rewritten_convolution_gives_the_same_output_bit_for_bit(tmp_path, channels, height, width, kernel,
                                                                        stride, pad, symmetric):
    path, x = _quantized_conv(tmp_path, channels=channels, height=height, width=width, kernel=kernel, stride=stride,
                              pad=pad, symmetric=symmetric)
    model = onnx.load(str(path))
    targets = space_to_depth.plan(model)
    assert [t["node"] for t in targets] == [n.name for n in model.graph.node if n.op_type == "QLinearConv"]
    rewritten = space_to_depth.apply(model, targets)
    ops = [n.op_type for n in rewritten.graph.node]
    assert ops.index("Pad") < ops.index("SpaceToDepth") < ops.index("QLinearConv"), ops
    conv = next(n for n in rewritten.graph.node if n.op_type == "QLinearConv")
    assert {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}["strides"] == [1, 1]
    before, after = _run(model, x), _run(rewritten, x)
    assert before.shape == after.shape
    assert np.array_equal(before, after), np.abs(before - after).max()
    assert np.abs(before).max() > 0  # a real output, not all zeros


@pytest.mark.parametrize(("why", "fields"), [
    ("stride 1", {"channels": 3, "stride": 1}),
    ("eight input channels", {"channels": 8, "stride": 2}),
    ("grouped", {"channels": 4, "stride": 2, "group": 2}),
    ("dilated", {"channels": 3, "stride": 2, "dilation": 2}),
])
def test_convolutions_it_does_not_help_are_left_alone(tmp_path, why, fields):
    path, _ = _quantized_conv(tmp_path, height=16, width=16, kernel=3, pad=1, symmetric=True, **fields)
    assert space_to_depth.plan(onnx.load(str(path))) == [], why


def test_rewrite_keeps_the_rewritten_model_only_when_profiled_faster_and_says_so(tmp_path, caplog):
    """Whichever way this CPU decides, the record's figures explain the decision and the model it
    returns computes what the quantized model computed."""
    path, x = _quantized_conv(tmp_path, channels=3, height=64, width=64, kernel=7, stride=2, pad=3, symmetric=True)
    with caplog.at_level(logging.INFO):
        out, record = space_to_depth.rewrite(path, tmp_path / "s2d", {"x": x}, 1, logging.getLogger("test"), rounds=1)
    assert record["nodes"] == [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "QLinearConv"]
    assert record["before_us"] > 0 and record["after_us"] > 0
    assert record["kept"] == (record["after_us"] < space_to_depth.KEEP_BELOW * record["before_us"])
    assert out == (tmp_path / "s2d" / "model.onnx" if record["kept"] else path)
    assert np.array_equal(_run(out, x), _run(path, x))
    assert "Space-to-depth on" in caplog.text
    if record["kept"]:  # the stride-1 convolution it made is no candidate: a second pass changes nothing
        again = space_to_depth.rewrite(out, tmp_path / "again", {"x": x}, 1, logging.getLogger("test"))
        assert again == (out, {"nodes": [], "kept": False})
