"""PyTorch runtime: torch.export ExportedProgram (.pt2), TorchScript, MLflow pytorch models.

Threads: ``torch.set_num_threads`` (process-wide, as torch has no per-model setting). Outputs are
named ``output`` (one) or ``output_0``, ``output_1``, ... in return order, as torch_to_onnx names
them. A plain TorchScript file does not record its input shapes: give them in
``modelopt_signature.json`` (or an MLflow signature) to have the data checked before it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from airflow_modelopt.container import trust
from airflow_modelopt.container.runtimes.base import Runtime
from airflow_modelopt.container.signature import ModelSignature, TensorSpec
from airflow_modelopt.exceptions import InputError

# -- loading without running the file's code --------------------------------------------------


def load_exported_program(path: Path, *, field: str = "model_uri", origin: str | None = None) -> Any:
    """``torch.export.load`` of a .pt2 archive. Unless the step trusts model code
    (``container/trust.py``), every pickle inside is read with torch's weights-only unpickler (plain
    tensors) and any other pickled object is refused before it is unpickled, naming the file and
    the opt-in."""
    import torch

    _register_quantized_ops()
    if trust.model_code_allowed():
        return torch.export.load(str(path))
    with _weights_only_unpickling(Path(path), field, origin):
        return torch.export.load(str(path))


def _register_quantized_ops() -> None:
    """Register the ``quantized_decomposed`` ops PT2E int8 programs (the torch_quantize step) call:
    torch.export.load cannot resolve them otherwise. Part of torch, no torchao needed to run them."""
    try:
        import torch.ao.quantization.fx._decomposed  # noqa: F401
    except ImportError:  # a torch without them cannot run such a program; its load error says which op
        pass


def load_pickled_mlflow_model(path: Path, *, field: str = "model_uri", origin: str | None = None) -> Any:
    """An MLflow pytorch model saved with pickle (not the pt2 export, which loads through
    ``load_exported_program``): unpickling it runs its code, so only with the opt-in."""
    if not trust.model_code_allowed():
        raise InputError(
            f"{field}: {origin or path} is an MLflow pytorch model saved with pickle; loading it would run code "
            f"from the file. Log it with MLflow's pt2 export (mlflow.pytorch.log_model(..., export_model=True)) or a "
            f".pt2 file, or set {trust.OPT_IN}"
        )
    import mlflow.pytorch

    return mlflow.pytorch.load_model(str(path), map_location="cpu")


class _RefusedPickle(Exception):
    pass


def _weights_only_unpickling(path: Path, field: str, origin: str | None) -> Any:
    """Patch the three unpicklers torch.export's archive reader calls (torch 2.13:
    ``torch.load(weights_only=False)`` for weights and constants, ``pickle.loads`` and
    ``torch._C._pickle_load_obj`` for other constants) for the duration of one load."""
    import contextlib
    import pickle
    import re
    import types
    from unittest import mock

    import torch
    from torch.export.pt2_archive import _package

    where = origin or str(path)

    def refuse(what: str) -> InputError:
        return InputError(
            f"{field}: {where} holds {what}, which would run code from the file when loaded; refused. "
            f"Re-export the model with plain tensor weights, or set {trust.OPT_IN}"
        )

    real_load = torch.load

    def tensors_only(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        try:
            return real_load(f, *args, **kwargs)
        except pickle.UnpicklingError as exc:
            named = re.search(r"Unsupported (?:global|operand)[^\n.]*", str(exc))
            raise refuse("a pickled object that is not a plain tensor" + (f" ({named.group(0)})" if named else "")) from None

    def no_pickle(*_args: Any, **_kwargs: Any) -> Any:
        raise refuse("a pickled Python constant")

    def no_script_object(*_args: Any, **_kwargs: Any) -> Any:
        raise refuse("a pickled TorchScript object")

    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(torch, "load", tensors_only))
    stack.enter_context(mock.patch.object(_package, "pickle", types.SimpleNamespace(loads=no_pickle, load=no_pickle)))
    stack.enter_context(mock.patch.object(torch._C, "_pickle_load_obj", no_script_object))
    return stack


def _np_dtype(torch_dtype: Any) -> str:
    return str(torch_dtype).removeprefix("torch.")


def _dims(shape: Any) -> list[int | str | None]:
    out: list[int | str | None] = []
    for d in shape:
        out.append(d if isinstance(d, int) else str(d))  # a SymInt (torch.export Dim) is dynamic
    return out


def _output_names(n: int) -> list[str]:
    return ["output"] if n == 1 else [f"output_{i}" for i in range(n)]


class TorchRuntime(Runtime):
    def __init__(self, path: Path, *, fmt: str, threads: int, signature: ModelSignature | None, device: str = "cpu",
                 origin: str | None = None, field: str = "model") -> None:
        import torch

        super().__init__(path, threads=threads, signature=signature, origin=origin)
        self.field = field
        self.format = fmt
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if device == "auto" and torch.cuda.is_available() else "cpu"
        self.runtime_name = f"torch {torch.__version__} ({self.device})"
        native_in: list[TensorSpec] = []
        native_out: list[TensorSpec] = []
        if fmt in ("pt2", "torchscript"):
            # the archive, not the suffix, tells the two apart (.pt is used for both)
            if _is_torchscript(path):
                self.module = torch.jit.load(str(path), map_location="cpu")
                self.format = "torchscript"
                native_in, native_out = self._script_specs()
            else:
                program = load_exported_program(path, field=self.field, origin=self.origin)
                self.module = program.module()
                self.format = "pt2"
                native_in, native_out = self._program_specs(program)
        else:  # an MLflow pytorch folder with a pickled module
            self.module = load_pickled_mlflow_model(path, field=self.field, origin=self.origin)
            native_in, native_out = self._mlflow_specs(path)
        if hasattr(self.module, "eval"):
            try:
                self.module.eval()
            except NotImplementedError:  # torch.export's unlifted modules refuse eval(); they need none
                pass
        if self.device != "cpu":
            self.module = self.module.to(self.device)
        self.apply_signature(native_in, native_out)

    def _program_specs(self, program: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
        user_inputs = list(program.graph_signature.user_inputs)
        specs_in, specs_out = [], []
        for node in program.graph.nodes:
            if node.op == "placeholder" and node.name in user_inputs:
                val = node.meta.get("val")
                specs_in.append(TensorSpec(name=node.name, shape=_dims(val.shape), dtype=_np_dtype(val.dtype)))
            if node.op == "output":
                vals = [a.meta.get("val") for a in node.args[0]]
                names = _output_names(len(vals))
                specs_out = [TensorSpec(name=n, shape=_dims(v.shape), dtype=_np_dtype(v.dtype)) for n, v in zip(names, vals)]
        order = {n: i for i, n in enumerate(user_inputs)}
        specs_in.sort(key=lambda s: order[s.name])
        return specs_in, specs_out

    def _script_specs(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        args = [a.name for a in self.module.forward.schema.arguments if a.name != "self"]
        self.unknown_shapes.update(args)
        self.unknown_shapes.add("output")
        return ([TensorSpec(name=a, shape=[], dtype="float32") for a in args],
                [TensorSpec(name="output", shape=[], dtype="float32")])

    def _mlflow_specs(self, folder: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
        import json

        from airflow_modelopt.container.artifacts import read_mlmodel

        sig = (read_mlmodel(folder, self.origin, field="model") or {}).get("signature") or {}

        def tensors(raw: str | None, prefix: str) -> list[TensorSpec]:
            items = json.loads(raw) if raw else []
            out = []
            for i, item in enumerate(items):
                ts = item.get("tensor-spec") if item.get("type") == "tensor" else None
                if ts is None:
                    return []
                name = item.get("name") or (prefix if len(items) == 1 else f"{prefix}_{i}")
                out.append(TensorSpec(name=name, shape=[None if d == -1 else d for d in ts["shape"]], dtype=ts["dtype"]))
            return out

        ins, outs = tensors(sig.get("inputs"), "x"), tensors(sig.get("outputs"), "output")
        if not ins:
            ins = [TensorSpec(name="x", shape=[], dtype="float32")]
            self.unknown_shapes.add("x")
        if not outs:
            outs = [TensorSpec(name="output", shape=[], dtype="float32")]
            self.unknown_shapes.add("output")
        return ins, outs

    def run_native(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        args = [torch.from_numpy(np.ascontiguousarray(feeds[s.name])).to(self.device) for s in self.inputs]
        with torch.inference_mode():
            out = self.module(*args)
        if isinstance(out, torch.Tensor):
            flat = [out]
        elif isinstance(out, dict):
            flat = list(out.values())
        else:
            flat = list(out)
        arrays = [t.detach().cpu().numpy() for t in flat]
        if len(arrays) != len(self.outputs):
            if all(s.name in self.unknown_shapes for s in self.outputs):  # TorchScript: now we know
                names = [s.name for s in self.outputs] if len(self.outputs) == len(arrays) else _output_names(len(arrays))
                self.outputs = [TensorSpec(name=n, shape=[], dtype=str(a.dtype)) for n, a in zip(names, arrays)]
                self.unknown_shapes.update(names)
        return arrays

    def close(self) -> None:
        self.module = None


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive holds constants.pkl / code/; an ExportedProgram holds archive_format."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names) and not any(
        n.endswith("archive_format") for n in names
    )
