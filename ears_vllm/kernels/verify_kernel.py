"""Fused Triton verification step: target logits in, verified token ids out.

Never materialises the ``[num_tokens, V]`` probability tensor. Three launches:

1. ``_row_stats_kernel``   grid (num_tokens, num_splits): online-softmax statistics of each vocabulary
   split of each row — max logit ``m``, ``sum exp(x - m)``, ``sum exp(x - m) * x`` (for the entropy of
   the typical policy), the split's argmax and, for relaxed_topk, how many logits lie above the draft's.
   Splitting the vocabulary gives small batches enough programs to fill the GPU.
2. ``_accept_kernel``      grid (batch,): merges the splits of each draft position, so that
   ``p(d) = exp(x_d - M) / S``, ``max p = 1 / S`` and ``H(p) = log S + M - W / S`` come with no further
   pass over the vocabulary, then walks the request's drafts: the policy's branch (``PolicySpec.kernel_id``;
   FLy re-derives the native decision of the next W rows, and reads the row's k largest logits, taken on
   the host with ``torch.topk``: ``[num_tokens, k]``, no probability tensor), relaxed-acceptance count,
   accepted prefix, bonus token, and which row (if any) needs a recovered token.
3. ``_recover_kernel``     grid (batch, num_splits): only for requests whose recovered token is
   sampled — exponential race ``argmax(max(p - q, 0) / E)`` over each split; the host picks the
   winning split (first on ties, like ``torch.argmax``).

Semantics are those of :func:`ears_vllm.reference.verify_reference`, the oracle the tests compare
with; probabilities are recomputed from the logits in float32, so on the rare draws that fall within
float rounding of a threshold the two may differ in the last bit of ``p``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ears_vllm.kernels.shared import (
    ACCEPT_THRESHOLD_ACC,
    ACCEPT_THRESHOLD_SINGLE,
    ADASD,
    EARS,
    ERSD,
    FLY,
    FLY_ENTROPY_THRESHOLD,
    FRONTIER,
    FRONTIER_SCALE,
    MARS,
    MARS_THRESHOLD,
    MIN_RATIO,
    RELAXED_DELTA,
    RELAXED_TOPK,
    SGLANG,
    STANDARD,
    TYPICAL,
    TYPICAL_DELTA,
    TYPICAL_EPS,
    budget_fits,
    request_span,
)
from ears_vllm.policies import PolicySpec
from ears_vllm.policies.adasd import js_distance
from ears_vllm.reference import PLACEHOLDER_TOKEN_ID, VerifyResult, race_key_rows
from ears_vllm.step import VerifyStep, kernel_params

# The policies _accept_kernel has a branch for (PolicySpec.kernel_id): a spec whose id is not here is refused at
# launch (accept_flags) and fails the kernel's static check, never runs as the standard rule.
BRANCHES = frozenset(c.value for c in (STANDARD, EARS, TYPICAL, FLY, SGLANG, RELAXED_TOPK, ADASD, ERSD, MARS, FRONTIER))


@triton.jit
def _row_stats_kernel(
    logits_ptr,  # [num_tokens, V]
    max_ptr,  # [num_tokens, num_splits] float32
    sumexp_ptr,  # [num_tokens, num_splits] float32
    xsumexp_ptr,  # [num_tokens, num_splits] float32: sum exp(x - m) * (x - m)
    argmax_val_ptr,  # [num_tokens, num_splits] float32
    argmax_idx_ptr,  # [num_tokens, num_splits] int32
    draft_ids_ptr,  # [num_tokens] (read when COUNT_RANK)
    rank_ptr,  # [num_tokens, num_splits] int32 out: logits strictly above the draft's (when COUNT_RANK)
    vocab_size,
    split_size,
    NUM_SPLITS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    COUNT_RANK: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    row_offset = row.to(tl.int64) * vocab_size  # int64: num_tokens * V may exceed 2^31
    split_start = split * split_size
    split_end = tl.minimum(split_start + split_size, vocab_size)
    rank = tl.zeros((), tl.int32)
    if COUNT_RANK:
        draft_id = tl.maximum(tl.load(draft_ids_ptr + row).to(tl.int64), 0)
        x_d = tl.load(logits_ptr + row_offset + draft_id).to(tl.float32)

    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    w = tl.zeros((), tl.float32)
    best = tl.full((), float("-inf"), tl.float32)
    best_idx = split_start
    for start in range(split_start, split_end, BLOCK_SIZE):
        offs = start + tl.arange(0, BLOCK_SIZE)
        mask = offs < split_end
        x = tl.load(logits_ptr + row_offset + offs, mask=mask, other=float("-inf")).to(tl.float32)
        block_max, block_arg = tl.max(x, axis=0, return_indices=True)
        if block_max > best:  # strict: the first maximum wins, as torch.argmax
            best = block_max
            best_idx = start + block_arg
        if COUNT_RANK:
            rank += tl.sum((mask & (x > x_d)).to(tl.int32), axis=0)
        new_m = tl.maximum(m, block_max)
        if new_m > float("-inf"):
            scale = tl.where(m > float("-inf"), tl.exp(m - new_m), 0.0)
            e = tl.where(mask & (x > float("-inf")), tl.exp(x - new_m), 0.0)
            # Rebase the running sums from m to new_m: sum e^(x-new_m) (x-new_m) = scale * (w + (m-new_m) s).
            w = scale * (w + tl.where(m > float("-inf"), m - new_m, 0.0) * s) + tl.sum(
                e * tl.where(e > 0, x - new_m, 0.0), axis=0
            )
            s = s * scale + tl.sum(e, axis=0)
            m = new_m
    out = row * NUM_SPLITS + split
    tl.store(max_ptr + out, m)
    tl.store(sumexp_ptr + out, s)
    tl.store(xsumexp_ptr + out, w)
    tl.store(argmax_val_ptr + out, best)
    tl.store(argmax_idx_ptr + out, best_idx)
    if COUNT_RANK:
        tl.store(rank_ptr + out, rank)


@triton.jit
def _merged_row(
    max_ptr,
    sumexp_ptr,
    xsumexp_ptr,
    argmax_val_ptr,
    argmax_idx_ptr,
    row,
    NUM_SPLITS: tl.constexpr,
    SPLITS_POW2: tl.constexpr,
):
    """A row's statistics merged over its splits: max logit M, sum exp(x - M), sum exp(x - M)(x - M), argmax."""
    split_offs = tl.arange(0, SPLITS_POW2)
    split_mask = split_offs < NUM_SPLITS
    stats = row * NUM_SPLITS + split_offs
    ms = tl.load(max_ptr + stats, mask=split_mask, other=float("-inf"))
    big_m = tl.max(ms, axis=0)
    alive = split_mask & (ms > float("-inf"))
    rescale = tl.where(alive, tl.exp(ms - big_m), 0.0)
    split_s = tl.load(sumexp_ptr + stats, mask=split_mask, other=0.0)
    split_w = tl.load(xsumexp_ptr + stats, mask=split_mask, other=0.0)
    big_s = tl.sum(split_s * rescale, axis=0)
    big_w = tl.sum(rescale * (split_w + tl.where(alive, ms - big_m, 0.0) * split_s), axis=0)
    best_vals = tl.load(argmax_val_ptr + stats, mask=split_mask, other=float("-inf"))
    best_split = tl.argmax(best_vals, axis=0)  # first split holding the maximum
    target_argmax = tl.load(argmax_idx_ptr + row * NUM_SPLITS + best_split)
    return big_m, big_s, big_w, target_argmax


