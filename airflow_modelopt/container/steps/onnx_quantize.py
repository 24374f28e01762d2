"""Step onnx_quantize: ONNX model -> int8 ONNX model with ONNX Runtime's quantization tools.

1. Load the source model (a .onnx file, a folder with model.onnx and its external data, or an
   MLflow onnx-flavor folder) and check the data artifacts against its inputs by name, rank,
   fixed dimensions and dtype, before any work: a mismatch names the input and expected shape.
2. ORT's quantization pre-processing (symbolic shape inference + basic graph optimization).
3. Quantize: dynamic (weights only, activations at run time) or static (QDQ or QOperator;
   ranges calibrated with MinMax, Entropy or Percentile on the calibration data). In search mode
   several configurations are built; calibration runs once and is shared through ORT's cache.
4. Measure each int8 model against fp32: top-1 agreement (and accuracy with labels), max abs
   error, and latency (median, or min, of timed runs after warm-up, at the calibration data's
   shapes, batch size and thread count; models interleaved in rounds so drift hits all alike).
5. Gates; search keeps the fastest configuration that passes. Every configuration tried is
   logged (JSON + Markdown table, ``search.<config>.*`` metrics), even when none passes.
6. Log the chosen model with MLflow's onnx flavor, plus size, ratio and quantized-node counts.
"""

from __future__ import annotations

import collections
import contextlib
import difflib
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from airflow_modelopt.container.artifacts import locate_onnx as locate_onnx_artifact
from airflow_modelopt.container.context import StepContext, StepOutput
from airflow_modelopt.container.data import LABEL_KEY, SINGLE_INPUT_KEY, load_npz
from airflow_modelopt.exceptions import ConversionFailed, GateFailed, InputError
from airflow_modelopt.specs.onnx_quantize import (
    DEFAULT_MAX_ACCURACY_DROP,
    DEFAULT_MIN_TOP1_AGREEMENT,
    SEARCH_CONFIGS,
    OnnxQuantizeSpec,
)

TAG_CONFIG = "modelopt.onnx_quantize.config"
TAG_MODE = "modelopt.onnx_quantize.mode"

#: Op types that are themselves quantized kernels or quantization plumbing.
QUANT_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QGemm", "QAttention", "ConvInteger",
    "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "DynamicQuantizeLSTM", "QGather",
    "QEmbedLayerNormalization", "QOrderedMatMul", "MatMulNBits",
})
#: Float ops that carry the model's weights and most of its time; reported when left in fp32.
HEAVY_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Attention", "LSTM", "GRU", "RNN",
                       "EmbedLayerNormalization"})
#: Calibration batches collected per pass (bounds the memory of stored intermediate outputs).
CALIBRATION_CHUNK = 16
EVAL_BATCH = 32


def is_quant_op(op_type: str) -> bool:
    return op_type.startswith("QLinear") or op_type in QUANT_OPS


# -- the source model -------------------------------------------------------------------------


@dataclass
class TensorInfo:
    name: str
    shape: list[int | str | None]
    dtype: str

    def shape_text(self) -> str:
        dims = []
        for i, d in enumerate(self.shape):
            if isinstance(d, int):
                dims.append(str(d))
            else:
                dims.append("N" if i == 0 else (d or "?"))
        return f"[{', '.join(dims)}]"

    def expectation(self) -> str:
        return f"input {self.name!r} with shape {self.shape_text()} ({self.dtype})"


@dataclass
class OnnxModel:
    path: Path
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    files: dict[str, int]
    op_histogram: dict[str, int]
    node_names: list[str]
    unnamed_nodes: int

    @property
    def bytes(self) -> int:
        return sum(self.files.values())


def locate_model(path: Path, uri: str) -> Path:
    """The .onnx file of a file, a model folder, or an MLflow onnx-flavor folder."""
    return locate_onnx_artifact(path, uri)


def _describe(values: Any, initializers: set[str]) -> list[TensorInfo]:
    import onnx

    out = []
    for v in values:
        if v.name in initializers:  # old exporters list initializers as graph inputs
            continue
        t = v.type.tensor_type
        dims: list[int | str | None] = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim
        ]
        try:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
        except (KeyError, TypeError, ValueError):
            dtype = onnx.TensorProto.DataType.Name(t.elem_type).lower()
        out.append(TensorInfo(v.name, dims, dtype))
    return out


def external_files(model: Any, base: Path) -> list[Path]:
    """External data files a model's tensors refer to (relative to the model file's folder)."""
    import onnx

    files: dict[str, Path] = {}
    for tensor in onnx.external_data_helper._get_all_tensors(model):  # noqa: SLF001 - includes subgraphs
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if location:
                files[location] = base / location
    return list(files.values())


def inspect_model(path: Path, field_name: str, uri: str) -> OnnxModel:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - a protobuf parse error names no field
        raise InputError(f"{field_name}: {uri} is not a readable ONNX model: {exc}") from None
    missing = [p.name for p in external_files(model, path.parent) if not p.is_file()]
    if missing:
        raise InputError(
            f"{field_name}: {path.name} keeps its weights in external data {missing}, which is not next to it; "
            "point model_uri at the folder holding both (or at the MLflow model)"
        )
    files = {path.name: path.stat().st_size}
    files.update({p.name: p.stat().st_size for p in external_files(model, path.parent)})
    initializers = {i.name for i in model.graph.initializer}
    ops = collections.Counter(n.op_type for n in model.graph.node)
    return OnnxModel(
        path=path, inputs=_describe(model.graph.input, initializers), outputs=_describe(model.graph.output, set()),
        files=files, op_histogram=dict(sorted(ops.items())), node_names=[n.name for n in model.graph.node],
        unnamed_nodes=sum(1 for n in model.graph.node if not n.name),
    )


# -- data -------------------------------------------------------------------------------------


