"""One name per step in every layer: spec, container step, operator module and provider info agree."""

from __future__ import annotations

import importlib

import pytest

from airflow_modelopt.container.steps import STEP_MODULES
from airflow_modelopt.specs import StepSpec


def test_every_spec_has_a_registered_step_and_every_step_a_spec():
    assert sorted(STEP_MODULES) == sorted(StepSpec.registry)


@pytest.mark.parametrize("step", sorted(StepSpec.registry))
def test_each_step_has_its_spec_module_step_module_and_operator_module_under_one_name(step):
    spec_cls = StepSpec.registry[step]
    assert spec_cls.__module__ == f"airflow_modelopt.specs.{step}"
    module = importlib.import_module(STEP_MODULES[step])
    assert callable(getattr(module, "run", None)), f"{STEP_MODULES[step]} has no run(spec, ctx)"
    operators = importlib.import_module(f"airflow_modelopt.operators.{step}")
    classes = [v for v in vars(operators).values() if getattr(v, "spec_class", None) is spec_cls]
    assert classes, f"operators/{step}.py holds no operator for {spec_cls.__name__}"


def test_provider_info_lists_every_operator_module():
    from airflow_modelopt import get_provider_info

    listed = get_provider_info()["operators"][0]["python-modules"]
    assert listed == [f"airflow_modelopt.operators.{s}" for s in sorted(StepSpec.registry)]
    for name in listed:
        importlib.import_module(name)
