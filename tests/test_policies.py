"""The field's acceptance rules, worked by hand from their sources, through ``ears_vllm.verify``.

Each case is one request: target distribution ``p`` per draft position (logits ``log p``), one-hot drafts, the
uniforms vLLM would draw, and the accepted prefix the source's rule gives. Uniforms sit at least 1e-3 from a
threshold, so float32 rounding of ``p`` cannot decide a case.
"""

from __future__ import annotations

import math

import pytest
import torch

from ears_vllm import EarsConfig, verify
from ears_vllm.policies import POLICIES, PositionForm, position_form


def run(p_rows, drafts, uniforms, config, *, greedy=False, draft_probs=None):
    logits = torch.tensor(p_rows, dtype=torch.float64).log().float()
    out = verify(
        logits,
        torch.tensor(drafts),
        [len(drafts)],
        torch.tensor([len(p_rows[0]) - 1]),
        uniform=torch.tensor(uniforms, dtype=torch.float64),
        is_greedy=torch.tensor([greedy]),
        config=config,
        draft_probs=draft_probs,
        generator=torch.Generator().manual_seed(0),
        backend="torch",
    )
    return out.token_ids[0].tolist(), int(out.num_accepted[0]), int(out.num_relaxed[0])


P = [0.5, 0.25, 0.15, 0.1]

# SGLang sgl-kernel/csrc/speculative/speculative_sampling.cuh, TreeSpeculativeSamplingTargetOnly: on a chain
# `coin <= prob_acc / threshold_acc || target_prob_single >= threshold_single`, prob_acc = p(d) (reset per node).
SGLANG = {
    # (single, acc), draft, u -> accepted
    "defaults-coin-below-p": ((1.0, 1.0), 1, 0.249, 1),
    "defaults-coin-above-p": ((1.0, 1.0), 1, 0.251, 0),
    "acc-0.5-doubles-p": ((1.0, 0.5), 1, 0.499, 1),
    "acc-0.5-coin-above-2p": ((1.0, 0.5), 1, 0.501, 0),
    "single-0.2-accepts-any-coin": ((0.2, 1.0), 1, 0.999, 1),
    "single-0.3-too-high": ((0.3, 1.0), 1, 0.999, 0),
    "acc-0-clamped-to-1e-9-accepts": ((1.0, 0.0), 3, 0.999, 1),
}


@pytest.mark.parametrize(("thresholds", "draft", "u", "accepted"), SGLANG.values(), ids=SGLANG.keys())
def test_sglang_threshold_rule(thresholds, draft, u, accepted):
    single, acc = thresholds
    config = EarsConfig(policy="sglang", accept_threshold_single=single, accept_threshold_acc=acc)
    tokens, num_accepted, _ = run([P], [draft], [u], config)
    assert num_accepted == accepted
    if not accepted:
        assert tokens[0] != draft  # SGLang resamples from p with the rejected draft removed


def test_sglang_ignores_the_draft_distribution():
    """Target-only: q(d) = 0.01 makes p/q = 25 (standard accepts any u); SGLang compares u with p(d) = 0.25."""
    q = torch.tensor([[0.97, 0.01, 0.01, 0.01]])
    sglang = EarsConfig(policy="sglang")
    assert run([P], [1], [0.5], sglang, draft_probs=q)[1] == 0
    assert run([P], [1], [0.5], EarsConfig(), draft_probs=q)[1] == 1


# TensorRT-LLM cpp/tensorrt_llm/kernels/speculativeDecoding/mtpKernels.cu, mtpRelaxedAcceptanceKernel: the draft
# must equal one of the top-k candidates whose probability is >= top-1 probability - delta (top-1 always).
RELAXED_TOPK = {
    # (topk, delta), draft, greedy -> (accepted, emitted token)
    "second-within-delta": ((3, 0.3), 1, False, (1, 1)),
    "third-outside-delta": ((3, 0.3), 2, False, (0, None)),
    "third-outside-topk-2": ((2, 0.6), 2, False, (0, None)),
    "third-inside-topk-3-delta-0.6": ((3, 0.6), 2, False, (1, 2)),
    "delta-0-only-argmax": ((10, 0.0), 1, False, (0, None)),
    "greedy-row-relaxed-too": ((3, 0.3), 1, True, (1, 1)),
    "greedy-row-rejects-to-argmax": ((3, 0.3), 3, True, (0, 0)),
}


