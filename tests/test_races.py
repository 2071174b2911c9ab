"""ERSD, exponential races on shared keys: lossless, drafter-invariant, accepted at the closed-form rate."""

from __future__ import annotations

import pytest
import torch

from ears_vllm import EarsConfig, verify
from ears_vllm.policies import position_form, position_form_one_hot, race_agreement, race_winners

ERSD = EarsConfig(policy="ersd")


def drafts_by_race(draft_logits: torch.Tensor, seed: torch.Tensor, first_pos: torch.Tensor) -> torch.Tensor:
    """A drafter that samples each draft by its own race on the same keys ([batch, k, V] -> [batch * k])."""
    batch, k, _ = draft_logits.shape
    positions = first_pos[:, None] + torch.arange(k)[None, :]
    seeds = seed[:, None].expand(batch, k)
    return race_winners(draft_logits.reshape(batch * k, -1), seeds.reshape(-1), positions.reshape(-1))


def verify_ersd(
    target: torch.Tensor,  # [batch, k + 1, V]: each request's draft rows, then its bonus row
    drafts: torch.Tensor,  # [batch * k]
    seed: torch.Tensor,  # [batch]
    first_pos: torch.Tensor,  # [batch]
    draft_probs: torch.Tensor | None = None,  # [batch * k, V]
) -> list[list[int]]:  # the tokens each request emits
    batch, rows, vocab = target.shape
    k = rows - 1
    bonus = race_winners(target[:, k], seed, first_pos + k)
    result = verify(target[:, :k].reshape(-1, vocab), drafts, [k] * batch, bonus, draft_probs=draft_probs,
                    race_keys=torch.stack([seed, first_pos], 1), config=ERSD)  # fmt: skip
    return [row[: n + 1] for row, n in zip(result.token_ids.tolist(), result.num_accepted.tolist(), strict=True)]


def test_a_race_winner_is_an_exact_sample_of_p():
    from scipy.stats import chisquare

    logits = torch.tensor([1.0, 0.0, -1.0, 0.5, -2.0])
    n = 20_000
    winners = race_winners(logits.expand(n, -1), torch.arange(n), torch.zeros(n, dtype=torch.long))
    observed = torch.bincount(winners, minlength=5).double()
    assert chisquare(observed.numpy(), (logits.softmax(-1).double() * n).numpy()).pvalue > 1e-3


TARGET = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.03, 0.01, 0.0])  # last token masked (p = 0)
DRAFT = torch.tensor([0.10, 0.30, 0.05, 0.25, 0.05, 0.10, 0.10, 0.05])


@pytest.mark.parametrize("drafter", ["race-full-q", "race-one-hot", "independent-one-hot"])
def test_the_emitted_distribution_is_the_target(drafter):
    """One draft per request, 40 000 requests with their own keys: the first emitted token follows p whether
    the drafter races on the same keys (q given to the verifier or not) or draws its drafts independently."""
    from scipy.stats import chisquare

    n = 40_000
    seed, first_pos = torch.arange(n) * 7919, torch.full((n,), 11)
    target = torch.stack([TARGET.log(), TARGET.log()]).expand(n, -1, -1)  # the draft row and the bonus row
    if drafter == "independent-one-hot":
        drafts = torch.multinomial(DRAFT, n, replacement=True, generator=torch.Generator().manual_seed(0))
    else:
        drafts = drafts_by_race(DRAFT.log().expand(n, 1, -1), seed, first_pos)
    draft_probs = DRAFT.expand(n, -1).contiguous() if drafter == "race-full-q" else None
    first = torch.tensor([tokens[0] for tokens in verify_ersd(target, drafts, seed, first_pos, draft_probs)])
    observed = torch.bincount(first, minlength=8).double()
    assert observed[7] == 0, "a masked token (p = 0) was emitted"
    assert chisquare(observed[:7].numpy(), (TARGET[:7].double() * n).numpy()).pvalue > 1e-3


