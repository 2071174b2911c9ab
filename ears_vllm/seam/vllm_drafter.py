"""AdaSD's draft-length half on vLLM V1: a request stops drafting past its learnt draft-entropy threshold.

Installed only when the server's policy is ``adasd`` (with any other policy the proposer is untouched). Four
patches, each a thin wrapper:

- ``GPUModelRunner.propose_draft_token_ids`` (the CPU runner inherits it): the rows of the batch being drafted
  for, with each row's AdaSD state (None for rows that do not learn: greedy requests, other policies).
- ``SpecDecodeBaseProposer._sample_draft_tokens`` (called once per draft forward pass: the first pass, then once
  per loop step): the entropy of each row's draft distribution; a learning row whose draft j >= 1 has entropy
  above its threshold stops there (it proposes j drafts). When every row has stopped, the loop ends: the
  proposer's remaining forward passes are skipped.
- ``SpecDecodeBaseProposer.propose``: ends the loop cleanly (the drafts so far, padded to vLLM's ``[batch, k]``
  layout; the padding is never scheduled).
- ``GPUModelRunner.take_draft_token_ids``: each row's drafts cut to what it proposed, before the scheduler sees
  them, so the scheduler, the verifier and vLLM's counters all see the shorter drafts.

Decided here: a request always proposes its first draft (a stop decided before any draft would skip the cheapest
one); the entropy is of the drafter's distribution at the request's temperature (softmax of its logits, q itself
under probabilistic drafting); the drafts go to the scheduler through ``take_draft_token_ids`` only under
synchronous scheduling, so with asynchronous scheduling the length half is off (and the startup line says so).
"""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from ears_vllm import stats_registry
from ears_vllm._log import get_logger
from ears_vllm.config import EarsConfig
from ears_vllm.policies import get_policy
from ears_vllm.policies.adasd import AdasdState, draft_entropy
from ears_vllm.seam import patches
from ears_vllm.seam.hooks import bound, find_class

RUNNER_MODULE = "vllm.v1.worker.gpu_model_runner"
PROPOSER_MODULE = "vllm.v1.spec_decode.llm_base_proposer"

logger = get_logger()


class _AllStopped(Exception):
    """Every row of the batch has stopped drafting: the proposer's loop ends here."""


@dataclasses.dataclass
class Drafting:
    """One call of the proposer: the rows' AdaSD states and what each has proposed so far."""

    states: list[AdasdState | None]  # per row of the batch (input batch order)
    temperature: torch.Tensor | None  # [batch] the rows' temperatures (None: all greedy)
    proposed: list[int | None]  # per row: the drafts it proposed once it stopped (None: still drafting)
    draft_ids: list[torch.Tensor] = dataclasses.field(default_factory=list)  # [batch] per draft step
    draft_probs: list[torch.Tensor] = dataclasses.field(default_factory=list)  # [batch, V] per step, if any
    forward_passes: int = 0

    def proposed_counts(self, k: int) -> list[int]:
        return [k if n is None else n for n in self.proposed]


_drafting: contextvars.ContextVar[Drafting | None] = contextvars.ContextVar("ears_vllm_drafting", default=None)


def install(config: EarsConfig, vllm_config: Any) -> str:
    """Patch the proposer for AdaSD's draft length; the startup line's ``draft_length=`` value."""
    if not get_policy(config.policy).cuts_drafts:
        return "untouched"
    scheduler = getattr(vllm_config, "scheduler_config", None)
    if getattr(scheduler, "async_scheduling", False):
        return _off(
            "vLLM schedules asynchronously, so the drafts reach the scheduler before they could be cut; "
            "start vLLM with --no-async-scheduling for the draft-length half"
        )
    runner_cls, problem = find_class(RUNNER_MODULE, "GPUModelRunner", "take_draft_token_ids")
    proposer_cls, problem = (
        (None, problem)
        if runner_cls is None
        else find_class(PROPOSER_MODULE, "SpecDecodeBaseProposer", "_sample_draft_tokens")
    )
    for owner, method in ((runner_cls, "propose_draft_token_ids"), (proposer_cls, "propose")):
        if problem is None and not hasattr(owner, method):
            problem = f"{owner.__qualname__} has no {method}"
    if problem is not None:
        return _off(problem)
    patches.install("adasd")
    return "on (adasd)"


def _off(problem: str) -> str:
    logger.warning("ears-vllm: AdaSD's draft-length half is off on this worker (acceptance still adapts): %s", problem)
    return f"off ({problem})"


