"""What one verification step on Model Runner V2 launches, per policy: counted, not timed.

A launch count does not depend on the device (the same Python makes the same ``kernel[grid](...)`` calls whether
Triton compiles them or interprets them), so it is measured here under Triton's interpreter on a CPU as well as on a
GPU (``ears-vllm gpu-check`` writes it beside its checks: ``launches.md``, ``launches.json``). Two counts per step:

* Triton launches (our walk, vLLM's statistics, resampling and insertion launches, any kernel of ours), by kernel;
* torch operations that compute (every ATen call made inside the step, views and allocations excluded): on a GPU
  each launches at least one kernel (FLy's top-k entropy, for one, is a few of them).

vLLM's own ``rejection_sample`` on the same step is the first row, the baseline each policy's row is read against.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
from collections.abc import Iterator
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

# One setting per policy that relaxes (as ``bench e2e --policies`` writes them); a policy MRV2 cannot run is listed
# with the reason (its registry runners).
MRV2_POLICIES = (
    "standard,ears:0.3,typical,fly,sglang:accept_threshold_acc=0.5,relaxed_topk,adasd,mars,frontier:0.5,ersd"
)

# ATen operations that allocate or reinterpret memory without computing (no kernel launch on a GPU).
NOT_COMPUTING = frozenset(("empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "detach"))


class _Launching:
    """Whether a Triton launch is running: what Triton's interpreter does with torch inside one is not the step's."""

    depth = 0


@contextlib.contextmanager
def counting_launches() -> Iterator[collections.Counter[str]]:
    """Every Triton launch made inside, by kernel name (compiled or interpreted; warm-ups not counted)."""
    import triton.runtime.interpreter as interpreter
    import triton.runtime.jit as jit

    counts: collections.Counter[str] = collections.Counter()
    classes = (jit.JITFunction, interpreter.InterpretedFunction)
    originals = {cls: cls.run for cls in classes}

    def counted(original: Any) -> Any:
        def run(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
            if not warmup:
                counts[getattr(self, "__name__", None) or self.fn.__name__] += 1
            _Launching.depth += 1
            try:
                return original(self, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                _Launching.depth -= 1

        return run

    for cls, original in originals.items():
        cls.run = counted(original)
    try:
        yield counts
    finally:
        for cls, original in originals.items():
            cls.run = original


class _CountingOps(TorchDispatchMode):
    """ATen operations that compute, by name (:data:`NOT_COMPUTING` and views left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if not _Launching.depth and not func.is_view and name not in NOT_COMPUTING:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def count_step(call: Any) -> dict[str, Any]:
    """Run ``call`` once: its Triton launches (total and by kernel) and computing torch operations."""
    ops = _CountingOps()
    with counting_launches() as launches, ops:
        call()
    return {
        "triton_launches": sum(launches.values()),
        "torch_ops": sum(ops.counts.values()),
        "kernels": dict(sorted(launches.items())),
    }


def mrv2_launches(step: dict[str, Any], policies: str = MRV2_POLICIES) -> list[dict[str, Any]]:
    """For one MRV2 step (``step``: ``verify_mrv2``'s arguments, e.g. :func:`ears_vllm.bench.steps.mrv2_batch`),
    vLLM's own ``rejection_sample`` and ears-vllm's ``verify_mrv2`` under each of ``policies``: a row each."""
    from ears_vllm.bench.e2e import parse_policies
    from ears_vllm.config import EarsConfig
    from ears_vllm.policies import get_policy
    from ears_vllm.seam import vllm_mrv2

    vllm_rejection_sample = importlib.import_module(vllm_mrv2.UTILS_MODULE).rejection_sample
    arguments = vllm_mrv2.vllm_arguments(step, vllm_rejection_sample)
    rows = [{"impl": "vllm-mrv2", **count_step(lambda: vllm_rejection_sample(**arguments))}]
    for label, settings in parse_policies(policies).items():
        config = EarsConfig.from_dict(settings)
        spec = get_policy(config.policy)
        if "MRV2" not in spec.runners:
            rows.append({"impl": f"ears-vllm {label}", "note": f"not on MRV2 (runners: {', '.join(spec.runners)})"})
            continue
        rows.append(
            {"impl": f"ears-vllm {label}", **count_step(lambda c=config: vllm_mrv2.verify_mrv2(**step, config=c))}
        )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| implementation | Triton launches | torch ops (computing) | by kernel |",
        "|---|---|---|---|",
    ]
    for row in rows:
        if "note" in row:
            lines.append(f"| {row['impl']} | | | {row['note']} |")
            continue
        kernels = ", ".join(f"{name} {count}" for name, count in row["kernels"].items())
        lines.append(f"| {row['impl']} | {row['triton_launches']} | {row['torch_ops']} | {kernels} |")
    return "\n".join(lines)
