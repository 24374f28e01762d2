"""Container side: reading a fetched artifact: an MLflow model folder's ``MLmodel`` file (the one
reader of it), and the model file inside a file, a folder or an MLflow model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from airflow_modelopt.exceptions import InputError


def read_mlmodel(folder: Path, uri: str = "", field: str = "model_uri") -> dict[str, Any] | None:
    """The parsed ``MLmodel`` file of an MLflow model folder, or None when the folder is not one.
    The one place the container side reads it."""
    mlmodel = Path(folder) / "MLmodel"
    if not mlmodel.is_file():
        return None
    import yaml

    try:
        meta = yaml.safe_load(mlmodel.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"{field}: {uri or folder} has an unreadable MLmodel file: {exc}") from None
    if not isinstance(meta, dict):
        raise InputError(f"{field}: {uri or folder} has an MLmodel file that is not a mapping")
    return meta


def mlflow_flavors(folder: Path, uri: str = "", field: str = "model_uri") -> dict[str, dict[str, Any]] | None:
    """The flavors of an MLflow model folder (each flavor's settings, ``{}`` when empty), or None
    when the folder is not an MLflow model."""
    meta = read_mlmodel(folder, uri, field)
    if meta is None:
        return None
    return {name: (conf or {}) for name, conf in (meta.get("flavors") or {}).items()}


def locate_onnx(path: Path, uri: str, field: str = "model_uri", purpose: str = "") -> Path:
    """The .onnx file of a file, a model folder, or an MLflow onnx-flavor folder."""
    if path.is_file():
        if path.suffix.lower() != ".onnx":
            raise InputError(f"{field}: {uri} is not an .onnx file (got {path.name!r}){purpose}")
        return path
    flavors = mlflow_flavors(path, uri, field)
    if flavors is not None:
        if "onnx" not in flavors:
            raise InputError(f"{field}: {uri} is an MLflow model without the onnx flavor (flavors: {sorted(flavors)})")
        candidate = path / str((flavors["onnx"] or {}).get("data") or "model.onnx")
        if not candidate.is_file():
            raise InputError(f"{field}: {uri}: the onnx flavor names {candidate.name!r}, which is missing")
        return candidate
    if (path / "model.onnx").is_file():
        return path / "model.onnx"
    found = sorted(path.rglob("*.onnx"))
    if len(found) == 1:
        return found[0]
    raise InputError(
        f"{field}: {uri} is a folder with {len(found)} .onnx files; expected model.onnx (with its external data "
        "next to it) or an MLflow onnx-flavor model folder"
    )
