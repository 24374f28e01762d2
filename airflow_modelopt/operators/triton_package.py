"""TritonPackageOperator (re-exported by ``airflow_modelopt.operators``). Imports no ML framework."""

from __future__ import annotations

from airflow_modelopt.operators.base import ModelOptOperator
from airflow_modelopt.specs.triton_package import TritonPackageSpec


class TritonPackageOperator(ModelOptOperator):
    """Write an NVIDIA Triton Inference Server model repository for registry aliases and log it.

    For each of ``aliases`` (``["champion"]`` by default; run it after ``PromoteModelOperator``)
    the version the alias points at in ``registered_model_name`` becomes one Triton model:
    ``<name>/config.pbtxt`` and ``<name>/<registry version>/model.onnx`` (+ external data),
    ``model.plan`` or ``model.xml`` + ``model.bin``; platform ``onnxruntime_onnx``,
    ``tensorrt_plan`` or backend ``openvino`` by format; inputs and outputs with Triton data types
    and dims from the model's recorded signature; ``max_batch_size`` with dynamic batching
    (``preferred_batch_sizes``, ``max_queue_delay_microseconds``) when the batch dimension is
    dynamic; an instance group (``instance_count``, ``instance_kind``: GPU for TensorRT engines,
    CPU otherwise by default). The Triton model is named ``model_name`` (default: the registered
    name) with one alias, ``<model_name>_<alias>`` with several.

    Result artifacts: ``triton_repository`` (the folder; serve a download of it with
    ``tritonserver --model-repository=<folder>``) and ``triton_repository_tarball``. An alias that
    does not exist, or a model Triton packaging does not cover (TFLite, .pt2, MNN), fails the task
    at once (exit 2). Runs in the ``base`` image; no Triton server is started.
    """

    spec_class = TritonPackageSpec


__all__ = ["TritonPackageOperator"]
