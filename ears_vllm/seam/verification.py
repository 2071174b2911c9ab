"""The one decision "does ears-vllm verify on this runner, and if not, why", made once per sampler.

vLLM builds one rejection sampler per worker, on one of two runners (``V1``, ``MRV2``). When it does,
the adapter of that runner calls :func:`plan_verification` with what it found, and :func:`enforce`
acts on the plan; the startup log line and ``ears-vllm doctor`` print the same plan. Nothing else in
the package decides whether the plugin is on.
"""

from __future__ import annotations

import dataclasses

from ears_vllm.config import EarsConfig

# The only rejection_sample_method ears-vllm replaces; the others (fly, block, synthetic, and whatever a
# later vLLM adds) are vLLM's own rules, which a user who asked for them gets.
VLLM_STANDARD_METHOD = "standard"
# Policies each runner's adapter can run (MRV2's statistics carry no entropy, which typical needs).
POLICIES_BY_RUNNER = {"V1": ("ears", "typical"), "MRV2": ("ears",)}


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
) -> VerificationPlan:
    """Decide for one sampler. ``hook_problem``: why the runner's hooks do not check out (None: they do);
    ``method``: the sampler's ``rejection_sample_method``; ``watermarking``: vLLM watermarks the output."""
    method = method or VLLM_STANDARD_METHOD
    if config.policy == "standard":
        return VerificationPlan(runner, config.policy, False, "policy 'standard' is vLLM's own rule", False)
    # What the user asked of vLLM itself wins, named beside the ears policy (a warning, not a refusal).
    if method != VLLM_STANDARD_METHOD:
        reason = (f"vLLM was asked for rejection_sample_method={method!r}, its own rule, which does not combine "
                  f"with ears policy {config.policy!r}")  # fmt: skip
        return VerificationPlan(runner, config.policy, False, reason, False)
    if watermarking:
        reason = f"vLLM was asked to watermark the output, which does not combine with ears policy {config.policy!r}"
        return VerificationPlan(runner, config.policy, False, reason, False)
    if hook_problem is not None:
        problem = f"vLLM {vllm_version} moved the {runner} hook: {hook_problem}"
    elif config.policy not in POLICIES_BY_RUNNER[runner]:
        other = [r for r, policies in POLICIES_BY_RUNNER.items() if config.policy in policies]
        problem = f"policy {config.policy!r} is not available on the {runner} runner (it is on {other})"
    else:
        return VerificationPlan(runner, config.policy, True, f"policy {config.policy!r} on vLLM {vllm_version}", False)
    refuses = config.on_unsupported == "error"
    return VerificationPlan(runner, config.policy, False, problem, refuses)


def enforce(plan: VerificationPlan, logger) -> None:
    """Stop the server (raise) or warn, as the plan says; silent only when nothing was asked of the plugin."""
    if plan.refuses:
        raise UnsupportedPolicyError(
            f"ears-vllm: {plan.reason}; runner {plan.runner}. Refusing to start rather than silently verify with "
            'vLLM\'s own rule; set "on_unsupported": "fallback" in the ears config to run vLLM\'s rule instead.'
        )
    if not plan.verifies and plan.policy != "standard":
        logger.warning("ears-vllm: %s; runner %s runs vLLM's own rule", plan.reason, plan.runner)
