"""The one decision "does ears-vllm verify on this runner, and if not, why", made once per sampler.

vLLM builds one rejection sampler per worker, on one of two runners (``V1``, ``MRV2``). When it does,
the adapter of that runner calls :func:`plan_verification` with what it found, and :func:`enforce`
acts on the plan; the startup log line (:func:`log_plan`) and ``ears-vllm doctor`` print the same plan.
Nothing else in the package decides whether the plugin is on. :class:`ActiveSampler` then applies each
sampler's plan to the calls it makes.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable
from typing import Any

from ears_vllm.config import EarsConfig
from ears_vllm.policies import budget_refusal, get_policy, settings_at_startup
from ears_vllm.seam.hooks import bound, signature_of

# The only rejection_sample_method ears-vllm replaces; the others (fly, block, synthetic, and whatever a
# later vLLM adds) are vLLM's own rules, which a user who asked for them gets.
VLLM_STANDARD_METHOD = "standard"


class UnsupportedPolicyError(RuntimeError):
    """A non-standard policy cannot run on the runner that verifies, and the config says stop."""


@dataclasses.dataclass(frozen=True)
class VerificationPlan:
    runner: str  # "V1" or "MRV2"
    policy: str
    verifies: bool  # ears-vllm runs this sampler's verification step
    reason: str  # why (one clause, for logs and doctor)
    refuses: bool  # the policy cannot run here (hook moved, runner lacks it) and on_unsupported is "error"

    @property
    def summary(self) -> str:
        if self.verifies:
            return f"ears-vllm verifies ({self.reason})"
        if self.refuses:
            return f"REFUSES to start: {self.reason}"
        return f"vLLM's own rule ({self.reason})"


def plan_verification(
    runner: str,
    config: EarsConfig,
    *,
    vllm_version: str,
    hook_problem: str | None,
    method: str | None = VLLM_STANDARD_METHOD,
    watermarking: bool = False,
    draft_problem: str | None = None,
    installed_runners: tuple[str, ...] = ("V1", "MRV2"),
) -> VerificationPlan:
    """Decide for one sampler. ``hook_problem``: why the runner's hooks do not check out (None: they do);
    ``method``: the sampler's ``rejection_sample_method``; ``watermarking``: vLLM watermarks the output;
    ``draft_problem``: why the drafter cannot serve the policy (ERSD's keyed drafts), None when it can;
    ``installed_runners``: the runners this vLLM has (``seam.hooks.installed_runners``), for the refusal's words."""
    method = method or VLLM_STANDARD_METHOD
    spec = get_policy(config.policy)
    if spec.vllms_rule:
        return VerificationPlan(runner, config.policy, False, f"policy {config.policy!r} is vLLM's own rule", False)
    # What the user asked of vLLM itself wins, named beside the ears policy (a warning, not a refusal).
    if method != VLLM_STANDARD_METHOD:
        reason = (
            f"vLLM was asked for rejection_sample_method={method!r}, its own rule, which does not combine "
            f"with ears policy {config.policy!r}"
        )
        return VerificationPlan(runner, config.policy, False, reason, False)
    if watermarking:
        reason = f"vLLM was asked to watermark the output, which does not combine with ears policy {config.policy!r}"
        return VerificationPlan(runner, config.policy, False, reason, False)
    if hook_problem is not None:
        problem = f"vLLM {vllm_version} moved the {runner} hook: {hook_problem}"
    elif runner not in spec.runners:
        other = list(spec.runners)
        problem = f"policy {config.policy!r} is not available on the {runner} runner (it is on {other})"
        if not set(other) & set(installed_runners):
            problem += f", which vLLM {vllm_version} does not have"
    elif draft_problem is not None:
        problem = draft_problem
    elif config.budget is not None and budget_refusal(config.policy, runner) is not None:
        problem = budget_refusal(config.policy, runner)
    else:
        return VerificationPlan(runner, config.policy, True, f"policy {config.policy!r} on vLLM {vllm_version}", False)
    refuses = config.on_unsupported == "error"
    return VerificationPlan(runner, config.policy, False, problem, refuses)


def config_for_sampler(config: EarsConfig, num_speculative_tokens: int | None) -> EarsConfig:
    """``config`` with the settings that depend on the number of speculative tokens resolved
    (:func:`ears_vllm.policies.settings_at_startup`: FLy's window, vLLM's default min(6, k - 1)); ValueError at
    startup for what vLLM itself would refuse (FLy with fewer than 2 speculative tokens, a window not below k)."""
    if num_speculative_tokens is None:
        return config
    settings = settings_at_startup(config.policy, dict(config.params), int(num_speculative_tokens))
    resolved = {name: value for name, value in settings.items() if value != getattr(config, name)}
    return config.merged(resolved) if resolved else config


def enforce(plan: VerificationPlan, logger) -> None:
    """Stop the server (raise) or warn, as the plan says; silent only when nothing was asked of the plugin."""
    if plan.refuses:
        raise UnsupportedPolicyError(
            f"ears-vllm: {plan.reason}; runner {plan.runner}. Refusing to start rather than silently verify with "
            'vLLM\'s own rule; set "on_unsupported": "fallback" in the ears config to run vLLM\'s rule instead.'
        )
    if not plan.verifies and not get_policy(plan.policy).vllms_rule:
        logger.warning("ears-vllm: %s; runner %s runs vLLM's own rule", plan.reason, plan.runner)


def log_plan(plan: VerificationPlan, config: EarsConfig, logger, extra: str = "") -> None:
    """The startup line of a sampler: its policy's settings, its plan, and (where ears-vllm verifies) what a
    request's ``vllm_xargs`` may ask (docs/operator-limits.md)."""
    settings = "".join(
        f" {name}={value:g}" if isinstance(value, float) else f" {name}={value}"
        for name, value in config.settings.items()
    )
    limits = f" request_limits=[{config.granted.summary}]" if plan.verifies else ""
    logger.info(
        "ears-vllm: policy=%s%s runner=%s verification=%s%s%s",
        config.policy,
        settings,
        plan.runner,
        plan.summary,
        extra,
        limits,
    )


# (sampler, its constructor's arguments by name) -> the config when ears-vllm verifies for it, else None.
Configure = Callable[[Any, dict[str, Any]], EarsConfig | None]


class ActiveSampler:
    """Which sampler the verification call in progress is made for, so that the process-wide swap of vLLM's
    module-level ``rejection_sample`` still honours each sampler's own plan."""

    def __init__(self, name: str) -> None:
        self._config: contextvars.ContextVar[EarsConfig | None] = contextvars.ContextVar(name, default=None)

    @property
    def config(self) -> EarsConfig | None:
        """The config ears-vllm verifies with now; None: vLLM's own function runs."""
        return self._config.get()

    def verifying_with(self, config: EarsConfig | None) -> contextlib.AbstractContextManager[None]:
        return bound(self._config, config)

    def of(self, sampler: Any) -> contextlib.AbstractContextManager[None]:
        """Calls inside are made for ``sampler``: ears-vllm's rule if its plan verifies, else vLLM's."""
        return self.verifying_with(getattr(sampler, "_ears_config", None))

    def wrap_init(self, original_init: Callable[..., None], configure: Configure) -> Callable[..., None]:
        """A sampler's constructor that plans the sampler: ``configure(sampler, constructor arguments)`` returns
        the config when ears-vllm verifies (the adapters' ``*.sampler`` entries of
        :data:`ears_vllm.seam.patches.MANIFEST`)."""

        def __init__(sampler: Any, *args: Any, **kwargs: Any) -> None:
            original_init(sampler, *args, **kwargs)
            arguments = signature_of(original_init).bind(sampler, *args, **kwargs).arguments
            sampler._ears_config = configure(sampler, arguments)

        return __init__

    def wrap_call(self, original_call: Callable[..., Any]) -> Callable[..., Any]:
        """A sampler's verifying method, run inside :meth:`of`."""

        def call_for_this_sampler(sampler: Any, *args: Any, **kwargs: Any) -> Any:
            with self.of(sampler):
                return original_call(sampler, *args, **kwargs)

        return call_for_this_sampler
