"""``ears_vllm.verify``: the framework-neutral verification step of speculative decoding.

One entry point for every caller (the vLLM adapters, benchmarks, users): it builds the step
(:class:`ears_vllm.step.VerifyStep`: the inputs checked, the randoms it was not given drawn) and runs the
PyTorch reference or the Triton kernel on it.

Example::

    >>> import torch, ears_vllm
    >>> logits = torch.tensor([[4.0, 1.0, 0.0], [0.0, 3.0, 1.0]])   # two draft positions, vocab 3
    >>> out = ears_vllm.verify(
    ...     logits, draft_token_ids=torch.tensor([0, 1]), num_draft_tokens=[2],
    ...     bonus_token_ids=torch.tensor([2]), uniform=torch.tensor([0.5, 0.5], dtype=torch.float64),
    ...     config=ears_vllm.EarsConfig(policy="ears", tolerance=0.2))
    >>> out.token_ids.tolist(), out.num_accepted.tolist()
    ([[0, 1, 2]], [2])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from ears_vllm._log import get_logger
from ears_vllm.config import EarsConfig
from ears_vllm.reference import VerifyResult, verify_reference
from ears_vllm.step import VerifyStep

Backend = Literal["auto", "torch", "triton"]
AUTO_KERNEL_DEVICES = ("cuda",)  # where backend="auto" runs the Triton kernel
_kernel_failure: str | None = None  # why the kernel failed in this process; "auto" no longer tries it


def verify(
    target_logits: torch.Tensor,  # [num_tokens, V] after temperature/top-k/top-p; masked entries -inf
    draft_token_ids: torch.Tensor,  # [num_tokens] int
    num_draft_tokens: torch.Tensor | Sequence[int],  # [batch] (0 allowed)
    bonus_token_ids: torch.Tensor,  # [batch] or [batch, 1] int
    *,
    draft_probs: torch.Tensor | None = None,  # [num_tokens, V] or None (= one-hot draft)
    is_greedy: torch.Tensor | None = None,  # [batch] bool or None (= all random)
    uniform: torch.Tensor | None = None,  # [num_tokens] float64 in [0, 1); None = drawn
    recovery_noise: torch.Tensor | None = None,  # [batch, V] Exp(1) noise; None = drawn
    tolerance: torch.Tensor | None = None,  # [batch] per-request beta, overrides config.tolerance
    budget: torch.Tensor | None = None,  # [batch] float64 deviation budget B per request; 0 = none
    budget_slack: torch.Tensor | None = None,  # [batch] float64: B * verified - relaxed before this step
    race_keys: torch.Tensor | None = None,  # [batch, 2] int64: key seed, position of the first draft (ersd)
    generator: torch.Generator | None = None,
    config: EarsConfig | None = None,
    backend: Backend = "auto",
    max_spec_len: int | None = None,
) -> VerifyResult:
    """Verify the draft tokens of a batch against the target distribution.

    Requests are flattened: request ``i`` owns ``num_draft_tokens[i]`` consecutive rows of
    ``target_logits`` / ``draft_token_ids`` / ``draft_probs``. ``uniform`` and ``recovery_noise`` are
    the randoms vLLM V1 draws (one uniform per position; one Exp(1) vector per request, shared by its
    positions); pass them for reproducible or vLLM-identical results. ``max_spec_len`` sets the output
    width to ``max_spec_len + 1`` (default: the largest ``num_draft_tokens``).

    ``backend="auto"`` runs the fused Triton kernel for CUDA tensors and the PyTorch reference
    otherwise; if the kernel fails (a Triton that cannot compile it, say), it warns once and the
    process uses the PyTorch path from then on. Returns a :class:`VerifyResult`. Raises ``ValueError``
    naming the argument for bad shapes, dtypes, devices or values (a uniform outside [0, 1) or NaN; recovery noise
    negative, infinite or NaN; a non-zero ``budget`` for a policy a budget cannot cap), and for
    ``backend="triton"`` where the kernel cannot run.

    ``race_keys`` (needed by the keyed policy ``ersd``, :mod:`ears_vllm.policies.races`): each request's key seed
    and the position in its sequence of its first draft; its drafts must be race winners of q on the same keys,
    and its ``bonus_token_ids`` the race winner at the position after its last draft.

    ``budget`` / ``budget_slack`` cap each request's relaxed acceptances (:mod:`ears_vllm.control.budget`); with
    ``config.budget`` set and no ``budget`` given, every sampled request gets a fresh ledger (slack 0), and the
    tolerance defaults to the budgeted one. Greedy requests get none: where the policy relaxes greedy rows (fly,
    relaxed_topk) those relaxed acceptances are uncapped, as in the vLLM adapters.
    """
    config = config if config is not None else EarsConfig()
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend={backend!r} is not one of 'auto', 'torch', 'triton'")
    step = VerifyStep.build(
        target_logits,
        draft_token_ids,
        num_draft_tokens,
        bonus_token_ids,
        draft_probs=draft_probs,
        is_greedy=is_greedy,
        uniform=uniform,
        recovery_noise=recovery_noise,
        tolerance=tolerance,
        budget=budget,
        budget_slack=budget_slack,
        race_keys=race_keys,
        generator=generator,
        config=config,
        max_spec_len=max_spec_len,
    )
    device = target_logits.device
    if backend == "triton" or (backend == "auto" and device.type in AUTO_KERNEL_DEVICES and not _kernel_failure):
        from ears_vllm import kernels

        problem = kernels.unusable_reason(device.type)
        if problem is None:
            try:
                return kernels.verify_triton(step)
            except Exception as exc:  # a kernel that fails to compile or launch must not fail the request
                if backend == "triton":  # asked for by name: the error is the caller's to see
                    raise
                _kernel_failed(exc)
        elif backend == "triton":
            raise ValueError(f"backend='triton' cannot run here: {problem}")
    return verify_reference(step)


def _kernel_failed(exc: Exception) -> None:
    global _kernel_failure
    _kernel_failure = f"{type(exc).__name__}: {exc}"
    get_logger().warning(
        "ears-vllm: the Triton verification kernel failed (%s); this process verifies with the PyTorch path from "
        "now on (same results, slower)",
        _kernel_failure,
    )
