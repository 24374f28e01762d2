"""tflite_quantize, TensorFlow and ONNX paths.

- TensorFlow: a SavedModel (its ``serving_default`` signature) or a Keras model (exported to a
  SavedModel first) goes through ``tf.lite.TFLiteConverter``.
- ONNX: onnx2tf turns the graph into a SavedModel, converting channel-first inputs to channel-last
  (NCHW -> NHWC) unless ``keep_nchw``; the SavedModel then takes the TensorFlow path. onnx2tf is
  never allowed to download its sample images: its test-data hook is replaced by ours. The ONNX
  source runs (agreement check) through the runtimes layer (``OnnxRuntime``).

Quantization is TFLiteConverter's own: fp16 weights, dynamic range, or full integer with the
representative dataset drawn from the calibration data (transposed to the TFLite layout).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from airflow_modelopt.container.steps.tflite_quantize.common import (
    Conversion,
    SourceModel,
    TensorIO,
    batches,
    captured_stdout,
    clean,
    layout_for,
    to_tflite_layout,
)
from airflow_modelopt.exceptions import ConversionFailed, InputError
from airflow_modelopt.specs.tflite_quantize import TFLiteQuantizeSpec

log = logging.getLogger("airflow_modelopt.container.steps.tflite_quantize")

SIGNATURE_KEY = "serving_default"


def _quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# -- TFLiteConverter on a SavedModel ----------------------------------------------------------


class SavedModelConverter:
    """Everything the TensorFlow and ONNX paths share once a SavedModel exists."""

    def __init__(self, spec: TFLiteQuantizeSpec, saved_model: Path) -> None:
        _quiet_tensorflow()
        import tensorflow as tf

        self.spec = spec
        self.dir = saved_model
        try:
            self.loaded = tf.saved_model.load(str(saved_model))
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"model_uri: the SavedModel does not load: {type(exc).__name__}: {str(exc)[:500]}") from None
        signatures = dict(self.loaded.signatures)
        if not signatures:
            raise InputError("model_uri: the SavedModel has no signatures; export it with a serving_default signature")
        self.key = SIGNATURE_KEY if SIGNATURE_KEY in signatures else sorted(signatures)[0]
        self.fn = signatures[self.key]
        _, kwargs = self.fn.structured_input_signature
        self.input_specs = dict(kwargs)
        self.output_specs = dict(self.fn.structured_outputs)

    def inputs(self) -> list[TensorIO]:
        return [
            TensorIO(name=name, shape=[d for d in s.shape.as_list()], dtype=s.dtype.as_numpy_dtype.__name__)
            for name, s in self.input_specs.items()
        ]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tensorflow as tf

        out = self.fn(**{k: tf.constant(v) for k, v in feeds.items()})
        return {k: v.numpy() for k, v in out.items()}

    def _converter(self) -> Any:
        import tensorflow as tf

        if self.spec.batch_size is None:
            return tf.lite.TFLiteConverter.from_saved_model(str(self.dir), signature_keys=[self.key])
        fixed = {
            name: tf.TensorSpec([self.spec.batch_size, *s.shape.as_list()[1:]], s.dtype, name=name)
            for name, s in self.input_specs.items()
        }
        fn = self.fn
        concrete = tf.function(lambda **kw: fn(**kw)).get_concrete_function(**fixed)
        return tf.lite.TFLiteConverter.from_concrete_functions([concrete], self.loaded)

    def convert(self, calibration: dict[str, np.ndarray] | None, inputs: list[TensorIO], *, what: str) -> tuple[bytes, float]:
        """(flatbuffer, seconds); ``calibration`` is in the source layout, keyed like ``inputs``."""
        import tensorflow as tf

        spec = self.spec
        converter = self._converter()
        ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if spec.mode == "fp16":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_types = [tf.float16]
        elif spec.mode == "dynamic_int8":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        elif spec.mode == "int8":
            assert calibration is not None  # the spec refuses int8 without calibration data
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            by_name = {i.name: i for i in inputs}
            batch = spec.batch_size or 1

            def representative() -> Any:
                for part in batches(calibration, batch, spec.calibration_samples):
                    yield {k: to_tflite_layout(v, by_name[k]) for k, v in part.items()}

            converter.representative_dataset = representative
            types = {"int8": tf.int8, "uint8": tf.uint8, "float32": tf.float32}
            converter.inference_input_type = types[spec.interface_type]
            converter.inference_output_type = types[spec.interface_type]
            if not spec.per_channel:
                converter._experimental_disable_per_channel = True
        if spec.allow_select_tf_ops:
            ops.append(tf.lite.OpsSet.SELECT_TF_OPS)
        converter.target_spec.supported_ops = ops
        started = time.monotonic()
        try:
            with captured_stdout():
                content = converter.convert()
        except Exception as exc:  # noqa: BLE001 - the converter names the ops it cannot map
            raise ConversionFailed(converter_error(exc, spec, what)) from None
        return bytes(content), time.monotonic() - started


_TF_OP = re.compile(r"\b(tf\.[A-Za-z0-9_]+)\(")
_TF_OP_QUOTED = re.compile(r"'(tf\.[A-Za-z0-9_]+)' op")
_OP_LIST = re.compile(r"^\s*(Flex ops|Custom ops|TF Select ops):\s*(.+)$", re.MULTILINE)


def converter_error(exc: BaseException, spec: TFLiteQuantizeSpec, what: str) -> str:
    """TFLiteConverter's message reduced to the ops it refused, then its own first lines."""
    text = clean(str(exc)).strip()
    ops = sorted(set(_TF_OP.findall(text)) | set(_TF_OP_QUOTED.findall(text)))
    lists = {m.group(1): m.group(2).strip() for m in _OP_LIST.finditer(text)}
    head = f"TFLiteConverter ({what}, mode {spec.mode}) could not convert the model"
    if ops:
        head += f": op {', '.join(ops)} " + ("has" if len(ops) == 1 else "have") + " no TFLite builtin"
        if spec.mode == "int8":
            head += " or no int8 kernel"
        select = lists.get("Flex ops") or lists.get("TF Select ops")
        if select and not spec.allow_select_tf_ops:
            head += f" (it can run as a Flex op: {select}; set allow_select_tf_ops=true to allow that)"
        elif "Custom ops" in lists:
            head += f" and no Flex (SELECT_TF_OPS) kernel either (custom ops: {lists['Custom ops']})"
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("Details:"):
            break
        if line and not line.startswith(("^", "%", '"', "<unknown>:0: note", "})", "({")):
            lines.append(line)
    return head + ". Converter said: " + " | ".join(lines[:6])[:2000]


