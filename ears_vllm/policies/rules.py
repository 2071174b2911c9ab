"""Acceptance rules of speculative decoding, as pure functions on tensors (README.md, "Policies", has the table of
rules).

Vocabulary, per verified draft position:
    p      target distribution (after temperature, top-k/top-p, logits processors)
    q      draft distribution (one-hot on the draft token when the drafter gives no probabilities)
    d      the draft token;  p_d = p(d), q_d = q(d), ratio r = p_d / q_d
    u      the uniform in [0, 1) vLLM draws for the position (float64)
    native the standard test (random rows) or argmax match (greedy rows): what vLLM's own rule decides

A *relaxed acceptance* is a draft a policy accepts that the native test with the same u rejects. For a
policy that only adds acceptances and recovers like the standard rule, the probability of a relaxed
acceptance at a position equals the total-variation distance it adds to the output distribution, so
counting them measures the deviation from the target exactly (:mod:`ears_vllm.policies.closed_form`).

The arithmetic (float32 ratio compared with a float64 threshold) mirrors vLLM V1's kernels so that the
lossless settings give bit-identical decisions.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch

from ears_vllm.policies.divergence import js_distance


def standard_accept(
    target_prob: torch.Tensor,  # [n] float32, p(d)
    draft_prob: torch.Tensor,  # [n] float32, q(d) (1 for a one-hot draft)
    uniform: torch.Tensor,  # [n] float64
) -> torch.Tensor:  # [n] bool
    """Leviathan/Chen rejection sampling: accept iff ``q(d) > 0`` and ``p(d) / q(d) >= u``."""
    return (draft_prob > 0) & (target_prob / draft_prob >= uniform)


def ears_relaxed_threshold(
    uniform: torch.Tensor,  # [n] float64
    max_target_prob: torch.Tensor,  # [n] float32, max_v p(v)
    tolerance: torch.Tensor,  # [n] float64, beta
    min_ratio: float,
) -> torch.Tensor:  # [n] float64
    """``max(u - t, rho_min)`` with ``t = beta * (1 - max p)``: the relaxed part of the EARS threshold."""
    relaxation = tolerance * (1.0 - max_target_prob.to(torch.float64))
    return torch.clamp(uniform - relaxation, min=min_ratio)


def ears_accept(
    target_prob: torch.Tensor,  # [n] float32
    draft_prob: torch.Tensor,  # [n] float32
    uniform: torch.Tensor,  # [n] float64
    max_target_prob: torch.Tensor,  # [n] float32
    tolerance: torch.Tensor,  # [n] float64
    min_ratio: float,
) -> torch.Tensor:  # [n] bool
    """EARS: accept iff ``p/q >= min(u, max(u - t, rho_min))``, never a draft with ``p(d) = 0``.

    Written as "standard, or relaxed" so that at ``t = 0`` the decision is the standard one bit for
    bit (including vLLM's acceptance of ``p(d) = 0`` at ``u = 0.0`` exactly, a 2^-53 event); the
    relaxation itself never accepts a token the target masked.
    """
    relaxed = ears_relaxed_threshold(uniform, max_target_prob, tolerance, min_ratio)
    accepted_relaxed = (draft_prob > 0) & (target_prob > 0) & (target_prob / draft_prob >= relaxed)
    return standard_accept(target_prob, draft_prob, uniform) | accepted_relaxed


def typical_accept(
    target_prob: torch.Tensor,  # [n] float32
    target_entropy: torch.Tensor,  # [n] float32, H(p) in nats
    eps: float,
    delta: float,
) -> torch.Tensor:  # [n] bool
    """Typical acceptance (Medusa, vLLM V0): accept iff ``p(d) > min(eps, delta * exp(-H(p)))``.

    Deterministic (u is unused) and blind to the draft distribution. On rejection the emitted token is
    the target argmax.
    """
    threshold = torch.clamp(delta * torch.exp(-target_entropy), max=eps)
    return target_prob > threshold


def sglang_accept(
    target_prob: torch.Tensor,  # [n] float32
    uniform: torch.Tensor,  # [n] float64
    threshold_single: float,
    threshold_acc: float,
) -> torch.Tensor:  # [n] bool
    """SGLang's ``TreeSpeculativeSamplingTargetOnly`` on a chain: ``u <= p(d) / max(acc, 1e-9)`` or
    ``p(d) >= single``. Target-only: q is never read (with a sampled q this is not lossless even at (1, 1))."""
    acc = max(threshold_acc, 1e-9)  # the launcher's fmaxf(threshold_acc, 1e-9f)
    return (uniform <= target_prob.to(torch.float64) / acc) | (target_prob >= threshold_single)


def relaxed_topk_candidate(
    target_prob: torch.Tensor,  # [n] float32, p(d)
    max_target_prob: torch.Tensor,  # [n] float32
    draft_rank: torch.Tensor,  # [n] int: target logits strictly above the draft's
    topk: int,
    delta: float,
) -> torch.Tensor:  # [n] bool
    """TensorRT-LLM's relaxed candidate: d is among the target's top-k and ``p(d) >= max p - delta``
    (``mtpRelaxedAcceptanceKernel``; the top-1 always qualifies). Ties at the k-th place count for d.

    Never a draft with ``p(d) = 0``: a masked draft's rank is the number of tokens the mask left, so when fewer
    than k survive (top-k, top-p, a grammar, bad words) and ``max p <= delta`` it would pass both tests, and a
    user who asked for ``top_k=2`` would get a token outside the top 2.
    """
    threshold = max_target_prob - torch.tensor(delta, dtype=torch.float32)
    return (target_prob > 0) & (draft_rank < topk) & ((target_prob >= threshold) | (draft_rank == 0))


def rank_among_logits(
    logits: torch.Tensor,  # [n, V]
    draft_logit: torch.Tensor,  # [n] the logit of each row's draft
) -> torch.Tensor:  # [n] int64
    """How many logits of each row lie strictly above the draft's (0 = the argmax): relaxed_topk's rank."""
    return (logits > draft_logit.unsqueeze(-1)).sum(dim=-1)


def fly_entropy(
    top_values: torch.Tensor,  # [n, k] the k largest probabilities (or logits, with from_logits)
    logsumexp: torch.Tensor | None = None,  # [n, 1] of the logits, when the values are logits
) -> torch.Tensor:  # [n] float32
    """FLy's entropy ``-sum p log p`` over the target's top-k probabilities, not renormalised.

    vLLM V1 takes the k largest processed probabilities and their log; MRV2 takes the k largest logits minus
    the log-sum-exp and exponentiates (``compute_fly_entropy(..., from_logits=True)``): two roundings of one
    number, each kept so that each runner's decisions are reproduced exactly.
    """
    top_values = top_values.to(torch.float32)
    if logsumexp is None:
        top_probs, top_log_probs = top_values, top_values.log()
    else:
        top_log_probs = top_values - logsumexp
        top_probs = top_log_probs.exp()
    terms = torch.where(top_probs > 0, top_probs * top_log_probs, torch.zeros_like(top_probs))
    return -terms.sum(dim=-1)


def fly_defer(
    native: torch.Tensor,  # [n] bool: the native decision at each draft position
    deferrable: torch.Tensor,  # [n] bool: natively rejected, draft not masked, entropy >= threshold
    position: torch.Tensor,  # [n] int: index of the position within its request
    num_drafts: torch.Tensor,  # [n] int: drafts of the position's request
    window: int,
) -> torch.Tensor:  # [n] bool: rejections FLy turns into acceptances
    """A native rejection at i is deferred when it is deferrable, ``i + W < n`` and the next ``W`` drafts of the
    request all pass the native test (with their original randoms)."""
    fits = position + window < num_drafts
    passed = torch.cumsum(native.long(), 0)  # inclusive: passed[j] - passed[i] = native count in (i, j]
    ahead = (torch.arange(native.shape[0], device=native.device) + window).clamp(max=max(native.shape[0] - 1, 0))
    window_passes = (passed[ahead] - passed) == window
    return deferrable & fits & window_passes


def mars_low_margin(
    top2_logits: torch.Tensor,  # [n, 2] the two largest target logits of each row, z1 >= z2
    threshold: float,
) -> torch.Tensor:  # [n] bool
    """MARS's low-margin test: the logit ratio ``z2 / z1 > theta`` (arXiv 2601.15498; its authors' code computes it on
    the processed logits, a ratio that a temperature does not change). Only where ``z1 > 0``: the ratio is no margin
    for a negative top logit (``z2 / z1 >= 1`` there however far apart), a case the paper does not address
    (docs/frontier-rule.md, "MARS")."""
    z1, z2 = top2_logits[:, 0].to(torch.float32), top2_logits[:, 1].to(torch.float32)
    return (z1 > 0) & (z2 > torch.tensor(threshold, dtype=torch.float32) * z1)


def mars_candidate(
    target_prob: torch.Tensor,  # [n] float32, p(d)
    draft_rank: torch.Tensor,  # [n] int: target logits strictly above the draft's
    low_margin: torch.Tensor,  # [n] bool, :func:`mars_low_margin`
) -> torch.Tensor:  # [n] bool
    """MARS's relaxed acceptance: at a low-margin position, the draft is the target's top-1 or top-2 (ties at the
    second place count for d), never a masked draft."""
    return low_margin & (draft_rank < 2) & (target_prob > 0)


def native_run_after(
    native: torch.Tensor,  # [n] bool: the native decision at each draft position
    position: torch.Tensor,  # [n] int: index of the position within its request
    num_drafts: torch.Tensor,  # [n] int: drafts of the position's request
    longest: int,  # the longest run worth counting (the frontier rule's window)
) -> torch.Tensor:  # [n] int64: natively accepted drafts right after each position, up to ``longest``
    """How many of the drafts after position i pass the native test before the first that fails (or the request's
    last draft), counted up to ``longest``."""
    n = native.shape[0]
    run = torch.zeros(n, dtype=torch.long, device=native.device)
    alive = torch.ones(n, dtype=torch.bool, device=native.device)
    index = torch.arange(n, device=native.device)
    for offset in range(1, longest + 1):
        ahead = native[(index + offset).clamp(max=max(n - 1, 0))] if n else native
        alive &= (position + offset < num_drafts) & ahead
        run += alive.long()
    return run


def frontier_accept(
    native: torch.Tensor,  # [n] bool
    relaxable: torch.Tensor,  # [n] bool: EARS's relaxed test passes (p(d) > 0, q(d) > 0)
    position: torch.Tensor,  # [n] int
    num_drafts: torch.Tensor,  # [n] int
    window: int,
) -> torch.Tensor:  # [n] bool
    """The frontier rule (docs/frontier-rule.md): the native decision, or EARS's relaxed acceptance where the next
    ``window`` drafts of the request exist and all pass the native test (each then buys ``window + 1`` tokens or
    more)."""
    fits = position + window < num_drafts
    return native | (relaxable & fits & (native_run_after(native, position, num_drafts, window) == window))


class DraftPositions:
    """What the rules read at each verified draft position of a flattened batch, computed on first use.

    Built by the reference from the target logits and probabilities; ``req_of_token`` maps a position to
    its request. Every attribute is ``[n]`` (``n`` = draft positions) unless noted.
    """

    def __init__(
        self,
        target_logits: torch.Tensor,  # [n, V]
        target_probs: torch.Tensor,  # [n, V] float32, softmax of target_logits
        draft_ids: torch.Tensor,  # [n] int64, negative = padding
        draft_prob: torch.Tensor,  # [n] float32 (1 for a one-hot draft)
        uniform: torch.Tensor,  # [n] float64
        tolerance: torch.Tensor,  # [n] float64, per request
        is_greedy: torch.Tensor,  # [n] bool, per request
        num_draft_tokens: torch.Tensor,  # [batch] int64
        req_of_token: torch.Tensor,  # [n] int64
        draft_probs: torch.Tensor | None = None,  # [n, V] q, or None for one-hot drafts
        race_winner: torch.Tensor | None = None,  # [n] int64: the target's race winner (ERSD; keyed rows only)
    ) -> None:
        self.target_logits, self.target_probs, self.draft_probs = target_logits, target_probs, draft_probs
        self.race_winner = race_winner
        self.draft_ids, self.draft_prob, self.uniform = draft_ids, draft_prob, uniform
        self.tolerance, self.is_greedy = tolerance, is_greedy
        self.num_draft_tokens, self.req_of_token = num_draft_tokens, req_of_token
        self.is_valid = draft_ids >= 0
        self.safe_ids = draft_ids.clamp_min(0).unsqueeze(-1)
        self.target_prob = target_probs.gather(-1, self.safe_ids).squeeze(-1)

    @functools.cached_property
    def target_argmax(self) -> torch.Tensor:  # on the logits, as vLLM (no temperature on greedy rows)
        return self.target_logits.argmax(dim=-1)

    def argmax_at(self, rows: torch.Tensor) -> torch.Tensor:  # [m] int64 -> [m] int64
        """``target_argmax[rows]``, reading only those rows of the logits unless every row's is known already."""
        if "target_argmax" in self.__dict__:
            return self.target_argmax[rows]
        return self.target_logits[rows].argmax(dim=-1)

    @functools.cached_property
    def standard(self) -> torch.Tensor:
        return standard_accept(self.target_prob, self.draft_prob, self.uniform)

    @functools.cached_property
    def native(self) -> torch.Tensor:
        """vLLM's own decision: argmax match on greedy rows, the standard test on random rows (the argmax is read
        on the greedy rows only: a batch of sampled requests never pays a pass over its logits for it)."""
        greedy_rows = self.is_greedy.nonzero().squeeze(-1)
        greedy = torch.zeros_like(self.is_valid)
        greedy[greedy_rows] = self.draft_ids[greedy_rows] == self.argmax_at(greedy_rows)
        return torch.where(self.is_greedy, greedy, self.standard) & self.is_valid

    @functools.cached_property
    def max_target_prob(self) -> torch.Tensor:
        return self.target_probs.max(dim=-1).values

    def max_target_prob_at(self, rows: torch.Tensor) -> torch.Tensor:  # [m] int64 -> [m] float32
        """``max_target_prob[rows]``: for a few rows, read on those rows only (a max is exact in any order)."""
        if "max_target_prob" in self.__dict__ or 2 * rows.numel() > self.draft_ids.numel():
            return self.max_target_prob[rows]
        if not rows.numel():
            return self.target_prob.new_empty(0)
        return torch.stack([self.target_probs[row].max() for row in rows.tolist()])

    @functools.cached_property
    def entropy(self) -> torch.Tensor:
        return entropy(self.target_probs)

    @functools.cached_property
    def draft_logit(self) -> torch.Tensor:
        return self.target_logits.gather(-1, self.safe_ids).squeeze(-1)

    @functools.cached_property
    def draft_rank(self) -> torch.Tensor:
        return rank_among_logits(self.target_logits, self.draft_logit)

    @functools.cached_property
    def top2_logits(self) -> torch.Tensor:  # [n, 2] the two largest target logits (MARS's margin)
        return torch.topk(self.target_logits, min(2, self.target_logits.shape[-1]), dim=-1).values.expand(-1, 2)

    @functools.cached_property
    def js(self) -> torch.Tensor:
        """The Jensen-Shannon distance between p and q (AdaSD's statistic)."""
        return js_distance(self.target_probs, self.draft_ids, self.draft_probs)

    @functools.cached_property
    def position(self) -> torch.Tensor:
        start = torch.cumsum(self.num_draft_tokens, 0) - self.num_draft_tokens
        return torch.arange(self.draft_ids.shape[0], device=self.draft_ids.device) - start[self.req_of_token]


