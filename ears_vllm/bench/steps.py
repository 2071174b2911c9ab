"""Random verification steps shaped as each verifier takes them, for the tests and ``gpu-check``.

Built on the CPU from a seed (so every device sees the same step), then moved to ``device``.
"""

from __future__ import annotations

import torch


def _to(step: dict, device: str | torch.device) -> dict:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in step.items()}


def verify_batch(
    num_draft_tokens: list[int],
    vocab: int,
    *,
    seed: int,
    full_draft: bool,
    masked_fraction: float = 0.0,
    sharpness: float = 3.0,
    device: str | torch.device = "cpu",
) -> dict:
    """The arguments of :func:`ears_vllm.verify`: random target logits (some entries masked to -inf), drafts
    drawn from a nearby distribution, and the randoms."""
    g = torch.Generator().manual_seed(seed)
    num_tokens, batch = sum(num_draft_tokens), len(num_draft_tokens)
    logits = torch.randn(num_tokens, vocab, generator=g) * sharpness
    if masked_fraction:
        mask = torch.rand(num_tokens, vocab, generator=g) < masked_fraction
        mask[:, 0] = False  # keep every row normalisable
        logits[mask] = float("-inf")
    draft_logits = logits.nan_to_num(neginf=-30.0) + torch.randn(num_tokens, vocab, generator=g)
    draft_probs = draft_logits.softmax(-1)
    draft_ids = torch.multinomial(draft_probs, 1, generator=g).squeeze(-1)
    return _to(
        dict(
            target_logits=logits,
            draft_token_ids=draft_ids,
            num_draft_tokens=num_draft_tokens,
            bonus_token_ids=torch.randint(0, vocab, (batch,), generator=g),
            draft_probs=draft_probs if full_draft else None,
            uniform=torch.rand(num_tokens, dtype=torch.float64, generator=g),
            recovery_noise=torch.empty(batch, vocab).exponential_(generator=g),
        ),
        device,
    )


def mrv2_batch(
    seed: int,
    *,
    num_drafts: list[int],
    greedy: list[bool],
    k: int,
    vocab: int,
    full_draft: bool,
    placeholder: bool = False,
    sharded: bool = False,
    device: str | torch.device = "cpu",
) -> dict:
    """The arguments of MRV2's ``rejection_sample`` for one step, by :func:`ears_vllm.seam.vllm_mrv2.verify_mrv2`'s
    names (``vllm_mrv2.vllm_arguments`` gives them as the installed release takes them): ``num_drafts[r]`` drafts
    (<= k) for request r, drawn near the target; ``placeholder`` puts MRV2's ``-1`` draft at the end of each
    request of 2+ drafts; ``sharded`` holds the draft logits as a batch-sharded cache of vLLM 0.34 does, one row
    per request of the batch in shuffled order (``draft_logits_row_mapping``: a request state's row, -1 for the
    states this rank does not hold)."""
    g = torch.Generator().manual_seed(seed)
    num_reqs, max_num_reqs = len(num_drafts), len(num_drafts) + 2
    rows = torch.tensor(num_drafts) + 1
    cu_num_logits = torch.cat([torch.zeros(1, dtype=torch.int64), rows.cumsum(0)]).to(torch.int32)
    num_logits = int(rows.sum())
    idx_mapping = torch.randperm(max_num_reqs, generator=g)[:num_reqs].to(torch.int32)
    expanded_idx_mapping = idx_mapping.repeat_interleave(rows)
    expanded_local_pos = torch.cat([torch.arange(n) for n in rows.tolist()]).to(torch.int32)
    temperature = torch.rand(max_num_reqs, generator=g) * 0.6 + 0.6
    temperature[idx_mapping[torch.tensor(greedy)].long()] = 0.0

    base = torch.randn(num_logits, vocab, generator=g) * 3
    target_logits = base + torch.randn(num_logits, vocab, generator=g)
    draft_logits = torch.randn(max_num_reqs, k, vocab, generator=g)
    draft_sampled = torch.randint(0, vocab, (num_logits,), generator=g)
    for r in range(num_reqs):
        state, start = int(idx_mapping[r]), int(cu_num_logits[r])
        for i in range(num_drafts[r]):
            draft_logits[state, i] = base[start + i] + torch.randn(vocab, generator=g)
            q = (draft_logits[state, i] / max(float(temperature[state]), 0.5)).softmax(-1)
            draft_sampled[start + i + 1] = torch.multinomial(q, 1, generator=g)
        if placeholder and num_drafts[r] > 1:
            draft_sampled[start + num_drafts[r]] = -1  # MRV2's placeholder draft: always rejected
    row_mapping = None
    if sharded:
        rows_of_batch = torch.randperm(num_reqs, generator=g).to(torch.int32)
        row_mapping = torch.full((max_num_reqs,), -1, dtype=torch.int32)
        row_mapping[idx_mapping.long()] = rows_of_batch
        draft_logits = draft_logits[idx_mapping.long()][torch.argsort(rows_of_batch)].contiguous()
    pos = (torch.randint(0, 500, (max_num_reqs,), generator=g)[expanded_idx_mapping.long()] + expanded_local_pos).long()
    return _to(
        dict(
            target_logits=target_logits,
            draft_logits=draft_logits if full_draft else None,
            draft_logits_row_mapping=row_mapping if full_draft else None,
            draft_sampled=draft_sampled,
            cu_num_logits=cu_num_logits,
            pos=pos,
            idx_mapping=idx_mapping,
            expanded_idx_mapping=expanded_idx_mapping,
            expanded_local_pos=expanded_local_pos,
            temperature=temperature,
            seed=torch.randint(0, 2**31, (max_num_reqs,), generator=g),
            num_speculative_steps=k,
        ),
        device,
    )
