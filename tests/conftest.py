"""Fixtures shared by every test tier."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import procs


@pytest.fixture(scope="session")
def engine_device() -> str:
    """Where the exactness tests run the engine and transformers: cpu, or what
    ``SCALELLM_TEST_DEVICE`` names (``cuda`` on a GPU machine; both sides then run float32 there)."""
    return os.environ.get("SCALELLM_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The prepared SmolLM2-135M-Instruct folder.

    Prepared once into the user cache (or ``$SCALELLM_CACHE_DIR``) and reused by later runs; parallel
    sessions wait on the prepare lock instead of building twice.
    """
    from scalellm.models.prepare import prepare_demo_model

    return prepare_demo_model()


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Build (once per family) a tiny random Llama-family checkpoint; returns its folder."""
    from tests.tiny_models import build_tiny_model

    built: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny_model(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return built[family]

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory) -> Path:  # type: ignore[no-untyped-def]
    return tiny_model_factory("llama")


TOKENIZER_DIR_ENV = "SCALELLM_TEST_TOKENIZER_DIR"
"""A folder with the demo model's config and tokenizer files but no weights, for tiny_chat_model
where the demo model cannot be prepared (a GPU machine reaches no package index:
bench/gpu_prep.sh makes one)."""


@pytest.fixture(scope="session")
def tiny_chat_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with the demo model's tokenizer and chat template and an 8192-token
    context: a gateway serves it and a worker runs it at milliseconds per step, for tests about the
    mesh rather than the text (greedy output is still exact: compare with the engine alone)."""
    from tests.tiny_models import build_tiny_chat_model

    given = os.environ.get(TOKENIZER_DIR_ENV)
    source = Path(given) if given else request.getfixturevalue("demo_model_dir")
    return build_tiny_chat_model(source, tmp_path_factory.mktemp("tiny-chat"), max_position_embeddings=8192)


@pytest.fixture
def whole_machine() -> Iterator[None]:
    """The machine to this test alone among the test processes (tests.procs.whole_machine)."""
    with procs.whole_machine():
        yield
