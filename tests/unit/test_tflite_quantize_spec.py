"""TFLiteQuantizeSpec and the operator: bad or irrelevant options are refused before anything
runs, naming the field; plus the pure helpers of the step (calibration checks, layout detection,
the converter's error message reduced to the op)."""

from __future__ import annotations

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
    assert TFLiteQuantizeSpec.input_fields == ("model_uri", "calibration_data_uri")
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
