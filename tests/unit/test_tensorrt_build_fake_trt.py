"""tensorrt_build's build logic against a FAKE ``tensorrt`` module (and a fake GPU memory).

TensorRT is mocked here because it cannot be installed on this machine (its PyPI packages fetch
the real libraries from NVIDIA's own index at install time) and there is no GPU. The fake follows
TensorRT 10's Python API names and records every call, so these tests assert what a user relies
on: the builder flags for the precision, one optimization profile per entry with the given
shapes, the timing cache loaded and saved, calibration batches drawn from the calibration data in
order, and parser/build errors surfaced with TensorRT's own text and the failing node. Its
network is read from a real ONNX file (onnx), so input names and shapes are the model's.
tests/integration/test_tensorrt_unavailable.py runs the whole step with this fake through the real
runner and MLflow server; tests/gpu/test_tensorrt_gpu.py builds a real engine where a GPU and
TensorRT exist.
"""

from __future__ import annotations

import json
import logging
import types
from pathlib import Path

import numpy as np
import pytest

from airflow_modelopt.container.steps import tensorrt_build as step
from airflow_modelopt.exceptions import ConversionFailed, InputError, StepFailed
from airflow_modelopt.specs import parse_spec

LOG = logging.getLogger("test.tensorrt")


# -- the fake TensorRT -----------------------------------------------------------------------


class _Enum:
    def __init__(self, prefix, *names):
        for n in names:
            setattr(self, n, f"{prefix}.{n}")


class FakeState:
    """What the fake saw, and how it should behave."""

    def __init__(self):
        self.parse_paths: list[str] = []
        self.parse_dir_files: list[list[str]] = []  # what lay beside the ONNX file when it was parsed
        self.parser_errors: list[dict] = []
        self.config = None
        self.profiles: list[FakeProfile] = []
        self.created_caches: list[bytes] = []
        self.accept_timing_cache = True
        self.build_errors: list[str] = []
        self.calibration_requests: list[list[str]] = []
        self.network_flags = None


class FakeTensor:
    def __init__(self, name, shape, dtype):
        self.name, self.shape, self.dtype = name, shape, dtype


class FakeNetwork:
    def __init__(self):
        self.inputs: list[FakeTensor] = []
        self.outputs: list[FakeTensor] = []
        self.num_layers = 0

    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = property(lambda self: len(self.outputs))

    def get_input(self, i):
        return self.inputs[i]

    def get_output(self, i):
        return self.outputs[i]


class FakeParserError:
    def __init__(self, node, name, op, desc, code):
        self._v = (node, name, op, desc, code)

    def node(self):
        return self._v[0]

    def node_name(self):
        return self._v[1]

    def node_operator(self):
        return self._v[2]

    def desc(self):
        return self._v[3]

    def code(self):
        return self._v[4]


class FakeProfile:
    def __init__(self):
        self.shapes: dict[str, tuple[list[int], list[int], list[int]]] = {}

    def set_shape(self, name, lo, mid, hi):
        self.shapes[name] = (list(lo), list(mid), list(hi))


class FakeTimingCache:
    def __init__(self, data: bytes):
        self.data = bytes(data)

    def serialize(self):
        return self.data


class FakeConfig:
    def __init__(self, state):
        self.state = state
        self.flags: list[str] = []
        self.pool_limits: dict[str, int] = {}
        self.builder_optimization_level = None
        self.profiling_verbosity = None
        self.int8_calibrator = None
        self.calibration_profile = None
        self.profiles: list[FakeProfile] = []
        self.timing_cache: FakeTimingCache | None = None
        self.set_cache_calls: list[tuple[bytes, bool]] = []

    def set_memory_pool_limit(self, pool, size):
        self.pool_limits[pool] = size

    def set_flag(self, flag):
        self.flags.append(flag)

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def set_calibration_profile(self, profile):
        self.calibration_profile = profile

    def create_timing_cache(self, data):
        self.state.created_caches.append(bytes(data))
        return FakeTimingCache(data)

    def set_timing_cache(self, cache, ignore_mismatch):
        self.set_cache_calls.append((cache.data, ignore_mismatch))
        if cache.data and not self.state.accept_timing_cache:
            return False
        self.timing_cache = cache
        return True

    def get_timing_cache(self):
        return self.timing_cache


