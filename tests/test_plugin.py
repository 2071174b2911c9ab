"""Registration with a real vLLM (in process): entry point, idempotence, config checks, moved hooks."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import re

import pytest

from ears_vllm import cli, plugin
from ears_vllm.seam import vllm_mrv2, vllm_v1
from tests.v1_only import make_v1_only
from tests.vllm_release import IS_VLLM_CPU, V1_ABSENT, VLLM_VERSION

# Each runner: its adapter, and the module whose rejection_sample the adapter checks and patches.
RUNNERS = {"V1": (vllm_v1, vllm_v1.MODULE), "MRV2": (vllm_mrv2, vllm_mrv2.MODULE)}
PRESENT_RUNNERS = [
    pytest.param(runner, marks=pytest.mark.skipif(runner == "V1" and V1_ABSENT is not None, reason=str(V1_ABSENT)))
    for runner in RUNNERS
]


def move_rejection_sample(monkeypatch, runner: str) -> None:
    """vLLM's rejection_sample of ``runner`` as a later release might have it: its parameters renamed."""
    module = importlib.import_module(RUNNERS[runner][1])
    original = module.rejection_sample
    monkeypatch.setattr(module, "rejection_sample", lambda *args, **kwargs: original(*args, **kwargs))


def test_entry_point_is_the_general_plugin_register():
    (entry,) = [e for e in importlib.metadata.entry_points(group="vllm.general_plugins") if e.name == "ears"]
    assert entry.value == "ears_vllm.plugin:register"
    assert entry.load() is plugin.register


def test_register_is_idempotent(fresh_registration, monkeypatch):
    from vllm.config import VllmConfig
    from vllm.v1.worker.gpu.spec_decode.rejection_sampler import RejectionSampler

    plugin.register()
    post_init, sampler_init = VllmConfig.__post_init__, RejectionSampler.__init__
    monkeypatch.setattr(plugin, "_registered", False)  # even a second full registration wraps nothing twice
    plugin.register()
    plugin.register()
    assert VllmConfig.__post_init__ is post_init and RejectionSampler.__init__ is sampler_init
    assert plugin.hook_report["MRV2"] == "patched"


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


@pytest.mark.parametrize("runner", PRESENT_RUNNERS)
def test_moved_hook_is_reported_and_only_the_guard_is_installed(fresh_registration, monkeypatch, runner):
    move_rejection_sample(monkeypatch, runner)
    adapter = RUNNERS[runner][0]
    installed = []
    monkeypatch.setattr(adapter, "install", lambda problem: installed.append(problem))
    plugin.register()
    assert "rejection_sample has parameters ('args', 'kwargs')" in plugin.hook_report[runner]
    assert len(installed) == 1 and "has parameters ('args', 'kwargs')" in installed[0]


def test_plugin_imports_without_touching_vllm_when_vllm_breaks(fresh_registration, monkeypatch):
    import vllm

    monkeypatch.delattr(vllm, "__version__")
    monkeypatch.setattr(plugin, "_validate_config_on_creation", lambda: 1 / 0)
    plugin.register()  # must not raise into vLLM
    # The samplers are guarded all the same, each runner counted as moved for the unchecked config.
    moved = "hooks moved: VllmConfig.__post_init__ could not be wrapped to check the ears config (ZeroDivisionError"
    present = ["MRV2"] if V1_ABSENT else ["V1", "MRV2"]
    assert sorted(plugin.hook_report) == ["MRV2", "V1"]
    assert all(plugin.hook_report[runner].startswith(moved) for runner in present)


