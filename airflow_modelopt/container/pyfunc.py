"""Container side: every deployable as an MLflow model, so ``mlflow.pyfunc.load_model`` and
``mlflow models serve`` take ``models:/<name>@<alias>`` whatever its format.

MLflow has flavors for ONNX and PyTorch modules; for the other formats (TFLite, TensorRT engines,
OpenVINO IR, MNN, quantized torch.export ``.pt2``) a step logs a pyfunc model whose
``python_model`` is ``DeployableModel``: the model file(s) ride inside as the artifact
``model`` (with ``modelopt_signature.json``), and ``predict`` runs them through the project's
runtimes layer (``container.runtimes.load``). Callers feed and get what the source model takes
and gives (float values in its layout): NCHW -> NHWC transposes and int8/uint8 I/O quantization
happen inside, from the recorded signature, as in validation and benchmark.

Where the code comes from: ``DeployableModel`` is pickled by reference (module and class name),
so the process that loads the model needs this package installed (the step images and the
provider's virtualenv have it; ``mlflow models serve --env-manager local`` in that environment
works). ``code_paths`` was not used: MLflow puts those paths first on ``sys.path`` and evicts the
already-imported modules of the same name, which would reload this package under a running step.
Each model pins its runtime's package (read from the installed metadata) in ``requirements.txt``.

This module imports nothing heavy: MLflow's pyfunc base class at import, runtimes at load time.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.pyfunc import PythonModel

log = logging.getLogger("airflow_modelopt.container.pyfunc")

#: The artifact key the model file(s) live under inside the pyfunc model.
MODEL_ARTIFACT = "model"

#: format -> distributions that run it, first installed one pinned (and what else the runtimes need).
RUNTIME_PACKAGES: dict[str, tuple[tuple[str, ...], ...]] = {
    "tflite": (("ai-edge-litert", "tensorflow"),),
    "tensorrt": (("tensorrt", "tensorrt-cu12", "tensorrt-cu13"), ("cuda-python", "torch")),
    "openvino": (("openvino",),),
    "mnn": (("MNN",),),
    "pt2": (("torch",),),
    "torchscript": (("torch",),),
    "onnx": (("onnxruntime", "onnxruntime-gpu"),),
    "savedmodel": (("tensorflow",),),
    "keras": (("tensorflow",),),
}
#: What the runtimes layer itself imports.
COMMON_PACKAGES = ("numpy", "pydantic", "PyYAML")


def _installed(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def pip_requirements(fmt: str) -> list[str]:
    """Pinned requirements of a ``fmt`` model: its runtime's package and the runtimes layer's own,
    each at the version installed here (where the step built and checked the model)."""
    reqs = []
    for choices in RUNTIME_PACKAGES.get(fmt, ()):
        found = next(((d, v) for d in choices if (v := _installed(d))), None)
        if found is None:
            log.warning("none of %s is installed here: the %s model's requirements do not pin its runtime",
                        list(choices), fmt)
            continue
        reqs.append(f"{found[0]}=={found[1]}")
    for dist in COMMON_PACKAGES:
        v = _installed(dist)
        if v:
            reqs.append(f"{dist}=={v}")
    return reqs


class DeployableModel(PythonModel):
    """A model file of ``fmt`` run by the runtimes layer behind MLflow's pyfunc interface.

    ``predict`` takes one array (a single-input model), or a mapping of input name -> array (the
    source model's input names), in the source model's layout, real values; it returns the one
    output as an array, or a mapping of output name -> array when there are several.
    """

    def __init__(self, fmt: str, threads: int = 1) -> None:
        self.fmt = fmt
        self.threads = threads
        self._rt: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"fmt": self.fmt, "threads": self.threads}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.fmt = state["fmt"]
        self.threads = state.get("threads", 1)
        self._rt = None

    def load_context(self, context: Any) -> None:
        from airflow_modelopt.container.runtimes import load
        from airflow_modelopt.exceptions import InputError

        path = Path(context.artifacts[MODEL_ARTIFACT])
        try:
            self._rt = load(path, self.fmt, threads=self.threads, field="model", origin=f"this MLflow {self.fmt} model")
        except InputError as exc:
            # The runtimes layer advises a step where to run; someone loading a model needs other advice.
            reason = re.split(r"[:;] run this step in ", str(exc), maxsplit=1)[0]
            gpu = " on an NVIDIA GPU" if self.fmt == "tensorrt" else ""
            raise RuntimeError(
                f"This MLflow model is a {self.fmt} deployable built by airflow-modelopt and cannot run here: "
                f"{reason}. Load or serve it{gpu} in an environment with its runtime and airflow-modelopt installed "
                "(the model's requirements.txt pins the runtime)"
            ) from None

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        rt = self._rt
        if rt is None:
            raise RuntimeError("the model was not loaded (load_context did not run)")
        feeds = _feeds(model_input, rt.feed_names)
        outputs = rt.run(feeds, field="model_input")
        if len(outputs) == 1:
            return outputs[0]
        return dict(zip(rt.output_names, outputs))


def _feeds(model_input: Any, names: list[str]) -> dict[str, np.ndarray]:
    if isinstance(model_input, dict):
        return {k: np.asarray(v) for k, v in model_input.items()}
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - MLflow needs pandas
        pd = None
    if pd is not None and isinstance(model_input, pd.DataFrame):
        if set(names) <= set(model_input.columns):
            return {n: np.stack([np.asarray(v) for v in model_input[n]]) for n in names}
        model_input = model_input.to_numpy()
    return {names[0] if names else "x": np.asarray(model_input)}


# -- logging ---------------------------------------------------------------------------------------


def _logical(specs: list[Any], source_layout: str | None, *, native: bool = False) -> list[tuple[str, str, list[int]]]:
    """(name, dtype, shape) of each tensor as callers see it: the source model's names and layout,
    real (float32) values for quantized or half-precision tensors, -1 for the batch and dynamic dims.
    ``native``: the tensors as they are (a flavor MLflow runs itself: dtype kept, -1 for dynamic dims only)."""
    from airflow_modelopt.container.runtimes.base import is_dynamic, layout_perm

    out = []
    for s in specs:
        shape = list(s.shape or [])
        perm = layout_perm(s.layout, source_layout)
        if perm is not None and len(shape) == len(perm):
            shape = [shape[i] for i in perm]
        dims = [-1 if ((i == 0 and not native) or is_dynamic(d)) else int(d) for i, d in enumerate(shape)]
        dtype = np.dtype(s.dtype)
        if not native and (s.quantization is not None or dtype.kind == "f"):
            dtype = np.dtype("float32")
        out.append((s.source_name or s.name, dtype.name, dims))
    return out


def mlflow_signature(inputs: list[Any], outputs: list[Any], source_layout: str | None, *, native: bool = False) -> Any:
    """An MLflow tensor signature of the model as callers see it (see ``_logical``)."""
    from mlflow.models import ModelSignature as MlflowSignature
    from mlflow.types import Schema, TensorSpec

    def schema(specs: list[Any]) -> Schema:
        return Schema([TensorSpec(np.dtype(dt), tuple(shape), name) for name, dt, shape in _logical(specs, source_layout, native=native)])

    return MlflowSignature(inputs=schema(inputs), outputs=schema(outputs))


def example_input(inputs: list[Any], source_layout: str | None, data: dict[str, np.ndarray] | None = None,
                  rows: int = 2, *, native: bool = False) -> dict[str, np.ndarray] | np.ndarray:
    """A small input example: the first ``rows`` samples of ``data`` where it has the input, else
    seeded normal values of the input's shape (dynamic dims as 1); one array for a single input."""
    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = {}
    for (name, dtype, shape), spec in zip(_logical(inputs, source_layout, native=native), inputs):
        n = rows if not shape or shape[0] < 1 else shape[0]
        found = None
        if data:
            found = data.get(name, data.get(spec.name))
            if found is None and len(inputs) == 1 and len(data) == 1:
                found = next(iter(data.values()))
        if found is not None and np.asarray(found).ndim == len(shape):
            feeds[name] = np.asarray(found)[:n].astype(dtype)
        else:
            dims = [n] + [d if d > 0 else 1 for d in shape[1:]]
            values = rng.standard_normal(dims)
            feeds[name] = values.astype(dtype) if np.dtype(dtype).kind == "f" else np.zeros(dims, dtype)
    return next(iter(feeds.values())) if len(feeds) == 1 else feeds


def log_deployable(folder: Path, fmt: str, *, data: dict[str, np.ndarray] | None = None,
                   name: str = "mlflow_model", metadata: dict[str, Any] | None = None) -> Any:
    """Log the model in ``folder`` (its file(s) and ``modelopt_signature.json``) as a pyfunc model
    of the active run; return MLflow's ModelInfo (``model_uri`` is the ``models:/m-...`` URI).

    The signature and example come from loading the model with the runtimes layer; where it cannot
    load here (a TensorRT engine without a GPU), from the recorded ``modelopt_signature.json``.
    """
    import mlflow.pyfunc

    from airflow_modelopt.container.runtimes import load
    from airflow_modelopt.container.signature import ModelSignature
    from airflow_modelopt.exceptions import InputError

    try:
        with load(folder, fmt, threads=1, field="model", origin=str(folder)) as rt:
            inputs, outputs, layout = list(rt.inputs), list(rt.outputs), rt.source_layout
    except InputError as exc:
        recorded = ModelSignature.read(folder)
        if recorded is None:
            raise
        log.info("The %s model does not load here (%s); its MLflow signature comes from %s", fmt,
                 str(exc).splitlines()[0][:300], folder.name)
        inputs, outputs, layout = recorded.inputs, recorded.outputs, recorded.source_layout
    signature = mlflow_signature(inputs, outputs, layout)
    example = example_input(inputs, layout, data)
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=DeployableModel(fmt),
        artifacts={MODEL_ARTIFACT: str(folder)},
        signature=signature,
        input_example=example,
        pip_requirements=pip_requirements(fmt),
        metadata={"modelopt_format": fmt, **(metadata or {})},
    )