# -- the TensorFlow path ----------------------------------------------------------------------


class TensorFlowPath:
    name = "tflite_converter"

    def __init__(self, source: SourceModel, spec: TFLiteQuantizeSpec, workdir: Path) -> None:
        self.source = source
        self.spec = spec
        self.workdir = workdir
        self.saved: SavedModelConverter | None = None
        self.inputs: list[TensorIO] = []
        self.outputs: list[TensorIO] = []

    def load(self) -> None:
        saved_dir = self.source.path
        if self.source.kind in ("keras", "mlflow_keras"):
            saved_dir = export_keras(self.source.path, self.workdir / "keras_saved_model")
        self.saved = SavedModelConverter(self.spec, saved_dir)
        self.inputs = self.saved.inputs()
        for i in self.inputs:  # TensorFlow's own convention: channel-last, unchanged by conversion
            i.layout = i.tflite_layout = layout_for(len(i.shape), True)
        self.outputs = [
            TensorIO(name=name, shape=s.shape.as_list(), dtype=s.dtype.as_numpy_dtype.__name__,
                     layout=layout_for(len(s.shape), True), tflite_layout=layout_for(len(s.shape), True))
            for name, s in self.saved.output_specs.items()
        ]

    def run_source(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        assert self.saved is not None
        out = self.saved.run(feeds)
        return [out[o.name] for o in self.outputs]

    def convert(self, calibration: dict[str, np.ndarray] | None, workdir: Path) -> Conversion:
        assert self.saved is not None
        content, seconds = self.saved.convert(calibration, self.inputs, what=f"{self.source.kind} signature {self.saved.key!r}")
        return Conversion(content, seconds, quantizer="tflite_converter" if self.spec.mode != "fp32" else "none")


def export_keras(path: Path, out: Path) -> Path:
    """A Keras model file -> SavedModel folder with a serving_default signature."""
    _quiet_tensorflow()
    import keras

    try:
        model = keras.saving.load_model(str(path), compile=False)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"model_uri: {path.name} does not load as a Keras model: {type(exc).__name__}: {str(exc)[:500]}") from None
    with captured_stdout():
        try:
            model.export(str(out), verbose=False)
        except TypeError:  # Keras versions without the verbose argument
            model.export(str(out))
    return out