# Each policy's rule on a batch of positions (random rows; greedy rows too for a policy whose source applies it
# there, ``PolicySpec.greedy_rows``), before the accepted prefix is taken. The registry names one per policy.


def rule_standard(pos: DraftPositions, settings: Mapping[str, Any]) -> torch.Tensor:  # [n] bool
    return pos.standard


def rule_ears(pos: DraftPositions, settings: Mapping[str, Any]) -> torch.Tensor:
    return _ears_test(pos, pos.tolerance, settings["min_ratio"])


def _ears_test(
    pos: DraftPositions,
    tolerance: torch.Tensor,  # [n] float64, beta
    min_ratio: float,
) -> torch.Tensor:  # [n] bool
    # Only a draft the standard test rejects, with p(d) > 0 and q(d) > 0, can be relaxed, and only if it passes the
    # loosest threshold any max p allows (max p = 0: t = beta): the target's max is read on those rows alone;
    # elsewhere it stands at 1 (no relaxation), which decides the same.
    loosest = ears_relaxed_threshold(pos.uniform, torch.zeros_like(pos.target_prob), tolerance, min_ratio)
    may_relax = ~pos.standard & (pos.target_prob > 0) & (pos.draft_prob > 0) & (tolerance > 0)
    may_relax &= pos.target_prob / pos.draft_prob >= loosest
    rows = may_relax.nonzero().squeeze(-1)
    max_target_prob = torch.ones_like(pos.target_prob)
    max_target_prob[rows] = pos.max_target_prob_at(rows)
    return ears_accept(pos.target_prob, pos.draft_prob, pos.uniform, max_target_prob, tolerance, min_ratio)


