"""The statistics launch of a split-statistics verifier (vLLM's Model Runner V2), extended for the walk's policies that
read more of the target row than max and sum-exp: typical's entropy and MARS's runner-up logit.

MRV2's own statistics launch (``rejection_sampler_utils._compute_local_logits_stats_kernel``) writes, per vocabulary
block of each draft row, the target's max and ``sum exp(l - max)`` (sampled rows; the draft's too with draft logits)
or its max and argmax (greedy rows). :func:`split_stats_kernel` writes exactly those, computed as vLLM computes them
(the same block loads, reductions and order, so the same bits; ``tests/test_vllm_mrv2_adapter.py`` holds them equal to
each release's own kernel), and beside them, in the same pass over the block:

* every row: the target's max, sum-exp and argmax (vLLM writes the first two on sampled rows only, the argmax on
  greedy rows only): typical recovers with the argmax on a sampled row, and MARS's ``p(d) > 0`` needs a greedy
  row's sum-exp;
* ``WITH_ENTROPY``: ``sum exp(l - max) * (l - max)`` per block, so the walk merges the entropy online with max and
  sum-exp, no second pass over the vocabulary: with the row's ``M = max_b m_b`` and ``lse``,
  ``H(p) = lse - M - sum_b exp(m_b - lse) * (w_b + (m_b - M) * s_b)`` where ``s_b``, ``w_b`` are the block's sums
  (:func:`ears_vllm.kernels.split_stats_accept._row_entropy`). Relative to the block max rather than the raw logit
  (``sum exp(l - m_b) * l``): the same entropy, without the cancellation of large logits in float32;
* ``WITH_RUNNER_UP``: the block's second-largest logit (the largest again where it occurs twice), so the row's two
  largest are merged in the walk: MARS's margin ``z2 / z1`` and its "top-2" test, ``l(d) >= z2``.

Launched instead of vLLM's only where a step's policies read these (``PolicySpec.kernel_inputs``
``block_entropy`` / ``block_runner_up``, :func:`ears_vllm.seam.vllm_mrv2.verify_mrv2`), so a step of the other
policies runs vLLM's own launch untouched: one launch either way, the same grid, the same loads (a copy of vLLM's
kernel kept equal to each release by a test, rather than a second pass over the vocabulary beside vLLM's).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ears_vllm.kernels.split_stats_accept import _draft_logits_row


@triton.jit
def _max_and_sumexp(logits):
    """vLLM's ``_compute_max_and_sumexp``, expression for expression."""
    block_max = tl.max(logits, axis=0)
    sumexp = tl.where(block_max > float("-inf"), tl.sum(tl.exp(logits - block_max)), 0.0)
    return block_max, sumexp


@triton.jit
def split_stats_kernel(
    target_local_argmax_ptr,  # [num_logits, num_blocks] int64: every row (vLLM: greedy rows)
    target_local_argmax_stride,
    target_local_max_ptr,  # [num_logits, num_blocks] float32
    target_local_max_stride,
    target_local_sumexp_ptr,  # [num_logits, num_blocks] float32: every row (vLLM: sampled rows)
    target_local_sumexp_stride,
    target_local_entropy_ptr,  # [num_logits, num_blocks] float32: sum exp(l - max) * (l - max) (WITH_ENTROPY)
    target_local_runner_up_ptr,  # [num_logits, num_blocks] float32: the second-largest logit (WITH_RUNNER_UP)
    target_local_extra_stride,  # the row stride of the two above
    draft_local_max_ptr,  # [num_logits, num_blocks] float32 (sampled rows with HAS_DRAFT_LOGITS)
    draft_local_max_stride,
    draft_local_sumexp_ptr,  # [num_logits, num_blocks] float32
    draft_local_sumexp_stride,
    target_logits_ptr,  # [num_logits, V], after temperature
    target_logits_stride,
    draft_logits_ptr,  # [rows, k, V], before temperature (read with HAS_DRAFT_LOGITS)
    draft_logits_stride_0,
    draft_logits_stride_1,
    draft_logits_row_mapping_ptr,  # [max_num_reqs] int32 or None: a request's row in draft_logits (vLLM 0.34)
    expanded_idx_mapping_ptr,  # [num_logits]: each row's request state index
    expanded_local_pos_ptr,  # [num_logits]: each row's position in its request (0 starts a request)
    temp_ptr,  # [max_num_reqs]
    vocab_size,
    num_logits,
    BLOCK_SIZE: tl.constexpr,  # vLLM's statistics block (seam.vllm_mrv2.VOCAB_BLOCK_SIZE)
    HAS_DRAFT_LOGITS: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    WITH_RUNNER_UP: tl.constexpr,
):
    logit_idx = tl.program_id(0).to(tl.int64)
    next_local_pos = tl.load(expanded_local_pos_ptr + logit_idx + 1, mask=logit_idx + 1 < num_logits, other=0)
    if next_local_pos == 0:  # a request's bonus row: the walk reads no statistics of it (vLLM skips it too)
        return
    draft_step_idx = tl.load(expanded_local_pos_ptr + logit_idx)
    req_state_idx = tl.load(expanded_idx_mapping_ptr + logit_idx).to(tl.int64)
    temp = tl.load(temp_ptr + req_state_idx).to(tl.float32)

    block_idx = tl.program_id(1)
    block_offsets = block_idx * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = block_offsets < vocab_size
    target_logits = tl.load(
        target_logits_ptr + logit_idx * target_logits_stride + block_offsets,
        mask=mask,
        other=float("-inf"),
    ).to(tl.float32)
    value, idx = tl.max(target_logits, axis=0, return_indices=True)  # vLLM's greedy rows
    target_max, target_sumexp = _max_and_sumexp(target_logits)  # vLLM's sampled rows
    tl.store(target_local_argmax_ptr + logit_idx * target_local_argmax_stride + block_idx, block_idx * BLOCK_SIZE + idx)
    tl.store(target_local_max_ptr + logit_idx * target_local_max_stride + block_idx, value)
    tl.store(target_local_sumexp_ptr + logit_idx * target_local_sumexp_stride + block_idx, target_sumexp)
    extra = logit_idx * target_local_extra_stride + block_idx
    if WITH_ENTROPY:
        exps = tl.exp(target_logits - target_max)  # 0 where masked (and everywhere in an all-masked block)
        tl.store(target_local_entropy_ptr + extra, tl.sum(tl.where(exps > 0, exps * (target_logits - target_max), 0.0)))
    if WITH_RUNNER_UP:
        runner_up = tl.max(tl.where(tl.arange(0, BLOCK_SIZE) == idx, float("-inf"), target_logits), axis=0)
        tl.store(target_local_runner_up_ptr + extra, runner_up)

    if HAS_DRAFT_LOGITS and temp != 0.0:  # the draft's statistics, as vLLM's sampled rows
        draft_row = _draft_logits_row(req_state_idx, draft_logits_row_mapping_ptr)
        draft_logits = (
            tl.load(
                draft_logits_ptr
                + draft_row * draft_logits_stride_0
                + draft_step_idx * draft_logits_stride_1
                + block_offsets,
                mask=mask,
                other=float("-inf"),
            ).to(tl.float32)
            / temp
        )
        draft_max, draft_sumexp = _max_and_sumexp(draft_logits)
        tl.store(draft_local_max_ptr + logit_idx * draft_local_max_stride + block_idx, draft_max)
        tl.store(draft_local_sumexp_ptr + logit_idx * draft_local_sumexp_stride + block_idx, draft_sumexp)
