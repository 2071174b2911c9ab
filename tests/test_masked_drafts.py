"""No policy ever accepts a draft whose target probability is 0, whatever masked it.

vLLM masks the target with -inf logits (top-k, top-p, a grammar's allowed tokens, bad words) before verification, so
a draft outside the mask has p(d) = 0, and a user who asked for ``top_k=2`` must get none of it. Every policy of
the registry, at a loose setting, on sampled and on greedy rows, through the PyTorch reference and the fused Triton
kernel (under ``TRITON_INTERPRET=1``; small shapes, the interpreter is slow).

Each request drafts the token its policy accepts surely (the target argmax, with a uniform of 1e-6; ERSD's race
winner on sampled rows) at every position but one, where it drafts a masked token: so every request reaches its
masked draft, and its accepted count must be that draft's position exactly. The lossless rule accepts p(d) = 0 at
u = 0.0 exactly (vLLM's test ``p / q >= u``, kept bit for bit, a 2^-53 event): the uniforms here are never 0.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import triton
import triton.language as tl

from ears_vllm import EarsConfig, verify
from ears_vllm.policies import POLICIES, get_policy, race_winners
from ears_vllm.policies.closed_form import token_acceptance
from ears_vllm.reference import race_key_rows
from tests.triton_cpu import triton_interpreter

# A NaN or inf computed anywhere in a kernel (even one later masked away) fails the test.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

with triton_interpreter():  # the kernel module's jitted functions must be created under the interpreter
    importlib.import_module("ears_vllm.kernels.verify_kernel")
    split_stats_accept = importlib.import_module("ears_vllm.kernels.split_stats_accept")

    @triton.jit
    def relaxed_candidates_kernel(
        out_ptr, logits_ptr, stride, drafts_ptr, vocab_size, topk, delta, BLOCK: tl.constexpr
    ):
        """The MRV2 walk's relaxed_topk candidate test (``_relaxed_candidate``), one row per program."""
        row = tl.program_id(0)
        draft = tl.load(drafts_ptr + row).to(tl.int64)
        candidate = split_stats_accept._relaxed_candidate(
            logits_ptr, stride, row, draft, vocab_size, topk, delta, BLOCK
        )
        tl.store(out_ptr + row, candidate.to(tl.int8))


def walk_relaxed_candidates(
    logits: torch.Tensor,  # [n, V] float32
    drafts: torch.Tensor,  # [n] int
    topk: int,
    delta: float,
    block: int = 16,  # several blocks per row: the online max and sum-exp merge them
) -> torch.Tensor:  # [n] bool
    out = torch.empty(logits.shape[0], dtype=torch.int8)
    relaxed_candidates_kernel[(logits.shape[0],)](
        out_ptr=out,
        logits_ptr=logits,
        stride=logits.stride(0),
        drafts_ptr=drafts,
        vocab_size=logits.shape[1],
        topk=topk,
        delta=delta,
        BLOCK=block,
    )
    return out.bool()


VOCAB, K = 48, 4
MASKED_UNIFORMS = (1e-9, 0.3, 0.999, 0.6, 1e-3, 0.9)  # at each request's masked draft, one per request

LOOSE = {  # every policy of the registry, at a setting that relaxes as far as it goes
    "standard": EarsConfig(),
    "ears-tolerance1-rho0": EarsConfig(policy="ears", tolerance=1.0, min_ratio=0.0),
    "typical-eps0.01-delta0.01": EarsConfig(policy="typical", typical_eps=0.01, typical_delta=0.01),
    "fly-window1-gate-open": EarsConfig(policy="fly", fly_window_size=1, fly_entropy_threshold=0.0),
    "sglang-0.05-0.05": EarsConfig(policy="sglang", accept_threshold_single=0.05, accept_threshold_acc=0.05),
    "relaxed_topk-10-0.6": EarsConfig(policy="relaxed_topk", relaxed_topk=10, relaxed_delta=0.6),
    "relaxed_topk-64-1": EarsConfig(policy="relaxed_topk", relaxed_topk=64, relaxed_delta=1.0),
    "adasd-tau1": EarsConfig(policy="adasd"),  # a learnt JS threshold of 1 passes every distance
    "ersd": EarsConfig(policy="ersd"),
    "mars-theta0": EarsConfig(policy="mars", mars_threshold=0.0),  # every position with z1, z2 > 0 is low-margin
    "frontier-tolerance1-rho0-window1-scale10": EarsConfig(
        policy="frontier", tolerance=1.0, min_ratio=0.0, frontier_window=1, frontier_scale=10.0
    ),
}
MASKS = ("top-k-2", "top-p-0.5", "grammar-3-tokens", "bad-words-5")


