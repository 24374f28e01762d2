"""What every image promises a step, checked in the images `make images` built."""

from __future__ import annotations

import subprocess

import pytest

from tests.container.conftest import IMAGES


@pytest.mark.parametrize("family", sorted(IMAGES))
def test_image_runs_as_its_user_with_a_home_it_owns(images, family):
    """Steps write caches under $HOME (Keras, matplotlib, onnx2tf): nothing there may be root's."""
    proc = subprocess.run(["docker", "run", "--rm", IMAGES[family], "sh", "-c",
                           'id -un; find "$HOME" ! -user "$(id -un)"'], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    user, *not_owned = proc.stdout.split()
    assert user == "modelopt"
    assert not_owned == [], f"{IMAGES[family]}: in $HOME but not owned by {user}: {not_owned}"