@dataclass
class Dataset:
    field: str
    features: dict[str, np.ndarray]
    labels: np.ndarray | None

    @property
    def samples(self) -> int:
        return next(iter(self.features.values())).shape[0]


def load_dataset(path: Path, field_name: str, inputs: list[TensorInfo], limit: int | None = None) -> Dataset:
    """Arrays for every model input, checked by name, rank, fixed dimensions and dtype."""
    expected = "; ".join(i.expectation() for i in inputs)
    try:
        arrays = load_npz(path, field=field_name)
    except InputError as exc:
        raise InputError(f"{exc}; expected one array per model {expected}") from None
    features = {k: v for k, v in arrays.items() if k != LABEL_KEY}
    if not features:
        raise InputError(f"{field_name}: the data holds only labels {LABEL_KEY!r}; expected an array for model {expected}")
    matched: dict[str, np.ndarray] = {}
    used: set[str] = set()
    for inp in inputs:
        if inp.name in features:
            key = inp.name
        elif len(inputs) == 1 and SINGLE_INPUT_KEY in features:
            key = SINGLE_INPUT_KEY
        else:
            raise InputError(
                f"{field_name}: no array for model {inp.expectation()}; the data has arrays {sorted(arrays)}. "
                f"Key each input's array by its name (or {SINGLE_INPUT_KEY!r} for a single-input model)"
            )
        matched[inp.name] = features[key]
        used.add(key)
    extra = sorted(set(features) - used)
    if extra:
        raise InputError(
            f"{field_name}: array(s) {extra} match no model input; the model takes {expected} "
            f"(labels go under {LABEL_KEY!r})"
        )
    for inp in inputs:
        matched[inp.name] = _check_array(matched[inp.name], inp, field_name)
    counts = {name: a.shape[0] for name, a in matched.items()}
    if len(set(counts.values())) != 1:
        raise InputError(f"{field_name}: input arrays must hold the same number of samples (first axis), got {counts}")
    labels = arrays.get(LABEL_KEY)
    n = next(iter(counts.values()))
    if labels is not None and (labels.ndim == 0 or labels.shape[0] != n):
        raise InputError(f"{field_name}: labels {LABEL_KEY!r} have shape {list(labels.shape)}; expected {n} labels")
    if limit is not None and limit < n:
        matched = {k: v[:limit] for k, v in matched.items()}
        labels = labels[:limit] if labels is not None else None
    return Dataset(field_name, matched, labels)


def _check_array(a: np.ndarray, inp: TensorInfo, field_name: str) -> np.ndarray:
    where = f"{field_name}: the array for model {inp.expectation()}"
    if a.ndim == 0 or a.shape[0] == 0:
        raise InputError(
            f"{where} holds no samples (shape {list(a.shape)}): the set is empty; expected shape "
            f"{inp.shape_text()} with N >= 1 samples on the first axis"
        )
    if a.ndim != len(inp.shape):
        raise InputError(f"{where} has shape {list(a.shape)} (rank {a.ndim}); expected rank {len(inp.shape)}")
    for d in range(1, a.ndim):
        want = inp.shape[d]
        if isinstance(want, int) and want > 0 and a.shape[d] != want:
            raise InputError(
                f"{where} has shape {list(a.shape)}: dimension {d} is {a.shape[d]}, the model expects {want}"
            )
    try:
        want_dtype: np.dtype | None = np.dtype(inp.dtype)
    except TypeError:
        want_dtype = None
    if want_dtype is not None and a.dtype != want_dtype:
        if not np.can_cast(a.dtype, want_dtype, casting="same_kind"):
            raise InputError(f"{where} has dtype {a.dtype}, which does not convert to {want_dtype} without loss of kind")
        a = a.astype(want_dtype)
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        raise InputError(f"{where} contains NaN or infinite values")
    return np.ascontiguousarray(a)


def fixed_batch(inputs: list[TensorInfo]) -> int | None:
    """The batch size the graph fixes on dimension 0, if it fixes one."""
    sizes = {i.shape[0] for i in inputs if i.shape and isinstance(i.shape[0], int) and i.shape[0] > 0}
    return sizes.pop() if len(sizes) == 1 else None


def iter_batches(features: dict[str, np.ndarray], size: int, pad: bool) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """(feed, valid samples) per batch; with pad, the last batch is filled up from the first samples."""
    n = next(iter(features.values())).shape[0]
    for start in range(0, n, size):
        feed = {k: v[start : start + size] for k, v in features.items()}
        valid = next(iter(feed.values())).shape[0]
        if pad and valid < size:
            feed = {k: np.concatenate([v, np.resize(features[k], (size - valid, *v.shape[1:]))]) for k, v in feed.items()}
        yield {k: np.ascontiguousarray(v) for k, v in feed.items()}, valid