def rule_typical(pos: DraftPositions, settings: Mapping[str, Any]) -> torch.Tensor:
    return typical_accept(pos.target_prob, pos.entropy, settings["typical_eps"], settings["typical_delta"])


def rule_sglang(pos: DraftPositions, settings: Mapping[str, Any]) -> torch.Tensor:
    return sglang_accept(
        pos.target_prob, pos.uniform, settings["accept_threshold_single"], settings["accept_threshold_acc"]
    )


def rule_relaxed_topk(pos: DraftPositions, settings: Mapping[str, Any]) -> torch.Tensor:
    candidate = relaxed_topk_candidate(
        pos.target_prob, pos.max_target_prob, pos.draft_rank, settings["relaxed_topk"], settings["relaxed_delta"]
    )
    return pos.native | (candidate & pos.is_valid)


def adasd_accept(
    native: torch.Tensor,  # [n] bool
    target_prob: torch.Tensor,  # [n] float32, p(d)
    draft_prob: torch.Tensor,  # [n] float32, q(d)
    js: torch.Tensor,  # [n] float32, JS(p, q)
    tau: torch.Tensor,  # [n] float64, the request's learnt threshold (0: none yet)
) -> torch.Tensor:  # [n] bool
    """AdaSD: the native decision, or ``JS(p, q) <= tau`` for a draft the target does not mask."""
    return native | ((tau > 0) & (js.double() <= tau) & (target_prob > 0) & (draft_prob > 0))