# -- the ONNX path ----------------------------------------------------------------------------


class OnnxPath:
    name = "onnx2tf"

    def __init__(self, source: SourceModel, spec: TFLiteQuantizeSpec, workdir: Path) -> None:
        self.source = source
        self.spec = spec
        self.workdir = workdir
        self.model: Any = None
        self.runtime: Any = None  # ONNX Runtime through the runtimes layer, made when first needed
        self.saved: SavedModelConverter | None = None
        self.inputs: list[TensorIO] = []
        self.outputs: list[TensorIO] = []
        self._calibration: dict[str, np.ndarray] | None = None
        self._notes: dict[str, Any] = {}  # ops lowered before onnx2tf (``_lower_ops``)

    def load(self) -> None:
        import onnx

        try:
            self.model = onnx.load(str(self.source.path))  # with its external data
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"model_uri: {self.source.path.name} is not a readable ONNX model: {exc}") from None
        initializers = {i.name for i in self.model.graph.initializer}
        for value in self.model.graph.input:
            if value.name in initializers:
                continue
            self.inputs.append(_onnx_io(value))
        self.outputs = [_onnx_io(v) for v in self.model.graph.output]
        for io_ in (*self.inputs, *self.outputs):
            io_.layout = layout_for(len(io_.shape), False)

    def _runtime(self) -> Any:
        if self.runtime is None:
            from airflow_modelopt.container.runtimes import load

            self.runtime = load(self.source.path, "onnx", threads=1, field="model_uri", origin=self.spec.model_uri)
        return self.runtime

    def run_source(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        runtime = self._runtime()
        outs = dict(zip([s.name for s in runtime.outputs], runtime.run_native(feeds)))
        return [outs[o.name] for o in self.outputs]

    def convert(self, calibration: dict[str, np.ndarray] | None, workdir: Path) -> Conversion:
        started = time.monotonic()
        self._calibration = calibration
        saved_dir = self._onnx2tf(workdir)
        onnx2tf_seconds = time.monotonic() - started
        self.saved = SavedModelConverter(self.spec, saved_dir)
        self._match_layouts()
        content, seconds = self.saved.convert(calibration, self.inputs, what="SavedModel from onnx2tf")
        return Conversion(content, onnx2tf_seconds + seconds,
                          quantizer="tflite_converter" if self.spec.mode != "fp32" else "none",
                          notes={"onnx2tf_time_s": round(onnx2tf_seconds, 3),
                                 **({"lowered_ops": dict(self._notes)} if self._notes else {})})

    def _simplified(self) -> Any:
        """onnx-simplifier once, in process (onnx2tf would run its CLI three times)."""
        try:
            import onnxsim

            model, ok = onnxsim.simplify(self.model, check_n=0)
            if ok:
                return model
        except Exception as exc:  # noqa: BLE001 - onnx2tf converts unsimplified graphs too
            log.warning("onnx-simplifier could not simplify the graph (%s); converting it as is",
                        str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__)
        return self.model

    def _onnx2tf(self, workdir: Path) -> Path:
        import onnx

        _quiet_tensorflow()
        try:
            import onnx2tf
            import onnx2tf.onnx2tf as onnx2tf_main
            import onnx2tf.utils.common_functions as onnx2tf_common
        except ImportError as exc:
            raise ConversionFailed(f"the ONNX path needs onnx2tf and its dependencies: {exc}") from None

        src = workdir / "onnx2tf_input" / "model.onnx"
        src.parent.mkdir(parents=True, exist_ok=True)
        model = self._simplified()
        pseudo = self._lower_ops(model)
        onnx.save(model, str(src))  # self-contained copy: onnx2tf rewrites its input
        out = workdir / "onnx2tf_saved_model"
        names = [i.name for i in self.inputs]
        hook = self._test_images
        saved_hooks = (onnx2tf_main.download_test_image_data, onnx2tf_common.download_test_image_data)
        onnx2tf_main.download_test_image_data = hook
        onnx2tf_common.download_test_image_data = hook
        log.info("onnx2tf: converting %s (inputs %s, keep NCHW: %s)", src.name, names, self.spec.keep_nchw)
        buf = None
        try:
            with captured_stdout() as buf:
                onnx2tf.convert(
                    input_onnx_file_path=str(src),
                    output_folder_path=str(out),
                    output_signaturedefs=True,
                    not_use_onnxsim=True,
                    batch_size=self.spec.batch_size,
                    keep_ncw_or_nchw_or_ncdhw_input_names=names if self.spec.keep_nchw else None,
                    replace_to_pseudo_operators=pseudo or None,
                    non_verbose=True,
                )
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - onnx2tf exits on errors
            raise ConversionFailed(self._onnx2tf_error(exc, buf.getvalue() if buf else "")) from None
        finally:
            onnx2tf_main.download_test_image_data, onnx2tf_common.download_test_image_data = saved_hooks
        if not (out / "saved_model.pb").is_file():
            raise ConversionFailed("onnx2tf finished without writing a SavedModel; its log: "
                                   + clean(buf.getvalue() if buf else "")[-1500:])
        shutil.rmtree(src.parent, ignore_errors=True)
        return out

    def _lower_ops(self, model: Any) -> list[str]:
        """Ops with no TFLite builtin lowered to ones that have one (``onnx_rewrite.py``): exact GELU
        subgraphs fused into Gelu (TFLite's GELU), and any other Erf given to onnx2tf to build from
        builtins unless Flex ops are allowed. What was done goes into the conversion's notes;
        returns onnx2tf's ``replace_to_pseudo_operators``."""
        from airflow_modelopt.container.steps.tflite_quantize.onnx_rewrite import fuse_gelu, remaining_erf

        fused = fuse_gelu(model)
        if fused:
            self._notes["gelu_fused"] = fused
            log.info("onnx2tf input: %d exact GELU subgraph(s) (Div, Erf, Add, Mul, Mul) fused into Gelu, "
                     "which TFLite runs as its GELU builtin", fused)
        erf = remaining_erf(model)
        if not erf:
            return []
        if self.spec.allow_select_tf_ops:
            self._notes["erf_kept"] = erf
            log.info("onnx2tf input: %d Erf op(s) kept as tf.Erf (Flex ops allowed)", erf)
            return []
        self._notes["pseudo_ops"] = ["Erf"]
        log.info("onnx2tf input: %d Erf op(s) built from TFLite builtins (onnx2tf replace_to_pseudo_operators=erf; "
                 "Flex ops are not allowed)", erf)
        return ["erf"]

    def _test_images(self) -> np.ndarray:
        """onnx2tf's sample-image hook: our calibration data (NHWC), never a download."""
        if self._calibration is not None and len(self._calibration) == 1:
            a = next(iter(self._calibration.values()))
            if a.ndim == 4:
                return np.ascontiguousarray(a.transpose(0, 2, 3, 1)[:20]).astype(np.float32)
        # No calibration data fits: deterministic data, for onnx2tf's own output check only
        # (quantization never uses it; the spec refuses int8 without calibration data).
        shapes = [i.shape for i in self.inputs]
        h, w = (shapes[0][2] or 224, shapes[0][3] or 224) if shapes and len(shapes[0]) == 4 else (224, 224)
        return np.random.default_rng(0).random((20, h, w, 3), dtype=np.float32)

    def _onnx2tf_error(self, exc: BaseException, log_text: str) -> str:
        text = clean(log_text)
        message = clean(str(exc)).strip()
        missing = re.search(r"No module named 'onnx2tf\.ops\.(\w+)'", message) or re.search(
            r"(\w+) OP is not yet implemented", text)
        if missing:
            op = missing.group(1)
            nodes = [n.name or "(unnamed)" for n in self.model.graph.node if n.op_type == op][:5]
            domains = sorted({n.domain or "ai.onnx" for n in self.model.graph.node if n.op_type == op})
            return (f"onnx2tf cannot convert op {op} (domain {', '.join(domains) or 'ai.onnx'}; nodes {nodes}): "
                    f"onnx2tf has no implementation of it. onnx2tf said: {op} OP is not yet implemented.")
        errors = [ln.strip() for ln in text.splitlines() if "ERROR" in ln or "onnx_op_type" in ln or "onnx_op_name" in ln]
        op_type = re.search(r"onnx_op_type:\s*(\w+)", text)
        op_name = re.search(r"onnx_op_name:\s*(\S+)", text)
        where = f" at op {op_type.group(1)} (node {op_name.group(1) if op_name else '?'})" if op_type else ""
        detail = message if not isinstance(exc, SystemExit) else f"exit status {exc.code}"
        return (f"onnx2tf could not convert the model{where}: {type(exc).__name__}: {detail[:800]}"
                + (f". onnx2tf said: {' | '.join(errors[:8])[:1500]}" if errors else ""))

    def _match_layouts(self) -> None:
        """Which TFLite tensors onnx2tf made channel-last: from the SavedModel's shapes."""
        assert self.saved is not None
        tf_inputs = {i.name: i for i in self.saved.inputs()}
        for io_ in self.inputs:
            tf_io = tf_inputs.get(io_.name) or tf_inputs.get(io_.name.replace(":", "_"))
            io_.channel_last = _is_channel_last(io_.shape, tf_io.shape if tf_io else None,
                                                default=not self.spec.keep_nchw)
            io_.tflite_layout = layout_for(len(io_.shape), io_.channel_last)
        for io_, spec in zip(self.outputs, _ordered_outputs(self.saved.output_specs)):
            # onnx2tf computes channel-last inside and returns rank-3+ outputs that way (keep_nchw
            # concerns inputs only); the static dimensions overrule this where they tell
            io_.channel_last = _is_channel_last(io_.shape, spec.shape.as_list() if spec is not None else None,
                                                default=True)
            io_.tflite_layout = layout_for(len(io_.shape), io_.channel_last)


def _ordered_outputs(specs: dict[str, Any]) -> list[Any]:
    """onnx2tf names SavedModel outputs output_0, output_1, ... in ONNX output order."""
    def key(name: str) -> tuple[int, str]:
        m = re.search(r"(\d+)$", name)
        return (int(m.group(1)) if m else 1 << 30, name)

    return [specs[k] for k in sorted(specs, key=key)]


def _is_channel_last(source: list[int | None], converted: list[int | None] | None, *, default: bool) -> bool:
    """True when ``converted`` is ``source`` with the channel axis moved last (decided by the
    static dimensions; ``default`` when they cannot tell)."""
    rank = len(source)
    if converted is None or rank < 3 or len(converted) != rank:
        return False if converted is not None and len(converted) != rank else (default and rank >= 3)
    perm = (0, *range(2, rank), 1)
    moved = [source[p] for p in perm]

    def fits(a: list[int | None], b: list[int | None]) -> bool:
        return all(x is None or y is None or x == y for x, y in zip(a[1:], b[1:]))

    same, last = fits(source, converted), fits(moved, converted)
    if same and not last:
        return False
    if last and not same:
        return True
    return default


def _onnx_io(value: Any) -> TensorIO:
    import onnx

    t = value.type.tensor_type
    dims: list[int | None] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
    except Exception:  # noqa: BLE001
        dtype = "float32"
    return TensorIO(name=value.name, shape=dims, dtype=dtype)


__all__ = ["OnnxPath", "SavedModelConverter", "TensorFlowPath", "converter_error", "export_keras"]
