"""The fused Triton kernel equals the PyTorch reference, under TRITON_INTERPRET=1 on the CPU.

Token ids, accepted and relaxed counts must be identical for the same uniforms and noise, across
greedy/random mixes, ragged k (with 0), one-hot and full drafts, every policy, per-request tolerance,
vocabularies that are not a multiple of the block, several vocabulary splits, and bf16 logits.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from ears_vllm import EarsConfig, verify
from ears_vllm.bench.steps import verify_batch
from ears_vllm.step import VerifyStep
from tests.triton_cpu import triton_interpreter

# A NaN or inf computed anywhere in a kernel (even one later masked away) fails the test.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

with triton_interpreter():
    import triton
    import triton.language as tl

    verify_kernel = importlib.import_module("ears_vllm.kernels.verify_kernel")
    split_stats_accept = importlib.import_module("ears_vllm.kernels.split_stats_accept")
    shared = importlib.import_module("ears_vllm.kernels.shared")
    budget_fits, request_span, verified_positions = shared.budget_fits, shared.request_span, shared.verified_positions

    @triton.jit
    def _shared_arithmetic_kernel(
        offsets_ptr,  # [n + 1] int64
        relaxed_ptr,  # [n] int32
        slack_ptr,  # [n] float64
        budget_ptr,  # [n] float64
        verified_ptr,  # [n] int32
        accepted_ptr,  # [n] int64
        drafts_ptr,  # [n] int64
        out_ptr,  # [n, 4] int64 out: fits, verified positions, span start, span length
    ):
        i = tl.program_id(0)
        fits = budget_fits(
            relaxed_before=tl.load(relaxed_ptr + i),
            slack=tl.load(slack_ptr + i),
            budget=tl.load(budget_ptr + i),
            verified_through=tl.load(verified_ptr + i),
        )
        start, count = request_span(offsets_ptr, i)
        tl.store(out_ptr + 4 * i, fits.to(tl.int64))
        tl.store(out_ptr + 4 * i + 1, verified_positions(tl.load(accepted_ptr + i), tl.load(drafts_ptr + i)))
        tl.store(out_ptr + 4 * i + 2, start)
        tl.store(out_ptr + 4 * i + 3, count)


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


POLICIES = {
    "standard": EarsConfig(),
    "ears-0.3": EarsConfig(policy="ears", tolerance=0.3),
    "ears-1-rho0.2": EarsConfig(policy="ears", tolerance=1.0, min_ratio=0.2),
    "typical": EarsConfig(policy="typical"),
    "fly-W2": EarsConfig(policy="fly", fly_window_size=2, fly_entropy_threshold=0.1),
    "fly-default-window-top4": EarsConfig(policy="fly", fly_entropy_top_k=4),
    "sglang-0.3-0.5": EarsConfig(policy="sglang", accept_threshold_single=0.3, accept_threshold_acc=0.5),
    "relaxed_topk-10-0.6": EarsConfig(policy="relaxed_topk", relaxed_topk=10, relaxed_delta=0.6),
    "relaxed_topk-3-0.9": EarsConfig(policy="relaxed_topk", relaxed_topk=3, relaxed_delta=0.9),
    "mars-0.9": EarsConfig(policy="mars"),
    "frontier-0.5-W1": EarsConfig(policy="frontier", tolerance=0.5, frontier_window=1),
    "frontier-0.5-W1-scale3": EarsConfig(policy="frontier", tolerance=0.5, frontier_window=1, frontier_scale=3.0),
}
BATCHES = {
    "batch1-k4": [4],
    "batch7-ragged-with-zeros": [3, 0, 5, 1, 0, 8, 2],
}
GREEDY = {"batch1-k4": [False], "batch7-ragged-with-zeros": [False, True, False, True, False, False, True]}


def assert_kernel_equals_reference(batch, config, is_greedy, tolerance=None, race_keys=None, **kernel_options):
    reference = verify(
        **batch, config=config, is_greedy=is_greedy, tolerance=tolerance, race_keys=race_keys, backend="torch"
    )
    n = batch["num_draft_tokens"]
    step = VerifyStep.build(
        batch["target_logits"],
        batch["draft_token_ids"],
        torch.as_tensor(n),
        batch["bonus_token_ids"],
        draft_probs=batch["draft_probs"],
        is_greedy=is_greedy,
        uniform=batch["uniform"],
        recovery_noise=batch["recovery_noise"],
        tolerance=tolerance if tolerance is not None else torch.full((len(n),), config.tolerance, dtype=torch.float64),
        race_keys=race_keys,
        config=config,
        max_spec_len=max(n),
    )
    kernel = verify_kernel.verify_triton(step, **kernel_options)
    assert torch.equal(kernel.token_ids, reference.token_ids)
    assert torch.equal(kernel.num_accepted, reference.num_accepted)
    assert torch.equal(kernel.num_relaxed, reference.num_relaxed)
    # -log p(d) from the kernel's merged row statistics, the reference's from softmax: equal to float32 rounding
    torch.testing.assert_close(kernel.relaxed_surprisal, reference.relaxed_surprisal, rtol=1e-5, atol=1e-5)
    return reference


@pytest.mark.parametrize("config", POLICIES.values(), ids=POLICIES.keys())
@pytest.mark.parametrize("name", BATCHES, ids=BATCHES.keys())
@pytest.mark.parametrize("full_draft", [False, True], ids=["one-hot", "full-draft"])
@pytest.mark.parametrize("vocab", [1000, 1037], ids=["vocab1000", "vocab1037"])
def test_kernel_equals_reference(config, name, full_draft, vocab):
    batch = verify_batch(BATCHES[name], vocab, seed=vocab, full_draft=full_draft, masked_fraction=0.2)
    # Several splits of several blocks each, with a ragged last block.
    assert_kernel_equals_reference(batch, config, torch.tensor(GREEDY[name]), block_size=128, num_splits=3)


def test_adasd_relaxes_up_to_each_requests_threshold():
    batch = verify_batch(BATCHES["batch7-ragged-with-zeros"], 1037, seed=5, full_draft=True)
    tau = torch.tensor([0.0, 0.5, 0.7, 0.9, 0.6, 0.8, 1.0], dtype=torch.float64)  # learnt JS thresholds
    result = assert_kernel_equals_reference(
        batch, EarsConfig(policy="adasd"), torch.zeros(7, dtype=torch.bool), tau, block_size=256
    )
    assert result.num_relaxed.sum() > 0, "the test must exercise relaxed acceptances"


def test_race_winners_are_the_keys_winners_bit_for_bit():
    torch.manual_seed(0)
    logits = torch.randn(24, 1037) * 2
    seed, pos = torch.randint(0, 2**62, (24,)), torch.randint(0, 100_000, (24,))
    from ears_vllm.policies import race_winners

    kernel = verify_kernel.race_winners_triton(logits, seed, pos, block_size=128)
    assert torch.equal(kernel, race_winners(logits, seed, pos))


@pytest.mark.parametrize("full_draft", [False, True], ids=["one-hot", "full-draft"])
def test_ersd_walk_equals_the_reference(full_draft):
    """Drafts that are the target's winners except where a row is corrupted: acceptances, mismatches (the winner
    emitted), greedy rows (argmax match), bonus tokens."""
    from ears_vllm.policies import race_winners
    from ears_vllm.reference import race_key_rows

    n = BATCHES["batch7-ragged-with-zeros"]
    batch = verify_batch(n, 1037, seed=6, full_draft=full_draft)
    race_keys = torch.stack([torch.arange(7) * 1_000_003, torch.randint(0, 4096, (7,))], 1)
    winners = race_winners(batch["target_logits"], *race_key_rows(race_keys, torch.tensor(n)))
    corrupt = torch.rand(winners.shape[0], generator=torch.Generator().manual_seed(1)) < 0.25
    batch["draft_token_ids"] = torch.where(corrupt, (winners + 1) % 1037, winners)
    is_greedy = torch.tensor(GREEDY["batch7-ragged-with-zeros"])
    result = assert_kernel_equals_reference(
        batch, EarsConfig(policy="ersd"), is_greedy, race_keys=race_keys, block_size=128, num_splits=3
    )
    random_rows = ~is_greedy & (torch.tensor(n) > 0)
    assert (result.num_accepted[random_rows] > 0).any() and (result.num_accepted < torch.tensor(n)).any()
    assert result.num_relaxed.sum() == 0


def test_per_request_tolerance():
    batch = verify_batch(BATCHES["batch7-ragged-with-zeros"], 1037, seed=5, full_draft=False)
    tolerance = torch.tensor([0.0, 0.2, 0.5, 1.0, 0.1, 0.9, 0.3], dtype=torch.float64)
    result = assert_kernel_equals_reference(
        batch, EarsConfig(policy="ears"), torch.zeros(7, dtype=torch.bool), tolerance, block_size=256
    )
    assert result.num_relaxed.sum() > 0, "the test must exercise relaxed acceptances"


@pytest.mark.parametrize("num_splits", [1, 2, 8], ids=lambda s: f"splits{s}")
def test_split_count_does_not_change_the_result(num_splits):
    batch = verify_batch([4, 4, 4], 1000, seed=9, full_draft=True)
    assert_kernel_equals_reference(
        batch,
        EarsConfig(policy="ears", tolerance=0.2),
        torch.zeros(3, dtype=torch.bool),
        block_size=64,
        num_splits=num_splits,
    )


def test_bf16_logits():
    batch = verify_batch([4, 2], 1037, seed=2, full_draft=False)
    batch["target_logits"] = batch["target_logits"].to(torch.bfloat16)
    assert_kernel_equals_reference(
        batch, EarsConfig(policy="ears", tolerance=0.3), torch.tensor([False, True]), block_size=256
    )


def test_verify_dispatches_to_the_kernel():
    batch = verify_batch([3, 2], 300, seed=1, full_draft=True)
    via_verify = verify(**batch, config=EarsConfig(policy="ears", tolerance=0.1), backend="triton")
    reference = verify(**batch, config=EarsConfig(policy="ears", tolerance=0.1), backend="torch")
    assert torch.equal(via_verify.token_ids, reference.token_ids)


@pytest.mark.parametrize("config", [EarsConfig(), EarsConfig(policy="typical")], ids=["greedy-rows", "typical"])
def test_argmax_ties_go_to_the_first_index_across_blocks_and_splits(config):
    """Constant logits: every token ties; torch.argmax (the reference) returns index 0."""
    batch = verify_batch([2, 2], 1000, seed=0, full_draft=False)
    batch["target_logits"] = torch.zeros(4, 1000)
    batch["draft_token_ids"] = torch.tensor([700, 3, 999, 1])  # all rejected under either rule
    is_greedy = torch.tensor([True, config.policy == "standard"])
    result = assert_kernel_equals_reference(batch, config, is_greedy, block_size=64, num_splits=4)
    assert result.token_ids[0, 0] == 0


def test_the_kernels_shared_arithmetic_is_the_hosts():
    """kernels.shared's device twins give what ears_vllm.step's host functions give, at the edges: a relaxed
    acceptance that exactly fits, one that misses by a hair, budget 0, and the all-accepted request."""
    from ears_vllm.step import budget_fits as host_budget_fits
    from ears_vllm.step import request_offsets
    from ears_vllm.step import verified_positions as host_verified_positions

    relaxed = torch.tensor([0, 1, 1, 2, 0, 3], dtype=torch.int32)
    slack = torch.tensor([0.0, 0.5, 0.5 - 1e-12, 0.0, -0.5, 1.0], dtype=torch.float64)
    budget = torch.tensor([0.125, 0.25, 0.25, 0.0, 0.25, 0.5], dtype=torch.float64)
    verified = torch.tensor([8, 6, 6, 1, 4, 6], dtype=torch.int32)
    accepted = torch.tensor([0, 3, 4, 2, 0, 5], dtype=torch.int64)
    drafts = torch.tensor([0, 4, 4, 5, 1, 5], dtype=torch.int64)
    counts = torch.tensor([2, 0, 5, 1, 3, 4])
    offsets = request_offsets(counts)
    out = torch.zeros(6, 4, dtype=torch.int64)
    _shared_arithmetic_kernel[(6,)](
        offsets_ptr=offsets,
        relaxed_ptr=relaxed,
        slack_ptr=slack,
        budget_ptr=budget,
        verified_ptr=verified,
        accepted_ptr=accepted,
        drafts_ptr=drafts,
        out_ptr=out,
    )
    fits = host_budget_fits(relaxed.long(), slack, budget, verified.long())
    assert fits.tolist() == [True, True, False, True, False, True]  # the edges above, worked by hand
    assert out[:, 0].bool().tolist() == fits.tolist()
    assert out[:, 1].tolist() == host_verified_positions(accepted, drafts).tolist() == [0, 4, 4, 3, 1, 5]
    assert out[:, 2].tolist() == offsets[:-1].tolist() == [0, 2, 2, 7, 8, 11]
    assert out[:, 3].tolist() == counts.tolist()


def test_every_registered_policy_has_its_kernel_branches():
    """Walking the registry: each policy's id has a branch in the fused kernel, and in the MRV2 walk where the policy
    runs on MRV2 (a keyed one runs its own walk); an id with no branch is refused at launch, never run as the
    standard rule."""
    import dataclasses

    from ears_vllm.policies import POLICIES

    for spec in POLICIES.values():
        assert verify_kernel.accept_flags(spec)["POLICY"] == spec.kernel_id, spec.name
        if "MRV2" in spec.runners and not spec.keyed:
            assert split_stats_accept.walk_policy(spec, relaxes=True) == spec.kernel_id, spec.name
    orphan = dataclasses.replace(POLICIES["ears"], name="toy", kernel_id=max(verify_kernel.BRANCHES) + 1)
    with pytest.raises(ValueError, match=r"toy.*no branch in the fused kernel"):
        verify_kernel.accept_flags(orphan)
    with pytest.raises(ValueError, match=r"toy.*no branch in the MRV2 walk"):
        split_stats_accept.walk_policy(orphan, relaxes=True)
    assert split_stats_accept.walk_policy(POLICIES["ears"], relaxes=False) == POLICIES["standard"].kernel_id


def test_the_kernel_parameters_are_packed_and_read_by_name():
    from ears_vllm.config import EarsConfig
    from ears_vllm.policies import PARAMS
    from ears_vllm.step import KernelParam, kernel_params

    config = EarsConfig(policy="sglang", accept_threshold_single=0.3, accept_threshold_acc=0.7)
    packed = kernel_params(config, torch.device("cpu"))
    assert sorted(KernelParam) == list(range(len(KernelParam))) == list(range(packed.shape[0]))
    for param in KernelParam:
        assert param.name.lower() in PARAMS
        assert packed[param].item() == getattr(config, param.name.lower())
        assert getattr(shared, param.name).value == param  # the kernels' constexpr of the same name
