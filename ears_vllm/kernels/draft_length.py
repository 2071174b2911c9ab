"""AdaSD's draft length on a device drafter (vLLM's Model Runner V2): the stop, and its threshold learnt per slot.

Terms (docs/adasd.md, "Draft length"): a request stops drafting at draft j >= 1 when ``H(q_j) > tau_len``, the
midpoint of the mean draft entropy of its accepted verified drafts and of its rejected ones (``tau_len`` exists once
both sides have a value and the accepted mean is below the rejected one; until then there is no stop). Everything is
held per request state index (MRV2's *slot*), on the device:

    num_proposed [slots] int32     the drafts the slot's request proposed at its last drafting (k: it never stopped)
    learns       [slots] int8      its request learns (it samples: temperature > 0), set at draft 0
    entropy      [slots, k] f32    H(q_j) of each draft it proposed at its last drafting
    sums         [slots] f64 x 2   the entropies of its accepted and of its rejected verified drafts
    counts       [slots] i64 x 2   how many of each

Two launches: :func:`draft_entropy_stop_kernel` once per draft step of the drafter's loop (it reads the step from the
drafter's own device counter, so a captured loop replays it), and :func:`learn_draft_length_kernel` once per
verification, before the next drafting. Neither reads anything back to the host. The sums are float64 sums of
float32 entropies: exact for any realistic count, so they equal the host's ``LearntThreshold``
(``ears_vllm.policies.adasd``) whatever the order of additions.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _length_threshold(accepted_sum_ptr, accepted_count_ptr, rejected_sum_ptr, rejected_count_ptr, slot):
    """(exists, tau_len) of a slot, in float64: ``LearntThreshold.value`` on the device."""
    accepted_count = tl.load(accepted_count_ptr + slot)
    rejected_count = tl.load(rejected_count_ptr + slot)
    accepted_mean = tl.load(accepted_sum_ptr + slot) / tl.maximum(accepted_count, 1).to(tl.float64)
    rejected_mean = tl.load(rejected_sum_ptr + slot) / tl.maximum(rejected_count, 1).to(tl.float64)
    exists = (accepted_count > 0) & (rejected_count > 0) & (accepted_mean < rejected_mean)
    return exists, (accepted_mean + rejected_mean) / 2


@triton.jit
def draft_entropy_stop_kernel(
    logits_ptr,  # [num_rows, V] the drafter's logits at this draft step, before temperature
    logits_stride,
    idx_mapping_ptr,  # [num_rows] each row's slot (-1: a padded row, left alone)
    temp_ptr,  # [slots] each slot's temperature (0: greedy, never learns, never stops)
    draft_step_ptr,  # [] int64: the draft being sampled (0 .. k-1), the drafter's own counter
    entropy_ptr,  # [slots, k] float32
    entropy_stride,
    num_proposed_ptr,  # [slots] int32
    learns_ptr,  # [slots] int8
    accepted_sum_ptr,  # [slots] float64
    accepted_count_ptr,  # [slots] int64
    rejected_sum_ptr,  # [slots] float64
    rejected_count_ptr,  # [slots] int64
    vocab_size,
    num_speculative_steps,
    BLOCK_SIZE: tl.constexpr,
):
    """One row per program: ``H(q)`` of the row's draft distribution at its temperature, in one online pass over the
    vocabulary (max, sum of exp, and sum of exp times the logit: ``H = log Z - E_q[x]``); then the stop. At draft 0 a
    row starts a drafting (it proposes k unless it stops); at draft j >= 1 a learning row still drafting stops when
    ``H > tau_len`` (it proposed j drafts), else the entropy of its proposed draft j is kept for learning."""
    row = tl.program_id(0)
    slot = tl.load(idx_mapping_ptr + row).to(tl.int64)
    if slot < 0:
        return
    step = tl.load(draft_step_ptr).to(tl.int32)
    temp = tl.load(temp_ptr + slot).to(tl.float32)
    learns = temp > 0.0
    drafting = (step == 0) | (tl.load(num_proposed_ptr + slot) == num_speculative_steps)
    if step == 0:
        tl.store(num_proposed_ptr + slot, num_speculative_steps)
        tl.store(learns_ptr + slot, learns.to(tl.int8))
    if learns & drafting:
        running_max = tl.full((), float("-inf"), tl.float32)
        sum_exp = tl.zeros((), tl.float32)
        sum_exp_logit = tl.zeros((), tl.float32)
        for start in range(0, vocab_size, BLOCK_SIZE):
            block = start + tl.arange(0, BLOCK_SIZE)
            x = tl.load(logits_ptr + row * logits_stride + block, mask=block < vocab_size, other=float("-inf"))
            x = x.to(tl.float32) / temp
            finite = x > float("-inf")
            new_max = tl.maximum(running_max, tl.max(x, axis=0))
            scale = tl.where(running_max > float("-inf"), tl.exp(running_max - new_max), 0.0)
            e = tl.where(finite, tl.exp(x - new_max), 0.0)
            sum_exp = sum_exp * scale + tl.sum(e, axis=0)
            sum_exp_logit = sum_exp_logit * scale + tl.sum(e * tl.where(finite, x, 0.0), axis=0)
            running_max = new_max
        entropy = running_max + tl.log(sum_exp) - sum_exp_logit / sum_exp
        exists, tau = _length_threshold(
            accepted_sum_ptr, accepted_count_ptr, rejected_sum_ptr, rejected_count_ptr, slot
        )
        if (step >= 1) & exists & (entropy.to(tl.float64) > tau):
            tl.store(num_proposed_ptr + slot, step)
        else:
            tl.store(entropy_ptr + slot * entropy_stride + step, entropy)


@triton.jit
def learn_draft_length_kernel(
    idx_mapping_ptr,  # [num_reqs] each verified request's slot (-1: padding)
    num_sampled_ptr,  # [num_reqs] accepted drafts + 1 (0: a chunked prefill)
    num_rejected_ptr,  # [num_reqs] scheduled drafts - accepted drafts
    entropy_ptr,  # [slots, k] float32
    entropy_stride,
    num_proposed_ptr,  # [slots] int32
    learns_ptr,  # [slots] int8
    accepted_sum_ptr,  # [slots] float64
    accepted_count_ptr,  # [slots] int64
    rejected_sum_ptr,  # [slots] float64
    rejected_count_ptr,  # [slots] int64
    PADDED_STEPS: tl.constexpr,  # next power of 2 of k
):
    """One request per program: its verified proposed drafts (the accepted ones and the first rejected one, among the
    drafts it proposed and the verifier was given) record their entropies, accepted or rejected: ``record_step``'s
    length half (``ears_vllm.policies.adasd.AdasdState``)."""
    req = tl.program_id(0)
    slot = tl.load(idx_mapping_ptr + req).to(tl.int64)
    if slot < 0:
        return
    if tl.load(learns_ptr + slot) == 0:
        return
    num_accepted = tl.maximum(tl.load(num_sampled_ptr + req).to(tl.int32) - 1, 0)
    scheduled = num_accepted + tl.load(num_rejected_ptr + req).to(tl.int32)
    proposed = tl.minimum(tl.load(num_proposed_ptr + slot), scheduled)
    verified = tl.minimum(num_accepted + 1, proposed)
    j = tl.arange(0, PADDED_STEPS)
    seen = j < verified
    entropy = tl.load(entropy_ptr + slot * entropy_stride + j, mask=seen, other=0.0).to(tl.float64)
    accepted = seen & (j < num_accepted)
    rejected = seen & (j >= num_accepted)
    tl.store(accepted_sum_ptr + slot, tl.load(accepted_sum_ptr + slot) + tl.sum(tl.where(accepted, entropy, 0.0)))
    tl.store(accepted_count_ptr + slot, tl.load(accepted_count_ptr + slot) + tl.sum(accepted.to(tl.int64)))
    tl.store(rejected_sum_ptr + slot, tl.load(rejected_sum_ptr + slot) + tl.sum(tl.where(rejected, entropy, 0.0)))
    tl.store(rejected_count_ptr + slot, tl.load(rejected_count_ptr + slot) + tl.sum(rejected.to(tl.int64)))
