"""Verifying a batch whose requests carry their own settings: each request with its own config and budget
ledger, on the randoms drawn for the whole batch (one :func:`ears_vllm.verify` per policy in the batch, on that
policy's rows). No vLLM structure is read here; the V1 adapter (:mod:`ears_vllm.seam.vllm_v1`) draws the randoms
as vLLM does and calls :func:`verify_rows`."""

from __future__ import annotations

import torch

from ears_vllm.control.budget import share_slack
from ears_vllm.control.requests import RequestControl
from ears_vllm.policies import get_policy
from ears_vllm.policies.adasd import learn_from_step
from ears_vllm.reference import VerifyResult
from ears_vllm.verify import verify


def verify_rows(
    controls: list[RequestControl],  # one per request
    target_logits: torch.Tensor,  # [num_tokens, V]
    draft_token_ids: torch.Tensor,  # [num_tokens]
    num_draft_tokens: list[int],  # [batch]
    bonus_token_ids: torch.Tensor,  # [batch]
    draft_probs: torch.Tensor | None,  # [num_tokens, V] or None
    is_greedy: torch.Tensor,  # [batch] bool
    uniform: torch.Tensor,  # [num_tokens] float64, drawn for the whole batch
    noise: torch.Tensor,  # [batch, V] Exp(1), drawn for the whole batch
    max_spec_len: int,
    race_keys: torch.Tensor | None = None,  # [batch, 2] int64: key seed, first draft position (ERSD)
) -> VerifyResult:
    """Verify each request with its own config and budget ledger, on the randoms vLLM drew for the batch: one
    :func:`ears_vllm.verify` per policy in the batch, on that policy's rows."""
    device = target_logits.device
    tolerance = torch.tensor([c.tolerance for c in controls], dtype=torch.float64, device=device)
    budget = torch.tensor([c.budget for c in controls], dtype=torch.float64, device=device)
    slack = torch.tensor([c.ledger.slack if c.ledger else 0.0 for c in controls], dtype=torch.float64, device=device)
    pool = next((c.ledger for c in controls if c.ledger is not None and c.ledger.shared), None)
    if pool is not None:  # the server's pool, dealt out to the rows that share it
        pooled = torch.tensor([c.ledger is pool for c in controls], device=device)
        slack = torch.where(pooled, share_slack(slack.new_tensor(pool.slack), pooled, pool.steps), slack)
        pool.steps += 1
    policies = [c.config.policy for c in controls]
    counts = torch.as_tensor(num_draft_tokens, device=device)
    results = []
    for policy in dict.fromkeys(policies):
        rows = torch.tensor([p == policy for p in policies], device=device)
        tokens = rows.repeat_interleave(counts, output_size=draft_token_ids.shape[0])
        config = controls[policies.index(policy)].config
        group = dict(
            target_logits=target_logits[tokens],
            draft_token_ids=draft_token_ids[tokens],
            draft_probs=None if draft_probs is None else draft_probs[tokens],
            uniform=uniform[tokens],
        )
        result = verify(
            **group,
            num_draft_tokens=counts[rows],
            bonus_token_ids=bonus_token_ids[rows],
            is_greedy=is_greedy[rows],
            recovery_noise=noise[rows],
            tolerance=tolerance[rows],
            budget=budget[rows],
            budget_slack=slack[rows],
            race_keys=None if race_keys is None else race_keys[rows],
            config=config,
            max_spec_len=max_spec_len,
        )
        if get_policy(policy).learnt:  # its requests learn from what was just verified
            mine = [i for i, p in enumerate(policies) if p == policy]
            learn_from_step(
                [controls[i].adasd for i in mine],
                **group,
                num_draft_tokens=[num_draft_tokens[i] for i in mine],
                num_accepted=result.num_accepted,
            )
        results.append((rows, result))
    if len(results) == 1:
        return results[0][1]
    merged = VerifyResult(
        *(torch.empty((len(controls), *t.shape[1:]), dtype=t.dtype, device=device) for t in results[0][1])
    )
    for rows, result in results:
        for out, part in zip(merged, result, strict=True):
            out[rows] = part
    return merged
