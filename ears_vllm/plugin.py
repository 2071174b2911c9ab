"""vLLM general-plugin entry point (``vllm.general_plugins``: ``ears = ears_vllm.plugin:register``)."""

from __future__ import annotations

_registered = False


def register() -> None:
    """Called by vLLM in every process. Idempotent and cheap; never raises into vLLM."""
    global _registered
    if _registered:
        return
    _registered = True
