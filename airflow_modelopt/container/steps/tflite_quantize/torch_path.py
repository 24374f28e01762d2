"""tflite_quantize, PyTorch path: litert-torch converts the module straight to TFLite (no
TensorFlow, inputs stay NCHW); ai-edge-quantizer quantizes the float flatbuffer.

litert-torch traces one fixed batch size (the spec's batch_size, default 1). Full int8 calibrates
on the calibration data with ai-edge-quantizer's static int8 recipe (float I/O, integer ops), then
TFLite's model-interface tool turns the edges into int8 or uint8 tensors when asked.
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from airflow_modelopt.container.steps.tflite_quantize.common import (
    Conversion,
    SourceModel,
    TensorIO,
    batches,
    clean,
    layout_for,
    quiet_loggers,
)
from airflow_modelopt.exceptions import ConversionFailed, InputError
from airflow_modelopt.specs.tflite_quantize import TFLiteQuantizeSpec

log = logging.getLogger("airflow_modelopt.container.steps.tflite_quantize")

#: TFLite schema TensorType numbers taken by the model-interface tool.
_TFLITE_TYPES = {"int8": 9, "uint8": 3}


class TorchPath:
    name = "litert_torch"

    def __init__(self, source: SourceModel, spec: TFLiteQuantizeSpec) -> None:
        self.source = source
        self.spec = spec
        self.batch = spec.batch_size or 1
        self.module: Any = None
        self.static_batch: int | None = None  # the exported program's batch size when it is not dynamic
        self.inputs: list[TensorIO] = []
        self.outputs: list[TensorIO] = []

    # -- loading --------------------------------------------------------------------------------

    def load(self) -> None:
        from airflow_modelopt.container.steps.torch_to_onnx import load_torch_model, model_input_names

        module, kind = load_torch_model(self.source.path, self.spec.model_uri)
        if kind == "torchscript":
            raise InputError(
                f"model_uri: {self.spec.model_uri} is a TorchScript model; litert-torch converts torch.export "
                "programs only: give the ExportedProgram (.pt2) or an MLflow pytorch model"
            )
        try:  # torch.export's unlifted modules refuse eval(): their graph is fixed; say so to litert-torch
            module.eval()
        except NotImplementedError:
            for sub in module.modules():
                sub.training = False
        self.module = module
        names = model_input_names(module) or ["x"]
        shapes = _placeholder_shapes(module, names)
        dtypes = _placeholder_dtypes(module, names)
        for name in names:
            shape = shapes.get(name)
            if shape is None:
                raise InputError(
                    f"model_uri: the shape of input {name!r} is not recorded in the model; give a torch.export "
                    "ExportedProgram (.pt2), which records it"
                )
            layout = layout_for(len(shape), False)  # litert-torch keeps the PyTorch layout
            # the batch: fixed by the converter (batch_size), not by the source
            # token ids stay integers (an embedding's indices); the calibration data is checked against it
            self.inputs.append(TensorIO(name=name, shape=[None, *shape[1:]] if shape else shape,
                                        dtype=dtypes.get(name, "float32"), layout=layout, tflite_layout=layout))
        first = shapes[names[0]]
        self.static_batch = first[0] if first else None
        if self.static_batch:  # exported without a dynamic batch: it runs at that batch size only
            if self.spec.batch_size not in (None, self.static_batch):
                raise InputError(
                    f"batch_size: the model was exported with a fixed batch of {self.static_batch} "
                    f"(input {names[0]!r}), got batch_size={self.spec.batch_size}; re-export it with a "
                    "dynamic batch dimension or leave batch_size unset"
                )
            self.batch = self.static_batch

    def describe_outputs(self, sample: dict[str, np.ndarray]) -> None:
        outs = self.run_source(sample)
        self.outputs = [
            TensorIO(name=f"output_{i}" if len(outs) > 1 else "output", shape=[None, *o.shape[1:]],
                     dtype=o.dtype.name, layout=layout_for(o.ndim, False), tflite_layout=layout_for(o.ndim, False))
            for i, o in enumerate(outs)
        ]

    def run_source(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        from airflow_modelopt.container.steps.torch_to_onnx import torch_outputs

        names = [i.name for i in self.inputs]
        if not self.static_batch:
            return torch_outputs(self.module, feeds, names)
        n = next(iter(feeds.values())).shape[0]
        chunks = [torch_outputs(self.module, part, names) for part in batches(feeds, self.static_batch, n)]
        return [np.concatenate([c[i] for c in chunks])[:n] for i in range(len(chunks[0]))]

    def sample(self, calibration: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        """One batch to trace with: the first calibration samples, else zeros of the recorded shape."""
        if calibration is not None:
            return next(batches(calibration, self.batch, self.batch))
        return {i.name: np.zeros([self.batch, *[d or 1 for d in i.shape[1:]]], i.dtype) for i in self.inputs}

    # -- conversion -----------------------------------------------------------------------------

    def convert(self, calibration: dict[str, np.ndarray] | None, workdir: Path) -> Conversion:
        started = time.monotonic()
        float_model = self._convert_float(self.sample(calibration))
        mode = self.spec.mode
        if mode == "fp32":
            return Conversion(float_model, time.monotonic() - started, quantizer="none")
        content = self._quantize(float_model, calibration, workdir)
        return Conversion(content, time.monotonic() - started, quantizer="ai_edge_quantizer")

    def _convert_float(self, sample: dict[str, np.ndarray]) -> bytes:
        import litert_torch
        import torch

        args = tuple(torch.from_numpy(sample[i.name]) for i in self.inputs)
        log.info("litert-torch: converting with a fixed batch of %d, inputs %s", self.batch,
                 {k: list(v.shape) for k, v in sample.items()})
        try:
            with quiet_loggers("root", "jax._src.xla_bridge"):  # one INFO line per lowered op
                edge = litert_torch.convert(self.module, args)
        except Exception as exc:  # noqa: BLE001 - litert-torch names the op it has no lowering for
            raise ConversionFailed(_litert_error(exc)) from None
        return bytes(edge.model_content())

    def _quantize(self, float_model: bytes, calibration: dict[str, np.ndarray] | None, workdir: Path) -> bytes:
        from ai_edge_quantizer import calibrator, qtyping, quantizer, recipe_manager
        from ai_edge_quantizer.algorithm_manager import AlgorithmName
        from ai_edge_quantizer.utils import qsv_utils

        spec = self.spec
        ops = qtyping.TFLOperationName
        granularity = qtyping.QuantGranularity.CHANNELWISE if spec.per_channel else qtyping.QuantGranularity.TENSORWISE
        rm = recipe_manager.RecipeManager()
        if spec.mode == "fp16":
            rm.add_weight_only_config(regex=".*", operation_name=ops.ALL_SUPPORTED, num_bits=16,
                                      algorithm_key=AlgorithmName.FLOAT_CASTING)
        elif spec.mode == "dynamic_int8":
            rm.add_dynamic_config(regex=".*", operation_name=ops.ALL_SUPPORTED, num_bits=8, granularity=granularity)
        else:
            rm.add_static_config(regex=".*", operation_name=ops.ALL_SUPPORTED, activation_num_bits=8,
                                 weight_num_bits=8, weight_granularity=granularity)
            # Float edges with QUANTIZE/DEQUANTIZE ops: the model-interface tool below turns them into
            # int8/uint8 tensors, or they stay float for io_type float32.
            for edge in (ops.INPUT, ops.OUTPUT):
                rm.add_quantization_config(regex=".*", operation_name=edge, algorithm_key=AlgorithmName.NO_QUANTIZE)
        q = quantizer.Quantizer(float_model, rm.get_quantization_recipe())
        calibration_result = None
        if q.need_calibration:
            assert calibration is not None  # the spec refuses int8 without calibration data
            signature_inputs = _signature_inputs(float_model)
            dtypes = _signature_dtypes(float_model)
            names = [i.name for i in self.inputs]
            key_of = dict(zip(names, signature_inputs)) if set(signature_inputs) != set(names) else {n: n for n in names}
            # litert-torch narrows int64 inputs (token ids) to int32: feed the calibrator what the model takes
            data = [{key_of[k]: v.astype(dtypes.get(key_of[k], v.dtype), copy=False) for k, v in b.items()}
                    for b in batches(calibration, self.batch, spec.calibration_samples)]
            log.info("ai-edge-quantizer: calibrating on %d batches of %d", len(data), self.batch)
            try:
                # min/max over all batches, as TFLiteConverter calibrates (the quantizer's default, a
                # moving average over batches, shrinks the range to typical samples and clips the rest)
                calib = calibrator.Calibrator(float_model, num_threads=1, qsv_update_func=qsv_utils.min_max_update)
                calib.calibrate({"serving_default": data}, rm)
                calibration_result = calib.get_model_qsvs()
            except Exception as exc:  # noqa: BLE001
                raise ConversionFailed(f"ai-edge-quantizer calibration failed: {type(exc).__name__}: {clean(str(exc))[:1500]}") from None
        try:
            result = q.quantize(calibration_result, enable_progress_report=False)
        except Exception as exc:  # noqa: BLE001
            raise ConversionFailed(f"ai-edge-quantizer ({spec.mode}) failed: {type(exc).__name__}: {clean(str(exc))[:1500]}") from None
        content = bytes(result.quantized_model)
        if spec.interface_type != "float32":
            content = modify_interface(content, spec.interface_type, workdir)
        return content


def modify_interface(content: bytes, io_type: str, workdir: Path) -> bytes:
    """Float edges (QUANTIZE in, DEQUANTIZE out) -> int8 or uint8 input and output tensors.

    TFLite's model-interface tool rewrites the graph but leaves the signature defs pointing at the
    old tensor numbers; they are re-pointed here by position in the subgraph's inputs/outputs.
    It also keeps only the flatbuffer itself: ai-edge-quantizer stores the weights of a model with
    256 KiB or more of them after the flatbuffer (buffers by offset), so they are moved inside it
    first, or the tool's output would point at weights it no longer has."""
    try:
        from ai_edge_litert import _pywrap_modify_model_interface as tool
    except ImportError:
        from tensorflow.lite.tools.optimize.python import _pywrap_modify_model_interface as tool

    fb = _flatbuffer_utils()
    content = bytes(fb.convert_object_to_bytearray(fb.read_model_from_bytearray(content)))
    positions = _signature_positions(content)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        src, dst = Path(tmp, "float_io.tflite"), Path(tmp, f"{io_type}_io.tflite")
        src.write_bytes(content)
        status = tool.modify_model_interface(str(src), str(dst), _TFLITE_TYPES[io_type], _TFLITE_TYPES[io_type])
        if status != 0 or not dst.is_file():
            raise ConversionFailed(
                f"io_type={io_type!r}: TFLite's model-interface tool could not turn the float inputs/outputs into "
                f"{io_type} (status {status}); use io_type='float32'"
            )
        return _repoint_signatures(dst.read_bytes(), positions)


