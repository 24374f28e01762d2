"""MNN: a ``.mnn`` model on MNN's CPU backend, through its Module API
(``MNN.nn.load_module_from_file``), which resizes to each batch it is fed.

Run at precision ``high`` (fp32 arithmetic; ``normal`` lets ARM CPUs with fp16 compute use it) with
``threads`` threads. fp16 and int8 *weights* (the converter's ``--fp16`` / ``--weightQuantBits 8``)
are decoded when the model loads; a model with int8 feature maps (``mnnquant``) runs int8 kernels.

The .mnn file records its tensors' names but fixes every dimension, the batch too (to 1 when the
source's was dynamic); dtypes come from MNN's Interpreter. When ``modelopt_signature.json`` (written
by the mnn_convert step from the source ONNX model) lies beside the file, its shapes win, so a
dynamic batch stays dynamic. Without one the recorded batch is the model's fixed batch.

Never import ``MNN.tools``: its converter wrappers send usage logs to Alibaba Cloud and run
``pip install`` when a logging SDK is missing. The mnn_convert step calls the compiled converter
(``_tools``) directly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from airflow_modelopt.container.runtimes.base import Runtime
from airflow_modelopt.container.signature import ModelSignature, TensorSpec

PRECISION = "high"


def _specs(tensors: dict[str, object], shapes: dict[str, list[int | str]] | None = None) -> list[TensorSpec]:
    return [TensorSpec(name=name, shape=(shapes or {}).get(name) or [int(d) for d in t.getShape()],  # type: ignore[attr-defined]
                       dtype=np.dtype(t.getNumpyData().dtype).name)  # type: ignore[attr-defined]
            for name, t in tensors.items()]


def _native_specs(interpreter: object, session: object) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The file's input and output tensors. A dimension the source left dynamic (a sequence length)
    is stored as -1, and MNN cannot allocate such a tensor to tell its dtype: those inputs are
    resized to 1 there first, and the dimension is reported by name (``dim2``), as dynamic."""
    inputs = interpreter.getSessionInputAll(session)  # type: ignore[attr-defined]
    shapes: dict[str, list[int | str]] = {}
    for name, t in inputs.items():
        dims = [int(d) for d in t.getShape()]
        if any(d < 0 for d in dims):
            shapes[name] = [d if d >= 0 else f"dim{k}" for k, d in enumerate(dims)]
            interpreter.resizeTensor(t, tuple(max(d, 1) for d in dims))  # type: ignore[attr-defined]
    if shapes:
        interpreter.resizeSession(session)  # type: ignore[attr-defined]
    return _specs(inputs, shapes), _specs(interpreter.getSessionOutputAll(session))  # type: ignore[attr-defined]


class MNNRuntime(Runtime):
    format = "mnn"

    def __init__(self, path: Path, *, fmt: str, threads: int, signature: ModelSignature | None, device: str = "cpu",
                 origin: str | None = None) -> None:
        import MNN

        super().__init__(path, threads=threads, signature=signature, origin=origin)
        interpreter = MNN.Interpreter(str(path))
        session = interpreter.createSession({"numThread": threads, "precision": PRECISION})
        native_in, native_out = _native_specs(interpreter, session)
        del session, interpreter
        if signature is not None:  # the file fixes the batch; the source's record knows better
            self.unknown_shapes = {s.name for s in native_in + native_out}
        self.apply_signature(native_in, native_out)
        config = {"backend": "CPU", "precision": PRECISION, "numThread": threads}
        self._manager = MNN.nn.create_runtime_manager((config,))
        self.module = MNN.nn.load_module_from_file(
            str(path), [s.name for s in self.inputs], [s.name for s in self.outputs], runtime_manager=self._manager,
        )
        self.providers = ["CPU"]
        self.runtime_name = f"MNN {MNN.version()} (CPU, precision {PRECISION})"

    def run_native(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import MNN.expr as F

        args = []
        for spec in self.inputs:
            a = np.ascontiguousarray(feeds[spec.name])
            if a.dtype == np.int64 and (a.size == 0 or (a.min() >= -2**31 and a.max() < 2**31)):
                a = a.astype(np.int32)  # MNN's converter stores int64 inputs (token ids) as int32
            dtype = F.float if a.dtype == np.float32 else F.int if a.dtype == np.int32 else None
            if dtype is None:
                raise ValueError(f"MNN input {spec.name!r}: {a.dtype} is not fed by this runtime (float32, int32)")
            args.append(F.const(a, list(a.shape), F.NCHW, dtype))
        outs = self.module.forward(args)
        if len(outs) != len(self.outputs):  # MNN prints its error code and returns nothing
            raise RuntimeError(f"MNN's forward returned {len(outs)} of the model's {len(self.outputs)} output(s): "
                               "the model failed to run (MNN's own error code is in the log above)")
        results = []
        for out in outs:
            if out.data_format == F.NC4HW4:
                out = F.convert(out, F.NCHW)
            results.append(np.array(out.read(), copy=True))
        return results

    def close(self) -> None:
        self.module = None
        self._manager = None
