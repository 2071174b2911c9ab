"""Closed forms, per draft position: the probability of acceptance, of a relaxed acceptance, and the exact
total-variation distance a policy adds to the output distribution.

For a policy whose decision at a position depends on that position alone (``PolicySpec.accept_probability``),
averaging over ``d ~ q`` and ``u ~ U[0, 1)`` gives, per candidate token ``x``, an acceptance probability
``a(x)``; the emitted distribution is then ``out = q * a + (1 - sum q a) * R`` where ``R`` is the recovery
(the residual ``norm(max(p - q, 0))``, the target without the rejected draft, or the argmax), so its
distance from ``p`` is exact and O(V); ERSD's emitted token is always the target's race winner, so its output is
p itself. For a policy that only adds acceptances and recovers like the
standard rule (ears, relaxed_topk; sglang with one-hot drafts) the relaxed probability equals that
distance: the policy's output is the standard rule's (which is p) plus the relaxed mass moved from the residual's
support onto the drafts, two disjoint sets. For typical and for sglang with sampled drafts it does not, and
``added_tv`` says by how much. ``PolicySpec.relaxed_rate`` records which is which, for every label a benchmark
prints; a test holds it to these forms. FLy decides from the next W positions too: no per-position form
(:func:`fly_chain` gives its chained expectation under independent positions).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from ears_vllm.policies.registry import PARAMS, get_policy
from ears_vllm.policies.rules import fly_entropy, standard_probability


class PositionForm(NamedTuple):
    accept: torch.Tensor  # [n] P(the draft is accepted)
    relaxed: torch.Tensor  # [n] P(accepted where the standard test with the same u rejects)
    added_tv: torch.Tensor  # [n] TV(output distribution, p)
    # [n] E[-log p(d) on a relaxed acceptance, 0 otherwise] (nats): the second deviation axis, which sees where the
    # moved mass goes (a relaxed draft with p(d) = 1e-4 costs more than one with 0.3); None where not computed.
    relaxed_surprisal: torch.Tensor | None = None


def surprisal(p: torch.Tensor) -> torch.Tensor:  # any shape -> same shape
    """``-log p`` in nats, 0 where ``p = 0`` (no policy that only adds acceptances relaxes a masked draft)."""
    return torch.where(p > 0, -p.clamp_min(1e-300).log(), torch.zeros_like(p))


# Per-row inputs a closed form may read beside the settings (not settings themselves): MARS's two largest logits.
ROW_INPUTS = ("top2_logits",)


def _settings(policy: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    spec = get_policy(policy)
    settings = {name: overrides.get(name, PARAMS[name].default) for name in spec.params}
    return settings | {name: overrides[name] for name in ROW_INPUTS if name in overrides}


def token_acceptance(
    p: torch.Tensor,  # [n, m] float64 target probability of m candidate draft tokens
    q: torch.Tensor,  # [n, m] float64 their draft probability (1 for a one-hot drafter's draft)
    row: torch.Tensor,  # [n, V] float64 the whole target row (max p, entropy, top-k)
    policy: str,
    settings: Mapping[str, Any],
) -> tuple[torch.Tensor, torch.Tensor]:  # ([n, m], [n, m]): the policy's a(x) and the standard min(1, p/q)
    """Probability over ``u`` that candidate draft token ``x`` is accepted (random rows), from the policy's
    ``accept_probability`` in the registry."""
    closed_form = get_policy(policy).accept_probability
    if closed_form is None:
        raise ValueError(f"policy {policy!r} has no per-position closed form (its decision looks at other positions)")
    standard = standard_probability(p, q)
    return closed_form(p, q, row, standard, _settings(policy, settings)), standard


def position_form(
    target_probs: torch.Tensor,  # [n, V]
    draft_probs: torch.Tensor,  # [n, V]
    policy: str,
    **settings: Any,
) -> PositionForm:
    """Exact per-position acceptance, relaxed acceptance and added TV for a drafter sampling ``d ~ q``."""
    p, q = target_probs.to(torch.float64), draft_probs.to(torch.float64)
    a, standard = token_acceptance(p, q, p, policy, settings)
    accept = (q * a).sum(-1)
    if get_policy(policy).recovery == "race":  # every emitted token is the target's race winner: exactly p
        zeros = torch.zeros_like(accept)
        return PositionForm(accept, zeros, zeros, zeros)
    relaxed_per_token = q * (a - standard).clamp_min(0.0)  # [n, V]
    relaxed = relaxed_per_token.sum(-1)
    rejected = (1.0 - accept).unsqueeze(-1)
    recovery = get_policy(policy).recovery
    if recovery == "residual":
        residual = (p - q).clamp_min(0.0)
        mass = residual.sum(-1, keepdim=True)
        out = q * a + rejected * torch.where(mass > 0, residual / mass.clamp_min(1e-300), torch.zeros_like(p))
    elif recovery == "one_hot_residual":
        # sum_d q(d) (1 - a(d)) * p without d, renormalised: p(x) * (C - q(x) (1 - a(x)) / (1 - p(x))).
        weight = torch.where(p < 1.0, q * (1.0 - a) / (1.0 - p).clamp_min(1e-300), torch.zeros_like(p))
        out = q * a + p * (weight.sum(-1, keepdim=True) - weight)
    else:  # argmax
        out = q * a + rejected * torch.nn.functional.one_hot(p.argmax(-1), p.shape[-1]).to(p.dtype)
    return PositionForm(accept, relaxed, 0.5 * (out - p).abs().sum(-1), (relaxed_per_token * surprisal(p)).sum(-1))


def position_form_one_hot(
    target_probs: torch.Tensor,  # [n, V]
    draft_ids: torch.Tensor,  # [n] the drafts of a one-hot drafter (greedy drafting, n-gram)
    policy: str,
    **settings: Any,
) -> PositionForm:
    """:func:`position_form` for ``q = one-hot(d)``, without building the ``[n, V]`` one-hot rows."""
    p = target_probs.to(torch.float64)
    d = draft_ids.long().unsqueeze(-1)
    p_d = p.gather(-1, d)  # [n, 1]
    a, _ = token_acceptance(p_d, torch.ones_like(p_d), p, policy, settings)
    a, p_d = a.squeeze(-1), p_d.squeeze(-1)
    if get_policy(policy).recovery == "race":
        zeros = torch.zeros_like(a)
        return PositionForm(a, zeros, zeros, zeros)
    relaxed = (a - p_d).clamp_min(0.0)
    if get_policy(policy).recovery == "argmax":
        p_max, argmax = p.max(-1)
        is_argmax = argmax == d.squeeze(-1)
        apart = 0.5 * ((a - p_d).abs() + (1.0 - a - p_max).abs() + (1.0 - p_d - p_max))
        added_tv = torch.where(is_argmax, 1.0 - p_max, apart)
    else:  # with a one-hot q both residuals are p without d: out(x) = p(x) (1 - a) / (1 - p(d)) off d
        added_tv = (a - p_d).abs()
    return PositionForm(a, relaxed, added_tv, relaxed * surprisal(p_d))


def fly_chain(
    accept: torch.Tensor,  # [n] P(native acceptance) per position of one text
    defer: torch.Tensor,  # [n] P(native rejection of a deferrable draft) (0 where the entropy gate is shut)
    k: int,
    window: int,
) -> tuple[float, float, float]:  # (mean acceptance length, relaxed acceptances, verified positions) per step
    """FLy's expected step from each start position, with positions independent (as the chained form of the
    other policies assumes): ``A(j) = a_j (1 + A(j+1)) + b_j prod_{m=1..W} a_{j+m} (W + 1 + A(j+W+1))``, and the
    same recursion for relaxed acceptances and verified positions."""
    return window_chain(accept, defer, k, window)[:3]


def window_chain(
    accept: torch.Tensor,  # [n] P(native acceptance) per position of one text
    defer: torch.Tensor,  # [n] P(native rejection the rule may relax) (FLy: deferrable; frontier: EARS-relaxed)
    k: int,
    window: int,
    defer_surprisal: torch.Tensor | None = None,  # [n] E[-log p(d) on such a rejection, 0 otherwise]
) -> tuple[float, float, float, float]:  # per step: length, relaxed, verified, surprisal of the relaxed drafts
    """:func:`fly_chain`, with the relaxed drafts' summed surprisal chained by the same recursion as their count
    (``S(j) = a_j S(j+1) + b_j prod a (s_j + S(j+W+1))``, ``s_j`` = the surprisal of the rejection given it is
    relaxable: ``defer_surprisal / defer``); NaN without ``defer_surprisal``."""
    if accept.numel() < k:
        return float("nan"), float("nan"), float("nan"), float("nan")
    weight = torch.zeros_like(defer) if defer_surprisal is None else defer_surprisal
    a, b, w = accept.unfold(0, k, 1), defer.unfold(0, k, 1), weight.unfold(0, k, 1)  # [starts, k]
    zeros = a.new_zeros(a.shape[0])
    accepted, relaxed, verified, surprise = ([zeros] * (k + 1) for _ in range(4))  # index j: from draft j on
    for j in range(k - 1, -1, -1):
        after = j + window + 1
        if after <= k:
            window_passes = torch.prod(a[:, j + 1 : after], dim=1)
            deferred, deferred_surprisal = b[:, j] * window_passes, w[:, j] * window_passes
        else:
            deferred, deferred_surprisal, after = zeros, zeros, k
        accepted[j] = a[:, j] * (1 + accepted[j + 1]) + deferred * (window + 1 + accepted[after])
        relaxed[j] = a[:, j] * relaxed[j + 1] + deferred * (1 + relaxed[after])
        verified[j] = 1 + a[:, j] * verified[j + 1] + deferred * (window + verified[after])
        surprise[j] = a[:, j] * surprise[j + 1] + deferred_surprisal + deferred * surprise[after]
    total_surprisal = float(surprise[0].mean()) if defer_surprisal is not None else float("nan")
    return float(1 + accepted[0].mean()), float(relaxed[0].mean()), float(verified[0].mean()), total_surprisal


def frontier_chain(
    accept: torch.Tensor,  # [n] P(native acceptance) per position of one text
    relax: torch.Tensor,  # [n] P(native rejection that EARS's relaxed test accepts)
    k: int,
    window: int,
) -> tuple[float, float, float]:  # (mean acceptance length, relaxed acceptances, verified positions) per step
    """The frontier rule's expected step from each start position, positions independent: the rule is FLy's
    window with EARS's relaxed test in place of FLy's entropy gate, so it is :func:`fly_chain` with EARS's
    relaxed-acceptance probability in place of FLy's deferrable rejection (docs/frontier-rule.md)."""
    return window_chain(accept, relax, k, window)[:3]


