"""int8 calibration: batches drawn in order from the calibration data at the calibration shape
(the opt shape of optimization profile 0), fed to TensorRT by an ``IInt8EntropyCalibrator2`` from
device buffers (``runtimes/cuda.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from airflow_modelopt.container.data import as_model_dtype, match_inputs
from airflow_modelopt.container.steps.tensorrt_build.profiles import IOTensor, Shapes
from airflow_modelopt.exceptions import InputError
from airflow_modelopt.specs.tensorrt_build import TensorRTBuildSpec


@dataclass
class Calibration:
    batches: list[dict[str, np.ndarray]]
    batch_size: int
    samples_available: int
    requested: int

    def summary(self) -> dict[str, Any]:
        return {"batches": len(self.batches), "batch_size": self.batch_size, "samples_used": len(self.batches) *
                self.batch_size, "samples_available": self.samples_available, "batches_requested": self.requested}


def calibration_batches(arrays: dict[str, np.ndarray], inputs: list[IOTensor], profiles: list[dict[str, Shapes]],
                        spec: TensorRTBuildSpec) -> Calibration:
    """Batches at the calibration shape (opt shape of profile 0, or the fixed input shape), in data order."""
    field_name = "calibration_data_uri"
    matched = match_inputs(arrays, [t.name for t in inputs], field=field_name)
    targets: dict[str, list[int]] = {}
    feeds: dict[str, np.ndarray] = {}
    for t in inputs:
        a = as_model_dtype(matched[t.name])
        if profiles and t.name in profiles[0]:
            target, what = profiles[0][t.name][1], "the opt shape of optimization profile 0 (calibration profile)"
        else:
            target, what = t.shape, "the model's fixed input shape"
        if list(a.shape[1:]) != list(target[1:]):
            raise InputError(
                f"{field_name}: input {t.name!r} has samples of shape {list(a.shape[1:])} but calibration runs at "
                f"{target}, {what}; the dimensions after the batch must match"
            )
        want = np.dtype(t.dtype) if t.dtype in np.sctypeDict else None
        if want is not None and a.dtype != want:
            if a.dtype.kind != want.kind:
                raise InputError(f"{field_name}: input {t.name!r} is {a.dtype.name} but the model takes {want.name}")
            a = a.astype(want)
        targets[t.name], feeds[t.name] = target, a
    available = next(iter(feeds.values())).shape[0]
    per_input = {name: available // max(target[0], 1) for name, target in targets.items()}
    count = min([spec.calibration_batches, *per_input.values()])
    if count < 1:
        name = min(per_input, key=per_input.get)  # type: ignore[arg-type]
        raise InputError(
            f"{field_name}: holds {available} samples but one calibration batch of input {name!r} needs "
            f"{targets[name][0]} (the batch of {targets[name]}); give more samples or a smaller opt batch"
        )
    batches = []
    for i in range(count):
        batches.append({name: np.ascontiguousarray(a[i * targets[name][0]:(i + 1) * targets[name][0]])
                        for name, a in feeds.items()})
    batch_size = targets[inputs[0].name][0]
    return Calibration(batches, batch_size, available, spec.calibration_batches)


def make_calibrator(trt: Any, calibration: Calibration, memory: Any) -> Any:
    """An IInt8EntropyCalibrator2 feeding the batches in order from device buffers."""

    class _EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batches = calibration.batches
            self.index = 0
            self.cache: bytes | None = None
            self.error: BaseException | None = None
            self.pointers = {name: memory.alloc(a.nbytes) for name, a in self.batches[0].items()}

        def get_batch_size(self) -> int:
            return calibration.batch_size

        def get_batch(self, names: list[str], *_: Any) -> list[int] | None:
            try:
                if self.index >= len(self.batches):
                    return None
                batch = self.batches[self.index]
                missing = [n for n in names if n not in batch]
                if missing:
                    raise InputError(f"calibration_data_uri: TensorRT asked for input(s) {missing} the data does not hold")
                for name in names:
                    memory.copy_to_device(self.pointers[name], batch[name])
                self.index += 1
                return [int(self.pointers[name]) for name in names]
            except BaseException as exc:  # TensorRT swallows exceptions from callbacks: keep it for later
                self.error = exc
                return None

        def read_calibration_cache(self) -> bytes | None:
            return None  # always calibrate on the given data

        def write_calibration_cache(self, cache: Any) -> None:
            self.cache = bytes(memoryview(cache))

        def release(self) -> None:
            for pointer in self.pointers.values():
                memory.free(pointer)
            self.pointers = {}

    return _EntropyCalibrator()


__all__ = ["Calibration", "calibration_batches", "make_calibrator"]
