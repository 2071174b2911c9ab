"""Acceptance policies: the registry (one entry per policy), their PyTorch rules and their closed forms."""

from ears_vllm.policies.closed_form import (
    PositionForm,
    expected_acceptance,
    expected_acceptance_one_hot,
    fly_chain,
    fly_position_probabilities,
    position_form,
    position_form_one_hot,
)
from ears_vllm.policies.races import race_agreement, race_token_agreement, race_winners
from ears_vllm.policies.registry import PARAMS, POLICIES, Param, PolicySpec, fly_window, get_policy, settings_for
from ears_vllm.policies.rules import (
    DraftPositions,
    ears_accept,
    ears_relaxed_threshold,
    entropy,
    fly_entropy,
    rank_among_logits,
    relaxed_topk_candidate,
    sglang_accept,
    standard_accept,
    typical_accept,
)

__all__ = [
    "PARAMS",
    "POLICIES",
    "DraftPositions",
    "Param",
    "PolicySpec",
    "PositionForm",
    "ears_accept",
    "ears_relaxed_threshold",
    "entropy",
    "expected_acceptance",
    "expected_acceptance_one_hot",
    "fly_chain",
    "fly_entropy",
    "fly_position_probabilities",
    "fly_window",
    "get_policy",
    "position_form",
    "position_form_one_hot",
    "race_agreement",
    "race_token_agreement",
    "race_winners",
    "rank_among_logits",
    "relaxed_topk_candidate",
    "settings_for",
    "sglang_accept",
    "standard_accept",
    "typical_accept",
]