def onnx_signature_and_example(proto: Any, data: dict[str, np.ndarray] | None = None) -> tuple[Any, Any]:
    """(MLflow signature, input example) of an ONNX model from its graph's inputs and outputs
    (initializers that are also listed as inputs left out; dynamic dims -1)."""
    from onnx import helper

    from airflow_modelopt.container.signature import TensorSpec

    graph = proto.graph
    weights = {t.name for t in graph.initializer}

    def specs(values: Any) -> list[TensorSpec]:
        out = []
        for v in values:
            if v.name in weights:
                continue
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)).name
            out.append(TensorSpec(name=v.name, shape=dims, dtype=dtype))
        return out

    inputs, outputs = specs(graph.input), specs(graph.output)
    return (mlflow_signature(inputs, outputs, None, native=True),
            example_input(inputs, None, data, native=True))


def log_step_deployable(ctx: Any, folder: Path, fmt: str, artifact: str,
                        data: dict[str, np.ndarray] | None = None) -> dict[str, str]:
    """What a building step reports for its deployable in ``folder``: ``artifact`` is the MLflow
    model (``models:/m-...``, what validation, benchmark and promotion take), ``<artifact>_files``
    the raw folder, logged to the run as before (``runs:/<run>/<artifact>``)."""
    raw = ctx.log_artifact(folder, artifact)
    # MLflow 3 also copies a logged model's files into the run under its name: another name than the raw folder's.
    info = log_deployable(folder, fmt, data=data, name=f"{artifact}_pyfunc")
    ctx.log.info("Logged the %s model as MLflow model %s (pyfunc, raw files at %s)", fmt, info.model_uri, raw)
    return {artifact: info.model_uri, f"{artifact}_files": raw}


__all__ = ["DeployableModel", "log_deployable", "log_step_deployable", "mlflow_signature", "pip_requirements"]
