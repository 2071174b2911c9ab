"""Per-request settings through vLLM: checked where vLLM builds a request, applied where V1 verifies it.

Patched (see :mod:`ears_vllm.seam.patches`):

* ``SamplingParams._verify_extra_args`` (every process; vLLM calls it while it builds a request's sampling
  params, so in the API server a bad value becomes HTTP 400 before the request is scheduled): the ears keys
  of :mod:`ears_vllm.control.requests`, checked against the server's config and its operator limits.
* V1's ``GPUModelRunner._sample`` (the CPU runner inherits it; installed by the V1 adapter for a sampler that
  ears-vllm verifies): the rows of the batch it verifies are the input batch's requests in order, so it
  hands the verifier each row's :class:`RequestControl` (the request's config and budget ledger, kept on
  vLLM's per-request state, so they live and die with the request). vLLM V1 refuses custom logits processors
  with speculative decoding, which is why this hook and not that one.

On Model Runner V2 the same controls fill each request's slot (:class:`ears_vllm.seam.vllm_mrv2.SlotControls`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable
from typing import Any

from ears_vllm._log import get_logger
from ears_vllm.config import EarsConfig, resolve_config
from ears_vllm.control.budget import BudgetLedger
from ears_vllm.control.requests import (
    RequestControl,
    RequestSettings,
    check_limits,
    request_config,
    request_settings,
)
from ears_vllm.policies import budget_refusal, get_policy, request_policy_refusal
from ears_vllm.policies.adasd import AdasdState
from ears_vllm.seam import patches, vllm_races
from ears_vllm.seam.hooks import bound, find_class, serving_runner

logger = get_logger()
RUNNER_MODULE = "vllm.v1.worker.gpu_model_runner"
_ATTRIBUTE = "_ears_control"  # on vLLM's CachedRequestState

# The server's config and runner as this process's vLLM config says (set while vLLM builds it), for the check.
server_config: EarsConfig | None = None
server_runner: str = "V1"
_RUNNER_NAMES = {"V1": "V1 runner", "MRV2": "Model Runner V2"}


@dataclasses.dataclass(frozen=True)
class BatchRequests:
    """The requests of the batch being verified, one per row: vLLM's request ids, and their controls (None when
    every row follows the server's config)."""

    req_ids: list[str]
    controls: list[RequestControl] | None


_batch: contextvars.ContextVar[BatchRequests | None] = contextvars.ContextVar("ears_vllm_batch", default=None)


def batch_requests() -> BatchRequests | None:
    return _batch.get()


def verifying_batch(batch: BatchRequests | None) -> contextlib.AbstractContextManager[None]:
    return bound(_batch, batch)


def install_request_check() -> None:
    """Check the ears keys of every request's ``extra_args`` where vLLM checks its own (idempotent)."""
    patches.install("requests")


def wrap_verify_extra_args(original: Callable[[Any], None]) -> Callable[[Any], None]:
    """``SamplingParams._verify_extra_args``, then the ears keys checked (:data:`ears_vllm.seam.patches.MANIFEST`)."""

    def _verify_extra_args(self: Any) -> None:
        original(self)
        check_request(self.extra_args)

    return _verify_extra_args


def wrap_post_init(original_post_init: Callable[..., None]) -> Callable[..., None]:
    """``VllmConfig.__post_init__``, then the ears config checked and kept (:func:`note_server`)."""

    def __post_init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_post_init(self, *args, **kwargs)
        note_server(self)  # raises ValueError naming a bad key

    return __post_init__


def check_request(extra_args: Any) -> None:
    """Raise vLLM's validation error (HTTP 400 in the API server) for bad ears keys; silent without them."""
    try:
        asked = request_settings(extra_args)
        if not asked.empty and server_config is not None:
            config = request_config(server_config, asked)
            refusal = request_policy_refusal(server_config.policy, config.policy, server_runner)
            if refusal is not None:
                runner = _RUNNER_NAMES[server_runner]
                raise ValueError(
                    f"vllm_xargs key 'ears_policy' = {asked.policy!r}: this server runs vLLM's {runner}: {refusal}"
                )
            if get_policy(config.policy).patches_drafter and server_config.policy != config.policy:
                raise ValueError(
                    f"vllm_xargs key 'ears_policy' = {config.policy!r}: its drafter is patched when the server "
                    f'starts; start it with {{"policy": "{config.policy}"}} to serve {config.policy} requests'
                )
            refusal = budget_refusal(config.policy, server_runner) if config.budget is not None else None
            if refusal is not None:
                raise ValueError(f"vllm_xargs key 'ears_budget': {refusal}")
            check_limits(server_config, asked, config)  # last: what the server cannot serve is said first
    except ValueError as exc:
        from vllm.exceptions import VLLMValidationError

        raise VLLMValidationError(str(exc), parameter="vllm_xargs") from None


