"""Adapter for vLLM's Model Runner V2 (``vllm.v1.worker.gpu.spec_decode``): the GPU default in vLLM 0.33, the only
runner in 0.34.

MRV2 verifies raw logits in four Triton launches (``rejection_sampler_utils.rejection_sample``):
per-block logit statistics, the acceptance walk, residual resampling, insertion. Its randomness is
stateless Philox keyed by (request seed, position). Only the walk depends on the policy, so for
the policies whose ``PolicySpec.runners`` name MRV2 this adapter runs MRV2's own statistics, resampling and
insertion launches, and the walk of :mod:`ears_vllm.kernels.split_stats_accept` with MRV2's own uniform draw
(``tl_rand32``): at tolerance 0 the result is bit-identical to MRV2's, and at any tolerance the recovered and
bonus tokens are MRV2's. ``ersd`` instead takes each row's race winner on MRV2's own keys
(:func:`verify_races_mrv2`).

Patched (see :mod:`ears_vllm.seam.patches`): ``RejectionSampler.__init__`` (the sampler's plan, from
:func:`ears_vllm.seam.verification.plan_verification`), ``RejectionSampler.__call__`` (tells
``rejection_sample`` which sampler calls it), ``rejection_sample`` where ``rejection_sampler.py`` looks
it up by name (ours for samplers planned so, vLLM's with every argument as given for the others) and
``Sampler.add_request`` (fills a request's slot with its per-request settings).

vLLM's launches are called by keyword, each given the parameters it declares out of a vocabulary of
values this adapter knows (``KERNEL_VALUES``): a renamed parameter with a known value (0.33's
``num_logits`` for 0.32's ``num_speculative_steps``) is absorbed, and a parameter the adapter cannot fill
makes the hook check fail, so the server refuses at startup instead of mis-calling the kernel.

Where the walk's branches read more of a row than MRV2's statistics hold (typical's entropy, MARS's two largest
logits: ``PolicySpec.kernel_inputs``), our statistics launch (:mod:`ears_vllm.kernels.split_stats`) runs in place
of vLLM's, writing what vLLM's writes, bit for bit, and those terms beside it. ``adasd``'s learnt JS thresholds live
in the request slots on the device (:class:`SlotControls`), read and updated by the walk; its draft-length half is
:mod:`ears_vllm.seam.vllm_mrv2_drafter`. Every policy of the registry runs here. Left to vLLM (the plan names them):
vLLM's own FLy, block verification, synthetic acceptance rates and watermarking.
"""

from __future__ import annotations

import importlib
import inspect
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from ears_vllm import stats_registry
from ears_vllm._log import get_logger
from ears_vllm.config import EarsConfig, resolve_config
from ears_vllm.control.budget import share_slack
from ears_vllm.policies import (
    POLICIES,
    fly_entropy,
    get_policy,
    request_policy_refusal,
    settings_for,
)
from ears_vllm.policies.adasd import LearntThreshold
from ears_vllm.seam import patches, vllm_mrv2_drafter, vllm_races
from ears_vllm.seam.hooks import check_module, find_class, installed_runners, signature_of, vllm_version
from ears_vllm.seam.verification import ActiveSampler, config_for_sampler, enforce, log_plan, plan_verification
from ears_vllm.seam.vllm_requests import new_control, per_request_status
from ears_vllm.stats import RecentRequests, VerifyStats
from ears_vllm.stats_registry import StatsSource
from ears_vllm.step import Budget, StepCounts, request_rows

MODULE = "vllm.v1.worker.gpu.spec_decode.rejection_sampler"
UTILS_MODULE = "vllm.v1.worker.gpu.spec_decode.rejection_sampler_utils"
RANDOM_MODULE = "vllm.v1.worker.gpu.sample.gumbel"
SAMPLER_MODULE = "vllm.v1.worker.gpu.sample.sampler"
STATES_MODULE = "vllm.v1.worker.gpu.states"  # RequestState: a request's slot, freed when it finishes
DRAFT_CACHE_MODULE = "vllm.v1.worker.gpu.spec_decode.draft_logits"  # vLLM 0.34's DraftLogitsCache
# The leading parameters of MRV2's ``rejection_sample``, by the names verify_mrv2 takes them.
EXPECTED_PARAMETERS = (
    "target_logits",
    "draft_logits",
    "draft_sampled",
    "cu_num_logits",
    "pos",
    "idx_mapping",
    "expanded_idx_mapping",
    "expanded_local_pos",
    "temperature",
    "seed",
    "num_speculative_steps",
)
# The draft distributions' parameter, by release: a [max_num_reqs, k, V] tensor up to 0.33; from 0.34 a
# DraftLogitsCache (``.values`` [rows, k, V], ``.row_mapping`` None or [max_num_reqs]: a request's row in
# ``values`` under batch-sharded sampling, -1 where another rank holds it).
DRAFT_PARAMETERS = ("draft_logits", "draft_logits_cache")
# Every parameter name of MRV2's statistics, resampling and insertion launches that this adapter can fill
# (verify_mrv2 builds the values); a kernel may take any subset, in any order.
KERNELS = ("_compute_local_logits_stats_kernel", "_resample_kernel", "_insert_resampled_kernel")
KERNEL_VALUES = frozenset(
    {
        "target_local_argmax_ptr",
        "target_local_argmax_stride",
        "target_local_max_ptr",
        "target_local_max_stride",
        "target_local_sumexp_ptr",
        "target_local_sumexp_stride",
        "draft_local_max_ptr",
        "draft_local_max_stride",
        "draft_local_sumexp_ptr",
        "draft_local_sumexp_stride",
        "target_logits_ptr",
        "target_logits_stride",
        "draft_logits_ptr",
        "draft_logits_stride_0",
        "draft_logits_stride_1",
        "draft_logits_row_mapping_ptr",  # 0.34
        "expanded_idx_mapping_ptr",
        "expanded_local_pos_ptr",
        "temp_ptr",
        "vocab_size",
        "num_speculative_steps",  # 0.32
        "num_logits",  # 0.33's name for what 0.32's num_speculative_steps told the bonus-row test
        "BLOCK_SIZE",
        "HAS_DRAFT_LOGITS",
        "resampled_local_argmax_ptr",
        "resampled_local_argmax_stride",
        "resampled_local_max_ptr",
        "resampled_local_max_stride",
        "target_rejected_logsumexp_ptr",
        "draft_rejected_logsumexp_ptr",
        "rejected_step_ptr",
        "cu_num_logits_ptr",
        "draft_sampled_ptr",
        "seed_ptr",
        "pos_ptr",
        "cumulative_log_p_ptr",
        "contexts_ptr",
        "contexts_stride",
        "watermarking_ptr",
        "watermarking_skip_mask_ptr",
        "watermark_key_0",
        "watermark_key_1",
        "USE_FP64",
        "USE_BLOCK_VERIFICATION",
        "CONTEXT_WIDTH",
        "WATERMARK",
        "DEDUPLICATE_CONTEXTS",
        "SKIP_MASKED_BLOCKS",  # 0.34
        "sampled_ptr",
        "sampled_stride",
        "num_sampled_ptr",
        "resample_num_blocks",
        "PADDED_RESAMPLE_NUM_BLOCKS",
    }
)
VOCAB_BLOCK_SIZE = 8192  # MRV2's statistics block; the walk merges these blocks
RESAMPLE_BLOCK_SIZE = 1024
CANDIDATE_BLOCK_SIZE = 1024  # relaxed_topk's pass over a rejected row's logits in the walk
JS_BLOCK_SIZE = 1024  # adasd's pass over a verified row's target and draft logits in the walk (draft logits only)

