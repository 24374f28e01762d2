"""What a step gets and what it gives back: ``StepContext`` (its inputs, work folder and MLflow run)
and ``StepOutput`` (artifacts, metrics, info, verdict). Steps import these; the runner builds them."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airflow_modelopt.specs import StepSpec, Verdict

log = logging.getLogger("airflow_modelopt.container.runner")


@dataclass
class StepOutput:
    """What a step's ``run`` returns; the runner turns it into the StepResult."""

    artifacts: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    verdict: Verdict | None = None


@dataclass
class StepContext:
    """What a step gets besides its spec: local inputs, a work folder, and its MLflow run."""

    spec: StepSpec
    run_id: str
    experiment_id: str
    parent_run_id: str | None
    workdir: Path
    inputs: dict[str, Path]
    client: Any
    log: logging.Logger = log

    def input(self, name: str) -> Path | None:
        return self.inputs.get(name)

    def artifact_uri(self, artifact_path: str) -> str:
        return f"runs:/{self.run_id}/{artifact_path}"

    def log_artifact(self, local_path: Path, artifact_path: str | None = None) -> str:
        """Upload a file or folder to this step's run; return its runs:/ URI."""
        local_path = Path(local_path)
        if local_path.is_dir():
            self.client.log_artifacts(self.run_id, str(local_path), artifact_path)
            return self.artifact_uri(artifact_path or "")
        self.client.log_artifact(self.run_id, str(local_path), artifact_path)
        return self.artifact_uri(f"{artifact_path}/{local_path.name}" if artifact_path else local_path.name)

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> str:
        self.client.log_dict(self.run_id, data, artifact_file)
        return self.artifact_uri(artifact_file)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """Log metrics to this step's run in batches: the one way steps and the runner log metrics."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])