def _flatbuffer_utils() -> Any:
    try:
        from ai_edge_litert.tools import flatbuffer_utils
    except ImportError:
        from tensorflow.lite.tools import flatbuffer_utils
    return flatbuffer_utils


def _signature_positions(content: bytes) -> list[tuple[list[int], list[int]]]:
    """For each signature def: the subgraph input/output position of each of its entries."""
    model = _flatbuffer_utils().convert_bytearray_to_object(content)
    positions = []
    for sig in model.signatureDefs or []:
        graph = model.subgraphs[sig.subgraphIndex]
        ins, outs = list(graph.inputs), list(graph.outputs)
        positions.append(([ins.index(t.tensorIndex) for t in sig.inputs or []],
                          [outs.index(t.tensorIndex) for t in sig.outputs or []]))
    return positions


def _repoint_signatures(content: bytes, positions: list[tuple[list[int], list[int]]]) -> bytes:
    fb = _flatbuffer_utils()
    model = fb.convert_bytearray_to_object(content)
    for sig, (ins, outs) in zip(model.signatureDefs or [], positions):
        graph = model.subgraphs[sig.subgraphIndex]
        for entry, pos in zip(sig.inputs or [], ins):
            entry.tensorIndex = int(graph.inputs[pos])
        for entry, pos in zip(sig.outputs or [], outs):
            entry.tensorIndex = int(graph.outputs[pos])
    return bytes(fb.convert_object_to_bytearray(model))


