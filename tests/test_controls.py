"""Production controls without a server: per-request settings, the deviation budget, the metrics' rank rule."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

import ears_vllm
from ears_vllm.config import EarsConfig
from ears_vllm.control.budget import BudgetLedger, share_slack
from ears_vllm.control.metrics import EarsCollector, aggregate
from ears_vllm.control.requests import RequestSettings, check_limits, request_config, request_settings
from tests.triton_cpu import triton_interpreter
from tests.v1_only import make_v1_only

with triton_interpreter():  # the kernel's functions are jitted for the interpreter (backend="triton" below)
    importlib.import_module("ears_vllm.kernels.verify_kernel")

SERVER = EarsConfig(policy="ears", tolerance=0.2, request_limits={"max_tolerance": 0.5})  # the operator grants 0.5


@pytest.mark.parametrize(
    ("xargs", "expected"),
    [
        (None, RequestSettings()),
        ({"session_id": "x"}, RequestSettings()),  # other extra_args are not ours
        ({"ears_tolerance": 0}, RequestSettings(tolerance=0.0)),
        ({"ears_policy": "fly"}, RequestSettings(policy="fly")),
        ({"ears_budget": 0.03, "ears_policy": "relaxed_topk"}, RequestSettings("relaxed_topk", None, 0.03)),
    ],
    ids=["none", "foreign-key", "tolerance", "policy", "budget-and-policy"],
)
def test_request_settings_read_the_ears_keys(xargs, expected):
    assert request_settings(xargs) == expected


@pytest.mark.parametrize(
    ("xargs", "named"),
    [
        ({"ears_tolerance": 1.5}, "'ears_tolerance' = 1.5"),
        ({"ears_tolerance": -0.1}, "'ears_tolerance' = -0.1"),
        ({"ears_tolerance": math.nan}, "'ears_tolerance' = nan"),
        ({"ears_tolerance": "0.5"}, "'ears_tolerance' = '0.5'"),
        ({"ears_tolerance": True}, "'ears_tolerance' = True"),
        ({"ears_policy": "bogus"}, "'ears_policy' = 'bogus' is not one of ['standard', 'ears'"),
        ({"ears_policy": 3}, "'ears_policy' = 3"),
        ({"ears_budget": 0}, "'ears_budget' = 0"),
        ({"ears_budget": 0.1, "ears_tolerance": 0.1}, "set together"),
        ({"ears_tolerence": 0.1}, "['ears_tolerence'] are not ears-vllm keys"),
        (
            {"EARS_TOLERANCE": 0.5},
            "['EARS_TOLERANCE'] are not ears-vllm keys (keys are lowercase with underscores: ['ears_tolerance'])",
        ),
        ({"Ears-Budget": 0.1, "temperature_scale": 2}, "['Ears-Budget'] are not ears-vllm keys"),
    ],
    ids=[
        "above-1",
        "negative",
        "nan",
        "string",
        "bool",
        "unknown-policy",
        "policy-number",
        "budget-0",
        "budget-and-tolerance",
        "misspelt",
        "upper-case",
        "mixed-case-hyphen",
    ],
)
def test_bad_request_settings_name_the_key_and_what_is_allowed(xargs, named):
    with pytest.raises(ValueError, match="vllm_xargs") as info:
        request_settings(xargs)
    assert named in str(info.value)


@pytest.mark.parametrize(
    ("asked", "policy", "tolerance", "budget"),
    [
        (RequestSettings(), "ears", 0.2, None),
        (RequestSettings(tolerance=0.5), "ears", 0.5, None),
        (RequestSettings(policy="fly"), "fly", 0.2, None),
        (RequestSettings(budget=0.03), "ears", 0.0, 0.03),
        (RequestSettings(policy="relaxed_topk", budget=0.01), "relaxed_topk", 0.0, 0.01),
    ],
    ids=["default", "tolerance", "policy", "budget", "policy-and-budget"],
)
def test_request_config_is_the_server_config_with_what_the_request_asked(asked, policy, tolerance, budget):
    config = request_config(SERVER, asked)
    assert (config.policy, config.tolerance, config.budget) == (policy, tolerance, budget)


def test_a_tolerance_overrides_the_servers_budget_and_standard_drops_it():
    budgeted = EarsConfig(policy="ears", budget=0.05)
    assert request_config(budgeted, RequestSettings(tolerance=0.1)).budget is None
    assert request_config(budgeted, RequestSettings(policy="standard")).budget is None
    assert request_config(budgeted, RequestSettings()).budget == 0.05


@pytest.mark.parametrize(
    ("server", "asked", "named"),
    [
        (EarsConfig(), RequestSettings(tolerance=0.1), "vLLM's own rule"),
        (SERVER, RequestSettings(policy="fly", tolerance=0.1), "'ears_tolerance' = 0.1 applies to policy 'ears'"),
        (SERVER, RequestSettings(policy="sglang", budget=0.1), "'ears_budget'"),
        (EarsConfig(policy="ears", budget=0.05), RequestSettings(policy="typical"), "'ears_policy'"),
    ],
    ids=["standard-server", "tolerance-for-fly", "budget-for-sglang", "server-budget-for-typical"],
)
def test_settings_the_server_cannot_honour_are_refused(server, asked, named):
    with pytest.raises(ValueError, match="vllm_xargs") as info:
        request_config(server, asked)
    assert named in str(info.value)


# Operator limits (docs/operator-limits.md), worked by hand: unset, a request may verify stricter than the server
# (its policy or standard; tolerance <= the server's; budget <= the server's, none when it has none), never looser;
# a lossless request is always within them; request_limits: false refuses every ears key.
EARS_02 = EarsConfig(policy="ears", tolerance=0.2)
BUDGETED = EarsConfig(policy="ears", budget=0.05)
GRANTING = EarsConfig(
    policy="ears", tolerance=0.1, request_limits={"policies": ["fly"], "max_tolerance": 0.5, "max_budget": 0.05}
)
NO_OVERRIDES = EarsConfig(policy="ears", tolerance=0.2, request_limits=False)
NO_BUDGET = EarsConfig(policy="ears", budget=0.05, request_limits={"max_budget": 0})
_BEYOND = "is beyond this server's limit:"
LIMIT_CASES = {  # name -> (server, what the request asked, None: within the limits, else the whole message)
    "nothing-asked-no-overrides": (NO_OVERRIDES, RequestSettings(), None),
    "stricter-tolerance": (EARS_02, RequestSettings(tolerance=0.1), None),
    "the-servers-tolerance": (EARS_02, RequestSettings(tolerance=0.2), None),
    "standard": (EARS_02, RequestSettings(policy="standard"), None),
    "the-servers-policy": (EARS_02, RequestSettings(policy="ears"), None),
    "looser-tolerance": (
        EARS_02,
        RequestSettings(tolerance=0.5),
        f"vllm_xargs key 'ears_tolerance' = 0.5 {_BEYOND} at most 0.2 "
        "(ears config key 'request_limits.max_tolerance', unset: the server's tolerance)",
    ),
    "another-policy": (
        EARS_02,
        RequestSettings(policy="fly"),
        f"vllm_xargs key 'ears_policy' = 'fly' {_BEYOND} a request may choose ['standard', 'ears'] "
        "(ears config key 'request_limits.policies', unset: the server's policy and 'standard')",
    ),
    "budget-on-a-server-without": (
        EARS_02,
        RequestSettings(budget=0.05),
        f"vllm_xargs key 'ears_budget' = 0.05 {_BEYOND} no budget "
        "(ears config key 'request_limits.max_budget', unset: the server's budget, none when it has none)",
    ),
    "smaller-budget": (BUDGETED, RequestSettings(budget=0.03), None),
    "the-servers-budget": (BUDGETED, RequestSettings(budget=0.05), None),
    "larger-budget": (
        BUDGETED,
        RequestSettings(budget=0.1),
        f"vllm_xargs key 'ears_budget' = 0.1 {_BEYOND} at most 0.05 "
        "(ears config key 'request_limits.max_budget', unset: the server's budget, none when it has none)",
    ),
    "tolerance-0-on-a-budgeted-server": (BUDGETED, RequestSettings(tolerance=0.0), None),  # lossless
    "tolerance-on-a-budgeted-server": (
        BUDGETED,
        RequestSettings(tolerance=0.1),
        f"vllm_xargs key 'ears_tolerance' = 0.1 {_BEYOND} at most 0 "
        "(ears config key 'request_limits.max_tolerance', unset: the server's tolerance)",
    ),
    "lossless-ears-on-a-fly-server": (EarsConfig(policy="fly"), RequestSettings(policy="ears"), None),
    "granted-looser-tolerance": (GRANTING, RequestSettings(tolerance=0.5), None),
    "beyond-the-granted-tolerance": (
        GRANTING,
        RequestSettings(tolerance=0.6),
        f"vllm_xargs key 'ears_tolerance' = 0.6 {_BEYOND} at most 0.5 (ears config key 'request_limits.max_tolerance')",
    ),
    "granted-policy": (GRANTING, RequestSettings(policy="fly"), None),
    "policy-not-granted": (
        GRANTING,
        RequestSettings(policy="relaxed_topk"),
        f"vllm_xargs key 'ears_policy' = 'relaxed_topk' {_BEYOND} a request may choose ['standard', 'ears', 'fly'] "
        "(ears config key 'request_limits.policies')",
    ),
    "granted-budget": (GRANTING, RequestSettings(budget=0.05), None),
    "beyond-the-granted-budget": (
        GRANTING,
        RequestSettings(policy="fly", budget=0.1),
        f"vllm_xargs key 'ears_budget' = 0.1 {_BEYOND} at most 0.05 (ears config key 'request_limits.max_budget')",
    ),
    "budget-refused-by-max-budget-0": (
        NO_BUDGET,
        RequestSettings(budget=0.01),
        f"vllm_xargs key 'ears_budget' = 0.01 {_BEYOND} no budget (ears config key 'request_limits.max_budget')",
    ),
    "no-overrides-even-stricter": (
        NO_OVERRIDES,
        RequestSettings(tolerance=0.0),
        "vllm_xargs {'ears_tolerance': 0.0}: this server takes no per-request ears settings "
        "(ears config key 'request_limits' = false)",
    ),
    "no-overrides-standard": (
        NO_OVERRIDES,
        RequestSettings(policy="standard"),
        "vllm_xargs {'ears_policy': 'standard'}: this server takes no per-request ears settings "
        "(ears config key 'request_limits' = false)",
    ),
}


@pytest.mark.parametrize(("server", "asked", "message"), LIMIT_CASES.values(), ids=LIMIT_CASES.keys())
def test_a_request_is_held_to_the_operators_limits(server, asked, message):
    config = request_config(server, asked)
    if message is None:
        check_limits(server, asked, config)
        return
    with pytest.raises(ValueError) as info:
        check_limits(server, asked, config)
    assert str(info.value) == message


def test_a_ledger_has_slack_b_per_verified_position_less_what_it_spent():
    ledger = BudgetLedger(0.1)
    assert ledger.slack == 0.0
    ledger.record(verified=25, relaxed=1)
    assert ledger.slack == pytest.approx(1.5)


# One request, 4 drafts, vocab 2: p = (0.5, 0.5) everywhere, the draft is token 0 with q(0) = 1 (one-hot), so
# the native test accepts iff u <= 0.5 and EARS at tolerance 1 iff u <= 0.5 + 1 * (1 - 0.5) = 1: every native
# rejection is relaxed. With u = (0.9, 0.9, 0.2, 0.9) the uncapped step accepts all four, relaxing positions
# 0, 1 and 3. Under budget B with slack s, the j-th relaxed acceptance at position i needs j <= s + B * (i + 1).
U_ALL_RELAXABLE = [0.9, 0.9, 0.2, 0.9]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    ("budget", "slack", "accepted", "relaxed"),
    [
        (0.0, 0.0, 4, 3),  # no budget: uncapped
        (0.5, 0.0, 0, 0),  # position 0: 1 <= 0 + 0.5? no
        (0.5, 0.5, 1, 1),  # 1 <= 1.0 at 0; position 1: 2 <= 1.5? no
        (0.5, 1.0, 4, 3),  # 1 <= 1.5, 2 <= 2.0, (2 native), 3 <= 3.0
        (0.25, 1.0, 1, 1),  # 1 <= 1.25 at 0; position 1: 2 <= 1.5? no
        (1.0, -3.0, 0, 0),  # overspent: 1 <= -2? no
    ],
    ids=["no-budget", "no-slack", "half-slack", "enough", "quarter", "overspent"],
)
def test_the_budget_caps_relaxed_acceptances_by_hand(budget, slack, accepted, relaxed, backend, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    logits = torch.zeros(4, 2)
    out = ears_vllm.verify(
        logits,
        torch.zeros(4, dtype=torch.long),
        [4],
        torch.tensor([1]),
        uniform=torch.tensor(U_ALL_RELAXABLE, dtype=torch.float64),
        recovery_noise=torch.ones(1, 2),
        tolerance=torch.tensor([1.0], dtype=torch.float64),
        budget=torch.tensor([budget], dtype=torch.float64),
        budget_slack=torch.tensor([slack], dtype=torch.float64),
        config=EarsConfig(policy="ears", tolerance=1.0),
        backend=backend,
    )
    assert (out.num_accepted.item(), out.num_relaxed.item()) == (accepted, relaxed)
    if accepted < 4:  # a capped position is rejected as the standard rule rejects it: the residual, token 1
        assert out.token_ids[0, accepted].item() == 1


def test_a_budget_of_zero_slack_and_rate_is_the_standard_step():
    torch.manual_seed(0)
    logits, ids = torch.randn(12, 16) * 2, torch.randint(0, 16, (12,))
    args = dict(uniform=torch.rand(12, dtype=torch.float64), recovery_noise=torch.empty(3, 16).exponential_())
    standard = ears_vllm.verify(logits, ids, [4, 4, 4], torch.zeros(3, dtype=torch.long), **args, backend="torch")
    capped = ears_vllm.verify(
        logits,
        ids,
        [4, 4, 4],
        torch.zeros(3, dtype=torch.long),
        **args,
        backend="torch",
        config=EarsConfig(policy="ears", tolerance=1.0),
        tolerance=torch.ones(3, dtype=torch.float64),
        budget=torch.full((3,), 1e-9, dtype=torch.float64),
        budget_slack=torch.zeros(3, dtype=torch.float64),
    )
    assert torch.equal(standard.token_ids, capped.token_ids) and capped.num_relaxed.sum() == 0


@pytest.mark.parametrize("policy", ["relaxed_topk", "fly"])
def test_a_budget_caps_sampled_rows_only_greedy_rows_relax_uncapped(policy):
    """As documented (README, control/budget.py): the ledger is a sampled request's; fly and relaxed_topk also relax
    greedy rows, as their sources do, and a budget leaves those uncapped (counted apart, greedy_relaxed)."""
    p = [[0.45, 0.35, 0.2], [0.34, 0.33, 0.33], [0.34, 0.33, 0.33]]  # drafts 1 (not the argmax), then 0 and 0
    logits = torch.tensor(p * 2).log()
    settings = dict(fly_window_size=2, fly_entropy_threshold=0.0) if policy == "fly" else {}
    out = ears_vllm.verify(
        logits,
        torch.tensor([1, 0, 0] * 2),
        [3, 3],
        torch.tensor([2, 2]),
        is_greedy=torch.tensor([False, True]),
        uniform=torch.tensor([0.9, 0.1, 0.1] * 2, dtype=torch.float64),
        recovery_noise=torch.ones(2, 3),
        config=EarsConfig(policy=policy, budget=0.01, **settings),
        backend="torch",
    )
    # The sampled row: the relaxed acceptance at position 0 does not fit in 0 + 0.01 * 1, so it is rejected.
    assert (out.num_accepted[0].item(), out.num_relaxed[0].item()) == (0, 0)
    assert out.num_relaxed[1].item() >= 1  # the greedy row: a draft other than the argmax accepted, uncapped


def test_a_long_run_under_a_budget_stays_at_or_under_it():
    """Steps of a chain at T=1 with a real ledger: R <= B V after every step, and R ends within one of B V."""
    torch.manual_seed(1)
    ledger, config = BudgetLedger(0.05), EarsConfig(policy="ears", budget=0.05)
    for _ in range(200):
        logits, draft = torch.randn(5, 32), torch.softmax(torch.randn(5, 32), -1)
        out = ears_vllm.verify(
            logits,
            torch.multinomial(draft, 1).squeeze(1),
            [5],
            torch.zeros(1, dtype=torch.long),
            draft_probs=draft,
            config=config,
            budget=torch.tensor([0.05], dtype=torch.float64),
            budget_slack=torch.tensor([ledger.slack], dtype=torch.float64),
            backend="torch",
        )
        accepted = out.num_accepted.item()
        ledger.record(accepted + (accepted < 5), out.num_relaxed.item())
        assert ledger.relaxed <= 0.05 * ledger.verified + 1e-9
    assert ledger.relaxed >= 0.05 * ledger.verified - 1


# The pool's deal: whole units one pooled row at a time from the rotation's start, then the fraction.
@pytest.mark.parametrize(
    ("slack", "pooled", "start", "shares"),
    [
        (3.5, [1, 0, 1, 1, 1], 1, [0.5, 0, 1, 1, 1]),  # pooled rows 0,2,3,4; the deal starts at row 2
        (9.25, [1, 1, 1], 0, [3.25, 3, 3]),  # more units than rows: around again
        (0.75, [1, 1], 1, [0, 0.75]),  # no whole unit: the fraction to the row whose turn it is
        (-0.5, [1, 1], 0, [0, 0]),  # nothing to deal
        (2.0, [0, 0], 0, [0, 0]),  # no pooled row
    ],
    ids=["fraction-last", "around-again", "fraction-only", "overspent", "no-pooled-row"],
)
def test_the_pool_is_dealt_in_whole_units_by_turn(slack, pooled, start, shares):
    dealt = share_slack(torch.tensor(slack, dtype=torch.float64), torch.tensor(pooled, dtype=torch.bool), start)
    assert dealt.tolist() == shares


def _pooled_and_per_request_run(budget: float, requests: int, steps: int) -> tuple[BudgetLedger, list[BudgetLedger]]:
    """The same chains verified under one pool and under per-request ledgers (V1's verify_rows, T=1 drafts)."""
    from ears_vllm.control.requests import RequestControl
    from ears_vllm.control.rows import verify_rows

    config = EarsConfig(policy="ears", budget=budget)
    pool, own = BudgetLedger(budget, shared=True), [BudgetLedger(budget) for _ in range(requests)]
    generator = torch.Generator().manual_seed(2)
    for _ in range(steps):
        logits = torch.randn(requests * 4, 32, generator=generator)
        draft = torch.softmax(torch.randn(requests * 4, 32, generator=generator), -1)
        args = dict(
            target_logits=logits,
            draft_token_ids=torch.multinomial(draft, 1, generator=generator).squeeze(1),
            num_draft_tokens=[4] * requests,
            bonus_token_ids=torch.zeros(requests, dtype=torch.long),
            draft_probs=draft,
            is_greedy=torch.zeros(requests, dtype=torch.bool),
            uniform=torch.rand(requests * 4, dtype=torch.float64, generator=generator),
            noise=torch.empty(requests, 32).exponential_(generator=generator),
            max_spec_len=4,
        )
        for ledgers in ([pool] * requests, own):
            out = verify_rows([RequestControl(config, ledger) for ledger in ledgers], **args)
            counts = zip(ledgers, out.num_accepted.tolist(), out.num_relaxed.tolist(), strict=True)
            for ledger, accepted, relaxed in counts:
                ledger.record(accepted + (accepted < 4), relaxed)
            assert all(ledger.relaxed <= budget * ledger.verified + 1e-9 for ledger in ledgers)  # after every step
    return pool, own


def test_a_pooled_budget_is_spent_to_within_one_acceptance_where_per_request_ledgers_floor():
    """Eight requests of 40 steps at B = 0.02: each request's own ledger allows floor(0.02 V) (about 1) relaxed
    acceptances, the pool the fractions too."""
    pool, own = _pooled_and_per_request_run(0.02, requests=8, steps=40)
    assert 0.02 * pool.verified - 1 <= pool.relaxed <= 0.02 * pool.verified
    assert all(ledger.relaxed <= math.floor(0.02 * ledger.verified) for ledger in own)
    assert sum(ledger.relaxed for ledger in own) < pool.relaxed
    assert pool.steps == 40  # dealt out once per step


@pytest.mark.parametrize(
    ("scope", "asked", "shared"),
    [("server", {}, True), ("server", {"ears_budget": 0.05}, False), ("request", {}, False)],
    ids=["server-scope", "own-budget", "request-scope"],
)
def test_requests_on_the_servers_budget_share_its_pool_when_it_is_server_scoped(monkeypatch, scope, asked, shared):
    from vllm.sampling_params import SamplingParams

    from ears_vllm.seam import vllm_requests

    monkeypatch.setattr(vllm_requests, "_pools", {})
    # The operator grants the larger budget one case asks; the server is the one the request check reads (not one
    # an earlier test of this process noted).
    server = EarsConfig(policy="ears", budget=0.02, budget_scope=scope, request_limits={"max_budget": 0.05})
    monkeypatch.setattr(vllm_requests, "server_config", server)
    monkeypatch.setattr(vllm_requests, "server_runner", "V1")
    first, second = (
        vllm_requests.new_control(server, SamplingParams(temperature=1.0, extra_args=asked), "r") for _ in range(2)
    )
    assert (first.ledger is second.ledger) == shared and first.ledger.shared == shared
    assert first.tolerance == 1.0  # the budgeted tolerance: the cap bounds it


@pytest.mark.parametrize(
    ("ranks", "expected_steps"),
    [([0], 3), ([0, 1], 3), ([0, 1, 0, 1], 6)],
    ids=["one-worker", "tp2", "two-tp2-groups"],
)
def test_each_step_is_counted_once_whatever_the_tensor_parallelism(ranks, expected_steps):
    replies = [{"counts": {"steps": 3, "by_policy": {"ears": {"accepted": 5}}}, "tp_rank": r} for r in ranks]
    total = aggregate(replies)
    assert total["steps"] == expected_steps
    assert total["by_policy"]["ears"]["accepted"] == 5 * expected_steps // 3


def test_the_collector_serves_counters_by_policy_and_the_running_rate():
    from prometheus_client import CollectorRegistry, generate_latest

    collector = EarsCollector()
    collector.totals = {
        "steps": 7,
        "invalid": 1,
        "by_policy": {"ears": {"random_verified": 40, "relaxed": 2, "accepted": 30}},
    }
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    for line in (
        "ears_vllm_verification_steps_total 7.0",
        'ears_vllm_relaxed_acceptances_total{policy="ears"} 2.0',
        'ears_vllm_verified_positions_total{policy="ears"} 40.0',
        "ears_vllm_invalid_drafts_total 1.0",
        'ears_vllm_relaxed_per_verified_position{policy="ears"} 0.05',
    ):
        assert line in text


@pytest.mark.parametrize(
    ("runner", "server", "xargs", "named"),
    [
        ("V1", SERVER, {"ears_tolerance": 2}, "'ears_tolerance' = 2"),
        ("V1", EarsConfig(), {"ears_policy": "ears"}, "vLLM's own rule"),
        ("MRV2", SERVER, {"ears_policy": "typical"}, "this server runs vLLM's Model Runner V2: policy 'typical' is"),
        ("MRV2", EarsConfig(policy="ersd"), {"ears_policy": "ears"}, "races every request of a batch on its keys"),
        ("V1", EARS_02, {"ears_tolerance": 0.5}, "'ears_tolerance' = 0.5 is beyond this server's limit: at most 0.2"),
        ("MRV2", EARS_02, {"ears_budget": 0.05}, "'ears_budget' = 0.05 is beyond this server's limit: no budget"),
    ],
    ids=[
        "bad-value",
        "standard-server",
        "mrv2-policy",
        "mrv2-keyed-server",
        "beyond-limit",
        "mrv2-beyond-limit",
    ],
)
def test_vllm_refuses_bad_xargs_where_it_builds_the_sampling_params(monkeypatch, runner, server, xargs, named):
    make_v1_only(monkeypatch)  # typical: the policy MRV2 cannot run
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    from ears_vllm.seam import vllm_requests

    vllm_requests.install_request_check()
    monkeypatch.setattr(vllm_requests, "server_config", server)
    monkeypatch.setattr(vllm_requests, "server_runner", runner)
    with pytest.raises(VLLMValidationError, match="vllm_xargs") as info:
        SamplingParams(temperature=1.0, extra_args=xargs)
    assert named in str(info.value)
    SamplingParams(temperature=1.0, extra_args={"session_id": "a"})  # no ears keys: nothing to check
    if server is SERVER:  # it grants tolerance 0.5
        SamplingParams(temperature=1.0, extra_args={"ears_tolerance": 0.5, "ears_policy": "ears"})  # any runner
        SamplingParams(temperature=1.0, extra_args={"ears_policy": "standard"})  # another policy, MRV2 too


def test_a_fly_request_may_run_under_a_budget_on_either_runner(monkeypatch):
    """FLy's deferral is capped where the MRV2 walk defers (as the fused kernel caps it where it decides it)."""
    from vllm.sampling_params import SamplingParams

    from ears_vllm.seam import vllm_requests

    vllm_requests.install_request_check()
    monkeypatch.setattr(vllm_requests, "server_config", EarsConfig(policy="fly", request_limits={"max_budget": 0.1}))
    for runner in ("V1", "MRV2"):
        monkeypatch.setattr(vllm_requests, "server_runner", runner)
        SamplingParams(temperature=1.0, extra_args={"ears_budget": 0.1})


def test_recent_requests_keep_each_requests_counts_and_forget_the_oldest():
    from ears_vllm.stats import RecentRequests
    from ears_vllm.step import StepCounts

    recent = RecentRequests(limit=2)
    recent.record(
        "cmpl-a-0-x1",
        "ears",
        StepCounts(
            drafts=4,
            accepted=2,
            random_drafts=4,
            random_accepted=2,
            relaxed=1,
            random_verified=3,
            greedy_relaxed=0,
            relaxed_surprisal_micronats=1203973,
        ),
    )
    recent.record(
        "cmpl-a-0-x1",
        "ears",
        StepCounts(
            drafts=4,
            accepted=1,
            random_drafts=4,
            random_accepted=1,
            relaxed=0,
            random_verified=2,
            greedy_relaxed=0,
            relaxed_surprisal_micronats=0,
        ),
    )
    recent.record(
        "cmpl-b-0-x2",
        "ears",
        StepCounts(
            drafts=4,
            accepted=0,
            random_drafts=4,
            random_accepted=0,
            relaxed=0,
            random_verified=1,
            greedy_relaxed=0,
            relaxed_surprisal_micronats=0,
        ),
    )
    assert recent.starting_with("cmpl-a-")["cmpl-a-0-x1"] | {} == {
        "policy": "ears",
        "drafts": 8,
        "accepted": 3,
        "random_drafts": 8,
        "random_accepted": 3,
        "relaxed": 1,
        "random_verified": 5,
        "greedy_relaxed": 0,
        "relaxed_surprisal_micronats": 1203973,
    }
    recent.record(
        "cmpl-c-0-x3",
        "ears",
        StepCounts(
            drafts=1,
            accepted=1,
            random_drafts=1,
            random_accepted=1,
            relaxed=0,
            random_verified=1,
            greedy_relaxed=0,
            relaxed_surprisal_micronats=0,
        ),
    )
    assert recent.starting_with("cmpl-a-") == {}  # the oldest went


def test_a_responses_counts_are_found_by_its_id_and_choice():
    from ears_vllm.control.metrics import choices_of

    replies = [{"counts": {"cmpl-r1-0-1a2b3c4d": {"relaxed": 2}, "cmpl-r1-1-9f8e7d6c": {"relaxed": 0}}}]
    assert choices_of("cmpl-r1", replies) == {"0": {"relaxed": 2}, "1": {"relaxed": 0}}
