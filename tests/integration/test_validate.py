"""validate on the example digits CNN against a real MLflow server: every pair among torch, ORT
fp32, ORT int8, TFLite fp32 and TFLite int8 passes its gates; a candidate with perturbed weights
fails through the entry point (exit 3) with its report still logged; NaN outputs fail on their own;
bad evaluation data is one error naming the input; the max abs error equals Polygraphy's."""

from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pytest

from airflow_modelopt.exceptions import GateFailed, InputError
from tests.conftest import run_step

pytest_plugins = ("tests.integration._models",)  # fixtures: candidates, step_env (one build per session)

EXPERIMENT = "tests-validate"
MODELS = {"torch": "pt2", "ort_fp32": "onnx_fp32", "ort_int8": "onnx_int8", "tflite_fp32": "tflite_fp32",
          "tflite_int8": "tflite_int8"}
PAIRS = list(itertools.combinations(MODELS, 2))


def _spec(candidates, reference: str, candidate: str, **fields):
    return {"reference_uri": str(candidates.path(reference)), "candidate_uri": str(candidates.path(candidate)),
            "data_uri": str(candidates.eval_npz), "context": {"experiment_name": EXPERIMENT, "force": True}, **fields}


def _validate(spec):
    from airflow_modelopt.container.runner import run_step as run_in_process

    return run_in_process("validate", spec)


@pytest.mark.parametrize(("reference", "candidate"), PAIRS, ids=[f"{a}-vs-{b}" for a, b in PAIRS])
def test_every_pair_of_formats_passes_its_gates(candidates, step_env, mlflow_server, reference, candidate):
    fp32 = "int8" not in reference + candidate
    gates = {"atol": 1e-4, "rtol": 1e-3} if fp32 else {"min_top1_agreement": 0.95, "min_cosine": 0.99}
    result = _validate(_spec(candidates, MODELS[reference], MODELS[candidate], **gates))
    assert result.verdict is not None and result.verdict.passed, result.verdict
    m = result.metrics
    for key in ("max_abs_error", "mean_abs_error", "max_rel_error", "cosine_similarity", "top1_agreement",
                "reference_accuracy", "candidate_accuracy", "accuracy_drop"):
        assert key in m, key
    assert m["samples"] == 400 and m["passed"] == 1.0
    assert m["reference_accuracy"] >= 0.9 and abs(m["accuracy_drop"]) <= 0.02
    if fp32:
        assert m["max_abs_error"] < 1e-4 and m["top1_agreement"] == 1.0
    else:
        assert 1e-3 < m["max_abs_error"] < 3 and m["cosine_similarity"] > 0.99 and m["top1_agreement"] >= 0.95
    gates_run = {g["gate"]: g["passed"] for g in result.info["gates"]}
    assert gates_run["finite_outputs"] and gates_run["max_accuracy_drop"]
    assert all(gates_run[g] for g in gates if g != "rtol")
    run = mlflow_server.client().get_run(result.mlflow_run_id)
    assert run.data.tags["modelopt.verdict"] == "passed"
    assert run.data.metrics["top1_agreement"] == m["top1_agreement"]
    names = {a.path for a in mlflow_server.client().list_artifacts(result.mlflow_run_id, "validation")}
    assert names == {"validation/report.json", "validation/report.md", "validation/error_distribution.png"}


