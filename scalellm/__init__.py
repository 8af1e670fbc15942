"""ScaleLLM mesh: the shared library behind the gateway, the workers and the registry.

``from scalellm import LLM, SamplingParams, StructuredOutput`` gives the offline API. ``LLM`` is loaded lazily so
that the torch-free parts of the mesh (gateway, kvstore) can import ``scalellm.*`` without pulling
in torch; SamplingParams is one of the torch-free shared types (scalellm.types).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scalellm.types import SamplingParams, StructuredOutput

__version__ = "0.1.0"

if TYPE_CHECKING:
    from scalellm.llm import LLM, CompletionOutput, RequestOutput

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "StructuredOutput", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("LLM", "RequestOutput", "CompletionOutput"):
        from scalellm import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'scalellm' has no attribute {name!r}")
