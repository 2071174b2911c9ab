"""Specification of ``ears_vllm.verify`` (PyTorch backend): exactness, statistics, layout, errors."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ears_vllm import EarsConfig, verify
from ears_vllm.bench.steps import verify_batch
from ears_vllm.policies import expected_acceptance, expected_acceptance_one_hot
from tests.naive import naive_verify


def assert_matches_naive(batch: dict, config: EarsConfig, is_greedy=None, tolerance=None) -> None:
    result = verify(**batch, config=config, is_greedy=is_greedy, tolerance=tolerance)
    rows, accepted, relaxed = naive_verify(
        batch["target_logits"],
        batch["draft_token_ids"].tolist(),
        list(batch["num_draft_tokens"]),
        batch["bonus_token_ids"].tolist(),
        batch["uniform"].tolist(),
        batch["recovery_noise"],
        draft_probs=batch["draft_probs"],
        is_greedy=None if is_greedy is None else is_greedy.tolist(),
        policy=config.policy,
        tolerance=([config.tolerance] * len(batch["num_draft_tokens"]) if tolerance is None else tolerance.tolist()),
        min_ratio=config.min_ratio,
    )
    assert result.token_ids.tolist() == rows
    assert result.num_accepted.tolist() == accepted
    assert result.num_relaxed.tolist() == relaxed


POLICIES = {
    "standard": EarsConfig(),
    "ears-0": EarsConfig(policy="ears", tolerance=0.0),
    "ears-0.3": EarsConfig(policy="ears", tolerance=0.3),
    "ears-1-no-floor": EarsConfig(policy="ears", tolerance=1.0, min_ratio=0.0),
    "typical": EarsConfig(policy="typical"),
    "adasd": EarsConfig(policy="adasd"),  # its threshold per request, as the tolerance (0 without one: none)
}
SHAPES = {
    "k4-batch3": [4, 4, 4],
    "ragged-with-zero": [3, 0, 5, 1, 2],
    "single-k1": [1],
    "k8-batch2": [8, 7],
}


@pytest.mark.parametrize("config", POLICIES.values(), ids=POLICIES.keys())
@pytest.mark.parametrize("num_draft_tokens", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("full_draft", [False, True], ids=["one-hot-draft", "full-draft"])
@pytest.mark.parametrize("vocab", [37, 1000], ids=["vocab37", "vocab1000"])
def test_token_ids_equal_the_naive_implementation(config, num_draft_tokens, full_draft, vocab):
    batch = verify_batch(
        num_draft_tokens, vocab, seed=vocab + len(num_draft_tokens), full_draft=full_draft, masked_fraction=0.3
    )
    assert_matches_naive(batch, config)


@pytest.mark.parametrize("config", POLICIES.values(), ids=POLICIES.keys())
@pytest.mark.parametrize("full_draft", [False, True], ids=["one-hot-draft", "full-draft"])
def test_mixed_greedy_random_batch_with_per_request_tolerance(config, full_draft):
    num_draft_tokens = [4, 0, 2, 5, 3, 1]
    batch = verify_batch(num_draft_tokens, 101, seed=7, full_draft=full_draft, masked_fraction=0.2)
    is_greedy = torch.tensor([True, False, False, True, False, False])
    tolerance = torch.tensor([0.0, 0.5, 0.1, 0.9, 1.0, 0.3], dtype=torch.float64)
    assert_matches_naive(batch, config, is_greedy=is_greedy, tolerance=tolerance)


def test_tolerance_zero_is_the_standard_rule_bit_for_bit():
    batch = verify_batch([6] * 64, 257, seed=3, full_draft=True, masked_fraction=0.1)
    standard = verify(**batch, config=EarsConfig())
    ears_zero = verify(**batch, config=EarsConfig(policy="ears", tolerance=0.0, min_ratio=0.5))
    assert torch.equal(standard.token_ids, ears_zero.token_ids)
    assert ears_zero.num_relaxed.sum() == 0


def test_greedy_rows_ignore_the_policy():
    batch = verify_batch([5] * 8, 50, seed=11, full_draft=False)
    greedy = torch.ones(8, dtype=torch.bool)
    outputs = [verify(**batch, is_greedy=greedy, config=config).token_ids for config in POLICIES.values()]
    for out in outputs[1:]:
        assert torch.equal(out, outputs[0])


# ---------------------------------------------------------------- statistics (one position, k = 1)

TARGET = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.03, 0.01, 0.0])  # last token masked (p = 0)
DRAFT = torch.tensor([0.10, 0.30, 0.05, 0.25, 0.05, 0.10, 0.10, 0.05])


def sample_first_tokens(config: EarsConfig, draft: torch.Tensor | None, n: int, seed: int, tolerance=None):
    """Verify ``n`` independent single-draft requests on the same (p, q); return emitted tokens & counts."""
    g = torch.Generator().manual_seed(seed)
    logits = TARGET.log().expand(n, -1).contiguous()
    q = DRAFT if draft is None else draft
    draft_ids = torch.multinomial(q, n, replacement=True, generator=g)
    result = verify(
        logits,
        draft_ids,
        torch.ones(n, dtype=torch.long),
        torch.zeros(n, dtype=torch.long),
        draft_probs=q.expand(n, -1).contiguous(),
        generator=g,
        config=config,
        tolerance=None if tolerance is None else torch.full((n,), tolerance, dtype=torch.float64),
    )
    return result.token_ids[:, 0], result.num_accepted.float().mean(), result.num_relaxed.float().mean()


def total_variation(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    empirical = torch.bincount(tokens.long(), minlength=probs.numel()).double() / tokens.numel()
    return 0.5 * float((empirical - probs.double()).abs().sum())


def test_standard_output_distribution_is_the_target():
    from scipy.stats import chisquare

    tvs = {}
    for n in (2_000, 200_000):
        tokens, _, relaxed = sample_first_tokens(EarsConfig(), None, n, seed=1)
        assert relaxed == 0
        tvs[n] = total_variation(tokens, TARGET)
        observed = torch.bincount(tokens.long(), minlength=8)[:7].double()
        assert observed.sum() == n, "a masked token (p = 0) was emitted"
        expected = TARGET[:7].double() / TARGET[:7].double().sum() * n
        assert chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3
    # The sampling error of the TV estimate shrinks like 1/sqrt(n): 100x the samples, ~10x smaller.
    assert tvs[200_000] < tvs[2_000] / 3


@pytest.mark.parametrize("tolerance", [0.05, 0.3, 1.0], ids=lambda t: f"beta{t}")
@pytest.mark.parametrize("min_ratio", [0.0, 0.2, 0.5], ids=lambda r: f"rho{r}")
@pytest.mark.parametrize("one_hot", [False, True], ids=["full-draft", "one-hot-draft"])
def test_ears_acceptance_and_bias_match_the_analytic_rule(tolerance, min_ratio, one_hot):
    """The sampled acceptance and relaxed rates against the closed form, and the bias identity (the TV of the
    emitted token's distribution from p is the relaxed rate), at n = 400 000 draws per case.

    Power. Each rate is held to 4 of its own standard deviations sqrt(r (1 - r) / n) (a false alarm 6e-5 per
    check). Every min_ratio > 0 here changes the relaxed rate (on this p, a floor of 0.01 would not: 0 and 0.01
    are one case), and a rule that ignored the floor would move it by at least 0.003 (full drafts, beta 0.05,
    rho 0.2), 13 standard deviations: caught with probability > 0.99 in every case (asserted below). The TV of
    the empirical distribution is within 0.5 sqrt(7 / n) (mean, 8 tokens) + sqrt(ln(1e4) / 2n) (McDiarmid, one
    draw moves it by at most 1/n) = 0.0055 of the true one with probability 1 - 1e-4, so an emitted distribution
    whose TV is 0.011 off the relaxed rate fails; the unfloored rule is that far off wherever its relaxed rate is
    (all cases but the one above, which the rate check catches)."""
    n = 400_000
    config = EarsConfig(policy="ears", tolerance=tolerance, min_ratio=min_ratio)
    # A one-hot drafter proposing token 3 (r = p(3) = 0.10) is accepted with min(1, r + t') exactly.
    draft = torch.nn.functional.one_hot(torch.tensor(3), 8).float() if one_hot else DRAFT
    tokens, accept_rate, relaxed_rate = sample_first_tokens(config, draft, n, seed=2)
    expected = expected_acceptance(TARGET[None], draft[None], policy="ears", tolerance=tolerance, min_ratio=min_ratio)
    accept, relaxed = (float(x) for x in expected)

    def sigma(rate: float) -> float:
        return math.sqrt(rate * (1 - rate) / n)

    assert abs(float(accept_rate) - accept) <= 4 * sigma(accept)
    assert abs(float(relaxed_rate) - relaxed) <= 4 * sigma(relaxed)
    if min_ratio > 0:  # the floor bites: without it the relaxed rate moves by enough to fail the check above
        _, unfloored = expected_acceptance(TARGET[None], draft[None], policy="ears", tolerance=tolerance, min_ratio=0)
        assert abs(float(unfloored) - relaxed) >= 4 * sigma(relaxed) + 2.33 * sigma(float(unfloored))
    # Bias identity: the relaxed-acceptance rate is the TV distance added to the output distribution.
    tv_tolerance = 0.5 * math.sqrt(7 / n) + math.sqrt(math.log(1e4) / (2 * n))
    assert abs(total_variation(tokens, TARGET) - relaxed) < tv_tolerance
    if one_hot:
        t = tolerance * (1 - 0.40)
        analytic = min(1.0, 0.10 + t) if min_ratio <= 0.10 else 0.10
        assert accept == pytest.approx(analytic)


ONE_HOT_POLICIES = {
    "standard": dict(policy="standard"),
    "ears-0.3": dict(policy="ears", tolerance=0.3),
    "ears-1.0-no-floor": dict(policy="ears", tolerance=1.0, min_ratio=0.0),
    "ears-per-request": dict(policy="ears", tolerance=torch.linspace(0, 1, 64, dtype=torch.float64)),
    "typical": dict(policy="typical"),
}


@pytest.mark.parametrize("settings", ONE_HOT_POLICIES.values(), ids=ONE_HOT_POLICIES.keys())
def test_one_hot_closed_form_reads_one_column_and_agrees_with_the_dense_one(settings):
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(64, 50, generator=generator) * 3
    logits[:, :5] = -torch.inf  # masked tokens, some of them drafted
    target = logits.softmax(-1)
    draft_ids = torch.randint(0, 50, (64,), generator=generator)
    dense = expected_acceptance(target, torch.nn.functional.one_hot(draft_ids, 50).float(), **settings)
    one_hot = expected_acceptance_one_hot(target, draft_ids, **settings)
    for got, expected in zip(one_hot, dense, strict=True):
        assert torch.allclose(got, expected, rtol=0, atol=1e-12)
    assert (one_hot[0][draft_ids < 5] == 0).all()


@pytest.mark.parametrize(
    ("config", "tolerance"),
    [
        (EarsConfig(policy="ears", tolerance=0.5, min_ratio=0.0), None),
        (EarsConfig(policy="ears", tolerance=1.0, min_ratio=0.0), None),
        (EarsConfig(policy="adasd"), 1.0),  # a JS threshold of 1 passes every distance
    ],
    ids=["ears-beta0.5", "ears-beta1", "adasd-tau1"],
)
def test_masked_token_is_never_accepted(config, tolerance):
    masked_draft = torch.nn.functional.one_hot(torch.tensor(7), 8).float()  # p(7) = 0
    tokens, accept_rate, _ = sample_first_tokens(config, masked_draft, 50_000, seed=3, tolerance=tolerance)
    assert accept_rate == 0
    assert not (tokens == 7).any()


def test_typical_acceptance_is_deterministic_and_emits_argmax():
    config = EarsConfig(policy="typical")
    tokens, rate, _ = sample_first_tokens(config, DRAFT, 20_000, seed=4)
    accept, _ = expected_acceptance(TARGET[None], DRAFT[None], policy="typical")
    assert abs(float(rate) - float(accept)) < 5 * math.sqrt(0.25 / 20_000)
    # Rejected drafts are replaced by the target argmax (token 0), never sampled.
    entropy = float(torch.special.entr(TARGET).sum())
    threshold = min(0.09, 0.3 * math.exp(-entropy))
    below = (threshold >= TARGET).nonzero().flatten().tolist()
    assert not any(int(t) in below for t in tokens if int(t) != 0)


# ---------------------------------------------------------------- layout invariants (property tests)


@settings(max_examples=60, deadline=None)
@given(
    num_draft_tokens=st.lists(st.integers(0, 6), min_size=1, max_size=6),
    vocab=st.integers(2, 70),
    policy=st.sampled_from(list(POLICIES)),
    full_draft=st.booleans(),
    greedy_mask=st.integers(0, 63),
    seed=st.integers(0, 2**16),
)
def test_output_layout_invariants(num_draft_tokens, vocab, policy, full_draft, greedy_mask, seed):
    batch = verify_batch(num_draft_tokens, vocab, seed=seed, full_draft=full_draft, masked_fraction=0.3)
    is_greedy = torch.tensor([bool(greedy_mask >> i & 1) for i in range(len(num_draft_tokens))])
    result = verify(**batch, is_greedy=is_greedy, config=POLICIES[policy])
    k = torch.tensor(num_draft_tokens)
    assert result.token_ids.shape == (len(k), int(k.max()) + 1)
    assert result.token_ids.dtype == torch.int32
    assert (result.num_accepted <= k).all()
    assert (result.num_relaxed <= result.num_accepted).all()
    assert (result.num_relaxed[is_greedy] == 0).all()
    start = 0
    for i, (row, n_acc) in enumerate(zip(result.token_ids.tolist(), result.num_accepted.tolist(), strict=True)):
        drafts = batch["draft_token_ids"][start : start + num_draft_tokens[i]].tolist()
        start += num_draft_tokens[i]
        assert row[:n_acc] == drafts[:n_acc], "the accepted prefix is the drafts themselves"
        assert 0 <= row[n_acc] < vocab, "exactly one recovered-or-bonus token follows"
        assert all(t == -1 for t in row[n_acc + 1 :]), "then padding"
        if n_acc == num_draft_tokens[i]:
            assert row[n_acc] == int(batch["bonus_token_ids"][i])


# ---------------------------------------------------------------- input checking


def _valid_args() -> dict:
    return verify_batch([2, 1], 10, seed=0, full_draft=True)


BAD_INPUTS = {
    "logits-1d": ("target_logits", lambda a: a["target_logits"][0], "target_logits"),
    "logits-int": ("target_logits", lambda a: a["target_logits"].long(), "target_logits"),
    "draft-ids-length": ("draft_token_ids", lambda a: a["draft_token_ids"][:2], "draft_token_ids"),
    "draft-ids-float": ("draft_token_ids", lambda a: a["draft_token_ids"].float(), "draft_token_ids"),
    "draft-id-out-of-vocab": ("draft_token_ids", lambda a: torch.tensor([1, 2, 10]), "draft_token_ids"),
    "num-draft-sum": ("num_draft_tokens", lambda a: [2, 2], "num_draft_tokens"),
    "num-draft-negative": ("num_draft_tokens", lambda a: [4, -1], "num_draft_tokens"),
    "bonus-shape": ("bonus_token_ids", lambda a: torch.tensor([1, 2, 3]), "bonus_token_ids"),
    "draft-probs-vocab": ("draft_probs", lambda a: a["draft_probs"][:, :9], "draft_probs"),
    "uniform-shape": ("uniform", lambda a: a["uniform"][:2], "uniform"),
    "noise-shape": ("recovery_noise", lambda a: a["recovery_noise"][:1], "recovery_noise"),
    "uniform-one": ("uniform", lambda a: a["uniform"].index_fill(0, torch.tensor([1]), 1.0), r"uniform .*\[1\.0\]"),
    "uniform-negative": ("uniform", lambda a: a["uniform"].index_fill(0, torch.tensor([0]), -0.1), "uniform"),
    "uniform-nan": ("uniform", lambda a: a["uniform"].index_fill(0, torch.tensor([2]), float("nan")), "uniform"),
    "noise-negative": ("recovery_noise", lambda a: -a["recovery_noise"], "recovery_noise"),
    "noise-nan": (
        "recovery_noise",
        lambda a: a["recovery_noise"].index_fill(1, torch.tensor([3]), float("nan")),
        "recovery_noise",
    ),
    "noise-inf": (
        "recovery_noise",
        lambda a: a["recovery_noise"].index_fill(1, torch.tensor([3]), float("inf")),
        "recovery_noise",
    ),
    "greedy-dtype": ("is_greedy", lambda a: torch.tensor([0, 1]), "is_greedy"),
    "tolerance-range": ("tolerance", lambda a: torch.tensor([0.1, 1.5]), "tolerance"),
    "tolerance-nan": ("tolerance", lambda a: torch.tensor([0.1, float("nan")]), "tolerance"),
    "backend": ("backend", lambda a: "cuda", "backend"),
}


@pytest.mark.parametrize(("arg", "make_bad", "named"), BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_raises_a_value_error_naming_the_argument(arg, make_bad, named):
    args = _valid_args()
    args[arg] = make_bad(args)
    with pytest.raises(ValueError, match=named):
        verify(**args)


def test_zero_recovery_noise_is_a_draw_and_is_taken():
    """torch's CPU exponential_ draws 0 (``-log1p(-u)`` at u = 0), and vLLM V1 samples with it: not refused."""
    args = _valid_args()
    args["recovery_noise"] = args["recovery_noise"].index_fill(1, torch.tensor([0]), 0.0)
    assert verify(**args).token_ids.shape == (2, 3)


NOT_BUDGETED = {
    "standard": EarsConfig(),
    "typical": EarsConfig(policy="typical"),
    "sglang": EarsConfig(policy="sglang"),
    "ersd": EarsConfig(policy="ersd"),
}


@pytest.mark.parametrize("config", NOT_BUDGETED.values(), ids=NOT_BUDGETED.keys())
def test_a_budget_for_a_policy_it_cannot_cap_is_refused_and_zero_is_no_budget(config):
    """A non-zero budget is a cap on relaxed acceptances, which are not the whole deviation of these policies: a
    ValueError naming budget and the policy. A budget of 0 (no cap: what vLLM's V1 adapter passes for every row)
    changes nothing, and ERSD's race acceptances are still not counted as relaxed."""
    args = _valid_args()
    args["race_keys"] = torch.tensor([[3, 0], [4, 0]])
    zero = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"budget=\[0\.0, 0\.05\]: policy '{config.policy}' cannot be held"):
        verify(**args, config=config, budget=torch.tensor([0.0, 0.05], dtype=torch.float64), budget_slack=zero)
    plain = verify(**args, config=config)
    capped = verify(**args, config=config, budget=zero, budget_slack=zero)
    assert torch.equal(plain.token_ids, capped.token_ids) and torch.equal(plain.num_relaxed, capped.num_relaxed)


