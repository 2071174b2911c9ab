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
import math
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from ears_vllm.bench import datasets
from ears_vllm.config import BUDGET, EarsConfig
from ears_vllm.policies import PARAMS, get_policy
from ears_vllm.policies.registry import RELAXED_RATE_LABELS, relaxed_rate_label
from ears_vllm.step import MICRONATS_PER_NAT

BASELINE = "standard"  # the name of a grid's baseline cell (vLLM's own rule), listed first and paired against

# vLLM's draft_sample_method values: "greedy" (its default) proposes the draft model's argmax and passes no
# probabilities, so the verifier sees a one-hot q; "probabilistic" samples at the request's temperature and
# passes the draft's distribution.
DRAFT_SAMPLING = ("greedy", "probabilistic")


@dataclasses.dataclass
class E2EConfig:
    target: str
    draft: str | None
    out_dir: Path
    datasets: list[tuple[str, str | None, int | None]]  # (name, path or None, limit)
    policies: dict[str, dict]
    temperatures: list[float]
    method: str = "draft_model"
    draft_sampling: str = "greedy"  # one of DRAFT_SAMPLING
    k: int = 4
    max_tokens: int = 96
    # The engine's context length; -1 = the model's own, cut by vLLM to what the KV cache holds (auto-fit).
    max_model_len: int = -1
    seed: int = 0
    # Split each prompt set into cells of this many prompts (one engine each), so a long run keeps what it
    # finished when it is stopped; None = one cell per prompt set.
    shard_size: int | None = None
    # On a CPU, torch.compile's warmup (a full-size profile run) costs ~10 minutes per engine for the 1.5B
    # target; eager mode skips it. None = eager exactly when there is no CUDA device.
    enforce_eager: bool | None = None

    def __post_init__(self) -> None:
        if self.draft_sampling not in DRAFT_SAMPLING:
            raise ValueError(f"draft sampling {self.draft_sampling!r} not allowed; allowed: {DRAFT_SAMPLING}")
        keyed = [name for name, settings in self.policies.items() if get_policy(settings["policy"]).keyed]
        if keyed and self.draft_sampling != "probabilistic":
            raise ValueError(
                f"policies {keyed} race their drafts on the requests' keys: they need draft sampling "
                f"'probabilistic' (--draft-sampling probabilistic), not "
                f"{self.draft_sampling!r}"
            )


def parse_policies(text: str) -> dict[str, dict]:
    """A comma list of policies, each ``name[:value][:key=value...]``: a bare value sets the policy's first
    parameter (``ears:0.1`` is tolerance 0.1), ``key=value`` any of its parameters. The label joins the values:
    ``"standard,ears:0.1,fly:fly_window_size=2,sglang:accept_threshold_single=0.3:accept_threshold_acc=0.5"``
    -> ``standard``, ``ears-0.1``, ``fly-2``, ``sglang-0.3-0.5``. ``budget=B`` sets a deviation budget
    (``ears:budget=0.03`` -> ``ears-budget0.03``), ``budget_scope=server`` pools it across requests
    (``ears:budget=0.03:budget_scope=server`` -> ``ears-budget0.03-server``)."""
    policies = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, *fields = item.split(":")
        spec = get_policy(name)
        settings: dict = {"policy": name}
        for field in filter(None, fields):
            key, sep, raw = field.rpartition("=")
            if not sep:
                if not spec.params:
                    raise ValueError(f"--policies {item!r}: policy {name!r} takes no parameters")
                key = spec.params[0]
            elif key == "budget":
                settings[key] = _number(item, key, raw)
                continue
            elif key == "budget_scope":
                settings[key] = raw
                continue
            elif key not in spec.params:
                raise ValueError(
                    f"--policies {item!r}: {key!r} is not a parameter of {name!r}; it has {list(spec.params)}"
                )
            settings[key] = _number(item, key, raw)
        EarsConfig.from_dict(settings)  # fail here, not an hour into the run
        label = (
            f"budget{v:g}" if k == "budget" else v if k == "budget_scope" else f"{v:g}"
            for k, v in settings.items()
            if k != "policy"
        )
        policies["-".join([name, *label])] = settings
    if not policies:
        raise ValueError(f"--policies {text!r} names no policy")
    return policies


def _number(item: str, key: str, raw: str) -> float | int:
    param = BUDGET if key == "budget" else PARAMS[key]
    try:
        return int(raw) if param.integer else float(raw)
    except ValueError:
        raise ValueError(f"--policies {item!r}: {key} = {raw!r} is not {param.allowed}") from None


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

    with tqdm(cells(config), desc="e2e runs", disable=not progress) as bar:
        for cell in bar:
            bar.set_postfix_str(cell.name)  # finished cells are skipped at once; this shows which one runs
            run_cell(config, cell)
    return write_summary(config.out_dir, policies=list(config.policies))


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