def frontier_position_probabilities(
    target_probs: torch.Tensor,  # [n, V]
    draft_probs: torch.Tensor | None,  # [n, V], or None with draft_ids for a one-hot drafter
    draft_ids: torch.Tensor | None,  # [n]
    **settings: Any,
) -> tuple[torch.Tensor, torch.Tensor]:  # ([n], [n]): native acceptance, EARS's relaxed acceptance
    """Per position, the frontier rule's two ingredients: the native acceptance probability and EARS's relaxed
    acceptance probability (a native rejection its relaxed test accepts), from EARS's closed form."""
    form = frontier_position_form(target_probs, draft_probs, draft_ids, **settings)
    return form.accept, form.relaxed


def frontier_position_form(
    target_probs: torch.Tensor,  # [n, V]
    draft_probs: torch.Tensor | None,  # [n, V], or None with draft_ids for a one-hot drafter
    draft_ids: torch.Tensor | None,  # [n]
    **settings: Any,
) -> PositionForm:  # [n] each: native acceptance, EARS-relaxed rejection, NaN, the relaxed draft's surprisal
    """:func:`frontier_position_probabilities` with the surprisal of the relaxable draft (EARS's closed form)."""
    ears = {name: settings[name] for name in ("tolerance", "min_ratio") if name in settings}
    if "tolerance" in ears:  # the frontier rule's relaxation: EARS's, its tolerance scaled
        ears["tolerance"] *= settings.get("frontier_scale", 1.0)
    if draft_probs is None:
        form = position_form_one_hot(target_probs, draft_ids, "ears", **ears)
    else:
        form = position_form(target_probs, draft_probs, "ears", **ears)
    nan = torch.full_like(form.accept, float("nan"))
    return PositionForm(form.accept - form.relaxed, form.relaxed, nan, form.relaxed_surprisal)


