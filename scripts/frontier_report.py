"""Tables and plots for docs/results/frontier-*: bench acceptance's markdown table and Pareto plots, plus matched
comparisons at FLy's points: what each policy family reaches at no more deviation than FLy's (its curve, standard at
rate 0 first, interpolated linearly at FLy's value, or any of its points below that value that goes further)."""

import itertools
import json
import sys
from pathlib import Path

from ears_vllm.bench.acceptance import markdown_table
from ears_vllm.bench.plots import plot_pareto

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
rows = [r for path in sys.argv[2:] for r in json.loads(Path(path).read_text())]
(out / "acceptance.json").write_text(json.dumps(rows, indent=1))
(out / "acceptance.md").write_text(markdown_table(rows, 4) + "\n")
groups = {}
for r in rows:
    groups.setdefault(f"T={r['temperature']:g}, {r['draft_sampling']} drafts", []).append(r)
for key, label, name in (
    ("relaxed_per_verified_position", "relaxed acceptances per verified position", "pareto_relaxed.png"),
    (
        "relaxed_surprisal_per_verified_position",
        "relaxed drafts' -log p (nats) per verified position",
        "pareto_relaxed_surprisal.png",
    ),
):
    plot_pareto(groups, key, "expected_acceptance_length", label, "expected mean acceptance length (k=4)", out / name)


def family(r):
    if r["policy_kind"] == "frontier":
        return f"frontier W={r['policy'].split('-')[2] if r['policy'].count('-') >= 2 else 2}"
    return r["policy_kind"]


def interp(points: list[tuple[float, float]], x: float) -> float | None:
    """y at x on the piecewise-linear curve through ``points``; None outside its range."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else max(y0, y1)
    return None


def curve(rows: list[dict], axis: str, base: float) -> list[tuple[float, float]]:
    return [(0.0, base)] + [(r[axis], r["expected_acceptance_length"]) for r in rows]


def reach(points: list[tuple[float, float]], x: float) -> float | None:
    """The most the family reaches at a deviation of at most ``x``: its curve at ``x`` or any point of its at or
    below ``x`` (a point with less deviation and a longer acceptance length dominates); None past its range."""
    at = interp(points, x)
    below = [y for px, y in points if px <= x and px > 0]
    return max([v for v in (at, *below) if v is not None], default=None) if at is not None or below else None


def against(value: float | None, reference: float) -> str:
    return "out of its range" if value is None else f"{value:.4f} ({100 * (value / reference - 1):+.2f}% vs FLy)"


AXES = (
    ("relaxed_per_verified_position", "relaxed rate"),
    ("relaxed_surprisal_per_verified_position", "relaxed -log p per position"),
)
lines = []
for title, group in groups.items():
    base = next(r for r in group if r["policy"] == "standard")["expected_acceptance_length"]
    families = {}
    for r in group:
        if r["policy"] != "standard":
            families.setdefault(family(r), []).append(r)
    for axis, label in AXES:
        lines += [
            f"\n### {title}: at FLy's {label}\n",
            "| at (FLy setting) | value | bound min(L0/(1-4 rate), L0+16 rate) | FLy | best frontier rule "
            "(at most FLy's value) | EARS (at most FLy's value) | MARS (at most FLy's value) |",
            "|---|---|---|---|---|---|---|",
        ]
        for fly in [r for r in group if r["policy"] in ("fly", "fly-2-0.15")]:
            x, length = fly[axis], fly["expected_acceptance_length"]
            frontier = [reach(curve(rs, axis, base), x) for f, rs in families.items() if f.startswith("frontier")]
            frontier = [v for v in frontier if v is not None]
            ears = reach(curve(families.get("ears", []), axis, base), x)
            mars = reach(curve(families.get("mars", []), axis, base), x)
            rate = fly["relaxed_per_verified_position"]
            bound = f"{min(base / (1 - 4 * rate), base + 16 * rate):.3f}" if axis == AXES[0][0] else ""
            best = max(frontier) if frontier else None
            lines.append(
                f"| {fly['policy']} | {x:.4f} | {bound} | {length:.4f} | {against(best, length)} | "
                f"{against(ears, length)} | {against(mars, length)} |"
            )
(out / "matched.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