@pytest.mark.parametrize(("setting", "draft", "greedy", "expected"), RELAXED_TOPK.values(), ids=RELAXED_TOPK.keys())
def test_relaxed_topk_rule(setting, draft, greedy, expected):
    topk, delta = setting
    config = EarsConfig(policy="relaxed_topk", relaxed_topk=topk, relaxed_delta=delta)
    tokens, num_accepted, num_relaxed = run([P], [draft], [0.999], config, greedy=greedy)  # u: standard rejects
    accepted, emitted = expected
    assert (num_accepted, num_relaxed) == (accepted, accepted)
    if emitted is not None:
        assert tokens[0] == emitted


# vLLM 0.33 vllm/v1/spec_decode/fly.py, apply_fly_random_acceptance_kernel: a native rejection at i is deferred
# when top-k entropy >= threshold, p(d) > 0, q(d) > 0, i + W < n and drafts i+1..i+W pass the native test.
FLAT = [0.4, 0.3, 0.3]  # top-3 entropy 1.0889 nats
FLY = {
    # (window, threshold), uniforms (draft 1 everywhere, p(d) = 0.3) -> (accepted, relaxed)
    "deferred-then-confirmed": ((1, 0.3), [0.99, 0.01, 0.99], (2, 1)),
    "window-fails": ((1, 0.3), [0.99, 0.99, 0.01], (0, 0)),
    "last-position-cannot-defer": ((1, 0.3), [0.01, 0.01, 0.99], (2, 0)),
    "entropy-gate-shut": ((1, 1.1), [0.99, 0.01, 0.99], (0, 0)),
    "window-2-confirmed": ((2, 0.3), [0.99, 0.01, 0.01], (3, 1)),
    "window-2-too-long-at-1": ((2, 0.3), [0.01, 0.99, 0.01], (1, 0)),
}


@pytest.mark.parametrize(("setting", "uniforms", "expected"), FLY.values(), ids=FLY.keys())
def test_fly_window_rule(setting, uniforms, expected):
    window, threshold = setting
    config = EarsConfig(policy="fly", fly_window_size=window, fly_entropy_threshold=threshold)
    _, num_accepted, num_relaxed = run([FLAT] * 3, [1, 1, 1], uniforms, config)
    assert (num_accepted, num_relaxed) == expected


# MARS (arXiv 2601.15498; the authors' code, 5SSjw/MARS mars/model/utils.py evaluate_posterior): where the
# target's two largest logits have z2 / z1 > theta (default 0.9), a draft among the top-2 is accepted; elsewhere the
# native test. docs/frontier-rule.md ("MARS") gives the source of each detail. Logits given directly (the ratio is
# of logits, not of probabilities); u = 0.999 makes the standard test reject every draft but the argmax here.
MARS_LOGITS = [10.0, 9.5, 5.0, 1.0]  # ratio 0.95: low margin at theta 0.9
DECISIVE_LOGITS = [10.0, 8.5, 5.0, 1.0]  # ratio 0.85: decisive at theta 0.9, low margin at 0.8
NEGATIVE_LOGITS = [-1.0, -1.05, -5.0, -6.0]  # z2 / z1 = 1.05, but z1 <= 0: no margin read (our guard)
TIED_LOGITS = [10.0, 10.0, 5.0, 1.0]  # ratio 1: not > 1
MARS = {
    # logits, theta, draft, greedy -> (accepted, relaxed, emitted token when rejected)
    "runner-up-low-margin": (MARS_LOGITS, 0.9, 1, False, (1, 1, None)),
    "third-low-margin-rejected": (MARS_LOGITS, 0.9, 2, False, (0, 0, None)),
    "runner-up-decisive-rejected": (DECISIVE_LOGITS, 0.9, 1, False, (0, 0, None)),
    "runner-up-theta-0.8": (DECISIVE_LOGITS, 0.8, 1, False, (1, 1, None)),
    "negative-top-logit-not-relaxed": (NEGATIVE_LOGITS, 0.9, 1, False, (0, 0, None)),
    "greedy-runner-up-low-margin": (MARS_LOGITS, 0.9, 1, True, (1, 1, None)),
    "greedy-third-rejected-to-argmax": (MARS_LOGITS, 0.9, 2, True, (0, 0, 0)),
    "greedy-argmax-native": (DECISIVE_LOGITS, 0.9, 0, True, (1, 0, None)),
    "theta-1-tie-not-relaxed": (TIED_LOGITS, 1.0, 1, True, (0, 0, 0)),
}