def make_fake_trt(state: FakeState) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.99.0-fake"

    class ILogger:
        Severity = _Enum("Severity", "INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE")

        def __init__(self):
            pass

    trt.ILogger = ILogger
    trt.DataType = _Enum("DataType", "FLOAT", "HALF", "INT8", "INT32", "INT64")
    trt.nptype = lambda dt: {"DataType.FLOAT": np.float32, "DataType.INT64": np.int64}[dt]
    trt.MemoryPoolType = _Enum("MemoryPoolType", "WORKSPACE")
    trt.BuilderFlag = _Enum("BuilderFlag", "FP16", "INT8", "TF32", "BF16")
    trt.ProfilingVerbosity = _Enum("ProfilingVerbosity", "LAYER_NAMES_ONLY", "DETAILED", "NONE")
    trt.LayerInformationFormat = _Enum("LayerInformationFormat", "ONELINE", "JSON")

    class IInt8EntropyCalibrator2:
        def __init__(self):
            pass

    trt.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.logger, self.errors = network, logger, []

        def parse_from_file(self, path):
            import onnx

            state.parse_paths.append(path)
            state.parse_dir_files.append(sorted(p.name for p in Path(path).parent.iterdir()))
            if state.parser_errors:
                self.errors = [FakeParserError(**e) for e in state.parser_errors]
                return False
            model = onnx.load(path, load_external_data=False)

            def tensors(values):
                out = []
                for v in values:
                    t = v.type.tensor_type
                    shape = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
                    dtype = {1: trt.DataType.FLOAT, 7: trt.DataType.INT64}[t.elem_type]
                    out.append(FakeTensor(v.name, tuple(shape), dtype))
                return out

            self.network.inputs = tensors(model.graph.input)
            self.network.outputs = tensors(model.graph.output)
            self.network.num_layers = len(model.graph.node)
            return True

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

    trt.OnnxParser = OnnxParser

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            state.network_flags = flags
            return FakeNetwork()

        def create_builder_config(self):
            state.config = FakeConfig(state)
            return state.config

        def create_optimization_profile(self):
            profile = FakeProfile()
            state.profiles.append(profile)
            return profile

        def build_serialized_network(self, network, config):
            cal = config.int8_calibrator
            if cal is not None:
                names = [t.name for t in network.inputs]
                assert cal.get_batch_size() >= 1
                while True:
                    state.calibration_requests.append(names)
                    if cal.get_batch(names) is None:
                        break
                cal.write_calibration_cache(b"fake-calibration-table")
            if state.build_errors:
                for msg in state.build_errors:
                    self.logger.log(ILogger.Severity.ERROR, msg)
                return None
            config.timing_cache = FakeTimingCache(config.timing_cache.data + b"|timed-by-this-build")
            return json.dumps({"flags": config.flags, "profiles": len(config.profiles)}).encode()

    trt.Builder = Builder

    class Engine:
        num_layers = 3

        def create_engine_inspector(self):
            inspector = types.SimpleNamespace()
            inspector.get_engine_information = lambda fmt: json.dumps({"Layers": [
                {"Name": "gemm", "LayerType": "MatrixMultiply"}, {"Name": "bias", "LayerType": "ElementWise"},
                {"Name": "flatten", "LayerType": "Shuffle"}]})
            return inspector

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return Engine()

    trt.Runtime = Runtime
    return trt


