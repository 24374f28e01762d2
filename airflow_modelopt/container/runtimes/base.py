"""The interface every runtime shares, and the I/O conversions done from the recorded signature.

A runtime has two faces:

- native: ``inputs`` / ``outputs`` are the model's own tensors (name, shape, dtype, layout,
  quantization) and ``run_native`` takes and returns arrays exactly as the model does;
- logical: ``run`` takes float arrays in the *source* layout (the layout of the model this one
  was converted from, i.e. of the evaluation data), keyed by the source tensor name (or ``x``),
  and returns float32 outputs in the source layout. ``prepare`` and ``finish`` do the conversion:
  NCHW <-> NHWC transposes and int8/uint8 quantization (real = scale * (q - zero_point)), both
  taken from the recorded signature (``modelopt_signature.json``) or the model itself, never
  guessed from shapes.

Heavy frameworks are imported by the backends only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from airflow_modelopt.container.signature import ModelSignature, Quantization, TensorSpec
from airflow_modelopt.exceptions import InputError

log = logging.getLogger("airflow_modelopt.container.runtimes")

#: Axis permutations between layouts: array.transpose(perm) turns the first layout into the second.
_PERMS: dict[tuple[str, str], tuple[int, ...]] = {
    ("NCHW", "NHWC"): (0, 2, 3, 1),
    ("NHWC", "NCHW"): (0, 3, 1, 2),
    ("NCW", "NWC"): (0, 2, 1),
    ("NWC", "NCW"): (0, 2, 1),
}


def layout_perm(src: str | None, dst: str | None) -> tuple[int, ...] | None:
    """The transpose turning layout ``src`` into ``dst``; None when equal, unknown or unrelated."""
    if not src or not dst or src == dst:
        return None
    return _PERMS.get((src, dst))


def quantize(values: np.ndarray, q: Quantization, dtype: np.dtype) -> np.ndarray:
    """Real values -> integers of ``dtype``: round(x / scale) + zero_point, saturated to its range."""
    info = np.iinfo(dtype)
    scaled = np.rint(values.astype(np.float64) / q.scale) + q.zero_point
    return np.clip(scaled, info.min, info.max).astype(dtype)


def dequantize(values: np.ndarray, q: Quantization) -> np.ndarray:
    """Integers -> real values: scale * (q - zero_point), as float32."""
    return (q.scale * (values.astype(np.float64) - q.zero_point)).astype(np.float32)


def is_dynamic(dim: Any) -> bool:
    return dim is None or isinstance(dim, str) or (isinstance(dim, int) and dim < 1)


def shape_text(shape: list[Any] | tuple[Any, ...]) -> str:
    return "[" + ", ".join("?" if is_dynamic(d) else str(d) for d in shape) + "]"


class Runtime:
    """A loaded model. Subclasses set ``format``, ``runtime_name``, ``inputs``, ``outputs`` and
    implement ``run_native`` (and ``close`` when they hold resources)."""

    format: str = ""
    runtime_name: str = ""

    def __init__(self, path: Path, *, threads: int, signature: ModelSignature | None, origin: str | None = None) -> None:
        self.path = Path(path)
        self.threads = threads
        self.signature = signature
        self.origin = origin or str(path)
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []
        #: names of tensors whose shape the model does not tell (plain TorchScript)
        self.unknown_shapes: set[str] = set()
        self.providers: list[str] = []
        #: the largest batch a dynamic-batch model takes (TensorRT profiles), None when unbounded
        self.max_batch: int | None = None

    # -- native interface (per backend) --------------------------------------------------------

    def run_native(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        """Release the model's resources; the runtime is unusable afterwards."""

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- signature ----------------------------------------------------------------------------

    @property
    def source_layout(self) -> str | None:
        return self.signature.source_layout if self.signature else None

    @property
    def feed_names(self) -> list[str]:
        """Keys ``run`` expects: each input's source-model name (the data artifact's keys)."""
        return [s.source_name or s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.source_name or s.name for s in self.outputs]

    def apply_signature(self, native_in: list[TensorSpec], native_out: list[TensorSpec]) -> None:
        """Set ``inputs``/``outputs``: the model's own tensors, completed by the recorded signature
        (layout, quantization, source names; outputs ordered as recorded)."""
        sig = self.signature
        if sig is None:
            self.inputs, self.outputs = native_in, native_out
            return
        self.inputs = self._merge(native_in, sig.inputs, "input", reorder=False)
        self.outputs = self._merge(native_out, sig.outputs, "output", reorder=True)

    def _merge(self, native: list[TensorSpec], recorded: list[TensorSpec], kind: str, *, reorder: bool) -> list[TensorSpec]:
        where = f"{self.origin}: modelopt_signature.json"
        if len(recorded) != len(native):
            raise InputError(
                f"{where} records {len(recorded)} {kind}s {[r.name for r in recorded]} but the {self.format} model "
                f"has {len(native)}: {[n.name for n in native]}"
            )
        by_name = {n.name: n for n in native}
        if all(r.name in by_name for r in recorded):
            pairs = [(by_name[r.name], r) for r in recorded] if reorder else [
                (n, next(r for r in recorded if r.name == n.name)) for n in native
            ]
        else:
            log.warning("%s: %s names %s do not match the model's %s; pairing them by position", where, kind,
                        [r.name for r in recorded], [n.name for n in native])
            pairs = list(zip(native, recorded))
        merged = []
        for n, r in pairs:
            shape, dtype = n.shape, n.dtype
            if n.name in self.unknown_shapes:  # the model does not tell: the record does
                shape, dtype = r.shape, r.dtype
                if r.shape:
                    self.unknown_shapes.discard(n.name)
            elif r.dtype and np.dtype(r.dtype) != np.dtype(n.dtype):
                raise InputError(
                    f"{where} says {kind} {n.name!r} is {r.dtype} but the {self.format} model's {kind} is {n.dtype}"
                )
            quant = n.quantization or r.quantization
            if n.quantization and r.quantization and n.quantization != r.quantization:
                log.warning("%s: %s %r quantization %s differs from the model's %s; using the model's", where, kind,
                            n.name, r.quantization, n.quantization)
            merged.append(n.model_copy(update={
                "layout": r.layout or n.layout, "quantization": quant, "source_name": r.source_name or n.source_name,
                "shape": shape, "dtype": dtype,
            }))
        return merged

    def logical_shape(self, spec: TensorSpec) -> list[Any]:
        """The tensor's shape in the source layout (what the data holds)."""
        perm = layout_perm(spec.layout, self.source_layout)
        if perm is None or len(spec.shape) != len(perm):
            return list(spec.shape)
        return [spec.shape[i] for i in perm]

    @property
    def fixed_batch(self) -> int | None:
        """The batch size every input is fixed to, or None when the batch is dynamic."""
        sizes = set()
        for s in self.inputs:
            if s.name in self.unknown_shapes or not s.shape:
                return None
            d = s.shape[0]
            if is_dynamic(d):
                return None
            sizes.add(int(d))
        return sizes.pop() if len(sizes) == 1 else None

    # -- logical interface --------------------------------------------------------------------

    def prepare(self, feeds: dict[str, np.ndarray], *, field: str = "data") -> dict[str, np.ndarray]:
        """Logical feeds (source layout, real values) -> native feeds; raise InputError naming the
        input, and what was expected, on a missing input or a wrong shape or dtype."""
        native: dict[str, np.ndarray] = {}
        for spec in self.inputs:
            key = spec.source_name or spec.name
            if key in feeds:
                a = feeds[key]
            elif spec.name in feeds:
                a = feeds[spec.name]
            elif len(self.inputs) == 1 and len(feeds) == 1:
                a = next(iter(feeds.values()))
            else:
                raise InputError(
                    f"{field}: the {self.format} model needs input {key!r} but the data has {sorted(feeds)}"
                )
            a = np.asarray(a)
            self._check_shape(spec, a, field)
            perm = layout_perm(self.source_layout, spec.layout)
            if perm is not None and a.ndim == len(perm):
                a = a.transpose(perm)
            native[spec.name] = np.ascontiguousarray(self._to_dtype(spec, a, key, field))
        return native

    def _check_shape(self, spec: TensorSpec, a: np.ndarray, field: str) -> None:
        if spec.name in self.unknown_shapes or not spec.shape:
            return
        key = spec.source_name or spec.name
        expected = self.logical_shape(spec)
        layout = self.source_layout or spec.layout
        in_layout = f" ({layout})" if layout else ""
        if a.ndim != len(expected):
            raise InputError(
                f"{field}: input {key!r} of the {self.format} model expects shape {shape_text(expected)}{in_layout} "
                f"(rank {len(expected)}) but the data has shape {list(a.shape)}"
            )
        for axis, (want, got) in enumerate(zip(expected, a.shape)):
            if axis == 0 or is_dynamic(want):
                continue
            if int(want) != got:
                raise InputError(
                    f"{field}: input {key!r} of the {self.format} model expects shape {shape_text(expected)}{in_layout} "
                    f"but the data has shape {list(a.shape)} (dimension {axis} is {got}, expected {want})"
                )

    def _to_dtype(self, spec: TensorSpec, a: np.ndarray, key: str, field: str) -> np.ndarray:
        want = np.dtype(spec.dtype)
        if a.dtype == want:
            return a
        if want.kind in "iu" and spec.quantization is not None:
            if a.dtype.kind == "f":
                return quantize(a, spec.quantization, want)
            raise InputError(
                f"{field}: input {key!r} is quantized {want.name} (scale {spec.quantization.scale:g}, zero point "
                f"{spec.quantization.zero_point}); give real (float) values or {want.name} values, not {a.dtype.name}"
            )
        if want.kind == "f" and a.dtype.kind == "f":
            return a.astype(want)
        if want.kind in "iu" and a.dtype.kind in "iu":
            info = np.iinfo(want)
            if a.size and (a.min() < info.min or a.max() > info.max):
                raise InputError(f"{field}: input {key!r} values exceed the range of the model's {want.name}")
            return a.astype(want)
        raise InputError(
            f"{field}: input {key!r} of the {self.format} model expects {want.name} values but the data has {a.dtype.name}"
        )

    def finish(self, outputs: list[np.ndarray]) -> list[np.ndarray]:
        """Native outputs -> real values (float32 when quantized) in the source layout."""
        done = []
        for spec, out in zip(self.outputs, outputs):
            out = np.asarray(out)
            if spec.quantization is not None and out.dtype.kind in "iu":
                out = dequantize(out, spec.quantization)
            perm = layout_perm(spec.layout, self.source_layout)
            if perm is not None and out.ndim == len(perm):
                out = out.transpose(perm)
            done.append(np.ascontiguousarray(out))
        return done

    def run(self, feeds: dict[str, np.ndarray], *, batch_size: int | None = None, field: str = "data") -> list[np.ndarray]:
        """Logical feeds -> logical outputs, in chunks of ``batch_size`` (or of the model's fixed
        batch, padding the last chunk by repeating its last sample)."""
        native = self.prepare(feeds, field=field)
        n = next(iter(native.values())).shape[0] if native else 0
        fixed = self.fixed_batch
        limits = [b for b in (batch_size, self.max_batch) if b]
        step = fixed or (min(limits) if limits else n)
        if fixed is None and step >= n:
            return self.finish(self.run_native(native))
        chunks: list[list[np.ndarray]] = []
        for start in range(0, n, step):
            part = {k: v[start:start + step] for k, v in native.items()}
            got = next(iter(part.values())).shape[0]
            if fixed is not None and got < fixed:
                part = {k: np.concatenate([v, np.repeat(v[-1:], fixed - got, axis=0)]) for k, v in part.items()}
            outs = self.run_native(part)
            chunks.append([o[:got] for o in outs])
        return self.finish([np.concatenate([c[i] for c in chunks]) for i in range(len(self.outputs))])

    # -- facts --------------------------------------------------------------------------------

    def model_files(self) -> list[Path]:
        """The files that make up the model (for bytes on disk)."""
        if self.path.is_dir():
            return sorted(p for p in self.path.rglob("*") if p.is_file())
        return [self.path]

    def model_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.model_files())

    def describe(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "runtime": self.runtime_name,
            "threads": self.threads,
            "providers": list(self.providers),
            "path": str(self.path),
            "source_layout": self.source_layout,
            "inputs": [s.model_dump(exclude_none=True) for s in self.inputs],
            "outputs": [s.model_dump(exclude_none=True) for s in self.outputs],
        }

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.format} {self.path.name} via {self.runtime_name}>"
