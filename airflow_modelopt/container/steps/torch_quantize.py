"""Step torch_quantize: PyTorch-native int8 with PT2E, torchao's X86InductorQuantizer.

1. Load the model through the runtimes layer (.pt2 or MLflow pytorch, weights-only unless the
   deployment trusts model code) as torch.export's GraphModule; a pickled MLflow module is
   captured with torch.export first (a model it cannot capture: ConversionFailed, exit 5).
2. ``prepare_pt2e`` with the quantizer of the mode: ``static`` and ``dynamic`` use
   ``X86InductorQuantizer`` (int8 per-channel symmetric weights, uint8 per-tensor activations;
   dynamic computes activation scales per batch); ``weight_only`` annotates only the Conv/Linear
   weights (:class:`WeightOnlyQuantizer`, same weight scheme).
3. Calibrate (observers see ``calibration_samples`` samples), ``convert_pt2e``: weights become int8
   constants with per-channel scales, activations quantize/dequantize pairs.
4. Export the converted module again with a dynamic batch, save it (.pt2), and load it back through
   ``container.runtimes.load`` without the model-code opt-in: the archive holds plain tensors only.
5. Measure (``measure.agreement``): the reloaded int8 program against the fp32 model on the
   evaluation data (or the calibration data): top-1 agreement, both accuracies with labels, max
   abs error; bytes of both programs. ``max_accuracy_drop`` gates it (exit 3).
6. Optionally export the same program to ONNX (QDQ), check it with onnx.checker and ONNX Runtime
   against the int8 program, and log it with the onnx flavor. An export the exporter cannot do
   (``dynamic``: no ONNX function for ``choose_qparams``) is recorded in ``info.onnx_export``.

Eager PyTorch runs the quantize/dequantize ops as written (slower than fp32); ``torch.compile``
with inductor (needs a C++ compiler) fuses them into int8 kernels.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from airflow_modelopt.container import measure
from airflow_modelopt.container.context import StepContext, StepOutput
from airflow_modelopt.container.data import LABEL_KEY, as_model_dtype, load_npz, match_inputs, take_batch
from airflow_modelopt.container.tracking import log_onnx_model
from airflow_modelopt.exceptions import ConversionFailed, GateFailed, InputError
from airflow_modelopt.specs.torch_quantize import TorchQuantizeSpec

PT2_NAME = "model.pt2"
#: Layers whose weights the quantizer turns into int8 (what ``quantized_layers`` counts).
_WEIGHTED_OPS = ("conv1d", "conv2d", "conv3d", "linear")


# -- loading ----------------------------------------------------------------------------------


def load_graph_module(path: Path, uri: str, data: dict[str, np.ndarray], data_field: str
                      ) -> tuple[Any, Any, list[str], Path | None]:
    """(fp32 runtime, torch.export GraphModule, input names, the source .pt2 file or None) of a .pt2
    file or an MLflow pytorch model, loaded through the runtimes layer (weights-only unless trusted)."""
    import torch

    from airflow_modelopt.container.runtimes import load

    if path.is_file() and path.stat().st_size == 0:
        raise InputError(f"model_uri: {uri} is an empty file")
    runtime = load(path, "pt2" if path.is_file() else None, threads=torch.get_num_threads(), field="model_uri",
                   origin=uri)
    if runtime.format == "torchscript":
        raise InputError(
            f"model_uri: {uri} is TorchScript, which has no torch.export graph for PT2E to quantize; export the "
            "model with torch.export (.pt2) or log it as an MLflow pytorch model"
        )
    names = [s.name for s in runtime.inputs]
    if runtime.format == "pt2":
        return runtime, runtime.module, names, runtime.path
    # A pickled MLflow pytorch module (loaded only with the trust opt-in): capture it with torch.export.
    examples = match_inputs(data, names, field=data_field)
    program = export_program(runtime.module, examples, names, f"the MLflow pytorch model {uri}")
    return runtime, program.module(), names, None


def export_program(module: Any, examples: dict[str, np.ndarray], names: list[str], what: str) -> Any:
    """torch.export with a dynamic batch dimension; a model it cannot capture is ConversionFailed.

    ``Dim.AUTO``: the batch keeps whatever range the source program allows (e.g. a max of 4096)."""
    import torch

    args = tuple(torch.from_numpy(np.ascontiguousarray(examples[n][:2])) for n in names)
    try:
        return torch.export.export(module, args, dynamic_shapes=tuple({0: torch.export.Dim.AUTO} for _ in names))
    except Exception as exc:  # noqa: BLE001 - torch.export's own message names the construct
        raise ConversionFailed(
            f"torch.export could not capture {what}: {type(exc).__name__}: {str(exc).strip()[:1500]}"
        ) from None


def load_inputs(ctx: StepContext, field: str, names: list[str], limit: int | None = None
                ) -> tuple[dict[str, np.ndarray], np.ndarray | None] | None:
    """(inputs by model input name, labels or None) of a data artifact, or None when not given."""
    path = ctx.input(field)
    if path is None:
        return None
    arrays = load_npz(path, field=field)
    labels = arrays.get(LABEL_KEY)
    feeds = {k: as_model_dtype(v) for k, v in match_inputs(arrays, names, field=field).items()}
    if limit is not None:
        feeds = {k: v[:limit] for k, v in feeds.items()}
        labels = None if labels is None else labels[:limit]
    if labels is not None and (labels.ndim != 1 or len(labels) != len(next(iter(feeds.values())))):
        labels = None
    return feeds, labels


# -- quantizing -------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_torchao() -> Any:
    """torchao's import logs a warning per CUDA kernel library a CPU build cannot load."""
    logger = logging.getLogger("torchao")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def make_quantizer(mode: str, reduce_range: bool) -> Any:
    """X86InductorQuantizer (static or dynamic), or a quantizer of the Conv/Linear weights alone."""
    with _quiet_torchao():
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
        from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, Quantizer
    config = xiq.get_default_x86_inductor_quantization_config(is_dynamic=mode == "dynamic", reduce_range=reduce_range)
    if mode != "weight_only":
        quantizer = xiq.X86InductorQuantizer()
        quantizer.set_global(config)
        return quantizer

    class WeightOnlyQuantizer(Quantizer):
        """Annotates the weight of every Conv/Linear call with the x86 weight scheme; nothing else.
        (X86InductorQuantizer itself needs an activation scheme.)"""

        def annotate(self, model: Any) -> Any:
            for node in model.graph.nodes:
                if is_weighted_op(node) and len(node.args) > 1 and getattr(node.args[1], "op", None) == "get_attr":
                    node.meta["quantization_annotation"] = QuantizationAnnotation(
                        input_qspec_map={node.args[1]: config.weight}, _annotated=True)
            return model

        def validate(self, model: Any) -> None:
            return None

    return WeightOnlyQuantizer()


