"""Step triton_package: a Triton Inference Server model repository for registry aliases.

For each alias: the model version it points at is downloaded (``models:/<name>/<version>``, the
version read once, so a moving alias cannot mix two versions), its format detected by the runtimes
layer, and written as

    <triton model>/config.pbtxt
    <triton model>/<registry version>/model.onnx (+ external data) | model.plan | model.xml + model.bin

``config.pbtxt``: platform ``onnxruntime_onnx`` (ONNX), ``tensorrt_plan`` (TensorRT engine) or
backend ``openvino`` (OpenVINO IR); inputs and outputs with Triton data types and dims from the
recorded signature (``modelopt_signature.json``; for ONNX without one, read from the model with
ONNX Runtime); ``max_batch_size`` and dynamic batching when every tensor's first dimension is
dynamic (else ``max_batch_size: 0`` and full shapes); an instance group. The text is written in
protobuf text format by ``render_pbtxt`` (no Triton package needed here); the tests parse it back
with Triton's own ``model_config.proto`` (tritonclient's ``model_config_pb2``).

Artifacts: ``triton_repository`` (the folder) and ``triton_repository_tarball`` (``.tar.gz``).
"""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path
from typing import Any

from airflow_modelopt.container.context import StepContext, StepOutput
from airflow_modelopt.container.signature import ModelSignature, TensorSpec
from airflow_modelopt.exceptions import InputError
from airflow_modelopt.specs.triton_package import TritonPackageSpec

REPOSITORY = "triton_repository"
TARBALL = "triton_repository.tar.gz"

#: numpy dtype name -> Triton DataType
TRITON_TYPES = {
    "float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "bfloat16": "TYPE_BF16",
    "int8": "TYPE_INT8", "int16": "TYPE_INT16", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
    "uint8": "TYPE_UINT8", "uint16": "TYPE_UINT16", "uint32": "TYPE_UINT32", "uint64": "TYPE_UINT64",
    "bool": "TYPE_BOOL",
}
#: format -> (config key, value, file name in the version folder)
SERVING = {
    "onnx": ("platform", "onnxruntime_onnx", "model.onnx"),
    "tensorrt": ("platform", "tensorrt_plan", "model.plan"),
    "openvino": ("backend", "openvino", "model.xml"),
}


class Enum(str):
    """A protobuf enum value: written without quotes."""


def _scalar(value: Any) -> str:
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_pbtxt(message: dict[str, Any], indent: int = 0) -> str:
    """A message (dict; lists are repeated fields) in protobuf text format."""
    pad = "  " * indent
    lines = []
    for key, value in message.items():
        if isinstance(value, dict):
            lines += [f"{pad}{key} {{", render_pbtxt(value, indent + 1).rstrip("\n"), f"{pad}}}"] if value else [f"{pad}{key} {{}}"]
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            items = [f"{pad}  {{\n{render_pbtxt(v, indent + 2).rstrip(chr(10))}\n{pad}  }}" for v in value]
            lines.append(f"{pad}{key} [\n" + ",\n".join(items) + f"\n{pad}]")
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return "\n".join(line for line in lines if line) + "\n"


# -- one model version --------------------------------------------------------------------------


