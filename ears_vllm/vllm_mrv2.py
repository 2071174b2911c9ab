"""Adapter for vLLM's Model Runner V2 (``vllm.v1.worker.gpu.spec_decode.rejection_sampler``), the GPU default.

MRV2 verifies raw logits with online-softmax statistics and stateless Philox randoms keyed by
(request seed, position); ``rejection_sampler.py`` imports ``rejection_sample`` from
``rejection_sampler_utils`` by name, so that is where a patch has to go. Reproducing that randomness
needs the fused Triton kernel, which has not landed yet: for now this adapter checks the hook and, if
a non-standard policy is configured, warns once that MRV2 runs vLLM's own sampler (set
``VLLM_USE_V2_MODEL_RUNNER=0`` to verify through the V1 runner, where the policy is active).
"""

from __future__ import annotations

import importlib
from typing import Any

from ears_vllm._hooks import check_module
from ears_vllm._log import get_logger
from ears_vllm.config import resolve_config

MODULE = "vllm.v1.worker.gpu.spec_decode.rejection_sampler"
EXPECTED_PARAMETERS = (
    "target_logits",
    "draft_logits",
    "draft_sampled",
    "cu_num_logits",
    "pos",
    "idx_mapping",
    "expanded_idx_mapping",
    "expanded_local_pos",
    "temperature",
    "seed",
    "num_speculative_steps",
)

logger = get_logger()


def check_hooks() -> str | None:
    """None when MRV2's ``rejection_sample`` is where and what we expect, else why not."""
    return check_module(MODULE, ("RejectionSampler",), "rejection_sample", EXPECTED_PARAMETERS)


def install() -> None:
    """Wrap MRV2's ``RejectionSampler.__init__`` to report what runs (idempotent)."""
    sampler_cls = importlib.import_module(MODULE).RejectionSampler
    if getattr(sampler_cls.__init__, "_ears_wrapped", False):
        return
    original_init = sampler_cls.__init__

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        from vllm.config import get_current_vllm_config_or_none

        config = resolve_config(getattr(get_current_vllm_config_or_none(), "additional_config", None))
        if config.policy != "standard":
            logger.warning(
                "ears-vllm: policy=%s tolerance=%g requested, but on Model Runner V2 the ears-vllm kernel is "
                "not available yet: vLLM's standard rejection sampling runs. Set VLLM_USE_V2_MODEL_RUNNER=0 "
                "to verify with ears-vllm through the V1 runner.",
                config.policy,
                config.tolerance,
            )
        else:
            logger.info("ears-vllm: policy=standard runner=MRV2 verification=vLLM's own")

    __init__._ears_wrapped = True  # type: ignore[attr-defined]
    sampler_cls.__init__ = __init__
