"""Helm tier: the chart in helm/airflow-modelopt, rendered and linted by a real helm binary.

helm comes from scripts/install-helm.sh (build/tools/helm, or a v3.8+ helm on PATH). When it
cannot be had the tier skips, unless MODELOPT_REQUIRE_HELM=1 (CI sets it), which turns the skip
into a failure. No test here talks to a cluster.
"""

from __future__ import annotations

import base64
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO, skip_unless_available

CHART = REPO / "helm" / "airflow-modelopt"
EXTERNAL_VALUES = CHART / "ci" / "external-values.yaml"
RELEASE = "airflow-modelopt"
NAMESPACE = "airflow"
#: The Kubernetes version manifests are rendered for and validated against.
KUBE_VERSION = "1.35.0"
MLFLOW = f"{RELEASE}-mlflow"
POSTGRESQL = f"{RELEASE}-postgresql"
#: The tracking URI the chart's connection gives Airflow and the step pods.
IN_CLUSTER_URI = f"http://{MLFLOW}.{NAMESPACE}.svc.cluster.local:5000"


@dataclass
class Helm:
    path: str

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.path, *args], capture_output=True, text=True, timeout=timeout)

    def template_cmd(self, *args: str, namespace: str = NAMESPACE) -> list[str]:
        return ["template", RELEASE, str(CHART), "--namespace", namespace, "--kube-version", KUBE_VERSION, *args]

    def render(self, *args: str, namespace: str = NAMESPACE) -> Manifests:
        """`helm template` with these extra arguments; fails the test with helm's error."""
        proc = self.run(*self.template_cmd(*args, namespace=namespace))
        assert proc.returncode == 0, f"helm template {' '.join(args)} failed:\n{proc.stderr}"
        return Manifests([doc for doc in yaml.safe_load_all(proc.stdout) if doc])

    def refuse(self, *args: str) -> str:
        """`helm template` that must fail; returns helm's error."""
        proc = self.run(*self.template_cmd(*args))
        assert proc.returncode != 0, f"helm accepted {' '.join(args)}"
        return proc.stderr

    def version(self) -> tuple[int, int]:
        out = self.run("version", "--template", "{{.Version}}").stdout.strip().lstrip("v")
        major, minor = out.split(".")[:2]
        return int(major), int(minor)


class Manifests(list):
    """The documents `helm template` printed."""

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [doc for doc in self if doc["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [doc for doc in self.all(kind) if name is None or doc["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
        return found[0]

    def config(self) -> dict[str, str]:
        """The provider's configuration ConfigMap's data."""
        return self.one("ConfigMap", f"{RELEASE}-config")["data"]

    def secret_data(self, name: str) -> dict[str, str]:
        """A Secret's decoded keys, whether rendered as data or stringData."""
        secret = self.one("Secret", name)
        data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
        return {**data, **(secret.get("stringData") or {})}

    def container(self, kind: str, name: str, container: str) -> dict[str, Any]:
        spec = self.one(kind, name)["spec"]["template"]["spec"]
        return next(c for c in spec["containers"] if c["name"] == container)


@pytest.fixture(scope="session")
def helm() -> Helm:
    reason = None
    try:
        proc = subprocess.run(["bash", str(REPO / "scripts" / "install-helm.sh")], capture_output=True,
                              text=True, timeout=600)
        if proc.returncode != 0:
            reason = f"scripts/install-helm.sh failed: {proc.stderr.strip()[-800:]}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        reason = f"scripts/install-helm.sh did not run: {exc}"
    skip_unless_available(reason, "MODELOPT_REQUIRE_HELM", "helm tests need a helm binary")
    path = proc.stdout.strip().splitlines()[-1]
    assert Path(path).is_file(), f"install-helm.sh printed {path!r}, which is not a file"
    return Helm(path)


@pytest.fixture(scope="session")
def default_manifests(helm: Helm) -> Manifests:
    """The chart with its default values: bundled PostgreSQL, artifacts on a claim."""
    return helm.render()


@pytest.fixture(scope="session")
def external_manifests(helm: Helm) -> Manifests:
    """The production shape: external database, object store, step pods in their own namespace."""
    return helm.render("-f", str(EXTERNAL_VALUES))


@pytest.fixture(scope="session")
def external_values() -> dict[str, Any]:
    return yaml.safe_load(EXTERNAL_VALUES.read_text())
