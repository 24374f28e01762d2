"""PruneSpec: bad or mismatched options are refused naming the field; the Keras schedule is checked
against the fine-tune's length; the model's framework is told from its files; the operator refuses
literal bad arguments at DAG parse time and picks the tensorflow image for Keras models."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from airflow_modelopt.exceptions import InputError, SpecError
from airflow_modelopt.specs import parse_spec
from airflow_modelopt.specs.prune import PruneSpec

PT2 = "runs:/abc/model/model.pt2"
KERAS = "runs:/abc/model/model.keras"
MLFLOW_MODEL = "models:/m-123"  # the framework is only known once the model is fetched
TRAIN = "runs:/abc/data/train.npz"
EVAL = "runs:/abc/data/eval.npz"


def parse(**fields):
    return parse_spec("prune", {"model_uri": PT2, **fields})


def test_defaults_are_unstructured_half_sparsity_without_fine_tune():
    spec = parse()
    assert (spec.method, spec.sparsity, spec.framework) == ("unstructured", 0.5, "auto")
    assert spec.epochs_for("torch") == 0 and spec.epochs_for("keras") == 2
    assert PruneSpec.image_family == "torch"
    assert PruneSpec.input_fields == ("model_uri", "train_data_uri", "eval_data_uri")


@pytest.mark.parametrize("sparsity", [0, 1, 1.0, -0.2, 1.5])
def test_sparsity_outside_open_unit_interval_is_refused_naming_the_field(sparsity):
    with pytest.raises(SpecError, match=rf"sparsity: Input should be (greater|less) than [01] \(got {sparsity}\)"):
        parse(sparsity=sparsity)


@pytest.mark.parametrize("option", [{"begin_step": 0}, {"end_step": 100}, {"frequency": 10},
                                    {"initial_sparsity": 0.1}])
def test_keras_only_option_with_a_pt2_model_is_refused_naming_the_option(option):
    name = next(iter(option))
    with pytest.raises(SpecError, match=rf"{name}: a Keras-only option .* model_uri is a PyTorch model"):
        parse(**option)


def test_keras_only_option_with_an_mlflow_model_waits_for_the_model():
    spec = parse(model_uri=MLFLOW_MODEL, begin_step=5)
    assert spec.declared_framework() is None  # the step refuses it once it has seen the model


def test_explicit_framework_decides_before_the_model_is_fetched():
    with pytest.raises(SpecError, match=r"end_step: a Keras-only option"):
        parse(model_uri=MLFLOW_MODEL, framework="torch", end_step=10)
    spec = parse(model_uri=MLFLOW_MODEL, framework="keras", train_data_uri=TRAIN, end_step=10)
    assert spec.image_family_for_model() == "tensorflow"


@pytest.mark.parametrize(("fields", "message"), [
    ({"method": "structured"}, r"method: 'structured' .* is PyTorch-only but model_uri is a Keras model"),
    ({"method": "structured", "round_to": 8}, r"round_to: a PyTorch-only option but model_uri is a Keras model"),
    ({"fine_tune_epochs": 0}, r"fine_tune_epochs: Keras pruning .* prunes while it trains"),
])
def test_pytorch_only_options_with_a_keras_model_are_refused(fields, message):
    with pytest.raises(SpecError, match=message):
        parse(model_uri=KERAS, train_data_uri=TRAIN, **fields)


def test_keras_model_needs_training_data():
    with pytest.raises(SpecError, match=r"train_data_uri: required for a Keras model"):
        parse(model_uri=KERAS)
    assert parse(model_uri=KERAS, train_data_uri=TRAIN).image_family_for_model() == "tensorflow"
    assert parse().image_family_for_model() == "torch"


@pytest.mark.parametrize(("fields", "message"), [
    ({"fine_tune_epochs": 3}, r"train_data_uri: required when fine_tune_epochs is 3"),
    ({"max_accuracy_drop": 0.02}, r"eval_data_uri: required when max_accuracy_drop is set"),
    ({"round_to": 8}, r"round_to: only applies to method='structured'"),
    ({"model_uri": "runs:/abc/model/model.pt"}, r"model_uri: .* TorchScript or a torch.save checkpoint"),
    ({"model_uri": "/models/net.torchscript"}, r"model_uri: .* TorchScript"),
    ({"method": "magnitude"}, r"method: Input should be 'unstructured' or 'structured'"),
    ({"framework": "jax"}, r"framework: Input should be 'auto', 'torch' or 'keras'"),
    ({"fine_tune_epochs": -1}, r"fine_tune_epochs: Input should be greater than or equal to 0"),
    ({"ignored_layers": ["fc", " "]}, r"ignored_layers: layer names must be non-empty"),
    ({"pruning_ratio": 0.5}, r"pruning_ratio: unknown field"),
])
def test_bad_fields_are_named(fields, message):
    with pytest.raises(SpecError, match=message):
        parse(**fields)


def test_keras_schedule_fields_are_checked_against_each_other():
    with pytest.raises(SpecError, match=r"initial_sparsity: must be below sparsity"):
        parse(model_uri=KERAS, train_data_uri=TRAIN, sparsity=0.5, initial_sparsity=0.6)
    with pytest.raises(SpecError, match=r"end_step: must be after begin_step=20, got 20"):
        parse(model_uri=KERAS, train_data_uri=TRAIN, begin_step=20, end_step=20)


# -- the Keras schedule against the fine-tune's length -----------------------------------------


def schedule(**fields):
    from airflow_modelopt.container.steps.prune.keras_prune import schedule_for

    spec = parse(model_uri=KERAS, train_data_uri=TRAIN, **fields)
    return schedule_for(spec, epochs=spec.epochs_for("keras"), samples=1000)


def test_default_schedule_reaches_final_sparsity_before_training_ends():
    s = schedule(batch_size=50)  # 20 steps per epoch, 2 epochs
    assert s["total_steps"] == 40
    assert (s["end_step"] - s["begin_step"]) % s["frequency"] == 0  # the last update is at end_step
    assert s["last_update_step"] == s["end_step"] <= s["total_steps"] - 1
    assert s["end_step"] < s["total_steps"] - 5  # steps are left to recover at the final sparsity


def test_end_step_past_the_fine_tune_is_refused_with_the_step_count():
    with pytest.raises(InputError, match=r"end_step: 500 is never reached.*runs 40 steps \(fine_tune_epochs=2 x "
                                         r"ceil\(1000 samples / batch_size 50\)\)"):
        schedule(batch_size=50, end_step=500)
    with pytest.raises(InputError, match=r"begin_step: 39 leaves no training step"):
        schedule(batch_size=50, begin_step=39)


def test_user_schedule_is_kept_and_reports_its_last_update():
    s = schedule(batch_size=50, begin_step=2, end_step=30, frequency=5)
    assert (s["begin_step"], s["end_step"], s["frequency"], s["last_update_step"]) == (2, 30, 5, 27)


# -- telling the framework from the files ------------------------------------------------------


def _zip(path: Path, names: list[str]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name in names:
            zf.writestr(name, b"x")
    return path


def test_framework_is_told_from_file_contents(tmp_path):
    from airflow_modelopt.container.steps.prune import detect_framework

    pt2 = _zip(tmp_path / "model.bin", ["model/archive_format", "model/models/model.json"])
    keras = _zip(tmp_path / "weights", ["config.json", "metadata.json", "model.weights.h5"])
    h5 = tmp_path / "legacy"
    h5.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 32)
    assert detect_framework(pt2, "m") == "torch"
    assert detect_framework(keras, "m") == "keras"
    assert detect_framework(h5, "m") == "keras"
    mlflow_model = tmp_path / "mlflow_model"
    mlflow_model.mkdir()
    (mlflow_model / "MLmodel").write_text("flavors:\n  python_function: {}\n  pytorch: {}\n")
    assert detect_framework(mlflow_model, "models:/m") == "torch"


def test_torchscript_is_refused_naming_model_uri(tmp_path):
    from airflow_modelopt.container.steps.prune import detect_framework

    script = _zip(tmp_path / "model.zip", ["model/code/__torch__.py", "model/constants.pkl", "model/data.pkl"])
    with pytest.raises(InputError, match=r"model_uri: .* is TorchScript, which the prune step does not support"):
        detect_framework(script, "model.zip")
    onnx_like = tmp_path / "model.onnx"
    onnx_like.write_bytes(b"\x08\x07")
    with pytest.raises(InputError, match=r"model_uri: .* is not a model the prune step knows"):
        detect_framework(onnx_like, "model.onnx")


def test_a_keras_only_option_is_refused_once_the_model_is_seen(tmp_path):
    from airflow_modelopt.container.steps.prune import resolve_framework

    pt2 = _zip(tmp_path / "model", ["model/archive_format"])
    spec = parse(model_uri=MLFLOW_MODEL, frequency=4)
    with pytest.raises(InputError, match=r"frequency: a Keras-only option"):
        resolve_framework(spec, pt2)
    with pytest.raises(InputError, match=r"framework: 'keras' was given but model_uri is a torch model"):
        resolve_framework(parse(model_uri=MLFLOW_MODEL, framework="keras", train_data_uri=TRAIN), pt2)


# -- the operator ------------------------------------------------------------------------------


def test_operator_refuses_literal_bad_arguments_at_parse_time():
    from airflow_modelopt.operators.prune import PruneOperator

    with pytest.raises(ValueError, match=r"(?s)PruneOperator 'p': .*sparsity: Input should be less than 1"):
        PruneOperator(task_id="p", model_uri=PT2, sparsity=1.2)
    with pytest.raises(ValueError, match=r"begin_step: a Keras-only option"):
        PruneOperator(task_id="p", model_uri=PT2, begin_step=0)
    templated = PruneOperator(task_id="p", model_uri="{{ params.model }}", sparsity=0.3)
    assert "model_uri" in templated.template_fields and "sparsity" in templated.template_fields


def test_keras_models_run_in_the_tensorflow_image(monkeypatch):
    """Docker/Kubernetes modes pick the image from the spec's resolved family."""
    from airflow_modelopt import config

    for var in ("IMAGE_REGISTRY", "IMAGE_TAG", "IMAGE_OVERRIDES"):
        monkeypatch.delenv(f"AIRFLOW__MODELOPT__{var}", raising=False)
    monkeypatch.setenv("AIRFLOW__MODELOPT__IMAGE_REGISTRY", "registry.example.com/ml")
    monkeypatch.setenv("AIRFLOW__MODELOPT__IMAGE_TAG", "1.2")

    def image(**kw):
        return config.image_for("prune", kw.pop("image", None), parse(**kw).resolved_image_family())

    assert image(model_uri=KERAS, train_data_uri=TRAIN) == "registry.example.com/ml/airflow-modelopt-tensorflow:1.2"
    assert image(model_uri=MLFLOW_MODEL, framework="keras", train_data_uri=TRAIN).endswith("-tensorflow:1.2")
    assert image(model_uri=PT2) == "registry.example.com/ml/airflow-modelopt-torch:1.2"
    assert image(model_uri=KERAS, train_data_uri=TRAIN, image="my/tf:1") == "my/tf:1"  # explicit wins


def test_schedule_that_never_applies_the_final_sparsity_is_refused():
    with pytest.raises(InputError, match=r"frequency: 50 steps between pruning updates is longer than the schedule"):
        schedule(batch_size=50, begin_step=0, end_step=30, frequency=50)
    with pytest.raises(InputError, match=r"fine_tune_epochs: too short for a pruning schedule"):
        schedule(batch_size=1000, fine_tune_epochs=1)


def test_accuracy_gate_names_the_field_and_the_numbers():
    from airflow_modelopt.container.steps.prune import check_gate
    from airflow_modelopt.exceptions import GateFailed

    spec = parse(eval_data_uri=EVAL, max_accuracy_drop=0.02)
    check_gate(spec, {"accuracy_before": 0.97, "accuracy_after": 0.955, "accuracy_drop": 0.015})
    with pytest.raises(GateFailed, match=r"max_accuracy_drop: eval accuracy fell from 0.9700 to 0.9200 "
                                         r"\(drop 0.0500 > 0.02\)"):
        check_gate(spec, {"accuracy_before": 0.97, "accuracy_after": 0.92, "accuracy_drop": 0.05})
