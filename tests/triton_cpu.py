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