def tensors(fmt: str, target: Path, signature: ModelSignature | None, where: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The model's own inputs and outputs: the recorded signature, else (ONNX) what ONNX Runtime reads."""
    if signature is not None:
        return signature.inputs, signature.outputs
    if fmt != "onnx":
        raise InputError(f"{where}: the {fmt} model has no {target.parent / 'modelopt_signature.json'} to read its "
                         "inputs and outputs from (the tensorrt_build and openvino_convert steps write one)")
    from airflow_modelopt.container.runtimes import load

    with load(target, "onnx", field="aliases", origin=where) as runtime:
        return list(runtime.inputs), list(runtime.outputs)


def model_files(fmt: str, target: Path) -> dict[Path, str]:
    """Files to copy into the version folder -> their name there."""
    if fmt == "onnx":
        from airflow_modelopt.container.runtimes.onnx_backend import onnx_files

        return {p: p.relative_to(target.parent).as_posix() if p != target else SERVING["onnx"][2]
                for p in onnx_files(target)}
    if fmt == "openvino":
        return {target: "model.xml", target.with_suffix(".bin"): "model.bin"}
    return {target: SERVING[fmt][2]}


def _dims(shape: list[Any]) -> list[int]:
    return [int(d) if isinstance(d, int) and d > 0 else -1 for d in shape]


def _dynamic(d: Any) -> bool:
    return d is None or isinstance(d, str) or (isinstance(d, int) and d < 1)


def model_config(name: str, fmt: str, inputs: list[TensorSpec], outputs: list[TensorSpec],
                 spec: TritonPackageSpec, where: str) -> tuple[dict[str, Any], list[str]]:
    """config.pbtxt as a message dict, and notes on what was adjusted."""
    notes = []
    batched = spec.max_batch_size > 0 and all(t.shape and _dynamic(t.shape[0]) for t in inputs + outputs)
    if spec.max_batch_size > 0 and not batched:
        notes.append(f"{name}: a tensor's first dimension is not a dynamic batch; packaged with max_batch_size 0 "
                     "(full shapes, no dynamic batching)")

    def tensor(t: TensorSpec) -> dict[str, Any]:
        dtype = TRITON_TYPES.get(t.dtype)
        if dtype is None:
            raise InputError(f"{where}: tensor {t.name!r} has dtype {t.dtype}, which Triton has no type for")
        return {"name": t.name, "data_type": Enum(dtype), "dims": _dims(t.shape[1:] if batched else t.shape)}

    key, value, filename = SERVING[fmt]
    config: dict[str, Any] = {"name": name, key: value, "max_batch_size": spec.max_batch_size if batched else 0,
                              "default_model_filename": filename,
                              "input": [tensor(t) for t in inputs], "output": [tensor(t) for t in outputs]}
    if batched and spec.dynamic_batching:
        batching: dict[str, Any] = {"max_queue_delay_microseconds": spec.max_queue_delay_microseconds}
        if spec.preferred_batch_sizes:
            batching["preferred_batch_size"] = list(spec.preferred_batch_sizes)
        config["dynamic_batching"] = batching
    kind = spec.instance_kind if spec.instance_kind != "auto" else ("gpu" if fmt == "tensorrt" else "cpu")
    config["instance_group"] = [{"count": spec.instance_count, "kind": Enum(f"KIND_{kind.upper()}")}]
    return config, notes


def resolve(spec: TritonPackageSpec, alias: str, ctx: StepContext) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return ctx.client.get_model_version_by_alias(spec.registered_model_name, alias)
    except MlflowException as exc:
        raise InputError(f"aliases: registered model {spec.registered_model_name!r} has no version with alias "
                         f"{alias!r}: {str(exc).strip().splitlines()[0][:500]}") from None


def package(spec: TritonPackageSpec, alias: str, triton_name: str, repo: Path, ctx: StepContext) -> dict[str, Any]:
    import mlflow

    from airflow_modelopt.container.runtimes import detect

    version = resolve(spec, alias, ctx)
    uri = f"models:/{spec.registered_model_name}/{version.version}"
    where = f"aliases: {alias!r} ({uri})"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(ctx.workdir / "models" / alias)))
    fmt, target, signature = detect(local, field="aliases")
    if fmt not in SERVING:
        raise InputError(f"{where} is a {fmt} model; Triton packaging covers {', '.join(SERVING)} "
                         "(onnxruntime_onnx, tensorrt_plan, openvino)")
    inputs, outputs = tensors(fmt, target, signature, where)
    config, notes = model_config(triton_name, fmt, inputs, outputs, spec, where)
    version_dir = repo / triton_name / str(version.version)
    version_dir.mkdir(parents=True)
    for src, name in model_files(fmt, target).items():
        (version_dir / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, version_dir / name)
    (repo / triton_name / "config.pbtxt").write_text(render_pbtxt(config))
    for note in notes:
        ctx.log.warning("%s", note)
    ctx.log.info("Packaged %s version %s (alias %s, %s) as Triton model %s", spec.registered_model_name,
                 version.version, alias, fmt, triton_name)
    return {"alias": alias, "triton_model": triton_name, "registry_version": str(version.version), "format": fmt,
            config_key(fmt): SERVING[fmt][1], "source": version.source, "notes": notes,
            "max_batch_size": config["max_batch_size"]}


def config_key(fmt: str) -> str:
    return SERVING[fmt][0]


def run(spec: TritonPackageSpec, ctx: StepContext) -> StepOutput:
    repo = ctx.workdir / REPOSITORY
    repo.mkdir()
    models = [package(spec, alias, name, repo, ctx) for alias, name in spec.triton_names().items()]
    tarball = ctx.workdir / TARBALL
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(repo, arcname=REPOSITORY)
    artifacts = {"triton_repository": ctx.log_artifact(repo, REPOSITORY),
                 "triton_repository_tarball": ctx.log_artifact(tarball)}
    files = [p for p in repo.rglob("*") if p.is_file()]
    metrics = {"models": float(len(models)), "repository_bytes": float(sum(p.stat().st_size for p in files)),
               "tarball_bytes": float(tarball.stat().st_size)}
    return StepOutput(artifacts=artifacts, metrics=metrics, info={
        "registered_model_name": spec.registered_model_name, "models": models,
        "serve": f"tritonserver --model-repository=<download of {artifacts['triton_repository']}>",
    })


__all__ = ["REPOSITORY", "SERVING", "TARBALL", "TRITON_TYPES", "model_config", "render_pbtxt", "run"]
