"""What the Triton kernels share (attention_triton, moe_triton, ops_triton); imported only where
triton is.

``Jitted``: ``triton.jit`` reads TRITON_INTERPRET when it wraps a function, and the CPU tests set
it per test, so a kernel body is wrapped on first use in each mode (compiled, or run by Triton's
CPU interpreter) and the two are kept apart. Bodies avoid Triton's own jitted helpers (tl.zeros,
tl.max, tl.sum): the interpreter cannot call those unless TRITON_INTERPRET was set before triton
was imported; tl.full, and tl.reduce with the combine functions below, run both ways (the
interpreter calls their Python bodies).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import triton
import triton.language as tl

FP_FUSION = True
"""Every launch of our kernels passes this as ``enable_fp_fusion``: ``a * b + c`` may compile to one
fused multiply-add. That was Triton's default through 3.9 and what the CUDA exactness checks ran
with; Triton 3.10 turns the default off, so it is chosen here, not by the installed version."""


@triton.jit
def max_combine(a, b):  # type: ignore[no-untyped-def]
    return tl.maximum(a, b)


@triton.jit
def add_combine(a, b):  # type: ignore[no-untyped-def]
    return a + b


class Jitted:
    """``kernel()`` is ``triton.jit(body)`` for the current TRITON_INTERPRET, built once per mode."""

    def __init__(self, body: Callable[..., Any]) -> None:
        self.body = body
        self._modes: dict[bool, Any] = {}

    def __call__(self) -> Any:
        interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
        if interpret not in self._modes:
            self._modes[interpret] = triton.jit(self.body)
        return self._modes[interpret]
