"""Triton's CUDA frontend (to TTIR, no GPU needed) on the MRV2 walk (every policy branch), our statistics launch and
AdaSD's draft-length launches.

Run in a process of its own (``python -m tests.gpu_frontend``; ``tests/test_vllm_mrv2_adapter.py`` does): the test
session imports Triton's library under the interpreter, whose functions a compiled kernel cannot call. Triton's
interpreter runs a branch only where it is taken, a GPU compiles every branch it cannot fold, with its types and
pointers; this raises what compiling for a GPU would raise first."""

from __future__ import annotations

import importlib

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource

from ears_vllm.kernels.draft_length import draft_entropy_stop_kernel, learn_draft_length_kernel
from ears_vllm.kernels.split_stats import split_stats_kernel
from ears_vllm.kernels.split_stats_accept import BRANCHES, split_stats_accept_kernel
from ears_vllm.policies import POLICIES
from ears_vllm.seam.vllm_mrv2 import VOCAB_BLOCK_SIZE

POINTER_TYPES = {
    "sampled_ptr": "*i64",
    "num_accepted_ptr": "*i32",
    "num_relaxed_ptr": "*i32",
    "target_local_argmax_ptr": "*i64",
    "draft_sampled_ptr": "*i64",
    "cu_num_logits_ptr": "*i32",
    "idx_mapping_ptr": "*i32",
    "seed_ptr": "*i64",
    "pos_ptr": "*i64",
    "policy_ptr": "*i32",
    "budget_ptr": "*fp64",
    "budget_slack_ptr": "*fp64",
    "adasd_sums_ptr": "*fp64",
    "adasd_counts_ptr": "*i64",
    "draft_step_ptr": "*i64",
    "num_proposed_ptr": "*i32",
    "learns_ptr": "*i8",
    "accepted_sum_ptr": "*fp64",
    "accepted_count_ptr": "*i64",
    "rejected_sum_ptr": "*fp64",
    "rejected_count_ptr": "*i64",
    "num_sampled_ptr": "*i32",
    "num_rejected_ptr": "*i32",
    "draft_logits_row_mapping_ptr": "*i32",
    "expanded_idx_mapping_ptr": "*i32",
    "expanded_local_pos_ptr": "*i32",
}
FLOAT_SETTINGS = {"min_ratio", "fly_entropy_threshold", "threshold_single", "threshold_acc", "relaxed_delta"}
FLOAT_SETTINGS |= {"typical_eps", "typical_delta", "mars_threshold", "frontier_scale"}


@triton.jit
def uniform(seed, pos, is_drafting):  # MRV2's tl_rand32 stand-in: any uniform compiles the same walk
    return tl.rand(seed, pos)


def to_ttir(kernel: triton.JITFunction, constexprs: dict[str, object]) -> None:
    """``kernel`` through Triton's CUDA frontend with ``constexprs``; its other parameters typed by name."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = POINTER_TYPES.get(name, "*fp32")
        else:
            signature[name] = "fp32" if name in FLOAT_SETTINGS else "i32"
    ir = importlib.import_module("triton._C.libtriton").ir
    backend = CUDABackend(GPUTarget("cuda", 90, 32))
    options = backend.parse_options({})
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    source = ASTSource(kernel, signature, constexprs)
    codegen = backend.get_codegen_implementation(options)
    source.make_ir(backend.target, options, codegen, backend.get_module_map(), context)


def main() -> None:
    typical = POLICIES["typical"].kernel_id
    for mixed in (False, True):
        for policy in [0] if mixed else sorted(BRANCHES):
            for budget, has_draft_logits in ((False, False), (True, True)):
                constexprs: dict[str, object] = dict(
                    PADDED_VOCAB_NUM_BLOCKS=2,
                    CANDIDATE_BLOCK_SIZE=1024,
                    JS_BLOCK_SIZE=1024,
                    HAS_DRAFT_LOGITS=has_draft_logits,
                    POLICY=policy,
                    UNIFORM=uniform,
                    HAS_BUDGET=budget,
                    PER_ROW_POLICY=mixed,
                    draft_logits_row_mapping_ptr=None,
                )
                if not mixed:  # as verify_mrv2 passes them: no per-row ids, no insertion temperature but typical's
                    constexprs["policy_ptr"] = None
                    if policy != typical:
                        constexprs["insert_temp_ptr"] = None
                to_ttir(split_stats_accept_kernel, constexprs)
                print("compiled walk", dict(policy=policy, mixed=mixed, budget=budget, draft=has_draft_logits))
    for entropy, runner_up in ((True, False), (False, True), (True, True)):
        constexprs = dict(
            BLOCK_SIZE=VOCAB_BLOCK_SIZE,
            HAS_DRAFT_LOGITS=True,
            WITH_ENTROPY=entropy,
            WITH_RUNNER_UP=runner_up,
            draft_logits_row_mapping_ptr=None,
        )
        to_ttir(split_stats_kernel, constexprs)
        print("compiled statistics", dict(entropy=entropy, runner_up=runner_up))
    to_ttir(draft_entropy_stop_kernel, dict(BLOCK_SIZE=VOCAB_BLOCK_SIZE))
    to_ttir(learn_draft_length_kernel, dict(PADDED_STEPS=4))
    print("compiled draft length")


if __name__ == "__main__":
    main()