@pytest.mark.parametrize(("logits", "theta", "draft", "greedy", "expected"), MARS.values(), ids=MARS.keys())
def test_mars_rule(logits, theta, draft, greedy, expected):
    config = EarsConfig(policy="mars", mars_threshold=theta)
    out = verify(
        torch.tensor([logits]),
        torch.tensor([draft]),
        [1],
        torch.tensor([3]),
        uniform=torch.tensor([0.999], dtype=torch.float64),
        is_greedy=torch.tensor([greedy]),
        config=config,
        generator=torch.Generator().manual_seed(0),
        backend="torch",
    )
    accepted, relaxed, emitted = expected
    assert (int(out.num_accepted[0]), int(out.num_relaxed[0])) == (accepted, relaxed)
    if emitted is not None:
        assert int(out.token_ids[0, 0]) == emitted


# The frontier rule (ours, docs/frontier-rule.md): a native rejection at i is relaxed when EARS's relaxed test with its
# tolerance times frontier_scale s passes (p/q >= max(u - s * tolerance * (1 - max p), min_ratio)), i + W < n, and
# drafts i+1..i+W pass natively. On FLAT rows with draft 1: p(d) = 0.3, max p = 0.4, so at tolerance 0.5 the relaxed
# threshold is u - 0.3: u = 0.55 relaxes (0.25 <= 0.3), u = 0.85 and u = 0.99 do not (0.55, 0.69); at s = 2 it is
# u - 0.6: u = 0.85 relaxes (0.25), u = 0.99 does not (0.39); at s = 10 it is the floor min_ratio = 0.01: any u
# relaxes (FLy's pure window). The native test passes at u = 0.01.
FRONTIER = {
    # (window, tolerance, scale), uniforms, greedy -> (accepted, relaxed)
    "relaxed-then-window-passes": ((1, 0.5, 1.0), [0.55, 0.01, 0.99], False, (2, 1)),
    "window-fails": ((1, 0.5, 1.0), [0.55, 0.99, 0.01], False, (0, 0)),
    "ears-test-fails-where-fly-defers": ((1, 0.5, 1.0), [0.99, 0.01, 0.01], False, (0, 0)),
    "last-position-has-no-window": ((1, 0.5, 1.0), [0.01, 0.01, 0.55], False, (2, 0)),
    "window-0-is-ears": ((0, 0.5, 1.0), [0.01, 0.01, 0.55], False, (3, 1)),
    "window-2-passes": ((2, 0.5, 1.0), [0.55, 0.01, 0.01], False, (3, 1)),
    "window-2-too-long-at-1": ((2, 0.5, 1.0), [0.01, 0.55, 0.01], False, (1, 0)),
    "tolerance-0-lossless": ((1, 0.0, 1.0), [0.55, 0.01, 0.99], False, (0, 0)),
    "greedy-row-argmax-match": ((1, 0.5, 1.0), [0.55, 0.01, 0.99], True, (0, 0)),
    "scale-1-refuses-u-0.85": ((1, 0.5, 1.0), [0.85, 0.01, 0.99], False, (0, 0)),
    "scale-2-relaxes-u-0.85": ((1, 0.5, 2.0), [0.85, 0.01, 0.99], False, (2, 1)),
    "scale-2-refuses-u-0.99": ((1, 0.5, 2.0), [0.99, 0.01, 0.99], False, (0, 0)),
    "scale-10-relaxes-any-u": ((1, 0.5, 10.0), [0.99, 0.01, 0.99], False, (2, 1)),
    "scale-10-tolerance-0-lossless": ((1, 0.0, 10.0), [0.99, 0.01, 0.99], False, (0, 0)),
}


