"""The container side: everything that runs inside a step's image (or a local-mode subprocess).

``cli`` is the entry point, ``runner`` runs one step under its MLflow run, ``context`` is what a
step gets and returns, ``steps/`` holds one module or package per step (``steps.STEP_MODULES``),
``runtimes/`` loads and runs every model format, ``measure`` compares outputs and times models,
``tracking`` talks to MLflow, ``data``/``artifacts``/``signature`` read inputs. Nothing here
imports Airflow; the Airflow side (``operators``, ``hooks``, ``config``, ``pipelines``) never
imports this package. Both share ``specs``, ``exceptions`` and ``uris``.
"""