def rule_adasd(pos: DraftPositions, settings: Mapping[str, Any]) -> torch.Tensor:
    """Its per-request threshold comes in the per-request ``tolerance`` tensor (policies.adasd)."""
    return adasd_accept(pos.native, pos.target_prob, pos.draft_prob, pos.js, pos.tolerance) & pos.is_valid


def rule_ersd(pos: DraftPositions, settings: Mapping[str, Any]) -> torch.Tensor:
    """ERSD: accept iff the draft is the target's race winner on the request's keys (policies.races)."""
    return pos.draft_ids == pos.race_winner


def rule_mars(pos: DraftPositions, settings: Mapping[str, Any]) -> torch.Tensor:
    """MARS (arXiv 2601.15498): the native decision, or the target's top-2 at a low-margin position."""
    low_margin = mars_low_margin(pos.top2_logits, settings["mars_threshold"])
    return pos.native | (mars_candidate(pos.target_prob, pos.draft_rank, low_margin) & pos.is_valid)


def rule_frontier(pos: DraftPositions, settings: Mapping[str, Any]) -> torch.Tensor:
    """The frontier rule: EARS's relaxed test (:func:`rule_ears`, its tolerance times ``frontier_scale``) where the
    next ``frontier_window`` drafts pass natively (random rows; greedy rows take argmax match, as EARS's)."""
    tolerance = pos.tolerance * settings["frontier_scale"]
    relaxable = _ears_test(pos, tolerance, settings["min_ratio"]) & ~pos.standard & pos.is_valid
    num_drafts = pos.num_draft_tokens[pos.req_of_token]
    return frontier_accept(pos.native, relaxable, pos.position, num_drafts, settings["frontier_window"])