logger = get_logger()


# The sampler whose __call__ is running: ears-vllm's rule when its plan says so, else vLLM's.
active = ActiveSampler("ears_vllm_mrv2")
as_sampler, verifying_with = active.of, active.verifying_with


# Each PolicySpec.kernel_id's policy, by id (the rows of the counts kept by policy on the device).
POLICY_OF_KERNEL_ID = {spec.kernel_id: name for name, spec in sorted(POLICIES.items(), key=lambda p: p[1].kernel_id)}


class Mrv2Result(NamedTuple):
    """One MRV2 step verified (:func:`verify_mrv2`)."""

    sampled: torch.Tensor  # [num_reqs, k + 1] int64: accepted drafts, then the recovered or bonus token
    num_sampled: torch.Tensor  # [num_reqs] int32: accepted + 1
    num_relaxed: torch.Tensor  # [num_reqs] int32: accepted drafts the native test rejects
    relaxed_surprisal: torch.Tensor  # [num_reqs] float32: their target -log p, summed (0 on greedy rows)


class SlotControls:
    """Per-request settings on MRV2, by request state index (MRV2's slot): each request's policy (its
    ``PolicySpec.kernel_id``, read per row by the walk once the batch mixes policies), its tolerance, and its
    budget ledger, whose slack lives on the device and is charged by the acceptance walk (no host sync), and
    AdaSD's learnt JS threshold (its exact sums and counts, :attr:`adasd_sums` and :attr:`adasd_counts`, read and
    updated by the walk, zeroed when a request takes the slot).

    Filled when vLLM adds a request to its sampler (``Sampler.add_request``, patched), from the request's
    ``vllm_xargs`` (:mod:`ears_vllm.control.requests`; the API server has checked them,
    :func:`ears_vllm.seam.vllm_requests.check_request`). A policy the walk has no branch for (an offline caller's)
    is logged and replaced by the server's."""

    def __init__(self, server: EarsConfig, size: int) -> None:
        self.server = server
        self.policy = [server.policy] * size
        self.tolerance = [server.tolerance] * size
        self.budget = [0.0] * size
        self.policies = {server.policy}  # every policy a request has asked for (the walk's inputs and branches)
        self.relaxes = not server.is_lossless  # some request may relax: the walk runs the policy's branch
        self.has_budget = False
        self.pooled = [False] * size  # slots that share the server's pool (budget_scope "server")
        self.pool_steps = 0
        self._new: list[int] = []  # slots whose ledger starts afresh at the next step
        self._device: tuple[torch.Tensor, ...] | None = None
        self._dirty = True
        # Each slot's request's StepCounts so far ([size, len(StepCounts._fields)] int64, on the device; added by
        # each step, zeroed when a request takes the slot), and the finished requests' rows copied out of it, on
        # the device until the per-request history is read (:meth:`read_finished`).
        self.counts: torch.Tensor | None = None
        self.finished: list[tuple[str, str, torch.Tensor]] = []  # (vLLM request id, policy, counts [fields])
        # AdaSD's acceptance threshold per slot (policies.adasd.LearntThreshold, on the device): the JS distances
        # summed at the natively accepted and the natively rejected verified positions ([size, 2] float64), and
        # their counts ([size, 2] int64); made with the counts, zeroed when a request takes the slot.
        self.adasd_sums: torch.Tensor | None = None
        self.adasd_counts: torch.Tensor | None = None

    @property
    def mixed(self) -> bool:
        """Requests have asked for another policy than the server's: the walk reads each row's policy."""
        return len(self.policies) > 1

    def add_request(self, slot: int, sampling_params: Any) -> None:
        control = new_control(self.server, sampling_params, f"request in slot {slot}")
        policy = control.config.policy
        refusal = request_policy_refusal(self.server.policy, policy, "MRV2")
        if refusal is not None:
            logger.warning(
                "ears-vllm: request in slot %d asks for policy %r, but %s; it is verified with the server's policy",
                slot,
                policy,
                refusal,
            )
            policy = self.server.policy
        self.policy[slot] = policy
        self.policies.add(policy)
        self.tolerance[slot], self.budget[slot] = control.tolerance, control.budget
        self.pooled[slot] = control.ledger is not None and control.ledger.shared
        self.relaxes |= control.tolerance > 0 or not control.config.is_lossless
        self.has_budget |= control.budget > 0
        self._new.append(slot)
        self._dirty = True

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(tolerance [size] float32, budget [size] float64, slack [size] float64, pooled [size] bool, pool []
        float64: the server pool's slack, policy [size] int32: each slot's ``PolicySpec.kernel_id``, one_hot [size]
        bool: its policy recovers from p without the draft) on ``device``."""
        if self._device is None or self._device[0].device != device:
            size = len(self.tolerance)
            self._device = (
                torch.empty(size, dtype=torch.float32, device=device),
                torch.empty(size, dtype=torch.float64, device=device),
                torch.zeros(size, dtype=torch.float64, device=device),
                torch.zeros(size, dtype=torch.bool, device=device),
                torch.zeros((), dtype=torch.float64, device=device),
                torch.empty(size, dtype=torch.int32, device=device),
                torch.empty(size, dtype=torch.bool, device=device),
            )
        tolerance, budget, slack, pooled, _, policy, one_hot = self._device
        if self._dirty:
            tolerance.copy_(torch.tensor(self.tolerance, dtype=torch.float32), non_blocking=True)
            budget.copy_(torch.tensor(self.budget, dtype=torch.float64), non_blocking=True)
            pooled.copy_(torch.tensor(self.pooled), non_blocking=True)
            specs = [get_policy(name) for name in self.policy]
            policy.copy_(torch.tensor([spec.kernel_id for spec in specs], dtype=torch.int32), non_blocking=True)
            one_hot.copy_(torch.tensor([spec.recovery == "one_hot_residual" for spec in specs]), non_blocking=True)
            if self.counts is None or self.counts.device != device:
                self.counts = torch.zeros(len(self.policy), len(StepCounts._fields), dtype=torch.int64, device=device)
            if self.adasd_sums is None or self.adasd_sums.device != device:
                self.adasd_sums = torch.zeros(len(self.policy), 2, dtype=torch.float64, device=device)
                self.adasd_counts = torch.zeros(len(self.policy), 2, dtype=torch.int64, device=device)
            if self._new:
                new = torch.tensor(self._new, device=device)
                slack.index_fill_(0, new, 0.0)
                self.counts.index_fill_(0, new, 0)
                self.adasd_sums.index_fill_(0, new, 0.0)
                self.adasd_counts.index_fill_(0, new, 0)
            self._new, self._dirty = [], False
        return self._device

    def js_threshold(self, slot: int) -> LearntThreshold:
        """The acceptance threshold AdaSD's request in ``slot`` has learnt so far, read back to the host (a host
        synchronisation: for tests and inspection, never per step)."""
        if self.adasd_sums is None or self.adasd_counts is None:
            return LearntThreshold()
        (accepted_sum, rejected_sum), (accepted_count, rejected_count) = (
            self.adasd_sums[slot].tolist(),
            self.adasd_counts[slot].tolist(),
        )
        return LearntThreshold(accepted_sum, accepted_count, rejected_sum, rejected_count)

    def add_counts(
        self,
        idx_mapping: torch.Tensor,  # [num_reqs]: the slots of the batch rows
        per_request: torch.Tensor,  # [len(StepCounts._fields), num_reqs] int64: the step's counts by request
    ) -> None:
        """Add a step's counts to its requests' slots (on the device)."""
        if self.counts is not None:
            self.counts.index_add_(0, idx_mapping.long(), per_request.T)

    def finish(self, slot: int, req_id: str) -> None:
        """The request in ``slot`` finished: its counts are copied out of the slot on the device (no host read)."""
        if self.counts is not None and 0 <= slot < len(self.policy):
            self.finished.append((req_id, self.policy[slot], self.counts[slot].clone()))

    def read_finished(self, history: RecentRequests) -> None:
        """The finished requests' counts into ``history`` (one host read for all of them)."""
        if not self.finished:
            return
        finished, self.finished = self.finished, []
        rows = torch.stack([counts for _, _, counts in finished]).tolist()
        for (req_id, policy, _), row in zip(finished, rows, strict=True):
            history.record(req_id, policy, StepCounts.of_stacked(row))

    def deal_pool(self, idx_mapping: torch.Tensor) -> torch.Tensor | None:  # [num_reqs] slots of the batch rows
        """Before the walk: deal the server pool's slack to the batch's pooled slots (:func:`share_slack`), on
        the device; returns the rows' pooled mask [num_reqs] for :meth:`gather_pool` (None without a pool)."""
        if not any(self.pooled):
            return None
        _, _, slack, pooled, pool, _, _ = self._device
        rows = pooled[idx_mapping]
        slack[idx_mapping] = torch.where(rows, share_slack(pool, rows, self.pool_steps), slack[idx_mapping])
        self.pool_steps += 1
        return rows

    def gather_pool(self, idx_mapping: torch.Tensor, rows: torch.Tensor | None) -> None:
        """After the walk: the pool's slack is what its rows left (a finished request's share is not lost)."""
        if rows is not None:
            _, _, slack, _, pool, _, _ = self._device
            pool.copy_(torch.where(rows, slack[idx_mapping], 0.0).sum())