def fly_position_probabilities(
    target_probs: torch.Tensor,  # [n, V]
    draft_probs: torch.Tensor | None,  # [n, V], or None with draft_ids for a one-hot drafter
    draft_ids: torch.Tensor | None,  # [n]
    **settings: Any,
) -> tuple[torch.Tensor, torch.Tensor]:  # ([n], [n]): native acceptance, deferrable rejection
    """Per position, FLy's two ingredients: the native acceptance probability and the probability that the draft
    is natively rejected but deferrable (unmasked, top-k entropy at the threshold or above)."""
    form = fly_position_form(target_probs, draft_probs, draft_ids, **settings)
    return form.accept, form.relaxed


def fly_position_form(
    target_probs: torch.Tensor,  # [n, V]
    draft_probs: torch.Tensor | None,  # [n, V], or None with draft_ids for a one-hot drafter
    draft_ids: torch.Tensor | None,  # [n]
    **settings: Any,
) -> PositionForm:  # [n] each: native acceptance, deferrable rejection, NaN, the deferrable draft's surprisal
    """:func:`fly_position_probabilities` with the surprisal of the deferrable draft."""
    s = _settings("fly", settings)
    p = target_probs.to(torch.float64)
    top_k = min(s["fly_entropy_top_k"], p.shape[-1])
    gate = (fly_entropy(torch.topk(p, top_k, dim=-1).values.float()) >= s["fly_entropy_threshold"]).to(p.dtype)
    if draft_probs is None:
        p_d = p.gather(-1, draft_ids.long().unsqueeze(-1)).squeeze(-1)
        defer = gate * (1.0 - p_d) * (p_d > 0)
        return PositionForm(p_d, defer, torch.full_like(p_d, float("nan")), defer * surprisal(p_d))
    q = draft_probs.to(torch.float64)
    standard = torch.where(q > 0, (p / q.clamp_min(1e-300)).clamp(max=1.0), torch.zeros_like(p))
    deferrable = gate.unsqueeze(-1) * q * (1.0 - standard) * (p > 0)  # [n, V]
    accept = (q * standard).sum(-1)
    nan = torch.full_like(accept, float("nan"))
    return PositionForm(accept, deferrable.sum(-1), nan, (deferrable * surprisal(p)).sum(-1))


