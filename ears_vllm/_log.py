"""Logging that shows up inside vLLM's own log stream when vLLM is there."""

from __future__ import annotations

import logging


def get_logger() -> logging.Logger:
    try:
        from vllm.logger import init_logger
    except ImportError:
        return logging.getLogger("ears_vllm")
    # A child of vLLM's logger: same handlers and format, same VLLM_LOGGING_LEVEL.
    return init_logger("vllm.ears_vllm")
