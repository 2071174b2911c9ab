"""vLLM general-plugin entry point (``vllm.general_plugins``: ``ears = ears_vllm.plugin:register``).

vLLM calls :func:`register` in every process (API server, engine core, workers, Ray workers), before
it builds the config or the model runner. Registration:

* makes ``VllmConfig`` validate ``additional_config["ears"]`` (or the ``EARS_VLLM_*`` environment) as
  it is built, so a bad setting stops ``vllm serve`` at startup, before any model is loaded. Where that hook
  cannot be installed, each runner's sampler is still guarded, as for a moved hook (below): the config is then
  not checked as vLLM builds it, so an ears config that asks for a non-standard policy stops the server when its
  sampler is built (or, with ``on_unsupported: fallback``, warns and runs vLLM's own rule);
* checks the hooks of each runner the installed vLLM has (0.34 has Model Runner V2 only) and wraps its
  ``RejectionSampler`` (see the adapters and :mod:`ears_vllm.seam.patches`). Where a hook moved, only the
  constructor is wrapped, so that a sampler built with a non-standard policy stops the server with the reason
  (or, with ``on_unsupported: fallback``, warns and runs vLLM's own rule): the plugin is never silently inert.
"""

from __future__ import annotations

from collections.abc import Callable

from ears_vllm._log import get_logger
from ears_vllm.seam import patches
from ears_vllm.seam.hooks import vllm_import_problem, vllm_version

_registered = False
hook_report: dict[str, str] = {}  # runner -> "patched", "hooks moved: ...", "absent: ..." or "not guarded (...)"
# Why VllmConfig.__post_init__ could not be wrapped in this process (None: it was, or register() has not run).
config_hook_problem: str | None = None


def register() -> None:
    """Idempotent and cheap; never raises into vLLM, and never leaves an ears config silently unserved: each step
    that fails is a warning, and a failed config hook guards the samplers as a moved hook does."""
    global _registered, config_hook_problem
    if _registered:
        return
    _registered = True
    logger = get_logger()
    problem = vllm_import_problem()
    if problem is not None:  # no vLLM in this process: nothing verifies here, nothing to guard
        logger.warning("ears-vllm: not active, vLLM does not import: %s", problem)
        return
    version = vllm_version()
    config_hook_problem = _failure(_validate_config_on_creation)
    _install_the_rest()
    # Without the config hook, every runner counts as moved for that reason: its sampler is guarded all the same,
    # and a non-standard policy refuses (or falls back with a warning) when the sampler is built.
    unchecked_config = None
    if config_hook_problem is not None:
        unchecked_config = (
            f"VllmConfig.__post_init__ could not be wrapped to check the ears config ({config_hook_problem})"
        )
        logger.warning(
            "ears-vllm: vLLM %s: %s; a non-standard ears policy stops the server when its sampler is built "
            '(with "on_unsupported": "fallback", vLLM\'s own rule runs, with a warning)',
            version,
            unchecked_config,
        )

    from ears_vllm.seam import vllm_mrv2, vllm_v1
    from ears_vllm.seam.hooks import runner_absence

    for runner, adapter in (("V1", vllm_v1), ("MRV2", vllm_mrv2)):
        absence = runner_absence(runner)
        if absence is not None:  # vLLM cannot build this runner's sampler: nothing to guard
            hook_report[runner] = f"absent: {absence}"
            continue
        problem = unchecked_config
        if problem is None:
            try:
                problem = adapter.check_hooks()
            except Exception as exc:
                problem = f"{type(exc).__name__}: {exc}"
        try:
            # Guards the sampler even when the hooks moved: its plan then refuses a non-standard policy.
            adapter.install(problem)
        except Exception as exc:
            hook_report[runner] = f"not guarded ({type(exc).__name__}: {exc})"
            logger.warning(
                "ears-vllm: vLLM %s: cannot wrap the %s rejection sampler (%s: %s); if vLLM verifies "
                "there, it runs its own rule",
                version,
                runner,
                type(exc).__name__,
                exc,
            )
            continue
        hook_report[runner] = "patched" if problem is None else f"hooks moved: {problem}"
        if problem is not None:
            # Said again, as an error or a warning, when a sampler of this runner is built with a non-standard
            # policy (ears_vllm.seam.verification); MRV2 is expected to be absent from CPU builds.
            logger.debug("ears-vllm: vLLM %s: %s hooks moved: %s", version, runner, problem)


def _failure(install: Callable[[], None]) -> str | None:
    """Run ``install``; None, or why it failed (never raised: vLLM calls register() without a guard)."""
    try:
        install()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _validate_config_on_creation() -> None:
    """Wrap ``VllmConfig.__post_init__`` (the manifest's ``config`` group), or raise why it cannot be."""
    patches.install("config")


def _install_the_rest() -> None:
    """What does not decide whether ears-vllm verifies, each a warning if it fails (none disables the rest): the
    per-request check (bad ``vllm_xargs`` answered 400) and the metrics' worker methods."""

    def install_request_check() -> None:
        from ears_vllm.seam import vllm_requests

        vllm_requests.install_request_check()

    for what, install in (
        ("per-request ears settings are not checked where vLLM builds a request", install_request_check),
        ("the ears_vllm_* counters are not served on /metrics", install_worker_methods),
    ):
        problem = _failure(install)
        if problem is not None:
            get_logger().warning("ears-vllm: %s (%s)", what, problem)


def install_worker_methods() -> None:
    """Give vLLM's workers the methods the ``ears_metrics`` endpoint plugin calls (:mod:`ears_vllm.control.metrics`;
    the manifest's ``metrics`` group; idempotent, every process, cheap)."""
    patches.install("metrics")
