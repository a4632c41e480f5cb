"""The README's first lines and its Python example are what a new user runs: keep them working."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_opens_with_the_two_commands():
    lines = README.read_text().splitlines()
    block = "\n".join(lines[:8])
    assert "dpmicroadam train" in block
    assert "scripts/test.sh" in block
    ci = (README.parent / ".ci" / "run").read_text()
    assert "scripts/test.sh" in ci and "scripts/setup.sh" in ci


def test_readme_python_example_runs():
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    example = next(b for b in blocks if "DPMechanism" in b)
    assert "steps = 300" in example
    code = example.replace("steps = 300", "steps = 5")  # same code, fewer steps
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)  # noqa: S102 - our own README
    assert scope["mech"].accountant.steps == 5
    assert 0 < scope["mech"].epsilon() <= 8.0