@triton.jit
def _native_decision(
    logits_ptr,
    draft_ids_ptr,
    draft_probs_ptr,
    uniform_ptr,
    max_ptr,
    sumexp_ptr,
    xsumexp_ptr,
    argmax_val_ptr,
    argmax_idx_ptr,
    row,
    is_greedy,
    vocab_size,
    NO_DRAFT_PROBS: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_POW2: tl.constexpr,
):
    """vLLM's own decision at a draft row (argmax match on greedy rows, the standard test on random rows), with
    what the policies read there."""
    big_m, big_s, big_w, target_argmax = _merged_row(
        max_ptr=max_ptr,
        sumexp_ptr=sumexp_ptr,
        xsumexp_ptr=xsumexp_ptr,
        argmax_val_ptr=argmax_val_ptr,
        argmax_idx_ptr=argmax_idx_ptr,
        row=row,
        NUM_SPLITS=NUM_SPLITS,
        SPLITS_POW2=SPLITS_POW2,
    )
    draft_id = tl.load(draft_ids_ptr + row).to(tl.int64)
    valid = draft_id >= 0
    safe_id = tl.where(valid, draft_id, 0)
    x_d = tl.load(logits_ptr + row.to(tl.int64) * vocab_size + safe_id).to(tl.float32)
    p_d = tl.where(valid & (x_d > float("-inf")), tl.exp(x_d - big_m) / big_s, 0.0)
    q_d = 1.0  # a one-hot draft
    if not NO_DRAFT_PROBS:
        q_d = tl.load(draft_probs_ptr + row.to(tl.int64) * vocab_size + safe_id).to(tl.float32)
    u = tl.load(uniform_ptr + row)
    standard = valid & (q_d > 0) & (p_d / q_d >= u)
    native = tl.where(is_greedy, valid & (draft_id == target_argmax), standard)
    return native, standard, valid, draft_id, x_d, p_d, q_d, u, big_m, big_s, big_w, target_argmax


@triton.jit
def _next_drafts_pass(
    logits_ptr,
    draft_ids_ptr,
    draft_probs_ptr,
    uniform_ptr,
    max_ptr,
    sumexp_ptr,
    xsumexp_ptr,
    argmax_val_ptr,
    argmax_idx_ptr,
    row,
    window,
    passes,
    is_greedy,
    vocab_size,
    NO_DRAFT_PROBS: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_POW2: tl.constexpr,
):
    """``passes``, and whether vLLM's own decision accepts each of the ``window`` draft rows after ``row`` (FLy's
    deferral and the frontier rule's relaxation both wait on them; the caller checks they exist). ``passes`` comes
    in as a boolean tensor so that the loop carries one type when compiled."""
    for offset in range(1, window + 1):
        ahead = _native_decision(
            logits_ptr=logits_ptr,
            draft_ids_ptr=draft_ids_ptr,
            draft_probs_ptr=draft_probs_ptr,
            uniform_ptr=uniform_ptr,
            max_ptr=max_ptr,
            sumexp_ptr=sumexp_ptr,
            xsumexp_ptr=xsumexp_ptr,
            argmax_val_ptr=argmax_val_ptr,
            argmax_idx_ptr=argmax_idx_ptr,
            row=row + offset,
            is_greedy=is_greedy,
            vocab_size=vocab_size,
            NO_DRAFT_PROBS=NO_DRAFT_PROBS,
            NUM_SPLITS=NUM_SPLITS,
            SPLITS_POW2=SPLITS_POW2,
        )
        passes = passes & ahead[0]
    return passes