def is_weighted_op(node: Any) -> bool:
    return node.op == "call_function" and getattr(node.target, "_opname", None) in _WEIGHTED_OPS


def split_repeated_module_calls(gm: Any) -> int:
    """Tell apart the calls of a module used more than once (ResNet's BasicBlock applies one
    ``self.relu`` twice). Without ``source_fn_stack`` (a saved program has none) the quantizer groups
    nodes into partitions by their innermost module's name, so both ReLU calls fall in one partition
    with two outputs and X86InductorQuantizer refuses the model ("Input partition has more than one
    output node"). torch.export already numbers repeated calls in the stack's key (``...relu@1``);
    copy that number into the name. Only annotation reads this metadata. Returns the nodes renamed."""
    renamed = 0
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") if node.op == "call_function" else None
        if not stack or node.meta.get("source_fn_stack"):
            continue
        key, (fqn, cls) = list(stack.items())[-1]
        _, at, call = str(key).rpartition("@")
        if at and call.isdigit() and not str(fqn).endswith(f"@{call}"):
            stack[key] = (f"{fqn}@{call}", cls)
            renamed += 1
    return renamed


def quantize(module: Any, quantizer: Any, calibration: dict[str, np.ndarray], names: list[str], batch_size: int,
             log: Any) -> Any:
    """prepare_pt2e, calibration passes, convert_pt2e; the fp32 weights the int8 ones replace are dropped."""
    import torch

    with _quiet_torchao():
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    renamed = split_repeated_module_calls(module)
    if renamed:
        log.info("%d node(s) come from a module called more than once: each call is quantized as its own pattern",
                 renamed)
    try:
        prepared = prepare_pt2e(module, quantizer)
    except Exception as exc:  # noqa: BLE001 - the quantizer names the node it cannot annotate
        raise ConversionFailed(f"prepare_pt2e refused the model: {type(exc).__name__}: {str(exc)[:1500]}") from None
    n = len(calibration[names[0]])
    started = time.monotonic()
    try:
        with torch.no_grad():
            for i in range(0, n, batch_size):
                prepared(*[torch.from_numpy(np.ascontiguousarray(calibration[k][i: i + batch_size])) for k in names])
    except Exception as exc:  # noqa: BLE001 - the model's own check names the dimension
        shapes = {k: list(calibration[k].shape) for k in names}
        text = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else type(exc).__name__
        raise InputError(f"calibration_data_uri: samples of shape {shapes} do not fit the model: {text}") from None
    log.info("Calibrated on %d samples in %.2f s", n, time.monotonic() - started)
    try:
        converted = convert_pt2e(prepared)
    except Exception as exc:  # noqa: BLE001
        raise ConversionFailed(f"convert_pt2e failed: {type(exc).__name__}: {str(exc)[:1500]}") from None
    drop_unused_tensors(converted)
    return converted


