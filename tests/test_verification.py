"""The one decision: does ears-vllm verify on this runner, and if not, why (ears_vllm.seam.verification)."""

from __future__ import annotations

import logging

import pytest

from ears_vllm.config import EarsConfig
from ears_vllm.seam.verification import UnsupportedPolicyError, enforce, plan_verification
from tests.v1_only import make_v1_only

EARS = EarsConfig(policy="ears", tolerance=0.1)
EARS_FALLBACK = EarsConfig(policy="ears", tolerance=0.1, on_unsupported="fallback")

# (runner, config, what vLLM was asked for) -> (verifies, refuses, words of the reason)
PLANS = {
    "standard-never-refuses": ("V1", EarsConfig(), dict(hook_problem="moved"), False, False, "vLLM's own rule"),
    "ears-on-v1": ("V1", EARS, {}, True, False, "policy 'ears' on vLLM 0.33.0"),
    "ears-on-mrv2": ("MRV2", EARS, {}, True, False, "policy 'ears' on vLLM 0.33.0"),
    "typical-on-v1": ("V1", EarsConfig(policy="typical"), {}, True, False, "policy 'typical'"),
    "typical-on-mrv2-refuses": (
        "MRV2",
        EarsConfig(policy="typical"),
        {},
        False,
        True,
        "policy 'typical' is not available on the MRV2 runner (it is on ['V1'])",
    ),
    "typical-on-a-release-without-v1": (
        "MRV2",
        EarsConfig(policy="typical"),
        dict(installed_runners=("MRV2",), vllm_version="0.34.0"),
        False,
        True,
        "(it is on ['V1']), which vLLM 0.34.0 does not have",
    ),
    "moved-hook-refuses": (
        "V1",
        EARS,
        dict(hook_problem="rejection_sample has parameters ('x',)"),
        False,
        True,
        "vLLM 0.33.0 moved the V1 hook: rejection_sample has parameters ('x',)",
    ),
    "moved-hook-falls-back": ("V1", EARS_FALLBACK, dict(hook_problem="gone"), False, False, "moved the V1 hook"),
    # What the user asked of vLLM itself runs, named beside the policy: a warning, never a refusal.
    "vllm-fly-is-vllms": (
        "V1",
        EARS,
        dict(method="fly"),
        False,
        False,
        "method='fly', its own rule, which does not combine with ears policy 'ears'",
    ),
    "vllm-block-is-vllms": ("MRV2", EARS, dict(method="block"), False, False, "method='block'"),
    "vllm-synthetic-is-vllms": ("V1", EARS, dict(method="synthetic"), False, False, "method='synthetic'"),
    "watermarking-is-vllms": ("MRV2", EARS, dict(watermarking=True), False, False, "watermark the output"),
    "no-method-is-standard": ("V1", EARS, dict(method=None), True, False, "policy 'ears'"),
}


@pytest.mark.parametrize(
    ("runner", "config", "asked", "verifies", "refuses", "reason"), PLANS.values(), ids=PLANS.keys()
)
def test_plan(runner, config, asked, verifies, refuses, reason, monkeypatch):
    make_v1_only(monkeypatch)  # typical: the policy MRV2 cannot run
    plan = plan_verification(runner, config, **({"vllm_version": "0.33.0", "hook_problem": None} | asked))
    assert (plan.runner, plan.verifies, plan.refuses) == (runner, verifies, refuses)
    assert reason in plan.reason


def test_a_refusal_names_the_version_the_runner_the_reason_and_the_way_out():
    plan = plan_verification("MRV2", EARS, vllm_version="0.34.0", hook_problem="_rejection_kernel changed")
    with pytest.raises(UnsupportedPolicyError) as error:
        enforce(plan, logging.getLogger("test"))
    message = str(error.value)
    assert "vLLM 0.34.0" in message and "runner MRV2" in message and "_rejection_kernel changed" in message
    assert '"on_unsupported": "fallback"' in message


def test_a_fallback_warns_and_standard_is_silent(caplog):
    logger = logging.getLogger("test-fallback")
    with caplog.at_level(logging.INFO, logger="test-fallback"):
        enforce(plan_verification("V1", EARS_FALLBACK, vllm_version="0.33.0", hook_problem="gone"), logger)
        enforce(plan_verification("V1", EarsConfig(), vllm_version="0.33.0", hook_problem="gone"), logger)
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == "ears-vllm: vLLM 0.33.0 moved the V1 hook: gone; runner V1 runs vLLM's own rule"


def test_on_unsupported_is_validated():
    with pytest.raises(ValueError, match=r"'on_unsupported' = 'ignore' is not one of \['error', 'fallback'\]"):
        EarsConfig.from_dict({"policy": "ears", "on_unsupported": "ignore"})