# The chained forms of the policies whose decision reads the next positions (``accept_probability`` None, not learnt):
# per position, (native acceptance, the relaxable rejection), then the expected step through the window.
CHAINED = {
    "fly": (fly_position_form, "fly_window_size"),
    "frontier": (frontier_position_form, "frontier_window"),
}


def chained_position_form(
    policy: str,
    target_probs: torch.Tensor,  # [n, V]
    draft_probs: torch.Tensor | None,  # [n, V], or None with draft_ids
    draft_ids: torch.Tensor | None,  # [n]
    **settings: Any,
) -> PositionForm:  # [n] each: native acceptance, relaxable rejection, NaN, its surprisal
    """:func:`fly_position_form` or :func:`frontier_position_form`, by policy."""
    if policy not in CHAINED:
        raise ValueError(f"policy {policy!r} has no chained form (chained: {sorted(CHAINED)})")
    return CHAINED[policy][0](target_probs, draft_probs, draft_ids, **settings)


def chained_step(
    policy: str,
    form: PositionForm,  # [n] each, of one text: chained_position_form's
    k: int,
    settings: Mapping[str, Any],  # resolved at k (registry.settings_at_startup)
) -> tuple[float, float, float, float]:  # per step: length, relaxed, verified, surprisal of the relaxed drafts
    """The expected step of a chained policy: FLy's window or the frontier rule's, through :func:`window_chain`."""
    return window_chain(form.accept, form.relaxed, k, settings[CHAINED[policy][1]], form.relaxed_surprisal)


def expected_acceptance(
    target_probs: torch.Tensor,  # [n, V] float
    draft_probs: torch.Tensor,  # [n, V] float (rows of a one-hot drafter are one-hot)
    *,
    policy: str,
    **settings: Any,
) -> tuple[torch.Tensor, torch.Tensor]:  # ([n], [n])
    """Exact probabilities, for one position, of accepting the draft and of a *relaxed* acceptance (see
    :func:`position_form`, which also gives the added TV)."""
    form = position_form(target_probs, draft_probs, policy, **settings)
    return form.accept, form.relaxed


def expected_acceptance_one_hot(
    target_probs: torch.Tensor,  # [n, V] float
    draft_ids: torch.Tensor,  # [n] int
    *,
    policy: str,
    **settings: Any,
) -> tuple[torch.Tensor, torch.Tensor]:  # ([n], [n])
    """:func:`expected_acceptance` for ``q = one-hot(d)``."""
    form = position_form_one_hot(target_probs, draft_ids, policy, **settings)
    return form.accept, form.relaxed
