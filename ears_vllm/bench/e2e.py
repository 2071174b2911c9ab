"""``ears-vllm bench e2e``: real vLLM speculative decoding, policy against policy, on the same prompts.

One engine per (dataset, policy), each in its own process (:mod:`ears_vllm.bench.engine_run`), every
temperature on the same engine; the same prompts and per-prompt seeds for every policy, so quality
comparisons are paired. Finished runs are not rerun (their JSON is kept, keyed by the run's spec).
Output in ``--out``: one JSON per run, ``summary.md``, ``rows.json`` and PNG plots.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from ears_vllm.bench import datasets
from ears_vllm.config import EarsConfig


@dataclasses.dataclass
class E2EConfig:
    target: str
    draft: str | None
    out_dir: Path
    datasets: list[tuple[str, str | None, int | None]]  # (name, path or None, limit)
    policies: dict[str, dict]
    temperatures: list[float]
    method: str = "draft_model"
    k: int = 4
    max_tokens: int = 96
    max_model_len: int = 2048
    seed: int = 0
    # Split each prompt set into cells of this many prompts (one engine each), so a long run keeps what it
    # finished when it is stopped; None = one cell per prompt set.
    shard_size: int | None = None
    # On a CPU, torch.compile's warmup (a full-size profile run) costs ~10 minutes per engine for the 1.5B
    # target; eager mode skips it. None = eager exactly when there is no CUDA device.
    enforce_eager: bool | None = None


def parse_policies(text: str) -> dict[str, dict]:
    """``"standard,ears:0.1,typical"`` -> ``{"standard": {...}, "ears-0.1": {...}, "typical": {...}}``."""
    policies = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, tolerance = item.partition(":")
        settings = {"policy": name} | ({"tolerance": float(tolerance)} if tolerance else {})
        EarsConfig.from_dict(settings)  # fail here, not an hour into the run
        policies[f"{name}-{tolerance}" if tolerance else name] = settings
    if not policies:
        raise ValueError(f"--policies {text!r} names no policy")
    return policies


@dataclasses.dataclass(frozen=True)
class Cell:
    """One engine run: a policy over a prompt set, or over prompts ``shard[0]:shard[1]`` of it."""

    dataset: str
    prompts: list[dict]
    policy: str
    shard: tuple[int, int] | None = None

    @property
    def name(self) -> str:
        shard = f"@{self.shard[0]}-{self.shard[1]}" if self.shard else ""
        return f"{self.dataset}{shard}__{self.policy}"


def run_e2e(config: E2EConfig, *, progress: bool = True) -> list[dict]:
    from tqdm import tqdm

    for cell in tqdm(cells(config), desc="e2e runs", disable=not progress):
        run_cell(config, cell)
    return write_summary(config.out_dir)


def cells(config: E2EConfig) -> list[Cell]:
    """The runs of a grid, shard by shard, every policy of a shard in turn (so pairs finish together)."""
    config.out_dir.mkdir(parents=True, exist_ok=True)
    grid = []
    for name, path, limit in config.datasets:
        prompts = datasets.load(name, path, limit)
        size = config.shard_size or len(prompts)
        for start in range(0, len(prompts), size):
            shard = (start, min(start + size, len(prompts))) if config.shard_size else None
            grid += [Cell(name, prompts[start : start + size], policy, shard) for policy in config.policies]
    return grid


def write_summary(out_dir: Path) -> list[dict]:
    """rows.json, summary.md and the plots, from every finished run in ``out_dir``."""
    from ears_vllm.bench.plots import plot_e2e

    rows = summarize(out_dir)
    (out_dir / "rows.json").write_text(json.dumps(rows, indent=1))
    (out_dir / "summary.md").write_text(markdown_table(rows) + "\n")
    plot_e2e(rows, out_dir)
    return rows


def run_cell(config: E2EConfig, cell: Cell) -> Path:
    """Run one engine (in its own process) unless its result is already there; return the result path."""
    name = cell.name
    output = config.out_dir / f"{name}.json"
    spec = {
        "target": config.target, "draft": config.draft, "method": config.method, "k": config.k,
        "ears": config.policies[cell.policy], "policy_name": cell.policy, "dataset": cell.dataset,
        "temperatures": config.temperatures, "max_tokens": config.max_tokens,
        "max_model_len": config.max_model_len, "seed": config.seed, "prompts": cell.prompts,
        "enforce_eager": config.enforce_eager if config.enforce_eager is not None else not _has_cuda(),
    }  # fmt: skip
    if cell.shard:
        spec["shard"] = list(cell.shard)
    spec["key"] = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    if output.exists() and json.loads(output.read_text())["spec"].get("key") == spec["key"]:
        return output  # resumable: this run is done
    spec["output"] = str(output)
    spec_path = config.out_dir / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    env.update(EARS_VLLM_STATS_PATH=str(config.out_dir / "stats" / name), EARS_VLLM_LOG_INTERVAL="0")
    (config.out_dir / "stats").mkdir(exist_ok=True)
    log_path = config.out_dir / f"{name}.log"
    with open(log_path, "w") as log:
        done = subprocess.run([sys.executable, "-m", "ears_vllm.bench.engine_run", str(spec_path)], env=env,
                              stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"run {name} failed (exit {done.returncode}); last lines of {log_path}:\n"
                           + log_path.read_text()[-3000:])  # fmt: skip
    spec_path.unlink()
    return output


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def summarize(out_dir: Path) -> list[dict]:
    """One row per (dataset, policy, temperature), summed over the shards that every policy has finished.

    Rows are paired: the same prompts, with the same seeds, under every policy of a dataset.
    """
    runs = [json.loads(p.read_text()) for p in sorted(out_dir.glob("*__*.json")) if not p.name.endswith(".spec.json")]
    shards: dict[str, dict[str, set]] = defaultdict(lambda: defaultdict(set))  # dataset -> policy -> shards
    for run in runs:
        shards[run["spec"]["dataset"]][run["spec"]["policy_name"]].add(tuple(run["spec"].get("shard", ())))
    paired = {dataset: set.intersection(*by_policy.values()) for dataset, by_policy in shards.items()}
    groups: dict[tuple, list[tuple[dict, dict]]] = defaultdict(list)
    for run in runs:
        spec = run["spec"]
        if tuple(spec.get("shard", ())) in paired[spec["dataset"]]:
            for result in run["results"]:
                groups[(spec["dataset"], spec["policy_name"], result["temperature"])].append((spec, result))
    return [_row(dataset, policy, temperature, items) for (dataset, policy, temperature), items in groups.items()]


def _row(dataset: str, policy: str, temperature: float, items: list[tuple[dict, dict]]) -> dict:
    def total(key: str) -> float:
        return sum(result[key] for _, result in items)

    ears = items[0][0]["ears"]
    texts = [text for _, result in items for text in result["texts"]]
    finish_reasons = [reason for _, result in items for reason in result.get("finish_reasons", [])]
    positions = [result["accepted_per_position"] or [] for _, result in items]
    per_position = [sum(column) for column in zip(*positions, strict=True)]
    drafts, elapsed = max(total("drafts"), 1), total("elapsed_s")
    row = {
        "dataset": dataset,
        "policy": policy,
        "tolerance": ears.get("tolerance", 0.0) if ears["policy"] != "typical" else None,
        "temperature": temperature,
        "mean_acceptance_length": 1 + total("accepted") / drafts,
        "acceptance_rate": total("accepted") / max(total("draft_tokens"), 1),
        "acceptance_per_position": [a / drafts for a in per_position],
        "relaxed_per_draft": total("relaxed") / max(total("random_drafts"), 1),
        "output_tokens_per_s": total("output_tokens") / elapsed,
        "requests_per_s": len(texts) / elapsed,
        "num_prompts": len(texts),
        # Outputs that ended on their own; a truncated GSM8K answer cannot be scored as right.
        "finished": sum(reason == "stop" for reason in finish_reasons) / len(texts),
        "accuracy": None,
    }
    if dataset == "gsm8k":
        answers = [answer for spec, _ in items for answer in spec["answers"]]
        correct = [datasets.gsm8k_correct(t, a) for t, a in zip(texts, answers, strict=True)]
        row["accuracy"] = sum(correct) / len(correct)
    return row


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| dataset | T | policy | mean acceptance length | accepted / draft | relaxed / draft | output tok/s "
        "| req/s | finished | accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["dataset"], r["temperature"], r["policy"])):
        accuracy = "" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        lines.append(
            f"| {r['dataset']} | {r['temperature']:g} | {r['policy']} | {r['mean_acceptance_length']:.3f} | "
            f"{r['acceptance_rate']:.3f} | {r['relaxed_per_draft']:.4f} | {r['output_tokens_per_s']:.2f} | "
            f"{r['requests_per_s']:.3f} | {r['finished']:.2f} | {accuracy} |"
        )
    return "\n".join(lines)
