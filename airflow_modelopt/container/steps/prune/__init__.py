"""Step prune: make a model sparse or smaller, and measure what was reached.

1. Tell the framework from the model itself (``framework='auto'``) and refuse options of the other
   framework, naming them (the spec already refused them when model_uri's suffix told).
2. Measure the source: weight sparsity, parameters, FLOPs, bytes and gzip bytes of the model
   saved in the output format, accuracy on the evaluation data.
3. Prune:
   - PyTorch (``torch_prune``): the ExportedProgram is rebuilt with real nn layers
     (``fx_lifting``), then either global L1 unstructured pruning (``torch.nn.utils.prune``; masks
     kept during the fine-tune, then made permanent) or structured channel pruning with
     torch-pruning's dependency graph; optional fine-tune (``fine_tune``) on the training labels,
     by distillation from the unpruned model, or both; exported again as an ExportedProgram
     (.pt2) with a dynamic batch.
   - Keras (``keras_prune``): TFMOT ``prune_low_magnitude`` with a PolynomialDecay schedule while
     fine-tuning on labels, then ``strip_pruning``; saved in the source's format.
4. Measure the result the same way; ``sparsity`` is counted zeros over the prunable weights
   (Conv/Linear/Dense kernels), not the requested value. FLOPs follow the ptflops convention
   (one multiply-accumulate counts 1, plus bias and normalization ops) for one sample.
5. With ``max_accuracy_drop``, a larger drop fails the step (GateFailed) before anything is logged
   as its output. A PyTorch model's eval data without labels is measured by argmax agreement with
   the unpruned model (per position for dense outputs), gated on 1 - agreement.

Structured PyTorch pruning leaves a layer's channels alone when they reach an op that holds their
count as a constant before the next Conv/Linear (attention's head views, a transformer's residual
width, a patch embedding's token layout): in a transformer the feed-forward's hidden width is
pruned, attention and the embedding width are kept, each such layer recorded with its reason
(``kept_layers_why`` in the report and the step's info).

The fine-tune's signal (``labels``, ``distillation``, ``distillation+labels``) is logged and
tagged on the run (``modelopt.prune.fine_tune_signal``). Without labels and with ``distill=false``
the step refuses to start (exit 2).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from airflow_modelopt.container.artifacts import mlflow_flavors
from airflow_modelopt.container.context import StepContext, StepOutput
from airflow_modelopt.container.steps.prune.common import check_gate, size_of
from airflow_modelopt.container.steps.prune.fine_tune import distillation_loss
from airflow_modelopt.exceptions import InputError
from airflow_modelopt.specs.prune import (
    KERAS_SUFFIXES,
    TORCH_SUFFIXES,
    TORCHSCRIPT_SUFFIXES,
    Framework,
    PruneSpec,
    option_conflicts,
)

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def _torchscript_error(uri: str, what: str = "TorchScript") -> InputError:
    from airflow_modelopt.container.steps.prune.torch_model import torchscript_error

    return torchscript_error(uri, what)


def detect_framework(path: Path, uri: str) -> Framework:
    """torch or keras, from the fetched model's files; TorchScript and unknown files are refused."""
    if path.is_dir():
        flavors = mlflow_flavors(path, uri)
        if flavors is not None:
            if "pytorch" in flavors:
                return "torch"
            if "tensorflow" in flavors or "keras" in flavors:
                return "keras"
            raise InputError(
                f"model_uri: {uri} is an MLflow model with flavors {sorted(flavors)}; the prune step takes "
                "the pytorch, tensorflow or keras flavor"
            )
        if (path / "saved_model.pb").is_file() or (path / "keras_metadata.pb").is_file():
            return "keras"
        if list(path.rglob("*.pt2")):
            return "torch"
        if any(p.suffix.lower() in KERAS_SUFFIXES for p in path.rglob("*")):
            return "keras"
        raise InputError(
            f"model_uri: {uri} is a folder without a model the prune step knows (.pt2, .keras, .h5, "
            "SavedModel, or an MLflow pytorch/tensorflow model)"
        )
    suffix = path.suffix.lower()
    if suffix in TORCH_SUFFIXES:
        return "torch"
    if suffix in KERAS_SUFFIXES:
        return "keras"
    if suffix in TORCHSCRIPT_SUFFIXES:
        raise _torchscript_error(uri, "TorchScript or a torch.save checkpoint")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head == _HDF5_MAGIC:
        return "keras"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        base = {n.rsplit("/", 1)[-1] for n in names}
        if "archive_format" in base or any("/models/" in n for n in names):
            return "torch"
        if {"config.json", "metadata.json"} <= base:
            return "keras"
        if any("/code/" in n for n in names) or "constants.pkl" in base:
            raise _torchscript_error(uri)
        if "data.pkl" in base:
            raise _torchscript_error(uri, "a torch.save pickle")
    raise InputError(
        f"model_uri: {uri} is not a model the prune step knows: expected a torch.export ExportedProgram "
        "(.pt2), a Keras .keras/.h5 file or SavedModel folder, or an MLflow pytorch/tensorflow model"
    )


def resolve_framework(spec: PruneSpec, path: Path) -> Framework:
    found = detect_framework(path, spec.model_uri)
    if spec.framework != "auto" and spec.framework != found:
        raise InputError(f"framework: {spec.framework!r} was given but model_uri is a {found} model")
    problems = option_conflicts(spec, found)
    if problems:
        raise InputError("; ".join(problems))
    return found


#: What each path imports, and the image family that has it.
_NEEDS = {"torch": (("torch", "torch_pruning"), "torch"),
          "keras": (("tensorflow", "tf_keras", "tensorflow_model_optimization"), "tensorflow")}


def require_framework(framework: Framework) -> None:
    """Fail clearly (not retried) when this image lacks the framework the model needs."""
    import importlib.util

    modules, family = _NEEDS[framework]
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        hint = "framework='keras' (or image=...)" if framework == "keras" else "framework='torch' (or image=...)"
        raise InputError(
            f"model_uri: a {'Keras' if framework == 'keras' else 'PyTorch'} model, but this environment lacks "
            f"{', '.join(missing)}: run the prune step in the {family} image; PruneOperator picks it with {hint}"
        )


def run(spec: PruneSpec, ctx: StepContext) -> StepOutput:
    path = ctx.input("model_uri")
    assert path is not None
    framework = resolve_framework(spec, path)
    require_framework(framework)
    ctx.log.info("Pruning a %s model: %s, sparsity %s", framework, spec.method, spec.sparsity)
    if framework == "keras":
        from airflow_modelopt.container.steps.prune.keras_prune import run_keras

        return run_keras(spec, ctx, path)
    from airflow_modelopt.container.steps.prune.torch_prune import run_torch

    return run_torch(spec, ctx, path)


__all__ = ["check_gate", "detect_framework", "distillation_loss", "resolve_framework", "run", "size_of"]