def rule_fly(pos: DraftPositions, settings: Mapping[str, Any]) -> torch.Tensor:
    """vLLM V1's FLy pre-pass (``apply_fly_{greedy,random}_acceptance_kernel``) followed by its native walk."""
    top_k = min(settings["fly_entropy_top_k"], pos.target_probs.shape[-1])
    gate = fly_entropy(torch.topk(pos.target_probs, top_k, dim=-1).values) >= settings["fly_entropy_threshold"]
    # Not masked: p(d) > 0 and q(d) > 0 on random rows, a finite target logit on greedy rows (vLLM V1's tests).
    unmasked = torch.where(pos.is_greedy, pos.draft_logit > float("-inf"), (pos.target_prob > 0) & (pos.draft_prob > 0))
    deferrable = ~pos.native & pos.is_valid & unmasked & gate
    num_drafts = pos.num_draft_tokens[pos.req_of_token]
    return pos.native | fly_defer(pos.native, deferrable, pos.position, num_drafts, settings["fly_window_size"])


# Each per-position policy's closed form: the probability over u ~ U[0, 1) that a candidate draft token x is
# accepted, given p(x) and q(x) for m candidates ([n, m] float64) and the whole target row ([n, V]) for the
# statistics a rule reads (max p, entropy, top-k). ``standard`` is min(1, p/q). The registry names one per policy.


