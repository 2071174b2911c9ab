"""Acceptance rules of speculative decoding, as pure functions on tensors (DESIGN.md section 2).

Vocabulary, per verified draft position:
    p      target distribution (after temperature, top-k/top-p, logits processors)
    q      draft distribution (one-hot on the draft token when the drafter gives no probabilities)
    d      the draft token;  p_d = p(d), q_d = q(d), ratio r = p_d / q_d
    u      the uniform in [0, 1) vLLM draws for the position (float64)
    t      EARS relaxation  beta * (1 - max_v p(v))

A *relaxed acceptance* is a draft a policy accepts that the standard test with the same u rejects. For
one position, the probability of a relaxed acceptance equals the total-variation distance the policy
adds to the output distribution, so counting them measures the deviation from the target exactly.

The arithmetic (float32 ratio compared with a float64 threshold) mirrors vLLM's own kernels so that
``standard`` and ``ears`` at tolerance 0 give bit-identical decisions.
"""

from __future__ import annotations

import torch


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


def entropy(probs: torch.Tensor) -> torch.Tensor:  # [n, V] -> [n]
    """Shannon entropy in nats, with ``0 log 0 = 0``."""
    return torch.special.entr(probs).sum(dim=-1)


def expected_acceptance(
    target_probs: torch.Tensor,  # [n, V] float
    draft_probs: torch.Tensor,  # [n, V] float (rows of a one-hot drafter are one-hot)
    *,
    policy: str,
    tolerance: float | torch.Tensor = 0.0,  # scalar or [n]
    min_ratio: float = 0.01,
    typical_eps: float = 0.09,
    typical_delta: float = 0.3,
) -> tuple[torch.Tensor, torch.Tensor]:  # ([n], [n])
    """Exact probabilities, for one position, of accepting the draft and of a *relaxed* acceptance.

    Averages the decision over ``d ~ q`` and ``u ~ U[0, 1)`` in closed form: standard
    ``sum_v min(p, q)``; EARS ``sum_v q * min(1, r + t)`` for ``r >= rho_min`` (``min(1, r)``
    otherwise); typical ``sum_v q * [p > threshold]``. For standard and EARS the relaxed probability
    is exactly the total-variation distance the policy adds to the output distribution (the bias
    identity of DESIGN.md section 2). Typical also rejects drafts the standard rule would keep and
    emits the argmax, so its added TV is larger than its relaxed probability.
    """
    p = target_probs.to(torch.float64)
    q = draft_probs.to(torch.float64)
    ratio = torch.where(q > 0, p / q.clamp_min(1e-300), torch.zeros_like(p))
    per_token, standard = _accept_probability(ratio, p, p, policy, tolerance, min_ratio, typical_eps, typical_delta)
    return (q * per_token).sum(dim=-1), (q * (per_token - standard).clamp_min(0.0)).sum(dim=-1)


def expected_acceptance_one_hot(
    target_probs: torch.Tensor,  # [n, V] float
    draft_ids: torch.Tensor,  # [n] int: the drafts of a one-hot drafter (greedy, n-gram)
    **policy_settings,  # as expected_acceptance
) -> tuple[torch.Tensor, torch.Tensor]:  # ([n], [n])
    """:func:`expected_acceptance` for ``q = one-hot(d)``, reading one column of ``p`` instead of all V."""
    p = target_probs.to(torch.float64)
    p_draft = p.gather(-1, draft_ids.long().unsqueeze(-1))  # [n, 1] = the ratio, as q(d) = 1
    per_token, standard = _accept_probability(p_draft, p_draft, p, **policy_settings)
    return per_token.squeeze(-1), (per_token - standard).clamp_min(0.0).squeeze(-1)


def _accept_probability(
    ratio: torch.Tensor,  # [n, m] float64, p/q per candidate draft token (0 where q = 0)
    p_token: torch.Tensor,  # [n, m] float64, p of those tokens
    p: torch.Tensor,  # [n, V] float64, the whole target row (for max p and the entropy)
    policy: str,
    tolerance: float | torch.Tensor = 0.0,
    min_ratio: float = 0.01,
    typical_eps: float = 0.09,
    typical_delta: float = 0.3,
) -> tuple[torch.Tensor, torch.Tensor]:  # ([n, m], [n, m]): the policy's and the standard rule's
    """Probability over ``u`` that each candidate draft token is accepted."""
    standard = torch.clamp(ratio, max=1.0)
    if policy == "standard":
        return standard, standard
    if policy == "ears":
        tol = torch.as_tensor(tolerance, dtype=torch.float64, device=p.device).reshape(-1, 1)
        t = tol * (1.0 - p.max(dim=-1, keepdim=True).values)
        relaxed = torch.clamp(ratio + t, max=1.0)
        return torch.where((ratio >= min_ratio) & (p_token > 0), relaxed, standard), standard
    if policy == "typical":
        threshold = torch.clamp(typical_delta * torch.exp(-entropy(p)), max=typical_eps).unsqueeze(-1)
        return (p_token > threshold).to(torch.float64), standard
    raise ValueError(f"unknown policy {policy!r}; allowed: 'standard', 'ears', 'typical'")
