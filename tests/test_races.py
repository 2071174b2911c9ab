"""Exponential races on shared keys (ERSD groundwork): lossless, drafter-invariant, at the closed-form rate."""

from __future__ import annotations

import pytest
import torch

from ears_vllm.policies.closed_form import race_agreement
from ears_vllm.policies.races import race_winners, verify_races


def drafts_by_race(draft_logits: torch.Tensor, seed: torch.Tensor, first_pos: torch.Tensor) -> torch.Tensor:
    """A drafter that samples each draft by its own race on the same keys ([batch, k] -> [batch * k])."""
    batch, k, _ = draft_logits.shape
    positions = first_pos[:, None] + torch.arange(k)[None, :]
    seeds = seed[:, None].expand(batch, k)
    return race_winners(draft_logits.reshape(batch * k, -1), seeds.reshape(-1), positions.reshape(-1))


def test_a_race_winner_is_an_exact_sample_of_p():
    from scipy.stats import chisquare

    logits = torch.tensor([1.0, 0.0, -1.0, 0.5, -2.0])
    n = 20_000
    winners = race_winners(logits.expand(n, -1), torch.arange(n), torch.zeros(n, dtype=torch.long))
    observed = torch.bincount(winners, minlength=5).double()
    assert chisquare(observed.numpy(), (logits.softmax(-1).double() * n).numpy()).pvalue > 1e-3


def test_the_emitted_text_does_not_depend_on_the_drafter():
    """Two different drafters (and no drafter at all) give the same tokens: the target's race winners."""
    torch.manual_seed(0)
    batch, k, vocab = 6, 4, 32
    target = torch.randn(batch * (k + 1), vocab) * 2  # per request: k draft rows, then the bonus row
    seed, first_pos = torch.arange(100, 100 + batch), torch.randint(0, 500, (batch,))
    rows = target.reshape(batch, k + 1, vocab)
    emitted, accepted = [], []
    for draft_logits in (rows[:, :k] + torch.randn(batch, k, vocab), torch.randn(batch, k, vocab) * 3):
        drafts = drafts_by_race(draft_logits, seed, first_pos)
        token_ids, num_accepted = verify_races(target, drafts, [k] * batch, seed, first_pos)
        emitted.append([row[: n + 1].tolist() for row, n in zip(token_ids, num_accepted.tolist(), strict=True)])
        accepted.append(num_accepted.tolist())
    assert accepted[0] != accepted[1]  # the drafters differ in how much they get accepted...
    non_speculative = [race_winners(rows[r], seed[r].expand(k + 1), first_pos[r] + torch.arange(k + 1)).tolist()
                       for r in range(batch)]  # fmt: skip
    for tokens in emitted:  # ...but every emitted token is the target's own winner at its position
        assert all(t == non_speculative[r][: len(t)] for r, t in enumerate(tokens))


def test_drafts_are_accepted_at_the_closed_form_rate():
    torch.manual_seed(1)
    vocab, n = 8, 20_000
    target, draft = torch.randn(vocab), torch.randn(vocab)
    seed, pos = torch.arange(n), torch.full((n,), 7)
    agree = (race_winners(target.expand(n, -1), seed, pos) == race_winners(draft.expand(n, -1), seed, pos)).double()
    expected = float(race_agreement(target.softmax(-1)[None], draft.softmax(-1)[None]))
    assert float(agree.mean()) == pytest.approx(expected, abs=4 * (expected * (1 - expected) / n) ** 0.5)
