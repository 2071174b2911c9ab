"""The Jensen-Shannon distance between the target's and the drafter's distributions (AdaSD's statistic).

Below both :mod:`ears_vllm.policies.rules` (a step's ``js``) and :mod:`ears_vllm.policies.adasd` (its thresholds),
which read it; docs/adasd.md defines the terms.
"""

from __future__ import annotations

import torch


def js_distance(
    target_probs: torch.Tensor,  # [n, V] float32, p
    draft_ids: torch.Tensor,  # [n] int64 (negative: padding, distance 1)
    draft_probs: torch.Tensor | None,  # [n, V] q, or None for one-hot drafts
) -> torch.Tensor:  # [n] float32
    """``JS(p, q)`` per position: ``sqrt(0.5 KL(p || m) + 0.5 KL(q || m))`` in bits, ``m = (p + q) / 2``.

    One-hot q at d, with ``p_d = p(d)``: ``KL(p || m) = (1 - p_d) + p_d log2(2 p_d / (1 + p_d))`` and
    ``KL(q || m) = log2(2 / (1 + p_d))``, so no pass over the vocabulary is needed."""
    if draft_probs is None:
        p_d = target_probs.gather(-1, draft_ids.clamp_min(0).unsqueeze(-1)).squeeze(-1).double()
        p_d = torch.where(draft_ids >= 0, p_d, 0.0)
        kl_p = (1 - p_d) + torch.where(p_d > 0, p_d * torch.log2(2 * p_d / (1 + p_d)), 0.0)
        kl_q = torch.log2(2 / (1 + p_d))
        divergence = 0.5 * (kl_p + kl_q)
    else:
        p, q = target_probs.double(), draft_probs.double()
        m = (p + q) / 2
        terms = torch.where(p > 0, p * torch.log2(p / m), 0.0) + torch.where(q > 0, q * torch.log2(q / m), 0.0)
        divergence = 0.5 * terms.sum(dim=-1)
    return divergence.clamp(0.0, 1.0).sqrt().to(torch.float32)