@pytest.mark.parametrize(("setting", "uniforms", "greedy", "expected"), FRONTIER.values(), ids=FRONTIER.keys())
def test_frontier_rule(setting, uniforms, greedy, expected):
    window, tolerance, scale = setting
    config = EarsConfig(policy="frontier", tolerance=tolerance, frontier_window=window, frontier_scale=scale)
    _, num_accepted, num_relaxed = run([FLAT] * 3, [1, 1, 1], uniforms, config, greedy=greedy)
    assert (num_accepted, num_relaxed) == expected


# FLy's default window, vLLM's min(6, k - 1), resolved in one place (``policies.settings_for``): k = 1 leaves no
# window (vLLM refuses FLy at startup then, and so does a sampler: ``settings_at_startup``), while a step whose
# longest draft is 1 defers nothing whatever the window, so its window resolves to 1 there.
FLY_DEFAULTS = {"k1": (1, 1), "k2": (2, 1), "k4": (4, 3), "k7": (7, 6), "k10": (10, 6)}


@pytest.mark.parametrize(("k", "window"), FLY_DEFAULTS.values(), ids=FLY_DEFAULTS.keys())
def test_fly_default_window(k, window):
    from ears_vllm.policies import settings_at_startup, settings_for

    values = dict(EarsConfig(policy="fly").params)
    assert settings_for("fly", values, k)["fly_window_size"] == window
    assert settings_for("fly", values)["fly_window_size"] is None, "without k: as configured"
    if k < 2:
        with pytest.raises(ValueError, match="needs at least 2 speculative tokens"):
            settings_at_startup("fly", values, k)
    else:
        assert settings_at_startup("fly", values, k) == settings_for("fly", values, k)


def test_fly_at_k1_is_refused_at_startup_and_defers_nothing_in_a_step():
    from ears_vllm.policies import settings_at_startup
    from ears_vllm.seam.verification import config_for_sampler

    config = EarsConfig(policy="fly", fly_entropy_threshold=0.0)  # the default window, the gate open
    with pytest.raises(ValueError, match="needs at least 2 speculative tokens"):
        config_for_sampler(config, 1)
    with pytest.raises(ValueError, match="'fly_window_size' = 2 must be smaller than num_speculative_tokens"):
        settings_at_startup("fly", dict(EarsConfig(policy="fly", fly_window_size=2).params), 2)
    # One draft, natively rejected (u = 0.99 > p / q = 0.3), high entropy: the standard rule's answer.
    assert run([FLAT], [1], [0.99], config)[1:] == run([FLAT], [1], [0.99], EarsConfig())[1:] == (0, 0)
    assert config_for_sampler(config, 4).fly_window_size == 3
    assert config_for_sampler(EarsConfig(policy="ears"), 1) == EarsConfig(policy="ears"), "other policies: as given"


def test_fly_never_defers_a_masked_draft():
    config = EarsConfig(policy="fly", fly_window_size=1, fly_entropy_threshold=0.0)
    masked = [[0.5, 0.0, 0.5], FLAT]
    assert run(masked, [1, 1], [0.5, 0.01], config)[1:] == (0, 0)


