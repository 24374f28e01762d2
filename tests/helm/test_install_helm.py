"""scripts/install-helm.sh: what CI and the helm tier call before anything else."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.conftest import REPO
from tests.helm.conftest import Helm

pytestmark = pytest.mark.helm


def test_install_script_is_idempotent_and_prints_only_the_path(helm: Helm) -> None:
    """A second run reuses the binary: same path, only the path on stdout, no download."""
    started = time.monotonic()
    proc = subprocess.run(["bash", str(REPO / "scripts" / "install-helm.sh")], capture_output=True, text=True,
                          timeout=120)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [helm.path]
    assert "downloading" not in proc.stderr
    assert elapsed < 10, f"the installed case took {elapsed:.1f} s"
    assert helm.version() >= (3, 8)
