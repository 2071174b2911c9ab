"""The verification step's contract: one typed step in, one typed count record out, and the arithmetic they share.

:class:`VerifyStep` is a step validated once (:meth:`VerifyStep.build`, what :func:`ears_vllm.verify` checks and
draws) and frozen: the PyTorch reference (:func:`ears_vllm.reference.verify_reference`) and the fused kernel
(:func:`ears_vllm.kernels.verify_triton`) each take the whole step, so no caller passes its tensors by position.
A deviation budget travels as one :class:`Budget` (its rate and slack named, both ``[batch]`` float64), and the
acceptance walks of both runners read their per-request controls the same way.

:class:`StepCounts` is what one step counted, by name: the stats (:class:`ears_vllm.stats.VerifyStats`), the
per-request history (:class:`ears_vllm.stats.RecentRequests`) and the budget ledgers read it.

The arithmetic every path shares is here once, on the host; its device twin for the kernels is
:mod:`ears_vllm.kernels.shared` (the same expressions, tested against these):

* :func:`request_offsets` / :func:`request_rows`: where each request's rows start in a flattened batch;
* :func:`budget_fits`: whether a relaxed acceptance fits in a request's budget (:mod:`ears_vllm.control.budget`);
* :func:`verified_positions`: the positions a step verified (every accepted draft, and the first rejected one);
* :class:`KernelParam`: the offsets of the float64 parameter vector the fused kernel reads.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch

from ears_vllm.config import BUDGET_POLICIES, EarsConfig
from ears_vllm.control.budget import BUDGETED_TOLERANCE
from ears_vllm.policies import PolicySpec, get_policy, settings_for

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# --- the shared arithmetic ------------------------------------------------------------------------------------------


def request_offsets(
    counts: torch.Tensor,  # [batch] int: rows per request
) -> torch.Tensor:  # [batch + 1] int64: request i owns rows offsets[i] .. offsets[i + 1] - 1
    """Where each request's rows start in a flattened batch, and where the last one ends (vLLM's ``cu_num_*``
    layout with its leading 0)."""
    return torch.cat([counts.new_zeros(1, dtype=torch.int64), torch.cumsum(counts.long(), 0)])


def request_rows(
    counts: torch.Tensor,  # [batch] int: rows per request
    num_rows: int | None = None,  # their sum, when known (no host synchronisation)
) -> tuple[torch.Tensor, torch.Tensor]:  # ([num_rows], [num_rows]) int64
    """Each row's request and its index within the request (``counts`` consecutive rows per request)."""
    counts = counts.long()
    requests = torch.arange(counts.shape[0], device=counts.device)
    request_of_row = torch.repeat_interleave(requests, counts, output_size=num_rows)
    index = torch.arange(request_of_row.shape[0], device=counts.device) - request_offsets(counts)[request_of_row]
    return request_of_row, index


def budget_fits(
    relaxed_before: torch.Tensor,  # [n] int: the request's relaxed acceptances earlier in this step
    slack: torch.Tensor,  # [n] float64: its slack before the step (B * verified - relaxed)
    budget: torch.Tensor,  # [n] float64: its budget B per verified position; 0 = none
    verified_through: torch.Tensor,  # [n] int: positions verified in the step, this one included
) -> torch.Tensor:  # [n] bool
    """A relaxed acceptance here keeps ``relaxed <= slack + B * verified`` (a request without a budget: always).
    The device twin is ``ears_vllm.kernels.shared.budget_fits``; the same float64 expression."""
    return ((relaxed_before + 1).double() <= slack + budget * verified_through.double()) | (budget == 0)


def verified_positions(
    accepted: torch.Tensor,  # [batch] int: accepted drafts per request
    drafts: torch.Tensor,  # [batch] int: drafts per request
) -> torch.Tensor:  # [batch] int64
    """The positions each request's step verified: its accepted drafts, and the first rejected one if any (the drafts
    after a rejection are never examined). Device twin: ``ears_vllm.kernels.shared.verified_positions``."""
    return accepted.long() + (accepted < drafts).long()


class KernelParam(enum.IntEnum):
    """The offsets of the fused kernel's ``params`` vector ([len(KernelParam)] float64: the values exact, as the
    reference reads them); each is the config setting of the same name in lower case (:func:`kernel_params`)."""

    MIN_RATIO = 0
    TYPICAL_EPS = 1
    TYPICAL_DELTA = 2
    ACCEPT_THRESHOLD_ACC = 3
    ACCEPT_THRESHOLD_SINGLE = 4
    RELAXED_DELTA = 5
    FLY_ENTROPY_THRESHOLD = 6
    MARS_THRESHOLD = 7
    FRONTIER_SCALE = 8


