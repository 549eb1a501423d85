"""CI's XLA suite (`PJRT_DEVICE=CPU .venv-xla/bin/python -m pytest -m xla`, .ci/run) and TorchTPU suite
(`.venv-tpu/bin/python -m pytest -m torch_tpu`) fail where they cannot run, instead of skipping every test and
passing (tests/conftest.py)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from helpers import REPO


def xla_suite(*args: str, cwd=REPO, **env: str) -> subprocess.CompletedProcess:
    """pytest as CI starts the XLA suite, in this environment."""
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "xla", *args],
                          cwd=cwd, env={**os.environ, "PJRT_DEVICE": "CPU", **env}, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.skipif(importlib.util.find_spec("torch_xla") is not None, reason="torch_xla is installed here")
def test_the_xla_suite_fails_without_torch_xla():
    """Run where torch_xla is missing (this environment), the XLA suite stops with an error that names the missing
    package and the setup script."""
    done = xla_suite("tests/test_xla.py")
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "torch_xla does not load" in output and "scripts/setup_xla_env.sh" in output, output


@pytest.mark.skipif(importlib.util.find_spec("torch_tpu") is not None, reason="torch_tpu is installed here")
def test_the_torchtpu_suite_fails_without_torchtpu():
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "torch_tpu",
                           "tests/test_torch_tpu.py"], cwd=REPO, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "torch_tpu does not load" in output and "scripts/setup_tpu_env.sh" in output, output


def test_the_xla_suite_fails_when_its_tests_skip(tmp_path):
    """A torch_xla that loads (a stand-in here) but XLA tests that all skip: the run's exit status is 1."""
    (tmp_path / "torch_xla").mkdir()
    (tmp_path / "torch_xla" / "__init__.py").write_text("")
    (tmp_path / "test_device.py").write_text(
        "import pytest\npytestmark = pytest.mark.xla\n\ndef test_on_the_device():\n    pytest.skip('no device')\n")
    done = xla_suite("-p", "conftest", str(tmp_path / "test_device.py"), cwd=tmp_path,
                     PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "the XLA suite did not run: 0 XLA tests passed, 1 skipped" in output, output
