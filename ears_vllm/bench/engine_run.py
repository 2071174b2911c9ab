"""One engine, one policy, several temperatures: ``python -m ears_vllm.bench.engine_run SPEC.json``.

Run in its own process (vLLM's engine and its memory go away with it). Reads a spec written by
:mod:`ears_vllm.bench.e2e`, generates every prompt at every temperature with offline ``LLM``, and writes
one JSON result: vLLM's own spec-decode counters (``llm.get_metrics()``), the plugin's exact counters
(:class:`ears_vllm.stats.VerifyStats`: relaxed acceptances, verified positions and drafted tokens of the sampled
requests), wall-clock throughput and the generated texts.

The verified positions must come from the plugin: vLLM counts steps and accepted drafts by position, not how
many drafts each step proposed, so where a drafter proposes fewer than k (AdaSD) they fix the count only within
a range (:func:`ears_vllm.bench.e2e.verified_bounds`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ears_vllm.bench.datasets import as_chat
from ears_vllm.config import settings
from ears_vllm.stats import read_stats


def _counters(llm) -> dict:
    out: dict = {}
    for metric in llm.get_metrics():
        if metric.name.startswith("vllm:spec_decode"):
            out[metric.name] = list(metric.values) if hasattr(metric, "values") else metric.value
    return out


def _delta(after: dict, before: dict, key: str):
    a, b = after.get(key, 0), before.get(key, 0)
    if isinstance(a, list):
        b = b or [0] * len(a)
        return [x - y for x, y in zip(a, b, strict=True)]
    return a - b


def run(spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    speculative = {"method": spec["method"], "num_speculative_tokens": spec["k"]}
    if spec["method"] == "draft_model":
        speculative["model"] = spec["draft"]
        if "draft_sample_method" in spec:
            speculative["draft_sample_method"] = spec["draft_sample_method"]
    else:
        speculative.update(prompt_lookup_max=4, prompt_lookup_min=2)
    llm = LLM(
        model=spec["target"],
        dtype=spec.get("dtype", "float32"),
        max_model_len=spec["max_model_len"],
        speculative_config=speculative,
        additional_config={"ears": spec["ears"]},
        disable_log_stats=False,
        seed=spec["seed"],
        enforce_eager=spec.get("enforce_eager", False),
    )
    tokenizer = llm.get_tokenizer()
    prompts = [as_chat(tokenizer, item["prompt"]) for item in spec["prompts"]]
    stats_prefix = settings().stats_path  # set by bench e2e for each run
    results = []
    first = spec.get("shard", [0])[0]  # a prompt's seed is its index in the whole prompt set
    for temperature in spec["temperatures"]:
        params = [
            SamplingParams(temperature=temperature, max_tokens=spec["max_tokens"], seed=spec["seed"] + first + i)
            for i in range(len(prompts))
        ]
        before, ears_before = _counters(llm), read_stats(stats_prefix)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=True)
        elapsed = time.perf_counter() - start
        after, ears_after = _counters(llm), read_stats(stats_prefix)
        results.append(
            {
                "temperature": temperature,
                "elapsed_s": elapsed,
                "output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
                "drafts": _delta(after, before, "vllm:spec_decode_num_drafts"),
                "draft_tokens": _delta(after, before, "vllm:spec_decode_num_draft_tokens"),
                "accepted": _delta(after, before, "vllm:spec_decode_num_accepted_tokens"),
                "accepted_per_position": _delta(after, before, "vllm:spec_decode_num_accepted_tokens_per_pos"),
                # The plugin's counts of the sampled requests' drafts: relaxed acceptances and drafted tokens (their
                # verified positions below); and the greedy rows' relaxed acceptances (fly, relaxed_topk relax them).
                "relaxed": _delta(ears_after, ears_before, "relaxed"),
                "random_drafts": _delta(ears_after, ears_before, "random_drafts"),
                "greedy_relaxed": _delta(ears_after, ears_before, "greedy_relaxed"),
                "draft_dist_steps": _delta(ears_after, ears_before, "draft_dist_steps"),  # 0 with one-hot drafts
                # AdaSD's drafter (0 where the proposer is untouched): proposer calls and their draft forward passes
                "proposals": _delta(ears_after, ears_before, "proposals"),
                "draft_forward_passes": _delta(ears_after, ears_before, "draft_forward_passes"),
                "texts": [o.outputs[0].text for o in outputs],
                "finish_reasons": [o.outputs[0].finish_reason for o in outputs],
            }
        )
        if ears_after:  # the plugin verified and wrote its counts (not under policy standard: vLLM's own rule)
            # The exact denominator of the relaxed rate (bench e2e falls back on vLLM's counters without it).
            results[-1]["random_verified"] = _delta(ears_after, ears_before, "random_verified")
            # The target's -log p of the relaxed acceptances (the plugin's exact micro-nats), the second axis.
            results[-1]["relaxed_surprisal_micronats"] = _delta(ears_after, ears_before, "relaxed_surprisal_micronats")
    kept = {k: v for k, v in spec.items() if k != "prompts"}
    kept["answers"] = [item["answer"] for item in spec["prompts"]]
    kept["prompt_texts"] = [item["prompt"] for item in spec["prompts"]]  # lets `bench acceptance --from-run` replay
    return {"spec": kept, "results": results}


if __name__ == "__main__":
    spec_path = Path(sys.argv[1])
    spec = json.loads(spec_path.read_text())
    result = run(spec)
    Path(spec["output"]).write_text(json.dumps(result, indent=1))