@pytest.mark.parametrize("policy", ["sglang", "typical", "relaxed_topk", "ears"])
def test_exact_added_tv_matches_the_sampled_output(policy):
    """The closed-form added TV against the emitted token's distribution over many draws (full drafts, d ~ q)."""
    settings = {
        "sglang": dict(accept_threshold_acc=0.5),
        "typical": {},
        "relaxed_topk": dict(relaxed_topk=2),
        "ears": dict(tolerance=0.5),
    }[policy]
    p = torch.tensor([[0.45, 0.25, 0.2, 0.1]], dtype=torch.float64)
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    form: PositionForm = position_form(p, q, policy, **settings)
    n, g = 200_000, torch.Generator().manual_seed(1)
    drafts = torch.multinomial(q[0], n, replacement=True, generator=g)
    out = verify(
        p.log().float().expand(n, 4),
        drafts,
        torch.ones(n, dtype=torch.long),
        torch.zeros(n, dtype=torch.long),
        draft_probs=q.float().expand(n, 4),
        config=EarsConfig(policy=policy, **settings),
        generator=g,
        backend="torch",
    )
    emitted = torch.bincount(out.token_ids[:, 0].long(), minlength=4).double() / n
    sampled_tv = 0.5 * float((emitted - p[0]).abs().sum())
    assert sampled_tv == pytest.approx(float(form.added_tv[0]), abs=0.006)
    assert float(out.num_accepted.double().mean()) == pytest.approx(float(form.accept[0]), abs=0.005)


# Per policy with a per-position closed form, settings loose enough to relax often.
LOOSE = {
    "standard": {},
    "ears": dict(tolerance=0.5),
    "typical": {},
    "sglang": dict(accept_threshold_acc=0.5),
    "relaxed_topk": dict(relaxed_topk=3, relaxed_delta=0.6),
    "ersd": {},
}


@pytest.mark.parametrize("policy", LOOSE, ids=LOOSE)
def test_the_registry_says_where_the_relaxed_rate_is_the_added_tv(policy):
    """``relaxed_rate`` against the closed forms, on random rows: where it says exact (for one-hot drafts, or for
    any), relaxed rate = added TV at every position; where it does not, some position tells them apart (so a
    benchmark that printed its relaxed rate as added TV would print a wrong figure)."""
    from ears_vllm.policies import position_form_one_hot
    from ears_vllm.policies.registry import get_policy, relaxed_rate_label

    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(64, 8, generator=g, dtype=torch.float64) * 1.5, -1)
    q = torch.softmax(torch.randn(64, 8, generator=g, dtype=torch.float64) * 1.5, -1)
    forms = {
        True: position_form_one_hot(p, torch.multinomial(q, 1, generator=g).squeeze(-1), policy, **LOOSE[policy]),
        False: position_form(p, q, policy, **LOOSE[policy]),
    }
    for one_hot, form in forms.items():
        equal = torch.allclose(form.relaxed, form.added_tv, rtol=0, atol=1e-12)
        assert equal == (relaxed_rate_label(policy, one_hot) == "added TV"), (one_hot, get_policy(policy).relaxed_rate)


def test_fly_relaxed_rate_is_labelled_a_bound_only():
    from ears_vllm.policies.registry import relaxed_rate_label

    assert {relaxed_rate_label("fly", one_hot) for one_hot in (True, False)} == {"sequence-level bound on added TV"}
    assert relaxed_rate_label("typical", True) == relaxed_rate_label("sglang", False) == "relaxed rate"


def test_every_policy_is_registered_with_its_runners():
    assert set(POLICIES) == {
        "standard",
        "ears",
        "typical",
        "fly",
        "sglang",
        "relaxed_topk",
        "adasd",
        "ersd",
        "mars",
        "frontier",
    }
    mrv2 = {name for name, spec in POLICIES.items() if "MRV2" in spec.runners}
    assert mrv2 == set(POLICIES)  # every policy runs on MRV2 (docs/vllm-seam.md)


def race_agreement_by_definition(p: torch.Tensor, q: torch.Tensor) -> float:
    """sum_x 1 / sum_y max(p_y / p_x, q_y / q_x), over the x both distributions can pick (V^2, small V only)."""
    total = 0.0
    for x in range(len(p)):
        if p[x] > 0 and q[x] > 0:
            total += 1.0 / float(torch.maximum(p / p[x], q / q[x]).sum())
    return total


