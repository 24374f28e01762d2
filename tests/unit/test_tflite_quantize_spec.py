"""TFLiteQuantizeSpec and the operator: bad or irrelevant options are refused before anything
runs, naming the field; plus the pure helpers of the step (calibration checks, layout detection,
the converter's error message reduced to the op)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from airflow_modelopt.exceptions import InputError, SpecError
from airflow_modelopt.specs import StepSpec, parse_spec
from airflow_modelopt.specs.tflite_quantize import TFLiteQuantizeSpec

BASE = {"model_uri": "runs:/abc/model/model.pt2"}
CALIBRATION = "runs:/abc/data/calibration.npz"


def parse(**fields):
    return parse_spec("tflite_quantize", {**BASE, **fields})


def test_registered_for_the_tensorflow_image_with_its_inputs():
    assert StepSpec.registry["tflite_quantize"] is TFLiteQuantizeSpec
    assert TFLiteQuantizeSpec.image_family == "tensorflow"
    assert TFLiteQuantizeSpec.input_fields == ("model_uri", "fallback_model_uri", "calibration_data_uri")
    spec = parse(mode="fp16")
    assert (spec.source_format, spec.io_type, spec.per_channel, spec.allow_select_tf_ops, spec.keep_nchw,
            spec.batch_size) == ("auto", None, True, False, False, None)
    assert spec.interface_type == "float32"
    assert parse(mode="int8", calibration_data_uri=CALIBRATION).interface_type == "int8"


@pytest.mark.parametrize("mode", ["fp32", "fp16", "dynamic_int8", "int8"])
def test_the_spec_an_operator_sends_is_accepted_by_the_container(mode):
    """Launchers send every field as JSON (defaults included); the container must parse it back."""
    spec = parse(mode=mode, calibration_data_uri=CALIBRATION)
    again = parse_spec("tflite_quantize", spec.model_dump_json())
    assert again == spec


def test_mode_is_required_and_named():
    with pytest.raises(SpecError, match=r"mode: Field required"):
        parse()
    with pytest.raises(SpecError, match=r"mode: Input should be 'fp32', 'fp16', 'dynamic_int8' or 'int8'.*'int4'"):
        parse(mode="int4")


def test_full_int8_without_calibration_data_is_refused():
    with pytest.raises(SpecError, match=r"calibration_data_uri is required for mode='int8'.*never random data"):
        parse(mode="int8")
    spec = parse(mode="int8", calibration_data_uri=CALIBRATION, io_type="uint8")
    assert spec.io_type == "uint8"


@pytest.mark.parametrize("mode", ["fp32", "fp16", "dynamic_int8"])
def test_other_modes_need_no_calibration_data(mode):
    assert parse(mode=mode).calibration_data_uri is None


@pytest.mark.parametrize(("fields", "message"), [
    ({"mode": "fp16", "io_type": "int8"}, r"io_type='int8' applies to mode='int8' only"),
    ({"mode": "fp32", "keep_nchw": True, "source_format": "pytorch"}, r"keep_nchw applies to ONNX sources only"),
    ({"mode": "fp32", "allow_select_tf_ops": True, "source_format": "pytorch"}, r"allow_select_tf_ops applies to"),
    ({"mode": "int8", "calibration_data_uri": CALIBRATION, "io_type": "int16"}, r"io_type: Input should be"),
    ({"mode": "fp32", "batch_size": 0}, r"batch_size: Input should be greater than or equal to 1"),
    ({"mode": "fp32", "calibration_samples": 0}, r"calibration_samples: Input should be greater than or equal to 1"),
    ({"mode": "fp32", "source_format": "caffe"}, r"source_format: Input should be 'auto', 'pytorch', 'onnx' or"),
    ({"mode": "fp32", "model_uri": "s3://bucket/model.onnx"}, r"model_uri: unknown URI scheme 's3'"),
    ({"mode": "fp32", "final_sparsity": 0.5}, r"final_sparsity: unknown field"),
])
def test_bad_or_irrelevant_options_name_the_field(fields, message):
    with pytest.raises(SpecError, match=message):
        parse(**fields)


def test_operator_refuses_literal_int8_without_calibration_at_parse_time():
    pytest.importorskip("airflow")
    from airflow_modelopt.operators.tflite_quantize import TFLiteQuantizeOperator

    with pytest.raises(ValueError, match=r"(?s)TFLiteQuantizeOperator 'q'.*calibration_data_uri is required"):
        TFLiteQuantizeOperator(task_id="q", model_uri="runs:/abc/model", mode="int8")
    templated = TFLiteQuantizeOperator(task_id="t", model_uri="runs:/abc/model", mode="int8",
                                       calibration_data_uri="{{ ti.xcom_pull('train')['artifacts']['calibration_data'] }}")
    assert "calibration_data_uri" in templated.template_fields and "mode" in templated.template_fields
    assert ":param io_type:" in (TFLiteQuantizeOperator.__doc__ or "")


# -- helpers of the step (numpy only) -------------------------------------------------------------


def test_calibration_check_names_the_input_and_the_expected_shape():
    from airflow_modelopt.container.steps.tflite_quantize.common import TensorIO, check_calibration

    inputs = [TensorIO(name="x", shape=[None, 1, 8, 8], layout="NCHW")]
    good = check_calibration({"x": np.zeros((3, 1, 8, 8)), "y": np.zeros(3)}, inputs, field="calibration_data_uri")
    assert good["x"].dtype == np.float32 and set(good) == {"x"}
    with pytest.raises(InputError, match=r"calibration_data_uri: array for model input 'x' has shape \[3, 1, 8, 9\] "
                                         r"but the input expects \(batch, 1, 8, 8\) \(NCHW\): dimension 3 is 9"):
        check_calibration({"x": np.zeros((3, 1, 8, 9))}, inputs, field="calibration_data_uri")
    with pytest.raises(InputError, match=r"rank 3\) but the input expects"):
        check_calibration({"x": np.zeros((3, 8, 8))}, inputs, field="calibration_data_uri")
    with pytest.raises(InputError, match=r"calibration_data_uri: the calibration set is empty"):
        check_calibration({"x": np.zeros((0, 1, 8, 8))}, inputs, field="calibration_data_uri")
    with pytest.raises(InputError, match=r"calibration_data_uri: the model has input 'x' but the data artifact has "
                                         r"arrays \['image'\]"):
        check_calibration({"image": np.zeros((3, 1, 8, 8))}, inputs, field="calibration_data_uri")
    with pytest.raises(InputError, match=r"NaN or infinite"):
        check_calibration({"x": np.full((3, 1, 8, 8), np.nan)}, inputs, field="calibration_data_uri")


def test_batches_pad_the_last_one_for_a_fixed_batch_model():
    from airflow_modelopt.container.steps.tflite_quantize.common import batches

    data = {"x": np.arange(5, dtype=np.float32)[:, None]}
    got = [b["x"][:, 0].tolist() for b in batches(data, 2, 100)]
    assert got == [[0, 1], [2, 3], [4, 4]]
    assert [b["x"].shape[0] for b in batches(data, 1, 3)] == [1, 1, 1]


def test_channel_last_is_decided_by_static_dimensions():
    from airflow_modelopt.container.steps.tflite_quantize.tf_paths import _is_channel_last

    assert _is_channel_last([None, 3, 32, 32], [None, 32, 32, 3], default=False) is True
    assert _is_channel_last([None, 3, 32, 32], [None, 3, 32, 32], default=True) is False
    assert _is_channel_last([None, 4, 4, 4], [None, 4, 4, 4], default=True) is True  # cannot tell: the rule
    assert _is_channel_last([None, 10], [None, 10], default=True) is False


def test_converter_error_is_reduced_to_the_op_and_the_flex_hint():
    from airflow_modelopt.container.steps.tflite_quantize.tf_paths import converter_error

    spec = parse(mode="fp32")
    text = ("<unknown>:0: error: loc(...): 'tf.MatrixDeterminant' op is neither a custom op nor a flex op\n"
            "Some ops are not supported by the native TFLite runtime, you can enable TF kernels fallback using TF "
            "Select.\nFlex ops: FlexMatrixDeterminant\nDetails:\n\ttf.MatrixDeterminant(tensor<?x3x3xf32>) -> "
            "(tensor<?xf32>) : {T = f32, device = \"\"}\n")
    message = converter_error(RuntimeError(text), spec, "saved_model")
    assert message.startswith("TFLiteConverter (saved_model, mode fp32) could not convert the model: op "
                              "tf.MatrixDeterminant has no TFLite builtin (it can run as a Flex op: "
                              "FlexMatrixDeterminant; set allow_select_tf_ops=true")


# -- what model_uri holds -------------------------------------------------------------------------


def _mlflow_folder(root, flavors_yaml: str, files: dict[str, bytes]):
    root.mkdir()
    (root / "MLmodel").write_text(f"flavors:\n{flavors_yaml}")
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    return root


def test_mlflow_model_folders_are_detected_from_their_flavors(tmp_path):
    from airflow_modelopt.container.steps.tflite_quantize.source import detect_source

    spec = parse(mode="fp32")
    pt = _mlflow_folder(tmp_path / "pt", "  pytorch: {model_data: data}\n  python_function: {}\n",
                        {"data/model.pth": b"w"})
    found = detect_source(pt, spec)
    assert (found.format, found.kind, found.path) == ("pytorch", "mlflow_pytorch", pt)

    onnx_dir = _mlflow_folder(tmp_path / "onnx", "  onnx: {data: graph.onnx}\n", {"graph.onnx": b"g", "w.data": b"d"})
    found = detect_source(onnx_dir, spec)
    assert (found.format, found.kind, found.path) == ("onnx", "mlflow_onnx", onnx_dir / "graph.onnx")

    sk = _mlflow_folder(tmp_path / "sk", "  sklearn: {pickled_model: model.pkl}\n  python_function: {}\n",
                        {"model.pkl": b"p"})
    with pytest.raises(InputError, match=r"model_uri: runs:/abc/model/model.pt2 is an MLflow model of flavor\(s\) \['sklearn'\]; "
                                         r"this step converts the pytorch, onnx and tensorflow flavors"):
        detect_source(sk, spec)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "MLmodel").write_text("flavors: [unclosed\n")
    with pytest.raises(InputError, match=r"model_uri: runs:/abc/model/model.pt2 has an unreadable MLmodel file"):
        detect_source(broken, spec)


def test_source_format_must_match_what_model_uri_holds(tmp_path):
    from airflow_modelopt.container.steps.tflite_quantize.source import detect_source

    (tmp_path / "m.onnx").write_bytes(b"g")
    with pytest.raises(InputError, match=r"source_format='tensorflow' but model_uri runs:/abc/model/model.pt2 holds a onnx model"):
        detect_source(tmp_path / "m.onnx", parse(mode="fp32", source_format="tensorflow"))
    (tmp_path / "m.tflite").write_bytes(b"TFL3")
    with pytest.raises(InputError, match=r"model_uri: runs:/abc/model/model.pt2 is already a TFLite model"):
        detect_source(tmp_path / "m.tflite", parse(mode="fp32"))


def test_source_bytes_leave_out_mlflow_metadata_and_count_onnx_external_data(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from airflow_modelopt.container.steps.tflite_quantize.source import detect_source, source_bytes

    pt = _mlflow_folder(tmp_path / "pt", "  pytorch: {model_data: data}\n",
                        {"data/model.pth": b"w" * 1000, "requirements.txt": b"torch\n" * 50, "conda.yaml": b"x" * 300})
    assert source_bytes(detect_source(pt, parse(mode="fp32"))) == 1000
    w = numpy_helper.from_array(np.ones((64, 10), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])], [w])
    folder = _mlflow_folder(tmp_path / "onnx", "  onnx: {data: model.onnx}\n", {"conda.yaml": b"x" * 300})
    onnx.save(helper.make_model(graph), folder / "model.onnx", save_as_external_data=True, location="weights.bin",
              size_threshold=0)
    (folder / "unrelated.bin").write_bytes(b"u" * 5000)
    expected = (folder / "model.onnx").stat().st_size + (folder / "weights.bin").stat().st_size
    assert (folder / "weights.bin").stat().st_size == 64 * 10 * 4
    assert source_bytes(detect_source(folder, parse(mode="fp32"))) == expected


def test_options_that_do_not_apply_to_the_detected_source_are_refused(tmp_path):
    from airflow_modelopt.container.steps.tflite_quantize.source import detect_source, make_path

    (tmp_path / "m.pt2").write_bytes(b"pt2")
    (tmp_path / "k.keras").write_bytes(b"keras")
    pt2 = detect_source(tmp_path / "m.pt2", parse(mode="fp32"))
    with pytest.raises(InputError, match=r"keep_nchw applies to ONNX sources only; litert-torch keeps"):
        make_path(pt2, parse(mode="fp32", keep_nchw=True), tmp_path)
    with pytest.raises(InputError, match=r"allow_select_tf_ops applies to the TensorFlow and ONNX paths only"):
        make_path(pt2, parse(mode="fp32", allow_select_tf_ops=True), tmp_path)
    keras = detect_source(tmp_path / "k.keras", parse(mode="fp32"))
    with pytest.raises(InputError, match=r"keep_nchw applies to ONNX sources only; model_uri holds a TensorFlow"):
        make_path(keras, parse(mode="fp32", keep_nchw=True), tmp_path)


# -- fallback_model_uri: the pipeline's PyTorch model first, its ONNX export when that fails ------------

ONNX = "runs:/def/onnx_model"


def test_fallback_model_uri_is_an_input_and_must_be_another_source():
    spec = parse(mode="fp16", fallback_model_uri=ONNX)
    assert spec.fallback_model_uri == ONNX and parse(mode="fp16").fallback_model_uri is None
    with pytest.raises(SpecError, match=r"fallback_model_uri is model_uri itself"):
        parse(mode="fp16", fallback_model_uri=BASE["model_uri"])
    # Options of the ONNX path are the fallback's when the first source is PyTorch; without one they are refused.
    assert parse(mode="fp32", source_format="pytorch", fallback_model_uri=ONNX, keep_nchw=True,
                 allow_select_tf_ops=True).allow_select_tf_ops
    with pytest.raises(SpecError, match=r"allow_select_tf_ops applies to the TensorFlow and ONNX paths only"):
        parse(mode="fp32", source_format="pytorch", allow_select_tf_ops=True)


def test_pipeline_tflite_builds_try_the_pytorch_model_then_the_onnx_export():
    from airflow_modelopt.targets import TARGET_CHAINS, builds

    for target, mode in (("tflite_fp16", "fp16"), ("tflite_int8", "int8")):
        build = builds()[target]
        assert TARGET_CHAINS[target][0] == ("export_onnx", target)  # the export still runs first
        assert (build.operator, build.source, build.source_artifact, build.model_field) == (
            "TFLiteQuantizeOperator", "export_onnx", "onnx_model", "fallback_model_uri")
        assert build.kwargs["model_uri"] == "{model}" and build.kwargs["mode"] == mode
        fields = {k: v.replace("{model}", "models:/m-1").replace("{calibration}", CALIBRATION)
                  for k, v in build.kwargs.items()}
        spec = parse(**fields, fallback_model_uri=ONNX)
        assert (spec.model_uri, spec.fallback_model_uri) == ("models:/m-1", ONNX)


def test_pipeline_passes_its_model_and_the_onnx_export_to_the_tflite_task():
    from airflow.sdk import DAG

    from airflow_modelopt.pipelines import optimization_pipeline

    with DAG("tflite_wiring", schedule=None) as dag:
        optimization_pipeline(model_uri="models:/digits/1", calibration_data_uri=CALIBRATION,
                                      eval_data_uri="runs:/abc/data/eval.npz", targets=["tflite_int8"],
                                      registered_model_name="digits", available_targets=("tflite_int8",))
    task = dag.get_task("optimize.tflite_int8")
    assert task.model_uri == "models:/digits/1"
    assert "optimize.export_onnx" in task.fallback_model_uri and "onnx_model" in task.fallback_model_uri
    assert "optimize.export_onnx" in task.upstream_task_ids


@pytest.mark.parametrize(("mode", "configured", "expected"), [
    ("local", "/opt/litert/bin/python", "/opt/litert/bin/python"),
    ("local", "", None),
    ("docker", "/opt/litert/bin/python", None),  # the tensorflow image has litert-torch itself
])
def test_local_mode_hands_the_configured_litert_python_to_the_step(monkeypatch, mode, configured, expected):
    from airflow_modelopt.hooks.mlflow import TrackingConfig
    from airflow_modelopt.operators import TFLiteQuantizeOperator
    from airflow_modelopt.specs.tflite_quantize import LITERT_PYTHON_ENV

    monkeypatch.setenv("AIRFLOW__MODELOPT__LITERT_PYTHON", configured)
    op = TFLiteQuantizeOperator(task_id="t", model_uri=BASE["model_uri"], mode="fp16", execution_mode=mode)
    request = op.launch_request(op.build_spec(None, mode=mode), TrackingConfig("http://mlflow:5000", {"A": "1"}))
    assert request.tracking.public_env.get(LITERT_PYTHON_ENV) == expected
    assert request.tracking.public_env["A"] == "1"
    given = TFLiteQuantizeOperator(task_id="u", model_uri=BASE["model_uri"], mode="fp16", execution_mode="local",
                                   litert_python="/venv/bin/python")
    request = given.launch_request(given.build_spec(None, mode="local"), TrackingConfig("http://m", {}))
    assert request.tracking.public_env[LITERT_PYTHON_ENV] == "/venv/bin/python"


def _fake_sources(tmp_path):
    (tmp_path / "model.pt2").write_bytes(b"pt2")
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    return {"model_uri": tmp_path / "model.pt2", "fallback_model_uri": tmp_path / "model.onnx",
            "calibration_data_uri": tmp_path / "cal.npz"}


def test_fallback_runs_when_the_first_converter_fails_and_says_why(tmp_path, monkeypatch):
    import logging

    from airflow_modelopt.container.steps.tflite_quantize import attempts
    from airflow_modelopt.exceptions import ConversionFailed

    tried = []

    def convert_source(spec, model_path, calibration_path, workdir, log):
        tried.append((model_path.suffix, spec.model_uri, spec.allow_select_tf_ops))
        if model_path.suffix == ".pt2":
            raise attempts.ConverterUnavailable("litert-torch is not installed in this Python")
        return attempts.Built(workdir, {}, {"conversion_path": "onnx2tf"})

    monkeypatch.setattr(attempts, "convert_source", convert_source)
    failures = []
    spec = parse(mode="fp16", fallback_model_uri=ONNX, allow_select_tf_ops=True)
    built = attempts.convert_with_fallback(spec, _fake_sources(tmp_path), tmp_path, logging.getLogger("t"),
                                           on_failure=lambda path, why: failures.append((path, why)))
    # the PyTorch source without the ONNX-path option, then the ONNX export with it
    assert tried == [(".pt2", BASE["model_uri"], False), (".onnx", ONNX, True)]
    assert built.info["converted_from"] == "fallback_model_uri"
    assert built.info["fallback_reason"] == "litert_torch: litert-torch is not installed in this Python"
    assert failures == [("litert_torch", "litert-torch is not installed in this Python")]

    def both_fail(spec, model_path, calibration_path, workdir, log):
        raise ConversionFailed(f"cannot convert {model_path.suffix}")

    monkeypatch.setattr(attempts, "convert_source", both_fail)
    with pytest.raises(ConversionFailed, match=r"fallback_model_uri: cannot convert .onnx \(after litert_torch failed "
                                                r"on model_uri: cannot convert .pt2\)"):
        attempts.convert_with_fallback(spec, _fake_sources(tmp_path), tmp_path, logging.getLogger("t"))


def test_bad_calibration_data_fails_at_once_without_the_fallback(tmp_path, monkeypatch):
    import logging

    from airflow_modelopt.container.steps.tflite_quantize import attempts

    tried = []

    def convert_source(spec, model_path, calibration_path, workdir, log):
        tried.append(model_path.suffix)
        raise InputError("calibration_data_uri: array for model input 'x' has shape [3, 4]")

    monkeypatch.setattr(attempts, "convert_source", convert_source)
    with pytest.raises(InputError, match=r"^calibration_data_uri: array for model input 'x'"):
        attempts.convert_with_fallback(parse(mode="fp16", fallback_model_uri=ONNX), _fake_sources(tmp_path), tmp_path,
                                       logging.getLogger("t"))
    assert tried == [".pt2"]


def test_pytorch_source_without_litert_torch_or_a_litert_python_is_unavailable(tmp_path, monkeypatch):
    import importlib.util
    import logging

    from airflow_modelopt.container.steps.tflite_quantize import attempts
    from airflow_modelopt.specs.tflite_quantize import LITERT_PYTHON_ENV

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "litert_torch" else real(name, *a))
    paths = _fake_sources(tmp_path)
    monkeypatch.delenv(LITERT_PYTHON_ENV, raising=False)
    with pytest.raises(attempts.ConverterUnavailable, match=r"litert-torch is not installed in this Python .* "
                                                            r"\[modelopt\] litert_python"):
        attempts.convert_source(parse(mode="fp16"), paths["model_uri"], None, tmp_path / "w", logging.getLogger("t"))
    monkeypatch.setenv(LITERT_PYTHON_ENV, str(tmp_path / "no" / "python"))
    with pytest.raises(attempts.ConverterUnavailable, match=r"MODELOPT_LITERT_PYTHON=.*/no/python does not exist"):
        attempts.convert_source(parse(mode="fp16"), paths["model_uri"], None, tmp_path / "w", logging.getLogger("t"))


# -- GELU/Erf lowered before onnx2tf (onnx_rewrite.py) --------------------------------------------


def _gelu_graph(order: str, erf_add: float = 1.0) -> Any:
    """x -> Linear-free exact GELU in one of PyTorch's orders -> y (opset 18), as torch.onnx writes it."""
    from onnx import TensorProto, helper

    def const(name: str, value: float) -> Any:
        return helper.make_tensor(name, TensorProto.FLOAT, [], [value])

    nodes = []
    if order == "mul_inv_sqrt2":
        nodes.append(helper.make_node("Mul", ["x", "inv_sqrt2"], ["s"]))
    else:
        nodes.append(helper.make_node("Div", ["x", "sqrt2"], ["s"]))
    nodes += [helper.make_node("Erf", ["s"], ["e"]), helper.make_node("Add", ["e", "one"], ["a"])]
    if order in ("half_then_x", "mul_inv_sqrt2"):  # torch.onnx (opset 18): (1 + erf) * 0.5, then * x
        nodes += [helper.make_node("Mul", ["half", "a"], ["m"]), helper.make_node("Mul", ["x", "m"], ["y"])]
    elif order == "x_then_half":  # the order onnx2tf recognises itself
        nodes += [helper.make_node("Mul", ["x", "a"], ["m"]), helper.make_node("Mul", ["m", "half"], ["y"])]
    else:  # half_x: (0.5 * x) * (1 + erf)
        nodes += [helper.make_node("Mul", ["x", "half"], ["hx"]), helper.make_node("Mul", ["hx", "a"], ["y"])]
    graph = helper.make_graph(
        nodes, "gelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])],
        initializer=[const("sqrt2", 1.4142135), const("inv_sqrt2", 0.70710677), const("one", erf_add),
                     const("half", 0.5)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def _run_onnx(model: Any, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("order", ["half_then_x", "x_then_half", "half_x", "mul_inv_sqrt2"])
def test_exact_gelu_subgraphs_become_one_gelu_node_computing_the_same(order):
    from airflow_modelopt.container.steps.tflite_quantize.onnx_rewrite import fuse_gelu, remaining_erf

    model = _gelu_graph(order)
    x = np.linspace(-4, 4, 10, dtype=np.float32).reshape(2, 5)
    before = _run_onnx(model, x)
    assert fuse_gelu(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Gelu"] and remaining_erf(model) == 0
    assert model.graph.node[0].input[0] == "x" and model.graph.node[0].output[0] == "y"
    assert model.opset_import[0].version == 20  # Gelu is an opset-20 op
    np.testing.assert_allclose(_run_onnx(model, x), before, atol=1e-6)


def test_an_erf_that_is_no_gelu_is_left_for_onnx2tf():
    from airflow_modelopt.container.steps.tflite_quantize.onnx_rewrite import fuse_gelu, remaining_erf

    model = _gelu_graph("half_then_x", erf_add=2.0)  # (2 + erf(x/sqrt2)) * 0.5 * x: not GELU
    assert fuse_gelu(model) == 0
    assert remaining_erf(model) == 1 and model.opset_import[0].version == 18


@pytest.mark.parametrize(("allow_flex", "pseudo", "notes"), [
    (False, ["erf"], {"pseudo_ops": ["Erf"]}),
    (True, [], {"erf_kept": 1}),
])
def test_onnx_path_builds_other_erf_from_builtins_unless_flex_is_allowed(allow_flex, pseudo, notes, tmp_path):
    from airflow_modelopt.container.steps.tflite_quantize.common import SourceModel
    from airflow_modelopt.container.steps.tflite_quantize.tf_paths import OnnxPath

    spec = TFLiteQuantizeSpec(model_uri="models:/m/1", mode="fp32", allow_select_tf_ops=allow_flex)
    path = OnnxPath(SourceModel("onnx", "onnx", tmp_path / "m.onnx", tmp_path), spec, tmp_path)
    assert path._lower_ops(_gelu_graph("half_then_x", erf_add=2.0)) == pseudo
    assert path._notes == notes
    gelu = OnnxPath(SourceModel("onnx", "onnx", tmp_path / "m.onnx", tmp_path), spec, tmp_path)
    assert gelu._lower_ops(_gelu_graph("half_then_x")) == [] and gelu._notes == {"gelu_fused": 1}


# -- the integer-only check and input-side lookups (flatbuffer.py, check.py) ------------------------


def _lookup_model(*, ids_from_input: bool = True, table_constant: bool = True, reader: str = "QUANTIZE",
                  op: str = "EMBEDDING_LOOKUP", reshape_ids: bool = True) -> bytes:
    """A hand-made flatbuffer: int32 ids [1, 4] -> (RESHAPE) -> lookup in a float table [10, 3] -> ``reader``
    -> int8. Never run, only read."""
    from ai_edge_litert import schema_py_generated as s
    from ai_edge_litert.tools import flatbuffer_utils

    model = s.ModelT()
    model.version = 3
    ops = ["RESHAPE", op, reader, "ADD"]
    model.operatorCodes = []
    for name in ops:
        code = s.OperatorCodeT()
        code.builtinCode = code.deprecatedBuiltinCode = getattr(s.BuiltinOperator, name)
        code.deprecatedBuiltinCode = min(code.builtinCode, 127)
        model.operatorCodes.append(code)
    buffers = [s.BufferT()]

    def tensor(name: str, dtype: str, shape: list[int], data: bytes | None = None) -> Any:
        t = s.TensorT()
        t.name, t.type, t.shape = name.encode(), getattr(s.TensorType, dtype), shape
        t.buffer = 0
        if data is not None:
            b = s.BufferT()
            b.data = list(data)
            buffers.append(b)
            t.buffer = len(buffers) - 1
        return t

    graph = s.SubGraphT()
    graph.tensors = [
        tensor("ids", "INT32" if ids_from_input else "FLOAT32", [1, 4]),  # 0
        tensor("shape", "INT32", [1], np.array([4], np.int32).tobytes()),  # 1
        tensor("flat_ids", "INT32", [4]),  # 2
        tensor("table", "FLOAT32", [10, 3], np.ones((10, 3), np.float32).tobytes() if table_constant else None),  # 3
        tensor("emb", "FLOAT32", [4, 3]),  # 4
        tensor("q", "INT8" if reader == "QUANTIZE" else "FLOAT32", [4, 3]),  # 5
    ]

    def operator(name: str, ins: list[int], outs: list[int]) -> Any:
        o = s.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = ops.index(name), ins, outs
        return o

    ids = 2 if reshape_ids else 0
    graph.operators = ([operator("RESHAPE", [0, 1], [2])] if reshape_ids else []) + [
        operator(op, [ids, 3] if op == "EMBEDDING_LOOKUP" else [3, ids], [4]),
        operator(reader, [4], [5]),
    ]
    graph.inputs = [0] + ([] if table_constant else [3])
    graph.outputs = [5]
    model.subgraphs = [graph]
    model.buffers = buffers
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _int8_spec() -> TFLiteQuantizeSpec:
    return TFLiteQuantizeSpec(model_uri="models:/m/1", mode="int8", calibration_data_uri="file:///c.npz")


@pytest.mark.parametrize("op", ["EMBEDDING_LOOKUP", "GATHER"])
@pytest.mark.parametrize("reshape_ids", [True, False])
def test_an_input_side_lookup_feeding_quantize_passes_the_integer_only_check_and_is_reported(op, reshape_ids):
    from airflow_modelopt.container.steps.tflite_quantize.check import check_integer_only
    from airflow_modelopt.container.steps.tflite_quantize.flatbuffer import analyze

    report = analyze(_lookup_model(op=op, reshape_ids=reshape_ids))
    assert report.float_ops == {op: 1}  # still counted as float
    assert report.input_lookups == {op: 1} and report.as_info()["float_input_lookups"] == {op: 1}
    check_integer_only(report, _int8_spec())


@pytest.mark.parametrize("variant", [
    {"reader": "ADD"},  # the lookup's float output is computed on, not quantized at once
    {"table_constant": False},  # the table is an input, not a constant
    {"ids_from_input": False},  # the ids are no integer graph input
])
def test_a_lookup_anywhere_else_stays_refused_by_the_integer_only_check(variant):
    from airflow_modelopt.container.steps.tflite_quantize.check import check_integer_only
    from airflow_modelopt.container.steps.tflite_quantize.flatbuffer import analyze
    from airflow_modelopt.exceptions import ConversionFailed

    report = analyze(_lookup_model(**variant))
    assert report.input_lookups == {}
    with pytest.raises(ConversionFailed, match="EMBEDDING_LOOKUP"):
        check_integer_only(report, _int8_spec())