def test_ersd_accepts_drafts_the_standard_test_rejects_and_counts_none_relaxed_under_a_zero_budget():
    """The race accepts a draft whenever it is the target's winner, whatever u (one-hot draft here, u = 0.999):
    never a relaxed acceptance, on the budgeted path too."""
    from ears_vllm.policies import race_winners

    target = torch.tensor([[0.0, 0.5, 1.0, -1.0]]).expand(64, -1)
    seed, pos = torch.arange(64), torch.zeros(64, dtype=torch.long)
    drafts = race_winners(target, seed, pos)  # every draft is the target's winner: all accepted
    zero = torch.zeros(64, dtype=torch.float64)
    out = verify(
        target,
        drafts,
        [1] * 64,
        torch.zeros(64, dtype=torch.long),
        race_keys=torch.stack([seed, pos], 1),
        uniform=torch.full((64,), 0.999, dtype=torch.float64),
        config=EarsConfig(policy="ersd"),
        budget=zero,
        budget_slack=zero,
    )
    assert out.num_accepted.sum() == 64 and out.num_relaxed.sum() == 0


def test_triton_backend_on_cpu_without_the_interpreter_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        verify(**_valid_args(), backend="triton")


def test_a_kernel_that_fails_falls_back_to_pytorch_with_one_warning(monkeypatch, caplog):
    """Simulated: a Triton that cannot compile the kernel. CUDA is stood in for by letting "auto" pick the
    kernel on the CPU, and the kernel by a function that raises as a compile error would."""
    import logging

    from ears_vllm import kernels

    verify_module = importlib.import_module("ears_vllm.verify")
    monkeypatch.setattr(verify_module, "AUTO_KERNEL_DEVICES", ("cpu",))
    monkeypatch.setattr(verify_module, "_kernel_failure", None)
    monkeypatch.setattr(verify_module, "get_logger", lambda: logging.getLogger("ears-test"))
    monkeypatch.setattr(kernels, "unusable_reason", lambda device_type: None)
    attempts = []

    def kernel_that_does_not_compile(step):
        attempts.append(step)
        raise RuntimeError("CompilationError: simulated, at 12:8: unsupported op")

    monkeypatch.setattr(kernels, "verify_triton", kernel_that_does_not_compile)
    expected = verify(**_valid_args(), backend="torch")
    with caplog.at_level(logging.WARNING, logger="ears-test"):
        results = [verify(**_valid_args()) for _ in range(3)]
    assert all(torch.equal(r.token_ids, expected.token_ids) for r in results)
    assert len(attempts) == 1, "after one failure the process stops trying the kernel"
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "simulated" in caplog.records[0].message and "PyTorch path" in caplog.records[0].message
    with pytest.raises(RuntimeError, match="simulated"):
        verify(**_valid_args(), backend="triton")  # asked for by name: the error is the caller's to see


