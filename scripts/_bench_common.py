"""What the benchmark scripts (bench_compression.py, bench_onnx_quantize.py, bench_prune.py) share.

- Running a step exactly as local mode does: ``python -m airflow_modelopt run <step> --spec -`` in a
  subprocess (any interpreter: the litert venv for the PyTorch -> TFLite path), result = last stdout line.
- A throw-away MLflow store: a SQLite file, or a local ``mlflow server`` on loopback backed by one when
  steps run in more than one venv (the litert venv has mlflow-skinny, without SQLAlchemy).
- Bytes on disk of a model: an ONNX graph plus the external data it references, or any other file.
- The benchmark models: a residual CNN for 3x32x32 inputs and a ResNet-18-shaped CNN for 3x224x224, both
  built from one BasicBlock (torchvision is not a dependency); scikit-learn's digits as 3-channel images.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: The venv holding litert-torch (scripts/make-litert-venv.sh); tflite_quantize's PyTorch path runs there.
LITERT_PYTHON = Path(os.environ.get("MODELOPT_LITERT_PYTHON", REPO / ".venv-litert" / "bin" / "python"))


# -- steps ------------------------------------------------------------------------------------


class StepError(RuntimeError):
    """A step exited non-zero; the message is the step's own error line."""


def run_step(name: str, spec: dict[str, Any], env: dict[str, str], *, python: Path | str | None = None,
             log_file: Path | None = None) -> dict[str, Any]:
    """Run one step as local mode does and return its result JSON; raise StepError with its error line.

    The step's stderr (its log) goes to ``log_file`` when given."""
    proc = subprocess.run([str(python or sys.executable), "-m", "airflow_modelopt", "run", name, "--spec", "-"],
                          input=json.dumps(spec), capture_output=True, text=True, env={**os.environ, **env})
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text(proc.stderr)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        errors = [ln.removeprefix("modelopt: error: ") for ln in lines if ln.startswith("modelopt: error:")]
        raise StepError(f"{name} exited {proc.returncode}: " + (errors[-1] if errors else " | ".join(lines[-3:])))
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- MLflow store -----------------------------------------------------------------------------


def sqlite_store(work: Path) -> dict[str, str]:
    """Environment for steps logging to a throw-away SQLite store (and artifact folder) under ``work``."""
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "MODELOPT_ARTIFACT_ROOT": str(work / "art"),
            "MODELOPT_LOG_LEVEL": "WARNING"}


@contextlib.contextmanager
def mlflow_server(work: Path, timeout_s: float = 120) -> Iterator[dict[str, str]]:
    """A local ``mlflow server`` on 127.0.0.1 (SQLite backend, served artifacts under ``work``) for the
    duration of the block; yields the steps' environment. Stopped (by its pid) on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    work.mkdir(parents=True, exist_ok=True)
    log = open(work / "mlflow-server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}", "--artifacts-destination", str(work / "art"),
         "--serve-artifacts", "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, cwd=work,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no GenAI job runner: measuring here
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=5):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("mlflow server did not start: "
                                       + (work / "mlflow-server.log").read_text()[-2000:]) from None
                time.sleep(1)
        yield {"MLFLOW_TRACKING_URI": uri}
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def download(uri: str, dest: Path) -> Path:
    """An artifact (runs:/, mlflow-artifacts:/, ...) as a local file or folder under ``dest``."""
    import mlflow

    dest.mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))


# -- bytes on disk ----------------------------------------------------------------------------


def file_sizes(files: list[Path]) -> tuple[int, int]:
    """(bytes, gzip bytes) of a model's files (``Runtime.model_files()``: what the benchmark step counts)."""
    data = [p.read_bytes() for p in files]
    return sum(len(d) for d in data), sum(len(gzip.compress(d, mtime=0)) for d in data)


def sizes(path: Path) -> tuple[int, int]:
    """(bytes, gzip bytes) of the model at ``path``, loaded with the runtimes layer to find its files
    (an ONNX graph and the external data it references, a .tflite, ...)."""
    from airflow_modelopt.container.runtimes import load

    runtime = load(path)
    try:
        return file_sizes(runtime.model_files())
    finally:
        runtime.close()


