"""The PyTorch verification step: the oracle every kernel is tested against, and the CPU path.

Terms follow vLLM's ``RejectionSampler``:
    accepted tokens   draft tokens the acceptance rule keeps, a prefix of each request's drafts;
    recovered token   emitted at the first rejected position, sampled from ``norm(max(0, p - q))``
                      (the policy's ``recovery`` says otherwise for typical, sglang and ersd; the target argmax
                      for greedy requests);
    bonus token       emitted after the last draft when every draft is accepted (sampled by the caller; for
                      ERSD, the race winner at the bonus position, :func:`ears_vllm.policies.race_winners`);
    relaxed tokens    accepted tokens that vLLM's native test (the standard test with the same ``u``; argmax
                      match on greedy rows) would have rejected.

The step arrives validated (:class:`ears_vllm.step.VerifyStep`); the arithmetic mirrors vLLM V1's
kernels (float32 probabilities, float64 uniforms, ``argmax(prob * noise.reciprocal())``) so that the
lossless settings reproduce vLLM bit for bit.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ears_vllm.policies import DraftPositions, race_winners
from ears_vllm.step import VerifyStep, budget_fits, request_rows

PLACEHOLDER_TOKEN_ID = -1


class VerifyResult(NamedTuple):
    """Output of one verification step.

    token_ids: ``[batch, max_spec_len + 1]`` int32 — accepted drafts, then one recovered or bonus
        token, then ``-1`` padding (vLLM's layout).
    num_accepted: ``[batch]`` int32 — accepted draft tokens per request (emitted = accepted + 1).
    num_relaxed: ``[batch]`` int32 — accepted drafts the standard test would have rejected.
    relaxed_surprisal: ``[batch]`` float32 — the target's ``-log p(d)`` of those relaxed drafts, summed (nats; 0 on
        greedy requests): the deviation axis that sees plausibility (docs/frontier-rule.md).
    """

    token_ids: torch.Tensor
    num_accepted: torch.Tensor
    num_relaxed: torch.Tensor
    relaxed_surprisal: torch.Tensor


def verify_reference(step: VerifyStep) -> VerifyResult:
    """The step verified in PyTorch: the policy's rule (``PolicySpec.rule``) at every draft position, argmax match on
    greedy rows (unless the policy's source relaxes them), the budget cap, the accepted prefix, then the bonus or the
    recovered token."""
    batch_size, num_tokens = step.batch_size, step.num_tokens
    device = step.target_logits.device
    num_draft_tokens = step.num_draft_tokens  # [batch] int64
    req_of_token, position = step.rows  # [num_tokens] int64 each

    target_probs = step.target_logits.softmax(dim=-1, dtype=torch.float32)  # [num_tokens, V]
    draft_ids = step.draft_token_ids.long()  # [num_tokens]
    safe_ids = draft_ids.clamp_min(0).unsqueeze(-1)
    if step.draft_probs is None:
        draft_prob = torch.ones(num_tokens, dtype=torch.float32, device=device)
    else:
        draft_prob = step.draft_probs.gather(-1, safe_ids).squeeze(-1).to(torch.float32)
    token_greedy = step.is_greedy[req_of_token]  # [num_tokens] bool
    spec = step.policy
    race_winner = (
        race_winners(step.target_logits, *race_key_rows(step.race_keys, num_draft_tokens)) if spec.keyed else None
    )
    positions = DraftPositions(
        step.target_logits,
        target_probs,
        draft_ids,
        draft_prob,
        step.uniform,
        step.tolerance[req_of_token],
        token_greedy,
        num_draft_tokens,
        req_of_token,
        step.draft_probs,
        race_winner,
    )

    accept = spec.rule(positions, step.settings)
    # Greedy requests: argmax match on the logits (vLLM does not apply temperature to greedy rows), unless the
    # policy's source applies its rule there too.
    if not spec.greedy_rows:
        accept = torch.where(token_greedy, positions.native, accept)
    accept = accept & positions.is_valid
    # ERSD's acceptances are all exact (it accepts some that the standard test with the same u rejects).
    relaxed = accept & ~positions.native & (not spec.keyed)
    start = step.offsets[:-1]  # [batch]
    if step.budget is not None:
        # A relaxed acceptance must fit in the request's slack plus B per position verified so far in the step.
        relaxed_through = torch.cumsum(relaxed.long(), 0)
        relaxed_before_request = torch.cat([relaxed_through.new_zeros(1), relaxed_through])[start][req_of_token]
        relaxed_before = relaxed_through - relaxed.long() - relaxed_before_request
        fits = budget_fits(
            relaxed_before,
            step.budget.slack[req_of_token],
            step.budget.rate[req_of_token],
            position + 1,
        )
        accept = accept & (positions.native | fits)
        relaxed = accept & ~positions.native

    # The accepted prefix of each request: positions before its first rejection.
    rejections = torch.cumsum((~accept).long(), 0)
    rejections_before_request = torch.cat([rejections.new_zeros(1), rejections])[start][req_of_token]
    in_prefix = (rejections - rejections_before_request) == 0
    num_accepted = torch.zeros(batch_size, dtype=torch.long, device=device)
    num_accepted.index_add_(0, req_of_token, in_prefix.long())
    num_relaxed = torch.zeros(batch_size, dtype=torch.long, device=device)
    num_relaxed.index_add_(0, req_of_token, (in_prefix & relaxed).long())
    counted = in_prefix & relaxed & ~token_greedy
    relaxed_surprisal = torch.zeros(batch_size, dtype=torch.float32, device=device)
    relaxed_surprisal.index_add_(0, req_of_token[counted], -positions.target_prob[counted].log())

    token_ids = torch.full((batch_size, step.max_spec_len + 1), PLACEHOLDER_TOKEN_ID, dtype=torch.int32, device=device)
    token_ids[req_of_token[in_prefix], position[in_prefix]] = draft_ids[in_prefix].to(torch.int32)
    # The last token: the bonus where every draft was accepted, else the token recovered at the first rejected
    # position, computed there only (one row per such request, not every position of the step).
    last_token = step.bonus_token_ids.long().clone()
    rejected = (num_accepted < num_draft_tokens).nonzero().squeeze(-1)  # [m] requests with a rejection
    rows = start[rejected] + num_accepted[rejected]  # [m] their first rejected position
    last_token[rejected] = _recovered_at(
        rows, rejected, positions, spec.recovery, target_probs, step.draft_probs, step.recovery_noise
    )
    token_ids[torch.arange(batch_size, device=device), num_accepted] = last_token.to(torch.int32)
    return VerifyResult(token_ids, num_accepted.to(torch.int32), num_relaxed.to(torch.int32), relaxed_surprisal)


def _recovered_at(
    rows: torch.Tensor,  # [m] int64: first rejected positions
    requests: torch.Tensor,  # [m] int64: their requests
    positions: DraftPositions,
    recovery: str,  # PolicySpec.recovery
    target_probs: torch.Tensor,  # [num_tokens, V] float32
    draft_probs: torch.Tensor | None,  # [num_tokens, V] or None
    recovery_noise: torch.Tensor,  # [batch, V]: Exp(1), one vector per request
) -> torch.Tensor:  # [m] int64
    """The token emitted at each of ``rows``: the target argmax on greedy rows (and for argmax recovery), the race
    winner (race recovery), else a sample of the residual with the request's noise, as vLLM V1 samples it."""
    greedy = positions.is_greedy[rows]
    if recovery == "argmax":
        return positions.argmax_at(rows)
    if recovery == "race":
        sampled = positions.race_winner[rows]
    else:
        residual_of = draft_probs if recovery == "residual" else None
        sampled = _sample_recovered(rows, requests, target_probs, residual_of, positions.draft_ids, recovery_noise)
    greedy_rows = greedy.nonzero().squeeze(-1)
    sampled[greedy_rows] = positions.argmax_at(rows[greedy_rows])
    return sampled


def race_key_rows(
    race_keys: torch.Tensor | None,  # [batch, 2] int64: key seed, position of the request's first draft
    num_draft_tokens: torch.Tensor,  # [batch] int64
) -> tuple[torch.Tensor, torch.Tensor]:  # ([num_tokens], [num_tokens]) int64: each draft row's seed and position
    """The key seed and position of every draft row (a request's drafts sit at consecutive positions)."""
    assert race_keys is not None, "a keyed policy needs race_keys (checked by ears_vllm.verify)"
    request, offset = request_rows(num_draft_tokens)
    return race_keys[request, 0], race_keys[request, 1] + offset


def _sample_recovered(
    rows: torch.Tensor,  # [m] int64: the positions to sample at
    requests: torch.Tensor,  # [m] int64: their requests
    target_probs: torch.Tensor,  # [num_tokens, V] float32
    draft_probs: torch.Tensor | None,  # [num_tokens, V] or None (one-hot q)
    draft_ids: torch.Tensor,  # [num_tokens] int64
    noise: torch.Tensor,  # [batch, V] Exp(1), one vector per request
) -> torch.Tensor:  # [m] int64
    """Exponential race over the residual: ``argmax(max(p - q, 0) / E)`` samples ``norm(max(p - q, 0))``.

    Row by row on views of the step's tensors (no gathered copies; ``1 / E`` taken on the rows used), each
    product element computed exactly as vLLM V1 computes it, ``residual * (1 / E)``, so the winner is vLLM's to
    the bit."""
    sampled = torch.empty_like(rows)
    chosen = zip(rows.tolist(), requests.tolist(), draft_ids[rows].tolist(), strict=True)
    for i, (row, request, draft) in enumerate(chosen):
        inv = noise[request].reciprocal()
        if draft_probs is None:
            # One-hot q: the residual is p with the draft token removed (padding -1 removes nothing).
            weighted = target_probs[row] * inv
            if draft >= 0:
                weighted[draft] = 0.0 * inv[draft]
        else:
            weighted = (target_probs[row] - draft_probs[row]).clamp_(min=0.0) * inv  # 1 / E may be float64
        sampled[i] = weighted.argmax()
    return sampled
