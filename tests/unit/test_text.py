"""scalellm.text: tokenizer, chat template, incremental detokenizer and stop strings.

The tokenizer is checked against transformers' AutoTokenizer on the same folder: on the prepared
demo model (byte-level BPE) and on a tiny Llama-2-style byte-fallback tokenizer built here.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from scalellm.text import ChatTemplateError, IncrementalDetokenizer, StopStringMatcher, Tokenizer
from scalellm.text.chat_template import render_chat_template

PROMPTS = [
    "Hello, world!",
    "What is the capital of France?",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n\nand   runs     of spaces",
    "Unicode: café naïve façade Ångström – “quotes” … ©",
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷 and ❤️",
    "CJK: 你好，世界。日本語のテキスト。한국어 문장.",
    "Numbers 1234567890, 3.14159, -42, 1e10 and 2024-05-01",
    "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}  # code\n",
    "Special tokens in text: <|im_start|>user\nhi<|im_end|> <|endoftext|>",
    "Ünïcödé àccents and mixed 中文 English 123 😀",
    "",
    " ",
    "\n",
    "a" * 300,
    "Zero\u200bwidth and combining e\u0301 and RTL עברית العربية",
]

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. 😀"},
        {"role": "user", "content": "Say 你好 in English, with code: `print('x')`."},
    ],
    [
        {"role": "user", "content": "First"},
        {"role": "assistant", "content": "Second"},
        {"role": "user", "content": "  Third with spaces  \n\n"},
    ],
    [{"role": "system", "content": ""}, {"role": "user", "content": ""}],
]


# --------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def demo_tok(demo_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(demo_model_dir)


@pytest.fixture(scope="module")
def hf_demo_tok(demo_model_dir: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(demo_model_dir))


def _build_byte_fallback_folder(path: Path) -> Path:
    """A tiny Llama-2-style tokenizer: SentencePiece-like BPE with <0xXX> byte fallback."""
    from tokenizers import AddedToken, decoders, models, normalizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in "▁abcdefghijklmnopqrstuvwxyzHTW,.!?'é":
        vocab.setdefault(ch, len(vocab))
    merges = []
    for a, b in [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "a"), ("i", "n"), ("▁", "w"), ("o", "r")]:
        merges.append((a, b))
        vocab.setdefault(a + b, len(vocab))
    model = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    tok = HFTokenizer(model)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "clean_up_tokenization_spaces": False,
                "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
                "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
                "{% if add_generation_prompt %}[assistant]{% endif %}",
            }
        ),
        encoding="utf-8",
    )
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2]}), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def fallback_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_byte_fallback_folder(tmp_path_factory.mktemp("byte_fallback"))


@pytest.fixture(scope="module")
def fallback_tok(fallback_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(fallback_dir)


def _stream(detok: IncrementalDetokenizer, ids: list[int], rng: random.Random | None = None) -> list[str]:
    """Feed ids one at a time (or in random chunks of 1-4 with rng); return the deltas, flush included."""
    deltas = []
    i = 0
    while i < len(ids):
        n = 1 if rng is None else rng.randint(1, 4)
        chunk = ids[i : i + n]
        deltas.append(detok.add(chunk[0] if n == 1 else chunk))
        i += n
    deltas.append(detok.flush())
    return deltas


# --------------------------------------------------------------------------------------------------
# Torch-free


def test_text_package_imports_without_torch_or_transformers() -> None:
    code = (
        "import sys\n"
        "import scalellm.text\n"
        "from scalellm.text import Tokenizer, IncrementalDetokenizer, StopStringMatcher\n"
        "import scalellm.models.prepare\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_tokenizer_use_stays_torch_free(demo_model_dir: Path) -> None:
    code = (
        "import sys\n"
        "from scalellm.text import Tokenizer, IncrementalDetokenizer, StopStringMatcher\n"
        "from scalellm.models.prepare import resolve_model_dir\n"
        f"tok = Tokenizer.from_dir(resolve_model_dir({str(demo_model_dir)!r}))\n"
        "ids = tok.encode(tok.apply_chat_template([{'role': 'user', 'content': 'hi'}]))\n"
        "d = IncrementalDetokenizer(tok)\n"
        "text = ''.join(d.add(i) for i in ids) + d.flush()\n"
        "assert text == tok.decode(ids), text\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------------------------------
# Tokenizer against transformers (demo model)


@pytest.mark.slow
def test_special_ids_and_sizes(demo_tok: Tokenizer, hf_demo_tok) -> None:
    assert demo_tok.bos_token_id == hf_demo_tok.bos_token_id == 1
    assert demo_tok.eos_token_id == hf_demo_tok.eos_token_id == 2
    assert demo_tok.bos_token == "<|im_start|>"
    assert demo_tok.eos_token == "<|im_end|>"
    assert demo_tok.vocab_size == len(hf_demo_tok) == 49152
    assert demo_tok.stop_token_ids[0] == 2
    assert set(demo_tok.stop_token_ids) == {0, 2}
    assert demo_tok.token_to_id("<|im_end|>") == 2
    assert demo_tok.byte_fallback_ids == frozenset()


@pytest.mark.slow
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(demo_tok: Tokenizer, hf_demo_tok, add_special_tokens: bool) -> None:
    for text in PROMPTS:
        ours = demo_tok.encode(text, add_special_tokens=add_special_tokens)
        theirs = hf_demo_tok.encode(text, add_special_tokens=add_special_tokens)
        assert ours == theirs, text
    assert demo_tok.encode_batch(PROMPTS) == [hf_demo_tok.encode(t) for t in PROMPTS]


@pytest.mark.slow
def test_digits_are_split_like_the_original_smollm2_tokenizer(demo_tok: Tokenizer) -> None:
    ids = demo_tok.encode("2024  12", add_special_tokens=False)
    pieces = [demo_tok.id_to_token(i) for i in ids]
    assert pieces == ["2", "0", "2", "4", "ĠĠ", "1", "2"]


@pytest.mark.slow
@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_transformers(demo_tok: Tokenizer, hf_demo_tok, skip: bool) -> None:
    rng = random.Random(1)
    sequences = [demo_tok.encode(t) for t in PROMPTS]
    sequences += [[rng.randrange(demo_tok.vocab_size) for _ in range(64)] for _ in range(10)]
    sequences.append([1, 2, 0, 3, 17, 216, 1, 2])
    for ids in sequences:
        assert demo_tok.decode(ids, skip_special_tokens=skip) == hf_demo_tok.decode(
            ids, skip_special_tokens=skip
        )


@pytest.mark.slow
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    demo_tok: Tokenizer, hf_demo_tok, add_generation_prompt: bool
) -> None:
    for chat in CHATS:
        ours = demo_tok.apply_chat_template(chat, add_generation_prompt=add_generation_prompt)
        theirs = hf_demo_tok.apply_chat_template(
            chat, add_generation_prompt=add_generation_prompt, tokenize=False
        )
        assert ours == theirs
        ids = hf_demo_tok.apply_chat_template(
            chat, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
        )
        if not isinstance(ids[0], int):  # some versions return a batch of one
            ids = ids[0]
        assert demo_tok.encode_chat(chat, add_generation_prompt=add_generation_prompt) == list(ids)


@pytest.mark.slow
def test_continue_final_message_matches_transformers(demo_tok: Tokenizer, hf_demo_tok) -> None:
    """The last message left open for the model to continue, its own spacing kept."""
    for answer in ("Red,", "Sure:  \n", "  lead and trail  "):
        chat = [*CHATS[1], {"role": "assistant", "content": answer}]
        ours = demo_tok.apply_chat_template(chat, add_generation_prompt=False, continue_final_message=True)
        theirs = hf_demo_tok.apply_chat_template(
            chat, add_generation_prompt=False, continue_final_message=True, tokenize=False
        )
        assert ours == theirs and ours.endswith("<|im_start|>assistant\n" + answer)


def test_continue_final_message_follows_the_template() -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    trims = "{% for m in messages %}[{{ m.role }}]{{ m.content | trim }}[/]{% endfor %}"
    parts = (
        "{% for m in messages %}[{{ m.role }}]{% for p in m.content %}{{ p.text }}{% endfor %}[/]{% endfor %}"
    )
    chats = {
        trims: [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure,  "}],
        parts: [
            {"role": "assistant", "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "B "}]}
        ],
    }
    for template, chat in chats.items():
        ours = render_chat_template(template, chat, add_generation_prompt=False, continue_final_message=True)
        assert [ours] == render_jinja_template([chat], chat_template=template, continue_final_message=True)[0]
    assert ours == "[assistant]AB "
    chat = chats[trims]
    with pytest.raises(ValueError, match="cannot both"):
        render_chat_template(trims, chat, continue_final_message=True)
    with pytest.raises(ChatTemplateError, match="cannot be continued"):  # the template drops the text
        render_chat_template(
            "{{ messages | length }}", chat, add_generation_prompt=False, continue_final_message=True
        )


def test_a_template_failing_on_a_callers_variable_is_a_chat_template_error() -> None:
    with pytest.raises(ChatTemplateError, match="TypeError"):
        render_chat_template("{{ depth + 1 }}", [{"role": "user", "content": "x"}], depth="deep")


@pytest.mark.slow
def test_chat_template_renders_chatml(demo_tok: Tokenizer) -> None:
    text = demo_tok.apply_chat_template(CHATS[1])
    assert text == (
        "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello. 😀<|im_end|>\n"
        "<|im_start|>user\nSay 你好 in English, with code: `print('x')`.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # Without a system message the template adds SmolLM2's default one.
    assert demo_tok.apply_chat_template(CHATS[0]).startswith("<|im_start|>system\nYou are a helpful AI")


@dataclass
class _Msg:
    role: str
    content: str | None


class _ProtoLike:
    def __init__(self, role: str, content: str) -> None:
        self.role, self.content, self.name = role, content, ""


@pytest.mark.slow
def test_chat_template_accepts_typed_messages(demo_tok: Tokenizer) -> None:
    want = demo_tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert demo_tok.apply_chat_template([_Msg("user", "hi")]) == want
    assert demo_tok.apply_chat_template([_ProtoLike("user", "hi")]) == want
    # None values are dropped, like transformers does for OpenAI's content: null.
    with pytest.raises(ChatTemplateError):
        demo_tok.apply_chat_template([_Msg("user", None)])
    with pytest.raises(ValueError):
        demo_tok.apply_chat_template([])


def test_chat_template_sandbox_and_helpers(fallback_tok: Tokenizer) -> None:
    template = (
        "{% if messages|length > 2 %}{{ raise_exception('too many') }}{% endif %}"
        "{% for m in messages %}{{ m | tojson }}\n{% endfor %}"
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
        "{{ ns.n }}{% generation %}!{% endgeneration %}{{ extra }}"
    )
    msgs = [{"role": "user", "content": "é <b>"}]
    out = fallback_tok.apply_chat_template(msgs, chat_template=template, extra="X")
    assert out == '{"role": "user", "content": "é <b>"}\n1!X'
    with pytest.raises(ChatTemplateError, match="too many"):
        fallback_tok.apply_chat_template(msgs * 3, chat_template=template)
    with pytest.raises(ChatTemplateError):
        fallback_tok.apply_chat_template(msgs, chat_template="{{ ''.__class__.__mro__ }}")


# --------------------------------------------------------------------------------------------------
# Byte-fallback tokenizer against transformers


def test_byte_fallback_tokenizer_matches_transformers(fallback_dir: Path, fallback_tok: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(fallback_dir))
    assert fallback_tok.bos_token_id == hf.bos_token_id == 1
    assert fallback_tok.stop_token_ids == (2,)
    assert len(fallback_tok.byte_fallback_ids) == 256
    for text in [*PROMPTS, "the weather", " the"]:
        ids = fallback_tok.encode(text)
        assert ids == hf.encode(text), text
        assert fallback_tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
    for chat in CHATS:
        assert fallback_tok.apply_chat_template(chat) == hf.apply_chat_template(
            chat, add_generation_prompt=True, tokenize=False
        )


# --------------------------------------------------------------------------------------------------
# Incremental detokenizer


@pytest.mark.slow
@pytest.mark.parametrize("skip", [True, False])
def test_detokenizer_random_sequences_demo(demo_tok: Tokenizer, skip: bool) -> None:
    rng = random.Random(1234 + skip)
    specials = sorted(demo_tok.special_token_ids)
    for trial in range(30):
        ids = [rng.randrange(demo_tok.vocab_size) for _ in range(rng.randint(1, 120))]
        for _ in range(rng.randint(0, 4)):  # sprinkle special tokens in
            ids.insert(rng.randrange(len(ids) + 1), rng.choice(specials))
        detok = IncrementalDetokenizer(demo_tok, skip_special_tokens=skip)
        deltas = _stream(detok, ids, rng if trial % 2 else None)
        assert "".join(deltas) == demo_tok.decode(ids, skip_special_tokens=skip)
        assert detok.token_ids == ids


@pytest.mark.slow
def test_detokenizer_multibyte_text_demo(demo_tok: Tokenizer) -> None:
    split_chars = 0
    for text in PROMPTS + [c["content"] for chat in CHATS for c in chat]:
        ids = demo_tok.encode(text, add_special_tokens=False)
        split_chars += sum("\ufffd" in demo_tok.decode([i]) for i in ids)
        detok = IncrementalDetokenizer(demo_tok)
        deltas = _stream(detok, ids)
        assert "".join(deltas) == demo_tok.decode(ids)
        if "<|" not in text:  # special tokens are skipped; everything else round-trips
            assert "".join(deltas) == text
        # Valid text never shows a broken character, not even for a moment.
        assert all("\ufffd" not in d for d in deltas), deltas
    assert split_chars > 10  # the prompts really do split characters across tokens


@pytest.mark.slow
def test_detokenizer_leading_space_and_prompt_context(demo_tok: Tokenizer) -> None:
    ids = demo_tok.encode(" Paris is nice", add_special_tokens=False)
    detok = IncrementalDetokenizer(demo_tok)
    assert "".join(_stream(detok, ids)) == " Paris is nice"

    prompt = demo_tok.encode("Capital: 🇫", add_special_tokens=False)
    out = demo_tok.encode(" Paris 😀", add_special_tokens=False)
    detok = IncrementalDetokenizer(demo_tok, prompt_ids=prompt)
    assert "".join(_stream(detok, out)) == " Paris 😀"
    assert detok.token_ids == out


def test_detokenizer_byte_fallback(fallback_tok: Tokenizer) -> None:
    texts = ["the weather in 東京 is 😀 nice", "😀😀👍🏽", "ß", "a 中 b 文 c", "the"]
    for text in texts:
        ids = fallback_tok.encode(text, add_special_tokens=False)
        assert any(i in fallback_tok.byte_fallback_ids for i in ids) or text == "the"
        deltas = _stream(IncrementalDetokenizer(fallback_tok), ids)
        assert "".join(deltas) == fallback_tok.decode(ids) == text
        assert all("\ufffd" not in d for d in deltas), deltas
    rng = random.Random(7)
    for trial in range(40):
        ids = [rng.randrange(fallback_tok.vocab_size) for _ in range(rng.randint(1, 80))]
        for skip in (True, False):
            deltas = _stream(
                IncrementalDetokenizer(fallback_tok, skip_special_tokens=skip),
                ids,
                rng if trial % 2 else None,
            )
            assert "".join(deltas) == fallback_tok.decode(ids, skip_special_tokens=skip), ids


def test_detokenizer_strips_sentencepiece_space_like_full_decode(fallback_tok: Tokenizer) -> None:
    ids = fallback_tok.encode("the weather", add_special_tokens=True)  # <s> ▁the ▁w...
    deltas = _stream(IncrementalDetokenizer(fallback_tok), ids)
    assert "".join(deltas) == "the weather" == fallback_tok.decode(ids)
    # With the prompt as context, the first generated word keeps its space, as in the full text.
    prompt = fallback_tok.encode("hi", add_special_tokens=True)
    out = fallback_tok.encode("the weather", add_special_tokens=False)
    detok = IncrementalDetokenizer(fallback_tok, prompt_ids=prompt)
    full = fallback_tok.decode(prompt + out)
    assert "".join(_stream(detok, out)) == full[len(fallback_tok.decode(prompt)) :] == " the weather"


def test_detokenizer_window_stays_small(fallback_tok: Tokenizer) -> None:
    calls: list[int] = []

    class Counting(Tokenizer):
        def decode(self, ids, skip_special_tokens=True):  # type: ignore[override]
            calls.append(len(ids))
            return super().decode(ids, skip_special_tokens)

    tok = Counting(fallback_tok.backend, {"bos_token": "<s>", "eos_token": "</s>"})
    ids = tok.encode("the weather in the north is warm " * 40, add_special_tokens=False)
    assert "".join(_stream(IncrementalDetokenizer(tok), ids)) == tok.decode(ids)
    assert max(calls[:-1]) <= 8  # windows, not whole-sequence re-decodes


# --------------------------------------------------------------------------------------------------
# Stop strings


def _run_stops(stops: list[str], deltas: list[str], include_stop: bool = False) -> tuple[str, str | None]:
    m = StopStringMatcher(stops, include_stop=include_stop)
    out = []
    for d in deltas:
        text, hit = m.add(d)
        out.append(text)
        if hit is not None:
            return "".join(out), hit
    out.append(m.flush())
    return "".join(out), None


def test_stop_spanning_deltas() -> None:
    m = StopStringMatcher(["STOP"])
    assert m.add("Hello S") == ("Hello ", None)
    assert m.held == "S"
    assert m.add("T") == ("", None)
    assert m.add("OP and more") == ("", "STOP")
    assert m.stopped and m.matched == "STOP"
    assert m.add("ignored") == ("", None)
    assert m.flush() == ""


def test_stop_one_char_at_a_time() -> None:
    text = "one two three\n\nUser: four"
    assert _run_stops(["\n\nUser:"], list(text)) == ("one two three", "\n\nUser:")


def test_several_stops_earliest_completion_wins() -> None:
    assert _run_stops(["world", "lo w"], ["hello world"]) == ("hel", "lo w")
    assert _run_stops(["abcd", "bc"], ["abcd"]) == ("a", "bc")
    assert _run_stops(["abcd", "bc"], list("abcd")) == ("a", "bc")
    assert _run_stops(["ab", "abc"], ["xabc"]) == ("x", "ab")


def test_stop_at_very_start() -> None:
    assert _run_stops(["<end>"], ["<end>rest"]) == ("", "<end>")
    assert _run_stops(["<end>"], ["<", "en", "d>", "x"]) == ("", "<end>")


def test_no_false_cut() -> None:
    m = StopStringMatcher(["STOP", "</s>"])
    assert m.add("ST") == ("", None)
    assert m.add("OCK market") == ("STOCK market", None)
    assert m.add(" <") == (" ", None)
    assert m.add("/b>") == ("</b>", None)
    assert m.add(" end </") == (" end ", None)
    assert m.flush() == "</"
    assert _run_stops(["xyz"], ["xy", "xy", "x"]) == ("xyxyx", None)


def test_include_stop_and_no_stops() -> None:
    assert _run_stops(["\n"], ["a", "b\nc"], include_stop=True) == ("ab\n", "\n")
    m = StopStringMatcher(None)
    assert m.add("anything") == ("anything", None)
    assert StopStringMatcher(["", "x"]).stop_strings == ("x",)
    assert StopStringMatcher("x").add("axb") == ("a", "x")


def test_stop_random_splits_match_reference() -> None:
    rng = random.Random(3)
    alphabet = "ab c\n"
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        stops = [
            "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))
        ]
        # Reference: the stream ends where a stop string first completes; the earliest start wins a tie.
        hits = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
        cuts = 0
        deltas = []
        while cuts < len(text):
            n = rng.randint(1, 5)
            deltas.append(text[cuts : cuts + n])
            cuts += n
        got = _run_stops(stops, deltas)
        if hits:
            _end, start, stop = min(hits, key=lambda h: (h[0], h[1]))
            assert got[0] == text[:start], (text, stops, deltas, got)
            assert got[1] == stop
        else:
            assert got == (text, None), (text, stops, deltas)