def onnx_weight_bytes(path: Path) -> int:
    """Bytes of an ONNX model's initializers (its weights), whether stored inline or externally."""
    import onnx
    from onnx import numpy_helper

    graph = path if path.is_file() else next(path.rglob("*.onnx"))
    model = onnx.load(str(graph), load_external_data=True)
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


# -- models -----------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convolutions with batch norm, plus the (projected) input."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A stem, stages of BasicBlocks (``(channels, stride, blocks)`` each), global average pool, linear."""

    def __init__(self, stem: nn.Module, stem_channels: int, stages: list[tuple[int, int, int]], classes: int) -> None:
        super().__init__()
        self.stem = stem
        layers, cin = [], stem_channels
        for cout, stride, blocks in stages:
            layers += [BasicBlock(cin, cout, stride)] + [BasicBlock(cout, cout, 1) for _ in range(blocks - 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def resnet18(classes: int = 1000) -> ResNet:
    """ResNet-18's shape (BasicBlock x [2, 2, 2, 2], 11.7 M parameters at 1000 classes) for 3x224x224."""
    stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                         nn.MaxPool2d(3, 2, 1))
    return ResNet(stem, 64, [(64, 1, 2), (128, 2, 2), (256, 2, 2), (512, 2, 2)], classes)


def residual_cnn(classes: int = 10, widths: tuple[int, int, int] = (32, 64, 128)) -> ResNet:
    """A small ResNet for 3x32x32: a 3x3 stem, then three stages of one BasicBlock each, every stage
    halving the resolution (16x16, 8x8, 4x4): cheap enough to train in well under a minute on 2 cores."""
    stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
    return ResNet(stem, widths[0], [(widths[0], 2, 1), (widths[1], 2, 1), (widths[2], 2, 1)], classes)


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, x: np.ndarray, batch: int = 16) -> None:
    """BatchNorm running statistics from ``x`` (cumulative average, no gradient step), then eval mode:
    a randomly initialised network gets realistic activation ranges for calibration."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    for i in range(0, len(x), batch):
        model(torch.from_numpy(x[i : i + batch]))
    model.eval()


def export_pt2(model: nn.Module, example: np.ndarray, path: Path) -> Path:
    """torch.export ExportedProgram with a dynamic batch dimension (as train_example saves its model)."""
    model.eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (torch.from_numpy(example[:2]),), dynamic_shapes={"x": {0: batch}})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, path)
    return path


# -- data -------------------------------------------------------------------------------------


def to_rgb(x: np.ndarray, size: int, *, tint_seed: int | None = None) -> np.ndarray:
    """(N, 1, 8, 8) digits in [0, 1] -> (N, 3, size, size) float32, nearest-neighbour upscaled and
    normalised like ImageNet inputs. Without ``tint_seed`` the grey image is repeated on 3 channels;
    with it, each image gets a random ink and background colour and some noise, so the channels differ."""
    up = np.kron(x[:, 0].astype(np.float32), np.ones((size // 8, size // 8), dtype=np.float32))[:, None]
    if tint_seed is None:
        rgb = np.repeat(up, 3, axis=1)
    else:
        rng = np.random.default_rng(tint_seed)
        ink = rng.uniform(0.4, 1.0, (len(x), 3, 1, 1)).astype(np.float32)
        paper = rng.uniform(0.0, 0.35, (len(x), 3, 1, 1)).astype(np.float32)
        rgb = paper + (ink - paper) * up + rng.normal(0, 0.05, (len(x), 3, size, size)).astype(np.float32)
    return ((rgb - 0.45) / 0.225).astype(np.float32)


def digit_images(n: int, offset: int, size: int = 224) -> np.ndarray:
    """scikit-learn's digits ``[offset, offset + n)`` in file order as grey 3-channel images (see to_rgb)."""
    from sklearn.datasets import load_digits

    images = load_digits().images[offset : offset + n].astype(np.float32) / 16.0
    return to_rgb(images[:, None], size)


def save_npz(path: Path, x: np.ndarray, y: np.ndarray | None = None) -> Path:
    """A data artifact: inputs under ``x`` and, when given, labels under ``y``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **({"x": x} if y is None else {"x": x, "y": y.astype(np.int64)}))
    return path
