"""``ears-vllm sweep GRID.yaml``: an end-to-end benchmark grid fanned out over a Ray cluster.

Each cell (dataset x policy) is one Ray task that runs one engine (:func:`ears_vllm.bench.e2e.run_cell`,
itself a subprocess), reserving ``cpus_per_cell`` CPUs and ``gpus_per_cell`` GPUs. Without
``--ray-address`` a local Ray instance is started. Finished cells are skipped, so an interrupted sweep
resumes where it stopped; results land in one folder with the same summary and plots as ``bench e2e``.

Grid file::

    target: /path/or/model-id      # omit target and draft for the offline Qwen2.5-Coder pair
    draft: /path/or/model-id
    method: draft_model             # or ngram
    draft_sampling: greedy          # vLLM's draft_sample_method: greedy (its default) or probabilistic
    k: 4
    datasets: [{name: gsm8k, limit: 100}, {name: mt_bench}]
    temperatures: [0.9, 1.0]
    policies: [standard, "ears:0.1", "ears:0.3", typical]
    max_tokens: 256
    max_model_len: -1               # -1: the model's own, cut to what the KV cache holds
    out: results/sweep
    cpus_per_cell: 2
    gpus_per_cell: 0
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ears_vllm.bench.e2e import E2EConfig, cells, parse_policies, run_cell, write_summary

GRID_KEYS = {
    "target",
    "draft",
    "method",
    "draft_sampling",
    "k",
    "datasets",
    "temperatures",
    "policies",
    "max_tokens",
    "max_model_len",
    "seed",
    "out",
    "cpus_per_cell",
    "gpus_per_cell",
    "shard_size",
}


def load_grid(path: str | Path) -> tuple[E2EConfig, dict[str, float]]:
    import yaml

    grid = yaml.safe_load(Path(path).read_text())
    if not isinstance(grid, dict):
        raise ValueError(f"sweep grid {str(path)!r} must be a mapping; see `ears-vllm sweep --help`")
    unknown = sorted(set(grid) - GRID_KEYS)
    if unknown:
        raise ValueError(f"sweep grid {str(path)!r} has unknown key(s) {unknown}; allowed: {sorted(GRID_KEYS)}")
    target, draft = grid.get("target"), grid.get("draft")
    if target is None:
        from ears_vllm.models import fetch_pair

        target, draft = (str(p) for p in fetch_pair())
    policies = grid.get("policies", ["standard", "ears:0.1", "ears:0.3"])
    config = E2EConfig(
        target=str(target),
        draft=str(draft) if draft else None,
        out_dir=Path(grid.get("out", "results/sweep")),
        datasets=[(d["name"], d.get("path"), d.get("limit")) for d in grid.get("datasets", [{"name": "gsm8k"}])],
        policies=parse_policies(",".join(map(str, policies))),
        temperatures=[float(t) for t in grid.get("temperatures", [0.9])],
        method=grid.get("method", "draft_model"),
        draft_sampling=grid.get("draft_sampling", "greedy"),
        k=int(grid.get("k", 4)),
        max_tokens=int(grid.get("max_tokens", 96)),
        max_model_len=int(grid.get("max_model_len", -1)),
        seed=int(grid.get("seed", 0)),
        shard_size=grid.get("shard_size"),
    )
    resources = {"num_cpus": float(grid.get("cpus_per_cell", 1)), "num_gpus": float(grid.get("gpus_per_cell", 0))}
    return config, resources


def run_sweep(
    config: E2EConfig,
    resources: dict[str, float],
    *,
    ray_address: str | None = None,
    ray_init: dict[str, Any] | None = None,
    progress: bool = True,
) -> list[dict]:
    import ray
    from tqdm import tqdm

    ray.init(address=ray_address, **(ray_init or {}))
    try:
        cell = ray.remote(**resources)(run_cell)
        pending = [cell.remote(config, c) for c in cells(config)]
        with tqdm(total=len(pending), desc="sweep cells", disable=not progress) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done)  # re-raises a failed cell's error
                bar.update(len(done))
    finally:
        ray.shutdown()
    return write_summary(config.out_dir, policies=list(config.policies))
