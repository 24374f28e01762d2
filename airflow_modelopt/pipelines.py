"""The optimization task group: for each requested target, build -> validate -> benchmark in
parallel branches, then one promotion. A user's own DAG gets the whole pipeline in a few lines:

    from airflow_modelopt.pipelines import optimization_pipeline

    with DAG("my_optimize", schedule=None, start_date=datetime(2026, 1, 1)):
        optimization_pipeline(
            model_uri="models:/digits/3",
            calibration_data_uri="runs:/<run>/data/calibration.npz",
            eval_data_uri="runs:/<run>/data/eval.npz",
            targets=["onnx_fp32", "onnx_int8_static", "tflite_int8"],
            registered_model_name="digits-optimized",
        )

Every argument may be a Jinja template (``"{{ params.model_uri }}"``). The task structure is fixed
when the DAG is parsed; ``targets`` selects branches at run time: the others are skipped.
Shared work (the ONNX export) runs once for all targets that need it.

Up-front check: each selected target's first task (``target_<name>``) checks, before any build of
that branch runs, what can be told without fetching anything or importing an ML framework
(:func:`target_problems`): the data URIs its builds read are given (calibration data for the int8
targets, training data, or the calibration split in its place, for the pruned one, evaluation
data for every validation), and, for TensorRT targets run in local mode, that this worker sees an
NVIDIA GPU. A failing check fails that branch at once, naming what is missing; the other branches
go on. It does not open the data: whether an ``.npz`` has labels is the steps' to check (the prune
step needs none: without labels it distils from the unpruned model), nor does it check GPUs of
docker or kubernetes workers (the kubernetes pod requests ``nvidia.com/gpu``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from airflow_modelopt.operators.xcom import artifact
from airflow_modelopt.targets import TARGET_CHAINS, TARGET_DESCRIPTIONS, TARGETS, builds, parse_targets

#: The JSON Schema draft :func:`form_param` declares. Airflow validates every Param of every task
#: each time it serializes a DAG (``jsonschema.validate``, which first checks the schema itself
#: against its draft's metaschema). Against draft 2020-12, jsonschema's default, that check costs
#: 0.41 ms a Param here; against draft-07, which has every keyword a trigger form uses, 0.14 ms.
#: ``modelopt_optimize`` has 63 tasks x 11 Params and ``airflow dags test`` serializes it three times.
FORM_PARAM_SCHEMA = "http://json-schema.org/draft-07/schema#"


def form_param(default: Any, **schema: Any) -> Any:
    """An ``airflow.sdk.Param`` for a trigger form whose schema declares draft-07
    (:data:`FORM_PARAM_SCHEMA`): the same form and checks, a third of the validation cost."""
    from airflow.sdk import Param

    return Param(default, **{"$schema": FORM_PARAM_SCHEMA}, **schema)


#: The trigger forms' choices: each target with what it produces, and where steps run.
TARGET_CHOICES = {t: f"{t}: {TARGET_DESCRIPTIONS[t]}" for t in TARGETS}
EXECUTION_MODES = {"": "default ([modelopt] execution_mode)", "local": "local (subprocess on the worker)",
                   "docker": "docker (one image per step)", "kubernetes": "kubernetes (one pod per step)"}


def pipeline_form_params(*, gates: dict[str, Any] | None = None,
                         targets_description: str = "Deployables to build (pick one or more)") -> dict[str, Any]:
    """The trigger-form Params of :func:`optimization_pipeline`'s run-time choices, in form order:
    ``targets``, ``registered_model_name``, ``max_accuracy_drop``, then ``gates`` (more Params, e.g.
    a DAG's own gates), ``execution_mode`` and ``force``. Pass them on with
    :func:`pipeline_param_arguments`."""
    return {
        # examples + values_display: the form shows a multi-select of the known targets, each with
        # what it produces; items.enum makes the API refuse any other name.
        "targets": form_param(
            ["onnx_fp32", "onnx_int8_static", "tflite_int8"], type="array", title="Targets",
            items={"type": "string", "enum": list(TARGETS)}, minItems=1, uniqueItems=True,
            examples=list(TARGETS), values_display=TARGET_CHOICES, description=targets_description,
        ),
        "registered_model_name": form_param(
            "digits-cnn", type="string", minLength=1, maxLength=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$",
            title="Registered model name", description="MLflow registered model the passing candidates join",
        ),
        "max_accuracy_drop": form_param(
            0.02, type="number", minimum=0, maximum=1, title="Max accuracy drop",
            description="Gate: candidate accuracy may fall at most this much (0.02 = 2 points)",
        ),
        **(gates or {}),
        "execution_mode": form_param(
            "", type=["null", "string"], enum=["", "local", "docker", "kubernetes"],
            values_display=EXECUTION_MODES, title="Execution mode",
            description="Where steps run; the default is the deployment's [modelopt] execution_mode",
        ),
        # "null" in the type: an optional toggle, so the form shows no required marker.
        "force": form_param(
            False, type=["null", "boolean"], title="Force rebuild",
            description="Rebuild even when a finished MLflow run with the same cache key exists",
        ),
    }


def pipeline_param_arguments(params: dict[str, Any]) -> dict[str, str]:
    """:func:`optimization_pipeline` keyword arguments, each templated from the run's Param of the
    same name: ``optimization_pipeline(..., **pipeline_param_arguments(pipeline_form_params()))``."""
    return {name: f"{{{{ params.{name} }}}}" for name in params}


#: The operator whose builds need an NVIDIA GPU.
_GPU_OPERATORS = ("TensorRTBuildOperator",)


def target_needs(target: str) -> set[str]:
    """What a target's tasks read, from its builds' arguments: ``eval_data`` (always: validation and
    benchmark), ``calibration_data``, ``training_data`` (the calibration split may stand in), ``gpu``."""
    all_builds = builds()
    needs = {"eval_data"}
    for task_id in TARGET_CHAINS[target][0]:
        build = all_builds[task_id]
        values = {v for v in build.kwargs.values() if isinstance(v, str)}
        if "{calibration}" in values:
            needs.add("calibration_data")
        if "{train}" in values:
            needs.add("training_data")
        if build.operator in _GPU_OPERATORS:
            needs.add("gpu")
    return needs


def _given(value: Any) -> bool:
    return value is not None and str(value).strip() not in ("", "None", "null")


def gpu_visible() -> bool:
    """Whether this machine shows an NVIDIA GPU driver (a device node, or nvidia-smi on PATH)."""
    return Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi") is not None


def target_problems(target: str, *, calibration_data_uri: Any, eval_data_uri: Any, train_data_uri: Any = None,
                    execution_mode: str | None = None, gpu: bool | None = None) -> list[str]:
    """Why ``target`` cannot be built with these inputs (empty when nothing is missing that can be
    told cheaply). ``gpu``: whether a GPU is visible to local-mode steps (None: look here)."""
    from airflow_modelopt.config import resolve_execution_mode

    needs = target_needs(target)
    problems = []
    if "eval_data" in needs and not _given(eval_data_uri):
        problems.append("eval_data_uri: not given; every target is validated and benchmarked on it")
    if "calibration_data" in needs and not _given(calibration_data_uri):
        problems.append(f"calibration_data_uri: not given; {target} is quantized with calibration data")
    if "training_data" in needs and not (_given(train_data_uri) or _given(calibration_data_uri)):
        problems.append(f"train_data_uri: not given, nor calibration_data_uri to stand in; {target} fine-tunes "
                        "the pruned model on it (labels optional)")
    if "gpu" in needs and resolve_execution_mode(execution_mode) == "local":
        if not (gpu_visible() if gpu is None else gpu):
            problems.append(f"{target} builds a TensorRT engine, which needs an NVIDIA GPU, but its steps run in "
                            "local mode on this worker, which shows none (no /dev/nvidiactl, no nvidia-smi); run "
                            "it on a GPU worker or in kubernetes mode (the pod requests nvidia.com/gpu)")
    return problems


def optimization_pipeline(
    *,
    model_uri: str,
    calibration_data_uri: str,
    eval_data_uri: str,
    targets: Any,
    registered_model_name: str,
    train_data_uri: str | None = None,
    group_id: str = "optimize",
    max_accuracy_drop: Any = 0.02,
    min_top1_agreement: Any = None,
    objective: str = "latency_p50",
    execution_mode: str | None = None,
    force: Any = False,
    benchmark_runs: int = 50,
    available_targets: tuple[str, ...] = TARGETS,
    operator_kwargs: dict[str, dict[str, Any]] | None = None,
) -> Any:
    """Build the optimization TaskGroup (call inside a DAG context); returns the TaskGroup.

    ``available_targets`` fixes which branches exist in the DAG; ``targets`` (templated) selects
    among them at run time. ``train_data_uri`` feeds the pruned target's fine-tune (labels under
    ``y`` optional); when None, the calibration split stands in. ``operator_kwargs`` adds
    arguments per task id (e.g. ``{"tflite_int8": {"python": "/opt/tf/bin/python"}}``).
    """
    from airflow.sdk import TaskGroup, task
    from airflow.sdk.exceptions import AirflowFailException

    from airflow_modelopt import operators as ops

    for t in available_targets:
        if t not in TARGET_CHAINS:
            raise ValueError(f"available_targets: unknown target {t!r}; choose from {', '.join(TARGETS)}")
    # Pruning fine-tunes on the training data when given, else on the calibration split.
    fills = {"{model}": model_uri, "{eval}": eval_data_uri, "{calibration}": calibration_data_uri,
             "{train}": train_data_uri or calibration_data_uri}
    common: dict[str, Any] = {"force": force}
    if execution_mode is not None:
        common["execution_mode"] = execution_mode
    extra = operator_kwargs or {}
    all_builds = builds()

    with TaskGroup(group_id=group_id, tooltip="Build, validate and benchmark each target, then promote") as group:
        # Display names name the target ("validate onnx_fp32"): the grid shows them inside its group,
        # flat lists (task instances, logs) without it.
        # Tasks keep the ids ``<group_id>.<task>`` however they are grouped below: the per-target and
        # shared-build groups do not prefix (prefix_group_id=False), the task ids carry the outer prefix.
        prefix = group.child_id("")
        # One TaskGroup per target (its own builds, validation, benchmark), so the grid and the graph
        # read per target; the targets' input checks sit in one "check inputs" group before them and
        # builds used by several targets (the ONNX export) in one "shared builds" group: checks ->
        # shared builds -> targets -> promote, with no cycle between groups (the UI sorts groups
        # topologically). Groups only arrange the display: ids and dependencies are as before.
        checks = TaskGroup(group_id="check_inputs", group_display_name="check inputs", prefix_group_id=False,
                           tooltip="Per selected target: are the inputs its builds need given?")
        target_groups = {
            t: TaskGroup(group_id=f"branch_{t}", group_display_name=t, prefix_group_id=False,
                         tooltip=TARGET_DESCRIPTIONS.get(t, t))
            for t in available_targets
        }
        shared_groups: list[Any] = []

        def shared_group() -> Any:
            if not shared_groups:
                shared_groups.append(TaskGroup(group_id="shared_builds", group_display_name="shared builds",
                                               prefix_group_id=False,
                                               tooltip="Builds several targets start from (run once)"))
            return shared_groups[0]

        @task.branch(task_id="select_targets")
        def select_targets(requested: Any) -> list[str]:
            wanted = parse_targets(requested)
            missing = [t for t in wanted if t not in available_targets]
            if missing:
                raise ValueError(f"target(s) {missing} are not part of this pipeline ({', '.join(available_targets)})")
            return [f"{prefix}target_{t}" for t in wanted]

        def gate(target: str) -> Any:
            """The target's first task: refuses at once (no retry) what its builds would fail on later."""
            trt = [t for t in TARGET_CHAINS[target][0] if all_builds[t].operator in _GPU_OPERATORS]
            mode = extra.get(trt[0], {}).get("execution_mode", execution_mode) if trt else execution_mode

            @task(task_id=f"{prefix}target_{target}", task_display_name=f"check {target}", retries=0,
                  task_group=checks)
            def check(calibration: Any, evaluation: Any, train: Any, execution: Any) -> None:
                problems = target_problems(target, calibration_data_uri=calibration, eval_data_uri=evaluation,
                                           train_data_uri=train, execution_mode=execution)
                if problems:
                    raise AirflowFailException(f"target {target!r} cannot be built: " + "; ".join(problems))

            return check(calibration_data_uri, eval_data_uri, train_data_uri, mode)

        selector = select_targets(targets)
        # One gate per target right after the branch: a target's own tasks need its gate, shared
        # builds (the ONNX export) run when any gate of a target using them passed.
        gates = {t: gate(t) for t in available_targets}
        selector >> list(gates.values())
        users: dict[str, list[str]] = {}
        for t in available_targets:
            for task_id in TARGET_CHAINS[t][0]:
                users.setdefault(task_id, []).append(t)
        made: dict[str, Any] = {}

        def build(task_id: str) -> Any:
            if task_id in made:
                return made[task_id]
            spec = all_builds[task_id]
            kwargs = {k: fills.get(v, v) if isinstance(v, str) else v for k, v in spec.kwargs.items()}
            kwargs[spec.model_field] = model_uri if spec.source is None else artifact(prefix + spec.source,
                                                                                     spec.source_artifact)
            if len(users[task_id]) > 1:
                # A shared build runs when any selected target needs it: the branch skips the gates
                # of unselected targets, and a failed gate (inputs missing) must not stop the others.
                # Its only upstreams are gates, so one_success (all_done_min_one_success turns into
                # SKIPPED as soon as one upstream is skipped). A shared build with an upstream build
                # keeps none_failed_min_one_success: that build must have succeeded.
                kwargs["trigger_rule"] = "one_success" if spec.source is None else "none_failed_min_one_success"
                home = shared_group()
            else:
                home = target_groups[users[task_id][0]]
            kwargs = {"task_display_name": task_id, **kwargs, **extra.get(task_id, {})}
            op = getattr(ops, spec.operator)(task_id=prefix + task_id, task_group=home, **common, **kwargs)
            if spec.source is not None:
                build(spec.source) >> op
            [gates[t] for t in users[task_id]] >> op
            made[task_id] = op
            return op

        candidate_tasks: dict[str, dict[str, Any]] = {}
        branch_ends = []
        for target in available_targets:
            chain, art, fmt = TARGET_CHAINS[target]
            for task_id in chain:
                build(task_id)
            last = chain[-1]
            candidate = artifact(prefix + last, art)
            home = target_groups[target]
            validate = ops.ValidateEquivalenceOperator(
                task_id=f"{prefix}validate_{target}", task_group=home, task_display_name=f"validate {target}",
                reference_uri=model_uri, candidate_uri=candidate,
                data_uri=eval_data_uri, candidate_format=fmt, candidate_name=target,
                max_accuracy_drop=max_accuracy_drop, min_top1_agreement=min_top1_agreement,
                **common, **extra.get(f"validate_{target}", {}))
            bench = ops.BenchmarkOperator(
                task_id=f"{prefix}benchmark_{target}", task_group=home, task_display_name=f"benchmark {target}",
                model_uri=candidate, model_format=fmt, data_uri=eval_data_uri,
                timed_runs=benchmark_runs, candidate_name=target, **common, **extra.get(f"benchmark_{target}", {}))
            made[last] >> validate >> bench
            branch_ends.append(bench)
            candidate_tasks[target] = {"chain": [prefix + c for c in chain], "artifact": art,
                                       "validate": validate.task_id, "benchmark": bench.task_id}
        promote = ops.PromoteModelOperator(
            task_id="promote", registered_model_name=registered_model_name, objective=objective,
            candidate_tasks=candidate_tasks, selected_targets=targets, source_model_uri=model_uri,
            calibration_data_uri=calibration_data_uri,
            **common, **extra.get("promote", {}))
        branch_ends >> promote
    return group
