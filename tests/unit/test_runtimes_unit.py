"""The runtimes layer on small hand-built models (real ONNX Runtime), the validation arithmetic,
the benchmark statistics and the comparison plot. TensorRT cannot be installed here: its test
runs against a fake ``tensorrt`` module and host memory, and says so in its name."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest

from airflow_modelopt.container.runtimes import dequantize, detect, layout_perm, load, quantize
from airflow_modelopt.container.signature import ModelSignature, Quantization, TensorSpec
from airflow_modelopt.exceptions import InputError
from airflow_modelopt.specs import parse_spec

# -- small ONNX models ------------------------------------------------------------------------


def _save(model, folder: Path, name: str = "model.onnx") -> Path:
    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    model.opset_import[0].version = 18
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / name))
    return folder / name


def double_nhwc_int8(folder: Path) -> Path:
    """int8 NHWC in, int8 NHWC out: out = 2 * in in real terms (QDQ around a Mul)."""
    from onnx import TensorProto, helper

    s_in, s_out = 0.02, 0.05
    nodes = [
        helper.make_node("DequantizeLinear", ["q", "s_in", "z"], ["f"]),
        helper.make_node("Mul", ["f", "two"], ["g"]),
        helper.make_node("QuantizeLinear", ["g", "s_out", "z"], ["out"]),
    ]
    inits = [helper.make_tensor("s_in", TensorProto.FLOAT, [], [s_in]),
             helper.make_tensor("s_out", TensorProto.FLOAT, [], [s_out]),
             helper.make_tensor("z", TensorProto.INT8, [], [0]),
             helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])]
    graph = helper.make_graph(nodes, "double", [helper.make_tensor_value_info("q", TensorProto.INT8, ["N", 4, 5, 3])],
                              [helper.make_tensor_value_info("out", TensorProto.INT8, ["N", 4, 5, 3])], inits)
    path = _save(helper.make_model(graph), folder)
    ModelSignature(
        format="onnx", source_layout="NCHW",
        inputs=[TensorSpec(name="q", shape=[None, 4, 5, 3], dtype="int8", layout="NHWC",
                           quantization=Quantization(scale=s_in, zero_point=0), source_name="x")],
        outputs=[TensorSpec(name="out", shape=[None, 4, 5, 3], dtype="int8", layout="NHWC",
                            quantization=Quantization(scale=s_out, zero_point=0), source_name="y2")],
    ).write(folder)
    return path


def row_sum_fixed_batch(folder: Path, batch: int = 4) -> Path:
    """float (4, 3) -> (4, 1): row sums, batch fixed to 4."""
    from onnx import TensorProto, helper

    node = helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=1)
    graph = helper.make_graph([node], "rowsum", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3])],
                              [helper.make_tensor_value_info("s", TensorProto.FLOAT, [batch, 1])],
                              [helper.make_tensor("axes", TensorProto.INT64, [1], [1])])
    return _save(helper.make_model(graph), folder)


# -- detection --------------------------------------------------------------------------------


def test_detect_formats_from_suffix_and_folder_contents(tmp_path):
    for name, fmt in [("m.pt2", "pt2"), ("m.pt", "torchscript"), ("m.onnx", "onnx"), ("m.tflite", "tflite"),
                      ("m.keras", "keras"), ("m.h5", "keras"), ("m.engine", "tensorrt"), ("m.plan", "tensorrt")]:
        f = tmp_path / "files" / name
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(b"x")
        assert detect(f)[0] == fmt, name

    onnx_flavor = tmp_path / "onnx_flavor"
    onnx_flavor.mkdir()
    (onnx_flavor / "MLmodel").write_text("flavors:\n  onnx:\n    data: model.onnx\n  python_function: {}\n")
    (onnx_flavor / "model.onnx").write_bytes(b"x")
    (onnx_flavor / "1234-abcd.data").write_bytes(b"x")
    assert detect(onnx_flavor)[:2] == ("onnx", onnx_flavor / "model.onnx")

    torch_flavor = tmp_path / "torch_flavor"
    (torch_flavor / "data").mkdir(parents=True)
    (torch_flavor / "MLmodel").write_text("flavors:\n  pytorch:\n    model_data: data\n")
    (torch_flavor / "data" / "model.pt2").write_bytes(b"x")
    assert detect(torch_flavor)[:2] == ("pt2", torch_flavor / "data" / "model.pt2")
    (torch_flavor / "data" / "model.pt2").unlink()
    (torch_flavor / "data" / "model.pth").write_bytes(b"x")
    assert detect(torch_flavor)[:2] == ("pytorch", torch_flavor)

    saved = tmp_path / "saved" / "1"
    saved.mkdir(parents=True)
    (saved / "saved_model.pb").write_bytes(b"x")
    assert detect(tmp_path / "saved")[:2] == ("savedmodel", saved)


def test_detect_refuses_ambiguous_unknown_and_missing_models_by_name(tmp_path):
    both = tmp_path / "both"
    both.mkdir()
    (both / "a.onnx").write_bytes(b"x")
    (both / "b.tflite").write_bytes(b"x")
    with pytest.raises(InputError, match=r"candidate_uri: folder .* holds several models \['a.onnx', 'b.tflite'\]"):
        detect(both, field="candidate_uri")
    ModelSignature(format="tflite", inputs=[], outputs=[]).write(both)
    assert detect(both)[:2] == ("tflite", both / "b.tflite")  # the recorded signature says which
    assert detect(both, "onnx")[:2] == ("onnx", both / "a.onnx")

    odd = tmp_path / "model.bin"
    odd.write_bytes(b"x")
    with pytest.raises(InputError, match="cannot tell the format of model.bin from its suffix"):
        detect(odd)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="found no model in folder"):
        detect(empty)
    with pytest.raises(InputError, match="does not exist"):
        detect(tmp_path / "nope.onnx")
    with pytest.raises(InputError, match="unknown model format 'caffe'"):
        detect(odd, "caffe")


def test_a_model_the_runtime_cannot_load_is_one_error_naming_field_and_format(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a protobuf")
    with pytest.raises(InputError, match=r"reference_uri: runs:/r/broken.onnx does not load as a onnx model: \w+"):
        load(bad, field="reference_uri", origin="runs:/r/broken.onnx")


# -- conversions ------------------------------------------------------------------------------


def test_layout_perm_and_quantization_arithmetic():
    x = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    nhwc = x.transpose(layout_perm("NCHW", "NHWC"))
    assert nhwc.shape == (2, 4, 5, 3) and nhwc[1, 2, 3, 0] == x[1, 0, 2, 3]
    assert np.array_equal(nhwc.transpose(layout_perm("NHWC", "NCHW")), x)
    assert layout_perm("NCHW", "NCHW") is None and layout_perm("NC", "NCHW") is None

    q = Quantization(scale=0.1, zero_point=-128)
    real = np.array([0.0, 1.0, -12.8, 12.75, 100.0, -100.0])
    ints = quantize(real, q, np.dtype(np.int8))
    assert ints.tolist() == [-128, -118, -128, 0, 127, -128]  # 127.5 rounds to even; saturates at the int8 range
    assert np.allclose(dequantize(ints, q)[:4], [0.0, 1.0, 0.0, 12.8])
    u = quantize(np.array([0.5]), Quantization(scale=1 / 255, zero_point=0), np.dtype(np.uint8))
    assert u.dtype == np.uint8 and int(u[0]) == 128


def test_int8_nhwc_model_is_fed_and_read_in_source_terms_from_its_recorded_signature(tmp_path):
    double_nhwc_int8(tmp_path / "m")
    rt = load(tmp_path / "m")
    assert [(s.name, s.dtype, s.layout, s.source_name) for s in rt.inputs] == [("q", "int8", "NHWC", "x")]
    assert rt.inputs[0].quantization == Quantization(scale=0.02, zero_point=0)
    assert rt.feed_names == ["x"] and rt.output_names == ["y2"]
    x = np.random.default_rng(0).uniform(-1.2, 1.2, (6, 3, 4, 5)).astype(np.float32)  # NCHW, real values
    (out,) = rt.run({"x": x})
    assert out.shape == (6, 3, 4, 5) and out.dtype == np.float32  # back in NCHW, dequantized
    assert np.abs(out - 2 * x).max() <= 2 * 0.01 + 0.025 + 1e-6  # input rounding x2 + output rounding
    native = rt.prepare({"x": x})
    assert native["q"].dtype == np.int8 and native["q"].shape == (6, 4, 5, 3)
    rt.close()


def test_wrong_shape_dtype_or_missing_input_is_an_error_naming_the_input(tmp_path):
    double_nhwc_int8(tmp_path / "m")
    with load(tmp_path / "m") as rt:
        with pytest.raises(InputError) as err:
            rt.run({"x": np.zeros((2, 4, 5, 3), np.float32)}, field="data_uri")  # NHWC given, NCHW recorded
        assert str(err.value) == (
            "data_uri: input 'x' of the onnx model expects shape [?, 3, 4, 5] (NCHW) but the data has shape "
            "[2, 4, 5, 3] (dimension 1 is 4, expected 3)"
        )
        with pytest.raises(InputError, match=r"input 'x' of the onnx model expects shape \[\?, 3, 4, 5\] \(NCHW\) \(rank 4\)"):
            rt.run({"x": np.zeros((2, 60), np.float32)})
        with pytest.raises(InputError, match=r"input 'x' is quantized int8 .* not int64"):
            rt.run({"x": np.zeros((2, 3, 4, 5), np.int64)})
        with pytest.raises(InputError, match=r"needs input 'x' but the data has \['a', 'b'\]"):
            rt.run({"a": np.zeros((2, 3, 4, 5)), "b": np.zeros((2, 3, 4, 5))})
    path = row_sum_fixed_batch(tmp_path / "f")
    with load(path) as rt, pytest.raises(InputError, match="expects float32 values but the data has int64"):
        rt.run({"x": np.ones((4, 3), np.int64)})


def test_fixed_batch_model_is_fed_in_chunks_and_the_threads_option_reaches_the_session(tmp_path):
    path = row_sum_fixed_batch(tmp_path / "f")
    with load(path, threads=2) as rt:
        assert rt.fixed_batch == 4
        assert rt.session.get_session_options().intra_op_num_threads == 2
        x = np.arange(30, dtype=np.float32).reshape(10, 3)
        (out,) = rt.run({"x": x})
        assert out.shape == (10, 1) and np.allclose(out[:, 0], x.sum(1))
        assert rt.model_bytes() == path.stat().st_size


# -- TensorRT against a fake module (no tensorrt, no GPU here) --------------------------------


class _HostMemory:
    """Stands in for CUDA memory: 'device pointers' index host byte arrays."""

    def __init__(self):
        self.blocks: dict[int, bytearray] = {}
        self.next = 4096

    def stream(self):
        return "stream"

    def alloc(self, nbytes):
        self.next += 4096 + nbytes
        self.blocks[self.next] = bytearray(nbytes)
        return self.next

    def free(self, ptr):
        self.blocks.pop(ptr)

    def to_device(self, ptr, host, stream):
        self.blocks[ptr][: host.nbytes] = host.tobytes()

    def to_host(self, host, ptr, stream):
        host.reshape(-1).view(np.uint8)[:] = np.frombuffer(bytes(self.blocks[ptr][: host.nbytes]), np.uint8)

    def sync(self, stream):
        pass

    def handle(self, stream):
        return 7


def _fake_tensorrt(memory: _HostMemory, calls: list) -> types.ModuleType:
    """A `tensorrt` module with the TensorRT 10 names the runtime uses. The engine: input 'images'
    int8 (-1, 4, 4, 2) NHWC, profile max batch 3; output 'logits' float32 (-1, 2) = per-channel
    sum of the int8 values."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.fake"

    class DataType:
        INT8, FLOAT = "int8", "float32"

    class TensorIOMode:
        INPUT, OUTPUT = "in", "out"

    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    class Context:
        def __init__(self):
            self.shapes, self.addresses = {}, {}

        def set_input_shape(self, name, shape):
            self.shapes[name] = tuple(shape)
            return shape[0] <= 3

        def get_tensor_shape(self, name):
            return (self.shapes["images"][0], 2) if name == "logits" else self.shapes[name]

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr

        def execute_async_v3(self, stream):
            assert stream == 7
            n = self.shapes["images"][0]
            x = np.frombuffer(bytes(memory.blocks[self.addresses["images"]][: n * 32]), np.int8).reshape(n, 4, 4, 2)
            out = x.astype(np.float32).sum(axis=(1, 2))
            memory.blocks[self.addresses["logits"]][: out.nbytes] = out.tobytes()
            calls.append(n)
            return True

    class Engine:
        num_io_tensors = 2
        _io = {"images": ((-1, 4, 4, 2), DataType.INT8, TensorIOMode.INPUT),
               "logits": ((-1, 2), DataType.FLOAT, TensorIOMode.OUTPUT)}

        def get_tensor_name(self, i):
            return list(self._io)[i]

        def get_tensor_shape(self, name):
            return self._io[name][0]

        def get_tensor_dtype(self, name):
            return self._io[name][1]

        def get_tensor_mode(self, name):
            return self._io[name][2]

        def get_tensor_profile_shape(self, name, profile):
            return (1, 4, 4, 2), (2, 4, 4, 2), (3, 4, 4, 2)

        def create_execution_context(self):
            return Context()

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data):
            return Engine() if data == b"fake-engine" else None

    trt.DataType, trt.TensorIOMode, trt.Logger, trt.Runtime = DataType, TensorIOMode, Logger, Runtime
    trt.nptype = lambda dt: {"int8": np.int8, "float32": np.float32}[dt]
    return trt


