"""OnnxQuantizeSpec: bad or irrelevant options are refused on both sides, naming the field; the
operator refuses literal ones at DAG parse time and imports no ML framework."""

from __future__ import annotations

import subprocess
import sys

import pytest

from airflow_modelopt.exceptions import SpecError
from airflow_modelopt.specs import parse_spec
from airflow_modelopt.specs.onnx_quantize import DEFAULT_SEARCH_CONFIGS, SEARCH_CONFIGS, OnnxQuantizeSpec
from tests.conftest import REPO

BASE = {"model_uri": "runs:/abc/onnx_model", "calibration_data_uri": "runs:/abc/data/calibration.npz"}


def parse(**fields):
    return parse_spec("onnx_quantize", {**BASE, **fields})


def test_defaults_are_static_qdq_u8s8_per_channel_minmax():
    spec = parse()
    assert (spec.mode, spec.quant_format, spec.activation_type, spec.weight_type, spec.per_channel,
            spec.calibration_method) == ("static", "QDQ", "uint8", "int8", True, "MinMax")
    assert OnnxQuantizeSpec.image_family == "base"
    assert OnnxQuantizeSpec.input_fields == ("model_uri", "calibration_data_uri", "eval_data_uri")


def test_unknown_calibration_method_is_named_with_the_allowed_ones():
    with pytest.raises(SpecError, match=r"calibration_method: Input should be 'MinMax', 'Entropy' or 'Percentile'.*'KL'"):
        parse(calibration_method="KL")


@pytest.mark.parametrize(("fields", "message"), [
    ({"per_channel": "sometimes"}, r"per_channel: Input should be a valid boolean"),
    ({"intra_op_threads": 0}, r"intra_op_threads: Input should be greater than or equal to 1"),
    ({"timed_runs": "many"}, r"timed_runs: Input should be a valid integer"),
    ({"weight_type": "int4"}, r"weight_type: Input should be 'uint8' or 'int8'"),
    ({"quant_format": "QLinear"}, r"quant_format: Input should be 'QDQ' or 'QOperator'"),
    ({"nodes_to_exclude": "node_conv2d"}, r"nodes_to_exclude: Input should be a valid list"),
    ({"min_top1_agreement": 1.5}, r"min_top1_agreement: Input should be less than or equal to 1"),
    ({"calibration_percentile": 50}, r"calibration_percentile: Input should be greater than 90"),
    ({"model_uri": "s3://bucket/model.onnx"}, r"model_uri: unknown URI scheme 's3'"),
    ({"latency_statistic": "p99"}, r"latency_statistic: Input should be 'median' or 'min'"),
])
def test_bad_types_and_ranges_name_the_field(fields, message):
    with pytest.raises(SpecError, match=message):
        parse(**fields)


@pytest.mark.parametrize("option", [
    {"representative_dataset_size": 100},      # TFLite converter
    {"inference_input_type": "int8"},          # TFLite converter
    {"final_sparsity": 0.5},                   # Keras / TFMOT pruning
    {"supported_ops": ["TFLITE_BUILTINS_INT8"]},
])
def test_keras_and_tflite_options_are_refused_as_unknown_fields(option):
    name = next(iter(option))
    with pytest.raises(SpecError, match=rf"{name}: unknown field \(not part of this step's spec\)"):
        parse(**option)


@pytest.mark.parametrize("mode", ["static", "search"])
def test_calibrated_modes_need_calibration_data(mode):
    with pytest.raises(SpecError, match=rf"calibration_data_uri is required for mode '{mode}'.*never on random data"):
        parse_spec("onnx_quantize", {"model_uri": "/m.onnx", "mode": mode})


@pytest.mark.parametrize("option", [
    {"calibration_method": "Entropy"}, {"quant_format": "QOperator"}, {"activation_type": "int8"},
    {"activation_symmetric": True}, {"calibration_samples": 10},
])
def test_static_only_options_are_refused_in_dynamic_mode(option):
    with pytest.raises(SpecError, match=rf"{next(iter(option))}: only used by static quantization"):
        parse(mode="dynamic", **option)


def test_dynamic_mode_needs_no_data_but_gates_do():
    spec = parse_spec("onnx_quantize", {"model_uri": "/m.onnx", "mode": "dynamic", "weight_type": "uint8"})
    assert spec.calibration_data_uri is None
    with pytest.raises(SpecError, match="min_top1_agreement: a gate needs data to measure on"):
        parse_spec("onnx_quantize", {"model_uri": "/m.onnx", "mode": "dynamic", "min_top1_agreement": 0.9})
    with pytest.raises(SpecError, match="require_speedup: a gate needs data"):
        parse_spec("onnx_quantize", {"model_uri": "/m.onnx", "mode": "dynamic", "require_speedup": True})