class _State:
    """What this process's MRV2 sampler runs with (one engine per worker process)."""

    original_rejection_sample: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    hook_problem: str | None = None  # why the MRV2 hooks do not check out (None: they do)
    stats = VerifyStats()
    # The steps' StepCounts by the policy that verified them ([kernel ids, len(StepCounts._fields)] int64, a row per
    # PolicySpec.kernel_id), summed on the device and read at each report, so a step costs no host synchronisation.
    device_counts: torch.Tensor | None = None
    pending_steps: int = 0
    pending_draft_dist_steps: int = 0
    pending_policy: str = "standard"  # the server's policy (its row is recorded with the steps)
    last_read: float = 0.0
    kernel_failure: str | None = None  # why the acceptance kernel failed; vLLM's own sampler runs since
    slots: SlotControls | None = None  # per-request settings by request state index (made when a sampler verifies)
    requests = RecentRequests()  # each finished request's own counts (read from its slot, SlotControls.finish)


state = _State()


def recent_requests() -> RecentRequests:
    """The per-request history, with the requests that finished since the last read in it."""
    if state.slots is not None:
        state.slots.read_finished(state.requests)
    return state.requests


stats_registry.register(
    "MRV2", StatsSource(stats=lambda: state.stats, flush=lambda: flush_counts(), requests=recent_requests)
)


def _parameters(kernel: Any) -> tuple[str, ...]:
    names = getattr(kernel, "arg_names", None)  # a Triton JITFunction
    return tuple(names) if names is not None else tuple(inspect.signature(kernel).parameters)


def check_hooks() -> str | None:
    """None when MRV2's ``rejection_sample``, kernels and uniform draw are what this adapter fills and calls, else
    every difference found (``; ``-separated), so a release that changed several things names them all."""
    problem = check_module(MODULE, ("RejectionSampler",), "rejection_sample", ())
    if problem is not None:
        return problem
    problems = []
    found = tuple(signature_of(importlib.import_module(MODULE).rejection_sample).parameters)
    allowed = [DRAFT_PARAMETERS if name == "draft_logits" else (name,) for name in EXPECTED_PARAMETERS]
    if len(found) < len(allowed) or any(name not in names for name, names in zip(found, allowed, strict=False)):
        problems.append(
            f"{MODULE}.rejection_sample has parameters {found}, expected {EXPECTED_PARAMETERS} first (the second "
            f"one of {DRAFT_PARAMETERS})"
        )
    utils = importlib.import_module(UTILS_MODULE)
    for name in KERNELS:
        if not hasattr(utils, name):
            problems.append(f"{UTILS_MODULE} has no {name}")
            continue
        unknown = [p for p in _parameters(getattr(utils, name)) if p not in KERNEL_VALUES]
        if unknown:
            problems.append(f"{UTILS_MODULE}.{name} has parameter(s) {unknown} that ears-vllm cannot fill")
    if not hasattr(importlib.import_module(RANDOM_MODULE), "tl_rand32"):
        problems.append(f"{RANDOM_MODULE} has no tl_rand32")
    return "; ".join(problems) or None


def draft_logits_of(arguments: dict[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(draft logits [rows, k, V] or None, row mapping [max_num_reqs] or None)`` from ``rejection_sample``'s
    arguments by name, whichever release made the call (see :data:`DRAFT_PARAMETERS`)."""
    if "draft_logits_cache" in arguments:
        cache = arguments["draft_logits_cache"]
        return (None, None) if cache is None else (cache.values, cache.row_mapping)
    return arguments["draft_logits"], None


def vllm_arguments(step: dict[str, Any], function: Callable[..., Any]) -> dict[str, Any]:
    """A step in :func:`verify_mrv2`'s names (``draft_logits`` [rows, k, V] or None, and optionally
    ``draft_logits_row_mapping`` [max_num_reqs] int32) as the installed release's ``function`` takes it: from
    vLLM 0.34 on, the draft logits inside vLLM's own ``DraftLogitsCache`` (a sharded one when a row mapping is
    given). For calling vLLM's MRV2 ``rejection_sample`` beside ours on the same step (tests, benchmarks)."""
    arguments = dict(step)
    draft_logits = arguments.pop("draft_logits")
    row_mapping = arguments.pop("draft_logits_row_mapping", None)
    if "draft_logits_cache" not in inspect.signature(function).parameters:
        if row_mapping is not None:
            raise ValueError(f"vLLM {vllm_version()}'s rejection_sample takes no sharded draft logits")
        return arguments | {"draft_logits": draft_logits}
    cache = None
    if draft_logits is not None:
        cache_cls = importlib.import_module(DRAFT_CACHE_MODULE).DraftLogitsCache
        _, k, vocab = draft_logits.shape
        cache = cache_cls(1, k, vocab, dtype=draft_logits.dtype, fill=0.0, device=draft_logits.device)
        cache.values, cache.row_mapping = draft_logits, row_mapping  # what a sharded cache holds on its rank
    return arguments | {"draft_logits_cache": cache}


