#!/usr/bin/env python
"""Regenerate the README's screenshots (docs/images/*.png) in a real browser.

They are taken by the e2e tier's trigger-form test (tests/e2e/test_trigger_form.py): a real Airflow
3 (api-server, scheduler, dag-processor) and a real MLflow server on loopback, the project's DAGs,
headless Chromium. The test fills the trigger form, runs `modelopt_optimize` on the example model,
checks what a user sees, and with $MODELOPT_SCREENSHOTS_DIR set saves: trigger-form,
trigger-form-targets, dag-run-grid, task-mlflow-link, mlflow-registered-model,
mlflow-model-version, mlflow-parent-run. Needs /usr/bin/chromium and the playwright package
(scripts/ci-install-browser.sh); takes a few minutes on two cores.

    .venv/bin/python scripts/screenshots.py [--out docs/images]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "images"), help="folder for the PNGs")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    env = {**os.environ, "MODELOPT_SCREENSHOTS_DIR": str(out), "MODELOPT_REQUIRE_E2E": "1"}
    command = [sys.executable, "-m", "pytest", "tests/e2e/test_trigger_form.py", "-q", "-p", "no:cacheprovider"]
    print("+", " ".join(command), f"(MODELOPT_SCREENSHOTS_DIR={out})", flush=True)
    code = subprocess.call(command, cwd=ROOT, env=env)
    shots = sorted(out.glob("*.png"))
    for path in shots:
        print(f"  {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}  {path.stat().st_size // 1024} kB")
    if code:
        print(f"the e2e test failed (exit {code}): the screenshots above may be stale", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
