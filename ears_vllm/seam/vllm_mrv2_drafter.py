"""AdaSD's draft-length half on vLLM's Model Runner V2: a request's drafts past its learnt draft-entropy threshold are
not proposed, decided and learnt on the device (docs/adasd.md, "Draft length"; the kernels:
:mod:`ears_vllm.kernels.draft_length`).

How MRV2 drafts (0.33: ``spec_decode/standalone_ar/speculator.py``, ``StandaloneARSpeculator`` with its
``_prefill`` and ``_multi_step_decode`` loop; 0.34: ``spec_decode/autoregressive/speculator.py``,
``AutoRegressiveSpeculator._multi_step_decode`` / ``_fused_multi_step_decode``, whose steps may be replayed from a
CUDA graph): each of the k draft steps calls ``DraftModelSpeculator.sample_draft`` with the step in the device scalar
``current_draft_step``; ``sample_draft`` computes the drafter's logits (``compute_draft_logits``) and samples or takes
the argmax. The runner stores the ``[batch, k]`` drafts per slot (``RequestState.draft_tokens``); the scheduler has
already been told k placeholders per request (``DraftTokensHandler.get_draft_tokens`` sends ``-1``s unless a
grammar needs the ids), so the next step's target forward always computes k draft positions per request: MRV2 has no
way to schedule fewer without the host knowing each request's count (a device-to-host read per step, which MRV2 is
built to avoid). What MRV2 does have: a draft whose id reaches the verifier as ``-1`` is rejected unverified, and the
token at its position is drawn from the target's distribution ``p`` itself (``_resample_kernel``: "-1 placeholder
token ... directly use the target logits"), exactly as if the draft had never been proposed; vLLM marks drafts so
itself (``gather_draft_sampled``: drafts of a request still in its prefill; 0.33's ``invalid_drafts``: drafts past a
grammar's limit).

So, for the autoregressive drafters (``DRAFTERS``), four patches (``patches.MANIFEST``, group ``adasd.mrv2``):

- ``DraftModelSpeculator.sample_draft`` (with ``compute_draft_logits``, which hands it the logits it computed): after
  each draft step, :func:`~ears_vllm.kernels.draft_length.draft_entropy_stop_kernel` computes each row's ``H(q)`` at
  its temperature and stops a learning row whose draft j >= 1 is above its slot's ``tau_len``: the slot's
  ``num_proposed`` becomes j.
- ``rejection_sampler.gather_draft_sampled``: the verifier's draft ids of each request past its ``num_proposed`` become
  ``-1``, so the verifier (vLLM's or ears-vllm's walk) treats them as not proposed: the request's accepted length is
  at most what it proposed, and its next token comes from ``p``.
- ``DraftModelSpeculator.observe_verification`` (called by the runner after each verification, before the next
  drafting): :func:`~ears_vllm.kernels.draft_length.learn_draft_length_kernel` records the entropies of the verified
  proposed drafts (each accepted one and the first rejected one) in the slot's threshold.
- ``RequestState.add_request``: a request that takes a slot starts with no threshold.

What this does not do, and why: the target still computes the k positions the scheduler scheduled (the not-proposed
drafts cost target compute, not drafter compute saved), and the drafter still runs all k forward passes: ending the
loop when every row has stopped needs the host to read that, one synchronisation per draft step (and a replayed
CUDA graph cannot end early). What it achieves: the verifier sees fewer than k proposed drafts where the drafter is
uncertain, with no host synchronisation; vLLM's own counters count the not-proposed drafts as rejected.

Rows that learn: sampled ones (temperature > 0), as on V1. Installed by the MRV2 adapter when the server's policy
``cuts_drafts`` (:func:`install`); the state is made at the drafter's first eager draft step (vLLM's profiling run,
before any CUDA graph is captured).
"""

from __future__ import annotations

import contextvars
import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import torch

from ears_vllm._log import get_logger
from ears_vllm.config import EarsConfig
from ears_vllm.policies import get_policy
from ears_vllm.seam import patches
from ears_vllm.seam.hooks import bound, find_class