def install(hook_problem: str | None) -> None:
    """Wrap MRV2's ``RejectionSampler`` (idempotent); with a ``hook_problem``, only so that startup can refuse."""
    state.hook_problem = hook_problem
    patches.install("mrv2.sampler")


def wrap_init(original_init: Callable[..., None]) -> Callable[..., None]:
    """``RejectionSampler.__init__`` that plans the sampler (:func:`_configure`)."""
    return active.wrap_init(
        original_init, lambda sampler, arguments: _configure(importlib.import_module(MODULE), sampler)
    )


def wrap_call(original_call: Callable[..., Any]) -> Callable[..., Any]:
    """``RejectionSampler.__call__`` that tells ``rejection_sample`` which sampler calls it."""
    return active.wrap_call(original_call)


def _configure(module: Any, sampler: Any) -> EarsConfig | None:
    """Plan this sampler (raises when it must refuse), apply the plan, log it; the config when ours verifies."""
    from vllm.config import get_current_vllm_config_or_none

    vllm_config = get_current_vllm_config_or_none()
    spec_config = getattr(vllm_config, "speculative_config", None)
    config = config_for_sampler(
        resolve_config(getattr(vllm_config, "additional_config", None)),
        getattr(spec_config, "num_speculative_tokens", None),
    )
    method = getattr(spec_config, "rejection_sample_method", None)
    if getattr(sampler, "use_block_verification", False):
        method = "block"
    elif getattr(sampler, "synthetic_conditional_rates", None) is not None:
        method = "synthetic"
    elif getattr(sampler, "fly_window_size", 0):
        method = "fly"
    watermarking = getattr(sampler, "watermark_key", None) is not None
    keyed = get_policy(config.policy).keyed
    drafter = vllm_races.draft_problem(spec_config, "MRV2") if keyed else None
    plan = plan_verification(
        "MRV2",
        config,
        vllm_version=vllm_version(),
        hook_problem=state.hook_problem,
        installed_runners=installed_runners(),
        method=method,
        watermarking=watermarking,
        draft_problem=drafter,
    )
    enforce(plan, logger)
    per_request = "off"
    if plan.verifies:
        patches.install("mrv2.verifies", owner=module)
        state.original_rejection_sample = patches.original(module, "rejection_sample")
        size = getattr(getattr(vllm_config, "scheduler_config", None), "max_num_seqs", None) or 1024
        state.slots = SlotControls(config, int(size))
        per_request = per_request_status(_install_add_request_hook(), applied="on (tolerance, budget)")
    keys = vllm_races.install_mrv2() if plan.verifies and keyed else "off"
    draft_length = vllm_mrv2_drafter.install(config, vllm_config) if plan.verifies else "untouched"
    log_plan(
        plan,
        config,
        logger,
        f" per_request={per_request}"
        + (f" keys={keys}" if keyed else "")
        + (f" draft_length={draft_length}" if get_policy(config.policy).cuts_drafts else ""),
    )
    return config if plan.verifies else None


def _install_add_request_hook() -> str | None:
    """Wrap MRV2's ``Sampler.add_request`` so each request's slot gets its settings; None, or why it cannot."""
    for module, name, method in (
        (SAMPLER_MODULE, "Sampler", "add_request"),
        (STATES_MODULE, "RequestState", "remove_request"),
    ):
        cls, problem = find_class(module, name, method)
        if cls is None:
            return problem
    patches.install("mrv2.slots")
    return None


def wrap_add_request(original: Callable[..., Any]) -> Callable[..., Any]:
    """MRV2's ``Sampler.add_request``, then the request's slot filled with its ears settings."""

    def add_request(self: Any, req_idx: int, sampling_params: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, req_idx, sampling_params, *args, **kwargs)
        if state.slots is not None and 0 <= req_idx < len(state.slots.tolerance):
            state.slots.add_request(req_idx, sampling_params)
        return result

    return add_request


def wrap_remove_request(original: Callable[..., Any]) -> Callable[..., Any]:
    """MRV2's ``RequestState.remove_request`` (a request finished or was preempted), its slot's counts kept first."""

    def remove_request(self: Any, req_id: str, *args: Any, **kwargs: Any) -> Any:
        slot = original(self, req_id, *args, **kwargs)
        if state.slots is not None and slot is not None:
            state.slots.finish(slot, req_id)
        return slot

    return remove_request