def standard_probability(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:  # [n, m]
    ratio = torch.where(q > 0, p / q.clamp_min(1e-300), torch.zeros_like(p))
    return ratio.clamp(max=1.0)


def probability_standard(
    p: torch.Tensor, q: torch.Tensor, row: torch.Tensor, standard: torch.Tensor, settings: Mapping[str, Any]
) -> torch.Tensor:  # [n, m]
    return standard


def probability_ears(
    p: torch.Tensor, q: torch.Tensor, row: torch.Tensor, standard: torch.Tensor, settings: Mapping[str, Any]
) -> torch.Tensor:  # [n, m]
    ratio = torch.where(q > 0, p / q.clamp_min(1e-300), torch.zeros_like(p))
    tolerance = torch.as_tensor(settings["tolerance"], dtype=torch.float64, device=p.device).reshape(-1, 1)
    relaxed = (ratio + tolerance * (1.0 - row.max(dim=-1, keepdim=True).values)).clamp(max=1.0)
    return torch.where((ratio >= settings["min_ratio"]) & (p > 0), relaxed, standard)


def probability_typical(
    p: torch.Tensor, q: torch.Tensor, row: torch.Tensor, standard: torch.Tensor, settings: Mapping[str, Any]
) -> torch.Tensor:  # [n, m]
    threshold = torch.clamp(settings["typical_delta"] * torch.exp(-entropy(row)), max=settings["typical_eps"])
    return (p > threshold.unsqueeze(-1)).to(torch.float64)


def probability_sglang(
    p: torch.Tensor, q: torch.Tensor, row: torch.Tensor, standard: torch.Tensor, settings: Mapping[str, Any]
) -> torch.Tensor:  # [n, m]
    by_coin = (p / max(settings["accept_threshold_acc"], 1e-9)).clamp(max=1.0)
    return torch.where(p >= settings["accept_threshold_single"], torch.ones_like(p), by_coin)


def probability_relaxed_topk(
    p: torch.Tensor, q: torch.Tensor, row: torch.Tensor, standard: torch.Tensor, settings: Mapping[str, Any]
) -> torch.Tensor:  # [n, m]
    top = torch.topk(row, min(settings["relaxed_topk"], row.shape[-1]), dim=-1).values
    floor = torch.maximum(top[:, -1:], top[:, :1] - settings["relaxed_delta"])
    candidate = ((p >= floor) | (p == top[:, :1])) & (p > 0)
    return torch.where(candidate, torch.ones_like(p), standard)


def probability_mars(
    p: torch.Tensor, q: torch.Tensor, row: torch.Tensor, standard: torch.Tensor, settings: Mapping[str, Any]
) -> torch.Tensor:  # [n, m]
    """1 for a candidate among the row's top-2 at a low-margin position, else the standard ``min(1, p/q)``. The margin
    is a ratio of logits, not a function of the probabilities: it reads the row's two largest logits from
    ``settings["top2_logits"]`` ([n, 2], as ``bench acceptance`` passes them); without them, the logits are taken to
    be the normalised ones, ``log p`` (exact where the sampler's logits are log-probabilities)."""
    top2 = torch.topk(row, min(2, row.shape[-1]), dim=-1).values.expand(-1, 2)  # [n, 2]
    top2_logits = settings.get("top2_logits")
    if top2_logits is None:
        top2_logits = top2.clamp_min(1e-300).log()
    low_margin = mars_low_margin(top2_logits, settings["mars_threshold"]).unsqueeze(-1)
    candidate = low_margin & (p >= top2[:, 1:]) & (p > 0)
    return torch.where(candidate, torch.ones_like(p), standard)


def probability_ersd(
    p: torch.Tensor, q: torch.Tensor, row: torch.Tensor, standard: torch.Tensor, settings: Mapping[str, Any]
) -> torch.Tensor:  # [n, m]
    """``P(X = Y = x) / q(x)`` for a drafter racing on the same keys (whole rows); a one-hot drafter's draft d
    (one candidate) is the target's winner with probability p(d)."""
    from ears_vllm.policies.races import race_token_agreement

    if p.shape[-1] != row.shape[-1]:
        return p
    return torch.where(q > 0, race_token_agreement(p, q) / q.clamp_min(1e-300), torch.zeros_like(p))


def entropy(probs: torch.Tensor) -> torch.Tensor:  # [n, V] -> [n]
    """Shannon entropy in nats, with ``0 log 0 = 0``."""
    return torch.special.entr(probs).sum(dim=-1)