SPECULATOR_MODULE = "vllm.v1.worker.gpu.spec_decode.speculator"
SAMPLER_MODULE = "vllm.v1.worker.gpu.spec_decode.rejection_sampler"
STATES_MODULE = "vllm.v1.worker.gpu.states"
# The autoregressive drafters (one row per request per draft step, the step in ``current_draft_step``), by release:
# 0.34's base of the standalone, EAGLE and MTP drafters; 0.33's standalone draft model.
DRAFTERS = (
    ("vllm.v1.worker.gpu.spec_decode.autoregressive.speculator", "AutoRegressiveSpeculator"),
    ("vllm.v1.worker.gpu.spec_decode.standalone_ar.speculator", "StandaloneARSpeculator"),
)
HOOKS = (
    (SPECULATOR_MODULE, "DraftModelSpeculator", "sample_draft"),
    (SPECULATOR_MODULE, "DraftModelSpeculator", "compute_draft_logits"),
    (SPECULATOR_MODULE, "DraftModelSpeculator", "observe_verification"),
    (STATES_MODULE, "RequestState", "add_request"),
)
VOCAB_BLOCK_SIZE = 1024

logger = get_logger()


class DraftLength:
    """Each slot's draft-length state on the device (the layout: :mod:`ears_vllm.kernels.draft_length`)."""

    def __init__(self, slots: int, num_speculative_steps: int, device: torch.device) -> None:
        self.num_speculative_steps = num_speculative_steps
        self.num_proposed = torch.full((slots,), num_speculative_steps, dtype=torch.int32, device=device)
        self.learns = torch.zeros(slots, dtype=torch.int8, device=device)
        self.entropy = torch.zeros(slots, num_speculative_steps, dtype=torch.float32, device=device)
        self.accepted_sum = torch.zeros(slots, dtype=torch.float64, device=device)
        self.accepted_count = torch.zeros(slots, dtype=torch.int64, device=device)
        self.rejected_sum = torch.zeros(slots, dtype=torch.float64, device=device)
        self.rejected_count = torch.zeros(slots, dtype=torch.int64, device=device)
        self._new: list[int] = []  # slots a request took since the last verification

    def _threshold_pointers(self) -> dict[str, torch.Tensor]:
        return dict(
            accepted_sum_ptr=self.accepted_sum,
            accepted_count_ptr=self.accepted_count,
            rejected_sum_ptr=self.rejected_sum,
            rejected_count_ptr=self.rejected_count,
        )

    def add_request(self, slot: int) -> None:
        """A request took ``slot``: it starts with no threshold (applied before the next verification's learning)."""
        self._new.append(slot)

    def _start_new_requests(self) -> None:
        if self._new:
            new = torch.tensor(self._new, device=self.num_proposed.device)
            self.num_proposed.index_fill_(0, new, self.num_speculative_steps)
            for tensor in (self.learns, self.accepted_sum, self.accepted_count, self.rejected_sum, self.rejected_count):
                tensor.index_fill_(0, new, 0)
            self._new = []

    def stop_past_threshold(
        self,
        logits: torch.Tensor,  # [num_rows, V] the drafter's logits at this draft step, before temperature
        idx_mapping: torch.Tensor,  # [num_rows] each row's slot (-1: padding)
        temperature: torch.Tensor,  # [slots]
        draft_step: torch.Tensor,  # [] int64: the drafter's step counter
    ) -> None:
        """After a draft step: each row's draft entropy, and the stop (one launch)."""
        from ears_vllm.kernels.draft_length import draft_entropy_stop_kernel

        num_rows = idx_mapping.shape[0]
        if num_rows == 0:
            return
        if logits.stride(-1) != 1:  # the kernel walks a row's vocabulary contiguously
            logits = logits.contiguous()
        draft_entropy_stop_kernel[(num_rows,)](
            logits_ptr=logits,
            logits_stride=logits.stride(0),
            idx_mapping_ptr=idx_mapping,
            temp_ptr=temperature,
            draft_step_ptr=draft_step,
            entropy_ptr=self.entropy,
            entropy_stride=self.entropy.stride(0),
            num_proposed_ptr=self.num_proposed,
            learns_ptr=self.learns,
            **self._threshold_pointers(),
            vocab_size=logits.shape[-1],
            num_speculative_steps=self.num_speculative_steps,
            BLOCK_SIZE=VOCAB_BLOCK_SIZE,
        )

    def learn(
        self,
        idx_mapping: torch.Tensor,  # [num_reqs] the verified requests' slots
        num_sampled: torch.Tensor,  # [num_reqs] accepted drafts + 1 (0: a chunked prefill)
        num_rejected: torch.Tensor,  # [num_reqs] scheduled drafts - accepted drafts
    ) -> None:
        """After a verification: the verified proposed drafts' entropies into their slots' thresholds (one launch)."""
        import triton

        from ears_vllm.kernels.draft_length import learn_draft_length_kernel

        self._start_new_requests()
        num_reqs = idx_mapping.shape[0]
        if num_reqs == 0:
            return
        learn_draft_length_kernel[(num_reqs,)](
            idx_mapping_ptr=idx_mapping,
            num_sampled_ptr=num_sampled,
            num_rejected_ptr=num_rejected,
            entropy_ptr=self.entropy,
            entropy_stride=self.entropy.stride(0),
            num_proposed_ptr=self.num_proposed,
            learns_ptr=self.learns,
            **self._threshold_pointers(),
            PADDED_STEPS=triton.next_power_of_2(self.num_speculative_steps),
        )

    def withhold_unproposed(
        self,
        draft_sampled: torch.Tensor,  # [num_logits] each logits row's input token (the draft it verifies is the next)
        expanded_idx_mapping: torch.Tensor,  # [num_logits] each row's slot
        expanded_local_pos: torch.Tensor,  # [num_logits] the row's place in its request (draft i sits at i + 1)
    ) -> None:
        """The drafts a request did not propose become ``-1`` in place: the verifier rejects them unverified and
        draws the token at the first one from ``p``."""
        slots = expanded_idx_mapping.long()
        proposed = self.num_proposed[slots.clamp_min(0)]
        draft_sampled.masked_fill_((slots >= 0) & (expanded_local_pos > proposed), -1)

    def tau_len(self) -> torch.Tensor:  # [slots] float64, inf where a slot has no threshold
        """Each slot's ``tau_len`` (``AdasdState.tau_len``), for reports and tests: a host read when listed."""
        accepted = self.accepted_sum / self.accepted_count.clamp_min(1)
        rejected = self.rejected_sum / self.rejected_count.clamp_min(1)
        exists = (self.accepted_count > 0) & (self.rejected_count > 0) & (accepted < rejected)
        return torch.where(exists, (accepted + rejected) / 2, torch.inf)