def test_tensorrt_runtime_with_fake_tensorrt_module_no_gpu(tmp_path, monkeypatch):
    """Binding logic only: name-based I/O, int8 input from the recorded scale, NCHW -> NHWC, and
    batches above the profile's maximum fed in chunks. Not a TensorRT run (none can run here)."""
    from airflow_modelopt.container.runtimes import tensorrt_backend

    memory, calls = _HostMemory(), []
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(memory, calls))
    monkeypatch.setattr(tensorrt_backend, "device_memory", lambda: memory)
    folder = tmp_path / "engine"
    folder.mkdir()
    (folder / "model.engine").write_bytes(b"fake-engine")
    ModelSignature(format="tensorrt", source_layout="NCHW",
                   inputs=[TensorSpec(name="images", shape=[None, 4, 4, 2], dtype="int8", layout="NHWC",
                                      quantization=Quantization(scale=0.5, zero_point=0), source_name="x")],
                   outputs=[TensorSpec(name="logits", shape=[None, 2], dtype="float32", source_name="output")]).write(folder)
    rt = load(folder)
    assert rt.format == "tensorrt" and rt.runtime_name == "tensorrt 10.fake (GPU)" and rt.max_batch == 3
    x = np.random.default_rng(1).integers(-20, 20, (5, 2, 4, 4)).astype(np.float32) * 0.5  # NCHW real values
    (out,) = rt.run({"x": x})
    assert calls == [3, 2]
    assert np.allclose(out, (x / 0.5).sum(axis=(2, 3)))
    rt.close()
    assert memory.blocks == {}

    (folder / "model.engine").write_bytes(b"engine of another GPU")
    with pytest.raises(InputError, match="TensorRT could not deserialize the engine"):
        load(folder, field="candidate_uri")


