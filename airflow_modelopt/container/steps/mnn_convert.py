"""Step mnn_convert: ONNX -> MNN (fp32, fp16 weights, int8 weights, or full int8).

1. Read the ONNX source through the runtimes layer (its tensors become ``modelopt_signature.json``:
   the .mnn file fixes every dimension, the batch too, and the record keeps it dynamic).
2. MNN's converter (``-f ONNX``; ``--fp16`` for fp16 weights, ``--weightQuantBits 8`` for int8
   weights) writes ``model.mnn``.
3. int8: MNN's post-training quantization tool on the fp32 model, calibrated on up to
   ``calibration_samples`` samples written as MNN's "sequence" inputs (a folder per sample with
   ``input.json`` and one text file per input).
4. Check: the MNN model against its source on the eval (else calibration) data, both timed at batch 1
   (``_deploy_common.check_against_source``). Artifact ``mnn_model``: ``model.mnn`` +
   ``modelopt_signature.json``.

The converter and the quantizer are MNN's compiled ``_tools`` module, each run in a child process:
their messages go to that process's output (quoted when they fail), a crash on a bad model fails
the step instead of killing it, and MNN's Python wrappers (``MNN.tools``, which send usage logs and
``pip install`` a logging SDK) are never imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from airflow_modelopt.container.context import StepContext, StepOutput
from airflow_modelopt.container.steps._deploy_common import (
    Source,
    check_against_source,
    converted_signature,
    read_data,
    read_source,
)
from airflow_modelopt.exceptions import ConversionFailed
from airflow_modelopt.specs.mnn_convert import MNNConvertSpec

ARTIFACT = "mnn_model"
MODEL_FILE = "model.mnn"
PRECISION_BITS = {"fp32": 32, "fp16": 16, "int8_weights": 8, "int8": 8}
TOOL_TIMEOUT_S = 1800

#: Runs one of MNN's compiled tools with this process's arguments (argv[0] is the program name).
_TOOL = "import sys, _tools; sys.exit(0 if _tools.{tool}(sys.argv) else 1)"


def run_tool(tool: str, args: list[str], output: Path, what: str, ctx: StepContext) -> float:
    """Run MNN's ``_tools.<tool>`` in a child process; ConversionFailed unless it wrote ``output``.
    Returns the seconds it took."""
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", _TOOL.format(tool=tool), *args], capture_output=True, text=True,
                              timeout=TOOL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ConversionFailed(f"model_uri: MNN's {tool} ran longer than {TOOL_TIMEOUT_S} s ({what})") from None
    text = (proc.stdout + proc.stderr).strip()
    ctx.log.info("MNN %s (%s): exit %d\n%s", tool, what, proc.returncode, text[-2000:])
    if proc.returncode != 0 or not output.is_file() or output.stat().st_size == 0:
        notes = [line for line in text.splitlines() if any(w in line.lower() for w in ("error", "not support", "failed"))]
        detail = "; ".join(dict.fromkeys(notes))[:1500] or text[-1500:] or f"exit code {proc.returncode}"
        if proc.returncode < 0:  # e.g. mnnquant 3.6 on residual (Add) networks: SIGSEGV
            detail = f"it crashed (signal {-proc.returncode}); its last output: {text[-500:] or 'none'}"
        raise ConversionFailed(f"model_uri: MNN's {tool} failed ({what}): {detail}")
    return time.perf_counter() - started


def calibration_folder(feeds: dict[str, np.ndarray], source: Source, folder: Path, limit: int) -> int:
    """MNN's "sequence" calibration inputs: one folder per sample, ``input.json`` naming each input's
    shape and the outputs, and ``<input>.txt`` with its values. Returns the samples written."""
    n = min(next(iter(feeds.values())).shape[0], limit)
    outputs = [s.name for s in source.signature.outputs]
    for i in range(n):
        sample = folder / f"{i:05d}"
        sample.mkdir(parents=True)
        inputs = []
        for name, a in feeds.items():
            one = a[i : i + 1]
            inputs.append({"name": name, "shape": list(one.shape)})
            np.savetxt(sample / f"{name}.txt", one.reshape(-1))
        (sample / "input.json").write_text(json.dumps({"inputs": inputs, "outputs": outputs}))
    return n


def quantize(fp32: Path, out: Path, feeds: dict[str, np.ndarray], source: Source, spec: MNNConvertSpec,
             ctx: StepContext) -> dict[str, Any]:
    samples = ctx.workdir / "mnn_calibration"
    n = calibration_folder(feeds, source, samples, spec.calibration_samples)
    config = {"input_type": "sequence", "path": f"{samples}/", "used_sample_num": n,
              "feature_quantize_method": spec.feature_quantize_method,
              "weight_quantize_method": spec.weight_quantize_method, "model": str(fp32)}
    config_path = ctx.workdir / "mnn_quant.json"
    config_path.write_text(json.dumps(config))
    seconds = run_tool("mnnquant", [str(fp32), str(out), str(config_path)], out, "int8 calibration", ctx)
    return {"calibration_samples": n, "quantize_time_s": seconds, "config": config}


#: ONNX recurrent ops. MNN's converter rewrites them into a ``While`` loop by default, which crashes
#: on torch's LSTM export (SIGBUS/SIGSEGV in MNN 3.6) and whose int8 model stops at "Compute Shape
#: Error" on a GRU; MNN's own RNN kernels (``--useOriginRNNImpl``) convert, run and quantize both.
RECURRENT_OPS = frozenset({"LSTM", "GRU", "RNN"})


def recurrent_ops(source: Source) -> list[str]:
    """The recurrent op types in the ONNX source's main graph (weights are not read)."""
    import onnx

    model_file = source.path / "model.onnx" if source.path.is_dir() else source.path
    graph = onnx.load(str(model_file), load_external_data=False).graph
    return sorted({node.op_type for node in graph.node} & RECURRENT_OPS)


