"""The pipeline's up-front check: each selected target's gate refuses, before any build runs, a
target whose inputs are missing (calibration data, evaluation data, a GPU for TensorRT in local
mode), naming what is missing; a failed gate does not stop the other targets' shared export."""

from __future__ import annotations

from datetime import datetime

import pytest

from airflow_modelopt.pipelines import target_needs, target_problems

DATA = {"calibration_data_uri": "runs:/r/data/calibration.npz", "eval_data_uri": "runs:/r/data/eval.npz"}


def test_needs_are_read_from_the_targets_builds():
    assert target_needs("onnx_fp32") == {"eval_data"}
    assert target_needs("onnx_int8_static") == {"eval_data", "calibration_data"}
    assert target_needs("pruned_onnx_int8") == {"eval_data", "calibration_data", "training_data"}
    assert target_needs("tensorrt_fp16") == {"eval_data", "gpu"}


def test_complete_inputs_pass():
    assert target_problems("pruned_onnx_int8", **DATA) == []  # the calibration split stands in for training data
    assert target_problems("tensorrt_int8", **DATA, execution_mode="local", gpu=True) == []
    assert target_problems("tensorrt_int8", **DATA, execution_mode="kubernetes", gpu=False) == []


@pytest.mark.parametrize(("target", "inputs", "message"), [
    ("onnx_int8_static", {"calibration_data_uri": "", "eval_data_uri": "e.npz"},
     "calibration_data_uri: not given; onnx_int8_static is quantized with calibration data"),
    ("onnx_fp32", {"calibration_data_uri": "c.npz", "eval_data_uri": "None"},
     "eval_data_uri: not given; every target is validated and benchmarked on it"),
    ("pruned_onnx_int8", {"calibration_data_uri": None, "eval_data_uri": "e.npz", "train_data_uri": ""},
     "train_data_uri: not given, nor calibration_data_uri to stand in"),
])
def test_missing_data_is_named(target, inputs, message):
    problems = target_problems(target, **inputs)
    assert any(message in p for p in problems), problems


def test_tensorrt_in_local_mode_without_a_gpu_is_refused():
    problems = target_problems("tensorrt_fp16", **DATA, execution_mode="local", gpu=False)
    assert problems and "needs an NVIDIA GPU" in problems[0] and "local mode" in problems[0]


def dag_with_pipeline(**kwargs):
    from airflow.sdk import DAG

    from airflow_modelopt.pipelines import optimization_pipeline

    with DAG("pipeline_check_test", schedule=None, start_date=datetime(2026, 1, 1)) as dag:
        optimization_pipeline(model_uri="/m/model.pt2", registered_model_name="m",
                              targets=["onnx_fp32", "tensorrt_fp16"], **kwargs)
    return dag


