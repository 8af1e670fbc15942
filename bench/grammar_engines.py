"""Grammar engines for structured output, measured side by side on CPU: xgrammar, llguidance and
outlines-core, each driving the same constrained random walk on the demo model's vocabulary.

    python bench/grammar_engines.py                 # JSON schema and regex, 3 walks of 120 steps each
    python bench/grammar_engines.py --steps 200 --walks 5 --out grammar.json

Per engine and constraint: the time to compile the constraint for the vocabulary (cold, then from
the engine's own cache where it has one), and the cost of one decode step for one request: fill
the next-token bitmask, then advance the state by the sampled token (median and p90 over all
steps). A step's token is the argmax of seeded random logits under the engine's own mask, with a
bonus on end-of-sequence so walks can finish; a finished walk starts again. The libraries are not
project dependencies except the one chosen: install the others to run this (`pip install xgrammar
llguidance outlines-core`; xgrammar pulls transformers and triton).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "active"],
    "additionalProperties": False,
}
REGEX = r"(\d{3}-\d{3}-\d{4}|[A-Z][a-z]{2,9} [A-Z][a-z]{2,9})"
CONSTRAINTS = {"json_schema": ("json", json.dumps(SCHEMA)), "regex": ("regex", REGEX)}


class Walker(Protocol):
    def fill(self, mask: torch.Tensor) -> None: ...
    def advance(self, token: int) -> None: ...
    def finished(self) -> bool: ...


@dataclass(frozen=True)
class Vocab:
    tokenizer_json: str
    tokens: list[bytes]  # raw bytes of each token id (special tokens as their text)
    encoded: list[str]  # the tokenizer's own strings (byte-level alphabet)
    eos: int
    size: int  # the model's vocabulary size (logits width)


def load_vocab(model_dir: Path) -> Vocab:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    config = json.loads((model_dir / "config.json").read_text())
    vocab = tok.get_vocab(with_added_tokens=True)
    encoded = [""] * len(vocab)
    for text, i in vocab.items():
        encoded[i] = text
    decoder = _byte_decoder()
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    tokens = [t.encode() if t in special else bytes(decoder[c] for c in t if c in decoder) for t in encoded]
    eos = config["eos_token_id"]
    return Vocab(tok.to_str(), tokens, encoded, eos if isinstance(eos, int) else eos[0], config["vocab_size"])


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


# ---- the engines -------------------------------------------------------------------------------


def llguidance_engine(vocab: Vocab) -> Callable[[str, str], Callable[[], Walker]]:
    import llguidance
    from llguidance.torch import fill_next_token_bitmask

    tokenizer = llguidance.LLTokenizer(vocab.tokenizer_json, n_vocab=vocab.size, eos_token=vocab.eos)

    def compile_(kind: str, spec: str) -> Callable[[], Walker]:
        grammar = (
            llguidance.LLMatcher.grammar_from_json_schema(spec, defaults={"whitespace_flexible": False})
            if kind == "json"
            else llguidance.LLMatcher.grammar_from_regex(spec)
        )
        error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
        assert not error, error

        class W:
            def __init__(self) -> None:
                self.m = llguidance.LLMatcher(tokenizer, grammar)

            def fill(self, mask: torch.Tensor) -> None:
                fill_next_token_bitmask(self.m, mask)

            def advance(self, token: int) -> None:
                assert self.m.consume_token(token), self.m.get_error()

            def finished(self) -> bool:
                return self.m.is_stopped()

        W()  # building the first matcher is part of compiling
        return W

    return compile_


def xgrammar_engine(vocab: Vocab) -> Callable[[str, str], Callable[[], Walker]]:
    import xgrammar as xgr

    info = xgr.TokenizerInfo(
        vocab.encoded, xgr.VocabType.BYTE_LEVEL, vocab_size=vocab.size, stop_token_ids=[vocab.eos]
    )
    compiler = xgr.GrammarCompiler(info, max_threads=1)

    def compile_(kind: str, spec: str) -> Callable[[], Walker]:
        compiled = (
            compiler.compile_json_schema(spec, any_whitespace=False)
            if kind == "json"
            else compiler.compile_regex(spec)
        )

        class W:
            def __init__(self) -> None:
                self.m = xgr.GrammarMatcher(compiled)

            def fill(self, mask: torch.Tensor) -> None:
                self.m.fill_next_token_bitmask(mask)

            def advance(self, token: int) -> None:
                assert self.m.accept_token(token)

            def finished(self) -> bool:
                return self.m.is_terminated()

        return W

    return compile_


def outlines_engine(vocab: Vocab) -> Callable[[str, str], Callable[[], Walker]]:
    import outlines_core
    from outlines_core.json_schema import build_regex_from_schema

    table: dict[bytes, list[int]] = {}
    for i, t in enumerate(vocab.tokens):
        if i != vocab.eos:
            table.setdefault(t, []).append(i)
    vocabulary = outlines_core.Vocabulary(vocab.eos, table)

    def compile_(kind: str, spec: str) -> Callable[[], Walker]:
        regex = build_regex_from_schema(spec) if kind == "json" else spec
        index = outlines_core.Index(regex, vocabulary)

        class W:
            def __init__(self) -> None:
                self.g = outlines_core.Guide(index)

            def fill(self, mask: torch.Tensor) -> None:
                self.g.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())

            def advance(self, token: int) -> None:
                self.g.advance(token)

            def finished(self) -> bool:
                return self.g.is_finished()

        return W

    return compile_


ENGINES = {"llguidance": llguidance_engine, "xgrammar": xgrammar_engine, "outlines-core": outlines_engine}


# ---- the walk ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    engine: str
    constraint: str
    compile_cold_ms: float
    compile_again_ms: float
    step_median_us: float
    step_p90_us: float
    steps: int
    walks_finished: int


def walk(
    new: Callable[[], Walker], vocab: Vocab, steps: int, walks: int, seed: int
) -> tuple[list[float], int]:
    gen = torch.Generator().manual_seed(seed)
    words = (vocab.size + 31) // 32
    mask = torch.zeros((1, words), dtype=torch.int32)
    shifts = torch.arange(32, dtype=torch.int32)
    times: list[float] = []
    finished = 0
    for _ in range(walks):
        w = new()
        for _ in range(steps):
            logits = torch.randn(vocab.size, generator=gen)
            logits[vocab.eos] += 4.0
            t = time.perf_counter()
            w.fill(mask)
            t_fill = time.perf_counter() - t
            allowed = ((mask[0].unsqueeze(-1) >> shifts) & 1).bool().view(-1)[: vocab.size]
            token = int(logits.masked_fill(~allowed, float("-inf")).argmax())
            t = time.perf_counter()
            w.advance(token)
            times.append(t_fill + time.perf_counter() - t)
            if w.finished():
                finished += 1
                w = new()
    return times, finished


def measure(name: str, vocab: Vocab, steps: int, walks: int) -> list[Result]:
    t = time.perf_counter()
    engine = ENGINES[name](vocab)
    log(f"{name}: tokenizer set-up {1000 * (time.perf_counter() - t):.0f} ms")
    results = []
    for constraint, (kind, spec) in CONSTRAINTS.items():
        t = time.perf_counter()
        new = engine(kind, spec)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        engine(kind, spec)
        again = time.perf_counter() - t
        times, done = walk(new, vocab, steps, walks, seed=0)
        times.sort()
        results.append(
            Result(
                name,
                constraint,
                1000 * cold,
                1000 * again,
                1e6 * statistics.median(times),
                1e6 * times[int(0.9 * len(times))],
                len(times),
                done,
            )
        )
        log(str(results[-1]))
    return results


def log(msg: str) -> None:
    print(msg, flush=True)


def main() -> None:
    from scalellm.models.prepare import resolve_model_dir

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engines", nargs="+", default=list(ENGINES))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--walks", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    vocab = load_vocab(resolve_model_dir(None))
    machine = f"{platform.machine()} {platform.processor() or platform.platform()}, torch {torch.__version__}"
    log(f"vocabulary {vocab.size} (demo model), {machine}")
    results: list[dict[str, Any]] = []
    for name in args.engines:
        results.extend(asdict(r) for r in measure(name, vocab, args.steps, args.walks))
    print("\n| engine | constraint | compile cold ms | compile again ms | step median us | step p90 us |")
    print("|---|---|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['engine']} | {r['constraint']} | {r['compile_cold_ms']:.1f} | {r['compile_again_ms']:.1f} "
            f"| {r['step_median_us']:.0f} | {r['step_p90_us']:.0f} |"
        )
    if args.out:
        args.out.write_text(json.dumps({"machine": machine, "results": results}, indent=2))


if __name__ == "__main__":
    main()
