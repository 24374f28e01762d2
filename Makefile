# airflow-modelopt: the two commands a newcomer runs are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: help venv demo test test-unit test-integration test-container test-helm images lint clean

help:
	@echo "make demo    create .venv, install, run the example DAG end to end (local mode, SQLite, local MLflow store)"
	@echo "make test    run the whole test suite (unit, integration, container, helm, e2e tiers)"
	@echo "make images  build the step images from a host-side wheelhouse (no network inside builds)"
	@echo "make lint    ruff and the import-boundary contracts"

# The environment: Airflow side and every container-side extra, for local mode and tests.
$(VENV)/.installed: pyproject.toml images/tensorflow/requirements-nodeps.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=/path/to/python3.11)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -e ".[all,dev]"
	$(PIP) install --no-deps -r images/tensorflow/requirements-nodeps.txt   # onnx2tf: its pins would downgrade TensorFlow
	$(PIP) install --no-deps "tritonclient==2.73.*" "python-rapidjson>=1.14"   # model-config protobuf for tests; its ml-dtypes pin would downgrade TensorFlow's
	touch $@

venv: $(VENV)/.installed

demo: venv
	bash scripts/demo.sh

test: venv
	$(VENV)/bin/pytest tests $(PYTEST_ARGS)

test-unit: venv
	$(VENV)/bin/pytest tests/unit $(PYTEST_ARGS)

test-integration: venv
	$(VENV)/bin/pytest tests/integration $(PYTEST_ARGS)

test-container: venv
	$(VENV)/bin/pytest tests/container $(PYTEST_ARGS)

test-helm: venv
	$(VENV)/bin/pytest tests/helm $(PYTEST_ARGS)

images: venv
	PY=$(PY) bash scripts/build-images.sh

lint: venv
	$(VENV)/bin/ruff check airflow_modelopt dags tests
	$(VENV)/bin/lint-imports

clean:
	rm -rf build .demo .pytest_cache
