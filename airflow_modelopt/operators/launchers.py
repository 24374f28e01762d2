"""The three ways to run a step: a local subprocess, a Docker container, a Kubernetes pod.

Each launcher turns a validated spec into the container entry point's command line
(``airflow-modelopt run <step> --spec <json>``), runs it, and reads back the result: the last
stdout line, or ``/airflow/xcom/return.json`` on Kubernetes. Docker and Kubernetes reuse the
providers' own operators, so logs, ``on_kill`` and connections behave as Airflow users expect.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from airflow_modelopt import config
from airflow_modelopt.exceptions import (
    EXIT_BAD_INPUT,
    EXIT_CONVERSION_FAILED,
    EXIT_GATE_FAILED,
    EXIT_TRACKING_UNAVAILABLE,
    EXIT_UNSUPPORTED_HERE,
    NON_RETRYABLE_EXIT_CODES,
)
from airflow_modelopt.specs import StepResult, StepSpec

try:  # Airflow 3
    from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException
except ImportError:  # pragma: no cover - Airflow 2
    from airflow.exceptions import (  # type: ignore[no-redef]
        AirflowException,
        AirflowFailException,
        AirflowSkipException,
    )

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator, Context

    from airflow_modelopt.hooks.mlflow import TrackingConfig
    from airflow_modelopt.operators.base import ModelOptOperator

#: How many of a failed step's last log lines go into the task's error.
TAIL_LINES = 25

_EXIT_MEANING = {
    EXIT_BAD_INPUT: "bad spec or input; not retried",
    EXIT_GATE_FAILED: "a quality gate failed; not retried",
    EXIT_TRACKING_UNAVAILABLE: "MLflow tracking server unreachable",
    EXIT_CONVERSION_FAILED: "the converter refused the model; not retried",
    EXIT_UNSUPPORTED_HERE: "this worker cannot run the step (no GPU or framework); not retried",
}


def command_for(spec: StepSpec) -> list[str]:
    """The container entry point's argv for this spec (spec JSON inline, no secrets in it)."""
    return ["airflow-modelopt", "run", spec.step, "--spec", spec.model_dump_json()]


def parse_result(lines: Iterable[str], *, where: str) -> StepResult:
    """The step result is the last stdout line that is a JSON object."""
    tail = [line.strip() for line in lines if line and line.strip()]
    for line in reversed(tail):
        if line.startswith("{"):
            try:
                return StepResult.model_validate(json.loads(line))
            except (ValueError, TypeError):
                break
    shown = "\n".join(tail[-TAIL_LINES:])
    raise AirflowException(f"the step in {where} printed no result JSON as its last line. Last lines:\n{shown}")


def failure(step: str, where: str, exit_code: int | None, lines: list[str], detail: str = "") -> Exception:
    """The exception a failed step raises: the exit code's meaning and the last log lines."""
    meaning = _EXIT_MEANING.get(exit_code or -1, "step failed")
    tail = "\n".join(line.rstrip() for line in lines[-TAIL_LINES:])
    message = f"step {step} failed in {where} (exit code {exit_code}: {meaning}).{detail}"
    if tail:
        message += f"\nLast log lines:\n{tail}"
    cls = AirflowFailException if exit_code in NON_RETRYABLE_EXIT_CODES else AirflowException
    return cls(message)


def run_nested(operator: BaseOperator, context: Context) -> Any:
    """Run a provider operator's ``execute`` from inside ours.

    The Task SDK warns when ``execute`` is called outside its task runner. Here the nesting is
    the design (one task, one container), so the inner operator is marked as the one the
    runner is executing while it runs.
    """
    try:
        from airflow.sdk.bases.operator import ExecutorSafeguard
    except ImportError:  # pragma: no cover - Airflow 2
        return operator.execute(context)
    token = ExecutorSafeguard.tracker.set(operator)
    try:
        return operator.execute(context)
    finally:
        ExecutorSafeguard.tracker.reset(token)


class Launcher:
    mode = ""

    def __init__(self, operator: ModelOptOperator) -> None:
        self.operator = operator
        self.log = operator.log

    def launch(self, spec: StepSpec, tracking: TrackingConfig, context: Context) -> StepResult:
        raise NotImplementedError

    def kill(self) -> None:
        """Stop the running step (Airflow calls this when the task is killed)."""


