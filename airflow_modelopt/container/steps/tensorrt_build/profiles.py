"""The parsed network's inputs and outputs, the optimization profiles to build for them, and the
builder flags for the precision."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from airflow_modelopt.exceptions import InputError
from airflow_modelopt.specs.tensorrt_build import TensorRTBuildSpec

#: (min, opt, max) shapes of one input in one profile.
Shapes = tuple[list[int], list[int], list[int]]


@dataclass
class IOTensor:
    name: str
    shape: list[int]  # -1 for a dynamic dimension
    dtype: str

    @property
    def dynamic_dims(self) -> list[int]:
        return [d for d, n in enumerate(self.shape) if n < 0]


def network_io(trt: Any, network: Any) -> tuple[list[IOTensor], list[IOTensor]]:
    def describe(t: Any) -> IOTensor:
        try:
            dtype = np.dtype(trt.nptype(t.dtype)).name
        except Exception:  # noqa: BLE001 - a TensorRT type numpy has no name for
            dtype = str(t.dtype).rsplit(".", 1)[-1].lower()
        return IOTensor(str(t.name), [int(d) for d in t.shape], dtype)

    inputs = [describe(network.get_input(i)) for i in range(network.num_inputs)]
    outputs = [describe(network.get_output(i)) for i in range(network.num_outputs)]
    return inputs, outputs


def resolve_profiles(spec: TensorRTBuildSpec, inputs: list[IOTensor]) -> list[dict[str, Shapes]]:
    """The optimization profiles to build, checked against the parsed network's inputs."""
    if spec.optimization_profiles:
        return [_given_profile(i, profile, inputs) for i, profile in enumerate(spec.optimization_profiles)]
    dynamic = [t for t in inputs if t.dynamic_dims]
    if not dynamic:
        return []
    shapes = {}
    for t in dynamic:
        if t.dynamic_dims != [0]:
            raise InputError(
                f"optimization_profiles: input {t.name!r} has dynamic dimension(s) {t.dynamic_dims} (shape {t.shape}) "
                "besides the batch; give optimization_profiles with min/opt/max shapes for it"
            )
        rest = t.shape[1:]
        shapes[t.name] = ([1, *rest], [spec.opt_batch_size, *rest], [spec.max_batch_size, *rest])
    return [shapes]


def _given_profile(i: int, profile: dict[str, Any], inputs: list[IOTensor]) -> dict[str, Shapes]:
    where = f"optimization_profiles[{i}]"
    by_name = {t.name: t for t in inputs}
    unknown = [n for n in profile if n not in by_name]
    if unknown:
        raise InputError(f"{where} names input(s) {unknown} which the model does not have; its inputs are "
                         f"{[t.name for t in inputs]}")
    uncovered = [f"{t.name!r} (shape {t.shape})" for t in inputs if t.dynamic_dims and t.name not in profile]
    if uncovered:
        raise InputError(f"{where} gives no min/opt/max shapes for dynamic input(s) {', '.join(uncovered)}")
    shapes: dict[str, Shapes] = {}
    for name, rng in profile.items():
        t = by_name[name]
        if len(rng.min) != len(t.shape):
            raise InputError(f"{where}[{name!r}] has rank {len(rng.min)} but the model's input {name!r} has "
                             f"shape {t.shape} (rank {len(t.shape)})")
        for d, fixed in enumerate(t.shape):
            given = {rng.min[d], rng.opt[d], rng.max[d]}
            if fixed >= 0 and given != {fixed}:
                raise InputError(
                    f"{where}[{name!r}] dimension {d} is fixed to {fixed} in the model (shape {t.shape}), but "
                    f"min/opt/max give {rng.min[d]}/{rng.opt[d]}/{rng.max[d]}"
                )
        shapes[name] = (list(rng.min), list(rng.opt), list(rng.max))
    return shapes


def precision_flags(spec: TensorRTBuildSpec) -> list[str]:
    """BuilderFlag names set for the precision."""
    if spec.precision == "fp16":
        return ["FP16"]
    if spec.precision == "int8":
        return ["INT8", "FP16"] if spec.int8_fp16_fallback else ["INT8"]
    return []


__all__ = ["IOTensor", "Shapes", "network_io", "precision_flags", "resolve_profiles"]
