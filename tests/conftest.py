from __future__ import annotations

import pytest
import torch

from ears_vllm.tiny_models import build_tiny_pair
from tests.triton_cpu import triton_interpreter

if not torch.cuda.is_available():
    # Triton's own library (tl.max, tl.sum, tl.rand, ...; gluon's copies of them) is jitted when first
    # imported: import it under the interpreter before vLLM does, or interpreted kernels cannot call it.
    with triton_interpreter():
        import triton.experimental.gluon
        import triton.language  # noqa: F401


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """A tiny random Llama target and a noisy copy as draft, built at test time (no model hub)."""
    return build_tiny_pair(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture
def fresh_registration(monkeypatch):
    """Let register() run again in this process (vLLM itself calls it once per process)."""
    from ears_vllm import plugin

    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.setattr(plugin, "hook_report", {})