def test_float64_noise_keeps_the_residual_product_in_float64():
    """vLLM's ``use_fp64_gumbel``: ``residual * (1 / E)`` is a float64 product. Here the residual is (1/4, 1/4, 1/4,
    0) and 1 / E favours token 1 by 1e-10, which a float32 product rounds away (a tie, won by token 0)."""
    recovered = verify(
        torch.zeros(1, 4),
        torch.tensor([3]),
        torch.tensor([1]),
        torch.tensor([0]),
        draft_probs=torch.tensor([[0.0, 0.0, 0.0, 1.0]]),
        uniform=torch.tensor([0.9], dtype=torch.float64),  # p(3) / q(3) = 1/4 < 0.9: rejected
        recovery_noise=torch.tensor([[1.0, 1 / (1 + 1e-10), 2.0, 2.0]], dtype=torch.float64),
        backend="torch",
    )
    assert recovered.token_ids.tolist() == [[1, -1]] and recovered.num_accepted.tolist() == [0]


def test_the_step_is_one_frozen_object_built_by_name():
    """The budget and its slack (both [batch] float64) cannot be swapped by position: the step and its budget are
    built by name only, a built step cannot be changed, and the reference and the kernel take the whole step."""
    import dataclasses
    import inspect

    from ears_vllm.reference import verify_reference
    from ears_vllm.step import Budget, VerifyStep

    step = VerifyStep.build(**_valid_args(), config=EarsConfig(policy="ears", budget=0.1))
    assert step.budget is not None and step.budget.slack.tolist() == [0, 0]
    assert step.budget.rate.tolist() == pytest.approx([0.1, 0.1])
    with pytest.raises(TypeError):
        Budget(step.budget.slack, step.budget.rate)
    with pytest.raises(TypeError):
        VerifyStep(*(getattr(step, f.name) for f in dataclasses.fields(step)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        step.budget = None
    assert list(inspect.signature(verify_reference).parameters) == ["step"]
    assert torch.equal(verify_reference(step).token_ids, verify(**_valid_args(), config=step.config).token_ids)
