"""Running Triton kernels on a CPU: Triton's interpreter, chosen per function when ``@triton.jit`` runs."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def triton_interpreter() -> Iterator[None]:
    """``TRITON_INTERPRET=1`` while jitted functions are created, then as before.

    Only creation needs it; restoring it keeps it out of the ``vllm serve`` processes other tests start.
    """
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


@contextlib.contextmanager
def vllm_triton_modules(names: tuple[str, ...], tldevice: object) -> Iterator[list]:
    """vLLM modules whose Triton kernels run here: ``vllm.triton_utils`` pointed at the real Triton (vLLM
    swaps in placeholders on a CPU), the modules reloaded under the interpreter, and restored afterwards."""
    import importlib

    import triton
    import triton.language as tl
    import vllm.triton_utils as triton_utils

    saved = (triton_utils.triton, triton_utils.tl, triton_utils.tldevice, getattr(triton_utils, "HAS_TRITON", None))
    for name in names:  # first imported as vLLM would (placeholders), so only ``names`` are recompiled below, not
        importlib.import_module(name)  # what they import (V1's sampler would otherwise pick its Triton top-k)
    with triton_interpreter():
        triton_utils.triton, triton_utils.tl, triton_utils.tldevice = triton, tl, tldevice
        triton_utils.HAS_TRITON = True
        modules = [importlib.reload(importlib.import_module(name)) for name in names]
    try:
        yield modules
    finally:
        triton_utils.triton, triton_utils.tl, triton_utils.tldevice, triton_utils.HAS_TRITON = saved
        for name in names:
            importlib.reload(importlib.import_module(name))
