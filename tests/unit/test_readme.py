"""The README's test command is the one CI runs."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    marker = ci.index("# README: set up and test")
    command = ci[marker + 1].strip()
    assert command.endswith("python -m pytest -q")
    assert command in (ROOT / "README.md").read_text()