def kernel_params(config: EarsConfig, device: torch.device) -> torch.Tensor:  # [len(KernelParam)] float64
    """The fused kernel's parameter vector, packed by :class:`KernelParam`'s names."""
    values = [getattr(config, param.name.lower()) for param in KernelParam]
    return torch.tensor(values, dtype=torch.float64, device=device)


# --- the step -------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Budget:
    """Each request's deviation budget for one step (:mod:`ears_vllm.control.budget`)."""

    rate: torch.Tensor  # [batch] float64: B, relaxed acceptances allowed per verified position; 0 = none
    slack: torch.Tensor  # [batch] float64: B * verified - relaxed before this step


@dataclasses.dataclass(frozen=True, kw_only=True)
class VerifyStep:
    """One verification step, validated (:meth:`build`). Request ``i`` owns ``num_draft_tokens[i]`` consecutive
    rows of the per-token tensors."""

    target_logits: torch.Tensor  # [num_tokens, V] float after temperature/top-k/top-p; masked entries -inf
    draft_token_ids: torch.Tensor  # [num_tokens] int; negative = padding, always rejected
    num_draft_tokens: torch.Tensor  # [batch] int64
    bonus_token_ids: torch.Tensor  # [batch] int
    draft_probs: torch.Tensor | None  # [num_tokens, V] float or None (one-hot drafts)
    is_greedy: torch.Tensor  # [batch] bool
    uniform: torch.Tensor  # [num_tokens] float64 in [0, 1): one per draft position
    recovery_noise: torch.Tensor  # [batch, V] float32/64: Exp(1), one vector per request
    tolerance: torch.Tensor  # [batch] float64 in [0, 1]
    budget: Budget | None  # None: no request is capped
    race_keys: torch.Tensor | None  # [batch, 2] int64: key seed, position of the first draft (keyed policies)
    config: EarsConfig
    max_spec_len: int  # the output holds max_spec_len + 1 tokens per request
    settings: Mapping[str, Any]  # the policy's parameters, defaults resolved for max_spec_len (settings_for)

    @property
    def policy(self) -> PolicySpec:
        return get_policy(self.config.policy)

    @property
    def batch_size(self) -> int:
        return self.num_draft_tokens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.target_logits.shape[0]

    @functools.cached_property
    def offsets(self) -> torch.Tensor:  # [batch + 1] int64
        return request_offsets(self.num_draft_tokens)

    @functools.cached_property
    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:  # ([num_tokens], [num_tokens]) int64
        """Each draft row's request and position within it (:func:`request_rows`)."""
        return request_rows(self.num_draft_tokens, self.num_tokens)

    @functools.cached_property
    def inv_recovery_noise(self) -> torch.Tensor:  # [batch, V]: 1 / E, as the kernel weighs the recovery race
        return self.recovery_noise.reciprocal()

    @classmethod
    def build(
        cls,
        target_logits: torch.Tensor,  # [num_tokens, V]
        draft_token_ids: torch.Tensor,  # [num_tokens] int
        num_draft_tokens: torch.Tensor | Sequence[int],  # [batch] (0 allowed)
        bonus_token_ids: torch.Tensor,  # [batch] or [batch, 1] int
        *,
        draft_probs: torch.Tensor | None = None,  # [num_tokens, V] or None
        is_greedy: torch.Tensor | None = None,  # [batch] bool or None (= all random)
        uniform: torch.Tensor | None = None,  # [num_tokens] float; None = drawn
        recovery_noise: torch.Tensor | None = None,  # [batch, V] Exp(1); None = drawn
        tolerance: torch.Tensor | None = None,  # [batch] float; None = the config's
        budget: torch.Tensor | None = None,  # [batch] float64 B per request; 0 = none
        budget_slack: torch.Tensor | None = None,  # [batch] float64
        race_keys: torch.Tensor | None = None,  # [batch, 2] int64
        generator: torch.Generator | None = None,
        config: EarsConfig,
        max_spec_len: int | None = None,
    ) -> VerifyStep:
        """The step :func:`ears_vllm.verify` describes (its docstring says what each argument means), checked, with
        the randoms it was not given drawn; ``ValueError`` naming the argument for anything it cannot verify."""
        check_tensor("target_logits", target_logits, ndim=2, dtypes=FLOAT_DTYPES)
        num_tokens, vocab_size = target_logits.shape
        device = target_logits.device
        num_draft_tokens = _check_drafts(draft_token_ids, num_draft_tokens, vocab_size, num_tokens, device)
        batch_size = num_draft_tokens.shape[0]
        longest = int(num_draft_tokens.max()) if batch_size else 0
        if max_spec_len is None:
            max_spec_len = longest
        elif max_spec_len < longest:
            raise ValueError(f"max_spec_len={max_spec_len} is smaller than the longest draft ({longest})")

        bonus_token_ids = bonus_token_ids.reshape(-1) if bonus_token_ids.ndim == 2 else bonus_token_ids
        check_tensor("bonus_token_ids", bonus_token_ids, shape=(batch_size,), integer=True, device=device)
        if draft_probs is not None:
            check_tensor("draft_probs", draft_probs, shape=(num_tokens, vocab_size), dtypes=FLOAT_DTYPES, device=device)
        if is_greedy is None:
            is_greedy = torch.zeros(batch_size, dtype=torch.bool, device=device)
        check_tensor("is_greedy", is_greedy, shape=(batch_size,), dtypes=(torch.bool,), device=device)

        uniform, recovery_noise = _randoms(uniform, recovery_noise, batch_size, target_logits, generator)
        spec = get_policy(config.policy)
        if budget is None and config.budget is not None:
            budget = torch.where(is_greedy, 0.0, config.budget).to(torch.float64)
            budget_slack = torch.zeros(batch_size, dtype=torch.float64, device=device)
        capped = None if budget is None else _budget(budget, budget_slack, spec, batch_size, device)
        tolerance = _tolerance(tolerance, config, batch_size, device)
        return cls(
            target_logits=target_logits,
            draft_token_ids=draft_token_ids,
            num_draft_tokens=num_draft_tokens,
            bonus_token_ids=bonus_token_ids,
            draft_probs=draft_probs,
            is_greedy=is_greedy,
            uniform=uniform.to(torch.float64),
            recovery_noise=recovery_noise,
            tolerance=tolerance,
            budget=capped,
            race_keys=_race_keys(race_keys, spec, batch_size, device),
            config=config,
            max_spec_len=max_spec_len,
            settings=settings_for(config.policy, dict(config.params), max_spec_len),
        )


