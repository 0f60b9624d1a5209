"""Rules of the code base that a reader should not have to check by hand."""

from __future__ import annotations

import re

from rlhf.launcher import REPO_ROOT


def _sources(folder: str):
    return sorted((REPO_ROOT / folder).rglob("*.py"))


def test_library_never_imports_stages_or_launchers():
    offenders = [str(p.relative_to(REPO_ROOT)) for p in _sources("rlhf")
                 if re.search(r"^\s*(from|import)\s+(stages|launch)\b", p.read_text(), re.M)]
    assert offenders == []


def test_the_pipeline_never_imports_the_launcher():
    """rlhf.launcher runs one stage and looks its target up in rlhf.pipeline; the pipeline starts stages as processes
    of the launcher by module name, never by importing it: imports go one way."""
    for name in ("pipeline.py", "cli.py"):
        text = (REPO_ROOT / "rlhf" / name).read_text()
        pattern = r"^\s*(from rlhf\.launcher|from rlhf import launcher|import rlhf\.launcher)"
        assert not re.search(pattern, text, re.M), name


def test_launchers_stay_thin():
    for path in _sources("launch"):
        code = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
        assert len(code) <= 20, f"{path.name} has {len(code)} lines; keep the logic in stages/ and rlhf/"