@triton.jit
def _accept_kernel(
    logits_ptr,  # [num_tokens, V]
    draft_ids_ptr,  # [num_tokens]
    draft_probs_ptr,  # [num_tokens, V] or a dummy when NO_DRAFT_PROBS
    offsets_ptr,  # [batch + 1] int64: request i's drafts are rows offsets[i] .. offsets[i + 1] - 1
    bonus_ptr,  # [batch]
    is_greedy_ptr,  # [batch] int8
    uniform_ptr,  # [num_tokens] float64
    tolerance_ptr,  # [batch] float64
    budget_ptr,  # [batch] float64: deviation budget B, 0 = none (read when HAS_BUDGET)
    budget_slack_ptr,  # [batch] float64: B * verified - relaxed before this step
    params_ptr,  # [len(KernelParam)] float64: the settings, read at their KernelParam offsets (names in kernels.shared)
    max_ptr,  # [num_tokens, num_splits]
    sumexp_ptr,  # [num_tokens, num_splits]
    xsumexp_ptr,  # [num_tokens, num_splits]
    argmax_val_ptr,  # [num_tokens, num_splits]
    argmax_idx_ptr,  # [num_tokens, num_splits]
    rank_ptr,  # [num_tokens, num_splits] int32: logits above the draft's, per split (relaxed_topk)
    top_logits_ptr,  # [num_tokens, FLY_TOP_K] the largest logits of each row (fly)
    relax_ptr,  # [num_tokens] int8: JS(p, q) <= the request's learnt threshold (adasd), taken on the host
    race_winner_ptr,  # [num_tokens] int64: the target's race winner (ersd), from _race_winner_kernel
    margin_ptr,  # [num_tokens, 2] float32: the two largest logits of each row (mars), taken on the host
    row_max_ptr,  # [num_tokens] out: merged max logit M
    row_sumexp_ptr,  # [num_tokens] out: merged sum exp(x - M)
    out_tokens_ptr,  # [batch, max_spec_len + 1] int32, prefilled with -1
    num_accepted_ptr,  # [batch] int32
    num_relaxed_ptr,  # [batch] int32
    relaxed_surprisal_ptr,  # [batch] float32: -log p(d) of the relaxed drafts of a sampled request, summed
    recover_row_ptr,  # [batch] int64: row whose recovered token is still to be sampled, or -1
    vocab_size,
    max_spec_len,
    relaxed_topk,
    fly_window,
    frontier_window,
    POLICY: tl.constexpr,  # PolicySpec.kernel_id, one of BRANCHES (the flags below: PolicySpec.kernel_flags)
    GREEDY_ROWS: tl.constexpr,  # greedy rows take the policy's rule, not argmax match (fly, relaxed_topk)
    EXACT_ACCEPTANCES: tl.constexpr,  # no acceptance counts as relaxed (a keyed race: ersd)
    ARGMAX_RECOVERY: tl.constexpr,  # the policy emits the target argmax on rejection (typical)
    RACE_RECOVERY: tl.constexpr,  # the policy emits the target's race winner on rejection (ersd)
    NO_DRAFT_PROBS: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_POW2: tl.constexpr,
    FLY_TOP_K: tl.constexpr,
    HAS_BUDGET: tl.constexpr,
):
    req = tl.program_id(0)
    start, num_draft = request_span(offsets_ptr, req)
    is_greedy = tl.load(is_greedy_ptr + req) != 0
    tolerance = tl.load(tolerance_ptr + req)
    out_row = out_tokens_ptr + req * (max_spec_len + 1)
    split_offs = tl.arange(0, SPLITS_POW2)
    split_mask = split_offs < NUM_SPLITS

    rejected = False
    accepted_count = tl.zeros((), tl.int32)
    relaxed_count = tl.zeros((), tl.int32)
    relaxed_surprisal = tl.zeros((), tl.float32)
    for pos in range(num_draft):
        if not rejected:
            row = start + pos
            native, standard, valid, draft_id, x_d, p_d, q_d, u, big_m, big_s, big_w, target_argmax = _native_decision(
                logits_ptr=logits_ptr,
                draft_ids_ptr=draft_ids_ptr,
                draft_probs_ptr=draft_probs_ptr,
                uniform_ptr=uniform_ptr,
                max_ptr=max_ptr,
                sumexp_ptr=sumexp_ptr,
                xsumexp_ptr=xsumexp_ptr,
                argmax_val_ptr=argmax_val_ptr,
                argmax_idx_ptr=argmax_idx_ptr,
                row=row,
                is_greedy=is_greedy,
                vocab_size=vocab_size,
                NO_DRAFT_PROBS=NO_DRAFT_PROBS,
                NUM_SPLITS=NUM_SPLITS,
                SPLITS_POW2=SPLITS_POW2,
            )
            tl.store(row_max_ptr + row, big_m)
            tl.store(row_sumexp_ptr + row, big_s)
            max_p = 1.0 / big_s
            if POLICY == EARS:
                relaxation = tolerance * (1.0 - max_p.to(tl.float64))
                threshold = tl.maximum(u - relaxation, tl.load(params_ptr + MIN_RATIO))
                policy_accept = standard | (valid & (q_d > 0) & (p_d > 0) & (p_d / q_d >= threshold))
            elif POLICY == TYPICAL:
                entropy = tl.log(big_s) - big_w / big_s
                eps = tl.load(params_ptr + TYPICAL_EPS).to(tl.float32)
                delta = tl.load(params_ptr + TYPICAL_DELTA).to(tl.float32)
                policy_accept = valid & (p_d > tl.minimum(delta * tl.exp(-entropy), eps))
            elif POLICY == FLY:  # defer a gated rejection when the next fly_window drafts pass natively
                top = tl.load(top_logits_ptr + row * FLY_TOP_K + tl.arange(0, FLY_TOP_K))
                top_p = tl.where(top > float("-inf"), tl.exp(top - big_m) / big_s, 0.0)
                fly_entropy = -tl.sum(top_p * tl.log(tl.where(top_p > 0, top_p, 1.0)), axis=0)
                unmasked = tl.where(is_greedy, x_d > float("-inf"), (p_d > 0) & (q_d > 0))
                can_defer = (
                    ~native
                    & valid
                    & unmasked
                    & (pos + fly_window < num_draft)
                    & (fly_entropy >= tl.load(params_ptr + FLY_ENTROPY_THRESHOLD).to(tl.float32))
                )
                if can_defer:
                    can_defer = _next_drafts_pass(
                        logits_ptr=logits_ptr,
                        draft_ids_ptr=draft_ids_ptr,
                        draft_probs_ptr=draft_probs_ptr,
                        uniform_ptr=uniform_ptr,
                        max_ptr=max_ptr,
                        sumexp_ptr=sumexp_ptr,
                        xsumexp_ptr=xsumexp_ptr,
                        argmax_val_ptr=argmax_val_ptr,
                        argmax_idx_ptr=argmax_idx_ptr,
                        row=row,
                        window=fly_window,
                        passes=can_defer,
                        is_greedy=is_greedy,
                        vocab_size=vocab_size,
                        NO_DRAFT_PROBS=NO_DRAFT_PROBS,
                        NUM_SPLITS=NUM_SPLITS,
                        SPLITS_POW2=SPLITS_POW2,
                    )
                policy_accept = native | can_defer
            elif POLICY == SGLANG:  # u <= p(d) / max(acc, 1e-9), or p(d) >= single; q unread
                acc = tl.maximum(tl.load(params_ptr + ACCEPT_THRESHOLD_ACC), 1e-9)
                single = tl.load(params_ptr + ACCEPT_THRESHOLD_SINGLE).to(tl.float32)
                policy_accept = (u <= p_d.to(tl.float64) / acc) | (p_d >= single)
            elif POLICY == RELAXED_TOPK:  # native, or among the top-k with p(d) >= max p - delta, never masked
                rank = tl.sum(tl.load(rank_ptr + row * NUM_SPLITS + split_offs, mask=split_mask, other=0), axis=0)
                floor = max_p - tl.load(params_ptr + RELAXED_DELTA).to(tl.float32)
                candidate = (p_d > 0) & (rank < relaxed_topk) & ((p_d >= floor) | (rank == 0))
                policy_accept = native | (valid & candidate)
            elif POLICY == ADASD:  # native, or close enough in JS distance (the host's test)
                relax = tl.load(relax_ptr + row) != 0
                policy_accept = standard | (valid & relax & (p_d > 0) & (q_d > 0))
            elif POLICY == MARS:  # native, or the target's top-2 where z2 / z1 > theta (z1 > 0), never masked
                rank = tl.sum(tl.load(rank_ptr + row * NUM_SPLITS + split_offs, mask=split_mask, other=0), axis=0)
                z1 = tl.load(margin_ptr + row * 2)
                z2 = tl.load(margin_ptr + row * 2 + 1)
                theta = tl.load(params_ptr + MARS_THRESHOLD).to(tl.float32)
                low_margin = (z1 > 0) & (z2 > theta * z1)
                policy_accept = native | (valid & low_margin & (rank < 2) & (p_d > 0))
            elif POLICY == FRONTIER:  # EARS's relaxed test, taken when the next frontier_window drafts pass natively
                relaxation = tolerance * tl.load(params_ptr + FRONTIER_SCALE) * (1.0 - max_p.to(tl.float64))
                threshold = tl.maximum(u - relaxation, tl.load(params_ptr + MIN_RATIO))
                relaxable = (
                    ~standard
                    & valid
                    & (q_d > 0)
                    & (p_d > 0)
                    & (p_d / q_d >= threshold)
                    & (pos + frontier_window < num_draft)
                )
                if relaxable:
                    relaxable = _next_drafts_pass(
                        logits_ptr=logits_ptr,
                        draft_ids_ptr=draft_ids_ptr,
                        draft_probs_ptr=draft_probs_ptr,
                        uniform_ptr=uniform_ptr,
                        max_ptr=max_ptr,
                        sumexp_ptr=sumexp_ptr,
                        xsumexp_ptr=xsumexp_ptr,
                        argmax_val_ptr=argmax_val_ptr,
                        argmax_idx_ptr=argmax_idx_ptr,
                        row=row,
                        window=frontier_window,
                        passes=relaxable,
                        is_greedy=is_greedy,
                        vocab_size=vocab_size,
                        NO_DRAFT_PROBS=NO_DRAFT_PROBS,
                        NUM_SPLITS=NUM_SPLITS,
                        SPLITS_POW2=SPLITS_POW2,
                    )
                policy_accept = standard | relaxable
            elif POLICY == ERSD:  # the draft is the target's race winner
                policy_accept = valid & (draft_id == tl.load(race_winner_ptr + row))
            else:
                tl.static_assert(POLICY == STANDARD, "a PolicySpec.kernel_id with no branch in _accept_kernel")
                policy_accept = standard
            # Greedy rows: argmax match, unless the policy's source applies its rule there too (GREEDY_ROWS).
            accept = policy_accept & valid if GREEDY_ROWS else tl.where(is_greedy, native, policy_accept & valid)
            if HAS_BUDGET:  # a relaxed acceptance must fit in the slack plus B per position verified so far
                fits = budget_fits(
                    relaxed_before=relaxed_count,
                    slack=tl.load(budget_slack_ptr + req),
                    budget=tl.load(budget_ptr + req),
                    verified_through=pos + 1,
                )
                accept = accept & (native | fits)
            if accept:
                tl.store(out_row + pos, draft_id.to(tl.int32))
                accepted_count += 1
                if not EXACT_ACCEPTANCES:  # a race's acceptances are exact, whatever the standard test says
                    relaxed_count += (accept & ~native).to(tl.int32)
                    relaxed_surprisal += tl.where(~native & ~is_greedy, -tl.log(p_d), 0.0)
            else:
                rejected = True
                if is_greedy | ARGMAX_RECOVERY:
                    tl.store(out_row + pos, target_argmax.to(tl.int32))
                elif RACE_RECOVERY:  # the target's winner: the token a non-speculative race emits here
                    tl.store(out_row + pos, tl.load(race_winner_ptr + row).to(tl.int32))
                else:
                    tl.store(recover_row_ptr + req, row.to(tl.int64))
    if not rejected:
        tl.store(out_row + num_draft, tl.load(bonus_ptr + req).to(tl.int32))
    tl.store(num_accepted_ptr + req, accepted_count)
    tl.store(num_relaxed_ptr + req, relaxed_count)
    tl.store(relaxed_surprisal_ptr + req, relaxed_surprisal)


