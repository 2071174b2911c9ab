"""Cache the teacher-forced target and draft logits of a finished bench e2e run's texts, once, for
scripts/frontier_grid.py (the forward passes of ``bench acceptance``, ``teacher_forced_logits``, kept on disk).

    python scripts/frontier_cache.py RUN.json TEMPERATURE OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ears_vllm.bench.acceptance import run_outputs, teacher_forced_logits

run, temperature, out = sys.argv[1], float(sys.argv[2]), Path(sys.argv[3])
out.mkdir(parents=True, exist_ok=True)
pairs = run_outputs([Path(run)], temperature)
torch.set_num_threads(2)
spec = json.loads(Path(run).read_text())["spec"]
print(spec["target"], spec["draft"], flush=True)
for role in ("target", "draft"):
    name = spec[role]
    tok = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).eval()
    for i, (p, c) in enumerate(pairs):
        f = out / f"{role}-{i}.pt"
        if not f.exists():
            torch.save(teacher_forced_logits(model, tok, p, c, True).to(torch.float32), f)
        print(role, i, flush=True)
    del model