class CalibrationReader:
    """ORT CalibrationDataReader over the calibration arrays, in equal-shape batches."""

    def __init__(self, features: dict[str, np.ndarray], batch: int) -> None:
        self.batches = [feed for feed, _ in iter_batches(features, batch, pad=True)]
        self.start, self.end = 0, len(self.batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.start >= self.end:
            return None
        self.start += 1
        return self.batches[self.start - 1]

    def __iter__(self) -> CalibrationReader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end = start_index, min(end_index, len(self.batches))

    def stride(self) -> int | None:
        """Batches per collection pass: a divisor of the batch count, at most CALIBRATION_CHUNK."""
        n = len(self.batches)
        if n <= CALIBRATION_CHUNK:
            return None
        return max(d for d in range(1, CALIBRATION_CHUNK + 1) if n % d == 0)


# -- configurations and quantization ----------------------------------------------------------


@dataclass
class QuantConfig:
    name: str
    method: str  # static | dynamic
    weight_type: str
    per_channel: bool
    reduce_range: bool
    weight_symmetric: bool | None = None
    quant_format: str | None = None
    activation_type: str | None = None
    activation_symmetric: bool | None = None
    calibration_method: str | None = None
    calibration_percentile: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def config_name(method: str, quant_format: str | None, activation_type: str | None, weight_type: str,
                per_channel: bool, activation_symmetric: bool | None) -> str:
    short = {"uint8": "u8", "int8": "s8"}
    granularity = "per_channel" if per_channel else "per_tensor"
    if method == "dynamic":
        return f"dynamic_{short[weight_type]}_{granularity}"
    name = f"{(quant_format or 'QDQ').lower()}_{short[activation_type or 'uint8']}{short[weight_type]}_{granularity}"
    return name + ("_symmetric" if activation_symmetric else "")


def configs_for(spec: OnnxQuantizeSpec) -> list[QuantConfig]:
    calib = {"calibration_method": spec.calibration_method, "calibration_percentile": spec.calibration_percentile}
    if spec.mode == "search":
        out = []
        for name in spec.configs_to_search():
            preset = dict(SEARCH_CONFIGS[name])
            method = str(preset.pop("method"))
            out.append(QuantConfig(name=name, method=method, reduce_range=spec.reduce_range,
                                   **preset, **(calib if method == "static" else {})))  # type: ignore[arg-type]
        return out
    if spec.mode == "dynamic":
        return [QuantConfig(
            name=config_name("dynamic", None, None, spec.weight_type, spec.per_channel, None), method="dynamic",
            weight_type=spec.weight_type, per_channel=spec.per_channel, reduce_range=spec.reduce_range,
            weight_symmetric=spec.weight_symmetric,
        )]
    return [QuantConfig(
        name=config_name("static", spec.quant_format, spec.activation_type, spec.weight_type, spec.per_channel,
                         spec.activation_symmetric),
        method="static", quant_format=spec.quant_format, activation_type=spec.activation_type,
        weight_type=spec.weight_type, per_channel=spec.per_channel, reduce_range=spec.reduce_range,
        weight_symmetric=spec.weight_symmetric, activation_symmetric=spec.activation_symmetric, **calib,
    )]


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """ORT's quantization tools print progress to stdout, whose last line is the step's result."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:1500] if text else ''}"


def preprocess(src: Path, out_dir: Path, optimize: bool, log: Any) -> tuple[Path, dict[str, Any]]:
    """ORT's quant_pre_process; falls back to ONNX shape inference when symbolic inference fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "model.onnx"
    started = time.monotonic()
    errors = []
    for symbolic in (True, False):
        try:
            with _stdout_to_stderr():
                quant_pre_process(
                    str(src), str(out), skip_optimization=not optimize, skip_symbolic_shape=not symbolic,
                    save_as_external_data=True, all_tensors_to_one_file=True, external_data_location="model.onnx.data",
                )
            info = {"applied": True, "symbolic_shape_inference": symbolic, "optimized": optimize,
                    "seconds": round(time.monotonic() - started, 3)}
            if errors:
                info["symbolic_shape_inference_error"] = errors[0]
            return out, info
        except Exception as exc:  # noqa: BLE001 - retried without symbolic inference, then reported
            errors.append(_first_line(exc))
            log.warning("quant_pre_process (symbolic shape inference %s) failed: %s", symbolic, errors[-1])
            for p in out_dir.iterdir():
                p.unlink()
    raise ConversionFailed(
        "ONNX Runtime's quantization pre-processing (quant_pre_process) failed: with symbolic shape inference: "
        f"{errors[0]}; without: {errors[1]}. Set preprocess=false to quantize the model as it is"
    )


def name_nodes(src: OnnxModel, out_dir: Path) -> Path:
    """A copy of the model where every node has a unique name (ORT excludes nodes by name)."""
    import onnx

    model = onnx.load(str(src.path))
    taken = {n.name for n in model.graph.node if n.name}
    counts: collections.Counter[str] = collections.Counter()
    for node in model.graph.node:
        if not node.name:
            while True:
                counts[node.op_type] += 1
                candidate = f"{node.op_type}_{counts[node.op_type]}"
                if candidate not in taken:
                    break
            node.name = candidate
            taken.add(candidate)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "model.onnx"
    onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    return out


def resolve_exclusions(spec: OnnxQuantizeSpec, source: OnnxModel, working: OnnxModel) -> dict[str, str]:
    """{node name in the working model: why it stays fp32}; unknown names and op types are input errors."""
    excluded: dict[str, str] = {}
    source_names = set(source.node_names)
    working_names = set(working.node_names)
    for name in spec.nodes_to_exclude:
        if name not in source_names and name not in working_names:
            close = difflib.get_close_matches(name, sorted(source_names | working_names), n=3)
            hint = f"; did you mean {close}?" if close else f"; the model's nodes include {sorted(source_names)[:10]}"
            raise InputError(f"nodes_to_exclude: the model has no node named {name!r}{hint}")
        if name not in working_names:
            raise InputError(
                f"nodes_to_exclude: node {name!r} was merged away by ORT's pre-processing optimization; set "
                "preprocess_optimize=false to keep it, or exclude the node that replaced it"
            )
        excluded[name] = "nodes_to_exclude"
    if spec.op_types_to_exclude:
        import onnx

        model = onnx.load(str(working.path), load_external_data=False)
        present = {n.op_type for n in model.graph.node}
        unknown = [t for t in spec.op_types_to_exclude if t not in present and t not in source.op_histogram]
        if unknown:
            raise InputError(
                f"op_types_to_exclude: the model has no {unknown} nodes; its op types are {sorted(source.op_histogram)}"
            )
        fused = [t for t in spec.op_types_to_exclude if t not in present]
        if fused:
            raise InputError(
                f"op_types_to_exclude: ORT's pre-processing optimization fused every {fused} node into other ops "
                f"(now {sorted(present)}); set preprocess_optimize=false to keep them, or exclude the fused op type"
            )
        for node in model.graph.node:
            if node.op_type in spec.op_types_to_exclude:
                excluded.setdefault(node.name, f"op_types_to_exclude ({node.op_type})")
    return excluded


_QUANT_TYPES = {"uint8": "QUInt8", "int8": "QInt8"}


def quantize(config: QuantConfig, model_path: Path, out_dir: Path, calibration: Dataset | None, batch: int,
             exclude: list[str], cache_dir: Path) -> Path:
    """One configuration; ConversionFailed names the configuration and ORT's reason."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "model.onnx"
    extra: dict[str, Any] = {}
    if config.weight_symmetric is not None:
        extra["WeightSymmetric"] = config.weight_symmetric
    try:
        with _stdout_to_stderr():
            if config.method == "dynamic":
                quantize_dynamic(
                    str(model_path), str(out), per_channel=config.per_channel, reduce_range=config.reduce_range,
                    weight_type=getattr(QuantType, _QUANT_TYPES[config.weight_type]),
                    nodes_to_exclude=list(exclude), use_external_data_format=True, extra_options=extra,
                )
            else:
                assert calibration is not None and config.calibration_method is not None
                reader = CalibrationReader(calibration.features, batch)
                extra["ActivationSymmetric"] = bool(config.activation_symmetric)
                if reader.stride():
                    extra["CalibStridedMinMax"] = reader.stride()
                if config.calibration_percentile is not None:
                    extra["CalibPercentile"] = config.calibration_percentile
                quantize_static(
                    str(model_path), str(out), reader,
                    quant_format=getattr(QuantFormat, config.quant_format or "QDQ"),
                    activation_type=getattr(QuantType, _QUANT_TYPES[config.activation_type or "uint8"]),
                    weight_type=getattr(QuantType, _QUANT_TYPES[config.weight_type]),
                    per_channel=config.per_channel, reduce_range=config.reduce_range,
                    nodes_to_exclude=list(exclude), use_external_data_format=True,
                    calibrate_method=getattr(CalibrationMethod, config.calibration_method),
                    calibration_cache_path=str(cache_dir / f"calibration_{config.calibration_method}.json"),
                    extra_options=extra,
                )
    except Exception as exc:  # noqa: BLE001 - ORT's own message names the op or tensor
        call = "quantize_dynamic" if config.method == "dynamic" else "quantize_static"
        raise ConversionFailed(f"ONNX Runtime {call} failed for configuration {config.name!r}: {_first_line(exc)}") from None
    return out


def node_stats(path: Path) -> dict[str, Any]:
    """Quantized nodes by op type (QOperator/dynamic kernels, Q/DQ nodes, float ops in QDQ form)
    and the weight-carrying float ops left in fp32.

    A float op is in QDQ form when every input it computes on comes from a DequantizeLinear
    (non-float initializers such as shapes do not count); one with a float initializer input
    (an fp32 weight) or an input straight from a float op stays fp32."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    producer = {o: n for n in model.graph.node for o in n.output}
    init_types = {i.name: i.data_type for i in model.graph.initializer}
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                   onnx.TensorProto.BFLOAT16}
    quantized: collections.Counter[str] = collections.Counter()
    qdq: collections.Counter[str] = collections.Counter()
    fp32: list[dict[str, str]] = []

    def from_dq(name: str) -> bool:
        if name in init_types:
            return init_types[name] not in float_types
        node = producer.get(name)
        return node is not None and node.op_type in ("DequantizeLinear", "Constant")

    for node in model.graph.node:
        if is_quant_op(node.op_type):
            quantized[node.op_type] += 1
            continue
        inputs = [i for i in node.input if i]
        if inputs and all(from_dq(i) for i in inputs) and any(
                producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in inputs):
            qdq[node.op_type] += 1
        elif node.op_type in HEAVY_OPS:
            fp32.append({"name": node.name, "op_type": node.op_type})
    plumbing = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
    compute = sum(v for k, v in quantized.items() if k not in plumbing)
    return {
        "quantized_nodes": dict(sorted(quantized.items())),
        "qdq_nodes": dict(sorted(qdq.items())),
        "quantized_compute_nodes": compute + sum(qdq.values()),
        "fp32_nodes": fp32,
        "node_count": len(model.graph.node),
    }