class FakeDeviceMemory:
    """Stands in for cuda-python's device buffers: records what was copied where."""

    def __init__(self):
        self.copies: list[tuple[int, np.ndarray]] = []
        self.freed: list[int] = []
        self._next = 0x1000
        self.device = None

    def set_device(self, index):
        self.device = index

    def alloc(self, nbytes):
        self._next += 0x1000
        return self._next

    def copy_to_device(self, pointer, array):
        self.copies.append((pointer, np.array(array, copy=True)))

    def free(self, pointer):
        self.freed.append(pointer)


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def state(monkeypatch):
    s = FakeState()
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", make_fake_trt(s))
    return s


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory) -> Path:
    """A real ONNX file: x [batch, 1, 8, 8] -> Flatten -> Gemm -> logits [batch, 10]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 10)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(10, np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["flat"], name="flatten_0"),
         helper.make_node("Gemm", ["flat", "w", "b"], ["logits"], name="gemm_0")],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    folder = tmp_path_factory.mktemp("onnx")
    onnx.save(model, folder / "model.onnx", save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    return folder / "model.onnx"


def spec_of(**fields):
    return parse_spec("tensorrt_build", {"model_uri": "runs:/r/onnx_model", **fields})


def calibration_data(n=40):
    x = np.arange(n * 64, dtype=np.float64).reshape(n, 1, 8, 8) / (n * 64)
    return {"x": x, "y": np.arange(n) % 10}


def build(onnx_model, spec, *, arrays=None, timing_cache=None, memory=None):
    return step.build_engine(onnx_model, spec, calibration_arrays=arrays, timing_cache=timing_cache,
                             memory=memory or FakeDeviceMemory(), out=LOG)


# -- flags and config -------------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "flags"), [
    ({"precision": "fp32"}, []),
    ({"precision": "fp16"}, ["BuilderFlag.FP16"]),
    ({"precision": "int8"}, ["BuilderFlag.INT8", "BuilderFlag.FP16"]),
    ({"precision": "int8", "int8_fp16_fallback": False}, ["BuilderFlag.INT8"]),
])
def test_builder_flags_follow_the_precision(state, onnx_model, fields, flags):
    int8 = fields["precision"] == "int8"
    spec = spec_of(**fields, **({"calibration_data_uri": "/c.npz"} if int8 else {}))
    built = build(onnx_model, spec, arrays=calibration_data() if int8 else None)
    assert state.config.flags == flags
    assert built.flags == [f.split(".")[1] for f in flags]
    assert (state.config.int8_calibrator is not None) == int8
    assert json.loads(built.engine)["flags"] == flags


def test_workspace_optimization_level_and_parse_from_file(state, onnx_model):
    spec = spec_of(workspace_mb=256, builder_optimization_level=5)
    built = build(onnx_model, spec)
    assert state.parse_paths == [str(onnx_model)], "parse_from_file gets the path, so external data is found"
    assert "model.onnx.data" in state.parse_dir_files[0]
    assert state.network_flags == 0
    assert state.config.pool_limits == {"MemoryPoolType.WORKSPACE": 256 << 20}
    assert state.config.builder_optimization_level == 5
    assert state.config.profiling_verbosity == "ProfilingVerbosity.DETAILED"
    assert [(t.name, t.shape, t.dtype) for t in built.inputs] == [("x", [-1, 1, 8, 8], "float32")]
    assert (built.engine_layers, built.network_layers) == (3, 2)
    assert step.layer_types(built.layer_info) == {"ElementWise": 1, "MatrixMultiply": 1, "Shuffle": 1}


# -- optimization profiles --------------------------------------------------------------------


def test_one_optimization_profile_per_entry_with_the_given_shapes(state, onnx_model):
    small = {"x": {"min": [1, 1, 8, 8], "opt": [4, 1, 8, 8], "max": [8, 1, 8, 8]}}
    large = {"x": {"min": [8, 1, 8, 8], "opt": [64, 1, 8, 8], "max": [256, 1, 8, 8]}}
    built = build(onnx_model, spec_of(optimization_profiles=[small, large]))
    assert [p.shapes for p in state.config.profiles] == [
        {"x": ([1, 1, 8, 8], [4, 1, 8, 8], [8, 1, 8, 8])},
        {"x": ([8, 1, 8, 8], [64, 1, 8, 8], [256, 1, 8, 8])},
    ]
    assert len(built.profiles) == 2


def test_default_profile_spans_batch_one_to_max_batch_size(state, onnx_model):
    build(onnx_model, spec_of(opt_batch_size=16, max_batch_size=128))
    assert [p.shapes for p in state.config.profiles] == [{"x": ([1, 1, 8, 8], [16, 1, 8, 8], [128, 1, 8, 8])}]


@pytest.mark.parametrize(("profile", "message"), [
    ({"image": {"min": [1, 1, 8, 8], "opt": [1, 1, 8, 8], "max": [1, 1, 8, 8]}},
     r"optimization_profiles\[0\] names input\(s\) \['image'\] which the model does not have; its inputs are \['x'\]"),
    ({"x": {"min": [1, 64], "opt": [1, 64], "max": [1, 64]}},
     r"optimization_profiles\[0\]\['x'\] has rank 2 but the model's input 'x' has shape \[-1, 1, 8, 8\]"),
    ({"x": {"min": [1, 3, 8, 8], "opt": [1, 3, 8, 8], "max": [1, 3, 8, 8]}},
     r"optimization_profiles\[0\]\['x'\] dimension 1 is fixed to 1 in the model .* min/opt/max give 3/3/3"),
])
def test_profiles_that_do_not_fit_the_network_name_the_input(state, onnx_model, profile, message):
    with pytest.raises(InputError, match=message):
        build(onnx_model, spec_of(optimization_profiles=[profile]))
    assert state.config is None, "refused before any builder config was made"


# -- timing cache -----------------------------------------------------------------------------


def test_timing_cache_is_loaded_and_the_updated_one_saved(state, onnx_model):
    built = build(onnx_model, spec_of(), timing_cache=b"cache-from-last-week")
    assert state.created_caches == [b"cache-from-last-week"]
    assert state.config.set_cache_calls == [(b"cache-from-last-week", False)]
    assert built.timing_cache_reused is True
    assert built.timing_cache == b"cache-from-last-week|timed-by-this-build"


def test_a_rejected_timing_cache_falls_back_to_a_fresh_one(state, onnx_model, caplog):
    state.accept_timing_cache = False
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        built = build(onnx_model, spec_of(), timing_cache=b"from-another-gpu")
    assert state.created_caches == [b"from-another-gpu", b""]
    assert built.timing_cache_reused is False
    assert built.timing_cache == b"|timed-by-this-build"
    assert "rejected the given timing cache" in caplog.text


def test_without_a_timing_cache_a_fresh_one_is_created_and_saved(state, onnx_model):
    built = build(onnx_model, spec_of())
    assert state.created_caches == [b""]
    assert (built.timing_cache_reused, built.timing_cache) == (False, b"|timed-by-this-build")


# -- int8 calibration -------------------------------------------------------------------------


def test_calibration_batches_are_drawn_from_the_data_in_order_at_the_opt_shape(state, onnx_model):
    data = calibration_data(40)
    memory = FakeDeviceMemory()
    spec = spec_of(precision="int8", calibration_data_uri="/c.npz", calibration_batches=3,
                   optimization_profiles={"x": {"min": [1, 1, 8, 8], "opt": [8, 1, 8, 8], "max": [32, 1, 8, 8]}})
    built = build(onnx_model, spec, arrays=data, memory=memory)
    fed = [a for _, a in memory.copies]
    assert len(fed) == 3
    for i, a in enumerate(fed):
        assert a.dtype == np.float32 and a.shape == (8, 1, 8, 8)
        np.testing.assert_array_equal(a, data["x"][i * 8:(i + 1) * 8].astype(np.float32))
    assert state.calibration_requests == [["x"]] * 4, "three batches, then None ends calibration"
    assert state.config.calibration_profile is state.config.profiles[0]
    assert built.calibration.summary() == {"batches": 3, "batch_size": 8, "samples_used": 24, "samples_available": 40,
                                           "batches_requested": 3}
    assert built.calibration_cache == b"fake-calibration-table"
    assert sorted(memory.freed) == sorted({p for p, _ in memory.copies}), "device buffers are freed"


def test_calibration_uses_as_many_full_batches_as_the_data_holds(state, onnx_model):
    memory = FakeDeviceMemory()
    spec = spec_of(precision="int8", calibration_data_uri="/c.npz", calibration_batches=100, opt_batch_size=16)
    built = build(onnx_model, spec, arrays=calibration_data(40), memory=memory)
    assert [a.shape for _, a in memory.copies] == [(16, 1, 8, 8)] * 2
    assert built.calibration.summary()["samples_used"] == 32


@pytest.mark.parametrize(("arrays", "message"), [
    ({"x": np.zeros((40, 3, 8, 8), np.float32)},
     r"calibration_data_uri: input 'x' has samples of shape \[3, 8, 8\] but calibration runs at \[8, 1, 8, 8\]"),
    ({"x": np.zeros((5, 1, 8, 8), np.float32)},
     r"calibration_data_uri: holds 5 samples but one calibration batch of input 'x' needs 8"),
    ({"image": np.zeros((40, 1, 8, 8), np.float32), "mask": np.zeros((40, 1), np.float32)},
     r"calibration_data_uri: the model has input 'x' but the data artifact has arrays \['image', 'mask'\]"),
    ({"x": np.zeros((40, 1, 8, 8), np.int64)}, r"calibration_data_uri: input 'x' is int64 but the model takes float32"),
])
def test_calibration_data_that_does_not_fit_is_refused_naming_the_input(state, onnx_model, arrays, message):
    spec = spec_of(precision="int8", calibration_data_uri="/c.npz")
    with pytest.raises(InputError, match=message):
        build(onnx_model, spec, arrays=arrays)


# -- errors -----------------------------------------------------------------------------------


def test_parser_errors_carry_the_parsers_text_and_node(state, onnx_model):
    state.parser_errors = [
        {"node": 1, "name": "gemm_0", "op": "Gemm", "code": "ErrorCode.UNSUPPORTED_NODE",
         "desc": "Assertion failed: inputs.at(2).is_weights() && Bias must be an initializer"},
        {"node": -1, "name": "", "op": "", "code": "ErrorCode.INVALID_GRAPH", "desc": "graph has no outputs"},
    ]
    with pytest.raises(ConversionFailed) as err:
        build(onnx_model, spec_of())
    message = str(err.value)
    assert message.startswith("TensorRT's ONNX parser rejected model.onnx: ")
    assert ("node 1 'gemm_0' (op Gemm): Assertion failed: inputs.at(2).is_weights() && Bias must be an initializer "
            "[UNSUPPORTED_NODE]") in message
    assert "graph: graph has no outputs [INVALID_GRAPH]" in message
    assert err.value.exit_code == 5 and not err.value.retryable


def test_a_failed_build_reports_tensorrts_errors(state, onnx_model):
    state.build_errors = ["[optimizer.cpp::computeCosts] Error Code 10: Could not find any implementation for node gemm_0"]
    with pytest.raises(ConversionFailed, match=r"failed to build the fp16 engine from model.onnx: .*Could not find any "
                                               r"implementation for node gemm_0"):
        build(onnx_model, spec_of())


def test_an_out_of_memory_build_is_retryable(state, onnx_model):
    state.build_errors = ["Error Code 2: OutOfMemory (Requested size was 4294967296 bytes.)"]
    with pytest.raises(StepFailed, match=r"OutOfMemory.*workspace_mb=1024") as err:
        build(onnx_model, spec_of())
    assert err.value.retryable


# -- the environment check and inputs ---------------------------------------------------------


@pytest.mark.skipif(step.gpu_status().count > 0, reason="this machine has a GPU")
def test_tensorrt_without_a_gpu_is_refused_up_front_and_not_retried(state):
    spec = spec_of(context={"execution_mode": "kubernetes"})
    with pytest.raises(step.UnsupportedHere) as err:
        step.check_environment(spec)
    message = str(err.value)
    assert message.startswith("TensorRT target needs an NVIDIA GPU and the tensorrt package; this worker has the "
                              "tensorrt package (10.99.0-fake) but no NVIDIA GPU (no NVIDIA GPU: ")
    assert "requests nvidia.com/gpu: 1" in message, "the hint fits the execution mode"
    assert (err.value.exit_code, err.value.retryable) == (6, False)
    assert state.config is None


def test_model_and_timing_cache_inputs_are_located_or_refused(tmp_path, onnx_model):
    assert step.locate_onnx(onnx_model.parent, "runs:/r/m") == onnx_model
    (tmp_path / "model.tflite").write_bytes(b"TFL3")
    with pytest.raises(InputError, match=r"model_uri: runs:/r/m is not an .onnx file \(got 'model.tflite'\)"):
        step.locate_onnx(tmp_path / "model.tflite", "runs:/r/m")
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "timing.cache").write_bytes(b"tc")
    (engine / "calibration.cache").write_bytes(b"cc")
    assert step.read_timing_cache(engine, "runs:/r/tensorrt_engine") == b"tc"
    (tmp_path / "empty.cache").write_bytes(b"")
    with pytest.raises(InputError, match=r"timing_cache_uri: /x/empty.cache is an empty file"):
        step.read_timing_cache(tmp_path / "empty.cache", "/x/empty.cache")


# -- the CUDA wrapper the step and the TensorRT runtime share (runtimes/cuda.py) ----------------


class FakeCudart:
    """cuda-python's runtime API as far as the wrapper and the GPU probe use it: (error, value) tuples."""

    class cudaError_t(int):
        @property
        def name(self):
            return {0: "cudaSuccess", 2: "cudaErrorMemoryAllocation", 100: "cudaErrorNoDevice"}[int(self)]

    cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)

    def __init__(self, *, devices=1, fail_malloc_over=None):
        self.devices, self.fail_malloc_over = devices, fail_malloc_over
        self.calls = []

    def cudaGetErrorString(self, err):
        return self.cudaError_t(0), {2: b"out of memory", 100: b"no CUDA-capable device is detected"}[int(err)]

    def cudaGetDeviceCount(self):
        if not self.devices:
            return self.cudaError_t(100), 0
        return self.cudaError_t(0), self.devices

    def cudaGetDeviceProperties(self, i):
        props = types.SimpleNamespace(name=b"Fake H100\0\0junk", major=9, minor=0, totalGlobalMem=80 << 30)
        return self.cudaError_t(0), props

    def cudaSetDevice(self, i):
        self.calls.append(("set_device", i))
        return (self.cudaError_t(0),)

    def cudaMalloc(self, n):
        if self.fail_malloc_over is not None and n > self.fail_malloc_over:
            return self.cudaError_t(2), 0
        self.calls.append(("malloc", n))
        return self.cudaError_t(0), 0xBEEF

    def cudaMemcpy(self, dst, src, n, kind):
        self.calls.append(("memcpy", dst, n, kind))
        return (self.cudaError_t(0),)

    def cudaFree(self, p):
        self.calls.append(("free", p))
        return (self.cudaError_t(0),)