def test_the_gate_task_fails_its_branch_without_retry_naming_the_reason(monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    import airflow_modelopt.pipelines as pipelines

    monkeypatch.setattr(pipelines, "gpu_visible", lambda: False)
    dag = dag_with_pipeline(calibration_data_uri="c.npz", eval_data_uri="e.npz", execution_mode="local")
    gate = dag.get_task("optimize.target_tensorrt_fp16")
    assert gate.retries == 0
    assert gate.downstream_task_ids == {"optimize.export_onnx", "optimize.tensorrt_fp16"}
    with pytest.raises(AirflowFailException, match=r"target 'tensorrt_fp16' cannot be built: .*needs an NVIDIA GPU"):
        gate.python_callable(*gate.op_args, **gate.op_kwargs)
    ok = dag.get_task("optimize.target_onnx_fp32")
    ok.python_callable(*ok.op_args, **ok.op_kwargs)  # nothing missing: passes
    # The shared export runs when any gate passed, even though another one failed.
    # (one_success: all_done_min_one_success would turn SKIPPED as soon as an unselected target's gate is skipped)
    assert dag.get_task("optimize.export_onnx").trigger_rule == "one_success"
    assert dag.get_task("optimize.tensorrt_fp16").trigger_rule == "all_success"


def test_each_target_reads_as_one_group_and_shared_builds_as_another():
    """The grid and graph show one group per target (its own builds, validate, benchmark), one
    "check inputs" group of the targets' gates and one "shared builds" group (the ONNX export
    several targets start from); the grouping changes only the display: task ids stay
    ``optimize.<task>``, and the groups have no cycle between them (the UI's graph needs that)."""
    dag = dag_with_pipeline(calibration_data_uri="c.npz", eval_data_uri="e.npz",
                            available_targets=("onnx_fp32", "onnx_int8_static", "pruned_onnx_int8"))
    optimize = dag.task_group_dict["optimize"]
    groups = {g.group_display_name or g.label: g for g in optimize.children.values() if hasattr(g, "children")}
    assert set(groups) == {"onnx_fp32", "onnx_int8_static", "pruned_onnx_int8", "shared builds", "check inputs"}

    def members(name):
        return {t.task_id: t.label for t in groups[name].children.values()}

    assert members("shared builds") == {"optimize.export_onnx": "export_onnx"}
    assert members("check inputs")["optimize.target_onnx_int8_static"] == "check onnx_int8_static"
    assert members("onnx_int8_static") == {"optimize.onnx_int8_static": "onnx_int8_static",
        "optimize.validate_onnx_int8_static": "validate onnx_int8_static",
        "optimize.benchmark_onnx_int8_static": "benchmark onnx_int8_static"}
    # The pruned target's whole chain is its own: prune -> export -> quantize sit in its group.
    assert {"optimize.prune", "optimize.export_pruned_onnx", "optimize.pruned_onnx_int8"} <= set(members("pruned_onnx_int8"))
    assert dag.get_task("optimize.select_targets").task_group is optimize
    assert dag.get_task("optimize.promote").task_group is optimize
    # Dependencies across the groups are unchanged: the export waits for the gates of the targets using it.
    assert dag.get_task("optimize.export_onnx").upstream_task_ids == {
        "optimize.target_onnx_fp32", "optimize.target_onnx_int8_static"}
    # What the UI does with the groups: serialize, then sort each group's children topologically.
    from airflow.api_fastapi.core_api.services.ui.task_group import task_group_to_dict
    from airflow.serialization.serialized_objects import DagSerialization

    shown = task_group_to_dict(DagSerialization.from_dict(DagSerialization.to_dict(dag)).task_group)
    optimize_node = next(c for c in shown["children"] if c["id"] == "optimize")
    order = [c["label"] for c in optimize_node["children"] if c.get("type") != "join"]
    assert order.index("check inputs") < order.index("shared builds") < order.index("onnx_int8_static") \
        < order.index("promote"), order


@pytest.mark.parametrize("dag_file", ["modelopt_optimize.py", "modelopt_retrain_and_optimize.py"])
def test_trigger_form_params_declare_draft_07_and_still_refuse_bad_values(dag_file):
    """Every form Param declares draft-07 (a third of Airflow's validation cost per serialization),
    and the form still refuses what it refused under jsonschema's default draft."""
    import runpy

    from airflow.sdk.definitions.param import ParamValidationError

    from airflow_modelopt.pipelines import FORM_PARAM_SCHEMA
    from tests.conftest import REPO

    dag = runpy.run_path(str(REPO / "dags" / dag_file))["dag"]
    params = dag.params
    assert {name: params.get_param(name).schema.get("$schema") for name in params} == \
        dict.fromkeys(params, FORM_PARAM_SCHEMA)
    params.validate()  # the defaults pass
    for name, bad in [("targets", ["onnx_fp32", "no_such_target"]), ("targets", []),
                      ("targets", ["onnx_fp32", "onnx_fp32"]), ("registered_model_name", ""),
                      ("max_accuracy_drop", 1.5), ("execution_mode", "ssh")]:
        with pytest.raises(ParamValidationError):
            params.get_param(name).resolve(bad)