def write_summary(out_dir: Path, policies: list[str] | None = None) -> list[dict]:
    """rows.json, paired_quality.json, summary.md and the plots, from the finished runs in ``out_dir``
    (of ``policies`` only, when given)."""
    from ears_vllm.bench.plots import plot_budget, plot_e2e, plot_pareto

    rows = summarize(out_dir, policies)
    pairs = paired_quality(out_dir, policies)
    (out_dir / "rows.json").write_text(json.dumps(rows, indent=1))
    (out_dir / "paired_quality.json").write_text(json.dumps(pairs, indent=1))
    summary = markdown_table(rows) + ("\n\n" + paired_quality_table(pairs) if pairs else "")
    (out_dir / "summary.md").write_text(summary + "\n")
    plot_e2e(rows, out_dir)
    groups = {
        f"{d}, T={t:g}": [r for r in rows if (r["dataset"], r["temperature"]) == (d, t)]
        for d, t in sorted({(r["dataset"], r["temperature"]) for r in rows if r["temperature"] > 0})
    }
    if groups:
        plot_pareto(
            groups,
            "relaxed_per_verified",
            "mean_acceptance_length",
            f"relaxed acceptances per verified position ({relaxed_axis_note(rows)})",
            "mean acceptance length",
            out_dir / "pareto_added_tv.png",
        )
        if any(r["relaxed_surprisal_per_verified"] for group in groups.values() for r in group):
            plot_pareto(  # the second axis: where the relaxed mass goes (rows made before it was counted left out)
                groups,
                "relaxed_surprisal_per_verified",
                "mean_acceptance_length",
                "target -log p of the relaxed acceptances per verified position (nats)",
                "mean acceptance length",
                out_dir / "pareto_relaxed_surprisal.png",
            )
        # Quality: GSM8K accuracy where answers are scored, the fraction of distinct word 4-grams on open prompts.
        quality = {
            title: "accuracy" if any(r["accuracy"] is not None for r in group) else "distinct_4grams"
            for title, group in groups.items()
        }
        plot_pareto(
            groups,
            quality,
            "mean_acceptance_length",
            "quality",
            "mean acceptance length",
            out_dir / "pareto_quality.png",
            x_higher_better=True,
        )
    if any(r["budget"] is not None and r["temperature"] > 0 and r["relaxed_per_verified"] is not None for r in rows):
        plot_budget(rows, out_dir / "budget_realised_vs_asked.png")
    return rows


