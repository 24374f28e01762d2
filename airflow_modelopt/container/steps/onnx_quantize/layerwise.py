"""Per-layer kernel choice: ONNX Runtime runs a QLinearConv through one of two CPU kernels, and
which one is faster depends on the layer's shape and the CPU.

With symmetric int8 weights (zero point 0, ORT's default for int8) ORT takes its direct
"symmetric convolution" kernel; with asymmetric weights it takes im2col plus its general int8
GEMM, which on CPUs with AMX or wide VNNI is the faster one for layers with many channels and
small feature maps. Measured on a ResNet-18 shape (Xeon with AMX, 2 threads): the symmetric kernel
ran the 56x56 layers at 0.30x fp32 where the GEMM path took 0.45x, and the 7x7x512 layers at 0.35x
where the GEMM path took 0.16x. Neither whole model is the fastest.

The ``layerwise`` search configuration builds both models from the same calibration (so every
activation's scale and zero point are identical), profiles both with ORT's own per-node profiler
on this CPU, and composes one model: per QLinearConv, the weights (weight, scale, zero point and
the int32 bias, whose scale follows the weight's) of whichever kernel ran it faster. What each
layer got is recorded on the search's record. The composed model is then measured, gated and
timed like any other configuration.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

#: QLinearConv's inputs that belong to the weight: w, w_scale, w_zero_point, and the int32 bias
#: (quantized with x_scale * w_scale, so it changes with the weight's scale).
_WEIGHT_INPUTS = (3, 4, 5, 8)
#: Its activation quantization parameters: x_scale, x_zero_point, y_scale, y_zero_point.
_ACTIVATION_INPUTS = (1, 2, 6, 7)
#: ORT's layout transformers rename the nodes they rewrite (``<name>_token_<n>``).
_TOKEN_SUFFIX = re.compile(r"(_token_\d+)+$")


def kernel_events(model: Path, feed: dict[str, np.ndarray], threads: int, warmup: int,
                  runs: int) -> list[dict[str, Any]]:
    """ONNX Runtime's per-node profile (``SessionOptions.enable_profiling``) of ``runs`` runs after
    ``warmup`` untimed ones, the session set up as the runtimes layer sets one up: one event per
    node and run, ``{"node", "op", "us"}``; ``node`` is the graph's node name (ORT's layout
    renames undone). Profiling adds a little to every kernel: compare, don't report absolute."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.enable_profiling = True
    options.profile_file_prefix = str(model.parent / "ort_profile")
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    try:
        for _ in range(warmup + runs):
            session.run(None, feed)
    finally:
        trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    os.unlink(trace)
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    cutoff = starts[warmup] if len(starts) > warmup else 0
    return [{"node": _TOKEN_SUFFIX.sub("", e["name"][:-len("_kernel_time")]), "op": e["args"]["op_name"],
             "us": float(e["dur"])}
            for e in events
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= cutoff]


def node_times(models: dict[str, Path], feed: dict[str, np.ndarray], threads: int, *, op: str = "QLinearConv",
               warmup: int = 10, runs: int = 20, rounds: int = 2) -> dict[str, dict[str, float]]:
    """{model key: {node: median µs}} for the ``op`` nodes, the models profiled in turn for
    ``rounds`` rounds (one session alive at a time, so drift in the machine's load hits both)."""
    samples: dict[str, dict[str, list[float]]] = {key: {} for key in models}
    for _ in range(rounds):
        for key, path in models.items():
            for e in kernel_events(path, feed, threads, warmup, runs):
                if e["op"] == op:
                    samples[key].setdefault(e["node"], []).append(e["us"])
    return {key: {node: float(np.median(v)) for node, v in nodes.items()} for key, nodes in samples.items()}


def compose(symmetric: Path, asymmetric: Path, out_dir: Path, feed: dict[str, np.ndarray], threads: int,
            log: Any) -> tuple[Path, dict[str, Any]]:
    """The symmetric model with each QLinearConv the asymmetric one ran faster given that one's
    weights; (model path, record). Nodes whose activation parameters differ between the two (not
    the same calibration) keep the symmetric weights and are named in the record."""
    import onnx
    from onnx import numpy_helper

    base = onnx.load(str(symmetric))
    if not any(n.op_type == "QLinearConv" for n in base.graph.node):  # nothing to choose: no profiling
        log.info("Per-layer kernel choice: no QLinearConv nodes; the symmetric model as it is")
        return symmetric, {"nodes": 0, "asymmetric": 0, "symmetric_us": 0.0, "asymmetric_us": 0.0,
                           "composed_us": 0.0, "per_node": []}
    times = node_times({"symmetric": symmetric, "asymmetric": asymmetric}, feed, threads)
    other = onnx.load(str(asymmetric))
    base_init = {i.name: i for i in base.graph.initializer}
    other_init = {i.name: i for i in other.graph.initializer}
    other_nodes = {n.name: n for n in other.graph.node if n.op_type == "QLinearConv"}

    def same(a: str, b: str) -> bool:
        return (a in base_init and b in other_init
                and np.array_equal(numpy_helper.to_array(base_init[a]), numpy_helper.to_array(other_init[b])))

    per_node: list[dict[str, Any]] = []
    for node in base.graph.node:
        if node.op_type != "QLinearConv":
            continue
        twin = other_nodes.get(node.name)
        sym_us, asym_us = times["symmetric"].get(node.name), times["asymmetric"].get(node.name)
        entry: dict[str, Any] = {"node": node.name, "symmetric_us": sym_us, "asymmetric_us": asym_us,
                                 "chosen": "symmetric"}
        if twin is None or sym_us is None or asym_us is None:
            entry["why"] = "not profiled in both models"
        elif not all(same(node.input[i], twin.input[i]) for i in _ACTIVATION_INPUTS):
            entry["why"] = "activation quantization differs between the two models"
        elif asym_us < sym_us:
            for i in _WEIGHT_INPUTS:
                if i < len(twin.input) and twin.input[i]:
                    tensor = onnx.TensorProto()
                    tensor.CopyFrom(other_init[twin.input[i]])
                    tensor.name = f"{twin.input[i]}__asymmetric"
                    base.graph.initializer.append(tensor)
                    node.input[i] = tensor.name
            entry["chosen"] = "asymmetric"
        per_node.append(entry)
    # the symmetric weights the swapped nodes no longer read
    used = {i for n in base.graph.node for i in n.input}
    kept = [i for i in base.graph.initializer if i.name in used]
    del base.graph.initializer[:]
    base.graph.initializer.extend(kept)

    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "model.onnx"
    onnx.save_model(base, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    chosen = [e for e in per_node if e["chosen"] == "asymmetric"]
    known = [e for e in per_node if e["symmetric_us"] is not None and e["asymmetric_us"] is not None]
    record = {
        "nodes": len(per_node), "asymmetric": len(chosen),
        "symmetric_us": round(sum(e["symmetric_us"] for e in known), 1),
        "asymmetric_us": round(sum(e["asymmetric_us"] for e in known), 1),
        "composed_us": round(sum(min(e["symmetric_us"], e["asymmetric_us"]) for e in known), 1),
        "per_node": per_node,
    }
    log.info("Per-layer kernel choice: %d of %d QLinearConv nodes take asymmetric weights (ORT's GEMM path); "
             "profiled conv time %.0f us symmetric, %.0f us asymmetric, %.0f us composed", len(chosen), len(per_node),
             record["symmetric_us"], record["asymmetric_us"], record["composed_us"])
    return out, record


__all__ = ["compose", "kernel_events", "node_times"]