def test_the_emitted_text_does_not_depend_on_the_drafter():
    """Two different drafters give the same tokens: the target's race winners, position by position, which is
    what a non-speculative race sampler on the same keys emits."""
    torch.manual_seed(0)
    batch, k, vocab = 6, 4, 32
    target = torch.randn(batch, k + 1, vocab) * 2
    seed, first_pos = torch.arange(100, 100 + batch), torch.randint(0, 500, (batch,))
    close, far = target[:, :k] + torch.randn(batch, k, vocab), torch.randn(batch, k, vocab) * 3
    emitted = [verify_ersd(target, drafts_by_race(d, seed, first_pos), seed, first_pos) for d in (close, far)]
    assert [len(t) for t in emitted[0]] != [len(t) for t in emitted[1]]  # the drafters differ in acceptance...
    non_speculative = [race_winners(target[r], seed[r].expand(k + 1), first_pos[r] + torch.arange(k + 1)).tolist()
                       for r in range(batch)]  # fmt: skip
    for tokens in emitted:  # ...but every emitted token is the target's own winner at its position
        assert all(t == non_speculative[r][: len(t)] for r, t in enumerate(tokens))


def test_greedy_rows_are_verified_by_argmax_match():
    target = torch.tensor([[[0.0, 3.0, 1.0], [2.0, 0.0, 0.0], [0.0, 0.0, 5.0]]])  # k = 2, then the bonus row
    result = verify(target[0, :2], torch.tensor([1, 2]), [2], torch.tensor([2]), is_greedy=torch.tensor([True]),
                    race_keys=torch.tensor([[5, 9]]), config=ERSD)  # fmt: skip
    assert result.token_ids.tolist() == [[1, 0, -1]]  # draft 1 is the argmax; 2 is not, the argmax 0 replaces it
    assert result.num_relaxed.tolist() == [0]


def test_ersd_needs_race_keys():
    with pytest.raises(ValueError, match="policy 'ersd' needs race_keys"):
        verify(torch.zeros(1, 4), torch.tensor([0]), [1], torch.tensor([0]), config=ERSD)


def test_drafts_are_accepted_at_the_closed_form_rate():
    torch.manual_seed(1)
    vocab, n = 8, 20_000
    target, draft = torch.randn(vocab), torch.randn(vocab)
    seed, pos = torch.arange(n), torch.full((n,), 7)
    agree = (race_winners(target.expand(n, -1), seed, pos) == race_winners(draft.expand(n, -1), seed, pos)).double()
    expected = float(race_agreement(target.softmax(-1)[None], draft.softmax(-1)[None]))
    assert float(agree.mean()) == pytest.approx(expected, abs=4 * (expected * (1 - expected) / n) ** 0.5)


def test_the_registry_closed_form_is_the_race_agreement_and_adds_no_deviation():
    torch.manual_seed(2)
    p, q = torch.randn(5, 16).softmax(-1), torch.randn(5, 16).softmax(-1)
    form = position_form(p, q, "ersd")
    assert torch.allclose(form.accept, race_agreement(p, q))
    assert form.relaxed.abs().max() == 0 and form.added_tv.abs().max() == 0
    # A one-hot drafter's draft d is the target's winner with probability p(d): the standard rule's rate.
    draft_ids = torch.tensor([0, 3, 7, 15, 2])
    one_hot = position_form_one_hot(p, draft_ids, "ersd")
    assert torch.allclose(one_hot.accept, p.double().gather(-1, draft_ids[:, None]).squeeze(-1))
    assert one_hot.added_tv.abs().max() == 0


def test_the_compiled_cpu_race_equals_the_eager_definition():
    """Large CPU batches run the definition compiled into one loop; one graph for every row count, 1 included."""
    from ears_vllm.policies import races

    assert races.compiled_race_winners() is not None, "torch.compile works on this machine (CI's too)"
    generator = torch.Generator().manual_seed(5)
    for rows in (1, 7):
        logits = torch.randn(rows, races.COMPILE_FROM + 123, generator=generator) * 4
        logits[:, :100] = float("-inf")  # masked tokens
        seed, pos = torch.randint(0, 2**62, (rows,), generator=generator), torch.randint(0, 9000, (rows,))
        assert torch.equal(races.race_winners(logits, seed, pos), races._race_winners(logits, seed, pos))