def kept_tokens(mask: str, logits: torch.Tensor, g: torch.Generator) -> torch.Tensor:  # [n, V] bool
    """What the mask leaves of each row of ``logits`` [n, V], as vLLM's samplers and logits processors leave it."""
    n, vocab = logits.shape
    if mask == "top-k-2":
        return logits >= logits.topk(2, dim=-1).values[:, -1:]
    if mask == "top-p-0.5":  # vLLM: drop the tokens whose ascending cumulative probability is <= 1 - p, keep one
        ascending, order = logits.softmax(-1).sort(dim=-1)
        dropped = ascending.cumsum(-1) <= 0.5
        dropped[:, -1] = False
        return torch.zeros_like(dropped).scatter(1, order, ~dropped)
    if mask == "grammar-3-tokens":  # the tokens a grammar allows at this point
        allowed = torch.rand(n, vocab, generator=g).argsort(dim=-1)[:, :3]
        return torch.zeros(n, vocab, dtype=torch.bool).scatter(1, allowed, True)
    banned = torch.rand(n, vocab, generator=g).argsort(dim=-1)[:, :5]  # bad words
    return torch.ones(n, vocab, dtype=torch.bool).scatter(1, banned, False)


def masked_step(policy: str, mask: str, greedy: bool, full_draft: bool, seed: int = 0) -> tuple[dict, torch.Tensor]:
    """One verification step (``verify``'s arguments) of 6 requests of K drafts, and where each request drafts a
    masked token: position r % K for request r."""
    g = torch.Generator().manual_seed(seed)
    batch = len(MASKED_UNIFORMS)
    n = batch * K
    raw = torch.randn(n, VOCAB, generator=g)
    kept = kept_tokens(mask, raw, g)
    logits = raw.masked_fill(~kept, float("-inf"))
    masked_at = torch.arange(batch) % K
    row_is_masked = torch.arange(n) == torch.arange(batch).repeat_interleave(K) * K + masked_at.repeat_interleave(K)
    num_draft_tokens = torch.full((batch,), K)
    race_keys = torch.stack([torch.arange(batch) + 1, torch.arange(batch) * 100], dim=1)
    if get_policy(policy).keyed and not greedy:
        sure = race_winners(logits, *race_key_rows(race_keys, num_draft_tokens))
    else:
        sure = logits.argmax(dim=-1)
    a_masked_token = torch.where(kept, 2.0, torch.rand(n, VOCAB, generator=g)).argmin(dim=-1)
    draft_ids = torch.where(row_is_masked, a_masked_token, sure)
    uniform = torch.full((n,), 1e-6, dtype=torch.float64)
    uniform[row_is_masked] = torch.tensor(MASKED_UNIFORMS, dtype=torch.float64)
    draft_probs = torch.randn(n, VOCAB, generator=g).softmax(-1) if full_draft else None  # q > 0 everywhere
    return dict(
        target_logits=logits,
        draft_token_ids=draft_ids,
        num_draft_tokens=num_draft_tokens,
        bonus_token_ids=torch.zeros(batch, dtype=torch.long),
        draft_probs=draft_probs,
        is_greedy=torch.full((batch,), greedy),
        uniform=uniform,
        race_keys=race_keys,
        tolerance=torch.ones(batch, dtype=torch.float64) if policy == "adasd" else None,
    ), masked_at


def test_every_policy_of_the_registry_is_covered():
    assert {config.policy for config in LOOSE.values()} == set(POLICIES)