@pytest.mark.parametrize("option", [{"quant_format": "QOperator"}, {"per_channel": False}, {"weight_type": "uint8"},
                                    {"weight_symmetric": False}])
def test_search_refuses_the_settings_its_configurations_decide(option):
    with pytest.raises(SpecError, match=rf"{next(iter(option))}: decided by each search configuration.*search_configs"):
        parse(mode="search", **option)


def test_search_configs_are_checked():
    from typing import get_args

    from airflow_modelopt.specs.onnx_quantize import SearchConfigName

    assert parse(mode="search").configs_to_search() == list(DEFAULT_SEARCH_CONFIGS)
    assert set(DEFAULT_SEARCH_CONFIGS) <= set(SEARCH_CONFIGS) == set(get_args(SearchConfigName))
    with pytest.raises(SpecError, match=r"search_configs\.0: Input should be 'qdq_u8s8_per_channel'"):
        parse(mode="search", search_configs=["fastest"])
    with pytest.raises(SpecError, match=r"search_configs: \['dynamic_u8_per_tensor'\] listed more than once"):
        parse(mode="search", search_configs=["dynamic_u8_per_tensor", "dynamic_u8_per_tensor"])
    with pytest.raises(SpecError, match="search_configs: give at least one"):
        parse(mode="search", search_configs=[])
    with pytest.raises(SpecError, match="search_configs: only used in mode 'search' \\(mode is 'static'\\)"):
        parse(search_configs=["qdq_u8u8_per_tensor"])


def test_percentile_belongs_to_the_percentile_method():
    assert parse(calibration_method="Percentile", calibration_percentile=99.99).calibration_percentile == 99.99
    with pytest.raises(SpecError, match="calibration_percentile: only used with calibration_method 'Percentile'"):
        parse(calibration_method="Entropy", calibration_percentile=99.9)


def test_int8_activations_with_uint8_weights_is_refused():
    with pytest.raises(SpecError, match="activation_type 'int8' with weight_type 'uint8' is not supported"):
        parse(activation_type="int8", weight_type="uint8")


def test_exclusion_lists_are_checked():
    with pytest.raises(SpecError, match=r"nodes_to_exclude: \['conv'\] listed more than once"):
        parse(nodes_to_exclude=["conv", "conv"])
    with pytest.raises(SpecError, match=r"op_types_to_exclude: \['Conv 2D'\] are not ONNX op type names"):
        parse(op_types_to_exclude=["Conv 2D"])


@pytest.mark.parametrize("fields", [
    {"mode": "dynamic", "weight_type": "uint8", "per_channel": False},
    {"mode": "search", "search_configs": ["qoperator_u8s8_per_channel", "dynamic_s8_per_channel"]},
    {"calibration_method": "Percentile", "calibration_percentile": 99.9, "nodes_to_exclude": ["a"]},
])
def test_the_full_spec_the_operator_sends_validates_again_in_the_container(fields):
    """The launcher sends every field, defaults included; the container must accept it as given."""
    spec = parse(**fields)
    assert parse_spec("onnx_quantize", spec.model_dump_json()) == spec


def test_operator_refuses_literal_arguments_at_construction_and_waits_for_templates():
    from airflow_modelopt.operators.onnx_quantize import OnnxQuantizeOperator

    with pytest.raises(ValueError, match=r"(?s)OnnxQuantizeOperator 'quantize'.*calibration_method: only used by static"):
        OnnxQuantizeOperator(task_id="quantize", model_uri="/m.onnx", mode="dynamic", calibration_method="Entropy")
    with pytest.raises(ValueError, match="calibration_method: Input should be 'MinMax', 'Entropy' or 'Percentile'"):
        OnnxQuantizeOperator(task_id="quantize", model_uri="{{ ti.xcom_pull('export') }}", calibration_method="KL",
                             calibration_data_uri="/c.npz")
    op = OnnxQuantizeOperator(task_id="q", model_uri="{{ x }}", calibration_data_uri="/c.npz", mode="search")
    assert {"model_uri", "search_configs", "intra_op_threads"} <= set(op.template_fields)
    assert "Quantize an ONNX model to int8" in (OnnxQuantizeOperator.__doc__ or "")
    assert ":param calibration_method:" in (OnnxQuantizeOperator.__doc__ or "")