def test_perturbed_weights_fail_the_gate_through_the_entry_point_with_the_report_logged(candidates, mlflow_server):
    from tests.integration._models import artifact_json, read_artifact_text

    spec = _spec(candidates, "pt2", "onnx_broken", candidate_name="perturbed weights")
    run = run_step("validate", spec, mlflow_server.env())
    assert run.returncode == 3, run.output[-3000:]
    error = run.error
    assert re.search(r"gate max_accuracy_drop: accuracy dropped by 0\.\d{4} \(reference 0\.9\d+, candidate 0\.\d+\), "
                     r"above the threshold 0\.02", error), error
    run_id = re.search(r"\(report: runs:/(\w+)/validation/report\.md\)", error).group(1)
    client = mlflow_server.client()
    failed = client.get_run(run_id)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["modelopt.verdict"] == "failed" and failed.data.tags["modelopt.status"] == "failed"
    assert failed.data.metrics["accuracy_drop"] > 0.1 and failed.data.metrics["passed"] == 0.0
    report = artifact_json(mlflow_server.uri, run_id, "validation/report.json")
    assert report["evaluation"]["passed"] is False and report["candidate_name"] == "perturbed weights"
    assert report["candidate"]["format"] == "onnx" and report["reference"]["format"] == "pt2"
    markdown = read_artifact_text(mlflow_server.uri, run_id, "validation/report.md")
    assert "| max_accuracy_drop | 0.02 |" in markdown and "**FAIL**" in markdown and "**Verdict: FAILED**" in markdown
    names = {a.path for a in client.list_artifacts(run_id, "validation")}
    assert "validation/error_distribution.png" in names


def test_nan_in_candidate_outputs_is_a_failed_verdict_with_its_own_reason(candidates, step_env):
    with pytest.raises(GateFailed) as err:
        _validate(_spec(candidates, "onnx_fp32", "onnx_nan", max_accuracy_drop=None))
    assert "gate finite_outputs: candidate output 'output' has 400 NaN and 0 inf values (of 4000); threshold 0" in str(err.value)


def test_evaluation_data_with_a_wrong_shape_or_missing_input_is_one_error_naming_it(candidates, step_env, tmp_path):
    with np.load(candidates.eval_npz) as npz:
        x, y = npz["x"], npz["y"]
    flat = tmp_path / "flat.npz"
    np.savez(flat, x=x.reshape(len(x), 64), y=y)
    with pytest.raises(InputError) as err:
        _validate({**_spec(candidates, "onnx_fp32", "tflite_int8"), "data_uri": str(flat)})
    assert str(err.value).startswith("data_uri: input 'x' of the onnx model expects shape [?, 1, 8, 8] (rank 4) "
                                     "but the data has shape [400, 64]")
    nhwc = tmp_path / "nhwc.npz"
    np.savez(nhwc, x=x.transpose(0, 2, 3, 1), y=y)
    with pytest.raises(InputError, match=r"input 'x' of the onnx model expects shape \[\?, 1, 8, 8\] but the data "
                                         r"has shape \[400, 8, 8, 1\] \(dimension 1 is 8, expected 1\)"):
        _validate({**_spec(candidates, "onnx_fp32", "tflite_int8"), "data_uri": str(nhwc)})  # data: source layout
    two = tmp_path / "two.npz"
    np.savez(two, images=x, extra=x, y=y)
    with pytest.raises(InputError, match=r"data_uri: the model has input 'x' but the data artifact has arrays "
                                         r"\['extra', 'images', 'y'\]"):
        _validate({**_spec(candidates, "onnx_fp32", "tflite_fp32"), "data_uri": str(two)})


def test_max_abs_error_matches_polygraphy_on_the_same_onnx_pair(candidates, step_env):
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, CompareFunc

    with np.load(candidates.eval_npz) as npz:
        x = npz["x"]
    runners = [OnnxrtRunner(SessionFromOnnx(str(candidates.onnx_fp32 / "model.onnx")), name="fp32"),
               OnnxrtRunner(SessionFromOnnx(str(candidates.onnx_int8 / "model.onnx")), name="int8")]
    results = Comparator.run(runners, data_loader=[{"x": x}])
    accuracy = Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=100.0))
    theirs = accuracy[0][("fp32", "int8")][0]["output"]

    ours = _validate(_spec(candidates, "onnx_fp32", "onnx_int8"))
    assert ours.metrics["max_abs_error"] > 1e-3  # int8 differs visibly: the comparison means something
    assert ours.metrics["max_abs_error"] == pytest.approx(float(theirs.max_absdiff), rel=1e-6, abs=1e-7)
    assert ours.metrics["mean_abs_error"] == pytest.approx(float(theirs.mean_absdiff), rel=1e-5)
    assert json.dumps(ours.verdict.model_dump()) == json.dumps({"passed": True, "reasons": []})


