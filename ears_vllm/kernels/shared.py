"""What the fused kernel (:mod:`.verify_kernel`) and the MRV2 walk (:mod:`.split_stats_accept`) share on the device.

* the step arithmetic: the twins of :mod:`ears_vllm.step`'s host functions (the same expressions, in the same
  float64 order; ``tests/test_kernels.py`` holds them equal);
* the policies' branch ids (``PolicySpec.kernel_id``) by name, so that a kernel reads ``POLICY == EARS``;
* the offsets of the fused kernel's parameter vector (:class:`ears_vllm.step.KernelParam`) by name.

Triton reads a module constant only as a constexpr; each is declared once, in the registry or in
:mod:`ears_vllm.step`, and bound here.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ears_vllm.policies import POLICIES
from ears_vllm.step import KernelParam

# Branch ids, PolicySpec.kernel_id by name. A kernel refuses at launch an id it has no branch for (its BRANCHES).
STANDARD: tl.constexpr = tl.constexpr(POLICIES["standard"].kernel_id)
EARS: tl.constexpr = tl.constexpr(POLICIES["ears"].kernel_id)
TYPICAL: tl.constexpr = tl.constexpr(POLICIES["typical"].kernel_id)
FLY: tl.constexpr = tl.constexpr(POLICIES["fly"].kernel_id)
SGLANG: tl.constexpr = tl.constexpr(POLICIES["sglang"].kernel_id)
RELAXED_TOPK: tl.constexpr = tl.constexpr(POLICIES["relaxed_topk"].kernel_id)
ADASD: tl.constexpr = tl.constexpr(POLICIES["adasd"].kernel_id)
ERSD: tl.constexpr = tl.constexpr(POLICIES["ersd"].kernel_id)
MARS: tl.constexpr = tl.constexpr(POLICIES["mars"].kernel_id)
FRONTIER: tl.constexpr = tl.constexpr(POLICIES["frontier"].kernel_id)

# The fused kernel's parameter vector: offsets, read by name (Triton reads module constants only as constexprs).
MIN_RATIO: tl.constexpr = tl.constexpr(int(KernelParam.MIN_RATIO))
TYPICAL_EPS: tl.constexpr = tl.constexpr(int(KernelParam.TYPICAL_EPS))
TYPICAL_DELTA: tl.constexpr = tl.constexpr(int(KernelParam.TYPICAL_DELTA))
ACCEPT_THRESHOLD_ACC: tl.constexpr = tl.constexpr(int(KernelParam.ACCEPT_THRESHOLD_ACC))
ACCEPT_THRESHOLD_SINGLE: tl.constexpr = tl.constexpr(int(KernelParam.ACCEPT_THRESHOLD_SINGLE))
RELAXED_DELTA: tl.constexpr = tl.constexpr(int(KernelParam.RELAXED_DELTA))
FLY_ENTROPY_THRESHOLD: tl.constexpr = tl.constexpr(int(KernelParam.FLY_ENTROPY_THRESHOLD))
MARS_THRESHOLD: tl.constexpr = tl.constexpr(int(KernelParam.MARS_THRESHOLD))
FRONTIER_SCALE: tl.constexpr = tl.constexpr(int(KernelParam.FRONTIER_SCALE))


@triton.jit
def request_span(offsets_ptr, req):
    """(first row, number of rows) of request ``req`` in a flattened batch; ``offsets_ptr``: ``[batch + 1]``, the
    layout of :func:`ears_vllm.step.request_offsets` (and of vLLM's ``cu_num_logits``)."""
    start = tl.load(offsets_ptr + req).to(tl.int64)
    return start, tl.load(offsets_ptr + req + 1) - start


@triton.jit
def budget_fits(relaxed_before, slack, budget, verified_through):
    """:func:`ears_vllm.step.budget_fits` for one position: a relaxed acceptance keeps ``relaxed <= slack + B *
    verified`` (``budget`` 0: no cap). ``relaxed_before`` int32, ``slack`` and ``budget`` float64."""
    return ((relaxed_before + 1).to(tl.float64) <= slack + budget * verified_through) | (budget == 0)


@triton.jit
def verified_positions(num_accepted, num_drafts):
    """:func:`ears_vllm.step.verified_positions` for one request (int64): the accepted drafts and the first rejected
    one, if any."""
    return num_accepted + (num_accepted < num_drafts).to(tl.int64)
