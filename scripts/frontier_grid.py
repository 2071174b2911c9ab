"""``bench acceptance``'s rows for a policy grid, on logits cached by scripts/frontier_cache.py: the same per-position
forms (``position_acceptance``) and chained rows (``_row``), without redoing the forward passes per grid.

    python scripts/frontier_grid.py CACHE_DIR TEMPERATURE POLICIES [SAMPLINGS [MAX_TEXTS [OUT.json]]]
"""

import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

from ears_vllm.bench.acceptance import _row, position_acceptance
from ears_vllm.bench.e2e import parse_policies
from ears_vllm.config import EarsConfig

cache, temperature, policies_text = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
samplings = sys.argv[4].split(",") if len(sys.argv) > 4 else ["greedy"]
limit = int(sys.argv[5]) if len(sys.argv) > 5 else 10**9
torch.set_num_threads(1)
policies = parse_policies(policies_text)
configs = {n: EarsConfig.from_dict(s) for n, s in policies.items()}
forms = defaultdict(list)
n = len(list(cache.glob("draft-*.pt")))
for i in range(min(n, limit)):
    t = torch.load(cache / f"target-{i}.pt")
    d = torch.load(cache / f"draft-{i}.pt")
    top2 = torch.topk(t, 2, dim=-1).values
    p = (t.double() / temperature).softmax(-1)
    for s in samplings:
        for name, c in configs.items():
            forms[(s, name)].append(position_acceptance(p, d, temperature, s, c, top2))
rows = [_row(name, configs[name], temperature, s, per, 4) for (s, name), per in forms.items()]
base = {r["draft_sampling"]: r["expected_acceptance_length"] for r in rows if r["policy"] == "standard"}
for r in rows:
    mean = r["relaxed_mean_surprisal"]
    gain = (r["expected_acceptance_length"] - base.get(r["draft_sampling"], float("nan"))) / max(
        r["relaxed_per_verified_position"], 1e-9
    )
    print(
        f"{r['draft_sampling']:13s} {r['policy']:40s} L={r['expected_acceptance_length']:.3f} "
        f"rate={r['relaxed_per_verified_position']:.4f} nll/pos={r['relaxed_surprisal_per_verified_position']:.4f} "
        f"mean_nll={mean if mean is None else round(mean, 2)} dL/rate={gain:.2f}",
        flush=True,
    )
if len(sys.argv) > 6:
    Path(sys.argv[6]).write_text(json.dumps(rows, indent=1))