def note_server(vllm_config: Any) -> None:
    """Keep what the per-request check needs from the vLLM config this process just built (raises ValueError
    naming the key for a bad ears config)."""
    global server_config, server_runner
    server_config = resolve_config(getattr(vllm_config, "additional_config", None))
    server_runner = serving_runner(vllm_config)


def control_of(request_state: Any, server: EarsConfig) -> RequestControl:
    """The request's control, made when first verified and kept on vLLM's state of the request."""
    control = getattr(request_state, _ATTRIBUTE, None)
    if control is None:
        control = new_control(server, request_state.sampling_params, f"request {request_state.req_id}")
        setattr(request_state, _ATTRIBUTE, control)
    return control


def new_control(server: EarsConfig, params: Any, who: str) -> RequestControl:
    """The control of a request with sampling ``params``: its config, and a fresh ledger when it has a budget.
    Greedy requests stay greedy whatever they ask (the server's config); settings the API server would have
    refused (an offline caller's) are logged and replaced by the server's."""
    sampled = params is not None and params.sampling_type != _greedy()
    config, asked = server, RequestSettings()
    if sampled:
        try:
            asked = request_settings(params.extra_args)
            config = request_config(server, asked)
        except ValueError as exc:
            logger.warning("ears-vllm: %s: %s; it is verified with the server's config", who, exc)
            config, asked = server, RequestSettings()
    adasd = AdasdState() if sampled and get_policy(config.policy).learnt else None
    race_seed = vllm_races.key_seed(params) if sampled and get_policy(config.policy).keyed else None
    ledger = None
    if sampled and config.budget:  # the server's budget: its pool, or the request's own ledger
        pooled = server.budget_scope == "server" and asked.budget is None
        ledger = server_pool(server.budget) if pooled else BudgetLedger(config.budget)
    return RequestControl(config, ledger, adasd, race_seed)


_pools: dict[float, BudgetLedger] = {}


def server_pool(budget: float) -> BudgetLedger:
    """This process's shared ledger for the server's budget (``budget_scope: "server"``)."""
    return _pools.setdefault(budget, BudgetLedger(budget, shared=True))


def _greedy() -> Any:
    from vllm.sampling_params import SamplingType

    return SamplingType.GREEDY


def per_request_status(problem: str | None, applied: str = "on") -> str:
    """The startup line's ``per_request=`` value for a worker whose per-request hook gave ``problem``; a problem
    is also a warning (never silently inert)."""
    if problem is None:
        return applied
    logger.warning("ears-vllm: per-request ears settings are not applied on this worker: %s", problem)
    return f"off ({problem})"


def install_runner_hook() -> str | None:
    """Wrap V1's ``GPUModelRunner._sample`` so the verifier sees each row's request; None, or why it cannot."""
    runner_cls, problem = find_class(RUNNER_MODULE, "GPUModelRunner", "_sample")
    if runner_cls is None:
        return problem
    patches.install("v1.runner")
    return None


def wrap_sample(original: Callable[..., Any]) -> Callable[..., Any]:
    """V1's ``GPUModelRunner._sample`` with each row's control bound (and, for a keyed policy, its race keys)."""

    def _sample(self: Any, logits: Any, spec_decode_metadata: Any, *args: Any, **kwargs: Any) -> Any:
        server = getattr(getattr(self, "rejection_sampler", None), "_ears_config", None)
        keyed = server is not None and get_policy(server.policy).keyed  # ERSD: every sampling is keyed
        if server is None or (spec_decode_metadata is None and not keyed):
            return original(self, logits, spec_decode_metadata, *args, **kwargs)
        batch, controls = _rows(self, server)
        with verifying_batch(batch):
            if not keyed:
                return original(self, logits, spec_decode_metadata, *args, **kwargs)
            drafts = [0] * len(controls) if spec_decode_metadata is None else spec_decode_metadata.num_draft_tokens
            keys, sample_pos = vllm_races.row_keys(self, [c.race_seed for c in controls], drafts)
            return vllm_races.sample_keyed(
                lambda: original(self, logits, spec_decode_metadata, *args, **kwargs), keys, sample_pos
            )

    return _sample


def _rows(runner: Any, server: EarsConfig) -> tuple[BatchRequests, list[RequestControl]]:
    """The rows of the batch (the input batch's requests, in order) and their controls; the batch carries no
    controls when every row follows the server's config (the common case)."""
    req_ids = list(runner.input_batch.req_ids)
    controls = [control_of(runner.requests[req_id], server) for req_id in req_ids]
    if all(c.config is server and c.ledger is None and c.adasd is None for c in controls):
        return BatchRequests(req_ids, None), controls
    return BatchRequests(req_ids, controls), controls