def run_cell(config: E2EConfig, cell: Cell) -> Path:
    """Run one engine (in its own process) unless its result is already there; return the result path."""
    name = cell.name
    output = config.out_dir / f"{name}.json"
    spec = {
        "target": config.target,
        "draft": config.draft,
        "method": config.method,
        "k": config.k,
        "ears": config.policies[cell.policy],
        "policy_name": cell.policy,
        "dataset": cell.dataset,
        "temperatures": config.temperatures,
        "max_tokens": config.max_tokens,
        "max_model_len": config.max_model_len,
        "seed": config.seed,
        "prompts": cell.prompts,
        "enforce_eager": config.enforce_eager if config.enforce_eager is not None else not _has_cuda(),
    }
    if cell.shard:
        spec["shard"] = list(cell.shard)
    if config.draft_sampling != "greedy":  # only when set, so runs made before the option keep their keys
        spec["draft_sample_method"] = config.draft_sampling
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
        done = subprocess.run(
            [sys.executable, "-m", "ears_vllm.bench.engine_run", str(spec_path)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    if done.returncode != 0:
        raise RuntimeError(
            f"run {name} failed (exit {done.returncode}); last lines of {log_path}:\n" + log_path.read_text()[-3000:]
        )
    spec_path.unlink()
    return output


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _finished_runs(out_dir: Path, policies: list[str] | None) -> list[dict]:
    paths = sorted(p for p in out_dir.glob("*__*.json") if not p.name.endswith(".spec.json"))
    runs = [json.loads(p.read_text()) for p in paths]
    return [run for run in runs if policies is None or run["spec"]["policy_name"] in policies]


def _shard(run: dict) -> tuple[int, ...]:
    return tuple(run["spec"].get("shard", ()))


def summarize(out_dir: Path, policies: list[str] | None = None) -> list[dict]:
    """One row per (dataset, policy, temperature), summed over the shards that every policy has finished.

    Rows are paired: the same prompts, with the same seeds, under every policy of a dataset.
    """
    runs = _finished_runs(out_dir, policies)
    shards: dict[str, dict[str, set]] = defaultdict(lambda: defaultdict(set))  # dataset -> policy -> shards
    for run in runs:
        shards[run["spec"]["dataset"]][run["spec"]["policy_name"]].add(_shard(run))
    paired = {dataset: set.intersection(*by_policy.values()) for dataset, by_policy in shards.items()}
    groups: dict[tuple, list[tuple[dict, dict]]] = defaultdict(list)
    for run in runs:
        spec = run["spec"]
        if _shard(run) in paired[spec["dataset"]]:
            for result in run["results"]:
                groups[(spec["dataset"], spec["policy_name"], result["temperature"])].append((spec, result))
    return [_row(dataset, policy, temperature, items) for (dataset, policy, temperature), items in groups.items()]


def relaxed_axis_note(rows: list[dict]) -> str:
    """What the relaxed rate of the plotted rows is, policy by policy (the registry's ``relaxed_rate``)."""
    by_label: dict[str, list[str]] = defaultdict(list)
    for row in sorted(rows, key=_row_order):
        if row["temperature"] > 0 and row["policy"] not in by_label[row["relaxed_rate_is"]]:
            by_label[row["relaxed_rate_is"]].append(row["policy"])
    return "; ".join(f"{label}: {', '.join(policies)}" for label, policies in by_label.items())


def verified_bounds(result: dict) -> tuple[int, int]:
    """The verified positions of one run's result (every accepted draft, plus the first rejected one of each step
    that rejected one), as ``(fewest, most)``: the plugin's exact count where the run recorded it
    (``random_verified``), else the range vLLM's counters allow.

    vLLM counts steps with drafts, draft tokens, accepted drafts, and steps by how many drafts they accepted, not
    how many each step proposed. With k drafts in every step (draft tokens = k * steps) that fixes the count. Where
    a drafter proposes fewer (AdaSD's draft-length half, an n-gram match near the end), a step that accepted all
    of its j < k drafts verified j positions, not j + 1, and how many steps did is known only within limits: each
    step that accepted j drafts proposed j (all accepted) or j + 1 to k, and the proposals add up to the draft
    tokens counted."""
    if "random_verified" in result:
        return result["random_verified"], result["random_verified"]
    steps, drafted, accepted = result["drafts"], result["draft_tokens"], result["accepted"]
    if not steps:
        return 0, 0
    reached = list(result["accepted_per_position"] or [])  # [k]: steps that accepted j + 1 drafts or more
    if not reached:  # vLLM gave no per-position counter: each step verified its accepted drafts and at most one more
        return accepted, min(accepted + steps, drafted)
    k = len(reached)
    exactly = [steps - reached[0], *(reached[j - 1] - reached[j] for j in range(1, k)), reached[k - 1]]
    most = accepted + steps - exactly[k]  # no step that accepted j < k drafts had proposed only j
    # Each step that proposed only the j < k drafts it accepted lowers the count by one and proposed k - j fewer
    # drafts than k: at most k * steps - drafted fewer in all, fewest first (the largest j).
    room, full = k * steps - drafted, 0
    for j in range(k - 1, 0, -1):
        take = min(exactly[j], room // (k - j))
        full, room = full + take, room - take * (k - j)
    return most - full, min(most, drafted)  # and no more verified positions than drafts proposed


def _row(dataset: str, policy: str, temperature: float, items: list[tuple[dict, dict]]) -> dict:
    def total(key: str) -> float:  # a counter a run made before it was kept counts 0
        return sum(result.get(key, 0) for _, result in items)

    ears = items[0][0]["ears"]
    texts = [text for _, result in items for text in result["texts"]]
    finish_reasons = [reason for _, result in items for reason in result.get("finish_reasons", [])]
    positions = [result["accepted_per_position"] or [] for _, result in items]
    per_position = [sum(column) for column in zip(*positions, strict=True)]
    drafts, elapsed = max(total("drafts"), 1), total("elapsed_s")
    proposals, passes = total("proposals"), total("draft_forward_passes")
    # Verified positions: the plugin's exact count, or the range vLLM's counters allow (runs made before the count
    # was recorded); the relaxed rate is then an interval, a point only where the range is one count.
    bounds = [verified_bounds(result) for _, result in items]
    fewest, most = sum(b[0] for b in bounds), sum(b[1] for b in bounds)
    one_hot = items[0][0].get("draft_sample_method", "greedy") != "probabilistic"  # greedy drafting, n-gram
    relaxed_rate_is = relaxed_rate_label(ears["policy"], one_hot)
    if temperature > 0:
        interval = [total("relaxed") / most, total("relaxed") / fewest] if most else [0.0, 0.0]
    elif get_policy(ears["policy"]).greedy_rows:  # fly, relaxed_topk relax greedy rows: not counted per position
        interval, relaxed_rate_is = [None, None], "greedy rows relax (not counted per position)"
    else:
        interval = [0.0, 0.0]
    point = interval[0] if interval[0] == interval[1] else None
    row = {
        "dataset": dataset,
        "policy": policy,
        "tolerance": ears.get("tolerance", 0.0)
        if "tolerance" in get_policy(ears["policy"]).params and "budget" not in ears
        else None,
        "budget": ears.get("budget"),  # a deviation budget (control.budget): the tolerance is found online
        "budget_scope": ears.get("budget_scope", "request") if ears.get("budget") is not None else None,
        "temperature": temperature,
        "mean_acceptance_length": 1 + total("accepted") / drafts,
        "acceptance_rate": total("accepted") / max(total("draft_tokens"), 1),
        "acceptance_per_position": [a / drafts for a in per_position],
        "relaxed_per_draft": total("relaxed") / max(total("random_drafts"), 1),
        # Relaxed acceptances per verified position (None where only an interval is known, see below); what it is
        # as a total-variation distance, from the registry; and the added TV itself, only where it equals it.
        "relaxed_per_verified": point,
        "relaxed_per_verified_interval": interval,
        "verified_counted": all("random_verified" in result for _, result in items),
        # The second axis: the target's -log p of the relaxed acceptances per verified position (nats), from the
        # plugin's exact count; None for runs made before it was counted.
        "relaxed_surprisal_per_verified": _relaxed_surprisal(point, most, items),
        "relaxed_rate_is": relaxed_rate_is,
        "added_tv_per_verified": point if relaxed_rate_is == RELAXED_RATE_LABELS["added_tv"] else None,
        "output_tokens_per_s": total("output_tokens") / elapsed,
        # What drafting costs per output token: draft tokens proposed (vLLM's counter), target positions verified
        # (the drafts and the one position past them, per request and step), and, where the drafter was patched
        # (adasd), its batched forward passes and the share of the k-per-proposal passes it skipped.
        "drafted_per_token": total("draft_tokens") / max(total("output_tokens"), 1),
        "target_positions_per_token": (total("draft_tokens") + total("drafts")) / max(total("output_tokens"), 1),
        "draft_passes_per_token": passes / max(total("output_tokens"), 1) if proposals else None,
        "draft_passes_skipped": 1 - passes / (proposals * items[0][0]["k"]) if proposals else None,
        "requests_per_s": len(texts) / elapsed,
        "num_prompts": len(texts),
        # Outputs that ended on their own; a truncated GSM8K answer cannot be scored as right.
        "finished": sum(reason == "stop" for reason in finish_reasons) / len(texts),
        "distinct_4grams": sum(map(datasets.distinct_ngram_fraction, texts)) / len(texts),
        "accuracy": None,
    }
    if dataset == "gsm8k":
        answers = [answer for spec, _ in items for answer in spec["answers"]]
        correct = [datasets.gsm8k_correct(t, a) for t, a in zip(texts, answers, strict=True)]
        row["accuracy"] = sum(correct) / len(correct)
    return row


def _relaxed_surprisal(relaxed_rate: float | None, verified: int, items: list[tuple[dict, dict]]) -> float | None:
    """The target's -log p of the relaxed acceptances per verified position (nats): 0 where nothing was relaxed,
    None where the relaxed rate is not a point or a run predates the count."""
    if relaxed_rate == 0.0:
        return 0.0
    if relaxed_rate is None or not all("relaxed_surprisal_micronats" in result for _, result in items):
        return None
    return sum(result["relaxed_surprisal_micronats"] for _, result in items) / MICRONATS_PER_NAT / verified


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| dataset | T | policy | mean acceptance length | accepted / draft | relaxed per verified position "
        "| which is | their -log p per verified position | drafted / token | output tok/s | req/s | finished "
        "| distinct 4-grams | accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=_row_order):
        accuracy = "" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        surprisal = (
            "n/a" if r.get("relaxed_surprisal_per_verified") is None else f"{r['relaxed_surprisal_per_verified']:.4f}"
        )
        lines.append(
            f"| {r['dataset']} | {r['temperature']:g} | {r['policy']} | {r['mean_acceptance_length']:.3f} | "
            f"{r['acceptance_rate']:.3f} | {relaxed_cell(r)} | {r['relaxed_rate_is']} | {surprisal} | "
            f"{r.get('drafted_per_token', 0):.3f} | {r['output_tokens_per_s']:.2f} | "
            f"{r['requests_per_s']:.3f} | {r['finished']:.2f} | {r['distinct_4grams']:.3f} | {accuracy} |"
        )
    return "\n".join(lines)


def relaxed_cell(row: dict) -> str:
    """The relaxed rate as a point, or, for a run that did not record its verified positions and whose drafter
    proposed fewer than k drafts in some steps, the interval vLLM's counters allow (flagged)."""
    low, high = row["relaxed_per_verified_interval"]
    if low is None:
        return "n/a"
    if row["relaxed_per_verified"] is not None:
        return f"{row['relaxed_per_verified']:.4f}"
    return f"[{low:.4f}, {high:.4f}] (verified positions not recorded: the range vLLM's counters allow)"


def _row_order(row: dict) -> tuple:
    """The baseline first, then the other policies by name (so ears-0.1 before ears-0.3)."""
    return row["dataset"], row["temperature"], row["policy"] != BASELINE, row["policy"]


def paired_quality(out_dir: Path, policies: list[str] | None = None, baseline: str = BASELINE) -> list[dict]:
    """Each policy against ``baseline`` on the scored (GSM8K) problems both have finished, problem by problem.

    ``baseline_only`` / ``policy_only`` count the discordant problems (solved by one side only); the accuracy
    difference gets a 95% normal interval for paired proportions and an exact two-sided McNemar p-value.
    Unlike :func:`summarize`, each policy is paired with the baseline alone, so a policy that has run fewer
    shards does not shrink the others' comparisons.
    """
    correct: dict[tuple, dict[str, dict[tuple, bool]]] = defaultdict(lambda: defaultdict(dict))
    for run in _finished_runs(out_dir, policies):
        spec = run["spec"]
        if spec["dataset"] != "gsm8k":
            continue
        start = (spec.get("shard") or [0])[0]
        for result in run["results"]:
            scores = correct[(spec["dataset"], result["temperature"])][spec["policy_name"]]
            for i, (text, answer) in enumerate(zip(result["texts"], spec["answers"], strict=True)):
                scores[start + i] = datasets.gsm8k_correct(text, answer)
    rows = []
    for (dataset, temperature), by_policy in sorted(correct.items()):
        reference = by_policy.get(baseline)
        for policy, scores in sorted(by_policy.items()):
            if reference is None or policy == baseline:
                continue
            problems = sorted(reference.keys() & scores.keys())
            if problems:
                rows.append(_paired_row(dataset, temperature, policy, baseline, problems, reference, scores))
    return rows


def _paired_row(dataset, temperature, policy, baseline, problems, reference, scores) -> dict:
    n = len(problems)
    baseline_only = sum(reference[i] and not scores[i] for i in problems)
    policy_only = sum(scores[i] and not reference[i] for i in problems)
    difference = (policy_only - baseline_only) / n
    half_width = 1.96 * math.sqrt(max(baseline_only + policy_only - n * difference**2, 0.0)) / n
    discordant = baseline_only + policy_only
    tail = sum(math.comb(discordant, i) for i in range(min(baseline_only, policy_only) + 1)) / 2**discordant
    return {
        "dataset": dataset,
        "temperature": temperature,
        "policy": policy,
        "baseline": baseline,
        "num_problems": n,
        "baseline_accuracy": sum(reference[i] for i in problems) / n,
        "policy_accuracy": sum(scores[i] for i in problems) / n,
        "both_correct": sum(reference[i] and scores[i] for i in problems),
        "baseline_only": baseline_only,
        "policy_only": policy_only,
        "accuracy_difference": difference,
        "difference_ci95": [difference - half_width, difference + half_width],
        "mcnemar_p": min(1.0, 2 * tail),
    }


def paired_quality_table(pairs: list[dict]) -> str:
    lines = [
        "| dataset | T | policy vs baseline | problems | accuracy (baseline → policy) | solved by baseline only "
        "| by policy only | difference, 95% CI (points) | McNemar p |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in pairs:
        low, high = (100 * x for x in r["difference_ci95"])
        lines.append(
            f"| {r['dataset']} | {r['temperature']:g} | {r['policy']} vs {r['baseline']} | {r['num_problems']} | "
            f"{r['baseline_accuracy']:.3f} → {r['policy_accuracy']:.3f} | {r['baseline_only']} | "
            f"{r['policy_only']} | {100 * r['accuracy_difference']:+.1f} [{low:+.1f}, {high:+.1f}] | "
            f"{r['mcnemar_p']:.2f} |"
        )
    return "\n".join(lines)
