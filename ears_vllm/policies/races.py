"""ERSD: speculative sampling by exponential races on shared keys (Kobus and Gunduz, arXiv 2504.15475).

Terms: a request has a *key seed* (its ``seed``, or a random one drawn when it arrives), and every (key seed,
position, token x) a *key* ``u_x`` (:func:`ears_vllm.keys.murmur3_uniform32`, vLLM MRV2's keyed noise) and so an
Exp(1) variable ``E_x = -log(1 - u_x)``; the *position* is that of the input token whose logits choose the token
(the chosen token's index in the request's sequence, prompt included, minus one; MRV2's ``pos``). A
distribution's *race winner* at a position is ``argmin_x E_x / p_x``, an exact sample of p (the exponential race;
the Gumbel-max trick with ``G_x = -log E_x``).

The drafter proposes the race winner of q at each drafted position; the verifier accepts the drafts while they
equal the target's race winners on the same keys, and emits the target's winner at the first mismatch (there is
no residual), and at the bonus position when every draft matched. So every emitted token is the target's race
winner: an exact sample of p (lossless whatever q is), and the text depends only on the keys and the target, not
on the drafter or k. A draft is accepted with probability :func:`race_agreement`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from ears_vllm.keys import murmur3_uniform32


def race_winners(
    logits: torch.Tensor,  # [n, V] after temperature; masked entries -inf
    seed: torch.Tensor,  # [n] int64: each row's key seed
    pos: torch.Tensor,  # [n] int64: each row's position
) -> torch.Tensor:  # [n] int64
    """``argmin_x E_x / p_x`` per row, computed as ``argmax_x logit_x - log E_x`` (the same winner: the
    log-normaliser is one constant per row), in float64 with ``E = -log(1 - u)`` as the Triton kernel has it.

    On a CPU, batches of :data:`COMPILE_FROM` elements or more run this same function compiled by Inductor into
    one fused loop over the vocabulary (about 30 times faster at 100 rows x 152k tokens than the ~30 tensor passes
    of eager PyTorch), eager if compilation fails."""
    if logits.device.type == "cpu" and logits.numel() >= COMPILE_FROM:
        compiled = compiled_race_winners()
        if compiled is not None:
            return compiled(*_any_row_count(logits, seed, pos))
    return _race_winners(logits, seed, pos)


COMPILE_FROM = 1 << 16


def _race_winners(logits: torch.Tensor, seed: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    tokens = torch.arange(logits.shape[-1], device=logits.device)
    keys = murmur3_uniform32(seed[:, None], pos[:, None], tokens[None, :])
    exponential = -torch.log(1.0 - keys.double())
    return (logits.double() - exponential.log()).argmax(-1)


def _any_row_count(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Mark the row count unbacked, so one compiled graph serves every batch (1 row included, which Dynamo would
    otherwise specialise and compile again for)."""
    for tensor in tensors:
        torch._dynamo.decorators.mark_unbacked(tensor, 0)
    return tensors


@functools.cache
def compiled_race_winners() -> Callable[..., torch.Tensor] | None:
    """:func:`_race_winners` compiled for the CPU, checked on a first call (None, with a warning, if it fails);
    compiled once per process (a server calls it at startup, so that no request waits for it)."""
    try:
        compiled = torch.compile(_race_winners, dynamic=True)
        logits = torch.randn(2, COMPILE_FROM, generator=torch.Generator().manual_seed(0))
        seed, pos = torch.tensor([3, 1 << 40]), torch.tensor([0, 77])
        if torch.equal(compiled(*_any_row_count(logits, seed, pos)), _race_winners(logits, seed, pos)):
            return compiled
        problem = "its winners differ from eager PyTorch's"
    except Exception as exc:  # no C++ compiler, an Inductor that cannot lower it: eager PyTorch, slower
        problem = f"{type(exc).__name__}: {exc}"
    from ears_vllm._log import get_logger

    get_logger().warning("ears-vllm: race winners run in eager PyTorch (slower): torch.compile failed (%s)", problem)
    return None


def race_token_agreement(
    p: torch.Tensor,  # [n, V] target probabilities
    q: torch.Tensor,  # [n, V] draft probabilities
) -> torch.Tensor:  # [n, V] float64
    """``P(X = Y = x)`` per token: both races on shared keys pick x with probability
    ``1 / sum_y max(p_y / p_x, q_y / q_x)``. Sorting the tokens by ``r_y = p_y / q_y`` makes the sum
    ``(1 / p_x) * (sum of p over r_y >= r_x) + (1 / q_x) * (sum of q over r_y < r_x)``: a sort, not V^2."""
    p, q = p.double(), q.double()
    ratio = torch.where(q > 0, p / q.clamp_min(1e-300), torch.inf)
    order = ratio.argsort(dim=-1)  # tied ratios: either side of the sum gives the same term
    p_sorted, q_sorted = p.gather(-1, order), q.gather(-1, order)
    p_from = p_sorted.flip(-1).cumsum(-1).flip(-1)  # sum of p over the tokens at or after each in the order
    q_before = q_sorted.cumsum(-1) - q_sorted  # sum of q over the tokens before each
    both = (p_sorted > 0) & (q_sorted > 0)
    total = p_from / p_sorted.clamp_min(1e-300) + q_before / q_sorted.clamp_min(1e-300)
    sorted_agreement = torch.where(both, 1.0 / total, 0.0)
    return torch.zeros_like(p).scatter(-1, order, sorted_agreement)


def race_agreement(
    p: torch.Tensor,  # [n, V] target probabilities
    q: torch.Tensor,  # [n, V] draft probabilities
) -> torch.Tensor:  # [n]
    """P(the two races agree): ERSD's acceptance probability of one draft. It lies in
    ``[(1 - TV) / (1 + TV), 1 - TV]``, against standard rejection sampling's ``1 - TV = sum min(p, q)``."""
    return race_token_agreement(p, q).sum(-1)