def rejection_sample(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """MRV2's ``rejection_sample`` under the configured policy, for samplers planned so; vLLM's own function,
    with every argument as given (FLy's, watermarking's and whatever a later release adds), for the others.

    vLLM's arguments, by name: ``target_logits`` [num_logits, V] after temperature, ``draft_logits``
    [max_num_reqs, k, V] before temperature or None (one-hot drafts; 0.34: ``draft_logits_cache``, see
    :data:`DRAFT_PARAMETERS`), ``draft_sampled`` [num_logits],
    ``cu_num_logits`` [num_reqs + 1], ``pos`` [num_logits], ``idx_mapping`` [num_reqs],
    ``expanded_idx_mapping`` [num_logits], ``expanded_local_pos`` [num_logits], ``temperature``
    [max_num_reqs], ``seed`` [max_num_reqs], ``num_speculative_steps``, then keywords.
    Returns ``(sampled [num_reqs, k + 1], num_sampled [num_reqs])``, as vLLM's does.
    """
    original = state.original_rejection_sample
    assert original is not None
    config = active.config  # planned only for the policies whose PolicySpec.runners name MRV2
    if config is None or "MRV2" not in get_policy(config.policy).runners:
        return original(*args, **kwargs)
    if state.kernel_failure is not None:
        state.stats.fallback_steps += 1
        return original(*args, **kwargs)
    bound = signature_of(original).bind(*args, **kwargs)
    bound.apply_defaults()
    given = bound.arguments
    draft_logits, draft_logits_row_mapping = draft_logits_of(given)
    slots = state.slots if state.slots is not None and state.slots.server is config else None
    try:
        result = verify_mrv2(
            **{name: given[name] for name in EXPECTED_PARAMETERS if name != "draft_logits"},
            draft_logits=draft_logits,
            config=config,
            draft_logits_row_mapping=draft_logits_row_mapping,
            skip_masked_vocab_blocks=bool(given.get("skip_masked_vocab_blocks", False)),
            use_fp64=bool(given.get("use_fp64", False)),
            slots=slots,
        )
    except Exception as exc:  # a kernel that fails to compile or launch must not fail the requests
        state.kernel_failure = f"{type(exc).__name__}: {exc}"
        logger.warning(
            "ears-vllm: the MRV2 acceptance kernel failed (%s); this worker runs vLLM's own rejection sampling "
            "from now on",
            state.kernel_failure,
        )
        state.stats.fallback_steps += 1
        return original(*args, **kwargs)
    _record(
        result,
        given["cu_num_logits"],
        given["idx_mapping"],
        given["temperature"],
        has_draft_dist=draft_logits is not None,
        policy=config.policy,
        slots=slots,
    )
    return result.sampled, result.num_sampled


def _launch(kernel: Any, grid: tuple[int, ...], values: dict[str, Any], **options: Any) -> None:
    """Launch one of MRV2's kernels with the parameters it declares, taken from ``values``, and the launch
    ``options`` vLLM gives it."""
    kernel[grid](**{name: values[name] for name in _parameters(kernel)}, **options)


def verify_mrv2(
    target_logits: torch.Tensor,  # [num_logits, V], after temperature
    draft_logits: torch.Tensor | None,  # [max_num_reqs, k, V], before temperature
    draft_sampled: torch.Tensor,  # [num_logits]
    cu_num_logits: torch.Tensor,  # [num_reqs + 1]
    pos: torch.Tensor,  # [num_logits]
    idx_mapping: torch.Tensor,  # [num_reqs]
    expanded_idx_mapping: torch.Tensor,  # [num_logits]
    expanded_local_pos: torch.Tensor,  # [num_logits]
    temperature: torch.Tensor,  # [max_num_reqs]
    seed: torch.Tensor,  # [max_num_reqs]
    num_speculative_steps: int,
    config: EarsConfig,
    *,
    draft_logits_row_mapping: torch.Tensor | None = None,  # [max_num_reqs] int32: a request's row in draft_logits
    skip_masked_vocab_blocks: bool = False,
    use_fp64: bool = False,
    slots: SlotControls | None = None,
) -> Mrv2Result:
    """MRV2's launches around the ears-vllm walk.

    ``draft_logits_row_mapping``: vLLM 0.34's sharded draft-logits cache (None: a request's draft logits sit at
    its request state index); ``skip_masked_vocab_blocks``: passed on to vLLM 0.34's resampling launch, as vLLM
    passes it; ``slots``: each request's tolerance, budget ledger and AdaSD threshold (None: the config's tolerance
    for every request, and AdaSD's requests at their cold start: the standard rule, nothing kept)."""
    if get_policy(config.policy).keyed:
        return verify_races_mrv2(
            target_logits,
            draft_sampled,
            cu_num_logits,
            pos,
            expanded_idx_mapping,
            temperature,
            seed,
            num_speculative_steps,
        )
    import triton

    from ears_vllm.kernels.split_stats_accept import split_stats_accept_kernel, walk_policy

    utils = importlib.import_module(UTILS_MODULE)
    uniform = importlib.import_module(RANDOM_MODULE).tl_rand32
    if draft_logits_row_mapping is not None and "draft_logits_row_mapping_ptr" not in _parameters(
        utils._compute_local_logits_stats_kernel
    ):
        raise ValueError(f"vLLM {vllm_version()}'s MRV2 statistics cannot read a sharded draft-logits cache")
    num_reqs = cu_num_logits.shape[0] - 1
    num_logits, vocab_size = target_logits.shape
    has_draft_logits = draft_logits is not None
    draft_strides = (draft_logits.stride(0), draft_logits.stride(1)) if has_draft_logits else (0, 0)
    if has_draft_logits:
        vocab_size = min(vocab_size, draft_logits.size(-1))  # a target vocabulary padded past the draft's

    num_blocks = triton.cdiv(vocab_size, VOCAB_BLOCK_SIZE)
    stats = {
        name: target_logits.new_empty(num_logits, num_blocks, dtype=dtype)
        for name, dtype in (
            ("target_local_argmax", torch.int64),
            ("target_local_max", torch.float32),
            ("target_local_sumexp", torch.float32),
            ("draft_local_max", torch.float32),
            ("draft_local_sumexp", torch.float32),
        )
    }
    # What the launches read, by vLLM's parameter names; each launch takes the names it declares.
    shared = dict(
        target_logits_ptr=target_logits,
        target_logits_stride=target_logits.stride(0),
        draft_logits_ptr=draft_logits,
        draft_logits_stride_0=draft_strides[0],
        draft_logits_stride_1=draft_strides[1],
        expanded_idx_mapping_ptr=expanded_idx_mapping,
        expanded_local_pos_ptr=expanded_local_pos,
        temp_ptr=temperature,
        vocab_size=vocab_size,
        HAS_DRAFT_LOGITS=has_draft_logits,
        cu_num_logits_ptr=cu_num_logits,
        num_speculative_steps=num_speculative_steps,
        num_logits=num_logits,  # 0.32's bonus-row test, 0.33's
        draft_logits_row_mapping_ptr=draft_logits_row_mapping,
    )
    spec = get_policy(config.policy)
    mixed = slots is not None and slots.mixed  # the walk reads each row's policy
    specs = [get_policy(name) for name in sorted(slots.policies)] if mixed else [spec]
    if mixed:
        policy_constexpr = walk_policy(spec, relaxes=False)  # unread with PER_ROW_POLICY
        for each in specs:
            walk_policy(each, relaxes=True)  # refuses a policy the walk has no branch for
    else:
        policy_constexpr = walk_policy(spec, relaxes=not config.is_lossless or (slots is not None and slots.relaxes))
    walked = specs if mixed or policy_constexpr != POLICIES["standard"].kernel_id else []  # the branches that run
    settings: dict[str, Any] = {}
    for each in specs:
        settings |= settings_for(each.name, dict(config.params), num_speculative_steps)
    kernel_inputs = {name for each in walked for name in each.kernel_inputs}
    stats |= _launch_stats(utils, shared, stats, kernel_inputs, num_logits)
    extra_stats = stats.get("target_local_entropy", stats.get("target_local_runner_up", stats["target_local_max"]))
    # Argmax recovery (typical) on a sampled row: the walk writes the target's argmax, and MRV2's insertion launch
    # reads the temperature the walk leaves here (0 on such a row, as on a greedy one), so it keeps the walk's token.
    argmax_recovery = any(each.recovery == "argmax" for each in walked)
    insert_temp = torch.empty_like(temperature) if argmax_recovery else None  # [max_num_reqs]

    sampled = draft_sampled.new_empty(num_reqs, num_speculative_steps + 1, dtype=torch.int64)
    num_sampled = sampled.new_empty(num_reqs, dtype=torch.int32)
    num_relaxed = sampled.new_empty(num_reqs, dtype=torch.int32)
    relaxed_surprisal = target_logits.new_empty(num_reqs, dtype=torch.float32)
    target_rejected_lse = target_logits.new_empty(num_reqs, dtype=torch.float32)
    draft_rejected_lse = target_logits.new_empty(num_reqs, dtype=torch.float32)
    one_hot_rows = None  # [num_reqs] bool: rows whose policy recovers from p without the draft (mixed batches)
    if slots is not None:
        tolerance, rate, slack, _, _, row_policy, one_hot = slots.tensors(temperature.device)  # [max_num_reqs] each
        budget = Budget(rate=rate, slack=slack)
        pooled_rows = slots.deal_pool(idx_mapping)
        one_hot_rows = one_hot[idx_mapping.long()] if mixed else None
        adasd_sums, adasd_counts = slots.adasd_sums, slots.adasd_counts  # [max_num_reqs, 2] each
    else:
        tolerance = torch.full_like(temperature, config.tolerance, dtype=torch.float32)  # [max_num_reqs]
        budget = Budget(rate=tolerance, slack=tolerance)  # never read without HAS_BUDGET
        row_policy = None
        adasd_sums = adasd_counts = None  # read by the adasd branch only
        if spec.learnt:  # adasd without slots (an offline caller's step): each request at its cold start, nothing kept
            adasd_sums = temperature.new_zeros(temperature.shape[0], 2, dtype=torch.float64)  # [max_num_reqs, 2]
            adasd_counts = temperature.new_zeros(temperature.shape[0], 2, dtype=torch.int64)  # [max_num_reqs, 2]
    entropy = _walk_inputs(kernel_inputs, settings, target_logits[:, :vocab_size])
    # Triton compiles a branch whose condition it cannot fold (a loop-carried state: every policy branch inside the
    # walk's loop), so every pointer a branch reads is a tensor: the unread ones are placeholders.
    entropy = entropy if entropy is not None else stats["target_local_max"]  # fly's, never read without it
    if adasd_sums is None:  # adasd's, never read without an adasd row
        adasd_sums = temperature.new_zeros(1, 2, dtype=torch.float64)
        adasd_counts = temperature.new_zeros(1, 2, dtype=torch.int64)
    split_stats_accept_kernel[(num_reqs,)](
        sampled_ptr=sampled,
        sampled_stride=sampled.stride(0),
        num_accepted_ptr=num_sampled,
        num_relaxed_ptr=num_relaxed,
        relaxed_surprisal_ptr=relaxed_surprisal,
        target_rejected_lse_ptr=target_rejected_lse,
        draft_rejected_lse_ptr=draft_rejected_lse,
        target_logits_ptr=target_logits,
        target_logits_stride=target_logits.stride(0),
        target_local_argmax_ptr=stats["target_local_argmax"],
        target_local_argmax_stride=stats["target_local_argmax"].stride(0),
        target_local_max_ptr=stats["target_local_max"],
        target_local_sumexp_ptr=stats["target_local_sumexp"],
        target_local_stride=stats["target_local_max"].stride(0),
        target_local_entropy_ptr=stats.get("target_local_entropy", extra_stats),  # the others: never read
        target_local_runner_up_ptr=stats.get("target_local_runner_up", extra_stats),
        target_local_extra_stride=extra_stats.stride(0),
        draft_sampled_ptr=draft_sampled,
        draft_logits_ptr=draft_logits,
        draft_logits_stride_0=draft_strides[0],
        draft_logits_stride_1=draft_strides[1],
        draft_logits_row_mapping_ptr=draft_logits_row_mapping,
        draft_local_max_ptr=stats["draft_local_max"],
        draft_local_sumexp_ptr=stats["draft_local_sumexp"],
        draft_local_stride=stats["draft_local_max"].stride(0),
        cu_num_logits_ptr=cu_num_logits,
        idx_mapping_ptr=idx_mapping,
        temp_ptr=temperature,
        seed_ptr=seed,
        pos_ptr=pos,
        fly_entropy_ptr=entropy,
        policy_ptr=row_policy,
        tolerance_ptr=tolerance,
        budget_ptr=budget.rate,
        budget_slack_ptr=budget.slack,
        adasd_sums_ptr=adasd_sums,
        adasd_counts_ptr=adasd_counts,
        insert_temp_ptr=insert_temp,
        min_ratio=config.min_ratio,
        fly_entropy_threshold=config.fly_entropy_threshold,
        fly_window=settings.get("fly_window_size", 0),
        threshold_single=config.accept_threshold_single,
        threshold_acc=config.accept_threshold_acc,
        relaxed_topk=config.relaxed_topk,
        relaxed_delta=config.relaxed_delta,
        typical_eps=config.typical_eps,
        typical_delta=config.typical_delta,
        mars_threshold=config.mars_threshold,
        frontier_window=settings.get("frontier_window", 0),
        frontier_scale=settings.get("frontier_scale", 1.0),
        vocab_size=vocab_size,
        vocab_num_blocks=num_blocks,
        PADDED_VOCAB_NUM_BLOCKS=triton.next_power_of_2(num_blocks),
        CANDIDATE_BLOCK_SIZE=CANDIDATE_BLOCK_SIZE,
        JS_BLOCK_SIZE=JS_BLOCK_SIZE,
        HAS_DRAFT_LOGITS=has_draft_logits,
        POLICY=policy_constexpr,
        UNIFORM=uniform,
        HAS_BUDGET=slots is not None and slots.has_budget,
        PER_ROW_POLICY=mixed,
        num_warps=1,
    )
    if slots is not None:
        slots.gather_pool(idx_mapping, pooled_rows)
    recoveries = {each.recovery == "one_hot_residual" for each in specs}
    if recoveries == {True}:  # the rejected draft leaves p; q is not read
        shared |= dict(draft_logits_ptr=None, HAS_DRAFT_LOGITS=False)
    if recoveries != {True, False} or not has_draft_logits:  # with one-hot drafts both residuals are the same
        one_hot_rows = None
    options = dict(use_fp64=use_fp64, skip_masked_vocab_blocks=skip_masked_vocab_blocks)

    outputs = dict(
        sampled=sampled,
        num_sampled=num_sampled,
        target_rejected_lse=target_rejected_lse,
        draft_rejected_lse=draft_rejected_lse,
    )
    _resample_and_insert(
        utils,
        shared,
        outputs,
        seed=seed,
        pos=pos,
        draft_sampled=draft_sampled,
        one_hot_rows=one_hot_rows,
        insert_temp=insert_temp,
        **options,
    )
    return Mrv2Result(sampled, num_sampled, num_relaxed, relaxed_surprisal)


def _launch_stats(
    utils: Any,  # vLLM's rejection_sampler_utils module
    shared: dict[str, Any],  # what every launch reads, by vLLM's parameter names
    stats: dict[str, torch.Tensor],  # vLLM's statistics: target/draft_local_{argmax,max,sumexp} [num_logits, blocks]
    kernel_inputs: set[str],  # the PolicySpec.kernel_inputs of the branches the walk runs this step
    num_logits: int,
) -> dict[str, torch.Tensor]:  # the extra statistics, by name: target_local_{entropy,runner_up} [num_logits, blocks]
    """The per-block statistics launch: vLLM's own, or where the walk's branches read more of each row (typical's
    entropy, MARS's runner-up logit: ``block_entropy``, ``block_runner_up``) ours
    (:func:`ears_vllm.kernels.split_stats.split_stats_kernel`), which writes what vLLM's writes, as vLLM computes it,
    and those beside it in the same pass. One launch either way."""
    with_entropy, with_runner_up = "block_entropy" in kernel_inputs, "block_runner_up" in kernel_inputs
    num_blocks = stats["target_local_max"].shape[1]
    values = (
        shared
        | {f"{name}_ptr": t for name, t in stats.items()}
        | {f"{name}_stride": t.stride(0) for name, t in stats.items()}
    )
    if not (with_entropy or with_runner_up):
        _launch(
            utils._compute_local_logits_stats_kernel,
            (num_logits, num_blocks),
            values | dict(BLOCK_SIZE=VOCAB_BLOCK_SIZE),
        )
        return {}
    from ears_vllm.kernels.split_stats import split_stats_kernel

    target_logits = shared["target_logits_ptr"]
    extra = {
        name: target_logits.new_empty(num_logits, num_blocks, dtype=torch.float32)
        for name, wanted in (("target_local_entropy", with_entropy), ("target_local_runner_up", with_runner_up))
        if wanted
    }
    placeholder = next(iter(extra.values()))  # the one not computed: never read
    split_stats_kernel[(num_logits, num_blocks)](
        target_local_argmax_ptr=stats["target_local_argmax"],
        target_local_argmax_stride=stats["target_local_argmax"].stride(0),
        target_local_max_ptr=stats["target_local_max"],
        target_local_max_stride=stats["target_local_max"].stride(0),
        target_local_sumexp_ptr=stats["target_local_sumexp"],
        target_local_sumexp_stride=stats["target_local_sumexp"].stride(0),
        target_local_entropy_ptr=extra.get("target_local_entropy", placeholder),
        target_local_runner_up_ptr=extra.get("target_local_runner_up", placeholder),
        target_local_extra_stride=placeholder.stride(0),
        draft_local_max_ptr=stats["draft_local_max"],
        draft_local_max_stride=stats["draft_local_max"].stride(0),
        draft_local_sumexp_ptr=stats["draft_local_sumexp"],
        draft_local_sumexp_stride=stats["draft_local_sumexp"].stride(0),
        target_logits_ptr=target_logits,
        target_logits_stride=shared["target_logits_stride"],
        draft_logits_ptr=shared["draft_logits_ptr"],
        draft_logits_stride_0=shared["draft_logits_stride_0"],
        draft_logits_stride_1=shared["draft_logits_stride_1"],
        draft_logits_row_mapping_ptr=shared["draft_logits_row_mapping_ptr"],
        expanded_idx_mapping_ptr=shared["expanded_idx_mapping_ptr"],
        expanded_local_pos_ptr=shared["expanded_local_pos_ptr"],
        temp_ptr=shared["temp_ptr"],
        vocab_size=shared["vocab_size"],
        num_logits=num_logits,
        BLOCK_SIZE=VOCAB_BLOCK_SIZE,
        HAS_DRAFT_LOGITS=shared["HAS_DRAFT_LOGITS"],
        WITH_ENTROPY=with_entropy,
        WITH_RUNNER_UP=with_runner_up,
    )
    return extra


def _walk_inputs(
    kernel_inputs: set[str],  # the PolicySpec.kernel_inputs of the step's policies
    settings: dict[str, Any],  # the policies' settings for this k (settings_for)
    target_logits: torch.Tensor,  # [num_logits, V] after temperature, cut to the draft's vocabulary
) -> torch.Tensor | None:  # fly entropy [num_logits] float32
    """What is computed per row beside the walk for its policy branches (``PolicySpec.kernel_inputs``): FLy's top-k
    entropy, as vLLM's MRV2 computes it (``compute_fly_entropy(..., from_logits=True)``); None where no branch reads
    it. (relaxed_topk's candidate test is made in the walk, ``split_stats_accept._relaxed_candidate``.)"""
    if "fly_entropy" not in kernel_inputs:
        return None
    values = target_logits.to(torch.float32)
    top_k = min(settings["fly_entropy_top_k"], target_logits.shape[1])
    return fly_entropy(torch.topk(values, top_k, dim=-1).values, values.logsumexp(dim=-1, keepdim=True))


def _resample_and_insert(
    utils: Any,  # vLLM's rejection_sampler_utils module
    shared: dict[str, Any],  # what every launch reads, by vLLM's parameter names
    outputs: dict[str, torch.Tensor],  # the walk's: sampled, num_sampled, target/draft_rejected_lse [num_reqs]
    *,
    seed: torch.Tensor,  # [max_num_reqs]
    pos: torch.Tensor,  # [num_logits]
    draft_sampled: torch.Tensor,  # [num_logits]
    one_hot_rows: torch.Tensor | None = None,  # [num_reqs] bool: rows resampled from p without the draft
    insert_temp: torch.Tensor | None = None,  # [max_num_reqs]: the temperature the insertion reads (the walk's)
    use_fp64: bool,
    skip_masked_vocab_blocks: bool,
) -> None:
    """MRV2's resampling and insertion launches after the walk: the recovered or bonus token of each request, written
    into ``sampled`` as vLLM writes it. With ``one_hot_rows`` (a batch that mixes a one-hot recovery with draft
    distributions) the resampling runs twice, with and without the draft logits, and each row takes its own. With
    ``insert_temp`` the insertion reads it instead of the requests' temperatures: 0 keeps the token the walk wrote at
    a sampled row's rejection (argmax recovery), as MRV2 keeps a greedy row's."""
    import triton

    options = dict(seed=seed, pos=pos, draft_sampled=draft_sampled, use_fp64=use_fp64)
    options |= dict(skip_masked_vocab_blocks=skip_masked_vocab_blocks)
    resampled_argmax, resampled_max = _resample(utils, shared, outputs, **options)
    if one_hot_rows is not None:
        no_draft = shared | dict(draft_logits_ptr=None, HAS_DRAFT_LOGITS=False)
        one_hot_argmax, one_hot_max = _resample(utils, no_draft, outputs, **options)
        resampled_argmax = torch.where(one_hot_rows[:, None], one_hot_argmax, resampled_argmax)
        resampled_max = torch.where(one_hot_rows[:, None], one_hot_max, resampled_max)
    sampled, num_sampled = outputs["sampled"], outputs["num_sampled"]
    num_reqs, resample_blocks = resampled_argmax.shape
    _launch(
        utils._insert_resampled_kernel,
        (num_reqs,),
        shared
        | dict(
            temp_ptr=shared["temp_ptr"] if insert_temp is None else insert_temp,
            sampled_ptr=sampled,
            sampled_stride=sampled.stride(0),
            num_sampled_ptr=num_sampled,
            resampled_local_argmax_ptr=resampled_argmax,
            resampled_local_argmax_stride=resampled_argmax.stride(0),
            resampled_local_max_ptr=resampled_max,
            resampled_local_max_stride=resampled_max.stride(0),
            resample_num_blocks=resample_blocks,
            PADDED_RESAMPLE_NUM_BLOCKS=triton.next_power_of_2(resample_blocks),
        ),
        num_warps=1,  # as vLLM 0.34 launches it: the kernel updates num_sampled in place; more warps race on it
    )


def _resample(
    utils: Any,  # vLLM's rejection_sampler_utils module
    shared: dict[str, Any],  # what every launch reads, by vLLM's parameter names
    outputs: dict[str, torch.Tensor],  # the walk's: sampled, num_sampled, target/draft_rejected_lse [num_reqs]
    *,
    seed: torch.Tensor,  # [max_num_reqs]
    pos: torch.Tensor,  # [num_logits]
    draft_sampled: torch.Tensor,  # [num_logits]
    use_fp64: bool,
    skip_masked_vocab_blocks: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # (argmax [num_reqs, blocks] int64, max [num_reqs, blocks]) per block
    """MRV2's resampling launch: each request's per-block winners of its recovered or bonus token."""
    import triton

    num_sampled = outputs["num_sampled"]
    target_rejected_lse, draft_rejected_lse = outputs["target_rejected_lse"], outputs["draft_rejected_lse"]
    num_reqs, vocab_size = num_sampled.shape[0], shared["vocab_size"]
    target_logits = shared["target_logits_ptr"]
    resample_blocks = triton.cdiv(vocab_size, RESAMPLE_BLOCK_SIZE)
    resampled_argmax = target_logits.new_empty(num_reqs, resample_blocks, dtype=torch.int64)
    resampled_max = target_logits.new_empty(
        num_reqs, resample_blocks, dtype=torch.float64 if use_fp64 else torch.float32
    )
    _launch(
        utils._resample_kernel,
        (num_reqs, resample_blocks),
        shared
        | dict(
            resampled_local_argmax_ptr=resampled_argmax,
            resampled_local_argmax_stride=resampled_argmax.stride(0),
            resampled_local_max_ptr=resampled_max,
            resampled_local_max_stride=resampled_max.stride(0),
            target_rejected_logsumexp_ptr=target_rejected_lse,
            draft_rejected_logsumexp_ptr=draft_rejected_lse,
            rejected_step_ptr=num_sampled,
            draft_sampled_ptr=draft_sampled,
            seed_ptr=seed,
            pos_ptr=pos,
            cumulative_log_p_ptr=None,
            contexts_ptr=None,
            contexts_stride=0,
            watermarking_ptr=None,
            watermarking_skip_mask_ptr=None,
            watermark_key_0=0,
            watermark_key_1=0,
            BLOCK_SIZE=RESAMPLE_BLOCK_SIZE,
            USE_FP64=use_fp64,
            USE_BLOCK_VERIFICATION=False,
            CONTEXT_WIDTH=1,
            WATERMARK=False,
            DEDUPLICATE_CONTEXTS=False,
            SKIP_MASKED_BLOCKS=skip_masked_vocab_blocks,
        ),
    )
    return resampled_argmax, resampled_max


def verify_races_mrv2(
    target_logits: torch.Tensor,  # [num_logits, V], after temperature
    draft_sampled: torch.Tensor,  # [num_logits]: the draft row i verifies is draft_sampled[i + 1]
    cu_num_logits: torch.Tensor,  # [num_reqs + 1]
    pos: torch.Tensor,  # [num_logits]
    expanded_idx_mapping: torch.Tensor,  # [num_logits]
    temperature: torch.Tensor,  # [max_num_reqs]
    seed: torch.Tensor,  # [max_num_reqs]
    num_speculative_steps: int,
) -> Mrv2Result:
    """ERSD on MRV2, on MRV2's own keys (each row's request seed and ``pos``, as its sampler draws): every row's
    race winner (argmax on greedy rows), accepted while the draft equals it; the request emits the winners up to
    and including its first mismatch or its bonus row. So every emitted token is MRV2's non-speculative draw at
    that position. No host synchronisation."""
    num_reqs, num_logits = cu_num_logits.shape[0] - 1, target_logits.shape[0]
    device = target_logits.device
    rows = cu_num_logits.diff().long()  # drafts + 1 per request
    req_of_row, local = request_rows(rows, num_logits)  # [num_logits] each
    slot = expanded_idx_mapping.long()
    chosen = vllm_races.winners(target_logits, seed[slot].long(), pos.long())
    chosen = torch.where(temperature[slot] == 0, target_logits.argmax(dim=-1), chosen)
    drafts = torch.cat([draft_sampled[1:], draft_sampled.new_full((1,), -1)]).long()
    stops = (drafts != chosen) | (local == rows[req_of_row] - 1)  # a mismatch, or the bonus row
    first_stop = torch.full((num_reqs,), num_speculative_steps, dtype=torch.long, device=device)
    first_stop.scatter_reduce_(0, req_of_row[stops], local[stops], reduce="amin")
    sampled = torch.full((num_reqs, num_speculative_steps + 1), -1, dtype=torch.int64, device=device)
    kept = local <= first_stop[req_of_row]
    sampled[req_of_row[kept], local[kept]] = chosen[kept]
    num_sampled = (first_stop + 1).to(torch.int32)
    no_relaxed = torch.zeros_like(num_sampled)  # a race's acceptances are exact
    return Mrv2Result(sampled, num_sampled, no_relaxed, no_relaxed.float())


def _record(
    result: Mrv2Result,
    cu_num_logits: torch.Tensor,  # [num_reqs + 1]
    idx_mapping: torch.Tensor,  # [num_reqs]
    temperature: torch.Tensor,  # [max_num_reqs]
    has_draft_dist: bool,
    policy: str,
    slots: SlotControls | None = None,
) -> None:
    """Add this step's counts on the device (and to each request's slot); move them into the stats at the report
    interval."""
    drafts = cu_num_logits.diff() - 1  # each request's rows are its drafts and its bonus row
    is_random = temperature[idx_mapping.long()] != 0
    per_request = StepCounts.of_requests(
        drafts, result.num_sampled - 1, result.num_relaxed, is_random, result.relaxed_surprisal
    ).stacked()  # [len(StepCounts._fields), num_reqs]
    if slots is not None:
        slots.add_counts(idx_mapping, per_request)
    fields, device = per_request.shape[0], per_request.device
    if state.device_counts is None or state.device_counts.device != device:
        state.device_counts = torch.zeros(max(POLICY_OF_KERNEL_ID) + 1, fields, dtype=torch.int64, device=device)
    if slots is not None and slots.mixed:  # each request's counts under its own policy
        state.device_counts.index_add_(0, slots.tensors(device)[5][idx_mapping.long()].long(), per_request.T)
    else:
        state.device_counts[get_policy(policy).kernel_id].add_(per_request.sum(dim=1))  # in place: no copy back
    state.pending_steps += 1
    state.pending_draft_dist_steps += has_draft_dist
    state.pending_policy = policy
    now = time.monotonic()
    if now - state.last_read >= state.stats.log_interval_s:
        state.last_read = now
        flush_counts()
        state.stats.report(logger)


def flush_counts() -> None:
    """Move the counts summed on the device into the stats, and the finished requests' into the per-request history
    (a host synchronisation each)."""
    if state.slots is not None:
        state.slots.read_finished(state.requests)
    if state.device_counts is None or not state.pending_steps:
        return
    by_policy = {i: row for i, row in enumerate(state.device_counts.tolist()) if i in POLICY_OF_KERNEL_ID}
    first = get_policy(state.pending_policy).kernel_id  # the server's: the steps are counted with it
    for n, kernel_id in enumerate([first] + [i for i, row in by_policy.items() if i != first and any(row)]):
        state.stats.record(
            StepCounts.of_stacked(by_policy[kernel_id]),
            steps=state.pending_steps if n == 0 else 0,
            draft_dist_steps=state.pending_draft_dist_steps if n == 0 else 0,
            policy=POLICY_OF_KERNEL_ID[kernel_id],
        )
    state.device_counts.zero_()
    state.pending_steps = state.pending_draft_dist_steps = 0
