"""``ears-vllm bench speed``: output tokens per second of each policy, engines interleaved so drift cancels.

A 2-core CPU machine drifts by several percent from one minute to the next (other work, thermal state), which is
as large as the differences between policies; one engine per policy run one after the other measures the drift
as much as the policy. Here every *round* runs one engine per policy, in the same order (A B A B ...), on the same
prompts, seeds and batch (every prompt submitted at once, so the engine batches them all), and each round's
ratio to the first policy is taken within the round: slow drift moves both sides of a ratio alike.

Each engine run is a :mod:`ears_vllm.bench.e2e` run (one process, vLLM's own counters and the plugin's), kept in
``out/round-N/`` and resumed like ``bench e2e``. Written to ``out``: ``speed.json`` (per run and per policy),
``speed.md`` and ``speed.png`` (tok/s per round and policy).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

from ears_vllm.bench import datasets
from ears_vllm.bench.e2e import Cell, E2EConfig, run_cell


@dataclasses.dataclass
class SpeedConfig:
    target: str
    draft: str | None
    out_dir: Path
    dataset: tuple[str, str | None, int]  # (name, path or None, number of prompts: the batch)
    policies: dict[str, dict]  # label -> ears settings; the first is the baseline of the ratios
    temperature: float
    rounds: int = 3
    k: int = 4
    max_tokens: int = 96
    draft_sampling: str = "greedy"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"--rounds = {self.rounds}: at least 1")
        if len(self.policies) < 2:
            raise ValueError(f"--policies names {list(self.policies)}: at least 2 to compare")


def run_speed(config: SpeedConfig, *, progress: bool = True) -> dict:
    """Every round's engines in turn; returns (and writes) the per-run and per-policy figures."""
    from tqdm import tqdm

    name, path, limit = config.dataset
    prompts = datasets.load(name, path, limit)
    order = [(r, policy) for r in range(config.rounds) for policy in config.policies]
    runs = []
    with tqdm(order, desc="speed runs", disable=not progress) as bar:
        for round_index, policy in bar:
            bar.set_postfix_str(f"round {round_index} {policy}")
            e2e = E2EConfig(
                target=config.target,
                draft=config.draft,
                out_dir=config.out_dir / f"round-{round_index}",
                datasets=[config.dataset],
                policies=config.policies,
                temperatures=[config.temperature],
                draft_sampling=config.draft_sampling,
                k=config.k,
                max_tokens=config.max_tokens,
                seed=config.seed,
            )
            e2e.out_dir.mkdir(parents=True, exist_ok=True)
            result = json.loads(run_cell(e2e, Cell(name, prompts, policy)).read_text())["results"][0]
            runs.append(run_figures(round_index, policy, result))
    report = {"config": _described(config), "runs": runs, "policies": policy_figures(runs, list(config.policies))}
    config.out_dir.mkdir(parents=True, exist_ok=True)
    (config.out_dir / "speed.json").write_text(json.dumps(report, indent=1))
    (config.out_dir / "speed.md").write_text(markdown_table(report) + "\n")
    plot_speed(runs, config.out_dir / "speed.png")
    return report


def run_figures(round_index: int, policy: str, result: dict) -> dict:
    """One engine run's throughput and acceptance, from its result (``engine_run``'s record of one temperature)."""
    drafts = result["drafts"] or 0
    return {
        "round": round_index,
        "policy": policy,
        "output_tokens": result["output_tokens"],
        "elapsed_s": result["elapsed_s"],
        "tokens_per_s": result["output_tokens"] / result["elapsed_s"],
        "mean_acceptance_length": 1 + result["accepted"] / drafts if drafts else None,
    }


def policy_figures(runs: list[dict], policies: list[str]) -> list[dict]:
    """Per policy: tok/s over the rounds (mean, min, max, standard deviation) and its ratio to the baseline (the
    first policy) taken within each round (mean, min, max)."""
    baseline = {run["round"]: run["tokens_per_s"] for run in runs if run["policy"] == policies[0]}
    figures = []
    for policy in policies:
        mine = [run for run in runs if run["policy"] == policy]
        speeds = [run["tokens_per_s"] for run in mine]
        ratios = [run["tokens_per_s"] / baseline[run["round"]] for run in mine if run["round"] in baseline]
        lengths = [run["mean_acceptance_length"] for run in mine if run["mean_acceptance_length"] is not None]
        figures.append(
            {
                "policy": policy,
                "rounds": len(mine),
                "tokens_per_s": statistics.mean(speeds),
                "tokens_per_s_min": min(speeds),
                "tokens_per_s_max": max(speeds),
                "tokens_per_s_stdev": statistics.stdev(speeds) if len(speeds) > 1 else 0.0,
                "ratio_to_baseline": statistics.mean(ratios) if ratios else None,
                "ratio_min": min(ratios) if ratios else None,
                "ratio_max": max(ratios) if ratios else None,
                "mean_acceptance_length": statistics.mean(lengths) if lengths else None,
            }
        )
    return figures


def markdown_table(report: dict) -> str:
    config = report["config"]
    baseline = report["policies"][0]["policy"]
    lines = [
        f"{config['dataset']} ({config['num_prompts']} prompts at once), T={config['temperature']:g}, "
        f"k={config['k']}, {config['rounds']} interleaved rounds",
        "",
        f"| policy | output tok/s (mean) | min - max | stdev | ratio to {baseline} (paired per round) | "
        "ratio min - max | mean acceptance length |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in report["policies"]:
        length = "" if p["mean_acceptance_length"] is None else f"{p['mean_acceptance_length']:.3f}"
        lines.append(
            f"| {p['policy']} | {p['tokens_per_s']:.2f} | {p['tokens_per_s_min']:.2f} - {p['tokens_per_s_max']:.2f} "
            f"| {p['tokens_per_s_stdev']:.2f} | {p['ratio_to_baseline']:.3f} | {p['ratio_min']:.3f} - "
            f"{p['ratio_max']:.3f} | {length} |"
        )
    return "\n".join(lines)


def plot_speed(runs: list[dict], path: Path) -> None:
    from ears_vllm.bench.plots import pyplot, save

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for policy in dict.fromkeys(run["policy"] for run in runs):
        points = [(run["round"], run["tokens_per_s"]) for run in runs if run["policy"] == policy]
        ax.plot(*zip(*points, strict=True), marker="o", label=policy)
    ax.set(xlabel="round", ylabel="output tok/s", title="interleaved engines, tok/s per round")
    ax.legend(fontsize=7)
    save(fig, path)


def _described(config: SpeedConfig) -> dict:
    name, _, limit = config.dataset
    return {
        "dataset": name,
        "num_prompts": limit,
        "temperature": config.temperature,
        "k": config.k,
        "rounds": config.rounds,
        "max_tokens": config.max_tokens,
        "draft_sampling": config.draft_sampling,
        "target": config.target,
        "draft": config.draft,
    }
