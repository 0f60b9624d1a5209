"""The README's main command, end to end, as a user runs it (slow)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from rlhf.checkpoint import read_manifest
from rlhf.launcher import REPO_ROOT

pytestmark = pytest.mark.slow

MAIN_COMMAND = "accelerate launch launch/sft.py && accelerate launch launch/reward.py"


def test_readme_main_command_runs_the_demo(tmp_path):
    readme = (REPO_ROOT / "README.md").read_text()
    assert MAIN_COMMAND in readme  # the test runs what the README tells users to run
    # The same launchers and demo configs, in a copy of the checkout so runs/ of the user's tree stays untouched.
    work = tmp_path / "checkout"
    shutil.copytree(REPO_ROOT, work, ignore=shutil.ignore_patterns(".venv", "runs", ".git", "__pycache__"))
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(MAIN_COMMAND, shell=True, cwd=work, env=env, capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    sft = read_manifest(work / "runs" / "demo" / "sft")
    reward = read_manifest(work / "runs" / "demo" / "reward")
    assert sft["metrics"]["eval/loss"] < 1.7
    assert reward["metrics"]["eval/accuracy"] > 0.65  # noisy labels: the annotator errs on ~15% of pairs
