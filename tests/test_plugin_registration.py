"""Registration when one of its own steps fails: the plugin is never silently inert.

Where ``VllmConfig.__post_init__`` cannot be wrapped, an ears config is not checked as vLLM builds it; the samplers
are still guarded as for a moved hook, so a non-standard policy stops the server when its sampler is built (or,
with ``on_unsupported: fallback``, runs vLLM's own rule with a warning) instead of vLLM's rule running unnoticed.
"""

from __future__ import annotations

import importlib
import logging
import types

import pytest

from ears_vllm import plugin
from ears_vllm._log import get_logger
from ears_vllm.seam import patches, vllm_mrv2, vllm_v1
from ears_vllm.seam.verification import UnsupportedPolicyError
from tests.vllm_release import v1_runner_only

LOGGER = get_logger().name
EARS = {"policy": "ears", "tolerance": 0.3}


@pytest.fixture
def unwrappable_config(fresh_registration, monkeypatch):
    """vLLM as a release whose ``VllmConfig.__post_init__`` cannot be wrapped; the adapters' state and the
    registration restored after the test."""
    from vllm.config import VllmConfig

    from ears_vllm.seam import vllm_requests

    for owner, name in (
        (vllm_v1.state, "hook_problem"),
        (vllm_mrv2.state, "hook_problem"),
        (vllm_mrv2.state, "slots"),
        (vllm_requests, "server_config"),
        (plugin, "config_hook_problem"),
    ):
        monkeypatch.setattr(owner, name, getattr(owner, name))
    apply = patches.apply

    def apply_but_not_the_config(owner, name, make_replacement, why):
        if owner is VllmConfig and name == "__post_init__":
            raise TypeError("cannot set '__post_init__' attribute of immutable type 'VllmConfig'")
        return apply(owner, name, make_replacement, why)

    monkeypatch.setattr(patches, "apply", apply_but_not_the_config)


def mrv2_sampler(monkeypatch, ears: dict):
    """Plan an MRV2 sampler as its construction does, for a server whose ears config is ``ears``."""
    import vllm.config

    spec_config = types.SimpleNamespace(num_speculative_tokens=2, rejection_sample_method="standard")
    server = types.SimpleNamespace(
        speculative_config=spec_config,
        additional_config={"ears": ears},
        scheduler_config=types.SimpleNamespace(max_num_seqs=8),
    )
    monkeypatch.setattr(vllm.config, "get_current_vllm_config_or_none", lambda: server)
    return vllm_mrv2._configure(importlib.import_module(vllm_mrv2.MODULE), types.SimpleNamespace())


def test_a_config_hook_that_cannot_be_wrapped_is_said_and_guards_the_samplers(unwrappable_config, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        plugin.register()
    assert "cannot set '__post_init__'" in plugin.config_hook_problem
    assert "VllmConfig.__post_init__ could not be wrapped" in caplog.text
    assert "a non-standard ears policy stops the server" in caplog.text
    assert "VllmConfig.__post_init__ could not be wrapped" in vllm_mrv2.state.hook_problem


@pytest.mark.parametrize("on_unsupported", ["error", "fallback"])
def test_without_the_config_hook_an_mrv2_sampler_refuses_or_falls_back_loudly(
    unwrappable_config, monkeypatch, caplog, on_unsupported
):
    plugin.register()
    ears = EARS | {"on_unsupported": on_unsupported}
    if on_unsupported == "error":
        with pytest.raises(UnsupportedPolicyError, match=r"VllmConfig\.__post_init__ could not be wrapped"):
            mrv2_sampler(monkeypatch, ears)
    else:
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            assert mrv2_sampler(monkeypatch, ears) is None
        assert "VllmConfig.__post_init__ could not be wrapped" in caplog.text and "runs vLLM's own rule" in caplog.text
    assert mrv2_sampler(monkeypatch, {"policy": "standard"}) is None  # standard never refuses


@v1_runner_only
def test_without_the_config_hook_a_v1_sampler_refuses_where_vllm_builds_it(unwrappable_config):
    """vLLM's own V1 RejectionSampler, built as its worker builds it: the VllmConfig builds (its ears config
    unchecked), the sampler refuses."""
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm.v1.sample.rejection_sampler import RejectionSampler
    from vllm.v1.sample.sampler import Sampler

    plugin.register()
    for ears, refuses in ((EARS, True), ({"policy": "standard"}, False)):
        config = VllmConfig(device_config=DeviceConfig(device="cpu"), additional_config={"ears": ears})
        with set_current_vllm_config(config):
            if refuses:
                with pytest.raises(UnsupportedPolicyError, match=r"VllmConfig\.__post_init__ could not be wrapped"):
                    RejectionSampler(Sampler(), None)
            else:
                assert RejectionSampler(Sampler(), None)._ears_config is None


def test_a_failed_request_check_or_metrics_method_is_a_warning_and_the_runners_are_still_patched(
    fresh_registration, monkeypatch, caplog
):
    from ears_vllm.seam import vllm_requests

    def moved():
        raise AttributeError("SamplingParams has no attribute '_verify_extra_args'")

    monkeypatch.setattr(vllm_requests, "install_request_check", moved)
    monkeypatch.setattr(plugin, "install_worker_methods", moved)
    monkeypatch.setattr(plugin, "config_hook_problem", plugin.config_hook_problem)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        plugin.register()
    assert "per-request ears settings are not checked" in caplog.text and "not served on /metrics" in caplog.text
    assert plugin.config_hook_problem is None and plugin.hook_report["MRV2"] == "patched"