def wrap_propose_draft_token_ids(original: Callable[..., Any]) -> Callable[..., Any]:
    def propose_draft_token_ids(
        self: Any, scheduler_output: Any, sampled_token_ids: Any, sampling_metadata: Any, *args: Any, **kwargs: Any
    ) -> Any:
        from ears_vllm.seam.vllm_requests import control_of

        server = getattr(getattr(self, "rejection_sampler", None), "_ears_config", None)
        if server is None:
            return original(self, scheduler_output, sampled_token_ids, sampling_metadata, *args, **kwargs)
        req_ids = list(self.input_batch.req_ids)
        states = [control_of(self.requests[r], server).adasd for r in req_ids]
        if not any(states):
            self._ears_proposed = {}
            return original(self, scheduler_output, sampled_token_ids, sampling_metadata, *args, **kwargs)
        context = Drafting(
            states, None if sampling_metadata.all_greedy else sampling_metadata.temperature, [None] * len(states)
        )
        with bound(_drafting, context):
            out = original(self, scheduler_output, sampled_token_ids, sampling_metadata, *args, **kwargs)
        k = int(out.shape[1]) if isinstance(out, torch.Tensor) and out.ndim == 2 else None
        self._ears_proposed = {} if k is None else dict(zip(req_ids, context.proposed_counts(k), strict=True))
        if context.forward_passes:  # counted with the verifier's (this worker's stats)
            stats = stats_registry.stats_of("V1")
            stats.proposals += 1
            stats.draft_forward_passes += context.forward_passes
            stats.proposals_ended_early += int(k is not None and context.forward_passes < k)
        return out

    return propose_draft_token_ids


def wrap_take_draft_token_ids(original: Callable[..., Any]) -> Callable[..., Any]:
    def take_draft_token_ids(self: Any) -> Any:
        out = original(self)
        proposed = getattr(self, "_ears_proposed", None)
        if out is None or not proposed:
            return out
        cut = [ids[: proposed.get(r, len(ids))] for r, ids in zip(out.req_ids, out.draft_token_ids, strict=True)]
        return dataclasses.replace(out, draft_token_ids=cut)

    return take_draft_token_ids


def wrap_sample_draft_tokens(original: Callable[..., Any]) -> Callable[..., Any]:
    def _sample_draft_tokens(self: Any, hidden_states: torch.Tensor, sampling_metadata: Any) -> Any:
        context = _drafting.get()
        learning = (
            []
            if context is None
            else [i for i, s in enumerate(context.states) if s is not None and context.proposed[i] is None]
        )
        if not learning:
            return original(self, hidden_states, sampling_metadata)
        logits = None
        if _plain_greedy(self, sampling_metadata):  # vLLM's greedy draft, its logits kept for the entropy
            logits = self.model.compute_logits(hidden_states)
            draft_ids, draft_probs = logits.argmax(dim=-1), None
        else:
            draft_ids, draft_probs = original(self, hidden_states, sampling_metadata)
        context.forward_passes += 1
        step = len(context.draft_ids)
        context.draft_ids.append(draft_ids)
        if draft_probs is not None:
            context.draft_probs.append(draft_probs)
        entropy = _entropy(self, hidden_states, logits, draft_probs, context.temperature)
        for i, h in zip(learning, entropy[learning].tolist(), strict=True):
            state = context.states[i]
            if step >= 1 and h > state.tau_len:
                context.proposed[i] = step
            else:
                state.proposed_entropies.append(h)
        if all(n is not None for n in context.proposed):  # rows that do not learn never stop
            raise _AllStopped
        return draft_ids, draft_probs

    return _sample_draft_tokens


def _plain_greedy(proposer: Any, sampling_metadata: Any) -> bool:
    """The proposer drafts greedily from the full logits (vLLM's ``_greedy_sample`` without its variants)."""
    greedy = not getattr(proposer, "_enable_probabilistic_draft_probs", False) or sampling_metadata.all_greedy
    variants = getattr(proposer, "use_local_argmax_reduction", False) or getattr(
        proposer, "use_heterogeneous_vocab", False
    )
    return greedy and not variants


def _entropy(
    proposer: Any,
    hidden_states: torch.Tensor,  # [batch, hidden] the rows' last hidden states
    logits: torch.Tensor | None,  # [batch, V] the drafter's logits when already computed
    draft_probs: torch.Tensor | None,  # [batch, V] q under probabilistic drafting, else None
    temperature: torch.Tensor | None,  # [batch]
) -> torch.Tensor:  # [batch] nats
    """H(q) of each row's draft distribution: q itself when the drafter gave it, else the softmax of its logits at
    the row's temperature."""
    if draft_probs is not None:
        return -(torch.special.xlogy(draft_probs.float(), draft_probs.float())).sum(dim=-1)
    if logits is None:  # a greedy variant (local argmax, mapped vocabulary): one more logits computation
        logits = proposer.model.compute_logits(hidden_states)
    logits = logits[: hidden_states.shape[0]]
    if temperature is not None:
        logits = logits / temperature[: logits.shape[0]].clamp_min(1e-5).unsqueeze(-1).to(logits.dtype)
    return draft_entropy(logits)


def wrap_propose(original: Callable[..., Any]) -> Callable[..., Any]:
    def propose(self: Any, num_speculative_tokens: int, *args: Any, **kwargs: Any) -> Any:
        context = _drafting.get()
        if context is None:
            return original(self, num_speculative_tokens, *args, **kwargs)
        try:
            return original(self, num_speculative_tokens, *args, **kwargs)
        except _AllStopped:
            pass
        # Every row stopped: the drafts so far, padded to [batch, k] with the last (cut before scheduling).
        steps = context.draft_ids[:-1]  # the last step's drafts were past every row's stop
        padding = [steps[-1]] * (num_speculative_tokens - len(steps))
        if context.draft_probs:
            probs = context.draft_probs[: len(steps)]
            self._last_draft_probs = torch.stack(probs + [probs[-1]] * len(padding), dim=1).contiguous()
        return torch.stack(steps + padding, dim=1)

    return propose