class LocalLauncher(Launcher):
    """A subprocess running the same entry point, in the worker's Python or a configured one."""

    mode = "local"

    def __init__(self, operator: ModelOptOperator) -> None:
        super().__init__(operator)
        self.process: subprocess.Popen[str] | None = None

    def python(self) -> str:
        return self.operator.python or config.get("local_python") or sys.executable

    def launch(self, spec: StepSpec, tracking: TrackingConfig, context: Context) -> StepResult:
        argv = [self.python(), "-m", "airflow_modelopt", "run", spec.step, "--spec", "-"]
        env = {**os.environ, **tracking.public_env, **tracking.secret_env, "PYTHONUNBUFFERED": "1"}
        self.log.info("Starting %s", " ".join(argv))
        tail: collections.deque[str] = collections.deque(maxlen=200)
        try:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, env=env, start_new_session=True, bufsize=1,
            )
        except OSError as exc:
            raise AirflowFailException(f"cannot start local step process {argv[0]!r}: {exc}") from None
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(spec.model_dump_json())
        self.process.stdin.close()
        for line in self.process.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            self.log.info("%s", line)
        code = self.process.wait()
        lines = list(tail)
        if code != 0:
            raise failure(spec.step, "a local process", code, lines)
        return parse_result(lines, where="a local process")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.log.info("Stopping local step process %s", self.process.pid)
            os.killpg(self.process.pid, signal.SIGTERM)


class DockerLauncher(Launcher):
    """Through the Docker provider's DockerOperator; the image per step comes from config."""

    mode = "docker"

    def __init__(self, operator: ModelOptOperator) -> None:
        super().__init__(operator)
        self.docker_operator: Any = None

    def image_digest(self, hook: Any, image: str) -> str:
        """Content digest of a local image; pull if absent; fail clearly if it cannot be had."""
        from docker.errors import APIError, ImageNotFound

        client = hook.api_client
        try:
            info = client.inspect_image(image)
        except ImageNotFound:
            self.log.info("Image %s is not on the engine; trying to pull it", image)
            try:
                client.pull(image)
                info = client.inspect_image(image)
            except APIError as exc:
                raise AirflowFailException(
                    f"image {image!r} is not present on the Docker engine and could not be pulled "
                    f"({exc.explanation or exc}). Build it with `make images`, or point "
                    "[modelopt] image_registry / image_tag / image_overrides at an image that exists."
                ) from None
        repo_digests = info.get("RepoDigests") or []
        return repo_digests[0].split("@", 1)[-1] if repo_digests else info["Id"]

    def build_operator(self, spec: StepSpec, tracking: TrackingConfig) -> Any:
        from airflow.providers.docker.operators.docker import DockerOperator

        kwargs: dict[str, Any] = {
            "docker_url": config.get("docker_url"),
            "network_mode": config.get("docker_network_mode"),
            "mount_tmp_dir": False,
            "auto_remove": "success",
            "tty": False,
            **self.operator.docker_kwargs,
        }
        return DockerOperator(
            task_id=self.operator.task_id,
            image=spec.context.image,
            command=command_for(spec),
            environment=dict(tracking.public_env),
            private_environment=dict(tracking.secret_env),
            do_xcom_push=True,
            xcom_all=True,
            labels={"airflow-modelopt.step": spec.step, "airflow-modelopt.task": self.operator.task_id},
            **kwargs,
        )

    def launch(self, spec: StepSpec, tracking: TrackingConfig, context: Context) -> StepResult:
        from airflow.providers.docker.exceptions import DockerContainerFailedException

        if not tracking.is_remote:
            raise AirflowFailException(
                f"docker mode needs an MLflow tracking server over HTTP that containers can reach, but "
                f"{tracking.source} gives {tracking.tracking_uri!r}. Set the connection, e.g. "
                "AIRFLOW_CONN_MLFLOW_DEFAULT='http://127.0.0.1:5000' (with [modelopt] "
                "docker_network_mode=host for a server on the worker's loopback)."
            )
        image = config.image_for(spec.step, self.operator.image, spec.resolved_image_family())
        spec.context.image = image
        self.docker_operator = self.build_operator(spec, tracking)
        spec.context.image_digest = self.image_digest(self.docker_operator.hook, image)
        # The digest is part of the spec (and so of the cache key): rebuild the command.
        self.docker_operator.command = command_for(spec)
        self.log.info("Image %s (%s)", image, spec.context.image_digest)
        try:
            lines = run_nested(self.docker_operator, context) or []
        except DockerContainerFailedException as exc:
            logs = [str(line) for line in (exc.logs or [])]
            code = self._exit_code(exc)
            raise failure(spec.step, f"container {image}", code, logs) from None
        if isinstance(lines, str):
            lines = [lines]
        return parse_result([str(line) for line in lines], where=f"container {image}")

    @staticmethod
    def _exit_code(exc: Exception) -> int | None:
        text = str(exc)
        marker = "'StatusCode': "
        if marker in text:
            digits = text.split(marker, 1)[1].split("}", 1)[0].split(",", 1)[0].strip()
            if digits.lstrip("-").isdigit():
                return int(digits)
        return None

    def kill(self) -> None:
        if self.docker_operator is not None:
            self.docker_operator.on_kill()


