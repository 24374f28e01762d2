"""Step torch_to_onnx: PyTorch model -> ONNX (a folder: graph plus external data), proven equal.

1. Load the model: ExportedProgram (.pt2), TorchScript, or an MLflow pytorch model folder.
2. Sample inputs from the data artifact (arrays keyed by input name) or from ``input_shapes``.
3. torch.onnx.export (dynamo) with the batch dimension dynamic by default.
4. onnx.checker (full check, with shape inference).
5. ONNX Runtime at batch sizes the export never saw, compared with torch: max abs / rel error
   per batch size are metrics; a failure or a disagreement names the input and dimension.
6. Log the ONNX model with MLflow's onnx flavor, plus graph statistics.
"""

from __future__ import annotations

import collections
import inspect
import re
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from airflow_modelopt.container.context import StepContext, StepOutput
from airflow_modelopt.container.data import as_model_dtype, load_npz, match_inputs, take_batch
from airflow_modelopt.container.runtimes.torch_backend import load_exported_program, load_pickled_mlflow_model
from airflow_modelopt.container.tracking import log_onnx_model
from airflow_modelopt.exceptions import ConversionFailed, GateFailed, InputError
from airflow_modelopt.specs import TorchToOnnxSpec

TORCHSCRIPT_SUFFIXES = {".pt", ".pth", ".ts", ".torchscript", ".jit"}


# -- loading ----------------------------------------------------------------------------------