def run(spec: MNNConvertSpec, ctx: StepContext) -> StepOutput:
    model_path = ctx.input("model_uri")
    assert model_path is not None
    source = read_source(model_path, spec.model_uri, ("onnx",))
    calibration = read_data(ctx.input("calibration_data_uri"), source, field="calibration_data_uri")
    evaluation = read_data(ctx.input("eval_data_uri"), source, field="eval_data_uri")

    folder = ctx.workdir / ARTIFACT
    folder.mkdir()
    target = folder / MODEL_FILE
    converted = ctx.workdir / "fp32.mnn" if spec.precision == "int8" else target
    options = {"fp16": ["--fp16"], "int8_weights": ["--weightQuantBits", "8"]}.get(spec.precision, [])
    recurrent = recurrent_ops(source)
    if recurrent:
        ctx.log.info("MNN: %s ops convert to MNN's own RNN kernels (--useOriginRNNImpl), not a While loop", recurrent)
        options = [*options, "--useOriginRNNImpl"]
    args = ["-f", "ONNX", "--modelFile", str(source.path), "--MNNModel", str(converted), "--bizCode", "airflow-modelopt",
            *options]
    metrics: dict[str, float] = {"conversion_time_s": run_tool("mnnconvert", args, converted, spec.precision, ctx)}
    info: dict[str, Any] = {"precision": spec.precision, "converter_options": options}
    if spec.precision == "int8":
        assert calibration is not None
        done = quantize(converted, target, calibration[0], source, spec, ctx)
        metrics["quantize_time_s"] = done["quantize_time_s"]
        metrics["calibration_samples"] = float(done["calibration_samples"])
        info["quantization"] = done["config"]
    signature = converted_signature(source, "mnn")
    signature.write(folder)

    size = target.stat().st_size
    metrics.update({"mnn_bytes": float(size), "source_bytes": float(source.bytes),
                    "size_ratio": size / source.bytes if source.bytes else 0.0,
                    "precision_bits": float(PRECISION_BITS[spec.precision])})
    check = evaluation or calibration
    if check is not None:
        feeds, labels = check
        info["checked_on"] = "eval_data_uri" if evaluation else "calibration_data_uri"
        metrics.update(check_against_source(source, target, "mnn", feeds, labels, threads=spec.threads))
        ctx.log.info("MNN vs source: %s", {k: round(v, 4) for k, v in metrics.items()})
    from airflow_modelopt.container.pyfunc import log_step_deployable

    artifacts = log_step_deployable(ctx, folder, "mnn", ARTIFACT, data=check[0] if check is not None else None)
    info["signature"] = signature.model_dump(mode="json")
    return StepOutput(artifacts=artifacts, metrics=metrics, info=info)


__all__ = ["ARTIFACT", "MODEL_FILE", "RECURRENT_OPS", "calibration_folder", "quantize", "recurrent_ops", "run",
           "run_tool"]
