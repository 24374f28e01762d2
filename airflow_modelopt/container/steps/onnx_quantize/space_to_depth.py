"""Space-to-depth for a strided int8 convolution on few channels (a CNN's stem).

A ResNet's first layer, a 7x7 stride-2 convolution on 3 channels, costs ONNX Runtime as much in
int8 as in fp32 (about a fifth of the int8 ResNet-18): with 3 input channels its int8 kernel
multiplies vectors too short for VNNI. The same convolution can be written on a space-to-depth
view of its input: pad the input, fold each s x s block of pixels into channels (``SpaceToDepth``,
s = the stride), and convolve with stride 1 over ``s*s*C`` channels with a kernel of
``ceil((k + e) / s)`` taps (e: the extra left padding that aligns the first tap to a block). The
new weight holds the old one, rearranged, and the weight's zero point at every tap the old kernel
did not have; the padding is the input's zero point. Every product the old convolution summed is
summed again and every added product is zero, so the int32 accumulator, and the output, are the
same bit for bit; no calibration changes and no accuracy is at stake, only speed.

:func:`rewrite` applies it to every QLinearConv that qualifies (group 1, equal strides of 2 or
more, no dilation, at most :data:`MAX_CHANNELS` input channels, input shape known), profiles the
model before and after with ORT's per-node profiler on this CPU, and keeps the rewrite only when
the rewritten convolutions, with their Pad and SpaceToDepth, take less time (:data:`KEEP_BELOW`).
Measured on a ResNet-18 stem (Xeon with AMX, 2 threads): the stem's QLinearConv ran in 296 us
instead of 604 us, for 85 us of Pad and SpaceToDepth; the whole int8 model went from 0.31x to
0.29x fp32.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

#: Input channels (per group) up to which a strided convolution is a candidate: the stem's 3 (RGB)
#: or 1 (gray), 4 with alpha. Wider inputs already fill the int8 kernel's vectors.
MAX_CHANNELS = 4
#: The rewrite is kept when its nodes' profiled time is below this fraction of the time without it.
KEEP_BELOW = 0.9
#: The names of the nodes the rewrite adds: ``<convolution's name>__s2d...``.
_SUFFIX = "__s2d"


def _attr(node: Any, name: str, default: Any) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _shapes(model: Any) -> dict[str, list[int | None]]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    out = {}
    for vi in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        out[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return out


def plan(model: Any) -> list[dict[str, Any]]:
    """The QLinearConv nodes the rewrite applies to, each with its padding and new kernel size."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    shapes = _shapes(model)
    found = []
    for node in model.graph.node:
        if node.op_type != "QLinearConv" or node.input[3] not in inits or node.input[2] not in inits:
            continue
        weight = inits[node.input[3]]
        if len(weight.dims) != 4 or _attr(node, "group", 1) != 1 or weight.dims[1] > MAX_CHANNELS:
            continue
        strides = list(_attr(node, "strides", [1, 1]))
        if len(set(strides)) != 1 or strides[0] < 2 or any(d != 1 for d in _attr(node, "dilations", [1, 1])):
            continue
        if _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue
        if numpy_helper.to_array(inits[node.input[2]]).size != 1:
            continue
        shape = shapes.get(node.input[0])
        if not shape or len(shape) != 4 or any(d is None for d in shape[2:]):
            continue
        s = strides[0]
        pads = list(_attr(node, "pads", [0, 0, 0, 0]))
        dims = []
        for axis, (size, k) in enumerate(zip(shape[2:], weight.dims[2:])):
            before, after = pads[axis], pads[axis + 2]
            out = (size + before + after - k) // s + 1
            left = math.ceil(before / s) * s  # the first tap of every output lands on a block's start
            taps = math.ceil((k + left - before) / s)
            right = s * (out + taps - 1) - left - size
            dims.append({"left": left, "right": right, "offset": left - before, "taps": taps})
        if any(d["right"] < 0 for d in dims):
            continue  # the input runs past the last window: would need cropping, not worth it
        found.append({"node": node.name, "stride": s, "channels": int(weight.dims[1]), "dims": dims})
    return found


def _rearranged(weight: np.ndarray, zero_point: np.ndarray, s: int, dims: list[dict[str, Any]]) -> np.ndarray:
    """(M, C, kh, kw) -> (M, s*s*C, taps_h, taps_w): the old taps at their place in the aligned
    window, the zero point elsewhere, folded the way ``SpaceToDepth`` folds the input."""
    m, c, kh, kw = weight.shape
    th, tw = dims[0]["taps"], dims[1]["taps"]
    big = np.empty((m, c, th * s, tw * s), weight.dtype)
    big[...] = zero_point.reshape(-1, 1, 1, 1) if zero_point.size > 1 else zero_point.reshape(())
    oh, ow = dims[0]["offset"], dims[1]["offset"]
    big[:, :, oh:oh + kh, ow:ow + kw] = weight
    return big.reshape(m, c, th, s, tw, s).transpose(0, 3, 5, 1, 2, 4).reshape(m, s * s * c, th, tw)


