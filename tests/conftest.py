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


@pytest.fixture(autouse=True)
def no_server_noted(monkeypatch):
    """Each test starts with no server noted for the per-request check, and leaves none behind: vLLM builds one
    config per process, so ``note_server`` keeps one module-wide, and a server an earlier test built in this process
    (its limits, its runner) must not decide a later test's requests."""
    from ears_vllm.seam import vllm_requests

    monkeypatch.setattr(vllm_requests, "server_config", None)
    monkeypatch.setattr(vllm_requests, "server_runner", "V1")
