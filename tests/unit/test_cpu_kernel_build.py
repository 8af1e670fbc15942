"""The CPU kernel's build survives a build killed midway and never runs twice at once."""

from __future__ import annotations

import ast
import fnmatch
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scalellm.engine import cpu_kernels
from scalellm.engine.cpu_kernels import build_turn

NAME = "scalellm_cpu_build_turn_test"


@pytest.fixture
def extensions_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    return tmp_path


def test_a_killed_builds_lock_file_is_removed_by_the_next_builder(extensions_dir: Path) -> None:
    leftover = extensions_dir / NAME / "lock"
    leftover.parent.mkdir()
    leftover.touch()  # what torch's builder leaves when killed between taking and dropping it
    with build_turn(NAME):
        assert not leftover.exists()  # torch's load() would otherwise wait on it forever


def test_builders_take_turns(extensions_dir: Path) -> None:
    other = [
        sys.executable, "-c",
        "import sys; from scalellm.engine.cpu_kernels import build_turn\n"
        f"with build_turn({NAME!r}):\n    print('in', flush=True)\n    sys.stdin.readline()",
    ]  # fmt: skip
    holder = subprocess.Popen(other, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "in\n"
        flock = extensions_dir / f"{NAME}.flock"
        waiter = subprocess.run(["flock", "--nonblock", str(flock), "true"], check=False)
        assert waiter.returncode != 0  # held: a second builder waits for its turn
        holder.kill()  # dies holding its turn: the OS releases it
        holder.wait(timeout=30)
        with build_turn(NAME):
            pass
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_an_installed_package_carries_every_file_the_build_reads() -> None:
    """`pip install .` (the Docker images) ships only package data the patterns in pyproject.toml
    name: a header left out makes the kernels fail to build there and fall back to torch."""
    root = Path(__file__).resolve().parents[2]
    line = re.search(r'^"scalellm\.engine" = (\[.*?\])', (root / "pyproject.toml").read_text(), re.M)
    assert line, "pyproject.toml names no package data for scalellm.engine"
    shipped = ast.literal_eval(line.group(1))
    package = root / "scalellm" / "engine"
    for path in cpu_kernels.SOURCES + cpu_kernels.HEADERS:
        relative = str(path.resolve().relative_to(package))
        assert any(fnmatch.fnmatch(relative, p) for p in shipped), f"{relative} is not package data"