def test_tensorrt_engine_without_tensorrt_installed_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"x")
    with pytest.raises(InputError) as err:
        load(engine, field="candidate_uri")
    text = str(err.value)
    assert text.startswith("candidate_uri:") and "tensorrt Python package and an NVIDIA GPU" in text
    assert "'tensorrt' family" in text


# -- validation arithmetic --------------------------------------------------------------------


def _spec(**fields):
    return parse_spec("validate", {"reference_uri": "a.onnx", "candidate_uri": "b.onnx", "data_uri": "d.npz", **fields})


def test_evaluate_measures_errors_agreement_and_accuracy():
    from airflow_modelopt.container.steps.validate import evaluate, flat_metrics

    ref = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 4.0], [5.0, 0.0, 1.0]])
    cand = ref.copy()
    cand[3] = [0.0, 6.0, 1.0]  # flips sample 3's top-1
    labels = np.array([0, 1, 2, 0])
    ev = evaluate(_spec(min_top1_agreement=0.7), [ref], [cand], ["logits"], labels)
    out = ev["outputs"]["logits"]
    assert out["max_abs_error"] == 6.0 and np.isclose(out["mean_abs_error"], 11 / 12)
    assert np.isclose(out["max_rel_error"], 1.0)  # |0-5|/5 (reference zeros are left out)
    assert ev["classification"]["top1_agreement"] == 0.75
    assert ev["classification"]["accuracy_drop"] == 0.25
    assert not ev["passed"]
    assert ev["reasons"] == ["gate max_accuracy_drop: accuracy dropped by 0.2500 (reference 1.0000, candidate 0.7500), "
                             "above the threshold 0.02"]
    metrics = flat_metrics(ev)
    assert metrics["passed"] == 0.0 and metrics["top1_agreement"] == 0.75 and metrics["max_abs_error"] == 6.0