@dataclasses.dataclass
class _State:
    """What this worker's drafter runs with (one engine per worker process)."""

    length: DraftLength | None = None  # made at the drafter's first eager draft step
    drafters: tuple[type, ...] = ()  # the release's autoregressive drafter classes (DRAFTERS)


state = _State()


@dataclasses.dataclass
class _DraftLogits:
    logits: torch.Tensor | None = None  # [num_rows, V] what compute_draft_logits returned inside sample_draft


_draft_logits: contextvars.ContextVar[_DraftLogits | None] = contextvars.ContextVar(
    "ears_vllm_mrv2_draft_logits", default=None
)


def install(config: EarsConfig, vllm_config: Any = None) -> str:
    """Patch MRV2's drafter and verifier input for AdaSD's draft length when the server's policy cuts drafts; the
    startup line's ``draft_length=`` value. Called by the MRV2 adapter for a sampler that ears-vllm verifies."""
    if not get_policy(config.policy).cuts_drafts:
        return "untouched"
    problem = None
    for module, name, method in HOOKS:
        _, problem = find_class(module, name, method)
        if problem is not None:
            break
    if problem is None and not hasattr(importlib.import_module(SAMPLER_MODULE), "gather_draft_sampled"):
        problem = f"{SAMPLER_MODULE} has no gather_draft_sampled"
    drafters = tuple(cls for module, name in DRAFTERS if (cls := find_class(module, name, "sample_draft")[0]))
    if problem is None and not drafters:
        problem = f"none of {[name for _, name in DRAFTERS]} is in this vLLM"
    if problem is not None:
        logger.warning(
            "ears-vllm: AdaSD's draft-length half is off on this worker (acceptance still adapts): %s", problem
        )
        return f"off ({problem})"
    state.drafters = drafters
    patches.install("adasd.mrv2")
    return f"on (adasd; {', '.join(cls.__name__ for cls in drafters)}: drafts past the stop withheld from the verifier)"


