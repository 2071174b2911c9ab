"""AdaSD's two learnt thresholds (our formulation of arXiv 2512.11280, docs/adasd.md).

Terms:
    JS distance      ``JS(p, q)``: the square root of the Jensen-Shannon divergence in bits, in [0, 1]; with a
                     one-hot draft (q the point mass at d) it depends on ``p(d)`` alone.
    natively         decided by the standard test with the position's own u (vLLM's rule).
    verified         a draft position the target decided on: each accepted draft and the first rejected one.
    threshold        the midpoint of two running means, of the values seen at positions that went one way
                     (accepted) and at those that went the other (rejected). A value at or below it looks like
                     an accepted position. It exists once both sides have a value and the accepted mean is
                     below the rejected one (the statistic separates them); until then there is none.

Acceptance: a natively rejected draft with ``p(d) > 0`` is accepted when ``JS(p, q) <= tau_acc``, the threshold
of the JS distances at natively accepted and natively rejected verified positions. Draft length: a request stops
drafting at the first draft whose entropy ``H(q)`` exceeds ``tau_len``, the threshold of the draft entropies of
accepted and rejected verified drafts. Both are held per request (a seeded request's text does not depend on the
traffic) as exact sums and counts: no decay constant, no hyperparameter.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ears_vllm.policies.divergence import js_distance
from ears_vllm.policies.rules import standard_accept

NO_RELAXATION = 0.0  # tau_acc before it exists: the rule relaxes only under a positive threshold


def draft_entropy(
    draft_logits: torch.Tensor,  # [n, V] the drafter's logits, after the request's temperature
) -> torch.Tensor:  # [n] float32, nats
    """``H(q)`` of the drafter's distribution at each row."""
    log_q = draft_logits.float().log_softmax(dim=-1)
    return -(log_q.exp() * torch.where(log_q > float("-inf"), log_q, 0.0)).sum(dim=-1)


@dataclasses.dataclass
class LearntThreshold:
    """The midpoint of the running means of a statistic at positions that went each way (exact sums)."""

    accepted_sum: float = 0.0
    accepted_count: int = 0
    rejected_sum: float = 0.0
    rejected_count: int = 0

    def record(self, value: float, accepted: bool) -> None:
        if accepted:
            self.accepted_sum += value
            self.accepted_count += 1
        else:
            self.rejected_sum += value
            self.rejected_count += 1

    @property
    def value(self) -> float | None:
        """The threshold, or None before both sides are seen or while they do not separate."""
        if not (self.accepted_count and self.rejected_count):
            return None
        accepted = self.accepted_sum / self.accepted_count
        rejected = self.rejected_sum / self.rejected_count
        return (accepted + rejected) / 2 if accepted < rejected else None


@dataclasses.dataclass
class AdasdState:
    """One request's AdaSD state: its two thresholds, and the entropies of the drafts it proposed last step."""

    acceptance: LearntThreshold = dataclasses.field(default_factory=LearntThreshold)  # of JS distances
    length: LearntThreshold = dataclasses.field(default_factory=LearntThreshold)  # of draft entropies
    proposed_entropies: list[float] = dataclasses.field(default_factory=list)

    @property
    def tau_acc(self) -> float:
        """The JS threshold the verifier relaxes up to (``NO_RELAXATION`` before it exists)."""
        value = self.acceptance.value
        return NO_RELAXATION if value is None else value

    @property
    def tau_len(self) -> float:
        """The draft-entropy threshold past which the request stops drafting (inf: draft all k)."""
        value = self.length.value
        return math.inf if value is None else value

    def record_step(
        self,
        js: list[float],  # the request's JS distance at each of its draft positions this step
        native: list[bool],  # the native decision at each
        num_accepted: int,  # the drafts the verifier accepted
    ) -> None:
        """Learn from this step's verified positions: the accepted prefix and the first rejected draft."""
        verified = min(num_accepted + 1, len(js))
        for j in range(verified):
            self.acceptance.record(js[j], native[j] and j < num_accepted)
        entropies = self.proposed_entropies[: len(js)]
        for j in range(min(verified, len(entropies))):
            self.length.record(entropies[j], j < num_accepted)
        self.proposed_entropies = []


def learn_from_step(
    states: list[AdasdState | None],  # one per request (None: not learning, e.g. greedy)
    target_logits: torch.Tensor,  # [num_tokens, V] as verified
    draft_token_ids: torch.Tensor,  # [num_tokens]
    draft_probs: torch.Tensor | None,  # [num_tokens, V] or None
    uniform: torch.Tensor,  # [num_tokens] float64
    num_draft_tokens: list[int],  # [batch]
    num_accepted: torch.Tensor,  # [batch] as the verifier decided
) -> None:
    """Each learning request records its verified positions of the step (one host synchronisation)."""
    if not any(states):
        return
    probs = target_logits.softmax(dim=-1, dtype=torch.float32)
    ids = draft_token_ids.long()
    p_d = probs.gather(-1, ids.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    q_d = torch.ones_like(p_d) if draft_probs is None else draft_probs.gather(-1, ids.clamp_min(0).unsqueeze(-1))
    native = standard_accept(p_d, q_d.reshape(-1).float(), uniform) & (ids >= 0)
    js, native, accepted = js_distance(probs, ids, draft_probs).tolist(), native.tolist(), num_accepted.tolist()
    start = 0
    for state, count, num in zip(states, num_draft_tokens, accepted, strict=True):
        if state is not None:
            state.record_step(js[start : start + count], native[start : start + count], num)
        start += count