def test_nan_in_candidate_outputs_fails_with_its_own_reason_even_without_gates():
    from airflow_modelopt.container.steps.validate import evaluate

    ref = np.ones((3, 4))
    cand = ref.copy()
    cand[1, 2] = np.nan
    cand[2, 0] = np.inf
    ev = evaluate(_spec(max_accuracy_drop=None), [ref], [cand], ["y"], None)
    assert not ev["passed"]
    assert ev["reasons"] == ["gate finite_outputs: candidate output 'y' has 1 NaN and 1 inf values (of 12); threshold 0"]
    assert ev["outputs"]["y"]["max_abs_error"] == 0.0  # measured over the finite elements


def test_atol_gate_names_the_worst_element_and_cosine_gate_the_value():
    from airflow_modelopt.container.steps.validate import evaluate

    ref = np.array([[1.0, 2.0], [3.0, 4.0]])
    cand = ref + np.array([[0.0, 1e-5], [0.0, 0.5]])
    ev = evaluate(_spec(atol=1e-4, min_cosine=0.9999), [ref], [cand], ["out"], None)
    atol_reason, cos_reason = ev["reasons"]
    assert atol_reason == ("gate atol: output 'out' max abs error 0.5 exceeds atol 0.0001 (rtol 0) at 1 of 4 elements; "
                           "worst at index [1, 1]: reference 4, candidate 4.5")
    assert cos_reason.startswith("gate min_cosine: output 'out' cosine similarity 0.99") and "below the threshold 0.9999" in cos_reason
    skipped = [g for g in ev["gates"] if g["gate"] == "max_accuracy_drop"][0]
    assert skipped["passed"] is None and skipped["detail"] == "not checked: no labels"


