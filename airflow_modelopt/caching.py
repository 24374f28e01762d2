"""The cache key and everything it is made of, shared by both sides.

The container side (``container/runner.py``) computes a step's cache key after fetching its inputs;
the Airflow side (``operators/worker_cache.py``) computes the same key before launching anything, so
that a fully cached task needs no step process. Both call :func:`cache_key` here, so the two can only
agree: a key is the sha256 of the step, its parameters, its inputs' content digests
(:func:`digest`), the container side's code (:func:`code_digest`), the image (its digest in docker
mode) and, for measuring steps, the hardware (:func:`hardware_fingerprint`).

Also here: the MLflow tag names that tie runs to Airflow and to the cache, the tags of a step run
and of a reuse run (:func:`step_tags`, :func:`reuse_tags`), and where the content digest of an
artifact is recorded (:func:`digest_record`: a tag of its finished run or of its logged model), which
consumers write after they hashed it so that later lookups need not download it again.

Standard library only (no pydantic, no MLflow): the hardware probe's fresh process imports it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow_modelopt.uris import logged_model_id
from airflow_modelopt.version import __version__

if TYPE_CHECKING:
    from collections.abc import Mapping

    from airflow_modelopt.specs import StepResult, StepSpec

#: Tags that tie MLflow runs to Airflow.
TAG_ROLE = "modelopt.role"
TAG_DAG_ID = "airflow.dag_id"
TAG_RUN_ID = "airflow.run_id"
TAG_LOGICAL_DATE = "airflow.logical_date"
TAG_TASK_ID = "airflow.task_id"
TAG_TRY = "airflow.try_number"
TAG_STEP = "modelopt.step"
TAG_IMAGE = "modelopt.image"
TAG_IMAGE_DIGEST = "modelopt.image_digest"
TAG_CACHE_KEY = "modelopt.cache_key"
TAG_CODE_DIGEST = "modelopt.code_digest"  # the container code's digest that went into the cache key
TAG_MODE = "modelopt.execution_mode"
TAG_STATUS = "modelopt.status"
TAG_CACHE_HIT = "modelopt.cache_hit"
TAG_CACHED_FROM = "modelopt.cached_from_run_id"
TAG_ERROR = "modelopt.error"
TAG_VERDICT = "modelopt.verdict"  # passed / failed, on runs of steps that judge (validate)
#: Where a reuse run's cache decision was made: ``worker`` (Airflow side, no step process) or ``step``.
TAG_CACHE_LOOKUP = "modelopt.cache_lookup"
PARENT_TAG = "mlflow.parentRunId"

RESULT_ARTIFACT = "modelopt/result.json"

#: Fields of an MLflow model's ``MLmodel`` file that MLflow stamps anew on every save of the same
#: model (time, random ids, the run and path it was logged under): a content digest leaves them out.
MLMODEL_VOLATILE_FIELDS = ("utc_time_created", "model_uuid", "model_id", "run_id", "artifact_path")
#: The environment files MLflow writes next to an MLmodel: inferred at save time (a timeout falls
#: back to another list), and the environment is already in the cache key (code and image).
MLMODEL_ENV_FILES = ("conda.yaml", "python_env.yaml", "requirements.txt", "constraints.txt")

#: Version of :func:`digest`'s scheme, part of the recorded-digest tag name. Bump it whenever
#: ``digest`` would give another value for the same content (tests/unit/test_worker_cache.py pins
#: one value), so digests recorded by older code are not mistaken for the new scheme's.
DIGEST_SCHEME = "v1"
DIGEST_TAG = f"modelopt.digest.{DIGEST_SCHEME}"


def digest(path: Path) -> str:
    """sha256 of a file's bytes, or of a folder's relative paths and file bytes, in sorted order.

    The content that makes a model: in an MLflow model folder the ``MLmodel`` file counts without
    its volatile fields and the environment files not at all, so the same model logged twice has
    one digest (and the steps after a rebuild hit the cache).
    """
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*")
        if p.is_file() and not (p.name in MLMODEL_ENV_FILES and (p.parent / "MLmodel").is_file())
    )
    for f in files:
        if path.is_dir():
            h.update(f.relative_to(path).as_posix().encode() + b"\0")
        if f.name == "MLmodel":
            h.update(_stable_mlmodel(f))
            continue
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _stable_mlmodel(path: Path) -> bytes:
    import yaml

    try:
        fields = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        return path.read_bytes()  # not an MLmodel MLflow wrote: its bytes as they are
    if not isinstance(fields, dict):
        return path.read_bytes()
    stable = {k: v for k, v in fields.items() if k not in MLMODEL_VOLATILE_FIELDS}
    return yaml.safe_dump(stable, sort_keys=True).encode()


def code_digest() -> str:
    """sha256 of the container side's source, the specs and this module: a code change invalidates
    the cache in local mode too, where no image digest tells versions apart."""
    package = Path(__file__).resolve().parent
    h = hashlib.sha256(__version__.encode())
    for root in (package / "container", package / "specs"):
        for path in sorted(root.rglob("*.py")):
            h.update(path.relative_to(package).as_posix().encode() + path.read_bytes())
    h.update(b"caching.py" + Path(__file__).read_bytes())
    return h.hexdigest()


def local_code_digest() -> str:
    """:func:`code_digest`, or the version when the sources cannot be read (a zipped install)."""
    try:
        return code_digest()
    except OSError:
        return __version__


#: Steps whose local-mode result depends on an optional converter that the step's Python may or may
#: not reach: the module, and the variable naming another Python that has it (``LITERT_PYTHON_ENV``
#: in ``specs/tflite_quantize.py``; the operator sets it from ``[modelopt] litert_python``). Without
#: it the step converts the ONNX fallback: another model, which must not be reused once it is there.
#: An image fixes what it has (its digest or reference is in the key): local mode only.
OPTIONAL_CONVERTERS = {"tflite_quantize": ("litert_torch", "MODELOPT_LITERT_PYTHON")}


def reachable_converters(spec: StepSpec, environ: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """For a local-mode step in :data:`OPTIONAL_CONVERTERS`, where its converter is: ``here`` (the
    step's Python, this one, has it), ``python:<path>`` (the Python the step's environment ``environ``
    names, default this process's), or ``none``; None for any other step or mode."""
    entry = OPTIONAL_CONVERTERS.get(spec.step)
    if entry is None or spec.context.execution_mode != "local":
        return None
    module, variable = entry
    if importlib.util.find_spec(module) is not None:
        return {module: "here"}
    python = (os.environ if environ is None else environ).get(variable, "").strip()
    if python and os.path.exists(python):
        return {module: f"python:{os.path.abspath(python)}"}
    return {module: "none"}


def cache_key(spec: StepSpec, input_digests: dict[str, str], *, code: str | None = None,
              hardware: dict[str, str] | None = None, environ: Mapping[str, str] | None = None) -> str:
    """sha256 over the step, its parameters (inputs by content, not by URI), the code and image.

    ``code``: the container code's digest (default: this installation's); ``hardware``: for steps
    whose results depend on the machine, its fingerprint (default: this machine's); ``environ``: the
    step process's environment, for where an optional converter is (:func:`reachable_converters`;
    default this process's)."""
    params = {k: v for k, v in spec.params().items() if k not in spec.input_fields}
    payload: dict[str, Any] = {
        "step": spec.step,
        "spec_version": spec.spec_version,
        "params": params,
        "inputs": input_digests,
        "code": code if code is not None else local_code_digest(),
        "image": spec.context.image_digest or spec.context.image or f"local:{__version__}",
    }
    if spec.cache_per_machine:  # measurements: a result from other hardware is not this one's
        payload["hardware"] = hardware if hardware is not None else hardware_fingerprint()
    converters = reachable_converters(spec, environ)
    if converters is not None:
        payload["converters"] = converters
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def step_tags(spec: StepSpec, key: str, parent: str | None, code: str | None = None) -> dict[str, str]:
    """The tags of a step's nested run (and, with :func:`reuse_tags`' additions, of a reuse run)."""
    ctx = spec.context
    tags = {
        TAG_ROLE: "step",
        TAG_STEP: spec.step,
        TAG_CACHE_KEY: key,
        TAG_MODE: ctx.execution_mode,
        TAG_TRY: str(ctx.try_number),
        "modelopt.version": __version__,
    }
    optional = {
        TAG_DAG_ID: ctx.dag_id,
        TAG_RUN_ID: ctx.run_id,
        TAG_TASK_ID: ctx.task_id,
        TAG_IMAGE: ctx.image,
        TAG_IMAGE_DIGEST: ctx.image_digest,
        TAG_CODE_DIGEST: code,
        PARENT_TAG: parent,
    }
    tags.update({k: v for k, v in optional.items() if v})
    return tags


def reuse_tags(spec: StepSpec, key: str, parent: str | None, code: str | None, cached_from: str,
               original: StepResult, lookup: str) -> dict[str, str]:
    """The tags of the run that records a cache hit, wherever the hit was found (``lookup``)."""
    tags = step_tags(spec, key, parent, code) | {TAG_CACHE_HIT: "true", TAG_CACHED_FROM: cached_from,
                                                  TAG_CACHE_LOOKUP: lookup}
    if original.verdict is not None:  # the judgement reused, visible on this DAG run's own run too
        tags[TAG_VERDICT] = "passed" if original.verdict.passed else "failed"
    return tags


def reuse_run_name(spec: StepSpec) -> str:
    return f"{spec.context.task_id or spec.step} (cached)"


def cached_filter(key: str) -> str:
    """MLflow search filter of the runs that may stand in for a run with this key."""
    return (f"tags.`{TAG_CACHE_KEY}` = '{key}' and tags.`{TAG_STATUS}` = 'succeeded' "
            f"and attributes.status = 'FINISHED'")


def runs_uri_parts(uri: str) -> tuple[str, str] | None:
    """(run id, artifact path) of a ``runs:/<run id>/<path>`` URI with a non-empty path, else None."""
    if not uri.startswith("runs:/"):
        return None
    run_id, _, path = uri[len("runs:/"):].lstrip("/").partition("/")
    path = path.strip("/")
    if not run_id or not path or any(part in ("", ".", "..") for part in path.split("/")):
        return None
    return run_id, path


def digest_record(uri: str) -> tuple[str, str, str] | None:
    """Where the content digest of ``uri`` is recorded: ``("run", run id, tag)`` for
    ``runs:/<run>/<path>`` (a tag of that run naming the path), ``("model", model id, tag)`` for an
    MLflow 3 logged model ``models:/<model id>`` (a tag of that model); None for any other URI
    (``models:/<name>/<version>`` or ``@alias`` can move, plain paths and other stores have no record).
    Either is written only once its run is FINISHED or its model READY, whose artifacts are final."""
    parts = runs_uri_parts(uri)
    if parts is not None:
        name = f"{DIGEST_TAG}/{parts[1]}"
        if len(name) > 250 or not all(c.isalnum() or c in "_-./ " for c in name):
            return None
        return "run", parts[0], name
    model_id = logged_model_id(uri)
    return ("model", model_id, DIGEST_TAG) if model_id else None


# -- what a measurement ran on ------------------------------------------------------------------


def hardware_fingerprint() -> dict[str, str]:
    """CPU model, core counts, memory and machine: what the numbers were measured on."""
    cpu_model, cores = "", set()
    physical_id = core_id = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name" and not cpu_model:
                cpu_model = value
            elif key == "physical id":
                physical_id = value
            elif key == "core id":
                core_id = value
            elif not key and physical_id is not None and core_id is not None:
                cores.add((physical_id, core_id))
                physical_id = core_id = None
        if physical_id is not None and core_id is not None:
            cores.add((physical_id, core_id))
    except OSError:
        pass
    memory = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f}"
    except (OSError, ValueError):
        pass
    logical = os.cpu_count() or 0
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = logical
    facts = {
        "cpu_model": cpu_model or platform.processor() or platform.machine(),
        "physical_cores": str(len(cores) or logical),
        "logical_cpus": str(logical),
        "usable_cpus": str(usable),
        "memory_gib": memory,
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
    }
    gpu = gpu_names()
    if gpu:
        facts["gpu"] = gpu
    facts["fingerprint"] = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
    return facts


def gpu_names() -> str:
    if shutil.which("nvidia-smi") is None:
        return ""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return ""
    return ", ".join(line.strip() for line in out.stdout.splitlines() if line.strip()) if out.returncode == 0 else ""