@pytest.mark.parametrize("zeros", [False, True], ids=["full-support", "disjoint-zeros"])
def test_race_agreement_equals_its_definition_and_lies_within_its_bounds(zeros):
    from ears_vllm.policies import race_agreement

    torch.manual_seed(0)
    p, q = torch.softmax(torch.randn(6, 12) * 2, -1).double(), torch.softmax(torch.randn(6, 12) * 2, -1).double()
    if zeros:  # tokens only one side can pick
        p[:, :3], q[:, 3:5] = 0.0, 0.0
        p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    agree = race_agreement(p, q)
    for row in range(6):
        assert float(agree[row]) == pytest.approx(race_agreement_by_definition(p[row], q[row]), rel=1e-9)
    overlap = torch.minimum(p, q).sum(-1)  # 1 - TV
    tv = 1 - overlap
    assert bool(((1 - tv) / (1 + tv) <= agree + 1e-12).all() and (agree <= overlap + 1e-12).all())


def test_race_agreement_by_hand_and_by_sampling():
    from ears_vllm.policies import race_agreement

    # A one-hot draft always wins its race at d, so the races agree iff the target's picks d: p(d).
    p = torch.tensor([[0.5, 0.3, 0.2]])
    assert float(race_agreement(p, torch.tensor([[0.0, 1.0, 0.0]]))) == pytest.approx(0.3)
    assert float(race_agreement(p, p)) == pytest.approx(1.0)  # the same distribution: the same winner
    # Two tokens, p = (0.5, 0.5), q = (0.75, 0.25): x=0: 1 / (1 + max(1, 1/3)) = 1/2; x=1: 1 / (max(1, 3) + 1) = 1/4.
    two = race_agreement(torch.tensor([[0.5, 0.5]]), torch.tensor([[0.75, 0.25]]))
    assert float(two) == pytest.approx(0.75)
    keys = torch.empty(200_000, 2).exponential_(generator=torch.Generator().manual_seed(1))
    agree = ((keys / torch.tensor([0.5, 0.5])).argmin(-1) == (keys / torch.tensor([0.75, 0.25])).argmin(-1)).double()
    assert float(agree.mean()) == pytest.approx(0.75, abs=0.005)


# AdaSD's learnt thresholds (policies.adasd), on scripted steps worked by hand.
@pytest.mark.parametrize(
    ("steps", "tau_acc", "tau_len"),
    [
        ([], 0.0, math.inf),  # nothing seen: no relaxation, full drafts
        # JS (0.1, 0.3) natively accepted, 0.7 the first rejection: means 0.2 and 0.7, midpoint 0.45; the third
        # draft (0.9) was not verified. Entropies 1, 2 accepted, 4 rejected: means 1.5 and 4 -> 2.75.
        ([([0.1, 0.3, 0.7, 0.9], [True, True, False, True], 2, [1.0, 2.0, 4.0, 8.0])], 0.45, 2.75),
        # Only acceptances so far: no threshold on either side.
        ([([0.1, 0.2], [True, True], 2, [1.0, 1.0])], 0.0, math.inf),
        # A relaxed acceptance (accepted, not natively) counts on the rejected side for JS, the accepted side for
        # entropy: JS accepted {0.2}, rejected {0.4, 0.6} -> (0.2 + 0.5) / 2; entropy accepted {1, 3}, rejected
        # {5} -> (2 + 5) / 2.
        ([([0.2, 0.4, 0.6], [True, False, False], 2, [1.0, 3.0, 5.0])], 0.35, 3.5),
        # A statistic that does not separate (accepted mean above rejected): no threshold.
        ([([0.8, 0.1], [True, False], 1, [6.0, 1.0])], 0.0, math.inf),
        # Two steps add up: JS accepted {0.1, 0.3}, rejected {0.5, 0.9} -> (0.2 + 0.7) / 2.
        ([([0.1, 0.5], [True, False], 1, []), ([0.3, 0.9], [True, False], 1, [])], 0.45, math.inf),
    ],
    ids=["cold", "one-step", "no-rejection-yet", "relaxed-counts-as-rejected", "not-separating", "two-steps"],
)
def test_adasd_thresholds_are_midpoints_of_what_each_request_saw(steps, tau_acc, tau_len):
    from ears_vllm.policies.adasd import AdasdState

    state = AdasdState()
    for js, native, num_accepted, entropies in steps:
        state.proposed_entropies = entropies
        state.record_step(js, native, num_accepted)
    assert state.tau_acc == pytest.approx(tau_acc) and state.tau_len == pytest.approx(tau_len)
    assert state.proposed_entropies == []


