"""Policy comparison on synthetic target/draft distributions (no model, seconds on a CPU).

A random "target model" gives peaked logits over the vocabulary; the draft is the target plus noise,
so acceptance is partial. For each temperature and policy we run :func:`ears_vllm.verify` on a batch of
k-token drafts and report the measured mean acceptance length (emitted tokens per step), the
per-position acceptance rate, its closed-form expectation, and the relaxed acceptances per verified position,
with what that rate is as a total-variation distance: the added TV per position only for the policies the
registry says so of (``PolicySpec.relaxed_rate``; the drafts here are sampled, ``d ~ q``), the relaxed rate alone
for typical and sglang.
"""

from __future__ import annotations

import dataclasses

import torch

from ears_vllm.config import EarsConfig
from ears_vllm.policies import expected_acceptance
from ears_vllm.policies.registry import relaxed_rate_label
from ears_vllm.verify import verify

DEFAULT_POLICIES: dict[str, EarsConfig] = {
    "standard": EarsConfig(),
    "ears 0.1": EarsConfig(policy="ears", tolerance=0.1),
    "ears 0.3": EarsConfig(policy="ears", tolerance=0.3),
    "typical": EarsConfig(policy="typical"),
}


@dataclasses.dataclass(frozen=True)
class SyntheticRow:
    temperature: float
    policy: str
    mean_acceptance_length: float  # emitted tokens per verification step, 1 + accepted drafts
    acceptance_rate: float  # accepted drafts / drafts
    expected_first_position_rate: float  # closed form for position 0
    measured_first_position_rate: float
    relaxed_per_draft: float  # relaxed acceptances / drafts (the drafts after a rejection included)
    relaxed_per_verified: float  # relaxed acceptances / verified positions (accepted drafts + first rejections)
    relaxed_rate_is: str  # what relaxed_per_verified is: "added TV" or not (registry.relaxed_rate_label)


def run_synthetic(
    temperatures: tuple[float, ...] = (0.6, 0.9, 1.0, 1.3),
    policies: dict[str, EarsConfig] | None = None,
    *,
    batch: int = 512,
    num_speculative_tokens: int = 4,
    vocab: int = 2048,
    draft_noise: float = 1.0,
    seed: int = 0,
) -> list[SyntheticRow]:
    policies = policies or DEFAULT_POLICIES
    g = torch.Generator().manual_seed(seed)
    num_tokens = batch * num_speculative_tokens
    # Heavy-tailed logits, like a language model's: a few plausible tokens, a long tail.
    base = torch.randn(num_tokens, vocab, generator=g) * 2.5
    draft_base = base + draft_noise * torch.randn(num_tokens, vocab, generator=g)
    uniform = torch.rand(num_tokens, dtype=torch.float64, generator=g)
    noise = torch.empty(batch, vocab).exponential_(generator=g)
    rows = []
    for temperature in temperatures:
        target_logits = base / temperature
        draft_probs = (draft_base / temperature).softmax(-1)
        draft_ids = torch.multinomial(draft_probs, 1, generator=g).squeeze(-1)
        first = torch.arange(0, num_tokens, num_speculative_tokens)
        for name, config in policies.items():
            result = verify(
                target_logits,
                draft_ids,
                torch.full((batch,), num_speculative_tokens),
                torch.zeros(batch, dtype=torch.long),
                draft_probs=draft_probs,
                uniform=uniform,
                recovery_noise=noise,
                config=config,
            )
            expected, _ = expected_acceptance(
                target_logits[first].softmax(-1),
                draft_probs[first],
                policy=config.policy,
                tolerance=config.tolerance,
                min_ratio=config.min_ratio,
                typical_eps=config.typical_eps,
                typical_delta=config.typical_delta,
            )
            accepted = result.num_accepted.double()
            verified = accepted.sum() + (result.num_accepted < num_speculative_tokens).sum()  # k drafts per step
            rows.append(
                SyntheticRow(
                    temperature=temperature,
                    policy=name,
                    mean_acceptance_length=float(1 + accepted.mean()),
                    acceptance_rate=float(accepted.sum() / num_tokens),
                    expected_first_position_rate=float(expected.mean()),
                    measured_first_position_rate=float((accepted >= 1).double().mean()),
                    relaxed_per_draft=float(result.num_relaxed.double().sum() / num_tokens),
                    relaxed_per_verified=float(result.num_relaxed.double().sum() / verified),
                    relaxed_rate_is=relaxed_rate_label(config.policy, one_hot_drafts=False),
                )
            )
    return rows


def markdown_table(rows: list[SyntheticRow]) -> str:
    header = (
        "| T | policy | mean acceptance length | accepted / draft | position-0 accept "
        "(measured / exact) | relaxed / verified position | which is |"
    )
    lines = [header, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r.temperature:g} | {r.policy} | {r.mean_acceptance_length:.3f} | {r.acceptance_rate:.3f} | "
            f"{r.measured_first_position_rate:.3f} / {r.expected_first_position_rate:.3f} | "
            f"{r.relaxed_per_verified:.4f} | {r.relaxed_rate_is} |"
        )
    return "\n".join(lines)