def apply(model: Any, targets: list[dict[str, Any]]) -> Any:
    """A copy of ``model`` with each planned QLinearConv reading a padded, space-to-depth input."""
    import onnx
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {i.name: i for i in out.graph.initializer}
    by_name = {t["node"]: t for t in targets}
    nodes = []
    for node in out.graph.node:
        target = by_name.get(node.name)
        if target is None:
            nodes.append(node)
            continue
        s, dims, name = target["stride"], target["dims"], node.name
        weight = numpy_helper.to_array(inits[node.input[3]])
        zero_point = numpy_helper.to_array(inits[node.input[5]])
        new_weight = numpy_helper.from_array(_rearranged(weight, zero_point, s, dims), f"{node.input[3]}__s2d")
        pads = numpy_helper.from_array(np.array([0, 0, dims[0]["left"], dims[1]["left"],
                                                 0, 0, dims[0]["right"], dims[1]["right"]], np.int64), f"{name}{_SUFFIX}_pads")
        out.graph.initializer.extend([new_weight, pads])
        padded, folded = f"{name}{_SUFFIX}_padded", f"{name}{_SUFFIX}_folded"
        nodes.append(helper.make_node("Pad", [node.input[0], pads.name, node.input[2]], [padded],
                                      name=f"{name}{_SUFFIX}_pad", mode="constant"))
        nodes.append(helper.make_node("SpaceToDepth", [padded], [folded], name=f"{name}{_SUFFIX}", blocksize=s))
        inputs = list(node.input)
        inputs[0], inputs[3] = folded, new_weight.name
        nodes.append(helper.make_node("QLinearConv", inputs, list(node.output), name=name,
                                      kernel_shape=[dims[0]["taps"], dims[1]["taps"]], strides=[1, 1],
                                      pads=[0, 0, 0, 0], dilations=[1, 1], group=1))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    used = {i for n in out.graph.node for i in n.input}
    kept = [i for i in out.graph.initializer if i.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    return out


def _group_us(path: Path, feed: dict[str, np.ndarray], threads: int, names: set[str], runs: int = 20) -> float:
    """Kernel time per run (µs, mean of ``runs``) of the nodes ``names`` and the Pad and
    SpaceToDepth nodes the rewrite puts before them, from ORT's per-node profile."""
    from airflow_modelopt.container.steps.onnx_quantize.layerwise import kernel_events

    events = kernel_events(path, feed, threads, warmup=10, runs=runs)
    return sum(e["us"] for e in events if e["node"] in names or e["node"].split(_SUFFIX)[0] in names) / runs


def rewrite(model_path: Path, out_dir: Path, feed: dict[str, np.ndarray], threads: int, log: Any,
            rounds: int = 3) -> tuple[Path, dict[str, Any]]:
    """``model_path`` with the space-to-depth rewrite when ORT runs the rewritten convolutions
    (with their Pad and SpaceToDepth) faster here, else as it is; (model path, record: the nodes,
    their profiled µs per run before and after, kept or not)."""
    import onnx

    model = onnx.load(str(model_path))
    try:
        targets = plan(model)
    except Exception as exc:  # noqa: BLE001 - an optional speed-up: the model as it is
        log.warning("Space-to-depth: not tried, the model's shapes could not be inferred: %s", exc)
        return model_path, {"nodes": [], "kept": False, "error": str(exc)[:500]}
    if not targets:
        return model_path, {"nodes": [], "kept": False}
    names = {t["node"] for t in targets}
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "model.onnx"
    before, after = [], []
    try:
        onnx.save_model(apply(model, targets), str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=1024)
        for _ in range(rounds):  # alternating, one session alive at a time: load drift hits both
            before.append(_group_us(model_path, feed, threads, names))
            after.append(_group_us(out, feed, threads, names))
    except Exception as exc:  # noqa: BLE001 - ORT refused the rewritten model: the model as it is
        log.warning("Space-to-depth on %s: not kept, the rewritten model failed: %s", ", ".join(sorted(names)), exc)
        return model_path, {"nodes": sorted(names), "kept": False, "error": str(exc)[:500]}
    before_us, after_us = float(np.median(before)), float(np.median(after))
    kept = after_us < KEEP_BELOW * before_us
    record = {"nodes": [t["node"] for t in targets], "before_us": round(before_us, 1),
              "after_us": round(after_us, 1), "kept": kept}
    log.info("Space-to-depth on %s: profiled %.0f us per run without, %.0f us with (Pad and SpaceToDepth "
             "included); %s", ", ".join(record["nodes"]), before_us, after_us, "kept" if kept else "not kept")
    return (out if kept else model_path), record


__all__ = ["MAX_CHANNELS", "apply", "plan", "rewrite"]