def test_cuda_memory_copies_calibration_batches_and_names_a_failing_call():
    from airflow_modelopt.container.runtimes.cuda import CudaMemory

    rt = FakeCudart(fail_malloc_over=1 << 20)
    memory = CudaMemory(rt)
    memory.set_device(0)
    pointer = memory.alloc(256)
    memory.copy_to_device(pointer, np.ones((8, 8), np.float32))
    memory.free(pointer)
    assert rt.calls == [("set_device", 0), ("malloc", 256), ("memcpy", 0xBEEF, 256, 1), ("free", 0xBEEF)]
    with pytest.raises(StepFailed, match=r"CUDA cudaMalloc\(4194304\) failed: cudaErrorMemoryAllocation: out of memory") as err:
        memory.alloc(4 << 20)
    assert err.value.retryable, "another GPU or a retry may have the memory"


def test_the_build_step_and_the_tensorrt_runtime_use_the_one_cuda_wrapper():
    from airflow_modelopt.container.runtimes import cuda, tensorrt_backend
    from airflow_modelopt.container.steps.tensorrt_build import environment

    assert tensorrt_backend.device_memory is cuda.device_memory
    assert environment.CudaMemory is cuda.CudaMemory
    assert not hasattr(tensorrt_backend, "_CudaPython") and not hasattr(step, "CudaMemory")


def test_gpu_status_reads_the_devices_through_cuda_python(monkeypatch):
    from airflow_modelopt.container.runtimes import cuda, probe

    monkeypatch.setattr(cuda, "cudart", lambda: FakeCudart(devices=2))
    info = probe.gpu_status()
    assert (info.count, info.names, info.compute_capabilities, info.memory_mb, info.cuda_python) == (
        2, ["Fake H100", "Fake H100"], ["9.0", "9.0"], [80 << 10, 80 << 10], True)
    monkeypatch.setattr(cuda, "cudart", lambda: FakeCudart(devices=0))
    info = probe.gpu_status()
    assert info.count == 0 and info.reason.startswith(
        "the CUDA runtime reports cudaErrorNoDevice: no CUDA-capable device is detected")
