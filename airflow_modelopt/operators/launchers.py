"""The three ways to run a step: a local subprocess, a Docker container, a Kubernetes pod.

A launcher gets a frozen :class:`LaunchRequest` (what the operator rendered and validated), turns
its spec into the container entry point's command line (``airflow-modelopt run <step> --spec
<json>``), runs it, and reads back the result: the last stdout line, or
``/airflow/xcom/return.json`` on Kubernetes. Docker and Kubernetes reuse the providers' own
operators, so logs, ``on_kill`` and connections behave as Airflow users expect. Launchers know
nothing of the operator that built the request.

Steps run with the least privilege each mode allows (``[modelopt] read_only_root_filesystem``,
``kubernetes_run_as_user``): a read-only root with scratch space on ``/tmp`` (also ``HOME``, where
matplotlib, Keras and torch keep caches), no capabilities, no privilege escalation and, on
Kubernetes, a non-root user and the runtime's default seccomp profile. ``docker_kwargs`` and
``kubernetes_kwargs`` override each setting by the provider argument's name.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException

from airflow_modelopt import config
from airflow_modelopt.exceptions import (
    EXIT_BAD_INPUT,
    EXIT_CONVERSION_FAILED,
    EXIT_GATE_FAILED,
    EXIT_TRACKING_UNAVAILABLE,
    EXIT_UNSUPPORTED_HERE,
    NON_RETRYABLE_EXIT_CODES,
)
from airflow_modelopt.hooks.mlflow import TrackingConfig
from airflow_modelopt.operators import warm_start
from airflow_modelopt.specs import StepResult, StepSpec

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator, Context

#: How many of a failed step's last log lines go into the task's error.
TAIL_LINES = 25

_EXIT_MEANING = {
    EXIT_BAD_INPUT: "bad spec or input; not retried",
    EXIT_GATE_FAILED: "a quality gate failed; not retried",
    EXIT_TRACKING_UNAVAILABLE: "MLflow tracking server unreachable",
    EXIT_CONVERSION_FAILED: "the converter refused the model; not retried",
    EXIT_UNSUPPORTED_HERE: "this worker cannot run the step (no GPU or framework); not retried",
}


#: The writable scratch folder on a read-only root: ``tempfile.gettempdir()`` and ``HOME``.
SCRATCH_DIR = "/tmp"
SCRATCH_VOLUME = "modelopt-scratch"


class TrackingUnavailableError(AirflowException):
    """The step could not reach MLflow (exit code 4): transient, so retried with backoff."""


@dataclasses.dataclass(frozen=True)
class LaunchRequest:
    """Everything a launcher needs to run one step, built by the operator once its fields are
    rendered and the spec validated. Launchers never change it (they send a copy of the spec
    with the image filled in)."""

    task_id: str
    spec: StepSpec
    tracking: TrackingConfig
    #: The operator's ``image`` argument; None: from ``[modelopt]`` image options.
    image: str | None = None
    #: Interpreter for local mode; None: ``[modelopt] local_python``, else the worker's.
    python: str | None = None
    docker_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    kubernetes_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("docker_kwargs", "kubernetes_kwargs"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    def spec_for_image(self, image: str | None, digest: str | None = None) -> StepSpec:
        """A copy of the spec with the image (and its digest: both are in the cache key)."""
        context = self.spec.context.model_copy(update={"image": image, "image_digest": digest})
        return self.spec.model_copy(update={"context": context})

    def resolved_image(self) -> str:
        return config.image_for(self.spec.step, self.image, self.spec.resolved_image_family())


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
    """The exception a failed step raises: the exit code's meaning and the last log lines.

    Its class tells Airflow what to do: ``AirflowFailException`` (never retried) for the exit codes
    a retry cannot help, ``TrackingUnavailableError`` for an unreachable MLflow, else
    ``AirflowException`` (the task's own retries)."""
    meaning = _EXIT_MEANING.get(exit_code or -1, "step failed")
    tail = "\n".join(line.rstrip() for line in lines[-TAIL_LINES:])
    message = f"step {step} failed in {where} (exit code {exit_code}: {meaning}).{detail}"
    if tail:
        message += f"\nLast log lines:\n{tail}"
    if exit_code in NON_RETRYABLE_EXIT_CODES:
        return AirflowFailException(message)
    if exit_code == EXIT_TRACKING_UNAVAILABLE:
        return TrackingUnavailableError(message)
    return AirflowException(message)


def run_nested(operator: BaseOperator, context: Context) -> Any:
    """Run a provider operator's ``execute`` from inside ours.

    The Task SDK warns when ``execute`` is called outside its task runner. Here the nesting is
    the design (one task, one container), so the inner operator is marked as the one the
    runner is executing while it runs.
    """
    from airflow.sdk.bases.operator import ExecutorSafeguard

    token = ExecutorSafeguard.tracker.set(operator)
    try:
        return operator.execute(context)
    finally:
        ExecutorSafeguard.tracker.reset(token)


class Launcher:
    mode = ""

    def __init__(self, request: LaunchRequest, log: logging.Logger | logging.LoggerAdapter | None = None) -> None:
        self.request = request
        self.log = log or logging.getLogger(__name__)

    def launch(self, context: Context) -> StepResult:
        raise NotImplementedError

    def kill(self) -> None:
        """Stop the running step (Airflow calls this when the task is killed)."""

    def prepare(self) -> None:
        """Work that may start before the cache decision, in the background (local mode: the warm
        interpreter); never fails the task."""

    def known_image(self) -> tuple[str | None, str | None] | None:
        """The image and its content digest the step would run in, as its cache key names them,
        when they can be known without starting or pulling anything; None when they cannot."""
        return None


class LocalLauncher(Launcher):
    """A subprocess running the same entry point, in the worker's Python or a configured one."""

    mode = "local"

    def __init__(self, request: LaunchRequest, log: logging.Logger | logging.LoggerAdapter | None = None) -> None:
        super().__init__(request, log)
        self.process: subprocess.Popen[str] | warm_start.WarmStep | None = None

    def python(self) -> str:
        return self.request.python or config.get("local_python") or sys.executable

    def known_image(self) -> tuple[str | None, str | None]:
        return None, None

    def env(self) -> dict[str, str]:
        tracking = self.request.tracking
        return {**os.environ, **tracking.public_env, **tracking.secret_env, "PYTHONUNBUFFERED": "1"}

    def prepare(self) -> None:
        """Start the warm interpreter in the background (``warm_start``), for this step or the next."""
        warm_start.note_task()
        warm_start.prestart(self.python(), self.env())

    def _start_warm(self, args: list[str], env: dict[str, str], spec_json: str) -> warm_start.WarmStep | None:
        """The step forked from the warm interpreter; None when warm starts are off or it cannot
        take the step (then a fresh process runs it)."""
        python = self.python()
        try:
            if not warm_start.usable(python):
                return None
            step = warm_start.server(python, env).spawn(args, env, spec_json)
        except warm_start.Unavailable as exc:
            self.log.info("Warm interpreter unavailable (%s): starting a fresh process", exc)
            return None
        except ValueError as exc:  # a bad [modelopt] warm_start value
            raise AirflowFailException(str(exc)) from None
        self.log.info("Started airflow-modelopt %s from the warm interpreter (pid %s)", " ".join(args), step.pid)
        return step

    def launch(self, context: Context) -> StepResult:
        spec = self.request.spec
        args = ["run", spec.step, "--spec", "-"]
        argv = [self.python(), "-m", "airflow_modelopt", *args]
        env = self.env()
        tail: collections.deque[str] = collections.deque(maxlen=200)
        self.process = self._start_warm(args, env, spec.model_dump_json())
        if self.process is None:
            self.log.info("Starting %s", " ".join(argv))
            try:
                self.process = subprocess.Popen(
                    argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    text=True, env=env, start_new_session=True, bufsize=1,
                )
            except OSError as exc:
                raise AirflowFailException(f"cannot start local step process {argv[0]!r}: {exc}") from None
            assert self.process.stdin is not None
            self.process.stdin.write(spec.model_dump_json())
            self.process.stdin.close()
        assert self.process.stdout is not None
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


def scratch_env() -> dict[str, str]:
    """Environment of a step on a read-only root: HOME in the scratch folder."""
    return {"HOME": SCRATCH_DIR} if config.get_bool("read_only_root_filesystem") else {}


#: Host settings the DockerOperator has no argument for; ``docker_kwargs`` may override each.
DOCKER_HOST_SETTINGS = ("read_only", "tmpfs", "cap_drop", "security_opt")


def docker_host_settings(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The step container's hardening (docker-py ``create_host_config`` arguments), then the
    user's ``docker_kwargs`` of the same names."""
    read_only = config.get_bool("read_only_root_filesystem")
    settings: dict[str, Any] = {
        "read_only": read_only,
        # Docker mounts a tmpfs noexec by default; torch's inductor loads the code it compiles there.
        "tmpfs": {SCRATCH_DIR: "rw,exec,nosuid,nodev,mode=1777"} if read_only else {},
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
    }
    settings.update({k: v for k, v in overrides.items() if k in DOCKER_HOST_SETTINGS})
    return settings


class _HostConfigClient:
    """A docker-py ``APIClient`` whose ``create_host_config`` adds the step's host settings."""

    def __init__(self, client: Any, settings: Mapping[str, Any]) -> None:
        self._client = client
        self._settings = settings

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def create_host_config(self, **kwargs: Any) -> Any:
        return self._client.create_host_config(**{**kwargs, **self._settings})


@functools.cache
def _step_docker_operator() -> type:
    """The Docker provider's operator, plus the host settings it has no argument for (imported
    on first use: DAG files that never run docker mode do not load the Docker client)."""
    from airflow.providers.docker.operators.docker import DockerOperator

    class StepDockerOperator(DockerOperator):
        def __init__(self, *, host_settings: Mapping[str, Any], **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.host_settings = dict(host_settings)

        @property
        def cli(self) -> Any:
            return _HostConfigClient(self.hook.api_client, self.host_settings)

    return StepDockerOperator


class DockerLauncher(Launcher):
    """Through the Docker provider's DockerOperator; the image per step comes from config."""

    mode = "docker"

    def __init__(self, request: LaunchRequest, log: logging.Logger | logging.LoggerAdapter | None = None) -> None:
        super().__init__(request, log)
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

    def known_image(self) -> tuple[str | None, str | None] | None:
        """The image and the digest ``launch`` would find, if the engine has the image (no pull)."""
        image = self.request.resolved_image()
        try:
            hook = self.build_operator(self.request.spec_for_image(image)).hook
            info = hook.api_client.inspect_image(image)
        except Exception as exc:  # noqa: BLE001 - absent image, engine down: launch() says what is wrong
            self.log.info("Image %s not inspected before launch: %s", image, exc)
            return None
        repo_digests = info.get("RepoDigests") or []
        return image, (repo_digests[0].split("@", 1)[-1] if repo_digests else info["Id"])

    def build_operator(self, spec: StepSpec | None = None) -> Any:
        """The DockerOperator that runs ``spec`` (default: the request's, its image filled in)."""
        request = self.request
        spec = spec or request.spec
        user = {k: v for k, v in request.docker_kwargs.items() if k not in DOCKER_HOST_SETTINGS}
        kwargs: dict[str, Any] = {
            "docker_url": config.get("docker_url"),
            "network_mode": config.get("docker_network_mode"),
            "mount_tmp_dir": False,
            "auto_remove": "success",
            "tty": False,
            **user,
        }
        return _step_docker_operator()(
            task_id=request.task_id,
            image=spec.context.image,
            command=command_for(spec),
            environment={**scratch_env(), **request.tracking.public_env},
            private_environment=dict(request.tracking.secret_env),
            do_xcom_push=True,
            xcom_all=True,
            labels={"airflow-modelopt.step": spec.step, "airflow-modelopt.task": request.task_id},
            host_settings=docker_host_settings(request.docker_kwargs),
            **kwargs,
        )

    def launch(self, context: Context) -> StepResult:
        from airflow.providers.docker.exceptions import DockerContainerFailedException

        tracking = self.request.tracking
        if not tracking.is_remote:
            raise AirflowFailException(
                f"docker mode needs an MLflow tracking server over HTTP that containers can reach, but "
                f"{tracking.source} gives {tracking.tracking_uri!r}. Set the connection, e.g. "
                "AIRFLOW_CONN_MLFLOW_DEFAULT='http://127.0.0.1:5000' (with [modelopt] "
                "docker_network_mode=host for a server on the worker's loopback)."
            )
        image = self.request.resolved_image()
        spec = self.request.spec_for_image(image)
        self.docker_operator = self.build_operator(spec)
        digest = self.image_digest(self.docker_operator.hook, image)
        # The digest is part of the spec (and so of the cache key): rebuild the command.
        spec = self.request.spec_for_image(image, digest)
        self.docker_operator.command = command_for(spec)
        self.log.info("Image %s (%s)", image, digest)
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


def pod_security(kubernetes_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The restricted Pod Security Standard for the step pod, its container and the xcom sidecar,
    plus the scratch volume a read-only root needs; ``kubernetes_kwargs`` of the same names win
    (given volumes and mounts are kept, the scratch ones added unless ``/tmp`` is mounted)."""
    from kubernetes.client import models as k8s

    read_only = config.get_bool("read_only_root_filesystem")
    uid = config.get("kubernetes_run_as_user").strip()
    pod = k8s.V1PodSecurityContext(run_as_non_root=True, seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"))
    if uid:  # empty: the platform assigns one (OpenShift); the images' HOME is group-0 writable
        pod.run_as_user = pod.run_as_group = pod.fs_group = int(uid)

    def container() -> k8s.V1SecurityContext:
        return k8s.V1SecurityContext(
            allow_privilege_escalation=False, capabilities=k8s.V1Capabilities(drop=["ALL"]),
            read_only_root_filesystem=read_only, run_as_non_root=True,
            seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
        )

    settings: dict[str, Any] = {
        "security_context": pod,
        "container_security_context": container(),
        "xcom_sidecar_container_security_context": container(),
    }
    settings.update({k: v for k, v in kubernetes_kwargs.items() if k in settings})
    volumes = list(kubernetes_kwargs.get("volumes") or [])
    mounts = list(kubernetes_kwargs.get("volume_mounts") or [])
    if read_only and not any(k8s_field(m, "mount_path") == SCRATCH_DIR for m in mounts):
        volumes.append(k8s.V1Volume(name=SCRATCH_VOLUME, empty_dir=k8s.V1EmptyDirVolumeSource()))
        mounts.append(k8s.V1VolumeMount(name=SCRATCH_VOLUME, mount_path=SCRATCH_DIR))
    return {**settings, "volumes": volumes, "volume_mounts": mounts}


def k8s_field(obj: Any, name: str) -> Any:
    """A field of a Kubernetes model given as an object or as its dict (snake_case or camelCase)."""
    if isinstance(obj, dict):
        camel = "".join(part.capitalize() if i else part for i, part in enumerate(name.split("_")))
        return obj.get(name, obj.get(camel))
    return getattr(obj, name, None)


class KubernetesLauncher(Launcher):
    """Through the cncf.kubernetes provider's KubernetesPodOperator; result from return.json."""

    mode = "kubernetes"

    def __init__(self, request: LaunchRequest, log: logging.Logger | logging.LoggerAdapter | None = None) -> None:
        super().__init__(request, log)
        self.pod_operator: Any = None

    def build_operator(self, spec: StepSpec | None = None) -> Any:
        """The KubernetesPodOperator that runs ``spec`` (default: the request's, its image filled in)."""
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
        from airflow.providers.cncf.kubernetes.secret import Secret

        request, tracking = self.request, self.request.tracking
        spec = spec or request.spec
        settings = config.KubernetesSettings.from_config()
        extra = dict(request.kubernetes_kwargs)
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
            **pod_security(extra),
        }
        return KubernetesPodOperator(
            task_id=request.task_id,
            name=f"modelopt-{spec.step.replace('_', '-')}",
            image=spec.context.image,
            cmds=argv[:1],
            arguments=argv[1:],
            env_vars={**scratch_env(), **tracking.public_env},
            secrets=secrets,
            do_xcom_push=True,
            labels={"app.kubernetes.io/name": "airflow-modelopt", "airflow-modelopt/step": spec.step},
            **kwargs,
        )

    def launch(self, context: Context) -> StepResult:
        spec = self.request.spec_for_image(self.request.resolved_image())
        self.pod_operator = self.build_operator(spec)
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
