"""The README's main command, end to end, as a user runs it (slow)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from support import sample_base_model

from rlhf.checkpoint import read_manifest
from rlhf.launcher import REPO_ROOT

pytestmark = pytest.mark.slow


def test_readme_main_command_pretrains_the_demo_base_model(tmp_path):
    readme = (REPO_ROOT / "README.md").read_text()
    command = "accelerate launch launch/pretrain.py output_dir=runs/demo/pretrain"
    assert command in readme  # the test runs what the README tells users to run
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    out = tmp_path / "pretrain"
    done = subprocess.run([accelerate, "launch", "launch/pretrain.py", f"output_dir={out}"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = read_manifest(out)
    assert manifest["metrics"]["eval/loss"] < 1.6
    ended, grammatical = sample_base_model(out, n=100, seed=1)
    assert ended >= 90 and grammatical >= 80