@pytest.mark.parametrize("config", LOOSE.values(), ids=LOOSE.keys())
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("rows", ["sampled", "greedy"])
@pytest.mark.parametrize("draft", ["one-hot", "full-draft"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_no_policy_accepts_or_emits_a_masked_token(config, mask, rows, draft, backend, monkeypatch):
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    step, masked_at = masked_step(config.policy, mask, rows == "greedy", draft == "full-draft")
    result = verify(**step, config=config, backend="torch" if backend == "reference" else "triton")
    accepted = result.num_accepted.long()
    # Every draft before the masked one is accepted (the masked draft was verified), and the masked one is not.
    assert torch.equal(accepted, masked_at), list(zip(masked_at.tolist(), accepted.tolist(), strict=True))
    # Nor does the token emitted in its place (recovered) fall outside the mask.
    emitted = result.token_ids[torch.arange(len(accepted)), accepted].long()
    rows_at = torch.arange(len(accepted)) * K + accepted
    assert (step["target_logits"][rows_at, emitted] > float("-inf")).all()


# The example: p = (0.5, 0.3, 0.2, 0, ...); the draft, token 6, is masked.
EXAMPLE = torch.tensor([0.5, 0.3, 0.2, 0.0, 0.0, 0.0, 0.0, 0.0])
CLOSED_FORMS = {name: config for name, config in LOOSE.items() if get_policy(config.policy).accept_probability}


@pytest.mark.parametrize("config", CLOSED_FORMS.values(), ids=CLOSED_FORMS.keys())
@pytest.mark.parametrize(("draft", "masked"), [(6, True), (2, False)], ids=["masked-draft", "unmasked-draft"])
def test_closed_form_agrees_with_the_rule(config, draft, masked):
    """The closed form's P(accept) of a one-hot draft against the rule's acceptance over a grid of uniforms
    (ERSD: over request keys) on the issue's example: both 0 for the masked draft, equal for an unmasked one."""
    n = 2000
    p = EXAMPLE.double()
    one_hot = torch.ones(1, 1, dtype=torch.float64)
    closed, _ = token_acceptance(p[None, [draft]], one_hot, p[None], config.policy, config.settings)
    result = verify(
        EXAMPLE.log().expand(n, -1).contiguous(),
        torch.full((n,), draft),
        torch.ones(n, dtype=torch.long),
        torch.zeros(n, dtype=torch.long),
        uniform=(torch.arange(n, dtype=torch.float64) + 0.5) / n,
        race_keys=torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.long)], dim=1),
        config=config,
        backend="torch",
    )
    rule = result.num_accepted.double().mean()
    if masked:
        assert float(closed) == 0.0 and float(rule) == 0.0, (float(closed), float(rule))
    else:  # the grid's error is 1/n; ERSD's keys are random, 4 standard errors
        assert abs(float(closed) - float(rule)) <= 4 * (0.25 / n) ** 0.5, (float(closed), float(rule))


@pytest.mark.parametrize("mask", MASKS)
def test_mrv2_takes_no_masked_draft_as_a_relaxed_candidate(mask):
    """Model Runner V2's walk makes relaxed_topk's candidate test itself, in one pass over a row's logits: a masked
    draft is never one, whatever relaxed_topk and relaxed_delta."""
    g = torch.Generator().manual_seed(1)
    raw = torch.randn(64, VOCAB, generator=g)
    kept = kept_tokens(mask, raw, g)
    logits = raw.masked_fill(~kept, float("-inf"))
    drafts = torch.randint(0, VOCAB, (64,), generator=g)
    candidate = walk_relaxed_candidates(logits, drafts, VOCAB, 1.0)  # every unmasked draft is one at these settings
    assert torch.equal(candidate, kept.gather(1, drafts[:, None]).squeeze(1))


@pytest.mark.parametrize(("topk", "delta"), [(10, 0.6), (3, 0.3), (2, 0.0), (1, 1.0)])
def test_mrv2s_relaxed_candidate_test_is_the_rule(topk, delta):
    """The walk's candidate test equals the registry's rule (``relaxed_topk_candidate`` on the row's softmax and the
    draft's rank), row by row, with drafts among the top tokens and the target flattened so several are close."""
    from ears_vllm.policies import rank_among_logits, relaxed_topk_candidate

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(256, VOCAB, generator=g) * 1.5
    drafts = logits.topk(6, dim=-1).indices.gather(1, torch.randint(0, 6, (256, 1), generator=g)).squeeze(1)
    log_p = logits.log_softmax(-1)
    draft_logit = logits.gather(1, drafts[:, None]).squeeze(1)
    expected = relaxed_topk_candidate(
        log_p.gather(1, drafts[:, None]).squeeze(1).exp(),
        log_p.max(-1).values.exp(),
        rank_among_logits(logits, draft_logit),
        topk,
        delta,
    )
    assert 0 < int(expected.sum()) < 256  # both outcomes occur
    assert torch.equal(walk_relaxed_candidates(logits, drafts, topk, delta), expected)
