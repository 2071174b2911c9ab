"""Tables and plots for docs/results/frontier-*: bench acceptance's markdown table and Pareto plots, plus matched-rate
comparisons by linear interpolation along each policy family's curve (standard at rate 0 starts every curve)."""

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


def against(value: float | None, reference: float) -> str:
    return "out of its range" if value is None else f"{value:.3f} ({100 * (value / reference - 1):+.1f}% vs FLy)"


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
            "(interpolated) | EARS (interpolated) | MARS (interpolated) |",
            "|---|---|---|---|---|---|---|",
        ]
        for fly in [r for r in group if r["policy"] in ("fly", "fly-2-0.15")]:
            x, length = fly[axis], fly["expected_acceptance_length"]
            frontier = [interp(curve(rs, axis, base), x) for f, rs in families.items() if f.startswith("frontier")]
            frontier = [v for v in frontier if v is not None]
            ears = interp(curve(families.get("ears", []), axis, base), x)
            mars = interp(curve(families.get("mars", []), axis, base), x)
            rate = fly["relaxed_per_verified_position"]
            bound = f"{min(base / (1 - 4 * rate), base + 16 * rate):.3f}" if axis == AXES[0][0] else ""
            best = max(frontier) if frontier else None
            lines.append(
                f"| {fly['policy']} | {x:.4f} | {bound} | {length:.3f} | {against(best, length)} | "
                f"{against(ears, length)} | {against(mars, length)} |"
            )
(out / "matched.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