def drop_unused_tensors(gm: Any) -> None:
    """Remove parameters and buffers no graph node reads: convert_pt2e leaves the fp32 weights on the
    module beside their int8 replacements, and torch.export would save both."""
    gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in [*gm.named_parameters(), *gm.named_buffers()]:
        if name not in used:
            owner_name, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(owner_name) if owner_name else gm, attr)
    gm.recompile()


def quantized_layers(program: Any) -> int:
    """Conv/Linear calls whose weight is dequantized from int8 constants."""
    count = 0
    for node in program.graph.nodes:
        if is_weighted_op(node) and len(node.args) > 1:
            w = node.args[1]
            if getattr(w, "op", None) == "call_function" and "dequantize_per_channel" in str(w.target):
                count += 1
    return count


# -- ONNX -------------------------------------------------------------------------------------


def export_onnx(program: Any, examples: dict[str, np.ndarray], names: list[str], output_names: list[str], opset: int,
                out_dir: Path) -> Path:
    """The quantized program to ONNX (QuantizeLinear/DequantizeLinear) with a dynamic batch, checked."""
    import warnings

    import onnx
    import torch

    args = tuple(torch.from_numpy(np.ascontiguousarray(examples[n][:2])) for n in names)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(program, args, input_names=names, output_names=output_names, opset_version=opset,
                                         dynamo=True, dynamic_shapes=tuple({0: torch.export.Dim("batch")} for _ in names),
                                         optimize=True, verbose=False)
    onnx_program.save(str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return path


def try_onnx(ctx: StepContext, spec: TorchQuantizeSpec, program: Any, feeds: dict[str, np.ndarray],
             names: list[str], output_names: list[str], int8_out: list[np.ndarray]) -> tuple[dict[str, Any], dict[str, float], str | None]:
    """(info, metrics, onnx_model URI or None): the QDQ export when it works, else why not."""
    import onnx

    from airflow_modelopt.container.runtimes import load
    from airflow_modelopt.container.steps.torch_to_onnx import summarize_export_error

    started = time.monotonic()
    try:
        path = export_onnx(program, feeds, names, output_names, spec.opset, ctx.workdir / "onnx")
    except Exception as exc:  # noqa: BLE001 - recorded, not fatal: the .pt2 is the step's product
        reason = summarize_export_error(exc)
        ctx.log.warning("ONNX export of the %s int8 program failed (recorded, the .pt2 is kept): %s", spec.mode, reason)
        return {"exported": False, "reason": reason[:2000]}, {"onnx_exported": 0.0}, None
    with load(path, "onnx", field="model_uri", origin="the QDQ export") as rt:
        got = rt.run(feeds)
    vs_pt2 = measure.agreement(int8_out, got)
    ops: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    ctx.log.info("ONNX QDQ export in %.1f s: ops %s; top-1 agreement with the int8 program %.4f",
                 time.monotonic() - started, ops, vs_pt2.get("top1_agreement", float("nan")))
    uri = log_onnx_model(onnx.load(str(path))).model_uri
    metrics = {"onnx_exported": 1.0, **{f"onnx_vs_pt2_{k}": v for k, v in vs_pt2.items()}}
    return {"exported": True, "op_histogram": ops, "opset": spec.opset}, metrics, uri


# -- the step ---------------------------------------------------------------------------------


def run(spec: TorchQuantizeSpec, ctx: StepContext) -> StepOutput:
    import torch

    from airflow_modelopt.container.runtimes import load

    model_path = ctx.input("model_uri")
    assert model_path is not None
    raw_cal = ctx.input("calibration_data_uri")
    raw_eval = ctx.input("eval_data_uri")
    assert raw_cal is not None or raw_eval is not None  # the spec requires one (static: calibration)
    data_field = "calibration_data_uri" if raw_cal is not None else "eval_data_uri"
    data = {k: as_model_dtype(v) for k, v in load_npz(raw_cal or raw_eval, field=data_field).items()}
    fp32, module, names, source_pt2 = load_graph_module(model_path, spec.model_uri, data, data_field)
    ctx.log.info("Loaded %s with inputs %s; quantizing (%s)", spec.model_uri, names, spec.mode)

    calibration = load_inputs(ctx, "calibration_data_uri", names, spec.calibration_samples)
    evaluation = load_inputs(ctx, "eval_data_uri", names) or calibration
    assert evaluation is not None
    eval_field = "eval_data_uri" if raw_eval is not None else "calibration_data_uri"
    eval_x, eval_y = evaluation
    if spec.max_accuracy_drop is not None and eval_y is None:
        raise InputError(f"{eval_field}: max_accuracy_drop needs labels under {LABEL_KEY!r} in the evaluation data")
    # Dynamic and weight-only quantization observe no activations: a small batch sets the weight scales.
    cal_x = calibration[0] if calibration is not None else take_batch(eval_x, 2)
    try:
        fp32_out = fp32.run_native(eval_x)
    except Exception as exc:  # noqa: BLE001 - the model's own check names the dimension
        shapes = {n: list(a.shape) for n, a in eval_x.items()}
        text = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{eval_field}: samples of shape {shapes} do not fit the model: {text}") from None

    started = time.monotonic()
    converted = quantize(module, make_quantizer(spec.mode, spec.reduce_range), cal_x, names,
                         spec.calibration_batch_size, ctx.log)
    program = export_program(converted, take_batch(cal_x, 2), names, "the quantized model")
    quantize_time = time.monotonic() - started
    out_path = ctx.workdir / "model" / PT2_NAME
    out_path.parent.mkdir(parents=True)
    torch.export.save(program, str(out_path))

    # The saved archive, loaded back as every later step loads it (weights-only, no opt-in).
    with load(out_path, "pt2", field="model_uri", origin="the quantized .pt2") as rt:
        int8_out = [np.asarray(o) for o in rt.run_native(eval_x)]
        output_names = [o.name for o in rt.outputs]  # output, or output_0, output_1, ... as torch_to_onnx names them
    metrics: dict[str, float] = measure.agreement(fp32_out, int8_out, eval_y)
    layers = quantized_layers(program)
    if layers == 0:
        raise ConversionFailed(
            f"model_uri: the {spec.mode} quantizer found no Conv/Linear layer to quantize in this model "
            "(nothing became int8)"
        )
    fp32_bytes = source_bytes(source_pt2, fp32.module, cal_x, names, ctx.workdir)
    int8_bytes = out_path.stat().st_size
    metrics.update({"quantized_layers": float(layers), "fp32_bytes": float(fp32_bytes), "int8_bytes": float(int8_bytes),
                    "size_ratio": int8_bytes / fp32_bytes, "quantize_time_s": quantize_time,
                    "calibration_samples": float(len(cal_x[names[0]])), "eval_samples": float(len(eval_x[names[0]]))})
    ctx.log.info("int8 program: %d quantized layers, %d bytes (fp32 %d); top-1 agreement %.4f, accuracy %s vs fp32 %s",
                 layers, int8_bytes, fp32_bytes, metrics.get("top1_agreement", float("nan")),
                 metrics.get("accuracy"), metrics.get("fp32_accuracy"))
    check_gate(spec, metrics, eval_field)

    info: dict[str, Any] = {"mode": spec.mode, "quantizer": "X86InductorQuantizer" if spec.mode != "weight_only"
                            else "weight-only (X86InductorQuantizer's weight scheme)", "format": "pt2",
                            "input_names": names, "weights": "int8 per-channel symmetric",
                            "activations": {"static": "uint8 per-tensor affine (calibrated)",
                                            "dynamic": "uint8 per-tensor affine (per batch)",
                                            "weight_only": "float32"}[spec.mode]}
    from airflow_modelopt.container.pyfunc import log_deployable

    # model_pt2: the MLflow model (pyfunc over the runtimes layer: validation, benchmark and promotion
    # take it); model_pt2_file: the raw archive, where it was logged before.
    raw = ctx.log_artifact(out_path, "model")
    logged = log_deployable(out_path.parent, "pt2", data=eval_x, name="model_pt2")
    artifacts = {"model_pt2": logged.model_uri, "model_pt2_file": raw}
    if spec.export_onnx:
        onnx_info, onnx_metrics, onnx_uri = try_onnx(ctx, spec, program, eval_x, names, output_names, int8_out)
        info["onnx_export"] = onnx_info
        metrics.update(onnx_metrics)
        if onnx_uri:
            artifacts["onnx_model"] = onnx_uri
    return StepOutput(artifacts=artifacts, metrics=metrics, info=info)


def source_bytes(source_pt2: Path | None, module: Any, examples: dict[str, np.ndarray], names: list[str],
                 workdir: Path) -> int:
    """Bytes of the fp32 program as a .pt2: the source file, or the captured module saved the same way."""
    import torch

    if source_pt2 is not None:
        return source_pt2.stat().st_size
    path = workdir / "fp32" / PT2_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(export_program(module, take_batch(examples, 2), names, "the fp32 model"), str(path))
    return path.stat().st_size


def check_gate(spec: TorchQuantizeSpec, metrics: dict[str, float], field: str) -> None:
    if spec.max_accuracy_drop is None:
        return
    if metrics["accuracy_drop"] > spec.max_accuracy_drop + 1e-12:
        raise GateFailed(
            f"max_accuracy_drop: accuracy on {field} fell from {metrics['fp32_accuracy']:.4f} (fp32) to "
            f"{metrics['accuracy']:.4f} (int8, {spec.mode}), a drop of {metrics['accuracy_drop']:.4f} > "
            f"{spec.max_accuracy_drop}; calibrate on more representative data or use reduce_range / another mode"
        )


__all__ = ["run"]
