"""DistillSpec: the student is a user architecture or the narrowed teacher, never both; bad student
references, loss weights and schedules are refused naming the field; the operator refuses literal bad
arguments at DAG parse time; the distilled_onnx_int8 target chains distill -> ONNX -> static int8."""

from __future__ import annotations

import pytest

from airflow_modelopt.exceptions import SpecError
from airflow_modelopt.specs import parse_spec
from airflow_modelopt.specs.distill import DistillSpec

PT2 = "runs:/abc/model/model.pt2"
TRAIN = "runs:/abc/data/train.npz"
EVAL = "runs:/abc/data/eval.npz"
STUDENT = "airflow_modelopt.container.examples.digits:DigitsCNN"


def parse(**fields):
    return parse_spec("distill", {"model_uri": PT2, "train_data_uri": TRAIN, **fields})


def test_defaults_distil_into_the_teacher_at_half_width_with_a_cosine_schedule():
    spec = parse()
    assert (spec.student, spec.effective_width, spec.lr_schedule) == (None, 0.5, "cosine")
    assert (spec.temperature, spec.alpha) == (4.0, 0.9)
    assert DistillSpec.image_family == "torch"
    assert DistillSpec.input_fields == ("model_uri", "train_data_uri", "eval_data_uri")


def test_training_data_is_required():
    with pytest.raises(SpecError, match=r"train_data_uri: Field required"):
        parse_spec("distill", {"model_uri": PT2})


@pytest.mark.parametrize("student", ["digits", "pkg.mod", "pkg.mod:", ":Net", "pkg..mod:Net", "pkg.mod:Net()",
                                     "os; rm:x"])
def test_student_must_be_module_colon_name(student):
    with pytest.raises(SpecError, match=r"student: expected 'package.module:Name'"):
        parse(student=student)


def test_student_and_width_factor_are_exclusive():
    with pytest.raises(SpecError, match=r"width_factor: applies to the narrowed-teacher student only"):
        parse(student=STUDENT, width_factor=0.5)
    with pytest.raises(SpecError, match=r"student_kwargs: only used with student="):
        parse(student_kwargs={"channels": 4})
    assert parse(student=STUDENT, student_kwargs={"channels": 4, "hidden": 16}).student_kwargs == {
        "channels": 4, "hidden": 16}


@pytest.mark.parametrize(("field", "value", "message"), [
    ("width_factor", 1.0, r"width_factor: Input should be less than 1"),
    ("width_factor", 0, r"width_factor: Input should be greater than 0"),
    ("alpha", 1.2, r"alpha: Input should be less than or equal to 1"),
    ("temperature", 0, r"temperature: Input should be greater than 0"),
    ("epochs", 0, r"epochs: Input should be greater than or equal to 1"),
    ("lr_schedule", "step", r"lr_schedule: Input should be 'cosine' or 'constant'"),
    ("feature_matching", True, r"feature_matching: unknown field"),
])
def test_bad_values_name_the_field(field, value, message):
    with pytest.raises(SpecError, match=message):
        parse(**{field: value})


def test_gate_and_torchscript_teacher_are_checked():
    with pytest.raises(SpecError, match=r"eval_data_uri: required when max_accuracy_drop is set"):
        parse(max_accuracy_drop=0.02)
    with pytest.raises(SpecError, match=r"model_uri: .* looks like TorchScript"):
        parse(model_uri="runs:/abc/model/model.pt")


def test_operator_refuses_literal_bad_arguments_at_parse_time():
    from airflow_modelopt.operators import DistillOperator

    with pytest.raises(ValueError, match=r"(?s)DistillOperator 'd': .*student: expected 'package.module:Name'"):
        DistillOperator(task_id="d", model_uri=PT2, train_data_uri=TRAIN, student="not a path")
    templated = DistillOperator(task_id="d", model_uri="{{ params.model }}", train_data_uri="{{ x }}")
    assert {"model_uri", "train_data_uri", "student", "width_factor"} <= set(templated.template_fields)


def test_distilled_onnx_int8_target_chains_distill_export_and_static_int8():
    from airflow_modelopt.targets import TARGET_CHAINS, TARGETS, builds

    assert "distilled_onnx_int8" in TARGETS
    chain, artifact, fmt = TARGET_CHAINS["distilled_onnx_int8"]
    assert chain == ("distill", "export_distilled_onnx", "distilled_onnx_int8") and (artifact, fmt) == ("onnx_model", "onnx")
    b = builds()
    assert (b["distill"].operator, b["distill"].source) == ("DistillOperator", None)
    assert (b["export_distilled_onnx"].operator, b["export_distilled_onnx"].source,
            b["export_distilled_onnx"].source_artifact) == ("TorchToOnnxOperator", "distill", "model_pt2")
    assert (b["distilled_onnx_int8"].operator, b["distilled_onnx_int8"].kwargs["mode"]) == ("OnnxQuantizeOperator", "static")


# -- the student reference, resolved in the container (torch, no MLflow) ------------------------


def test_student_module_class_is_built_with_its_kwargs():
    from airflow_modelopt.container.steps.distill import build_student

    student = build_student(parse(student=STUDENT, student_kwargs={"channels": 4, "hidden": 16}))
    assert sum(p.numel() for p in student.parameters()) == 2570


def test_a_student_factory_that_is_not_a_module_class_needs_the_model_code_opt_in():
    from airflow_modelopt.container import trust
    from airflow_modelopt.container.steps.distill import build_student
    from airflow_modelopt.exceptions import InputError

    spec = parse(student="json:loads", student_kwargs={"s": "[1]"})
    with pytest.raises(InputError, match=r"student: json:loads is not an nn.Module subclass; .*trust_model_code=True"):
        build_student(spec)
    with trust.policy(True), pytest.raises(InputError, match=r"student: json:loads returned a list, not a torch.nn.Module"):
        build_student(spec)


@pytest.mark.parametrize(("student", "kwargs", "message"), [
    ("no_such_package.nets:Small", None, r"student: cannot import 'no_such_package.nets' in this image"),
    ("airflow_modelopt.container.examples.digits:Missing", None, r"student: module .* has no attribute 'Missing'"),
    (STUDENT, {"width": 3}, r"student_kwargs: .*DigitsCNN\(\*\*\{'width': 3\}\) failed: .*unexpected keyword"),
])
def test_bad_student_references_name_the_field(student, kwargs, message):
    from airflow_modelopt.container.steps.distill import build_student
    from airflow_modelopt.exceptions import InputError

    with pytest.raises(InputError, match=message):
        build_student(parse(student=student, student_kwargs=kwargs))


def test_augmentation_and_batchnorm_updates_are_opt_in_and_checked():
    spec = parse()
    assert (spec.augment, spec.batchnorm) == (False, "frozen")  # distill keeps its plain transfer set by default
    assert (parse(augment=True, batchnorm="update").augment, parse(batchnorm="update").batchnorm) == (True, "update")
    with pytest.raises(SpecError, match=r"batchnorm"):
        parse(batchnorm="train")
