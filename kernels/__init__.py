"""Triton kernels for the verification step, shipped as ``ears_vllm.kernels``.

The fused kernel is not built yet; :func:`ears_vllm.verify` uses the PyTorch reference meanwhile.
"""

AVAILABLE = False
UNAVAILABLE_REASON = "the fused Triton kernel has not been written yet (see the kernel issue)"
