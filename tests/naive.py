"""An independent, deliberately plain implementation of speculative verification (test oracle).

One request and one position at a time, in Python scalars, straight from the rules in README.md ("Policies"); it
shares no code with ``ears_vllm`` so that agreement means something.
"""

from __future__ import annotations

import math

import torch


def naive_verify(
    target_logits: torch.Tensor,  # [num_tokens, V]
    draft_token_ids: list[int],
    num_draft_tokens: list[int],
    bonus_token_ids: list[int],
    uniform: list[float],
    recovery_noise: torch.Tensor,  # [batch, V]
    *,
    draft_probs: torch.Tensor | None = None,  # [num_tokens, V]
    is_greedy: list[bool] | None = None,
    policy: str = "standard",
    tolerance: list[float] | None = None,
    min_ratio: float = 0.01,
    typical_eps: float = 0.09,
    typical_delta: float = 0.3,
) -> tuple[list[list[int]], list[int], list[int]]:
    batch = len(num_draft_tokens)
    is_greedy = is_greedy or [False] * batch
    tolerance = tolerance or [0.0] * batch
    width = max(num_draft_tokens, default=0) + 1
    rows, accepted_counts, relaxed_counts = [], [], []
    token = 0
    for req in range(batch):
        out: list[int] = []
        relaxed_count = 0
        rejected = False
        for _ in range(num_draft_tokens[req]):
            logits = target_logits[token]
            probs = logits.softmax(-1, dtype=torch.float32)
            d = draft_token_ids[token]
            argmax = int(logits.argmax())
            if is_greedy[req]:
                ok, std_ok, recovered = d == argmax, d == argmax, argmax
            else:
                p = float(probs[d]) if d >= 0 else 0.0
                q = 1.0 if draft_probs is None else float(draft_probs[token, d]) if d >= 0 else 0.0
                u = uniform[token]
                ratio = p / q if q > 0 else 0.0
                std_ok = d >= 0 and q > 0 and ratio >= u
                if policy == "standard":
                    ok = std_ok
                elif policy == "ears":
                    t = tolerance[req] * (1.0 - float(probs.max()))
                    threshold = min(u, max(u - t, min_ratio))
                    ok = std_ok or (d >= 0 and p > 0 and q > 0 and ratio >= threshold)
                elif policy == "adasd":  # the request's learnt threshold comes as its tolerance
                    q_row = [float(x) for x in draft_probs[token]] if draft_probs is not None else None
                    js = js_distance([float(x) for x in probs], q_row, d)
                    tau = tolerance[req]
                    ok = std_ok or (d >= 0 and p > 0 and q > 0 and tau > 0 and js <= tau)
                else:
                    h = -sum(float(x) * math.log(float(x)) for x in probs if float(x) > 0)
                    ok = d >= 0 and p > min(typical_eps, typical_delta * math.exp(-h))
                if policy == "typical":
                    recovered = argmax
                else:
                    residual = probs.clone()
                    if draft_probs is None:
                        if d >= 0:
                            residual[d] = 0.0
                    else:
                        residual = (probs - draft_probs[token]).clamp_min(0.0)
                    recovered = int((residual * recovery_noise[req].reciprocal()).argmax())
            if ok:
                out.append(d)
                relaxed_count += int(not std_ok)
                token += 1
                continue
            out.append(recovered)
            rejected = True
            token += num_draft_tokens[req] - len(out) + 1
            break
        accepted_counts.append(len(out) - int(rejected))
        if not rejected:
            out.append(bonus_token_ids[req])
        relaxed_counts.append(relaxed_count)
        rows.append(out + [-1] * (width - len(out)))
    return rows, accepted_counts, relaxed_counts


def js_distance(p: list[float], q: list[float] | None, d: int) -> float:
    """The Jensen-Shannon distance in bits; q None: the point mass at d."""
    if q is None:
        q = [1.0 if x == d else 0.0 for x in range(len(p))]
    m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]
    kl_p = sum(a * math.log2(a / c) for a, c in zip(p, m, strict=True) if a > 0)
    kl_q = sum(b * math.log2(b / c) for b, c in zip(q, m, strict=True) if b > 0)
    return math.sqrt(min(max(0.5 * (kl_p + kl_q), 0.0), 1.0))
