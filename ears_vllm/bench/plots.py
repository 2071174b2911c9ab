"""PNG plots of benchmark results (matplotlib, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

from ears_vllm.policies import POLICIES


def pyplot():
    """matplotlib's pyplot on the Agg backend (files, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path, dpi: int = 120) -> Path:
    """Lay out, write and close ``fig``; returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def plot_e2e(rows: list[dict], out_dir: Path) -> list[Path]:
    plt = pyplot()

    written = []
    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for temperature in sorted({r["temperature"] for r in rows if r["dataset"] == dataset}):
            points = sorted(
                (r["tolerance"], r["mean_acceptance_length"])
                for r in rows
                if r["dataset"] == dataset and r["temperature"] == temperature and r["tolerance"] is not None
            )
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=f"T={temperature:g}")
        ax.set(title=dataset, xlabel="EARS tolerance (0 = standard)", ylabel="mean acceptance length")
        ax.grid(alpha=0.3)
        ax.legend()
    written.append(save(fig, out_dir / "acceptance_length_vs_tolerance.png"))

    # The price of each policy's acceptance in distribution, every policy on it (typical has no tolerance). The
    # relaxed rate is the added TV only for some policies (each row's ``relaxed_rate_is``); rows known only as an
    # interval are left out.
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for temperature in sorted({r["temperature"] for r in rows if r["dataset"] == dataset}):
            group = [
                r
                for r in rows
                if r["dataset"] == dataset and r["temperature"] == temperature and r["relaxed_per_verified"] is not None
            ]
            ax.scatter(
                [r["relaxed_per_verified"] for r in group],
                [r["mean_acceptance_length"] for r in group],
                label=f"T={temperature:g}",
            )
            for r in group:
                ax.annotate(
                    f"{r['policy']} ({r['relaxed_rate_is']})",
                    (r["relaxed_per_verified"], r["mean_acceptance_length"]),
                    fontsize=7,
                    textcoords="offset points",
                    xytext=(4, 4),
                )
        ax.set(title=dataset, xlabel="relaxed acceptances per verified position", ylabel="mean acceptance length")
        ax.grid(alpha=0.3)
        ax.legend()
    written.append(save(fig, out_dir / "acceptance_length_vs_added_tv.png"))

    scored = [r for r in rows if r["accuracy"] is not None]
    if scored:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for temperature in sorted({r["temperature"] for r in scored}):
            group = [r for r in scored if r["temperature"] == temperature]
            # 95% binomial interval of each accuracy: with ~100 problems it spans about +-9 points.
            spread = [1.96 * math.sqrt(r["accuracy"] * (1 - r["accuracy"]) / r["num_prompts"]) for r in group]
            ax.errorbar(
                [r["mean_acceptance_length"] for r in group],
                [r["accuracy"] for r in group],
                yerr=spread,
                fmt="o",
                capsize=3,
                label=f"T={temperature:g} (95% interval)",
            )
            for r in group:
                ax.annotate(
                    r["policy"],
                    (r["mean_acceptance_length"], r["accuracy"]),
                    fontsize=8,
                    textcoords="offset points",
                    xytext=(4, 4),
                )
        ax.set(xlabel="mean acceptance length", ylabel="GSM8K accuracy", title="quality vs acceptance")
        ax.grid(alpha=0.3)
        ax.legend()
        written.append(save(fig, out_dir / "accuracy_vs_acceptance_length.png"))
    return written


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats: none has a larger y at the same or smaller x (x = deviation, lower is
    better; y = acceptance length, higher is better), sorted by x."""
    best, kept = -math.inf, []
    for x, y in sorted(points, key=lambda point: (point[0], -point[1])):
        if y > best:
            kept.append((x, y))
            best = y
    return kept