def doctor(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(["doctor", *argv])
    return code, capsys.readouterr().out


def test_doctor_says_per_runner_whether_ears_vllm_verifies(capsys):
    code, out = doctor(capsys, "--additional-config", '{"ears": {"policy": "ears", "tolerance": 0.1}}')
    assert code == 0
    assert f"{VLLM_VERSION} (vllm{'-cpu' if IS_VLLM_CPU else ''})" in out
    assert '"tolerance": 0.1' in out
    present = ["MRV2"] if V1_ABSENT else ["V1", "MRV2"]
    for runner in present:
        assert re.search(rf"hooks {runner} +found", out)
        assert re.search(rf"verification {runner} +ears-vllm verifies \(policy 'ears' on vLLM {VLLM_VERSION}\)", out)
    if V1_ABSENT:  # vLLM 0.34: a runner the release does not ship is named absent, never "moved"
        assert re.search(rf"hooks V1 +absent: vLLM {VLLM_VERSION} has no V1 runner", out)
        assert "verification V1" not in out and "moved" not in out and "VLLM_USE_V2_MODEL_RUNNER" not in out
        assert re.search(rf"runner +MRV2 \(the only runner vLLM {VLLM_VERSION} has\)", out)
    picked = "MRV2" if V1_ABSENT else "V1"  # no GPU here: where both runners exist, vLLM picks V1
    assert re.search(rf"\nverification +{picked}: ears-vllm verifies", out)
    assert re.search(r"metrics +not on /metrics: .* VLLM_PLUGINS=ears,ears_metrics", out)
    default_limits = "policies=standard,ears (default) max_tolerance=0.1 (default) max_budget=none (default)"
    assert re.search(rf"request limits +{re.escape(default_limits)} \(docs/operator-limits.md\)", out)


@pytest.mark.parametrize(
    ("limits", "shown"),
    [
        (
            {"policies": ["fly"], "max_tolerance": 0.5, "max_budget": 0.05},
            "policies=standard,ears,fly (set) max_tolerance=0.5 (set) max_budget=0.05 (set)",
        ),
        (False, "none (request_limits: false, every ears_* key is refused)"),
    ],
    ids=["granted", "none"],
)
def test_doctor_prints_the_operators_request_limits(capsys, limits, shown):
    ears = {"ears": {"policy": "ears", "tolerance": 0.1, "request_limits": limits}}
    code, out = doctor(capsys, "--additional-config", json.dumps(ears))
    assert code == 0 and re.search(rf"request limits +{re.escape(shown)}", out)
    _, out = doctor(capsys, "--additional-config", '{"ears": {"policy": "standard"}}')
    assert "request limits" not in out  # a standard server takes no per-request settings at all


def test_doctor_shows_a_budget_and_whether_the_metrics_plugin_is_named(capsys, monkeypatch):
    monkeypatch.setenv("VLLM_PLUGINS", "ears,ears_metrics")
    _, out = doctor(capsys, "--additional-config", '{"ears": {"policy": "ears", "budget": 0.03}}')
    assert '"budget": 0.03' in out and re.search(r"metrics +ears_vllm_\* on /metrics", out)


def test_doctor_names_vllms_own_method_and_the_runner_without_typical(capsys, monkeypatch):
    make_v1_only(monkeypatch)  # typical: a policy MRV2 does not run
    fly = '{"method": "draft_model", "rejection_sample_method": "fly"}'
    _, out = doctor(capsys, "--additional-config", '{"ears": {"policy": "ears"}}', "--speculative-config", fly)
    assert "vLLM's own rule (vLLM was asked for rejection_sample_method='fly'" in out
    _, out = doctor(capsys, "--additional-config", '{"ears": {"policy": "typical"}}')
    assert re.search(r"verification MRV2 +REFUSES to start: policy 'typical' is not available on the MRV2", out)


@pytest.mark.parametrize(
    ("on_unsupported", "said", "code"), [("error", "REFUSES to start", 1), ("fallback", "vLLM's own rule", 0)]
)
@pytest.mark.parametrize("runner", PRESENT_RUNNERS)
def test_doctor_under_a_moved_hook_says_what_the_server_will_do(
    capsys, monkeypatch, runner, on_unsupported, said, code
):
    """And exits non-zero where the server would refuse to start: when the runner vLLM picks here is the moved one."""
    move_rejection_sample(monkeypatch, runner)
    ears = json.dumps({"ears": {"policy": "ears", "on_unsupported": on_unsupported}})
    exit_code, out = doctor(capsys, "--additional-config", ears)
    assert re.search(rf"hooks {runner} +moved: {RUNNERS[runner][1]}.rejection_sample has parameters", out)
    assert re.search(rf"verification {runner} +{said}(: | \()vLLM {VLLM_VERSION} moved the {runner} hook", out)
    picked = "MRV2" if V1_ABSENT else "V1"  # no GPU here
    assert exit_code == (code if runner == picked else 0)


def test_doctor_flags_an_invalid_config(capsys):
    assert cli.main(["doctor", "--additional-config", '{"ears": {"tolerance": 2}}']) == 1
    assert "INVALID" in capsys.readouterr().out
    limits = '{"ears": {"policy": "ears", "request_limits": {"max_tolerance": 2}}}'
    assert cli.main(["doctor", "--additional-config", limits]) == 1
    assert "INVALID: ears config key 'request_limits.max_tolerance' = 2 is out of range" in capsys.readouterr().out