def base_container_exit_code(pod_operator: Any) -> int | None:
    """Exit code of the step's container in the pod a KubernetesPodOperator last saw, if it ended."""
    remote = getattr(pod_operator, "remote_pod", None)
    status = getattr(remote, "status", None)
    for container in (getattr(status, "container_statuses", None) or []):
        if container.name == pod_operator.base_container_name and container.state and container.state.terminated:
            return container.state.terminated.exit_code
    return None


class KubernetesLauncher(Launcher):
    """Through the cncf.kubernetes provider's KubernetesPodOperator; result from return.json."""

    mode = "kubernetes"

    def __init__(self, operator: ModelOptOperator) -> None:
        super().__init__(operator)
        self.pod_operator: Any = None

    def build_operator(self, spec: StepSpec, tracking: TrackingConfig) -> Any:
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
        from airflow.providers.cncf.kubernetes.secret import Secret

        settings = config.KubernetesSettings.from_config()
        extra = dict(self.operator.kubernetes_kwargs)
        secrets = list(extra.pop("secrets", []))
        if settings.mlflow_secret:
            secrets.append(Secret("env", None, settings.mlflow_secret))
        elif tracking.secret_env:
            raise AirflowFailException(
                f"{tracking.source} carries MLflow credentials, which reach pods only through a "
                "Kubernetes Secret: create one with keys MLFLOW_TRACKING_TOKEN (or _USERNAME and "
                "_PASSWORD) and set [modelopt] kubernetes_mlflow_secret to its name."
            )
        if not tracking.is_remote:
            raise AirflowFailException(
                f"kubernetes mode needs an MLflow tracking server over HTTP, but {tracking.source} "
                f"gives {tracking.tracking_uri!r}."
            )
        argv = command_for(spec)
        kwargs: dict[str, Any] = {
            "namespace": settings.namespace,
            "in_cluster": settings.in_cluster,
            "kubernetes_conn_id": settings.conn_id,
            "service_account_name": settings.service_account,
            "on_finish_action": "delete_succeeded_pod",
            "get_logs": True,
            **extra,
        }
        return KubernetesPodOperator(
            task_id=self.operator.task_id,
            name=f"modelopt-{spec.step.replace('_', '-')}",
            image=spec.context.image,
            cmds=argv[:1],
            arguments=argv[1:],
            env_vars=dict(tracking.public_env),
            secrets=secrets,
            do_xcom_push=True,
            labels={"app.kubernetes.io/name": "airflow-modelopt", "airflow-modelopt/step": spec.step},
            **kwargs,
        )

    def launch(self, spec: StepSpec, tracking: TrackingConfig, context: Context) -> StepResult:
        spec.context.image = config.image_for(spec.step, self.operator.image, spec.resolved_image_family())
        self.pod_operator = self.build_operator(spec, tracking)
        try:
            raw = run_nested(self.pod_operator, context)
        except AirflowSkipException:
            raise
        except AirflowException as exc:
            # The provider raises one generic error for any failed pod; the step's exit code says
            # whether a retry can help (a bad spec or a failed gate fails the same way again).
            code = base_container_exit_code(self.pod_operator)
            if code is None:
                raise
            raise failure(spec.step, f"pod of image {spec.context.image}", code, [], detail=f"\n{exc}") from exc
        if raw is None:
            raise AirflowException(f"step {spec.step} pod wrote no /airflow/xcom/return.json")
        return StepResult.model_validate(raw if isinstance(raw, dict) else json.loads(raw))

    def kill(self) -> None:
        if self.pod_operator is not None:
            self.pod_operator.on_kill()


LAUNCHERS: dict[str, type[Launcher]] = {
    cls.mode: cls for cls in (LocalLauncher, DockerLauncher, KubernetesLauncher)
}
