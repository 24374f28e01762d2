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
    int8 = b["distilled_onnx_int8"]
    assert (int8.operator, int8.kwargs["mode"]) == ("OnnxQuantizeOperator", "search")
    assert all(c.startswith("q") for c in int8.kwargs["search_configs"])  # static configurations only


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


# -- intermediate-feature matching: spec ---------------------------------------------------------


def test_feature_matching_is_off_by_default_and_needs_both_layers_and_a_weight():
    spec = parse()
    assert (spec.feature_layers, spec.feature_weight) == (None, 0.0)
    assert parse(feature_layers="auto", feature_weight=0.5).feature_layers == "auto"
    with pytest.raises(SpecError, match=r"feature_weight: must be > 0 when feature_layers is set"):
        parse(feature_layers="auto")
    with pytest.raises(SpecError, match=r"feature_layers: required when feature_weight > 0"):
        parse(feature_weight=1.0)


@pytest.mark.parametrize(("layers", "message"), [
    ([], r"feature_layers: an empty list"),
    (["layers.0", "layers 1"], r"feature_layers: expected module paths like 'layers.0' .*\['layers 1'\]"),
    (["stem", "stem"], r"feature_layers: a layer is named twice"),
    ("layers.0,,layers.2", r"feature_layers: expected module paths .*\[''\]"),
    (3, r"feature_layers"),
])
def test_bad_feature_layers_name_the_field(layers, message):
    with pytest.raises(SpecError, match=message):
        parse(feature_layers=layers, feature_weight=1.0)
    with pytest.raises(SpecError, match=r"feature_weight: Input should be greater than or equal to 0"):
        parse(feature_layers="auto", feature_weight=-1)


def test_feature_layers_from_a_rendered_template_are_a_comma_separated_list():
    assert parse(feature_layers="layers.0, layers.2", feature_weight=1).feature_layers == ["layers.0", "layers.2"]
    assert parse(feature_layers=" auto ", feature_weight=1).feature_layers == "auto"


def test_operator_passes_the_feature_fields_and_refuses_them_at_parse_time():
    from airflow_modelopt.operators import DistillOperator

    op = DistillOperator(task_id="d", model_uri=PT2, train_data_uri=TRAIN, feature_layers=["layers.0"],
                         feature_weight=0.5)
    assert {"feature_layers", "feature_weight"} <= set(op.template_fields)
    with pytest.raises(ValueError, match=r"(?s)DistillOperator 'd': .*feature_weight: must be > 0"):
        DistillOperator(task_id="d", model_uri=PT2, train_data_uri=TRAIN, feature_layers="auto")


# -- intermediate-feature matching: resolving layers on real graphs (torch, no MLflow) -------------


@pytest.fixture(scope="module")
def residual_teacher():
    """A small residual CNN (scripts/_bench_common.residual_cnn, random weights) exported and lifted
    the way the distill step lifts its teacher."""
    import sys
    from pathlib import Path

    import numpy as np
    import torch

    from airflow_modelopt.container.steps.prune.fx_lifting import lift

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    from _bench_common import residual_cnn

    torch.manual_seed(0)
    model = residual_cnn(widths=(8, 16, 32)).eval()
    x = np.random.default_rng(0).normal(size=(24, 3, 32, 32)).astype(np.float32)
    program = torch.export.export(model, (torch.from_numpy(x[:2]),),
                                  dynamic_shapes=({0: torch.export.Dim.AUTO},))
    gm = program.module()
    ref = [gm(torch.from_numpy(x[:2])).detach().numpy()]
    return lift(gm, {"x": x[:2]}, ["x"], ref), {"x": x}


class _Log:
    def __init__(self):
        self.lines = []

    def info(self, msg, *args):
        self.lines.append(msg % args)


def test_auto_matches_the_outputs_of_top_level_blocks_not_the_logits(residual_teacher):
    from airflow_modelopt.container.steps.distill import auto_layers

    teacher, _ = residual_teacher
    # the stem (a Sequential of plain layers) is one block, the Sequential of BasicBlocks stands for its
    # blocks; the pool holds no parameters and fc gives the logits
    assert auto_layers(teacher) == ["stem", "layers.0", "layers.1", "layers.2"]