# -- measurement ------------------------------------------------------------------------------


def make_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_all(session: Any, data: Dataset, batch: int, pad: bool) -> list[np.ndarray]:
    chunks: list[list[np.ndarray]] = []
    for feed, valid in iter_batches(data.features, batch, pad):
        outs = session.run(None, feed)
        chunks.append([o[:valid] for o in outs])
    return [np.concatenate([c[i] for c in chunks]) for i in range(len(chunks[0]))]


def is_class_output(out: np.ndarray) -> bool:
    return out.ndim >= 2 and out.shape[-1] >= 2 and out.dtype.kind == "f"


def agreement(ref: list[np.ndarray], got: list[np.ndarray], labels: np.ndarray | None) -> dict[str, float]:
    result: dict[str, float] = {}
    worst = 0.0
    for r, g in zip(ref, got):
        if r.dtype.kind == "f" and r.size:
            worst = max(worst, float(np.max(np.abs(r.astype(np.float64) - g.astype(np.float64)))))
    result["max_abs_error"] = worst
    if is_class_output(ref[0]):
        pred_ref, pred = ref[0].argmax(-1).reshape(-1), got[0].argmax(-1).reshape(-1)
        result["top1_agreement"] = float(np.mean(pred_ref == pred))
        if labels is not None and labels.ndim == 1 and pred.shape == labels.shape:
            result["accuracy"] = float(np.mean(pred == labels))
            result["fp32_accuracy"] = float(np.mean(pred_ref == labels))
            result["accuracy_drop"] = result["fp32_accuracy"] - result["accuracy"]
    return result