@triton.jit
def _recover_kernel(
    logits_ptr,  # [num_tokens, V]
    draft_ids_ptr,  # [num_tokens]
    draft_probs_ptr,  # [num_tokens, V] or a dummy
    inv_noise_ptr,  # [batch, V] 1 / Exp(1)
    row_max_ptr,  # [num_tokens]
    row_sumexp_ptr,  # [num_tokens]
    recover_row_ptr,  # [batch]
    score_ptr,  # [batch, num_splits] out: best score of the split
    index_ptr,  # [batch, num_splits] out: its token id
    vocab_size,
    split_size,
    NUM_SPLITS: tl.constexpr,
    NO_DRAFT_PROBS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    req = tl.program_id(0)
    split = tl.program_id(1)
    row = tl.load(recover_row_ptr + req)
    if row < 0:
        return
    big_m = tl.load(row_max_ptr + row)
    big_s = tl.load(row_sumexp_ptr + row)
    draft_id = tl.load(draft_ids_ptr + row)
    row_offset = row * vocab_size
    noise_offset = req.to(tl.int64) * vocab_size
    split_start = split * split_size
    split_end = tl.minimum(split_start + split_size, vocab_size)
    best = tl.full((), float("-inf"), inv_noise_ptr.dtype.element_ty)
    best_idx = split_start
    for start in range(split_start, split_end, BLOCK_SIZE):
        offs = start + tl.arange(0, BLOCK_SIZE)
        mask = offs < split_end
        x = tl.load(logits_ptr + row_offset + offs, mask=mask, other=float("-inf")).to(tl.float32)
        p = tl.where(x > float("-inf"), tl.exp(x - big_m) / big_s, 0.0)
        if NO_DRAFT_PROBS:
            residual = tl.where(offs == draft_id, 0.0, p)
        else:
            q = tl.load(draft_probs_ptr + row_offset + offs, mask=mask, other=0.0).to(tl.float32)
            residual = tl.maximum(p - q, 0.0)
        inv_noise = tl.load(inv_noise_ptr + noise_offset + offs, mask=mask, other=0.0)
        score = tl.where(mask, residual * inv_noise, float("-inf"))
        best, best_idx = _keep_best(score, start, best, best_idx)
    tl.store(score_ptr + req * NUM_SPLITS + split, best)
    tl.store(index_ptr + req * NUM_SPLITS + split, best_idx)


@triton.jit
def _keep_best(score, start, best, best_idx):
    """The running (best score, its token id) of a split after the block of tokens starting at ``start``; an
    earlier token keeps a tie (``torch.argmax``'s first index)."""
    block_best, block_arg = tl.max(score, axis=0, return_indices=True)
    better = block_best > best
    return tl.where(better, block_best, best), tl.where(better, start + block_arg, best_idx)


@triton.jit
def _race_winner_kernel(
    logits_ptr,  # [num_tokens, V]
    key_prefix_ptr,  # [num_tokens] int64 holding a uint32: murmur3 state after the row's seed and position
    score_ptr,  # [num_tokens, num_splits] float64 out: best logit - log E of the split
    index_ptr,  # [num_tokens, num_splits] int32 out: its token id
    vocab_size,
    split_size,
    NUM_SPLITS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """ERSD: each row's race winner ``argmax_x logit_x - log E_x`` over one vocabulary split, with the keys of
    ``ears_vllm.keys`` (the token id is the last word the hash mixes)."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    row_offset = row.to(tl.int64) * vocab_size
    prefix = tl.load(key_prefix_ptr + row).to(tl.uint32)
    split_start = split * split_size
    split_end = tl.minimum(split_start + split_size, vocab_size)
    best = tl.full((), float("-inf"), tl.float64)
    best_idx = split_start
    for start in range(split_start, split_end, BLOCK_SIZE):
        offs = start + tl.arange(0, BLOCK_SIZE)
        mask = offs < split_end
        x = tl.load(logits_ptr + row_offset + offs, mask=mask, other=float("-inf")).to(tl.float64)
        u = _murmur3_uniform(prefix, offs.to(tl.uint32)).to(tl.float64)
        score = tl.where(mask, x - tl.log(-tl.log(1.0 - u)), float("-inf"))
        best, best_idx = _keep_best(score, start, best, best_idx)
    tl.store(score_ptr + row * NUM_SPLITS + split, best)
    tl.store(index_ptr + row * NUM_SPLITS + split, best_idx)


@triton.jit
def _rotl32(x, shift: tl.constexpr):
    return (x << shift) | (x >> (32 - shift))


@triton.jit
def _murmur3_uniform(prefix, offset):  # uint32 state and token ids -> float32 in (0, 1), as ears_vllm.keys
    k = _rotl32(offset * tl.full((), 0xCC9E2D51, tl.uint32), 15) * tl.full((), 0x1B873593, tl.uint32)
    h = _rotl32(prefix ^ k, 13) * tl.full((), 5, tl.uint32) + tl.full((), 0xE6546B64, tl.uint32)
    h = h ^ tl.full((), 16, tl.uint32)
    h = (h ^ (h >> 16)) * tl.full((), 0x85EBCA6B, tl.uint32)
    h = (h ^ (h >> 13)) * tl.full((), 0xC2B2AE35, tl.uint32)
    h = h ^ (h >> 16)
    hi16 = (h >> 16).to(tl.float32)
    lo16 = (h & tl.full((), 0xFFFF, tl.uint32)).to(tl.float32)
    return hi16 * 1.52587890625e-05 + (lo16 + 0.5) * 2.3283064365386963e-10


def race_winners_triton(
    logits: torch.Tensor,  # [n, V] after temperature
    seed: torch.Tensor,  # [n] int64
    pos: torch.Tensor,  # [n] int64
    *,
    block_size: int = 1024,
) -> torch.Tensor:  # [n] int64
    """:func:`ears_vllm.policies.races.race_winners` on the device, one pass over each row's logits."""
    from ears_vllm.keys import murmur3_prefix

    num_rows, vocab_size = logits.shape
    if num_rows == 0:
        return torch.zeros(0, dtype=torch.long, device=logits.device)
    splits, split_size = _split_layout(num_rows, vocab_size, block_size)
    scores = torch.empty(num_rows, splits, dtype=torch.float64, device=logits.device)
    indices = torch.empty(num_rows, splits, dtype=torch.int32, device=logits.device)
    _race_winner_kernel[(num_rows, splits)](
        logits_ptr=logits.contiguous(),
        key_prefix_ptr=murmur3_prefix(seed, pos),
        score_ptr=scores,
        index_ptr=indices,
        vocab_size=vocab_size,
        split_size=split_size,
        NUM_SPLITS=splits,
        BLOCK_SIZE=block_size,
    )
    return _best_of_splits(scores, indices).long()


def _num_splits(num_rows: int, vocab_size: int, block_size: int, target_programs: int = 1024) -> int:
    """Enough programs to fill the device for small batches, none wasted for large ones."""
    blocks = triton.cdiv(vocab_size, block_size)
    return max(1, min(blocks, triton.cdiv(target_programs, max(num_rows, 1))))


def _split_layout(num_rows: int, vocab_size: int, block_size: int, num_splits: int | None = None) -> tuple[int, int]:
    """(number of vocabulary splits, tokens per split): whole blocks per split, no empty split."""
    splits = num_splits or _num_splits(num_rows, vocab_size, block_size)
    split_size = triton.cdiv(triton.cdiv(vocab_size, splits), block_size) * block_size
    return triton.cdiv(vocab_size, split_size), split_size


def _best_of_splits(
    scores: torch.Tensor,  # [rows, num_splits] each split's best score
    indices: torch.Tensor,  # [rows, num_splits] its token id
) -> torch.Tensor:  # [rows]
    """The token of each row's best split (the first split on ties, like ``torch.argmax``)."""
    return indices.gather(1, scores.argmax(dim=1, keepdim=True)).squeeze(1)


def accept_flags(spec: PolicySpec) -> dict[str, int | bool]:
    """The policy's constexprs for :func:`_accept_kernel` (``PolicySpec.kernel_flags``); ValueError for a kernel id
    the kernel has no branch for (a policy registered without its kernel branch), never the standard rule."""
    if spec.kernel_id not in BRANCHES:
        raise ValueError(
            f"policy {spec.name!r} has kernel_id {spec.kernel_id}, which has no branch in the fused kernel "
            f"(branches: {sorted(BRANCHES)}); add one to ears_vllm.kernels.verify_kernel._accept_kernel"
        )
    return spec.kernel_flags


def verify_triton(
    step: VerifyStep,
    *,
    block_size: int = 1024,
    num_splits: int | None = None,
) -> VerifyResult:
    """The step verified by the fused kernel; same contract as :func:`ears_vllm.reference.verify_reference`.
    ``block_size``: tokens per block of a vocabulary pass; ``num_splits``: vocabulary splits per row (None: enough
    programs to fill the device)."""
    num_tokens, vocab_size = step.target_logits.shape
    batch_size, device = step.batch_size, step.target_logits.device
    logits = step.target_logits.contiguous()  # [num_tokens, V]
    draft_probs = step.draft_probs.contiguous() if step.draft_probs is not None else None  # [num_tokens, V] or None
    splits, split_size = _split_layout(num_tokens, vocab_size, block_size, num_splits)

    token_ids = torch.full((batch_size, step.max_spec_len + 1), PLACEHOLDER_TOKEN_ID, dtype=torch.int32, device=device)
    num_accepted = torch.zeros(batch_size, dtype=torch.int32, device=device)
    num_relaxed = torch.zeros(batch_size, dtype=torch.int32, device=device)
    relaxed_surprisal = torch.zeros(batch_size, dtype=torch.float32, device=device)
    if batch_size == 0:
        return VerifyResult(token_ids, num_accepted, num_relaxed, relaxed_surprisal)

    spec = step.policy
    flags = accept_flags(spec)
    rows = max(num_tokens, 1)
    stats = _row_stats(logits, step.draft_token_ids, spec, splits, split_size, block_size)
    inputs = _policy_inputs(step, logits, draft_probs, block_size)
    row_max = torch.empty(rows, dtype=torch.float32, device=device)  # [rows]
    row_sumexp = torch.empty_like(row_max)  # [rows]
    recover_row = torch.full((batch_size,), -1, dtype=torch.int64, device=device)  # [batch]
    no_draft_probs = draft_probs is None
    draft_probs_arg = logits if no_draft_probs else draft_probs  # never read when NO_DRAFT_PROBS
    budget = step.budget
    _accept_kernel[(batch_size,)](
        logits_ptr=logits,
        draft_ids_ptr=step.draft_token_ids,
        draft_probs_ptr=draft_probs_arg,
        offsets_ptr=step.offsets,
        bonus_ptr=step.bonus_token_ids,
        is_greedy_ptr=step.is_greedy.to(torch.int8),
        uniform_ptr=step.uniform,
        tolerance_ptr=step.tolerance,
        budget_ptr=step.tolerance if budget is None else budget.rate,  # never read without HAS_BUDGET
        budget_slack_ptr=step.tolerance if budget is None else budget.slack,
        params_ptr=kernel_params(step.config, device),
        **stats,
        **inputs,
        row_max_ptr=row_max,
        row_sumexp_ptr=row_sumexp,
        out_tokens_ptr=token_ids,
        num_accepted_ptr=num_accepted,
        num_relaxed_ptr=num_relaxed,
        relaxed_surprisal_ptr=relaxed_surprisal,
        recover_row_ptr=recover_row,
        vocab_size=vocab_size,
        max_spec_len=step.max_spec_len,
        relaxed_topk=step.settings.get("relaxed_topk", 0),
        fly_window=step.settings.get("fly_window_size", 0),
        frontier_window=step.settings.get("frontier_window", 0),
        **flags,
        NO_DRAFT_PROBS=no_draft_probs,
        NUM_SPLITS=splits,
        SPLITS_POW2=triton.next_power_of_2(splits),
        FLY_TOP_K=inputs["top_logits_ptr"].shape[1],
        HAS_BUDGET=budget is not None,
    )

    needs_recovery = recover_row >= 0
    if bool(needs_recovery.any()):
        inv_noise = step.inv_recovery_noise  # [batch, V]
        scores = torch.full((batch_size, splits), float("-inf"), dtype=inv_noise.dtype, device=device)
        indices = torch.zeros(batch_size, splits, dtype=torch.int32, device=device)
        _recover_kernel[(batch_size, splits)](
            logits_ptr=logits,
            draft_ids_ptr=step.draft_token_ids,
            draft_probs_ptr=draft_probs_arg,
            inv_noise_ptr=inv_noise.contiguous(),
            row_max_ptr=row_max,
            row_sumexp_ptr=row_sumexp,
            recover_row_ptr=recover_row,
            score_ptr=scores,
            index_ptr=indices,
            vocab_size=vocab_size,
            split_size=split_size,
            NUM_SPLITS=splits,
            NO_DRAFT_PROBS=no_draft_probs or spec.recovery == "one_hot_residual",
            BLOCK_SIZE=block_size,
        )
        recovered = _best_of_splits(scores, indices)
        rows = needs_recovery.nonzero().squeeze(1)
        token_ids[rows, num_accepted[rows].long()] = recovered[rows]
    return VerifyResult(token_ids, num_accepted, num_relaxed, relaxed_surprisal)


def _row_stats(
    logits: torch.Tensor,  # [num_tokens, V], contiguous
    draft_token_ids: torch.Tensor,  # [num_tokens]
    spec: PolicySpec,
    splits: int,
    split_size: int,
    block_size: int,
) -> dict[str, torch.Tensor]:  # _accept_kernel's statistics arguments, by name: [rows, splits] each
    """Each vocabulary split's statistics of each row (:func:`_row_stats_kernel`); the draft's rank among the logits
    where the policy's branch reads it (``draft_rank``)."""
    num_tokens, vocab_size = logits.shape
    rows, device = max(num_tokens, 1), logits.device
    count_rank = "draft_rank" in spec.kernel_inputs
    stats = dict(
        max_ptr=torch.empty(rows, splits, dtype=torch.float32, device=device),
        sumexp_ptr=torch.empty(rows, splits, dtype=torch.float32, device=device),
        xsumexp_ptr=torch.empty(rows, splits, dtype=torch.float32, device=device),
        argmax_val_ptr=torch.empty(rows, splits, dtype=torch.float32, device=device),
        argmax_idx_ptr=torch.empty(rows, splits, dtype=torch.int32, device=device),
        rank_ptr=torch.zeros(rows, splits if count_rank else 1, dtype=torch.int32, device=device),
    )
    if num_tokens:
        _row_stats_kernel[(num_tokens, splits)](
            logits_ptr=logits,
            **stats,
            draft_ids_ptr=draft_token_ids,
            vocab_size=vocab_size,
            split_size=split_size,
            NUM_SPLITS=splits,
            BLOCK_SIZE=block_size,
            COUNT_RANK=count_rank,
        )
    return stats


def _policy_inputs(
    step: VerifyStep,
    logits: torch.Tensor,  # [num_tokens, V], contiguous
    draft_probs: torch.Tensor | None,  # [num_tokens, V], contiguous, or None
    block_size: int,
) -> dict[str, torch.Tensor]:  # _accept_kernel's per-row policy inputs, by name
    """What the host computes per row for the policy's branch (``PolicySpec.kernel_inputs``, race winners for a keyed
    policy); placeholders the kernel never reads for the others."""
    num_tokens, device, spec = step.num_tokens, logits.device, step.policy
    rows = max(num_tokens, 1)
    # FLy's entropy reads the k largest logits of each row: [num_tokens, k], taken here (no probability tensor).
    fly_top_k = triton.next_power_of_2(step.settings.get("fly_entropy_top_k", 1))
    top_logits = torch.full((rows, fly_top_k), float("-inf"), dtype=torch.float32, device=device)
    if "top_logits" in spec.kernel_inputs and num_tokens:
        k = min(step.settings["fly_entropy_top_k"], logits.shape[1])
        top_logits[:num_tokens, :k] = torch.topk(logits.float(), k, dim=-1).values

    relax = torch.zeros(rows, dtype=torch.int8, device=device)
    if "js_relax" in spec.kernel_inputs and num_tokens:  # AdaSD's JS distance: [num_tokens, V] probabilities
        req_of_token, _ = step.rows
        js = js_distance(logits.softmax(dim=-1, dtype=torch.float32), step.draft_token_ids.long(), draft_probs)
        tau = step.tolerance[req_of_token]
        relax[:num_tokens] = ((tau > 0) & (js.double() <= tau)).to(torch.int8)

    margin = torch.zeros(rows, 2, dtype=torch.float32, device=device)
    if "margin_logits" in spec.kernel_inputs and num_tokens:  # MARS's z1, z2: [num_tokens, 2]
        margin[:num_tokens] = torch.topk(logits.float(), min(2, logits.shape[1]), dim=-1).values.expand(-1, 2)

    race_winner = torch.zeros(rows, dtype=torch.int64, device=device)
    if spec.keyed and num_tokens:
        seed, pos = race_key_rows(step.race_keys, step.num_draft_tokens)
        race_winner[:num_tokens] = race_winners_triton(logits, seed, pos, block_size=block_size)
    return dict(top_logits_ptr=top_logits, relax_ptr=relax, race_winner_ptr=race_winner, margin_ptr=margin)
