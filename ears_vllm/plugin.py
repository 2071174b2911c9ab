"""vLLM general-plugin entry point (``vllm.general_plugins``: ``ears = ears_vllm.plugin:register``).

vLLM calls :func:`register` in every process (API server, engine core, workers, Ray workers), before
it builds the config or the model runner. Registration:

* makes ``VllmConfig`` validate ``additional_config["ears"]`` (or the ``EARS_VLLM_*`` environment) as
  it is built, so a bad setting stops ``vllm serve`` at startup, before any model is loaded;
* checks the hooks of each runner the installed vLLM has (0.34 has Model Runner V2 only) and wraps its
  ``RejectionSampler`` (see the adapters and :mod:`ears_vllm.seam.patches`). Where a hook moved, only the
  constructor is wrapped, so that a sampler built with a non-standard policy stops the server with the reason
  (or, with ``on_unsupported: fallback``, warns and runs vLLM's own rule): the plugin is never silently inert.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ears_vllm._log import get_logger
from ears_vllm.control import metrics
from ears_vllm.seam import patches

_registered = False
hook_report: dict[str, str] = {}  # runner -> "patched", "hooks moved: ...", "absent: ..." or "not guarded (...)"


def register() -> None:
    """Idempotent and cheap; never raises into vLLM."""
    global _registered
    if _registered:
        return
    _registered = True
    logger = get_logger()
    try:
        import vllm

        version = getattr(vllm, "__version__", "unknown")
        _validate_config_on_creation()
        metrics.install_worker_method()
    except Exception as exc:
        logger.warning("ears-vllm: not active, cannot hook into vLLM: %s: %s", type(exc).__name__, exc)
        return

    from ears_vllm.seam import vllm_mrv2, vllm_v1
    from ears_vllm.seam.hooks import runner_absence

    for runner, adapter in (("V1", vllm_v1), ("MRV2", vllm_mrv2)):
        absence = runner_absence(runner)
        if absence is not None:  # vLLM cannot build this runner's sampler: nothing to guard
            hook_report[runner] = f"absent: {absence}"
            continue
        try:
            problem = adapter.check_hooks()
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}"
        try:
            # Guards the sampler even when the hooks moved: its plan then refuses a non-standard policy.
            adapter.install(problem)
        except Exception as exc:
            hook_report[runner] = f"not guarded ({type(exc).__name__}: {exc})"
            logger.warning("ears-vllm: vLLM %s: cannot wrap the %s rejection sampler (%s: %s); if vLLM verifies "
                           "there, it runs its own rule", version, runner, type(exc).__name__, exc)  # fmt: skip
            continue
        hook_report[runner] = "patched" if problem is None else f"hooks moved: {problem}"
        if problem is not None:
            # Said again, as an error or a warning, when a sampler of this runner is built with a non-standard
            # policy (ears_vllm.seam.verification); MRV2 is expected to be absent from CPU builds.
            logger.debug("ears-vllm: vLLM %s: %s hooks moved: %s", version, runner, problem)


def _validate_config_on_creation() -> None:
    from vllm.config import VllmConfig

    from ears_vllm.seam import vllm_requests

    def wrap(original_post_init: Callable[..., None]) -> Callable[..., None]:
        def __post_init__(self: Any, *args: Any, **kwargs: Any) -> None:
            original_post_init(self, *args, **kwargs)
            vllm_requests.note_server(self)  # raises ValueError naming a bad key

        return __post_init__

    patches.apply(VllmConfig, "__post_init__", wrap, "a bad ears config stops vLLM while it builds its config")
    vllm_requests.install_request_check()
