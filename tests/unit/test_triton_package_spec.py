"""TritonPackageSpec and the config the step renders: errors name the field; the config.pbtxt the
step writes parses with Triton's own schema (tritonclient's model_config_pb2) into the fields we
meant: platform or backend, data types, dims without the batch, dynamic batching, instance group."""

from __future__ import annotations

import pytest

from airflow_modelopt.container.signature import TensorSpec
from airflow_modelopt.container.steps.triton_package import model_config, render_pbtxt
from airflow_modelopt.exceptions import InputError, SpecError
from airflow_modelopt.specs import parse_spec

BASE = {"registered_model_name": "digits"}
X = TensorSpec(name="x", shape=["batch", 1, 8, 8], dtype="float32")
OUT = TensorSpec(name="output", shape=[None, 10], dtype="float32")


def parse(**fields):
    return parse_spec("triton_package", {**BASE, **fields})


def parsed(text: str):
    pb = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format

    return text_format.Parse(text, pb.ModelConfig())


def test_defaults_and_names():
    spec = parse()
    assert spec.aliases == ["champion"] and spec.max_batch_size == 64 and spec.dynamic_batching
    assert spec.triton_names() == {"champion": "digits"}
    assert parse(aliases=["champion", "challenger"], model_name="m").triton_names() == {
        "champion": "m_champion", "challenger": "m_challenger"}


@pytest.mark.parametrize(("fields", "match"), [
    ({"aliases": []}, "aliases"),
    ({"aliases": ["champion", "champion"]}, r"aliases: \['champion'\] listed more than once"),
    ({"model_name": "a/b"}, "model_name"),
    ({"model_name": "-x"}, "model_name"),
    ({"max_batch_size": 0}, "dynamic_batching and preferred_batch_sizes need max_batch_size > 0"),
    ({"preferred_batch_sizes": [128]}, r"preferred_batch_sizes \[128\] exceed max_batch_size \(64\)"),
    ({"dynamic_batching": False, "preferred_batch_sizes": [8]}, "only used with dynamic_batching=True"),
    ({"instance_kind": "tpu"}, "instance_kind"),
    ({"instance_count": 0}, "instance_count"),
])
def test_bad_fields_are_refused_naming_them(fields, match):
    with pytest.raises(SpecError, match=match):
        parse(**fields)


def test_onnx_config_parses_with_tritons_schema():
    spec = parse(preferred_batch_sizes=[8, 32], instance_count=2)
    config, notes = model_config("digits", "onnx", [X], [OUT], spec, "test")
    c = parsed(render_pbtxt(config))
    assert notes == []
    assert (c.name, c.platform, c.max_batch_size, c.default_model_filename) == ("digits", "onnxruntime_onnx", 64, "model.onnx")
    assert [(i.name, i.data_type, list(i.dims)) for i in c.input] == [("x", 11, [1, 8, 8])]  # 11: TYPE_FP32
    assert [(o.name, list(o.dims)) for o in c.output] == [("output", [10])]
    assert list(c.dynamic_batching.preferred_batch_size) == [8, 32]
    assert c.dynamic_batching.max_queue_delay_microseconds == 100
    assert [(g.count, g.kind) for g in c.instance_group] == [(2, 2)]  # 2: KIND_CPU


def test_tensorrt_and_openvino_configs():
    spec = parse()
    trt = parsed(render_pbtxt(model_config("d", "tensorrt", [X], [OUT], spec, "t")[0]))
    assert (trt.platform, trt.default_model_filename, trt.instance_group[0].kind) == ("tensorrt_plan", "model.plan", 1)  # KIND_GPU
    ov = parsed(render_pbtxt(model_config("d", "openvino", [X], [OUT], spec, "t")[0]))
    assert (ov.backend, ov.platform, ov.default_model_filename) == ("openvino", "", "model.xml")


def test_fixed_batch_is_packaged_without_batching():
    fixed = TensorSpec(name="x", shape=[1, 3, -1, 224], dtype="uint8")
    config, notes = model_config("d", "onnx", [fixed], [OUT], parse(), "t")
    c = parsed(render_pbtxt(config))
    assert c.max_batch_size == 0 and not c.HasField("dynamic_batching")
    assert list(c.input[0].dims) == [1, 3, -1, 224] and c.input[0].data_type == 2  # TYPE_UINT8
    assert "max_batch_size 0" in notes[0]


def test_a_dtype_triton_lacks_is_refused_naming_the_tensor():
    with pytest.raises(InputError, match=r"tensor 'x' has dtype complex64"):
        model_config("d", "onnx", [X.model_copy(update={"dtype": "complex64"})], [OUT], parse(), "where")
