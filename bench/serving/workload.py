"""What the client sends: random prompts of a given length, or a JSONL dataset.

Random prompts follow vLLM's random dataset: token ids drawn uniformly from the vocabulary and
decoded to text with the model's tokenizer (re-tokenized, the length drifts a little; the server's
usage.prompt_tokens is what is reported). Without a tokenizer, random English-ish words (about one
token each). A dataset is JSONL with {"prompt": str, "output_len": int (optional)} per line.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

_WORD_LIST = (
    "time year people way day man thing woman life child world school state family student group "
    "country problem hand part place case week company system program question work government number "
    "night point home water room mother area money story fact month lot right study book eye job word "
    "business issue side kind head house service friend father power hour game line"
)
WORDS = tuple(_WORD_LIST.split())


@dataclass(frozen=True)
class BenchRequest:
    prompt: str | list[int]
    """Text, or token ids (the multi-turn workload)."""
    prompt_len: int
    """The client's own count (tokens asked for, or words); the server's usage wins when given."""
    output_len: int


def load_tokenizer(path: str | None):  # type: ignore[no-untyped-def]
    """A `tokenizers.Tokenizer` from a model folder or tokenizer.json; None when there is none."""
    if not path:
        return None
    file = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(file))


def random_requests(
    n: int, input_len: int, output_len: int, tokenizer=None, seed: int = 0, special_ids: int = 100
) -> list[BenchRequest]:  # type: ignore[no-untyped-def]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if tokenizer is not None:
            vocab = tokenizer.get_vocab_size()
            ids = [rng.randrange(special_ids, vocab) for _ in range(input_len)]
            prompt = tokenizer.decode(ids, skip_special_tokens=True)
        else:
            prompt = " ".join(rng.choice(WORDS) for _ in range(input_len))
        out.append(BenchRequest(prompt, input_len, output_len))
    return out


def dataset_requests(path: str, n: int, default_output_len: int, seed: int = 0) -> list[BenchRequest]:
    """The first n rows of a JSONL file (cycled when it has fewer), shuffled with seed."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            prompt = str(row["prompt"])
            rows.append(
                BenchRequest(prompt, len(prompt.split()), int(row.get("output_len", default_output_len)))
            )
    if not rows:
        raise ValueError(f"{path}: no rows")
    picked = [rows[i % len(rows)] for i in range(n)]
    random.Random(seed).shuffle(picked)
    return picked
