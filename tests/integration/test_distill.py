"""The distill step on the example digits CNN (local mode, real MLflow server): the teacher narrowed to
under a quarter of its parameters and distilled stays within two points of it; per-epoch metrics and the training curve are logged; the student's .pt2 goes
through torch_to_onnx; a user architecture is built from 'package.module:Name'; bad students are
refused with exit code 2."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import MlflowServer, run_step

EXPERIMENT = {"experiment_name": "tests-distill"}
DIGITS = "airflow_modelopt.container.examples.digits:DigitsCNN"


def distill(server: MlflowServer, **spec: Any):
    return run_step("distill", {**spec, "context": EXPERIMENT}, server.env())


def test_narrowed_student_under_a_quarter_of_the_parameters_stays_within_two_points(mlflow_server, example_model):
    # Distilled vs the same student on hard labels only (alpha 0) is measured by
    # scripts/bench_torch_quantize_distill.py: on this CNN the hard-label student was not worse (see the note).
    art = example_model["artifacts"]
    kd = distill(mlflow_server, model_uri=art["model_pt2"], train_data_uri=art["train_data"],
                 eval_data_uri=art["eval_data"], width_factor=0.45, epochs=6, early_stop_patience=None, alpha=0.9)
    assert kd.returncode == 0, kd.output[-3000:]
    m = kd.result["metrics"]
    assert m["student_params"] <= m["teacher_params"] / 4, m
    assert m["accuracy_drop"] <= 0.02, m
    assert m["epochs_run"] == 6 and kd.result["info"]["student_kind"] == "narrowed_teacher"

    client = mlflow_server.client()
    run_id = kd.result["mlflow_run_id"]
    curve = client.get_metric_history(run_id, "eval_accuracy")
    assert sorted(p.step for p in curve) == list(range(6))
    assert max(p.value for p in curve) == m["student_accuracy"]  # the best epoch's weights are kept
    lrs = sorted(client.get_metric_history(run_id, "learning_rate"), key=lambda p: p.step)
    assert lrs[0].value == 3e-3 and all(a.value > b.value for a, b in zip(lrs, lrs[1:]))  # cosine decay
    assert {f.path for f in client.list_artifacts(run_id, "distill")} >= {"distill/training_curve.png",
                                                                          "distill/history.json"}

    onnx = run_step("torch_to_onnx", {"model_uri": kd.result["artifacts"]["model_pt2"], "data_uri": art["eval_data"],
                                      "context": EXPERIMENT}, mlflow_server.env())
    assert onnx.returncode == 0, onnx.output[-3000:]
    # the ONNX graph holds the student's weights (plus a few shape constants)
    assert onnx.result["metrics"]["onnx_param_count"] == pytest.approx(m["student_params"], abs=4)


def test_user_architecture_student_and_bad_students(mlflow_server, example_model):
    art = example_model["artifacts"]
    base = {"model_uri": art["model_pt2"], "train_data_uri": art["train_data"], "eval_data_uri": art["eval_data"]}
    run = distill(mlflow_server, student=DIGITS, student_kwargs={"channels": 4, "hidden": 16}, epochs=2, **base)
    assert run.returncode == 0, run.output[-3000:]
    m = run.result["metrics"]
    assert run.result["info"]["student_kind"] == "user"
    assert m["student_params"] == 2570 and m["teacher_params"] == 38282

    refused = distill(mlflow_server, student="json:loads", epochs=1, **base)
    assert refused.returncode == 2, refused.output[-3000:]
    assert "student: json:loads is not an nn.Module subclass" in refused.output
    missing = distill(mlflow_server, student="no_such_package.nets:Small", epochs=1, **base)
    assert missing.returncode == 2 and "student: cannot import 'no_such_package.nets'" in missing.output
    wrong = distill(mlflow_server, student=DIGITS, student_kwargs={"classes": 3}, epochs=1, **base)
    assert wrong.returncode == 2 and "student: gives outputs [[2, 3]] but the teacher [[2, 10]]" in wrong.output


def test_feature_matching_records_its_layers_and_a_bad_layer_name_exits_2(mlflow_server, example_model, tmp_path):
    import torch

    from tests.integration._models import download

    art = example_model["artifacts"]
    base = {"model_uri": art["model_pt2"], "train_data_uri": art["train_data"], "eval_data_uri": art["eval_data"],
            "width_factor": 0.5, "epochs": 2, "early_stop_patience": None}
    run = distill(mlflow_server, feature_layers="auto", feature_weight=0.1, **base)
    assert run.returncode == 0, run.output[-3000:]
    # the digits CNN's top-level blocks: 'features' (its convolutions and pool) and 'classifier' (the logits)
    assert run.result["info"]["feature_matching"] is True
    assert run.result["info"]["feature_layers"] == [
        {"layer": "features", "teacher_shape": [32, 4, 4], "student_shape": [16, 4, 4], "projection": "1x1 16->32"}]
    client = mlflow_server.client()
    run_id = run.result["mlflow_run_id"]
    assert client.get_run(run_id).data.params["feature_layers_matched"] == "features"
    curve = client.get_metric_history(run_id, "feature_loss")
    assert sorted(p.step for p in curve) == [0, 1] and all(0 < p.value < 10 for p in curve)
    assert len(client.get_metric_history(run_id, "eval_accuracy")) == 2
    # the projection is a training aid: the logged student holds the narrowed teacher's parameters alone
    local = download(run.result["artifacts"]["model_pt2"], mlflow_server.uri, tmp_path)
    program = torch.export.load(str(local if local.is_file() else next(local.rglob("*.pt2"))))
    exported = sum(program.state_dict[n].numel() for n in program.graph_signature.parameters)
    assert exported == run.result["metrics"]["student_params"]

    bad = distill(mlflow_server, feature_layers=["features", "classifier.9"], feature_weight=0.1, **base)
    assert bad.returncode == 2, bad.output[-3000:]
    assert "feature_layers: ['classifier.9'] not found in the teacher; its blocks are ['features']" in bad.error