# -- no silent passes (issue 10): what a hostile-but-fair user tried ---------------------------------------


def _without_labels(candidates, tmp_path):
    with np.load(candidates.eval_npz) as npz:
        x = npz["x"]
    path = tmp_path / "unlabelled.npz"
    np.savez(path, x=x)
    return path


def test_without_labels_a_different_model_fails_on_default_agreement(candidates, step_env, tmp_path):
    data = _without_labels(candidates, tmp_path)
    with pytest.raises(GateFailed, match=r"gate min_top1_agreement \(default without labels\): top-1 agreement "
                                         r"0\.\d{4} is below 0\.9"):
        _validate({**_spec(candidates, "pt2", "onnx_broken"), "data_uri": str(data)})
    good = _validate({**_spec(candidates, "pt2", "onnx_int8"), "data_uri": str(data)})
    gates = {g["gate"]: g for g in good.info["gates"]}
    assert good.verdict.passed and gates["min_top1_agreement"]["passed"] and gates["min_top1_agreement"]["threshold"] == 0.9
    assert gates["max_accuracy_drop"]["passed"] is None  # not checked without labels, and says so


def test_labels_outside_the_classes_are_bad_input_not_a_pass(candidates, step_env, tmp_path):
    with np.load(candidates.eval_npz) as npz:
        x, y = npz["x"], npz["y"]
    for bad in (y + 100, np.full_like(y, -1)):
        path = tmp_path / "labels.npz"
        np.savez(path, x=x, y=bad)
        with pytest.raises(InputError, match=r"data_uri: labels 'y' range from -?\d+ to -?\d+, but output 'output' scores "
                                             r"10 classes \(labels 0\.\.9\)"):
            _validate({**_spec(candidates, "pt2", "onnx_fp32"), "data_uri": str(path)})


def test_nan_data_npy_renamed_npz_and_a_broken_reference_are_bad_input(candidates, mlflow_server, tmp_path):
    with np.load(candidates.eval_npz) as npz:
        x, y = npz["x"].copy(), npz["y"]
    x[3, 0, 2, 2] = np.nan
    nan = tmp_path / "nan.npz"
    np.savez(nan, x=x, y=y)
    run = run_step("validate", {**_spec(candidates, "pt2", "onnx_fp32"), "data_uri": str(nan)}, mlflow_server.env())
    assert run.returncode == 2, run.output[-2000:]
    assert "data_uri: array 'x' of nan.npz holds 1 NaN and 0 inf values (first at index [3, 0, 2, 2])" in run.output

    renamed = tmp_path / "renamed.npz"
    with open(renamed, "wb") as fh:
        np.save(fh, x)
    run = run_step("validate", {**_spec(candidates, "pt2", "onnx_fp32"), "data_uri": str(renamed)}, mlflow_server.env())
    assert run.returncode == 2, run.output[-2000:]
    assert "data_uri: renamed.npz is a single .npy array, not an .npz archive" in run.output

    run = run_step("validate", _spec(candidates, "onnx_nan", "onnx_fp32"), mlflow_server.env())
    assert run.returncode == 2, run.output[-2000:]
    assert re.search(r"reference_uri: the reference model's output 'output' has \d+ NaN/inf values on finite "
                     r"evaluation data: the reference itself is broken", run.output), run.output[-2000:]


def test_a_cached_validation_carries_its_verdict_on_the_new_run(candidates, step_env, mlflow_server):
    """A DAG run whose validate task reuses another run's result gets its own small MLflow run; the
    verdict (what people and the load test's truthfulness check read per DAG run) is on it too."""
    spec = _spec(candidates, "pt2", "onnx_fp32")
    spec["context"] = {"experiment_name": EXPERIMENT}  # no force: the second call is a cache hit
    first = _validate(spec)
    second = _validate(spec)
    assert second.cache_hit and second.cached_from_run_id in (first.mlflow_run_id, first.cached_from_run_id)
    tags = mlflow_server.client().get_run(second.mlflow_run_id).data.tags
    assert tags["modelopt.cache_hit"] == "true" and tags["modelopt.verdict"] == "passed"