# One-hot q at d: JS^2 = ((1 - p_d) + p_d log2(2 p_d / (1 + p_d)) + log2(2 / (1 + p_d))) / 2, worked by hand:
# p_d = 0.3: (0.7 - 0.3346 + 0.6215) / 2 = 0.4934 -> 0.7025; p_d = 0.9: (0.1 - 0.0702 + 0.0740) / 2 -> 0.2278.
@pytest.mark.parametrize(
    ("p_d", "distance"), [(0.0, 1.0), (0.3, 0.7025), (0.9, 0.2278), (1.0, 0.0)], ids=["p0", "p0.3", "p0.9", "p1"]
)
def test_the_one_hot_js_distance_by_hand_and_as_the_dense_one(p_d, distance):
    from ears_vllm.policies.adasd import js_distance

    p = torch.tensor([[p_d, (1 - p_d) / 2, (1 - p_d) / 2]])
    one_hot = js_distance(p, torch.tensor([0]), None)
    dense = js_distance(p, torch.tensor([0]), torch.tensor([[1.0, 0.0, 0.0]]))
    assert float(one_hot) == pytest.approx(distance, abs=1e-4)
    assert float(one_hot) == pytest.approx(float(dense), abs=1e-6)


def test_frontier_chain_at_window_0_is_the_ears_chain():
    """The frontier rule with no window is EARS: its chained form (FLy's recursion with EARS's relaxed probability)
    gives EARS's chained mean acceptance length and relaxed acceptances."""
    from ears_vllm.bench.acceptance import chained_acceptance_length
    from ears_vllm.policies.closed_form import frontier_chain, frontier_position_form, position_form_one_hot

    g = torch.Generator().manual_seed(5)
    p = torch.softmax(torch.randn(40, 16, generator=g, dtype=torch.float64) * 2.0, -1)
    drafts = torch.multinomial(p, 1, generator=g).squeeze(-1)
    ears = position_form_one_hot(p, drafts, "ears", tolerance=0.3)
    form = frontier_position_form(p, None, drafts, tolerance=0.3)
    length, relaxed, verified = frontier_chain(form.accept, form.relaxed, 4, 0)
    assert length == pytest.approx(chained_acceptance_length(ears.accept, 4), abs=1e-12)
    assert relaxed > 0 and 1 <= verified <= 4
    assert frontier_chain(form.accept, form.relaxed, 4, 2)[0] < length  # a window relaxes less
    scaled = frontier_position_form(p, None, drafts, tolerance=0.3, frontier_scale=2.0)
    doubled = position_form_one_hot(p, drafts, "ears", tolerance=0.6)  # the scale multiplies EARS's tolerance
    assert torch.equal(scaled.relaxed, doubled.relaxed) and torch.equal(scaled.accept + scaled.relaxed, doubled.accept)


def test_relaxed_surprisal_by_hand():
    """The second axis: E[-log p(d) on a relaxed acceptance]. P = (0.5, 0.25, 0.15, 0.1), draft 3, EARS at tolerance
    1, min_ratio 0: a = 0.1 + 1 * (1 - 0.5) = 0.6, relaxed 0.5, surprisal 0.5 * -log 0.1 = 1.1513 nats."""
    from ears_vllm.policies.closed_form import position_form_one_hot

    form = position_form_one_hot(
        torch.tensor([P], dtype=torch.float64), torch.tensor([3]), "ears", tolerance=1.0, min_ratio=0.0
    )
    assert float(form.relaxed[0]) == pytest.approx(0.5)
    assert float(form.relaxed_surprisal[0]) == pytest.approx(0.5 * math.log(10.0))
