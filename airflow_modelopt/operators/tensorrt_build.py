"""TensorRTBuildOperator (re-exported by ``airflow_modelopt.operators``). Imports no ML framework."""

from __future__ import annotations

import copy
from typing import Any

from airflow_modelopt.operators.base import ModelOptOperator
from airflow_modelopt.operators.launchers import k8s_field
from airflow_modelopt.specs.tensorrt_build import TensorRTBuildSpec

#: The extended resource NVIDIA's Kubernetes device plugin advertises.
GPU_RESOURCE = "nvidia.com/gpu"
#: GPU node pools are commonly tainted with this key; the pod tolerates it.
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}


def with_gpu_request(kubernetes_kwargs: dict[str, Any], gpus: int = 1) -> dict[str, Any]:
    """``kubernetes_kwargs`` plus a GPU limit and a toleration for GPU nodes, unless already given.

    ``container_resources`` may be a dict (``{"limits": {...}, "requests": {...}}``) or a
    ``V1ResourceRequirements``: its other limits and requests are kept, and a ``nvidia.com/gpu``
    limit the user set (even ``"0"``) wins. ``tolerations`` (dicts or ``V1Toleration``) get the
    ``nvidia.com/gpu`` toleration appended unless one for that key is there.
    """
    merged = dict(kubernetes_kwargs)
    resources = merged.get("container_resources")
    if resources is None:
        merged["container_resources"] = {"limits": {GPU_RESOURCE: str(gpus)}}
    else:
        limits = dict(k8s_field(resources, "limits") or {})
        if GPU_RESOURCE not in limits:
            limits[GPU_RESOURCE] = str(gpus)
            if isinstance(resources, dict):
                resources = {**resources, "limits": limits}
            else:  # a V1ResourceRequirements: a copy, so the caller's object is left alone
                resources = copy.copy(resources)
                resources.limits = limits
        merged["container_resources"] = resources
    tolerations = list(merged.get("tolerations") or [])
    if not any(k8s_field(t, "key") == GPU_RESOURCE for t in tolerations):
        tolerations.append(dict(GPU_TOLERATION))
    merged["tolerations"] = tolerations
    return merged


class TensorRTBuildOperator(ModelOptOperator):
    """Build a TensorRT engine from an ONNX model (TensorRT 10 Python API) and log it to MLflow.

    ``precision="fp32"``, ``"fp16"`` (``BuilderFlag.FP16``) or ``"int8"`` (``BuilderFlag.INT8``,
    entropy-calibrated on ``calibration_data_uri``, batches drawn in order at the opt shape of the
    first optimization profile; ``int8_fp16_fallback`` also allows fp16 kernels). Optimization
    profiles give min/opt/max shapes per input name; by default an input whose only dynamic
    dimension is the batch gets ``1 / opt_batch_size / max_batch_size``. A timing cache from an
    earlier build (``timing_cache_uri``, e.g. ``artifact("build_trt", "timing_cache")``) speeds up
    rebuilds on the same GPU model and TensorRT version.

    Result artifacts: ``tensorrt_engine`` (a folder: ``model.engine``, ``modelopt_signature.json``,
    ``timing.cache``, and for int8 ``calibration.cache``), ``timing_cache``, ``layer_info`` (the
    engine inspector's JSON). Metrics: ``build_time_s``, ``engine_bytes``, ``num_layers``,
    ``precision_bits``, ``size_ratio`` (engine / ONNX bytes), ``timing_cache_reused``, and for
    int8 ``calibration_batches``. ``info`` holds the TensorRT version, the GPU and the profiles.

    Runs in the ``tensorrt`` image and needs an NVIDIA GPU. On a worker without TensorRT or a
    GPU the task fails at once, not retried (exit code 6), with a message saying what is missing.
    In ``kubernetes`` mode the pod requests ``nvidia.com/gpu: 1`` and tolerates the
    ``nvidia.com/gpu`` taint by default, merged with ``kubernetes_kwargs`` (a GPU limit or
    toleration given there wins); ``request_gpu=False`` turns this off. In ``docker`` mode give the
    container the GPU yourself: ``docker_kwargs={"device_requests":
    [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])]}``.

    :param request_gpu: add the GPU request and toleration to the Kubernetes pod (default True).
    """

    spec_class = TensorRTBuildSpec
    ui_color = "#dcfce7"

    def __init__(self, *, request_gpu: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.request_gpu = request_gpu
        if request_gpu:
            self.kubernetes_kwargs = with_gpu_request(self.kubernetes_kwargs)


__all__ = ["GPU_RESOURCE", "TensorRTBuildOperator", "with_gpu_request"]
