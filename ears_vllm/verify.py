"""``ears_vllm.verify``: the framework-neutral verification step of speculative decoding.

One entry point for every caller (the vLLM adapters, benchmarks, users): it checks the inputs, draws
the randoms it was not given, and runs the PyTorch reference or the Triton kernel.

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
from ears_vllm.config import BUDGET_POLICIES, EarsConfig
from ears_vllm.control.budget import BUDGETED_TOLERANCE
from ears_vllm.policies import get_policy
from ears_vllm.reference import VerifyResult, verify_reference

Backend = Literal["auto", "torch", "triton"]
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
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
    _check_tensor("target_logits", target_logits, ndim=2, dtypes=_FLOAT_DTYPES)
    num_tokens, vocab_size = target_logits.shape
    device = target_logits.device

    _check_tensor("draft_token_ids", draft_token_ids, ndim=1, integer=True, device=device)
    if draft_token_ids.shape[0] != num_tokens:
        raise ValueError(
            f"draft_token_ids has {draft_token_ids.shape[0]} entries but target_logits has "
            f"{num_tokens} rows; they must match (one row per draft token)"
        )
    if num_tokens and int(draft_token_ids.max()) >= vocab_size:
        raise ValueError(
            f"draft_token_ids contains {int(draft_token_ids.max())}, outside the vocabulary "
            f"[0, {vocab_size}); negative ids mean padding and are always rejected"
        )

    num_draft_tokens = torch.as_tensor(num_draft_tokens, device=device).reshape(-1).long()
    if num_draft_tokens.dtype.is_floating_point or (num_draft_tokens < 0).any():
        raise ValueError(f"num_draft_tokens={num_draft_tokens.tolist()} must be non-negative integers")
    if int(num_draft_tokens.sum()) != num_tokens:
        raise ValueError(
            f"num_draft_tokens sums to {int(num_draft_tokens.sum())} but there are {num_tokens} draft "
            "tokens; the per-request counts must add up to target_logits.shape[0]"
        )
    batch_size = num_draft_tokens.shape[0]
    longest = int(num_draft_tokens.max()) if batch_size else 0
    if max_spec_len is None:
        max_spec_len = longest
    elif max_spec_len < longest:
        raise ValueError(f"max_spec_len={max_spec_len} is smaller than the longest draft ({longest})")

    bonus_token_ids = bonus_token_ids.reshape(-1) if bonus_token_ids.ndim == 2 else bonus_token_ids
    _check_tensor("bonus_token_ids", bonus_token_ids, shape=(batch_size,), integer=True, device=device)

    if draft_probs is not None:
        _check_tensor("draft_probs", draft_probs, shape=(num_tokens, vocab_size), dtypes=_FLOAT_DTYPES, device=device)
    if is_greedy is None:
        is_greedy = torch.zeros(batch_size, dtype=torch.bool, device=device)
    _check_tensor("is_greedy", is_greedy, shape=(batch_size,), dtypes=(torch.bool,), device=device)

    if uniform is None:
        uniform = torch.rand(num_tokens, dtype=torch.float64, device=device, generator=generator)
    _check_tensor("uniform", uniform, shape=(num_tokens,), dtypes=_FLOAT_DTYPES, device=device)
    if recovery_noise is None:
        recovery_noise = torch.empty(batch_size, vocab_size, dtype=torch.float32, device=device)
        recovery_noise.exponential_(generator=generator)
    _check_tensor(
        "recovery_noise",
        recovery_noise,
        shape=(batch_size, vocab_size),
        dtypes=(torch.float32, torch.float64),
        device=device,
    )
    _check_randoms(uniform, recovery_noise)

    if budget is None and config.budget is not None:
        budget = torch.where(is_greedy, 0.0, config.budget).to(torch.float64)
        budget_slack = torch.zeros(batch_size, dtype=torch.float64, device=device)
    if budget is not None:
        _check_tensor("budget", budget, shape=(batch_size,), dtypes=(torch.float64,), device=device)
        _check_tensor("budget_slack", budget_slack, shape=(batch_size,), dtypes=(torch.float64,), device=device)
        if batch_size and not bool(((budget >= 0) & (budget <= 1)).all()):
            raise ValueError(f"budget={budget.tolist()} must lie in [0, 1] for every request (0: no budget)")
        if not get_policy(config.policy).only_adds_acceptances:
            # A budget caps relaxed acceptances, the whole deviation only of a policy that adds acceptances and
            # nothing else. Elsewhere 0 (no cap, what the V1 adapter passes for every row) is dropped: the capped
            # path would count such a policy's acceptances as relaxed (ERSD's race acceptances).
            if batch_size and bool((budget != 0).any()):
                raise ValueError(
                    f"budget={budget.tolist()}: policy {config.policy!r} cannot be held to a deviation "
                    f"budget (its deviation is not only added acceptances); the policies that can: "
                    f"{list(BUDGET_POLICIES)}"
                )
            budget = budget_slack = None
    if tolerance is None:
        default = BUDGETED_TOLERANCE if config.budget is not None else config.tolerance
        tolerance = torch.full((batch_size,), default, dtype=torch.float64, device=device)
    _check_tensor("tolerance", tolerance, shape=(batch_size,), dtypes=_FLOAT_DTYPES, device=device)
    tolerance = tolerance.to(torch.float64)
    if batch_size and not bool(((tolerance >= 0) & (tolerance <= 1)).all()):
        raise ValueError(f"tolerance={tolerance.tolist()} must lie in [0, 1] for every request")

    if get_policy(config.policy).keyed:
        if race_keys is None:
            raise ValueError(
                f"policy {config.policy!r} needs race_keys: [batch, 2] int64, each request's key seed "
                "and the position of its first draft"
            )
        _check_tensor("race_keys", race_keys, shape=(batch_size, 2), dtypes=(torch.int64,), device=device)

    step = dict(
        target_logits=target_logits,
        draft_token_ids=draft_token_ids,
        num_draft_tokens=num_draft_tokens,
        bonus_token_ids=bonus_token_ids,
        draft_probs=draft_probs,
        is_greedy=is_greedy,
        uniform=uniform.to(torch.float64),
        tolerance=tolerance,
        config=config,
        max_spec_len=max_spec_len,
        budget=budget,
        budget_slack=budget_slack,
        race_keys=race_keys,
    )
    if backend == "triton" or (backend == "auto" and device.type in AUTO_KERNEL_DEVICES and not _kernel_failure):
        from ears_vllm import kernels

        problem = kernels.unusable_reason(device.type)
        if problem is None:
            try:
                return kernels.verify_triton(**step, inv_recovery_noise=recovery_noise.reciprocal())
            except Exception as exc:  # a kernel that fails to compile or launch must not fail the request
                if backend == "triton":  # asked for by name: the error is the caller's to see
                    raise
                _kernel_failed(exc)
        elif backend == "triton":
            raise ValueError(f"backend='triton' cannot run here: {problem}")
    return verify_reference(**step, recovery_noise=recovery_noise)  # inverts the noise only where it samples


def _check_randoms(
    uniform: torch.Tensor,  # [num_tokens] float
    recovery_noise: torch.Tensor,  # [batch, V] float32/64
) -> None:
    """ValueError naming the argument for randoms no draw gives: a uniform outside [0, 1) or NaN (every test
    compares against u), recovery noise negative, infinite or NaN (its reciprocal weighs the recovery race). Noise
    0 is allowed: torch's CPU ``exponential_`` draws it (``-log1p(-u)`` at u = 0), vLLM's V1 samples recovered
    tokens with it, and so must we. One host synchronisation for both."""
    bad_uniform = ~((uniform >= 0) & (uniform < 1))  # NaN fails both comparisons
    bad_noise = ~((recovery_noise >= 0) & (recovery_noise < float("inf")))
    uniform_bad, noise_bad = torch.stack([bad_uniform.any(), bad_noise.any()]).tolist()
    if uniform_bad:
        values = uniform[bad_uniform][:4].tolist()
        raise ValueError(f"uniform has values outside [0, 1) (first: {values}); one U[0, 1) draw per draft token")
    if noise_bad:
        values = recovery_noise[bad_noise][:4].tolist()
        raise ValueError(
            f"recovery_noise has negative, infinite or NaN values (first: {values}); Exp(1) draws are >= 0"
        )


def _kernel_failed(exc: Exception) -> None:
    global _kernel_failure
    _kernel_failure = f"{type(exc).__name__}: {exc}"
    get_logger().warning(
        "ears-vllm: the Triton verification kernel failed (%s); this process verifies with the PyTorch path from "
        "now on (same results, slower)",
        _kernel_failure,
    )


def _check_tensor(
    name: str,
    value: object,
    *,
    ndim: int | None = None,
    shape: tuple[int, ...] | None = None,
    dtypes: tuple[torch.dtype, ...] | None = None,
    integer: bool = False,
    device: torch.device | None = None,
) -> None:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(value.shape)}")
    if shape is not None and tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
    if integer and (value.dtype.is_floating_point or value.dtype == torch.bool):
        raise ValueError(f"{name} must be an integer tensor, got {value.dtype}")
    if dtypes is not None and value.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {value.dtype}; allowed: {[str(d) for d in dtypes]}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} is on {value.device} but target_logits is on {device}; use one device")