def _check_drafts(
    draft_token_ids: torch.Tensor,  # [num_tokens] int
    num_draft_tokens: torch.Tensor | Sequence[int],  # [batch]
    vocab_size: int,
    num_tokens: int,
    device: torch.device,
) -> torch.Tensor:  # [batch] int64: num_draft_tokens, checked
    check_tensor("draft_token_ids", draft_token_ids, ndim=1, integer=True, device=device)
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
    return num_draft_tokens


def _randoms(
    uniform: torch.Tensor | None,  # [num_tokens] float or None
    recovery_noise: torch.Tensor | None,  # [batch, V] float32/64 or None
    batch_size: int,
    target_logits: torch.Tensor,  # [num_tokens, V]
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:  # (uniform [num_tokens], recovery_noise [batch, V])
    """The randoms given, checked, or drawn: one U[0, 1) per draft token, one Exp(1) vector per request."""
    (num_tokens, vocab_size), device = target_logits.shape, target_logits.device
    if uniform is None:
        uniform = torch.rand(num_tokens, dtype=torch.float64, device=device, generator=generator)
    check_tensor("uniform", uniform, shape=(num_tokens,), dtypes=FLOAT_DTYPES, device=device)
    if recovery_noise is None:
        recovery_noise = torch.empty(batch_size, vocab_size, dtype=torch.float32, device=device)
        recovery_noise.exponential_(generator=generator)
    check_tensor(
        "recovery_noise",
        recovery_noise,
        shape=(batch_size, vocab_size),
        dtypes=(torch.float32, torch.float64),
        device=device,
    )
    check_randoms(uniform, recovery_noise)
    return uniform, recovery_noise


def _budget(
    budget: torch.Tensor,  # [batch] float64
    budget_slack: torch.Tensor | None,  # [batch] float64
    spec: PolicySpec,
    batch_size: int,
    device: torch.device,
) -> Budget | None:
    check_tensor("budget", budget, shape=(batch_size,), dtypes=(torch.float64,), device=device)
    check_tensor("budget_slack", budget_slack, shape=(batch_size,), dtypes=(torch.float64,), device=device)
    if batch_size and not bool(((budget >= 0) & (budget <= 1)).all()):
        raise ValueError(f"budget={budget.tolist()} must lie in [0, 1] for every request (0: no budget)")
    if spec.only_adds_acceptances:
        return Budget(rate=budget, slack=budget_slack)
    # A budget caps relaxed acceptances, the whole deviation only of a policy that adds acceptances and nothing
    # else. Elsewhere 0 (no cap, what the V1 adapter passes for every row) is dropped: the capped path would count
    # such a policy's acceptances as relaxed (ERSD's race acceptances).
    if batch_size and bool((budget != 0).any()):
        raise ValueError(
            f"budget={budget.tolist()}: policy {spec.name!r} cannot be held to a deviation "
            f"budget (its deviation is not only added acceptances); the policies that can: "
            f"{list(BUDGET_POLICIES)}"
        )
    return None


def _tolerance(
    tolerance: torch.Tensor | None,  # [batch] float or None
    config: EarsConfig,
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:  # [batch] float64
    if tolerance is None:
        default = BUDGETED_TOLERANCE if config.budget is not None else config.tolerance
        tolerance = torch.full((batch_size,), default, dtype=torch.float64, device=device)
    check_tensor("tolerance", tolerance, shape=(batch_size,), dtypes=FLOAT_DTYPES, device=device)
    tolerance = tolerance.to(torch.float64)
    if batch_size and not bool(((tolerance >= 0) & (tolerance <= 1)).all()):
        raise ValueError(f"tolerance={tolerance.tolist()} must lie in [0, 1] for every request")
    return tolerance


def _race_keys(
    race_keys: torch.Tensor | None,  # [batch, 2] int64 or None
    spec: PolicySpec,
    batch_size: int,
    device: torch.device,
) -> torch.Tensor | None:  # [batch, 2] int64, or None for a policy that reads none
    if spec.keyed:
        if race_keys is None:
            raise ValueError(
                f"policy {spec.name!r} needs race_keys: [batch, 2] int64, each request's key seed "
                "and the position of its first draft"
            )
        check_tensor("race_keys", race_keys, shape=(batch_size, 2), dtypes=(torch.int64,), device=device)
    return race_keys


def check_randoms(
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


def check_tensor(
    name: str,
    value: object,
    *,
    ndim: int | None = None,
    shape: tuple[int, ...] | None = None,
    dtypes: tuple[torch.dtype, ...] | None = None,
    integer: bool = False,
    device: torch.device | None = None,
) -> None:
    """ValueError naming ``name`` where ``value`` is not a tensor of this rank, shape, dtype or device."""
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


# --- what a step counted --------------------------------------------------------------------------------------------

MICRONATS_PER_NAT = 1_000_000


class StepCounts(NamedTuple):
    """What verification counted, by name: per request (``[batch]`` int64 tensors, or ints once on the host), or
    summed over requests and steps (ints). Sampled requests are those with temperature > 0; ``relaxed`` and
    ``random_verified`` are theirs (the added-TV numerator and denominator, :mod:`ears_vllm.stats`)."""

    drafts: Any  # draft tokens verified
    accepted: Any  # of them accepted
    random_drafts: Any  # draft tokens of sampled requests
    random_accepted: Any  # of them accepted
    relaxed: Any  # accepted drafts of sampled requests the standard test rejects
    random_verified: Any  # verified positions of sampled requests (verified_positions)
    greedy_relaxed: Any  # drafts other than the argmax accepted on greedy requests (fly, relaxed_topk)
    # The target's -log p of the relaxed drafts of sampled requests, summed, in micro-nats (each request's sum per
    # step rounded to the nearest micro-nat, so that it adds up exactly in int64 beside the other counts).
    relaxed_surprisal_micronats: Any

    @classmethod
    def of_requests(
        cls,
        drafts: torch.Tensor,  # [batch] int
        accepted: torch.Tensor,  # [batch] int
        relaxed: torch.Tensor,  # [batch] int
        is_random: torch.Tensor,  # [batch] bool: temperature > 0
        relaxed_surprisal: torch.Tensor,  # [batch] float: -log p of the relaxed drafts, nats (VerifyResult's)
    ) -> StepCounts:  # of [batch] int64 tensors
        """Each request's counts of one step, on the device (no host synchronisation)."""
        drafts, accepted, relaxed = drafts.long(), accepted.long(), relaxed.long()
        sampled, greedy = is_random.long(), (~is_random).long()
        return cls(
            drafts=drafts,
            accepted=accepted,
            random_drafts=drafts * sampled,
            random_accepted=accepted * sampled,
            relaxed=relaxed * sampled,
            random_verified=verified_positions(accepted, drafts) * sampled,
            greedy_relaxed=relaxed * greedy,
            relaxed_surprisal_micronats=(relaxed_surprisal.double() * MICRONATS_PER_NAT).round().long() * sampled,
        )

    def stacked(self) -> torch.Tensor:  # [len(StepCounts._fields), batch] int64
        """Per-request tensor counts as one tensor, to move to the host in one synchronisation."""
        return torch.stack(tuple(self))

    @classmethod
    def of_stacked(cls, rows: Sequence[Any]) -> StepCounts:
        """Back from :meth:`stacked` (or its ``.tolist()``; or a ``[len(_fields)]`` total)."""
        return cls(*rows)

    def of_request(self, i: int) -> StepCounts:
        """Request ``i``'s counts, from per-request counts."""
        return StepCounts(*(field[i] for field in self))

    def total(self, rows: Sequence[bool] | None = None) -> StepCounts:  # of ints
        """The sum over the requests (of those ``rows`` marks), from per-request counts on the host."""
        return StepCounts(
            *(
                sum(field) if rows is None else sum(v for v, mine in zip(field, rows, strict=True) if mine)
                for field in self
            )
        )