def test_operator_module_imports_no_ml_framework():
    heavy = ("torch", "tensorflow", "onnxruntime", "onnx", "mlflow")
    code = ("import sys; import airflow_modelopt.operators.onnx_quantize; "
            f"print(','.join(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == ""


def test_transformer_fusion_defaults_to_auto_and_its_options_are_checked():
    spec = parse(mode="dynamic", calibration_data_uri=None)
    assert (spec.optimize_transformer, spec.num_heads) == ("auto", None)
    assert parse(mode="search", optimize_transformer="on", num_heads=4).num_heads == 4
    with pytest.raises(SpecError, match=r"optimize_transformer: Input should be 'auto', 'on' or 'off'"):
        parse(optimize_transformer="yes")
    with pytest.raises(SpecError, match=r"num_heads: Input should be greater than or equal to 1"):
        parse(num_heads=0)
    with pytest.raises(SpecError, match=r"num_heads: only used by the transformer fusions; optimize_transformer is 'off'"):
        parse(mode="dynamic", optimize_transformer="off", num_heads=2)


def test_operator_refuses_num_heads_without_fusions_at_construction():
    from airflow_modelopt.operators.onnx_quantize import OnnxQuantizeOperator

    with pytest.raises(ValueError, match=r"num_heads: only used by the transformer fusions"):
        OnnxQuantizeOperator(task_id="quantize", model_uri="/m.onnx", mode="dynamic", optimize_transformer="off",
                             num_heads=2)


def test_a_layerwise_configuration_reuses_the_two_models_the_search_already_builds():
    from airflow_modelopt.container.steps.onnx_quantize.quantize import configs_for, layerwise_parts, settings_key

    configs = {c.name: c for c in configs_for(parse(mode="search"))}
    parts = layerwise_parts(configs["qoperator_u8s8_per_channel_layerwise"])
    # unset weight_symmetric is ORT's default for int8 weights: symmetric
    assert settings_key(parts["symmetric"]) == settings_key(configs["qoperator_u8s8_per_channel"])
    assert settings_key(parts["asymmetric"]) == settings_key(configs["qoperator_u8s8_per_channel_asymmetric"])
    assert settings_key(parts["symmetric"]) != settings_key(parts["asymmetric"])
    assert not parts["symmetric"].layerwise and not parts["asymmetric"].layerwise


def test_a_search_of_dynamic_configurations_needs_data_to_measure_on_but_no_calibration():
    dynamic = ["dynamic_u8_per_tensor", "dynamic_s8_per_channel"]
    spec = parse(mode="search", search_configs=dynamic, calibration_data_uri=None, eval_data_uri="/d/eval.npz")
    assert spec.configs_to_search() == dynamic
    with pytest.raises(SpecError, match=r"eval_data_uri: search mode measures"):
        parse(mode="search", search_configs=dynamic, calibration_data_uri=None)
    with pytest.raises(SpecError, match=r"calibration_data_uri is required for mode 'search' with static configurations"):
        parse(mode="search", search_configs=["dynamic_u8_per_tensor", "qdq_u8s8_per_channel"],
              calibration_data_uri=None, eval_data_uri="/d/eval.npz")


def test_the_pipelines_int8_builds_search_configurations_of_their_own_kind():
    from airflow_modelopt.specs.onnx_quantize import STATIC_SEARCH_CONFIGS
    from airflow_modelopt.targets import DYNAMIC_INT8_SEARCH, STATIC_INT8_SEARCH, builds

    assert set(STATIC_INT8_SEARCH["search_configs"]) <= set(STATIC_SEARCH_CONFIGS)
    assert "qoperator_u8s8_per_channel_layerwise" in STATIC_INT8_SEARCH["search_configs"]
    assert set(DYNAMIC_INT8_SEARCH["search_configs"]) == set(SEARCH_CONFIGS) - set(STATIC_SEARCH_CONFIGS)
    for task_id in ("onnx_int8_static", "pruned_onnx_int8", "distilled_onnx_int8", "onnx_int8_dynamic"):
        kwargs = builds()[task_id].kwargs
        assert kwargs["mode"] == "search", task_id
        filled = {k: {"{calibration}": "/d/cal.npz", "{eval}": "/d/eval.npz"}.get(v, v) if isinstance(v, str) else v
                  for k, v in kwargs.items()}
        parse(**{"calibration_data_uri": None, **filled})  # a valid spec
