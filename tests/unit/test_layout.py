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


def test_launchers_stay_thin():
    for path in _sources("launch"):
        code = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
        assert len(code) <= 20, f"{path.name} has {len(code)} lines; keep the logic in stages/ and rlhf/"