def load_torch_model(path: Path, uri: str) -> tuple[Any, str]:
    """(callable module in eval mode, kind) for a .pt2, a TorchScript file or an MLflow model."""
    import torch

    if path.is_dir():
        pt2 = sorted(path.rglob("*.pt2"))
        if (path / "MLmodel").is_file() and len(pt2) != 1:  # an MLflow pytorch model saved with pickle
            try:
                model = load_pickled_mlflow_model(path, field="model_uri", origin=uri)
            except InputError:
                raise
            except Exception as exc:
                raise InputError(f"model_uri: {uri} is an MLflow model that does not load as pytorch: {exc}") from None
            return _eval_mode(model), "mlflow_pytorch"
        if len(pt2) == 1:  # an MLflow model logged with the pt2 export, or a folder with one .pt2
            module = load_exported_program(pt2[0], field="model_uri", origin=uri).module()
            return _eval_mode(module), "mlflow_pytorch" if (path / "MLmodel").is_file() else "exported_program"
        else:
            raise InputError(
                f"model_uri: {uri} is a directory, not a model file; expected a .pt2 or TorchScript file, "
                "or an MLflow pytorch model folder (with an MLmodel file)"
            )
    if path.stat().st_size == 0:
        raise InputError(f"model_uri: {uri} is an empty file")
    errors = []
    loaders = [("exported_program", _load_pt2), ("torchscript", _load_torchscript)]
    if path.suffix.lower() in TORCHSCRIPT_SUFFIXES:
        loaders.reverse()
    for kind, loader in loaders:
        try:
            return loader(path, uri), kind
        except InputError:  # a refusal (code in the file), not a format mismatch
            raise
        except Exception as exc:  # noqa: BLE001 - report every loader's reason below
            errors.append(f"as {kind}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    del torch
    raise InputError(f"model_uri: {uri} is not a loadable PyTorch model (corrupt or unsupported): " + "; ".join(errors))


def _eval_mode(module: Any) -> Any:
    """eval() where the module supports it (torch.export's unlifted modules do not need it)."""
    try:
        return module.eval()
    except NotImplementedError:
        return module


def _load_pt2(path: Path, uri: str) -> Any:
    return load_exported_program(path, field="model_uri", origin=uri).module()


def _load_torchscript(path: Path, uri: str) -> Any:
    import torch

    return torch.jit.load(str(path), map_location="cpu").eval()


def model_input_names(module: Any) -> list[str]:
    """Positional input names of forward(), as the user wrote them."""
    import torch

    if isinstance(module, torch.jit.ScriptModule):
        args = module.forward.schema.arguments
        return [a.name for a in args if a.name != "self"]
    sig = inspect.signature(module.forward)
    names = [
        p.name for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is inspect.Parameter.empty
    ]
    if names and names != ["args"]:
        return names
    # torch.export's unlifted GraphModule: placeholders named after the original arguments
    spec = getattr(module, "_in_spec", None)
    graph = getattr(module, "graph", None)
    if graph is not None:
        placeholders = [n.name for n in graph.nodes if n.op == "placeholder"]
        if spec is not None and placeholders:
            return placeholders
    return names


# -- export and checks ------------------------------------------------------------------------


def sample_inputs(spec: TorchToOnnxSpec, ctx: StepContext, names: list[str]) -> dict[str, np.ndarray]:
    data_path = ctx.input("data_uri")
    if data_path is not None:
        arrays = load_npz(data_path, field="data_uri")
        return {k: as_model_dtype(v) for k, v in match_inputs(arrays, names, field="data_uri").items()}
    assert spec.input_shapes is not None
    missing = [n for n in names if n not in spec.input_shapes]
    if len(names) == 1 and len(spec.input_shapes) == 1:
        missing = []
    if missing:
        raise InputError(f"input_shapes: no shape for model input(s) {missing}; given {sorted(spec.input_shapes)}")
    rng = np.random.default_rng(0)
    shapes = list(spec.input_shapes.values()) if len(names) == 1 else [spec.input_shapes[n] for n in names]
    n = max([spec.export_batch_size, *(spec.check_batch_sizes or [])])
    return {name: rng.standard_normal((n, *shape[1:])).astype(np.float32) for name, shape in zip(names, shapes)}


def torch_outputs(module: Any, feeds: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        out = module(*[torch.from_numpy(feeds[n]) for n in names])
    if isinstance(out, torch.Tensor):
        out = (out,)
    elif isinstance(out, dict):
        out = tuple(out.values())
    return [o.detach().cpu().numpy() for o in out]


def export(module: Any, samples: dict[str, np.ndarray], names: list[str], output_names: list[str],
           spec: TorchToOnnxSpec, out_dir: Path) -> Path:
    """torch.export-based ONNX export; TorchScript modules take the TorchScript exporter, since
    torch.export cannot trace a ScriptModule."""
    import torch

    dynamo = not isinstance(module, torch.jit.ScriptModule)
    dynamic_axes: dict[str, dict[int, str]] = {}
    if spec.dynamic_batch:
        dynamic_axes = {n: {0: "batch"} for n in [*names, *output_names]}
    for name, axes in (spec.dynamic_axes or {}).items():
        dynamic_axes.setdefault(name, {}).update({int(k): v for k, v in axes.items()})
    args = tuple(torch.from_numpy(samples[n]) for n in names)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.onnx"
    try:
        with warnings.catch_warnings():
            # An unlifted ExportedProgram has no eval(); dynamic_axes is converted for us on purpose.
            warnings.filterwarnings("ignore", message=".*(training mode|'dynamic_axes' is not recommended).*")
            program = torch.onnx.export(
                module, args, str(path), input_names=names, output_names=output_names,
                opset_version=spec.opset, dynamic_axes=dynamic_axes or None, dynamo=dynamo,
                external_data=True, verbose=False, **({"optimize": True} if dynamo else {}),
            )
        if program is not None and not path.exists():
            program.save(str(path), external_data=True)
    except Exception as exc:  # noqa: BLE001 - the exporter's own message names the op
        exporter = "torch.onnx.export (dynamo)" if dynamo else "torch.onnx.export (TorchScript)"
        raise ConversionFailed(f"{exporter} failed at opset {spec.opset}: {summarize_export_error(exc)}") from None
    return path


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_DIM_REFS = (re.compile(r"inputs\['([^']+)'\]\.shape\[(\d+)\]"), re.compile(r"L\['([^']+)'\]\.size\(\)\[(\d+)\]"))


def summarize_export_error(exc: BaseException) -> str:
    """The exporter's own summary (it names the op or the dimension), without its boilerplate."""
    text = _ANSI.sub("", str(exc)).strip()
    if "## Exception summary" in text:
        text = text.split("## Exception summary", 1)[1].split("(Refer to the full stack trace", 1)[0].strip()
    text = text[:2000]
    for pattern in _DIM_REFS:
        match = pattern.search(text)
        if match:
            return f"input {match.group(1)!r} dimension {match.group(2)} cannot be exported as requested: {text}"
    return f"{type(exc).__name__}: {text}"


def graph_stats(path: Path) -> dict[str, Any]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops = collections.Counter(node.op_type for node in model.graph.node)
    params = 0
    for init in model.graph.initializer:
        n = 1
        for d in init.dims:
            n *= d
        params += n

    def describe(values: Any) -> list[dict[str, Any]]:
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in t.shape.dim]
            out.append({"name": v.name, "shape": dims, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name})
        return out

    files = sorted(p for p in path.parent.iterdir() if p.is_file())
    return {
        "node_count": len(model.graph.node),
        "op_histogram": dict(sorted(ops.items())),
        "param_count": params,
        "bytes": sum(p.stat().st_size for p in files),
        "files": {p.name: p.stat().st_size for p in files},
        "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
        "inputs": describe(model.graph.input),
        "outputs": describe(model.graph.output),
    }


def check_onnx(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001
        raise ConversionFailed(f"onnx.checker rejected the exported model: {exc}") from None


def compare(module: Any, session: Any, samples: dict[str, np.ndarray], names: list[str],
            stats: dict[str, Any], spec: TorchToOnnxSpec, batch: int) -> dict[str, float]:
    """ORT vs torch at one batch size; raise GateFailed naming the input/output and dimension."""
    feeds = take_batch(samples, batch)
    try:
        ort_out = session.run(None, feeds)
    except Exception as exc:  # noqa: BLE001
        fixed = [
            f"input {i['name']!r} dimension {d} is fixed to {dim} in the graph"
            for i in stats["inputs"] for d, dim in enumerate(i["shape"])
            if isinstance(dim, int) and i["name"] in feeds and feeds[i["name"]].shape[d] != dim
        ]
        where = "; ".join(fixed) or ", ".join(
            f"input {n!r} dimension 0 = {batch} (the export example used {spec.export_batch_size})" for n in feeds
        )
        raise GateFailed(
            f"ONNX Runtime failed at batch size {batch}: {where}. ORT said: {str(exc).splitlines()[0][:500]}"
        ) from None
    ref = torch_outputs(module, feeds, names)
    metrics: dict[str, float] = {}
    worst_abs = worst_rel = 0.0
    for i, (r, o) in enumerate(zip(ref, ort_out)):
        out_name = stats["outputs"][i]["name"] if i < len(stats["outputs"]) else f"output {i}"
        if r.shape != o.shape:
            raise GateFailed(
                f"output {out_name!r} has shape {list(o.shape)} from ONNX Runtime but {list(r.shape)} from torch "
                f"at batch size {batch} (input {names[0]!r} dimension 0 = {batch})"
            )
        diff = np.abs(r.astype(np.float64) - o.astype(np.float64))
        max_abs = float(diff.max()) if diff.size else 0.0
        max_rel = float((diff / (np.abs(r.astype(np.float64)) + 1e-12)).max()) if diff.size else 0.0
        worst_abs, worst_rel = max(worst_abs, max_abs), max(worst_rel, max_rel)
        if not np.all(np.isfinite(o)) or not np.allclose(o, r, atol=spec.atol, rtol=spec.rtol):
            raise GateFailed(
                f"output {out_name!r} from ONNX Runtime differs from torch at batch size {batch} "
                f"(input {names[0]!r} dimension 0 = {batch}): max abs error {max_abs:.3g} > atol {spec.atol:g} "
                f"(rtol {spec.rtol:g})"
            )
    metrics[f"max_abs_error_batch_{batch}"] = worst_abs
    metrics[f"max_rel_error_batch_{batch}"] = worst_rel
    return metrics


# -- the step ---------------------------------------------------------------------------------


def run(spec: TorchToOnnxSpec, ctx: StepContext) -> StepOutput:
    import onnx
    import onnxruntime as ort

    model_path = ctx.input("model_uri")
    assert model_path is not None
    module, kind = load_torch_model(model_path, spec.model_uri)
    names = spec.input_names or model_input_names(module) or ["x"]
    ctx.log.info("Loaded %s model with inputs %s", kind, names)
    samples = sample_inputs(spec, ctx, names)
    export_feed = take_batch(samples, spec.export_batch_size)
    try:
        ref = torch_outputs(module, export_feed, names)
    except Exception as exc:  # noqa: BLE001
        shapes = {n: list(a.shape) for n, a in export_feed.items()}
        source = "data_uri" if ctx.input("data_uri") is not None else "input_shapes"
        raise InputError(f"{source}: sample inputs {shapes} do not fit the model: {str(exc).splitlines()[0]}") from None
    output_names = spec.output_names or (["output"] if len(ref) == 1 else [f"output_{i}" for i in range(len(ref))])
    if len(output_names) != len(ref):
        raise InputError(f"output_names: the model has {len(ref)} outputs but {len(output_names)} names were given")

    ctx.log.info("Exporting at opset %d, example batch %d, dynamic batch %s", spec.opset,
                 spec.export_batch_size, spec.dynamic_batch)
    started = time.monotonic()
    onnx_dir = ctx.workdir / "onnx"
    path = export(module, export_feed, names, output_names, spec, onnx_dir)
    export_time = time.monotonic() - started
    check_onnx(path)
    stats = graph_stats(path)
    ctx.log.info("Exported in %.2f s: %d nodes, %d parameters, %d bytes in %s", export_time,
                 stats["node_count"], stats["param_count"], stats["bytes"], sorted(stats["files"]))

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    metrics: dict[str, float] = {"export_time_s": export_time}
    for batch in spec.check_batch_sizes or []:
        metrics.update(compare(module, session, samples, names, stats, spec, batch))
        ctx.log.info("Batch %d: ORT matches torch, max abs error %.3g", batch, metrics[f"max_abs_error_batch_{batch}"])
    n_samples = next(iter(samples.values())).shape[0]
    if ctx.input("data_uri") is not None and n_samples not in (spec.check_batch_sizes or []):
        metrics.update(compare(module, session, samples, names, stats, spec, n_samples))
        metrics["data_max_abs_error"] = metrics.pop(f"max_abs_error_batch_{n_samples}")
        metrics["data_max_rel_error"] = metrics.pop(f"max_rel_error_batch_{n_samples}")
        metrics["data_samples"] = float(n_samples)
    abs_errors = [v for k, v in metrics.items() if "max_abs_error" in k]
    rel_errors = [v for k, v in metrics.items() if "max_rel_error" in k]
    metrics["max_abs_error"] = max(abs_errors)
    metrics["max_rel_error"] = max(rel_errors)
    metrics.update({
        "onnx_node_count": float(stats["node_count"]),
        "onnx_param_count": float(stats["param_count"]),
        "onnx_bytes": float(stats["bytes"]),
        "opset": float(stats["opset"] or spec.opset),
    })

    signature = {"inputs": stats["inputs"], "outputs": stats["outputs"],
                 "layout": "NCHW" if len(stats["inputs"][0]["shape"]) == 4 else None}
    ctx.log_dict(stats, "onnx_graph_stats.json")
    proto = onnx.load(str(path))  # with its external data, for the flavor to save as a folder
    model_info = log_onnx_model(proto, example=samples)
    return StepOutput(
        artifacts={"onnx_model": model_info.model_uri, "graph_stats": ctx.artifact_uri("onnx_graph_stats.json")},
        metrics=metrics,
        info={"source_kind": kind, "signature": signature, "op_histogram": stats["op_histogram"],
              "input_names": names, "output_names": output_names},
    )


__all__ = ["graph_stats", "load_torch_model", "run"]
