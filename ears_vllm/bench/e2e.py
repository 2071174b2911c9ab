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


def run_e2e(config: E2EConfig, *, progress: bool = True) -> list[dict]:
    from tqdm import tqdm

    for dataset, prompts, policy in tqdm(cells(config), desc="e2e runs", disable=not progress):
        run_cell(config, dataset, prompts, policy)
    return write_summary(config.out_dir)


def cells(config: E2EConfig) -> list[tuple[str, list[dict], str]]:
    """The (dataset, prompts, policy) runs of a grid, one engine each."""
    config.out_dir.mkdir(parents=True, exist_ok=True)
    loaded = [(name, datasets.load(name, path, limit)) for name, path, limit in config.datasets]
    return [(name, prompts, policy) for name, prompts in loaded for policy in config.policies]


def write_summary(out_dir: Path) -> list[dict]:
    """rows.json, summary.md and the plots, from every finished run in ``out_dir``."""
    from ears_vllm.bench.plots import plot_e2e

    rows = summarize(out_dir)
    (out_dir / "rows.json").write_text(json.dumps(rows, indent=1))
    (out_dir / "summary.md").write_text(markdown_table(rows) + "\n")
    plot_e2e(rows, out_dir)
    return rows


def run_cell(config: E2EConfig, dataset: str, prompts: list[dict], policy: str) -> Path:
    """Run one engine (in its own process) unless its result is already there; return the result path."""
    name = f"{dataset}__{policy}"
    output = config.out_dir / f"{name}.json"
    spec = {
        "target": config.target, "draft": config.draft, "method": config.method, "k": config.k,
        "ears": config.policies[policy], "policy_name": policy, "dataset": dataset,
        "temperatures": config.temperatures, "max_tokens": config.max_tokens,
        "max_model_len": config.max_model_len, "seed": config.seed, "prompts": prompts,
        "enforce_eager": config.enforce_eager if config.enforce_eager is not None else not _has_cuda(),
    }  # fmt: skip
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
    rows = []
    for path in sorted(out_dir.glob("*__*.json")):
        if path.name.endswith(".spec.json"):
            continue
        run = json.loads(path.read_text())
        spec = run["spec"]
        for result in run["results"]:
            drafts = max(result["drafts"], 1)
            row = {
                "dataset": spec["dataset"],
                "policy": spec["policy_name"],
                "tolerance": spec["ears"].get("tolerance", 0.0) if spec["ears"]["policy"] != "typical" else None,
                "temperature": result["temperature"],
                "mean_acceptance_length": 1 + result["accepted"] / drafts,
                "acceptance_rate": result["accepted"] / max(result["draft_tokens"], 1),
                "acceptance_per_position": [a / drafts for a in result["accepted_per_position"] or []],
                "relaxed_per_draft": result["relaxed"] / max(result["random_drafts"], 1),
                "output_tokens_per_s": result["output_tokens"] / result["elapsed_s"],
                "requests_per_s": len(result["texts"]) / result["elapsed_s"],
                "num_prompts": len(result["texts"]),
                # Outputs that ended on their own; a truncated GSM8K answer cannot be scored as right.
                "finished": sum(r == "stop" for r in result.get("finish_reasons", [])) / len(result["texts"]),
                "accuracy": None,
            }
            if spec["dataset"] == "gsm8k":
                correct = [datasets.gsm8k_correct(t, a) for t, a in zip(result["texts"], spec["answers"], strict=True)]
                row["accuracy"] = sum(correct) / len(correct)
            rows.append(row)
    return rows


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
