"""Speculative sampling by exponential races on shared keys (ERSD, issue 18): the verifier's arithmetic, in
PyTorch. Groundwork: not a policy of the registry yet (no runner calls it; the drafter side is not built).

Terms: every (request seed, position, token x) has a key ``u_x`` (:func:`ears_vllm.keys.murmur3_uniform32`) and
so an Exp(1) variable ``E_x = -log(1 - u_x)``, the one MRV2's Gumbel noise ``-log(E_x)`` is made of (its fp32
path evaluates ``log(1 - u)`` by a degree-8 series below 0.25: matching MRV2's drafter bit for bit will need that
series too). A distribution's *race winner* at a position is ``argmin_x E_x / p_x``,
an exact sample of p (the exponential race, i.e. the Gumbel-max trick with ``G_x = -log E_x``). A drafter that
samples its draft by the race of q on the same keys, and a verifier that accepts the drafts while they equal the
target's winners and emits the target's winner at the first mismatch (and at the bonus position), emit exactly
the target's race winners: every token is an exact sample of p (lossless), and the text depends only on the
keys and the target, not on the drafter. A draft is accepted with probability
:func:`ears_vllm.policies.closed_form.race_agreement`.
"""

from __future__ import annotations

import torch

from ears_vllm.keys import murmur3_uniform32


def race_winners(
    logits: torch.Tensor,  # [n, V] after temperature; masked entries -inf
    seed: torch.Tensor,  # [n] int64: each row's request seed
    pos: torch.Tensor,  # [n] int64: each row's position (the key's counter)
) -> torch.Tensor:  # [n] int64
    """``argmin_x E_x / p_x`` per row, computed as ``argmax_x log p_x - log E_x`` (the same winner)."""
    tokens = torch.arange(logits.shape[-1], device=logits.device)
    keys = murmur3_uniform32(seed[:, None], pos[:, None], tokens[None, :])
    exponential = -torch.log1p(-keys.double())
    return (logits.double().log_softmax(-1) - exponential.log()).argmax(-1)


def verify_races(
    target_logits: torch.Tensor,  # [num_tokens + batch, V]: each request's draft rows, then its bonus row
    draft_token_ids: torch.Tensor,  # [num_tokens] int
    num_draft_tokens: list[int],  # [batch]
    seed: torch.Tensor,  # [batch] int64
    first_pos: torch.Tensor,  # [batch] int64: the position of each request's first draft
) -> tuple[torch.Tensor, torch.Tensor]:  # token_ids [batch, max k + 1] (-1 padded), num_accepted [batch]
    """Accept each request's drafts while they equal the target's race winners; then emit the winner of the first
    mismatching position, or of the bonus position when every draft matched."""
    batch, longest = len(num_draft_tokens), max(num_draft_tokens, default=0)
    token_ids = torch.full((batch, longest + 1), -1, dtype=torch.long)
    num_accepted = torch.zeros(batch, dtype=torch.long)
    row = 0
    for r, k in enumerate(num_draft_tokens):
        rows = target_logits[row + r : row + r + k + 1]  # the request's draft rows and its bonus row
        positions = first_pos[r] + torch.arange(k + 1)
        winners = race_winners(rows, seed[r].expand(k + 1), positions)
        matches = (draft_token_ids[row : row + k].long() == winners[:k]).long().cumprod(0)
        accepted = int(matches.sum())
        token_ids[r, : accepted + 1] = winners[: accepted + 1]
        num_accepted[r] = accepted
        row += k
    return token_ids, num_accepted
