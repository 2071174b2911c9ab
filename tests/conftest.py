from __future__ import annotations

import pytest

from ears_vllm.tiny_models import build_tiny_pair


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """A tiny random Llama target and a noisy copy as draft, built at test time (no model hub)."""
    return build_tiny_pair(tmp_path_factory.mktemp("tiny-models"))