def plot_pareto(
    groups: dict[str, list[dict]],
    x_key: str | dict[str, str],
    y_key: str,
    xlabel: str,
    ylabel: str,
    path: Path,
    *,
    x_higher_better: bool = False,
) -> Path:
    """One panel per group (a dataset, a temperature, a drafting mode): every policy and setting a point, labelled,
    and the frontier drawn through the points no other point beats (y higher is better; x lower is better, a
    deviation, unless ``x_higher_better``, a quality). ``x_key`` may differ per group (a dict by group title).
    Rows whose x is None are left out (and the caller says why, e.g. no closed form)."""
    plt = pyplot()

    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
    for ax, (title, rows) in zip(axes[0], groups.items(), strict=True):
        x_name = x_key[title] if isinstance(x_key, dict) else x_key
        rows = [r | {"_x": r[x_name]} for r in rows if r.get(x_name) is not None and r.get(y_key) is not None]
        x_key_here = "_x"
        kinds = sorted({r.get("policy_kind", r["policy"].split("-")[0]) for r in rows})
        for kind in kinds:
            group = [r for r in rows if r.get("policy_kind", r["policy"].split("-")[0]) == kind]
            color = f"C{list(POLICIES).index(kind)}" if kind in POLICIES else None  # one colour per policy
            ax.scatter([r[x_key_here] for r in group], [r[y_key] for r in group], label=kind, color=color)
        for r in rows:
            ax.annotate(r["policy"], (r[x_key_here], r[y_key]), fontsize=7, textcoords="offset points", xytext=(4, 3))
        sign = -1 if x_higher_better else 1
        edge = [(sign * x, y) for x, y in frontier([(sign * r[x_key_here], r[y_key]) for r in rows])]
        if edge:
            ax.scatter(*zip(*edge, strict=True), s=140, facecolors="none", edgecolors="k", alpha=0.6)
            ax.step(
                *zip(*edge, strict=True),
                where="pre" if x_higher_better else "post",
                color="k",
                alpha=0.4,
                label="frontier",
            )
        ax.set(title=title, xlabel=xlabel if isinstance(x_key, str) else f"{xlabel} ({x_name})", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save(fig, path)


def plot_budget(rows: list[dict], path: Path) -> Path:
    """Deviation budgets: the realised relaxed acceptances per verified position against the budget asked (at or
    under the diagonal is kept), each point labelled with the mean acceptance length it bought."""
    plt = pyplot()

    rows = [
        r
        for r in rows
        if r.get("budget") is not None and r["temperature"] > 0 and r["relaxed_per_verified"] is not None
    ]
    fig, ax = plt.subplots(figsize=(5.5, 4.5))

    def group_of(row: dict) -> tuple:
        return row["dataset"], row["temperature"], row.get("budget_scope") or "request"

    for n, group in enumerate(sorted({group_of(r) for r in rows})):
        points = sorted(
            (r["budget"], r["relaxed_per_verified"], r["mean_acceptance_length"]) for r in rows if group_of(r) == group
        )
        asked, realised, _ = zip(*points, strict=True)
        ax.plot(asked, realised, marker="o", color=f"C{n}", label=f"{group[0]}, T={group[1]:g}, per {group[2]}")
        for x, y, a in points:
            ax.annotate(f"accept. length {a:.2f}", (x, y), fontsize=7, textcoords="offset points", xytext=(4, -10))
    top = max(r["budget"] for r in rows) * 1.1
    ax.plot([0, top], [0, top], color="k", alpha=0.4, linestyle="--", label="realised = asked")
    ax.set(
        xlabel="budget asked (relaxed acceptances per verified position)",
        ylabel="realised relaxed per verified position",
        xlim=(0, top),
        ylim=(0, top),
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save(fig, path)


def plot_rss(memory: dict[str, list[tuple[float, float]]], path: Path) -> Path:
    """Each server's resident memory (MiB, its process tree) against time under load, one line per policy."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, samples in memory.items():
        if samples:
            ax.plot([t / 60 for t, _ in samples], [mib for _, mib in samples], label=name)
    ax.set_xlabel("minutes under load")
    ax.set_ylabel("server RSS, MiB (process tree)")
    ax.set_ylim(bottom=0)
    ax.set_title("vllm serve memory under bench load")
    ax.legend()
    ax.grid(alpha=0.3)
    return save(fig, path)