def test_top1_gate_on_an_output_without_class_scores_is_an_input_error():
    from airflow_modelopt.container.steps.validate import evaluate

    with pytest.raises(InputError, match=r"min_top1_agreement needs class scores, but output 'y' has shape \[5, 1\]"):
        evaluate(_spec(min_top1_agreement=0.9), [np.ones((5, 1))], [np.ones((5, 1))], ["y"], None)
    ev = evaluate(_spec(), [np.ones((5, 3))], [np.ones((5, 4))], ["y"], None)
    assert ev["reasons"] == ["output 'y' shape: the candidate gives [5, 4], the reference [5, 3]"]


def test_multi_output_metrics_are_per_output_with_mlflow_safe_names():
    from airflow_modelopt.container.steps.validate import evaluate, flat_metrics

    ref = [np.ones((3, 2)), np.zeros((3, 1))]
    cand = [np.ones((3, 2)) * 1.5, np.zeros((3, 1))]
    metrics = flat_metrics(evaluate(_spec(), ref, cand, ["StatefulPartitionedCall:0", "aux"], None))
    assert metrics["StatefulPartitionedCall_0.max_abs_error"] == 0.5 and metrics["aux.max_abs_error"] == 0.0
    assert metrics["max_abs_error"] == 0.5  # the worst over outputs


