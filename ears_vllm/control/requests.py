"""Per-request settings: OpenAI ``vllm_xargs`` (vLLM ``SamplingParams.extra_args``) that override the
server's ears config for one request.

Keys: ``ears_policy`` (one of the registry's policies), ``ears_tolerance`` (EARS's beta, in [0, 1]; for policy
ears), ``ears_budget`` (a deviation budget in (0, 1], :mod:`ears_vllm.control.budget`; for the policies whose
only deviation is added acceptances). A request without them follows the server's config. They apply to
sampled requests only: a greedy request (temperature 0) is verified as the server verifies greedy requests,
whatever it asks. They are checked when vLLM builds the request's ``SamplingParams`` in the API server, so a
bad value is answered with HTTP 400 naming the key and what is allowed, before the request is scheduled; so is a
value beyond the operator's limits (:func:`check_limits`; ears config key ``request_limits``, which unset lets a
request verify only stricter than the server: docs/operator-limits.md).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from ears_vllm.config import BUDGET, BUDGET_POLICIES, EarsConfig
from ears_vllm.control.budget import BUDGETED_TOLERANCE, BudgetLedger
from ears_vllm.control.limits import KEY as LIMITS_KEY
from ears_vllm.policies import POLICIES, get_policy
from ears_vllm.policies.adasd import AdasdState

XARGS = ("ears_policy", "ears_tolerance", "ears_budget")


@dataclasses.dataclass(frozen=True)
class RequestSettings:
    """What one request asked for (None: the server's setting)."""

    policy: str | None = None
    tolerance: float | None = None
    budget: float | None = None

    @property
    def empty(self) -> bool:
        return self.policy is None and self.tolerance is None and self.budget is None

    @property
    def asked(self) -> dict[str, Any]:
        """The ``vllm_xargs`` keys it set, with their values."""
        values = {"ears_policy": self.policy, "ears_tolerance": self.tolerance, "ears_budget": self.budget}
        return {key: value for key, value in values.items() if value is not None}


def request_settings(extra_args: Mapping[str, Any] | None) -> RequestSettings:
    """The ears keys of a request's ``extra_args``, checked alone (ValueError naming the key and the allowed
    values); :func:`request_config` checks them against the server's config."""
    if not extra_args:
        return RequestSettings()
    # Any key that reads as an ears key once lowercased ("EARS_TOLERANCE", "Ears-Budget") but is not one exactly is
    # refused by name: silently ignored, it would leave the request on the server's settings.
    unknown = sorted(k for k in extra_args if isinstance(k, str) and _ears_like(k) and k not in XARGS)
    if unknown:
        meant = sorted({_ears_like(k) for k in unknown} & set(XARGS))
        hint = f" (keys are lowercase with underscores: {meant})" if meant else ""
        raise ValueError(f"vllm_xargs key(s) {unknown} are not ears-vllm keys{hint}; allowed: {list(XARGS)}")
    policy = extra_args.get("ears_policy")
    if policy is not None and (not isinstance(policy, str) or policy not in POLICIES):
        raise ValueError(f"vllm_xargs key 'ears_policy' = {policy!r} is not one of {list(POLICIES)}")
    tolerance = _number(
        "ears_tolerance", extra_args.get("ears_tolerance"), "a number in [0, 1]", lambda x: 0.0 <= x <= 1.0
    )
    budget = _number(
        "ears_budget", extra_args.get("ears_budget"), f"a number in (0, 1] ({BUDGET.doc})", lambda x: 0.0 < x <= 1.0
    )
    if tolerance is not None and budget is not None:
        raise ValueError(
            f"vllm_xargs keys 'ears_tolerance' = {tolerance!r} and 'ears_budget' = {budget!r} are set "
            "together; a budget makes the server find the tolerance: give one of them"
        )
    return RequestSettings(policy, tolerance, budget)


def _ears_like(key: str) -> str | None:
    """``key`` lowercased with ``-`` as ``_``, where that starts with ``ears_``; else None."""
    normal = key.lower().replace("-", "_")
    return normal if normal.startswith("ears_") else None


def _number(key: str, value: Any, allowed: str, ok) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not ok(value):
        raise ValueError(f"vllm_xargs key {key!r} = {value!r} is not allowed; allowed: {allowed}")
    return float(value)


def request_config(server: EarsConfig, asked: RequestSettings) -> EarsConfig:
    """The config a sampled request is verified with: the server's, with what the request asked for.

    ValueError (naming the key) for a combination the server cannot honour: per-request settings on a server
    where vLLM's own rule verifies (policy standard), a tolerance for a policy that has none, a budget for a
    policy that can deviate otherwise than by added acceptances."""
    if asked.empty:
        return server
    if get_policy(server.policy).vllms_rule:
        raise ValueError(
            "vllm_xargs ears_*: this server verifies with vLLM's own rule (ears policy 'standard'), so it takes no "
            'per-request ears settings; start it with an ears policy, e.g. {"policy": "ears", "tolerance": 0} in '
            "--additional-config's ears section (lossless unless a request asks otherwise)"
        )
    policy = asked.policy or server.policy
    spec = get_policy(policy)
    if asked.tolerance is not None and "tolerance" not in spec.params:
        raise ValueError(
            f"vllm_xargs key 'ears_tolerance' = {asked.tolerance!r} applies to policy 'ears'; this "
            f"request is verified with policy {policy!r}, which has no tolerance"
        )
    budget = asked.budget if asked.budget is not None else (server.budget if asked.tolerance is None else None)
    if spec.vllms_rule:  # lossless: nothing to budget
        budget = None
    if budget is not None and not spec.only_adds_acceptances:
        key = "ears_budget" if asked.budget is not None else "ears_policy"
        raise ValueError(
            f"vllm_xargs key {key!r}: a deviation budget ({budget!r}, "
            f"{'this request' if asked.budget is not None else 'the server'}'s) needs a policy whose "
            f"only deviation is added acceptances, one of {list(BUDGET_POLICIES)}; policy {policy!r} "
            "is not one"
        )
    overrides: dict[str, Any] = {"policy": policy, "budget": budget}
    if asked.tolerance is not None:
        overrides["tolerance"] = asked.tolerance
    elif budget is not None:
        overrides["tolerance"] = 0.0
    return server.merged(overrides)


def check_limits(server: EarsConfig, asked: RequestSettings, config: EarsConfig) -> None:
    """ValueError unless what a request ``asked`` (which gives it ``config``, :func:`request_config`) is within the
    server's ``request_limits``; the message names the key and value asked, the limit and the config key setting it.

    A request made lossless (``config``) is within any limits but ``request_limits: false``: nothing is stricter."""
    if asked.empty:
        return
    granted = server.granted
    if not granted.overrides:
        raise ValueError(
            f"vllm_xargs {asked.asked!r}: this server takes no per-request ears settings "
            f"(ears config key '{LIMITS_KEY}' = false)"
        )
    if config.is_lossless:
        return
    beyond = "is beyond this server's limit:"
    if asked.policy is not None and asked.policy not in granted.policies:
        raise ValueError(
            f"vllm_xargs key 'ears_policy' = {asked.policy!r} {beyond} a request may choose "
            f"{list(granted.policies)} ({granted.source('policies')})"
        )
    if asked.tolerance is not None and asked.tolerance > granted.max_tolerance:
        raise ValueError(
            f"vllm_xargs key 'ears_tolerance' = {asked.tolerance!r} {beyond} at most {granted.max_tolerance:g} "
            f"({granted.source('max_tolerance')})"
        )
    if asked.budget is not None and (granted.max_budget is None or asked.budget > granted.max_budget):
        limit = "no budget" if granted.max_budget is None else f"at most {granted.max_budget:g}"
        raise ValueError(
            f"vllm_xargs key 'ears_budget' = {asked.budget!r} {beyond} {limit} ({granted.source('max_budget')})"
        )


@dataclasses.dataclass
class RequestControl:
    """How one request is verified: its config, and its budget ledger when it runs under a budget."""

    config: EarsConfig
    ledger: BudgetLedger | None
    adasd: AdasdState | None = None  # AdaSD's learnt thresholds (policy adasd, sampled requests)
    race_seed: int | None = None  # ERSD's key seed (a keyed policy, sampled requests; seam.vllm_races)

    @property
    def tolerance(self) -> float:
        """The per-request relaxation it is verified with: AdaSD's learnt JS threshold; under a budget the
        budgeted tolerance (the cap bounds it); else its config's."""
        if self.adasd is not None:
            return self.adasd.tau_acc
        return BUDGETED_TOLERANCE if self.ledger is not None else self.config.tolerance

    @property
    def budget(self) -> float:
        """Its budget B, 0 without one."""
        return self.ledger.budget if self.ledger is not None else 0.0
