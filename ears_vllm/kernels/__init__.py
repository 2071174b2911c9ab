"""Triton kernels for the verification step, shipped as ``ears_vllm.kernels``.

Imported lazily: ``import ears_vllm`` never imports Triton. On a CPU the kernels run only under
``TRITON_INTERPRET=1`` (Triton's numpy interpreter; slow, for tests at small shapes), and that variable
must be set before the kernel module is first imported.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ears_vllm.reference import VerifyResult
    from ears_vllm.step import VerifyStep

AVAILABLE = importlib.util.find_spec("triton") is not None
UNAVAILABLE_REASON = "" if AVAILABLE else "the `triton` package is not installed"


def unusable_reason(device_type: str) -> str | None:
    """Why the kernel cannot run on tensors of this device type, or None."""
    if not AVAILABLE:
        return UNAVAILABLE_REASON
    if device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"tensors on {device_type!r} need a CUDA device, or TRITON_INTERPRET=1 (the slow CPU interpreter)"
    return None


def verify_triton(step: VerifyStep, **options: Any) -> VerifyResult:
    """:func:`ears_vllm.kernels.verify_kernel.verify_triton` (imported on first use): the step verified by the fused
    kernel; ``options``: its ``block_size`` and ``num_splits``."""
    from ears_vllm.kernels.verify_kernel import verify_triton as run

    return run(step, **options)


def race_winners_triton(*args, **kwargs):
    from ears_vllm.kernels.verify_kernel import race_winners_triton as run

    return run(*args, **kwargs)
