"""The acceptance walk in the layout of a split-statistics verifier (vLLM's Model Runner V2), for any policy.

A split-statistics verifier works in four launches: per-vocabulary-block logit statistics (max and
``sum exp`` per block, argmax for greedy rows), a per-request acceptance walk, residual resampling of
the rejected or bonus token, and its insertion. Only the walk depends on the acceptance policy, so this
module is only the walk; the caller runs the other three launches and supplies the randomness. Where a branch
reads more of a row than those statistics (typical's entropy, MARS's runner-up), the caller's statistics launch is
ours (:mod:`.split_stats`): the same values, and those per-block terms beside them, merged here.

Terms, per request (one program each): drafts sit at ``draft_sampled[start + i + 1]`` for
``i < num_drafts``; ``lse`` is the row's log-sum-exp merged from its block statistics; target logits
arrive after temperature, draft logits before it (divided here). The uniform of position ``pos`` is
``UNIFORM(seed, pos, False)``: a counter-based draw in (0, 1), so it does not depend on the batch.

Policies (``POLICY`` = ``PolicySpec.kernel_id``; the rules are the registry's, ``ears_vllm.policies.rules``). With
``PER_ROW_POLICY`` each request takes the branch of its own id (``policy_ptr``, by request state index), so one
batch mixes them; without it ``POLICY`` is a constexpr and the compiled walk holds its branch only:

* standard (0): ``log p(d) > log u + log q(d)``, written exactly as the split-statistics verifier writes it,
  so the result is bit-identical to it.
* ears (1): also accepted when ``p(d) > 0``, ``q(d) > 0`` and ``p(d) / q(d) >= max(u - t, min_ratio)`` with
  ``t = tolerance * (1 - max p)``; ``t = 0`` never relaxes.
* fly (3): MRV2's FLy window state machine: a native rejection whose top-k entropy (``fly_entropy_ptr``,
  computed as vLLM computes it) reaches the threshold becomes *pending*; the accepted prefix and the
  rejected row's statistics stay frozen until ``fly_window`` further native acceptances confirm it (then it
  counts as relaxed) or a native rejection ends the walk at the pending row. Greedy rows take part.
* sglang (4): ``u <= p(d) / max(acc, 1e-9)`` or ``p(d) >= single``, q unread (the caller resamples from p
  without the draft).
* relaxed_topk (5): the native decision, or the draft a relaxed candidate (among the target's top-k with
  ``p(d) >= max p - delta``), tested here in one pass over the row's logits where the native test rejects (MRV2's
  statistics carry no sum-exp for greedy rows, nor any rank); greedy rows too.
* typical (2): ``p(d) > min(typical_eps, typical_delta * exp(-H(p)))`` on sampled rows, ``H(p)`` merged from the
  blocks' entropy terms (``target_local_entropy_ptr``; :func:`_row_entropy`); greedy rows by argmax match. On a
  rejection it writes the target's argmax (every row's, from :mod:`.split_stats`) as a greedy row's, and leaves the
  request's insertion temperature 0 (``insert_temp_ptr``), so MRV2's insertion launch keeps it; a placeholder draft
  is a rejection like any other (the argmax is emitted there too).
* mars (8): the native decision, or, where it rejects, the draft among the row's two largest logits at a low-margin
  position (``z1 > 0`` and ``z2 > mars_threshold * z1``), never a masked draft: ``z1``, ``z2`` merged from the blocks'
  max and runner-up (``target_local_runner_up_ptr``; :func:`_row_top2`), ``d`` among them iff ``l(d) >= z2``;
  greedy rows too (their sum-exp, for ``p(d) > 0``, from :mod:`.split_stats`).
* frontier (9): FLy's window state machine above, opened by EARS's relaxed test (its tolerance times
  ``frontier_scale``) instead of the entropy gate: a native rejection that passes it (sampled rows) becomes pending
  and is confirmed by ``frontier_window`` further native acceptances (window 0: at once); greedy rows by argmax
  match.
* adasd (6): the native decision, or ``JS(p, q) <= tau`` with ``p(d) > 0`` and ``q(d) > 0``, ``tau`` the request's
  learnt threshold (:class:`ears_vllm.policies.adasd.LearntThreshold`: the midpoint of the running means of the JS
  distance at natively accepted and natively rejected verified positions, none before both sides are seen and
  separate). Its exact sums and counts live per request slot on the device (``adasd_sums_ptr``,
  ``adasd_counts_ptr``): read at the start of the walk (the step's threshold), each verified position of a sampled
  row added in order, stored at the end (no host synchronisation). The JS distance is computed at every verified
  position (the threshold learns from each): in closed form from ``p(d)`` with one-hot drafts, else in one pass
  over the row's target and draft logits (``JS_BLOCK_SIZE`` at a time). A placeholder draft (-1) is no draft: the
  walk ends there and learns nothing from it. Greedy rows are verified by argmax match and learn nothing (as on
  V1, docs/adasd.md).

A relaxed acceptance is one the native test rejected; they are the row's ``num_relaxed``. With ``HAS_BUDGET``
(ears, relaxed_topk, mars, fly and frontier: at the pending rejection, the relaxed acceptance it becomes if
confirmed; as the fused kernel caps it where it decides it), each request's relaxed acceptances are capped by its
deviation budget as :mod:`ears_vllm.control.budget` says, and its slack is charged at the end of the walk (on the
device: the ledger costs no host synchronisation).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ears_vllm.kernels.shared import (
    ADASD,
    EARS,
    FLY,
    FRONTIER,
    MARS,
    RELAXED_TOPK,
    SGLANG,
    STANDARD,
    TYPICAL,
    budget_fits,
    request_span,
    verified_positions,
)
from ears_vllm.policies import PolicySpec

# The policies the walk has a branch for (PolicySpec.kernel_id); the others are refused at launch (walk_policy).
# ersd runs its own walk (seam.vllm_mrv2.verify_races_mrv2).
BRANCHES = frozenset(c.value for c in (STANDARD, EARS, FLY, SGLANG, RELAXED_TOPK, TYPICAL, ADASD, MARS, FRONTIER))
LOG2_E: tl.constexpr = tl.constexpr(1.4426950408889634)  # log2(e): the JS divergence is in bits


def walk_policy(spec: PolicySpec, relaxes: bool) -> int:
    """The walk's ``POLICY`` constexpr for ``spec``: its kernel id, or the standard rule's when no request of the step
    relaxes (the lossless settings, bit-identical to vLLM's walk); ValueError for an id the walk has no branch for."""
    if spec.kernel_id not in BRANCHES:
        raise ValueError(
            f"policy {spec.name!r} has kernel_id {spec.kernel_id}, which has no branch in the MRV2 walk "
            f"(branches: {sorted(BRANCHES)})"
        )
    return spec.kernel_id if relaxes else STANDARD.value


@triton.jit
def _count_relaxed(num_relaxed, relaxed_surprisal, relaxed, target_logprob):
    """The row's relaxed acceptances and their target -log p, with this position's (if ``relaxed``) counted."""
    return num_relaxed + relaxed.to(tl.int32), relaxed_surprisal + tl.where(relaxed, -target_logprob, 0.0)


@triton.jit
def _budget_allows(num_relaxed, budget_slack, budget, verified_through, HAS_BUDGET: tl.constexpr):
    """Whether one more relaxed acceptance fits the request's deviation budget (:func:`budget_fits`), the slack plus
    B per position verified so far; always, without a budget."""
    fits = True
    if HAS_BUDGET:
        fits = budget_fits(
            relaxed_before=num_relaxed,
            slack=budget_slack,
            budget=budget,
            verified_through=verified_through,
        )
    return fits


@triton.jit
def _row_max_and_lse(local_max_ptr, local_sumexp_ptr, stride, row, num_blocks, PADDED_NUM_BLOCKS: tl.constexpr):
    blocks = tl.arange(0, PADDED_NUM_BLOCKS)
    mask = blocks < num_blocks
    maxes = tl.load(local_max_ptr + row * stride + blocks, mask=mask, other=float("-inf"))
    sumexps = tl.load(local_sumexp_ptr + row * stride + blocks, mask=mask, other=0.0)
    row_max = tl.max(maxes, axis=0)
    return row_max, row_max + tl.log(tl.sum(sumexps * tl.exp(maxes - row_max)))


@triton.jit
def _row_argmax(
    local_max_ptr, local_argmax_ptr, max_stride, argmax_stride, row, num_blocks, PADDED_NUM_BLOCKS: tl.constexpr
):
    blocks = tl.arange(0, PADDED_NUM_BLOCKS)
    maxes = tl.load(local_max_ptr + row * max_stride + blocks, mask=blocks < num_blocks, other=float("-inf"))
    maxes = tl.where(maxes != maxes, float("-inf"), maxes)  # a NaN block must not win (or index the padding)
    best_block = tl.argmax(maxes, axis=0)
    return tl.load(local_argmax_ptr + row * argmax_stride + best_block).to(tl.int64)


@triton.jit
def _row_entropy(
    local_max_ptr,
    local_sumexp_ptr,
    local_entropy_ptr,
    stride,
    extra_stride,
    row,
    num_blocks,
    PADDED_NUM_BLOCKS: tl.constexpr,
):
    """H(p) of a row, merged from its blocks' max ``m_b``, ``s_b = sum exp(l - m_b)`` and ``w_b = sum exp(l - m_b)
    (l - m_b)`` (:mod:`.split_stats`, ``WITH_ENTROPY``): with ``M = max m_b``, ``S = sum s_b e^(m_b - M)`` and
    ``W = sum e^(m_b - M) (w_b + (m_b - M) s_b)``, ``H = log S - W / S`` (the fused kernel's ``_merged_row``)."""
    blocks = tl.arange(0, PADDED_NUM_BLOCKS)
    mask = blocks < num_blocks
    maxes = tl.load(local_max_ptr + row * stride + blocks, mask=mask, other=float("-inf"))
    sumexps = tl.load(local_sumexp_ptr + row * stride + blocks, mask=mask, other=0.0)
    terms = tl.load(local_entropy_ptr + row * extra_stride + blocks, mask=mask, other=0.0)
    row_max = tl.max(maxes, axis=0)
    alive = maxes > float("-inf")
    scale = tl.where(alive, tl.exp(maxes - row_max), 0.0)
    sumexp = tl.sum(sumexps * scale, axis=0)
    weighted = tl.sum(scale * (terms + tl.where(alive, maxes - row_max, 0.0) * sumexps), axis=0)
    return tl.log(sumexp) - weighted / sumexp


@triton.jit
def _row_top2(
    local_max_ptr,
    local_runner_up_ptr,
    stride,
    extra_stride,
    row,
    num_blocks,
    PADDED_NUM_BLOCKS: tl.constexpr,
):
    """The two largest logits ``(z1, z2)`` of a row (``z2 = z1`` where the largest occurs twice), merged from its
    blocks' max and runner-up (:mod:`.split_stats`, ``WITH_RUNNER_UP``): the row's second is the best block's
    runner-up or another block's max."""
    blocks = tl.arange(0, PADDED_NUM_BLOCKS)
    maxes = tl.load(local_max_ptr + row * stride + blocks, mask=blocks < num_blocks, other=float("-inf"))
    maxes = tl.where(maxes != maxes, float("-inf"), maxes)  # a NaN block must not win (or index the padding)
    best_block = tl.argmax(maxes, axis=0)
    others = tl.max(tl.where(blocks == best_block, float("-inf"), maxes), axis=0)
    runner_up = tl.load(local_runner_up_ptr + row * extra_stride + best_block)
    return tl.max(maxes, axis=0), tl.maximum(others, runner_up)


@triton.jit
def _ears_relaxable(tolerance, target_max, target_lse, target_logprob, draft_logprob, u, min_ratio):
    """EARS's relaxed test at a draft (before the native decision is taken out): ``t = tolerance * (1 - max p) > 0``,
    ``p(d) > 0``, ``q(d) > 0`` and ``p(d) / q(d) >= max(u - t, min_ratio)``, in the walk's log space."""
    relaxation = tolerance * (1.0 - tl.exp(target_max - target_lse))
    return (
        (relaxation > 0.0)
        & (target_logprob > float("-inf"))
        & (draft_logprob > float("-inf"))
        & (target_logprob - draft_logprob >= tl.log(tl.maximum(u - relaxation, min_ratio)))
    )


@triton.jit
def _relaxed_candidate(target_logits_ptr, stride, row, draft, vocab_size, topk, delta, VOCAB_BLOCK_SIZE: tl.constexpr):
    """:func:`ears_vllm.policies.relaxed_topk_candidate` for one row, in one pass over its target logits (online max
    and sum-exp beside the count of logits above the draft's): ``p(d) > 0``, fewer than ``topk`` logits above the
    draft's and ``p(d) >= max p - delta`` (the top-1 always). Greedy rows too (MRV2's statistics give them no
    sum-exp)."""
    draft_logit = tl.load(target_logits_ptr + row * stride + draft).to(tl.float32)
    above = tl.zeros((), tl.int64)
    row_max = tl.full((), float("-inf"), tl.float32)
    sumexp = tl.zeros((), tl.float32)
    for start in range(0, vocab_size, VOCAB_BLOCK_SIZE):
        block = start + tl.arange(0, VOCAB_BLOCK_SIZE)
        logits = tl.load(target_logits_ptr + row * stride + block, mask=block < vocab_size, other=float("-inf")).to(
            tl.float32
        )
        above += tl.sum((logits > draft_logit).to(tl.int64))
        new_max = tl.maximum(row_max, tl.max(logits))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # an all-masked prefix adds nothing
        sumexp = sumexp * tl.exp(row_max - safe_max) + tl.sum(tl.exp(logits - safe_max))
        row_max = new_max
    lse = row_max + tl.log(sumexp)
    target_prob = tl.exp(draft_logit - lse)
    threshold = tl.exp(row_max - lse) - delta
    return (target_prob > 0.0) & (above < topk) & ((target_prob >= threshold) | (above == 0))


@triton.jit
def _learnt_threshold(accepted_sum, accepted_count, rejected_sum, rejected_count):
    """:attr:`ears_vllm.policies.adasd.LearntThreshold.value` on the device (float64), 0 where it is None (no
    relaxation, ``NO_RELAXATION``): the midpoint of the two means once both sides are seen and the accepted mean is
    below the rejected one."""
    accepted = accepted_sum / tl.maximum(accepted_count, 1).to(tl.float64)
    rejected = rejected_sum / tl.maximum(rejected_count, 1).to(tl.float64)
    exists = (accepted_count > 0) & (rejected_count > 0) & (accepted < rejected)
    return tl.where(exists, (accepted + rejected) / 2, 0.0)


@triton.jit
def _js_distance(
    target_logprob,  # float32: log p(d)
    target_logits_ptr,  # [num_logits, V], after temperature
    target_logits_stride,
    row,
    target_lse,  # float32: the row's log-sum-exp
    draft_logits_ptr,  # [rows, k, V], before temperature (read with HAS_DRAFT_LOGITS)
    draft_offset,  # the row's draft logits in draft_logits_ptr
    temp,  # float32: the request's temperature (> 0)
    draft_lse,  # float32: the log-sum-exp of the draft logits / temp
    vocab_size,
    HAS_DRAFT_LOGITS: tl.constexpr,
    JS_BLOCK_SIZE: tl.constexpr,
):
    """:func:`ears_vllm.policies.divergence.js_distance` for one position (float32): with one-hot drafts in closed
    form from ``p(d)``; with draft logits in one pass over the row's target and draft logits, ``p log2(p / m) +
    q log2(q / m)`` summed with ``m = (p + q) / 2`` taken in log space."""
    if HAS_DRAFT_LOGITS:
        total = tl.zeros((), tl.float32)
        for start in range(0, vocab_size, JS_BLOCK_SIZE):
            block = start + tl.arange(0, JS_BLOCK_SIZE)
            mask = block < vocab_size
            log_p = tl.load(target_logits_ptr + row * target_logits_stride + block, mask=mask, other=float("-inf"))
            log_p = log_p.to(tl.float32) - target_lse
            log_q = tl.load(draft_logits_ptr + draft_offset + block, mask=mask, other=float("-inf"))
            log_q = log_q.to(tl.float32) / temp - draft_lse
            high = tl.maximum(log_p, log_q)
            high = tl.where(high == float("-inf"), 0.0, high)  # neither side has mass: no term
            log_m = high + tl.log(0.5 * (tl.exp(log_p - high) + tl.exp(log_q - high)))
            terms = tl.where(log_p > float("-inf"), tl.exp(log_p) * (log_p - log_m), 0.0)
            terms += tl.where(log_q > float("-inf"), tl.exp(log_q) * (log_q - log_m), 0.0)
            total += tl.sum(terms)
        divergence = 0.5 * LOG2_E * total
    else:
        p = tl.exp(target_logprob)
        kl_p = (1.0 - p) + tl.where(p > 0.0, p * tl.log2(2.0 * p / (1.0 + p)), 0.0)
        kl_q = tl.log2(2.0 / (1.0 + p))
        divergence = 0.5 * (kl_p + kl_q)
    return tl.sqrt(tl.minimum(tl.maximum(divergence, 0.0), 1.0))


@triton.jit
def _draft_logits_row(req_state_idx, row_mapping_ptr):
    """The row of a request's draft logits: its request state index, or under a sharded cache (``row_mapping_ptr``
    not None) the row the mapping gives it; a request this rank does not hold (-1) reads row 0, whose draws its
    placeholder drafts never reach (vLLM's own launches clamp the same way)."""
    row = req_state_idx
    if row_mapping_ptr is not None:
        row = tl.load(row_mapping_ptr + req_state_idx).to(tl.int64)
    return tl.maximum(row, 0)


@triton.jit
def split_stats_accept_kernel(
    sampled_ptr,  # [num_reqs, k + 1] int64: accepted drafts, then the greedy recovered token
    sampled_stride,
    num_accepted_ptr,  # [num_reqs] int32
    num_relaxed_ptr,  # [num_reqs] int32
    relaxed_surprisal_ptr,  # [num_reqs] float32: the target's -log p of the relaxed drafts, summed (0 greedy rows)
    target_rejected_lse_ptr,  # [num_reqs] float32: lse of the rejected row, for resampling
    draft_rejected_lse_ptr,  # [num_reqs] float32
    target_logits_ptr,  # [num_logits, V], after temperature
    target_logits_stride,
    target_local_argmax_ptr,  # [num_logits, num_blocks] int64 (greedy rows)
    target_local_argmax_stride,
    target_local_max_ptr,  # [num_logits, num_blocks] float32
    target_local_sumexp_ptr,  # [num_logits, num_blocks] float32
    target_local_stride,
    target_local_entropy_ptr,  # [num_logits, num_blocks] float32 (typical; .split_stats, WITH_ENTROPY)
    target_local_runner_up_ptr,  # [num_logits, num_blocks] float32 (mars; .split_stats, WITH_RUNNER_UP)
    target_local_extra_stride,
    draft_sampled_ptr,  # [num_logits]: the input token of each row; -1 = placeholder, rejected
    draft_logits_ptr,  # [rows, k, V], before temperature (unused without HAS_DRAFT_LOGITS)
    draft_logits_stride_0,
    draft_logits_stride_1,
    draft_logits_row_mapping_ptr,  # [max_num_reqs] int32: a request's row in draft_logits, or None: its state index
    draft_local_max_ptr,  # [num_logits, num_blocks] float32
    draft_local_sumexp_ptr,  # [num_logits, num_blocks] float32
    draft_local_stride,
    cu_num_logits_ptr,  # [num_reqs + 1]
    idx_mapping_ptr,  # [num_reqs]: request state index
    temp_ptr,  # [max_num_reqs]
    seed_ptr,  # [max_num_reqs]
    pos_ptr,  # [num_logits]
    fly_entropy_ptr,  # [num_logits] float32 (fly only)
    policy_ptr,  # [max_num_reqs] int32: each request's PolicySpec.kernel_id (read with PER_ROW_POLICY)
    tolerance_ptr,  # [max_num_reqs] float32: each request's ears tolerance
    budget_ptr,  # [max_num_reqs] float64: each request's deviation budget B, 0 = none (read when HAS_BUDGET)
    budget_slack_ptr,  # [max_num_reqs] float64: B * verified - relaxed so far; updated here after the walk
    adasd_sums_ptr,  # [max_num_reqs, 2] float64: JS distances summed at natively accepted, rejected positions
    adasd_counts_ptr,  # [max_num_reqs, 2] int64: how many of each (adasd's threshold; updated here; None: no adasd)
    insert_temp_ptr,  # [max_num_reqs] float32 out, or None: the temperature MRV2's insertion launch reads (0: keep)
    min_ratio,
    fly_entropy_threshold,
    fly_window,
    threshold_single,
    threshold_acc,
    relaxed_topk,
    relaxed_delta,
    typical_eps,
    typical_delta,
    mars_threshold,
    frontier_window,
    frontier_scale,  # multiplies EARS's tolerance in the frontier rule's test
    vocab_size,
    vocab_num_blocks,
    PADDED_VOCAB_NUM_BLOCKS: tl.constexpr,
    CANDIDATE_BLOCK_SIZE: tl.constexpr,  # relaxed_topk's pass over a row's logits, a block at a time
    JS_BLOCK_SIZE: tl.constexpr,  # adasd's pass over a row's target and draft logits, a block at a time
    HAS_DRAFT_LOGITS: tl.constexpr,
    POLICY: tl.constexpr,  # one of BRANCHES (walk_policy); unread with PER_ROW_POLICY
    UNIFORM: tl.constexpr,
    HAS_BUDGET: tl.constexpr,  # fly, frontier: a rejection defers only if its relaxed acceptance would fit
    PER_ROW_POLICY: tl.constexpr,  # each request's branch from policy_ptr (a batch that mixes policies)
):
    req_idx = tl.program_id(0)
    req_state_idx = tl.load(idx_mapping_ptr + req_idx).to(tl.int64)
    # PER_ROW_POLICY: a runtime branch id, every test below made per request; else a constexpr, one branch compiled
    policy = tl.load(policy_ptr + req_state_idx) if PER_ROW_POLICY else POLICY
    is_fly = policy == FLY
    defers = is_fly | (policy == FRONTIER)  # the window state machine: a rejection pending its next drafts
    argmax_recovery = policy == TYPICAL  # PolicySpec.recovery "argmax": the walk writes it, the insertion keeps it
    start_idx, num_rows = request_span(cu_num_logits_ptr, req_idx)
    num_drafts = num_rows - 1  # each request's last row is its bonus row
    seed = tl.load(seed_ptr + req_state_idx)
    temp = tl.load(temp_ptr + req_state_idx).to(tl.float32)
    is_greedy = temp == 0.0
    tolerance = tl.load(tolerance_ptr + req_state_idx)
    budget = 0.0
    budget_slack = 0.0
    if HAS_BUDGET:
        budget = tl.load(budget_ptr + req_state_idx)
        budget_slack = tl.load(budget_slack_ptr + req_state_idx)

    # adasd: the request's learnt JS threshold for this step, from its sums and counts so far (updated below)
    accepted_js_sum = tl.zeros((), tl.float64)
    rejected_js_sum = tl.zeros((), tl.float64)
    accepted_js_count = tl.zeros((), tl.int64)
    rejected_js_count = tl.zeros((), tl.int64)
    js_threshold = tl.zeros((), tl.float64)  # 0: no relaxation
    if policy == ADASD:
        accepted_js_sum = tl.load(adasd_sums_ptr + req_state_idx * 2)
        rejected_js_sum = tl.load(adasd_sums_ptr + req_state_idx * 2 + 1)
        accepted_js_count = tl.load(adasd_counts_ptr + req_state_idx * 2)
        rejected_js_count = tl.load(adasd_counts_ptr + req_state_idx * 2 + 1)
        js_threshold = _learnt_threshold(accepted_js_sum, accepted_js_count, rejected_js_sum, rejected_js_count)

    num_accepted = tl.zeros((), tl.int64)
    num_relaxed = tl.zeros((), tl.int32)
    relaxed_surprisal = tl.zeros((), tl.float32)  # -log p of each relaxed draft (target_logprob: 0 on greedy rows)
    pending = tl.full((), -1, tl.int64)  # fly, frontier: the deferred rejection awaiting its window (a draft index)
    pending_surprisal = tl.zeros((), tl.float32)
    rejected_argmax = tl.zeros((), tl.int64)
    target_lse = 0.0
    draft_lse = 0.0
    verifying = True
    for i in range(num_drafts):
        row = start_idx + i
        draft = tl.load(draft_sampled_ptr + row + 1).to(tl.int64)
        is_valid_draft = draft >= 0
        draft = tl.maximum(0, draft)
        if not is_greedy and not defers and not argmax_recovery:
            verifying &= is_valid_draft  # greedy rows store the argmax, so they reject through `accepted`
        if verifying:
            target_argmax = tl.zeros((), tl.int64)
            target_logprob = tl.zeros((), tl.float32)
            can_defer = False
            if is_greedy:
                target_argmax = _row_argmax(
                    target_local_max_ptr,
                    target_local_argmax_ptr,
                    target_local_stride,
                    target_local_argmax_stride,
                    row,
                    vocab_num_blocks,
                    PADDED_VOCAB_NUM_BLOCKS,
                )
                accepted = (target_argmax == draft) & is_valid_draft
                if is_fly:
                    target_logit = tl.load(target_logits_ptr + row * target_logits_stride + draft).to(tl.float32)
                    can_defer = is_valid_draft & (target_logit > float("-inf"))
            else:
                u = UNIFORM(seed, tl.load(pos_ptr + row), False)
                target_max, step_target_lse = _row_max_and_lse(
                    target_local_max_ptr,
                    target_local_sumexp_ptr,
                    target_local_stride,
                    row,
                    vocab_num_blocks,
                    PADDED_VOCAB_NUM_BLOCKS,
                )
                target_logprob = tl.load(target_logits_ptr + row * target_logits_stride + draft).to(tl.float32)
                target_logprob -= step_target_lse
                draft_logprob = 0.0  # one-hot draft: q(d) = 1
                step_draft_lse = 0.0
                if HAS_DRAFT_LOGITS:
                    draft_row = _draft_logits_row(req_state_idx, draft_logits_row_mapping_ptr)
                    draft_logit = tl.load(
                        draft_logits_ptr + draft_row * draft_logits_stride_0 + i * draft_logits_stride_1 + draft
                    ).to(tl.float32)
                    _, step_draft_lse = _row_max_and_lse(
                        draft_local_max_ptr,
                        draft_local_sumexp_ptr,
                        draft_local_stride,
                        row,
                        vocab_num_blocks,
                        PADDED_VOCAB_NUM_BLOCKS,
                    )
                    draft_logprob = draft_logit / temp - step_draft_lse
                if not defers or pending < 0:  # fly, frontier keep the pending row's statistics for its resample
                    target_lse = step_target_lse
                    draft_lse = step_draft_lse
                if policy == SGLANG:
                    target_prob = tl.exp(target_logprob)
                    accepted = (u <= target_prob / tl.maximum(threshold_acc, 1e-9)) | (target_prob >= threshold_single)
                    relaxed = accepted & ~(target_logprob > tl.log(u) + draft_logprob)
                    num_relaxed, relaxed_surprisal = _count_relaxed(
                        num_relaxed, relaxed_surprisal, relaxed, target_logprob
                    )
                else:
                    accepted = target_logprob > tl.log(u) + draft_logprob
                if policy == EARS:
                    relaxed = (
                        _ears_relaxable(
                            tolerance, target_max, step_target_lse, target_logprob, draft_logprob, u, min_ratio
                        )
                        & ~accepted
                    )
                    # a relaxed acceptance must fit in the slack plus B per position verified so far
                    relaxed &= _budget_allows(num_relaxed, budget_slack, budget, i + 1, HAS_BUDGET)
                    num_relaxed, relaxed_surprisal = _count_relaxed(
                        num_relaxed, relaxed_surprisal, relaxed, target_logprob
                    )
                    accepted |= relaxed
                if policy == ADASD:  # a verified position of a real draft (the walk stops at a placeholder)
                    draft_offset = 0
                    if HAS_DRAFT_LOGITS:
                        draft_offset = (
                            _draft_logits_row(req_state_idx, draft_logits_row_mapping_ptr) * draft_logits_stride_0
                            + i * draft_logits_stride_1
                        )
                    js = _js_distance(
                        target_logprob,
                        target_logits_ptr,
                        target_logits_stride,
                        row,
                        step_target_lse,
                        draft_logits_ptr,
                        draft_offset,
                        temp,
                        step_draft_lse,
                        vocab_size,
                        HAS_DRAFT_LOGITS,
                        JS_BLOCK_SIZE,
                    ).to(tl.float64)
                    relaxed = (
                        (js_threshold > 0.0)
                        & (js <= js_threshold)
                        & (target_logprob > float("-inf"))
                        & (draft_logprob > float("-inf"))
                        & ~accepted
                    )
                    relaxed &= _budget_allows(num_relaxed, budget_slack, budget, i + 1, HAS_BUDGET)
                    # learnt from the native decision (a relaxed acceptance counts as rejected), in position order
                    accepted_js_sum += tl.where(accepted, js, 0.0)
                    accepted_js_count += accepted.to(tl.int64)
                    rejected_js_sum += tl.where(accepted, 0.0, js)
                    rejected_js_count += (~accepted).to(tl.int64)
                    num_relaxed, relaxed_surprisal = _count_relaxed(
                        num_relaxed, relaxed_surprisal, relaxed, target_logprob
                    )
                    accepted |= relaxed
                if is_fly:
                    accepted &= is_valid_draft
                    can_defer = is_valid_draft & (target_logprob > float("-inf")) & (draft_logprob > float("-inf"))
                if policy == FRONTIER:  # EARS's relaxed test, taken once the next frontier_window drafts pass
                    accepted &= is_valid_draft
                    can_defer = (
                        is_valid_draft
                        & ~accepted
                        & _ears_relaxable(
                            tolerance * frontier_scale,
                            target_max,
                            step_target_lse,
                            target_logprob,
                            draft_logprob,
                            u,
                            min_ratio,
                        )
                    )
                if policy == TYPICAL:  # p(d) > min(eps, delta * exp(-H(p))), H from the block statistics
                    entropy = _row_entropy(
                        target_local_max_ptr,
                        target_local_sumexp_ptr,
                        target_local_entropy_ptr,
                        target_local_stride,
                        target_local_extra_stride,
                        row,
                        vocab_num_blocks,
                        PADDED_VOCAB_NUM_BLOCKS,
                    )
                    threshold = tl.minimum(typical_delta * tl.exp(-entropy), typical_eps)
                    typical = is_valid_draft & (tl.exp(target_logprob) > threshold)
                    relaxed = typical & ~(accepted & is_valid_draft)
                    num_relaxed, relaxed_surprisal = _count_relaxed(
                        num_relaxed, relaxed_surprisal, relaxed, target_logprob
                    )
                    accepted = typical
                    target_argmax = _row_argmax(  # the recovered token (.split_stats writes every row's argmax)
                        target_local_max_ptr,
                        target_local_argmax_ptr,
                        target_local_stride,
                        target_local_argmax_stride,
                        row,
                        vocab_num_blocks,
                        PADDED_VOCAB_NUM_BLOCKS,
                    )
            if policy == MARS:  # greedy rows too: the target's top-2 at a low-margin position, never a masked draft
                may_rescue = is_valid_draft & ~accepted
                if may_rescue:
                    z1, z2 = _row_top2(
                        target_local_max_ptr,
                        target_local_runner_up_ptr,
                        target_local_stride,
                        target_local_extra_stride,
                        row,
                        vocab_num_blocks,
                        PADDED_VOCAB_NUM_BLOCKS,
                    )
                    _, row_lse = _row_max_and_lse(  # .split_stats writes every row's sum-exp, greedy rows' too
                        target_local_max_ptr,
                        target_local_sumexp_ptr,
                        target_local_stride,
                        row,
                        vocab_num_blocks,
                        PADDED_VOCAB_NUM_BLOCKS,
                    )
                    draft_logit = tl.load(target_logits_ptr + row * target_logits_stride + draft).to(tl.float32)
                    low_margin = (z1 > 0.0) & (z2 > mars_threshold * z1)
                    candidate = low_margin & (draft_logit >= z2) & (tl.exp(draft_logit - row_lse) > 0.0)
                    candidate &= _budget_allows(num_relaxed, budget_slack, budget, i + 1, HAS_BUDGET)
                    num_relaxed, relaxed_surprisal = _count_relaxed(
                        num_relaxed, relaxed_surprisal, candidate, target_logprob
                    )
                    accepted |= candidate
            if policy == RELAXED_TOPK:  # greedy rows too
                may_rescue = is_valid_draft & ~accepted  # the pass over the row's logits is made only then
                if may_rescue:
                    candidate = _relaxed_candidate(
                        target_logits_ptr,
                        target_logits_stride,
                        row,
                        draft,
                        vocab_size,
                        relaxed_topk,
                        relaxed_delta,
                        CANDIDATE_BLOCK_SIZE,
                    )
                    candidate &= _budget_allows(num_relaxed, budget_slack, budget, i + 1, HAS_BUDGET)
                    num_relaxed, relaxed_surprisal = _count_relaxed(
                        num_relaxed, relaxed_surprisal, candidate, target_logprob
                    )
                    accepted |= candidate
            if defers:
                window = tl.where(is_fly, fly_window, frontier_window)
                if pending >= 0:
                    verifying = accepted  # only a native acceptance keeps a pending window open
                    if accepted and i - pending == window:
                        num_accepted = i + 1
                        num_relaxed += 1
                        relaxed_surprisal += pending_surprisal
                        pending = tl.full((), -1, tl.int64)  # not -1: a literal is int32 where compiled
                elif accepted:
                    num_accepted = i + 1
                else:
                    rejected_argmax = target_argmax
                    verifying = can_defer & (i + window < num_drafts)
                    if is_fly:
                        verifying &= tl.load(fly_entropy_ptr + row) >= fly_entropy_threshold
                    # the deferral, if confirmed, is the row's next relaxed acceptance: capped here
                    verifying &= _budget_allows(num_relaxed, budget_slack, budget, i + 1, HAS_BUDGET)
                    if verifying:
                        pending = i
                        pending_surprisal = -target_logprob
                        if window == 0:  # frontier_window 0: EARS's relaxed test alone, confirmed at once
                            num_accepted = i + 1
                            num_relaxed += 1
                            relaxed_surprisal += pending_surprisal
                            pending = tl.full((), -1, tl.int64)
                tl.store(sampled_ptr + req_idx * sampled_stride + i, draft)
            else:
                verifying = accepted
                num_accepted += accepted
                recovers_argmax = is_greedy or argmax_recovery
                tl.store(
                    sampled_ptr + req_idx * sampled_stride + i,
                    target_argmax if recovers_argmax and not accepted else draft,
                )
    if defers and is_greedy and num_accepted < num_drafts:
        tl.store(sampled_ptr + req_idx * sampled_stride + num_accepted, rejected_argmax)
    if insert_temp_ptr is not None:  # argmax recovery: the insertion leaves the walk's token as on a greedy row
        tl.store(insert_temp_ptr + req_state_idx, tl.where(argmax_recovery, 0.0, temp))

    if HAS_BUDGET:  # charge the ledger: B per verified position (the accepted ones and the first rejected one)
        verified = verified_positions(num_accepted, num_drafts)
        if budget > 0:
            tl.store(budget_slack_ptr + req_state_idx, budget_slack + budget * verified.to(tl.float64) - num_relaxed)
    if policy == ADASD:
        tl.store(adasd_sums_ptr + req_state_idx * 2, accepted_js_sum)
        tl.store(adasd_sums_ptr + req_state_idx * 2 + 1, rejected_js_sum)
        tl.store(adasd_counts_ptr + req_state_idx * 2, accepted_js_count)
        tl.store(adasd_counts_ptr + req_state_idx * 2 + 1, rejected_js_count)
    tl.store(num_accepted_ptr + req_idx, num_accepted)
    tl.store(num_relaxed_ptr + req_idx, num_relaxed)
    tl.store(relaxed_surprisal_ptr + req_idx, relaxed_surprisal)
    tl.store(target_rejected_lse_ptr + req_idx, target_lse)
    tl.store(draft_rejected_lse_ptr + req_idx, draft_lse)
