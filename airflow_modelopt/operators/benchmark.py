"""The ``benchmark`` step's operator (re-exported by ``airflow_modelopt.operators``).

Airflow side: imports the specs (pydantic only), never a model framework.
"""

from __future__ import annotations

from airflow_modelopt.operators.base import ModelOptOperator
from airflow_modelopt.specs.benchmark import BenchmarkSpec


class BenchmarkOperator(ModelOptOperator):
    """Measure a model on the worker's hardware: latency mean / p50 / p95 / p99 and throughput per
    batch size after warm-up, peak RSS of a fresh process that loads and runs it, bytes on disk.
    Runtime, thread count and a hardware fingerprint (CPU model, cores) are tags of the MLflow run;
    the report flags the guide's targets (latency < 100 ms, > 30 items/s, peak memory < 500 MB),
    and ``enforce_targets=True`` turns them into a gate.

    In docker/kubernetes modes pass ``image=`` an image holding the model's runtime (the default is
    the ``base`` image, ONNX Runtime only); benchmark numbers are only as stable as the node's
    CPU allocation, so pin resources in ``kubernetes_kwargs``.
    """

    spec_class = BenchmarkSpec


__all__ = ["BenchmarkOperator"]