def wrap_sample_draft(original: Callable[..., Any]) -> Callable[..., Any]:
    """``DraftModelSpeculator.sample_draft``, then the entropy stop for the step's rows (autoregressive drafters)."""

    def sample_draft(
        self: Any,
        hidden_states: torch.Tensor,  # [num_rows, hidden]
        sample_src_positions: torch.Tensor,  # [num_rows]
        idx_mapping: torch.Tensor,  # [num_rows] slots
        temperature: torch.Tensor,  # [slots]
        seeds: torch.Tensor,  # [slots]
        draft_step: torch.Tensor,  # [] int64
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        call = (hidden_states, sample_src_positions, idx_mapping, temperature, seeds, draft_step, *args)
        if not isinstance(self, state.drafters):
            return original(self, *call, **kwargs)
        if state.length is None:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                logger.warning("ears-vllm: AdaSD's draft length found no state before graph capture; it is off")
                state.drafters = ()
                return original(self, *call, **kwargs)
            state.length = DraftLength(self.max_num_reqs, self.num_speculative_steps, idx_mapping.device)
        holder = _DraftLogits()
        with bound(_draft_logits, holder):
            sampled = original(self, *call, **kwargs)
        logits = holder.logits
        if logits is None:  # local argmax reduction: one more logits computation, as V1's greedy variants pay
            spec_step_idx = kwargs.get("spec_step_idx", args[1] if len(args) > 1 else 0)
            logits = self.compute_draft_logits(hidden_states, spec_step_idx)
        state.length.stop_past_threshold(logits, idx_mapping, temperature, draft_step)
        return sampled

    return sample_draft


def wrap_compute_draft_logits(original: Callable[..., Any]) -> Callable[..., Any]:
    """``DraftModelSpeculator.compute_draft_logits``, its result kept for the ``sample_draft`` that asked."""

    def compute_draft_logits(self: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        logits = original(self, *args, **kwargs)
        holder = _draft_logits.get()
        if holder is not None:
            holder.logits = logits
        return logits

    return compute_draft_logits


def wrap_observe_verification(original: Callable[..., Any]) -> Callable[..., Any]:
    """``DraftModelSpeculator.observe_verification`` (the verdict on the last drafts), then the draft-length
    thresholds learn from it."""

    def observe_verification(
        self: Any,
        idx_mapping: torch.Tensor,  # [num_reqs]
        num_sampled: torch.Tensor,  # [num_reqs]
        num_rejected: torch.Tensor,  # [num_reqs]
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        result = original(self, idx_mapping, num_sampled, num_rejected, *args, **kwargs)
        if state.length is not None and isinstance(self, state.drafters):
            state.length.learn(idx_mapping, num_sampled, num_rejected)
        return result

    return observe_verification


def wrap_gather_draft_sampled(original: Callable[..., Any]) -> Callable[..., Any]:
    """MRV2's ``gather_draft_sampled`` (each logits row's input token), with the drafts not proposed as ``-1``."""

    def gather_draft_sampled(
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        logits_indices: torch.Tensor,  # [num_logits]
        expanded_idx_mapping: torch.Tensor,  # [num_logits]
        expanded_local_pos: torch.Tensor,  # [num_logits]
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        draft_sampled, pos = original(
            input_ids, positions, logits_indices, expanded_idx_mapping, expanded_local_pos, *args, **kwargs
        )
        if state.length is not None:
            state.length.withhold_unproposed(draft_sampled, expanded_idx_mapping, expanded_local_pos)
        return draft_sampled, pos

    return gather_draft_sampled


def wrap_add_request(original: Callable[..., Any]) -> Callable[..., Any]:
    """MRV2's ``RequestState.add_request``, then the slot's draft-length state started afresh."""

    def add_request(self: Any, req_id: str, *args: Any, **kwargs: Any) -> Any:
        result = original(self, req_id, *args, **kwargs)
        slot = self.req_id_to_index.get(req_id)
        if state.length is not None and slot is not None:
            state.length.add_request(slot)
        return result

    return add_request
