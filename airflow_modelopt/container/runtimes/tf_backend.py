"""TensorFlow runtimes: SavedModel (its ``serving_default`` signature) and Keras files.

A ``.keras`` archive records the Keras version that wrote it (metadata.json): 2.x files load with
tf_keras, 3.x with Keras 3. Legacy ``.h5`` files try tf_keras first. SavedModel outputs are a
dict; they are ordered as ``modelopt_signature.json`` records them, else by name.

Threads: TensorFlow's intra-op pool (process-wide, fixed at its first use).
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from airflow_modelopt.container import trust
from airflow_modelopt.container.runtimes.base import Runtime
from airflow_modelopt.container.signature import ModelSignature, TensorSpec

log = logging.getLogger("airflow_modelopt.container.runtimes")


def _tensorflow(threads: int) -> Any:
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # already initialized in this process: keep its pool
        current = tf.config.threading.get_intra_op_parallelism_threads()
        if current not in (0, threads):
            log.warning("TensorFlow already runs with %d intra-op threads in this process; %d asked", current, threads)
    return tf


def _dims(shape: Any) -> list[int | None]:
    return [None if d is None else int(d) for d in shape]


def _dtype_name(dtype: Any) -> str:
    return np.dtype(getattr(dtype, "as_numpy_dtype", dtype)).name


class SavedModelRuntime(Runtime):
    format = "savedmodel"

    def __init__(self, path: Path, *, fmt: str, threads: int, signature: ModelSignature | None, device: str = "cpu",
                 origin: str | None = None) -> None:
        tf = _tensorflow(threads)
        super().__init__(path, threads=threads, signature=signature, origin=origin)
        self.runtime_name = f"tensorflow {tf.__version__} (SavedModel)"
        self._model = tf.saved_model.load(str(path))
        sigs = getattr(self._model, "signatures", {})
        key = "serving_default" if "serving_default" in sigs else (next(iter(sigs)) if sigs else None)
        if key is None:
            raise ValueError("the SavedModel has no signatures (export it with a serving_default signature)")
        self._fn = sigs[key]
        args, kwargs = self._fn.structured_input_signature
        if args:
            raise ValueError(f"signature {key!r} takes positional inputs; only named inputs are supported")
        native_in = [TensorSpec(name=n, shape=_dims(s.shape), dtype=_dtype_name(s.dtype)) for n, s in kwargs.items()]
        outs = self._fn.structured_outputs
        if not isinstance(outs, dict):
            raise ValueError(f"signature {key!r} returns {type(outs).__name__}; a dict of named outputs is expected")
        recorded = [o.name for o in signature.outputs] if signature else []
        names = recorded if sorted(recorded) == sorted(outs) else sorted(outs)
        native_out = [TensorSpec(name=n, shape=_dims(outs[n].shape), dtype=_dtype_name(outs[n].dtype)) for n in names]
        self.apply_signature(native_in, native_out)

    def run_native(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import tensorflow as tf

        result = self._fn(**{k: tf.constant(v) for k, v in feeds.items()})
        return [result[s.name].numpy() for s in self.outputs]

    def close(self) -> None:
        self._fn = self._model = None


def keras_flavour(path: Path) -> str:
    """``tf_keras`` or ``keras``: the package that wrote the file, as far as it says."""
    if path.suffix.lower() == ".keras":
        try:
            with zipfile.ZipFile(path) as z:
                meta = json.loads(z.read("metadata.json"))
            return "tf_keras" if str(meta.get("keras_version", "3")).startswith("2.") else "keras"
        except (OSError, KeyError, ValueError, zipfile.BadZipFile):
            return "keras"
    return "tf_keras"  # .h5: the legacy format, tf_keras's own


class KerasRuntime(Runtime):
    format = "keras"

    def __init__(self, path: Path, *, fmt: str, threads: int, signature: ModelSignature | None, device: str = "cpu",
                 origin: str | None = None) -> None:
        tf = _tensorflow(threads)
        super().__init__(path, threads=threads, signature=signature, origin=origin)
        first = keras_flavour(path)
        order = [first, "keras" if first == "tf_keras" else "tf_keras"]
        errors = []
        for name in order:
            try:
                module = __import__(name)
                # safe_mode refuses Lambda layers' pickled bytecode unless the step trusts model code
                self.model = module.models.load_model(str(path), compile=False,
                                                      safe_mode=not trust.model_code_allowed())
                self.runtime_name = f"{name} {module.__version__} (tensorflow {tf.__version__})"
                break
            except ImportError as exc:
                errors.append(f"{name}: not installed ({exc})")
            except Exception as exc:  # noqa: BLE001 - try the other Keras, then report both
                errors.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:500] if str(exc) else ''}")
        else:
            raise ValueError("no Keras could load it: " + "; ".join(errors))
        native_in = [
            TensorSpec(name=str(t.name).split(":")[0], shape=_dims(t.shape), dtype=_dtype_name(t.dtype))
            for t in self.model.inputs
        ]
        out_names = list(getattr(self.model, "output_names", None) or [])
        if len(out_names) != len(self.model.outputs):
            out_names = ["output"] if len(self.model.outputs) == 1 else [f"output_{i}" for i in range(len(self.model.outputs))]
        native_out = [
            TensorSpec(name=n, shape=_dims(t.shape), dtype=_dtype_name(t.dtype)) for n, t in zip(out_names, self.model.outputs)
        ]
        self.apply_signature(native_in, native_out)

    def run_native(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        args = [feeds[s.name] for s in self.inputs]
        out = self.model(args[0] if len(args) == 1 else args, training=False)
        if isinstance(out, dict):
            out = [out[s.name] for s in self.outputs]
        elif not isinstance(out, (list, tuple)):
            out = [out]
        return [np.asarray(o) for o in out]

    def close(self) -> None:
        self.model = None