def test_markdown_report_shows_failed_gates():
    from airflow_modelopt.container.steps.validate import evaluate, markdown_report

    ref = np.eye(4)
    ev = evaluate(_spec(atol=1e-3), [ref], [ref[::-1]], ["logits"], np.arange(4))
    side = {"uri": "u", "format": "onnx", "runtime": "ort", "seconds": 0.1}
    text = markdown_report({"candidate_name": "c", "reference": side, "candidate": side, "evaluation": ev,
                            "samples": 4, "data_uri": "d.npz"})
    assert "| atol | 0.001 | 1 | **FAIL** |" in text
    assert "| max_accuracy_drop | 0.02 | 1 | **FAIL** |" in text
    assert "**Verdict: FAILED**" in text


# -- benchmark arithmetic and the comparison plot ---------------------------------------------


def test_latency_stats_and_target_flags():
    from airflow_modelopt.container.steps.benchmark import latency_stats, targets

    ns = [1_000_000 * i for i in range(1, 101)]  # 1..100 ms
    s = latency_stats(ns, batch=4)
    assert s["latency_ms_mean"] == 50.5 and s["latency_ms_p50"] == 50.5
    assert np.isclose(s["latency_ms_p95"], 95.05) and np.isclose(s["latency_ms_p99"], 99.01)
    assert np.isclose(s["throughput_items_per_s"], 4 * 100 / 5.05)
    spec = parse_spec("benchmark", {"model_uri": "m.onnx"})
    flags = {f["target"]: f["met"] for f in targets(spec, {4: s}, peak_mb=612.0)}
    assert flags == {"latency": True, "throughput": True, "peak_memory": False}
    slow = latency_stats([200_000_000] * 10, batch=1)
    flags = {f["target"]: f["met"] for f in targets(spec, {1: slow, 8: s}, peak_mb=None)}
    assert flags == {"latency": False, "throughput": False, "peak_memory": None}


def test_hardware_fingerprint_names_cpu_and_cores():
    from airflow_modelopt.container.runtimes.probe import hardware_fingerprint

    hw = hardware_fingerprint()
    assert hw["cpu_model"] and int(hw["physical_cores"]) >= 1 and int(hw["logical_cpus"]) >= int(hw["usable_cpus"]) >= 1
    assert len(hw["fingerprint"]) == 16 and hardware_fingerprint()["fingerprint"] == hw["fingerprint"]


ROWS = [
    {"name": "torch fp32", "latency_ms": 0.30, "size_bytes": 180_000, "accuracy": 0.975},
    {"name": "onnx fp32", "latency_ms": 0.05, "size_bytes": 167_000, "accuracy": 0.975},
    {"name": "onnx int8", "latency_ms": 0.04, "size_bytes": 54_000, "accuracy": 0.970},
    {"name": "tflite int8", "latency_ms": 0.006, "size_bytes": 45_000, "accuracy": 0.9725},
    {"name": "tflite fp32", "latency_ms": 0.02, "size_bytes": 156_000, "accuracy": 0.975},
]


def test_pareto_front_keeps_only_undominated_candidates():
    from airflow_modelopt.container.steps.benchmark import pareto_front

    assert [ROWS[i]["name"] for i in pareto_front(ROWS)] == ["tflite int8", "tflite fp32"]
    no_acc = [{k: v for k, v in r.items() if k != "accuracy"} for r in ROWS]
    assert [no_acc[i]["name"] for i in pareto_front(no_acc)] == ["tflite int8"]


def test_comparison_plot_renders_a_png(tmp_path):
    import matplotlib.image

    from airflow_modelopt.container.steps.benchmark import comparison_plot

    path = comparison_plot(ROWS, tmp_path / "cmp.png", title="digits CNN")
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 500
    assert image[..., :3].std() > 0.05  # not a blank canvas
    red = (image[..., 0] > 0.75) & (image[..., 1] < 0.35) & (image[..., 2] < 0.35)
    assert red.sum() > 50  # the Pareto front is drawn in red
    with pytest.raises(InputError, match=r"row 0 \(a\) lacks \['latency_ms'\]"):
        comparison_plot([{"name": "a", "size_bytes": 1}], tmp_path / "x.png")