def measure_latency(sessions: dict[str, Any], feed: dict[str, np.ndarray], warmup: int, runs: int,
                    rounds: int = 6) -> dict[str, dict[str, float]]:
    """Median/p90/mean/min ms per model. Models take turns in rounds, each round opening with one
    untimed run, so load from other processes and thread-pool spin-down hit every model alike."""
    for session in sessions.values():
        for _ in range(warmup):
            session.run(None, feed)
    rounds = max(1, min(rounds, runs // 5))
    per_round = [runs // rounds + (1 if r < runs % rounds else 0) for r in range(rounds)]
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for count in per_round:
        for name, session in sessions.items():
            session.run(None, feed)
            for _ in range(count):
                t0 = time.perf_counter()
                session.run(None, feed)
                times[name].append((time.perf_counter() - t0) * 1000.0)
    out = {}
    for name, ts in times.items():
        ts.sort()
        out[name] = {"p50_ms": statistics.median(ts), "p90_ms": ts[min(len(ts) - 1, int(0.9 * len(ts)))],
                     "mean_ms": statistics.fmean(ts), "min_ms": ts[0], "runs": float(len(ts))}
    return out


# -- gates and the search record --------------------------------------------------------------


@dataclass
class Gates:
    min_top1_agreement: float | None = None
    max_accuracy_drop: float | None = None
    max_abs_error: float | None = None

    def active(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def check(self, measured: dict[str, float]) -> list[str]:
        reasons = []
        if self.min_top1_agreement is not None and measured.get("top1_agreement", 0.0) < self.min_top1_agreement:
            reasons.append(f"top-1 agreement {measured.get('top1_agreement', 0.0):.4f} < min_top1_agreement "
                           f"{self.min_top1_agreement}")
        if self.max_accuracy_drop is not None and measured.get("accuracy_drop", 1.0) > self.max_accuracy_drop + 1e-12:
            reasons.append(f"accuracy drop {measured.get('accuracy_drop', 1.0):.4f} > max_accuracy_drop "
                           f"{self.max_accuracy_drop}")
        if self.max_abs_error is not None and measured.get("max_abs_error", float("inf")) > self.max_abs_error:
            reasons.append(f"max abs error {measured.get('max_abs_error', float('inf')):.4g} > max_abs_error "
                           f"{self.max_abs_error}")
        return reasons


def resolve_gates(spec: OnnxQuantizeSpec, eval_data: Dataset | None, ref: list[np.ndarray] | None) -> Gates:
    gates = Gates(spec.min_top1_agreement, spec.max_accuracy_drop, spec.max_abs_error)
    if eval_data is None or ref is None:
        return gates
    class_like = is_class_output(ref[0])
    has_labels = eval_data.labels is not None and eval_data.labels.ndim == 1
    if gates.min_top1_agreement is not None and not class_like:
        raise InputError(
            f"min_top1_agreement: the model's first output has shape {list(ref[0].shape)} ({ref[0].dtype}), not class "
            "scores, so top-1 agreement is undefined; gate on max_abs_error instead"
        )
    if gates.max_accuracy_drop is not None and not (has_labels and class_like):
        why = "has no 1-D labels 'y'" if not has_labels else "the model's first output is not class scores"
        raise InputError(f"max_accuracy_drop: needs labels to compute accuracy, but {eval_data.field} {why}")
    if spec.mode == "search" and not gates.active():
        if has_labels and class_like:
            gates.max_accuracy_drop = DEFAULT_MAX_ACCURACY_DROP
        elif class_like:
            gates.min_top1_agreement = DEFAULT_MIN_TOP1_AGREEMENT
        else:
            raise InputError(
                f"max_abs_error: search mode needs an accuracy gate; the model's first output has shape "
                f"{list(ref[0].shape)}, not class scores, so set max_abs_error"
            )
    return gates


@dataclass
class Trial:
    config: QuantConfig
    path: Path | None = None
    error: str | None = None
    bytes: int = 0
    quantize_s: float = 0.0
    measured: dict[str, float] = field(default_factory=dict)
    latency: dict[str, float] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.error is None and not self.reasons

    def record(self) -> dict[str, Any]:
        return {
            "config": self.config.name, "settings": self.config.as_dict(), "passed": self.passed,
            "error": self.error, "gate_failures": self.reasons, "bytes": self.bytes,
            "quantize_s": round(self.quantize_s, 3), "latency_ms": self.latency.get("ms"),
            "latency": self.latency, **self.measured,
        }


def search_table(trials: list[Trial], fp32_latency: dict[str, float] | None, chosen: str | None,
                 source_bytes: int, threads: int, batch: int, statistic: str) -> str:
    lines = [
        f"Latency of timed runs after warm-up, ONNX Runtime CPU, {threads} intra-op thread(s), batch {batch}; "
        f"configurations are compared by their {statistic} latency.", "",
        f"| configuration | chosen | passed | p50 ms | min ms | vs fp32 ({statistic}) | top-1 agreement | accuracy drop "
        "| max abs error | bytes | ratio | note |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]

    def num(v: float | None, fmt: str) -> str:
        return "" if v is None else format(v, fmt)

    base = fp32_latency.get("ms") if fp32_latency else None
    if fp32_latency:
        lines.append(f"| fp32 (source) | | | {num(fp32_latency.get('p50_ms'), '.4g')} | "
                     f"{num(fp32_latency.get('min_ms'), '.4g')} | 1.00x | 1.0000 | 0 | 0 | {source_bytes} | 1.00 | |")
    for t in trials:
        used = t.latency.get("ms")
        vs = f"{used / base:.2f}x" if used and base else ""
        note = t.error or "; ".join(t.reasons)
        lines.append(
            f"| {t.config.name} | {'yes' if t.config.name == chosen else ''} | {'yes' if t.passed else 'no'} | "
            f"{num(t.latency.get('p50_ms'), '.4g')} | {num(t.latency.get('min_ms'), '.4g')} | {vs} | "
            f"{num(t.measured.get('top1_agreement'), '.4f')} | "
            f"{num(t.measured.get('accuracy_drop'), '.4f')} | {num(t.measured.get('max_abs_error'), '.4g')} | "
            f"{t.bytes or ''} | {num(t.bytes / source_bytes if t.bytes else None, '.2f')} | {note.replace('|', '/')} |"
        )
    return "\n".join(lines) + "\n"


def _search_metrics(trials: list[Trial]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for t in trials:
        prefix = f"search.{t.config.name}"
        metrics[f"{prefix}.passed"] = 1.0 if t.passed else 0.0
        if t.error:
            continue
        metrics[f"{prefix}.bytes"] = float(t.bytes)
        if "ms" in t.latency:
            metrics[f"{prefix}.latency_ms"] = t.latency["ms"]
        for key in ("top1_agreement", "max_abs_error", "accuracy", "accuracy_drop"):
            if key in t.measured:
                metrics[f"{prefix}.{key}"] = t.measured[key]
    return metrics


# -- the step ---------------------------------------------------------------------------------


@dataclass
class Inputs:
    """The checked source model and data, the fp32 reference and the gates, before any work."""

    source: OnnxModel
    calibration: Dataset | None
    eval_data: Dataset | None
    fixed_batch: int | None
    latency_batch: int
    fp32_session: Any = None
    reference: list[np.ndarray] | None = None
    gates: Gates = field(default_factory=Gates)

    @property
    def eval_batch(self) -> int:
        return self.fixed_batch or EVAL_BATCH


def check_inputs(spec: OnnxQuantizeSpec, ctx: StepContext) -> Inputs:
    """Everything that can be wrong with the inputs fails here, before pre-processing starts."""
    model_dir = ctx.input("model_uri")
    assert model_dir is not None
    source = inspect_model(locate_model(model_dir, spec.model_uri), "model_uri", spec.model_uri)
    already = sorted(op for op in source.op_histogram if is_quant_op(op))
    if already:
        raise InputError(f"model_uri: {spec.model_uri} is already quantized (it has {already} nodes); give the fp32 model")
    ctx.log.info("Source model %s: inputs %s, %d nodes, %d bytes", source.path.name,
                 [f"{i.name}{i.shape_text()}" for i in source.inputs], len(source.node_names), source.bytes)
    cal_path, eval_path = ctx.input("calibration_data_uri"), ctx.input("eval_data_uri")
    calibration = (load_dataset(cal_path, "calibration_data_uri", source.inputs, spec.calibration_samples)
                   if cal_path is not None else None)
    eval_data = load_dataset(eval_path, "eval_data_uri", source.inputs) if eval_path is not None else calibration
    fixed = fixed_batch(source.inputs)
    if fixed is not None and spec.latency_batch_size not in (1, fixed):
        raise InputError(f"latency_batch_size: the model fixes the batch dimension to {fixed}; "
                         f"got {spec.latency_batch_size}")
    inputs = Inputs(source, calibration, eval_data, fixed, fixed or spec.latency_batch_size)
    inputs.gates = Gates(spec.min_top1_agreement, spec.max_accuracy_drop, spec.max_abs_error)
    if eval_data is not None:
        if eval_path is None:
            ctx.log.warning("No eval_data_uri: agreement with fp32 is measured on the calibration data (optimistic)")
        inputs.fp32_session = make_session(source.path, spec.intra_op_threads)
        try:
            inputs.reference = run_all(inputs.fp32_session, eval_data, inputs.eval_batch, pad=fixed is not None)
        except Exception as exc:  # noqa: BLE001 - the fp32 model itself does not take this data
            raise InputError(f"{eval_data.field}: the fp32 model does not run on this data: {_first_line(exc)}") from None
        inputs.gates = resolve_gates(spec, eval_data, inputs.reference)
    return inputs


def prepare_model(spec: OnnxQuantizeSpec, ctx: StepContext, source: OnnxModel) -> tuple[OnnxModel, dict[str, Any],
                                                                                         dict[str, str]]:
    """(model to quantize, pre-processing record, {node kept fp32: why})."""
    working, record = source, {"applied": False}
    if spec.preprocess:
        ctx.log.info("ORT quantization pre-processing (symbolic shape inference; optimization %s)",
                     spec.preprocess_optimize)
        path, record = preprocess(source.path, ctx.workdir / "preprocessed", spec.preprocess_optimize, ctx.log)
        working = inspect_model(path, "model_uri", spec.model_uri)
    if working.unnamed_nodes:
        ctx.log.info("Naming %d unnamed nodes (ORT excludes nodes by name)", working.unnamed_nodes)
        working = inspect_model(name_nodes(working, ctx.workdir / "named"), "model_uri", spec.model_uri)
    excluded = resolve_exclusions(spec, source, working)
    if excluded:
        ctx.log.info("Keeping %d node(s) in fp32: %s", len(excluded), sorted(excluded))
    return working, record, excluded


def build_all(spec: OnnxQuantizeSpec, ctx: StepContext, working: OnnxModel, inputs: Inputs,
              excluded: dict[str, str]) -> list[Trial]:
    """Quantize every configuration; in search mode a failed one is recorded, not fatal."""
    trials = []
    cache_dir = ctx.workdir / "calibration"  # ORT's calibration cache: one calibration per method
    cache_dir.mkdir(exist_ok=True)
    for config in configs_for(spec):
        trial = Trial(config)
        started = time.monotonic()
        ctx.log.info("Quantizing: %s", config.as_dict())
        try:
            trial.path = quantize(config, working.path, ctx.workdir / "quantized" / config.name, inputs.calibration,
                                  inputs.fixed_batch or 1, sorted(excluded), cache_dir)
            trial.bytes = inspect_model(trial.path, "model_uri", spec.model_uri).bytes
        except ConversionFailed as exc:
            if spec.mode != "search":
                raise
            trial.error = str(exc)
            ctx.log.warning("%s", exc)
        trial.quantize_s = time.monotonic() - started
        trials.append(trial)
    if not any(t.path is not None for t in trials):
        raise ConversionFailed("no search configuration could be quantized: " + "; ".join(t.error or "" for t in trials))
    return trials


def measure_all(spec: OnnxQuantizeSpec, ctx: StepContext, inputs: Inputs, trials: list[Trial]) -> dict[str, float] | None:
    """Agreement and gates per trial, then latency of fp32 and every trial; returns fp32's latency."""
    if inputs.eval_data is None or inputs.reference is None:
        ctx.log.warning("No calibration_data_uri or eval_data_uri: latency and agreement with fp32 are not measured")
        return None
    sessions = {"fp32": inputs.fp32_session}
    for trial in trials:
        if trial.path is None:
            continue
        try:
            session = make_session(trial.path, spec.intra_op_threads)
            got = run_all(session, inputs.eval_data, inputs.eval_batch, pad=inputs.fixed_batch is not None)
        except Exception as exc:  # noqa: BLE001 - a model ORT cannot run is a failed configuration
            if spec.mode != "search":
                raise ConversionFailed(f"ONNX Runtime cannot run the quantized model {trial.config.name!r}: "
                                       f"{_first_line(exc)}") from None
            trial.error = f"ONNX Runtime cannot run it: {_first_line(exc)}"
            continue
        sessions[trial.config.name] = session
        trial.measured = agreement(inputs.reference, got, inputs.eval_data.labels)
        trial.reasons = inputs.gates.check(trial.measured)
    shapes_from = inputs.calibration or inputs.eval_data
    feed = {k: np.ascontiguousarray(np.resize(v, (inputs.latency_batch, *v.shape[1:])))
            for k, v in shapes_from.features.items()}
    ctx.log.info("Measuring latency of %d model(s): batch %d, %d thread(s), %d warm-up + %d timed runs each",
                 len(sessions), inputs.latency_batch, spec.intra_op_threads, spec.warmup_runs, spec.timed_runs)
    latencies = measure_latency(sessions, feed, spec.warmup_runs, spec.timed_runs)
    for timings in latencies.values():
        timings["ms"] = timings["min_ms" if spec.latency_statistic == "min" else "p50_ms"]
    for trial in trials:
        trial.latency = latencies.get(trial.config.name, {})
    for t in trials:
        ctx.log.info("%-32s %s", t.config.name, t.error or (
            f"latency {t.latency.get('ms', float('nan')):.4g} ms, "
            + ", ".join(f"{k} {v:.4g}" for k, v in t.measured.items())
            + (f"; FAILS: {'; '.join(t.reasons)}" if t.reasons else "")))
    return latencies["fp32"]


def choose(spec: OnnxQuantizeSpec, trials: list[Trial]) -> Trial | None:
    passing = [t for t in trials if t.passed and t.path is not None]
    if spec.mode == "search":
        return min(passing, key=lambda t: t.latency.get("ms", float("inf"))) if passing else None
    return passing[0] if passing else None


def log_search(spec: OnnxQuantizeSpec, ctx: StepContext, inputs: Inputs, trials: list[Trial],
               fp32_latency: dict[str, float] | None, chosen: Trial | None) -> dict[str, str]:
    record = {
        "fp32": {"latency": fp32_latency, "bytes": inputs.source.bytes}, "gates": inputs.gates.active(),
        "chosen": chosen.config.name if chosen else None,
        "latency_settings": {"intra_op_threads": spec.intra_op_threads, "batch_size": inputs.latency_batch,
                             "warmup_runs": spec.warmup_runs, "timed_runs": spec.timed_runs,
                             "statistic": spec.latency_statistic},
        "evaluated_on": inputs.eval_data.field if inputs.eval_data else None,
        "configurations": [t.record() for t in trials],
    }
    artifacts = {"search_results": ctx.log_dict(record, "search/search_results.json")}
    table = ctx.workdir / "search_results.md"
    table.write_text(search_table(trials, fp32_latency, record["chosen"], inputs.source.bytes, spec.intra_op_threads,
                                  inputs.latency_batch, spec.latency_statistic))
    artifacts["search_table"] = ctx.log_artifact(table, "search")
    return artifacts


def result_metrics(inputs: Inputs, chosen: Trial, stats: dict[str, Any], fp32_latency: dict[str, float] | None,
                   preprocess_info: dict[str, Any]) -> dict[str, float]:
    source = inputs.source
    metrics: dict[str, float] = {
        "source_bytes": float(source.bytes),
        "quantized_bytes": float(chosen.bytes),
        "size_ratio": chosen.bytes / source.bytes,
        "quantized_compute_nodes": float(stats["quantized_compute_nodes"]),
        "fp32_compute_nodes": float(len(stats["fp32_nodes"])),
        "quantize_time_s": chosen.quantize_s,
    }
    metrics.update({f"quantized_nodes.{op}": float(n) for op, n in stats["quantized_nodes"].items()})
    metrics.update({f"quantized_nodes.qdq.{op}": float(n) for op, n in stats["qdq_nodes"].items()})
    if fp32_latency and chosen.latency:
        metrics["fp32_latency_ms"] = fp32_latency["ms"]
        metrics["int8_latency_ms"] = chosen.latency["ms"]
        metrics["latency_ratio"] = chosen.latency["ms"] / fp32_latency["ms"]
        metrics["speedup"] = fp32_latency["ms"] / chosen.latency["ms"]
    for key in ("top1_agreement", "max_abs_error", "accuracy", "accuracy_drop", "fp32_accuracy"):
        if key in chosen.measured:
            metrics["int8_accuracy" if key == "accuracy" else key] = chosen.measured[key]
    if inputs.eval_data is not None:
        metrics["eval_samples"] = float(inputs.eval_data.samples)
    if preprocess_info.get("seconds") is not None:
        metrics["preprocess_time_s"] = preprocess_info["seconds"]
    return metrics


def run(spec: OnnxQuantizeSpec, ctx: StepContext) -> StepOutput:
    import mlflow
    import onnx

    inputs = check_inputs(spec, ctx)
    working, preprocess_info, excluded = prepare_model(spec, ctx, inputs.source)
    trials = build_all(spec, ctx, working, inputs, excluded)
    fp32_latency = measure_all(spec, ctx, inputs, trials)
    chosen = choose(spec, trials)

    search_artifacts = log_search(spec, ctx, inputs, trials, fp32_latency, chosen) if spec.mode == "search" else {}
    if chosen is None:
        if spec.mode == "search":  # the record of every configuration stays on the failed run
            ctx.client.log_batch(ctx.run_id, metrics=_metric_entities(_search_metrics(trials)))
            failures = "; ".join(f"{t.config.name}: {t.error or '; '.join(t.reasons)}" for t in trials)
            raise GateFailed(f"no search configuration passed the accuracy gate {inputs.gates.active()}: {failures} "
                             f"(table: {search_artifacts['search_table']})")
        raise GateFailed(f"configuration {trials[0].config.name!r} failed its gate: {'; '.join(trials[0].reasons)}")
    assert chosen.path is not None
    if fp32_latency and chosen.latency:
        slower = chosen.latency["ms"] >= fp32_latency["ms"]
        if slower:
            ctx.log.warning("The int8 model (%s) is not faster than fp32 on this CPU: %.4g ms vs %.4g ms%s",
                            chosen.config.name, chosen.latency["ms"], fp32_latency["ms"],
                            "" if spec.mode == "search" else "; mode 'search' tries other configurations")
        if spec.require_speedup and slower:
            raise GateFailed(
                f"require_speedup: the chosen int8 model {chosen.config.name!r} takes {chosen.latency['ms']:.4g} ms, "
                f"fp32 {fp32_latency['ms']:.4g} ms ({spec.intra_op_threads} thread(s), batch {inputs.latency_batch})"
            )

    stats = node_stats(chosen.path)
    metrics = result_metrics(inputs, chosen, stats, fp32_latency, preprocess_info)
    if spec.mode == "search":
        metrics.update(_search_metrics(trials))
    quantized = inspect_model(chosen.path, "model_uri", spec.model_uri)
    signature = {"inputs": [asdict(i) for i in quantized.inputs], "outputs": [asdict(o) for o in quantized.outputs]}
    calibration = None
    if inputs.calibration is not None and chosen.config.method == "static":
        calibration = {"method": spec.calibration_method, "samples": inputs.calibration.samples,
                       "batch_size": inputs.fixed_batch or 1}
    info: dict[str, Any] = {
        "mode": spec.mode, "chosen_config": chosen.config.name, "config": chosen.config.as_dict(),
        "quantized_nodes": stats["quantized_nodes"], "qdq_nodes": stats["qdq_nodes"],
        "fp32_nodes": stats["fp32_nodes"], "excluded_nodes": excluded, "preprocess": preprocess_info,
        "gates": inputs.gates.active(), "signature": signature, "source_model_uri": spec.model_uri,
        "calibration": calibration,
        "evaluated_on": inputs.eval_data.field if inputs.eval_data is not None else None,
        "latency_settings": {"intra_op_threads": spec.intra_op_threads, "batch_size": inputs.latency_batch,
                             "warmup_runs": spec.warmup_runs, "timed_runs": spec.timed_runs,
                             "statistic": spec.latency_statistic},
    }
    if spec.mode == "search":
        info["search"] = [{"config": t.config.name, "passed": t.passed, "latency_ms": t.latency.get("ms"),
                           **{k: t.measured[k] for k in ("top1_agreement", "accuracy_drop") if k in t.measured},
                           **({"error": t.error} if t.error else {})} for t in trials]
    report = {**info, "source": {"bytes": inputs.source.bytes, "files": inputs.source.files,
                                 "op_histogram": inputs.source.op_histogram},
              "quantized": {"bytes": chosen.bytes, "files": quantized.files, "op_histogram": quantized.op_histogram,
                            "node_count": stats["node_count"]},
              "metrics": metrics}
    report_uri = ctx.log_dict(report, "onnx_quantize_report.json")
    ctx.client.set_tag(ctx.run_id, TAG_CONFIG, chosen.config.name)
    ctx.client.set_tag(ctx.run_id, TAG_MODE, spec.mode)
    proto = onnx.load(str(chosen.path))  # with its external data, for the flavor to save as a folder
    model_info = mlflow.onnx.log_model(
        proto, name="onnx_model", save_as_external_data=True, onnx_execution_providers=["CPUExecutionProvider"],
        metadata={"modelopt_quantization": {"mode": spec.mode, **chosen.config.as_dict()},
                  "modelopt_source_model_uri": spec.model_uri},
    )
    ctx.log.info("Logged %s (%d bytes, %.2fx the source) as %s", chosen.config.name, chosen.bytes,
                 chosen.bytes / inputs.source.bytes, model_info.model_uri)
    return StepOutput(
        artifacts={"onnx_model": model_info.model_uri, "report": report_uri, **search_artifacts},
        metrics=metrics, info=info,
    )


def _metric_entities(metrics: dict[str, float]) -> list[Any]:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, 0) for k, v in metrics.items()]


__all__ = ["CalibrationReader", "check_inputs", "load_dataset", "locate_model", "node_stats", "run"]