def _signature_inputs(content: bytes) -> list[str]:
    from airflow_modelopt.container.steps.tflite_quantize.flatbuffer import analyze

    return [name for name, _ in analyze(content).signature.inputs]


def _signature_dtypes(content: bytes) -> dict[str, str]:
    from airflow_modelopt.container.steps.tflite_quantize.flatbuffer import analyze

    return {name: t.dtype for name, t in analyze(content).signature.inputs}


def _placeholder_shapes(module: Any, names: list[str]) -> dict[str, list[int | None]]:
    """Input shapes recorded in a torch.export graph (symbolic dimensions as None)."""
    graph = getattr(module, "graph", None)
    shapes: dict[str, list[int | None]] = {}
    if graph is None:
        return shapes
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    by_name = {n.name: n for n in placeholders}
    user = [by_name[n] for n in names if n in by_name] or placeholders[-len(names):]
    for name, node in zip(names, user):
        val = node.meta.get("val")
        shape = getattr(val, "shape", None)
        if shape is None:
            continue
        dims: list[int | None] = []
        for d in shape:
            try:
                dims.append(int(d) if type(d) is int else None)
            except TypeError:
                dims.append(None)
        shapes[name] = dims
    return shapes


def _placeholder_dtypes(module: Any, names: list[str]) -> dict[str, str]:
    """Input dtypes recorded in a torch.export graph, as numpy names (float32, int64, ...)."""
    graph = getattr(module, "graph", None)
    if graph is None:
        return {}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    by_name = {n.name: n for n in placeholders}
    user = [by_name[n] for n in names if n in by_name] or placeholders[-len(names):]
    dtypes: dict[str, str] = {}
    for name, node in zip(names, user):
        dtype = getattr(node.meta.get("val"), "dtype", None)
        if dtype is not None:
            dtypes[name] = str(dtype).removeprefix("torch.")
    return dtypes


_LOWERING = re.compile(r"Lowering not found:\s*([\w.]+)")
_TARGET = re.compile(r"target=(torch\.ops\.[\w.]+)")


def _litert_error(exc: BaseException) -> str:
    text = clean(str(exc)).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    op = None
    match = _LOWERING.search(text) or _TARGET.search(text)
    if match:
        op = match.group(1)
    head = f"litert-torch cannot convert op {op}" if op else "litert-torch could not convert the model"
    return f"{head}: {type(exc).__name__}: {first}" + (f"\n{text[len(first):].strip()[:1500]}" if len(text) > len(first) else "")