def test_narrowed_student_features_go_through_1x1_projections_that_train_the_student(residual_teacher):
    import torch

    from airflow_modelopt.container.steps.distill import feature_matching, narrowed_teacher

    teacher, x = residual_teacher
    spec = parse(feature_layers=["layers.0", "layers.2"], feature_weight=1.0, width_factor=0.5)
    log = _Log()
    student = narrowed_teacher(teacher, {"x": x["x"][:2]}, ["x"], spec, log)
    match = feature_matching(spec, teacher, student, "narrowed_teacher", x, ["x"], False, log)
    assert [(r["layer"], r["teacher_shape"], r["student_shape"], r["projection"]) for r in match.records] == [
        ("layers.0", [8, 16, 16], [4, 16, 16], "1x1 4->8"), ("layers.2", [32, 4, 4], [16, 4, 4], "1x1 16->32")]
    assert [len(c) for c in match.cache] == [24, 24]  # the teacher's features, computed once
    batch = torch.from_numpy(x["x"][:8])
    out, feats = match.student_tap(batch)
    assert torch.allclose(out[0], student(batch))  # the tapped graph computes the student's logits
    loss = match.loss(feats, match.teacher(torch.arange(8), [batch]))
    loss.backward()
    conv = student.get_submodule("layers.0.conv1")
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0  # the student's own weights learn
    assert any("learned 1x1 projection 4 -> 8 channels" in line for line in log.lines)
    match.close()


@pytest.mark.parametrize(("layers", "message"), [
    (["layers.7"], r"feature_layers: \['layers.7'\] not found in the teacher; its blocks are \['stem', 'layers.0'"),
    (["layers.0.relu"], r"feature_layers: \{'layers.0.relu': 2\} have several outputs"),
])
def test_bad_feature_layers_are_input_errors(residual_teacher, layers, message):
    from airflow_modelopt.container.steps.distill import feature_matching, narrowed_teacher
    from airflow_modelopt.exceptions import InputError

    teacher, x = residual_teacher
    spec = parse(feature_layers=layers, feature_weight=1.0)
    student = narrowed_teacher(teacher, {"x": x["x"][:2]}, ["x"], spec, _Log())
    with pytest.raises(InputError, match=message):
        feature_matching(spec, teacher, student, "narrowed_teacher", x, ["x"], False, _Log())


def test_a_shape_mismatch_beyond_channels_is_refused_when_named_and_skipped_by_auto(residual_teacher):
    """A user student with the teacher's module names but another resolution at 'layers.0' (stride 1)."""
    import sys
    from pathlib import Path

    from airflow_modelopt.container.steps.distill import feature_matching
    from airflow_modelopt.exceptions import InputError

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    from _bench_common import BasicBlock, residual_cnn

    teacher, x = residual_teacher
    student = residual_cnn(widths=(8, 8, 16))
    student.layers[0] = BasicBlock(8, 8, 1)  # 32x32 where the teacher's layers.0 gives 16x16
    named = parse(student=STUDENT, feature_layers=["layers.0"], feature_weight=1.0)
    with pytest.raises(InputError, match=r"feature_layers: 'layers.0' gives the teacher \[8, 16, 16\] but the student "
                                         r"\[8, 32, 32\] per sample"):
        feature_matching(named, teacher, student, "user", x, ["x"], False, _Log())
    log = _Log()
    auto = feature_matching(parse(student=STUDENT, feature_layers="auto", feature_weight=1.0), teacher, student,
                            "user", x, ["x"], False, log)
    assert auto.layers == ["stem"]  # the same shape: no projection; every later block has another resolution
    assert [r["projection"] for r in auto.records] == [None]
    assert sum("feature_layers=auto: skipped layers." in line for line in log.lines) == 3
    auto.close()
    assert not student.stem._forward_hooks  # the hooks are removed before the student is exported
