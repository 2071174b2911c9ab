"""Specification of EarsConfig: every bad setting is refused with a message naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from ears_vllm.config import EarsConfig

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

BAD_DICTS = {
    "unknown-policy": ({"policy": "nope"}, "policy", "nope"),
    "policy-not-a-string": ({"policy": 3}, "policy", "3"),
    "tolerance-above-one": ({"tolerance": 1.5}, "tolerance", "1.5"),
    "tolerance-negative": ({"tolerance": -0.1}, "tolerance", "-0.1"),
    "tolerance-nan": ({"tolerance": float("nan")}, "tolerance", "nan"),
    "tolerance-inf": ({"tolerance": float("inf")}, "tolerance", "inf"),
    "tolerance-string": ({"tolerance": "0.1"}, "tolerance", "'0.1'"),
    "tolerance-bool": ({"tolerance": True}, "tolerance", "True"),
    "min-ratio-above-one": ({"min_ratio": 2}, "min_ratio", "2"),
    "typical-eps-zero": ({"typical_eps": 0.0}, "typical_eps", "0.0"),
    "typical-delta-negative": ({"typical_delta": -1}, "typical_delta", "-1"),
    "unknown-key": ({"tolerence": 0.1}, "tolerence", "0.1"),
    "not-a-mapping": ([("policy", "ears")], "mapping", "policy"),
    "unknown-budget-scope": ({"policy": "ears", "budget": 0.1, "budget_scope": "tenant"}, "budget_scope", "tenant"),
    "budget-scope-not-a-string": ({"budget_scope": 1}, "budget_scope", "1"),
}


@pytest.mark.parametrize(("data", "key", "value"), BAD_DICTS.values(), ids=BAD_DICTS.keys())
def test_from_dict_rejects_bad_settings_naming_key_and_value(data, key, value):
    with pytest.raises(ValueError) as error:
        EarsConfig.from_dict(data)
    assert key in str(error.value)
    assert value in str(error.value)


def test_errors_say_what_is_allowed():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        EarsConfig.from_dict({"tolerance": 1.5})
    with pytest.raises(ValueError, match="'standard', 'ears', 'typical'"):
        EarsConfig.from_dict({"policy": "nope"})
    with pytest.raises(ValueError, match="allowed keys"):
        EarsConfig.from_dict({"tolerence": 0.1})
    with pytest.raises(ValueError, match=r"\['request', 'server'\]"):
        EarsConfig.from_dict({"budget_scope": "tenant"})


def test_defaults_are_lossless():
    config = EarsConfig.from_dict(None)
    assert config == EarsConfig(policy="standard", tolerance=0.0, min_ratio=0.01)
    assert config.is_lossless
    assert EarsConfig(policy="ears", tolerance=0.0).is_lossless
    assert not EarsConfig(policy="ears", tolerance=0.1).is_lossless
    assert not EarsConfig(policy="typical").is_lossless


def test_integers_are_accepted_and_stored_as_floats():
    config = EarsConfig.from_dict({"policy": "ears", "tolerance": 1, "min_ratio": 0})
    assert config.tolerance == 1.0 and isinstance(config.tolerance, float)


PRESETS = {
    "strict.yaml": EarsConfig(policy="standard"),
    "ears-balanced.yaml": EarsConfig(policy="ears", tolerance=0.1),
    "ears-aggressive.yaml": EarsConfig(policy="ears", tolerance=0.3),
}


@pytest.mark.parametrize(("name", "expected"), PRESETS.items(), ids=PRESETS.keys())
def test_presets_load(name, expected):
    assert EarsConfig.from_yaml(CONFIGS / name) == expected


def test_yaml_at_top_level_works(tmp_path):
    path = tmp_path / "flat.yaml"
    path.write_text("policy: ears\ntolerance: 0.2\n")
    assert EarsConfig.from_yaml(path) == EarsConfig(policy="ears", tolerance=0.2)


BAD_YAML = {
    "missing-file": (None, "cannot be read"),
    "malformed": ("policy: [ears\n", "not valid YAML"),
    "bad-value": ("ears:\n  tolerance: 7\n", "tolerance"),
    "unknown-key": ("ears:\n  beta: 0.1\n", "beta"),
    "scalar": ("just a string\n", "mapping"),
}


@pytest.mark.parametrize(("text", "message"), BAD_YAML.values(), ids=BAD_YAML.keys())
def test_from_yaml_errors_name_the_file_and_problem(tmp_path, text, message):
    path = tmp_path / "preset.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        EarsConfig.from_yaml(path)
    assert str(path) in str(error.value)


def test_from_env_reads_variables_over_a_preset():
    env = {
        "EARS_VLLM_CONFIG": str(CONFIGS / "ears-aggressive.yaml"),
        "EARS_VLLM_TOLERANCE": "0.2",
    }
    assert EarsConfig.from_env(env) == EarsConfig(policy="ears", tolerance=0.2)
    assert EarsConfig.from_env({}) == EarsConfig()
    assert EarsConfig.from_env({"EARS_VLLM_POLICY": "typical"}).policy == "typical"


BAD_ENV = {
    "tolerance-not-a-number": ({"EARS_VLLM_TOLERANCE": "lots"}, "EARS_VLLM_TOLERANCE"),
    "tolerance-out-of-range": ({"EARS_VLLM_TOLERANCE": "3"}, "tolerance"),
    "policy-unknown": ({"EARS_VLLM_POLICY": "fast"}, "policy"),
    "min-ratio-not-a-number": ({"EARS_VLLM_MIN_RATIO": "x"}, "EARS_VLLM_MIN_RATIO"),
    "config-missing": ({"EARS_VLLM_CONFIG": "/nonexistent/preset.yaml"}, "/nonexistent/preset.yaml"),
}


@pytest.mark.parametrize(("env", "named"), BAD_ENV.values(), ids=BAD_ENV.keys())
def test_from_env_rejects_bad_values_naming_them(env, named):
    with pytest.raises(ValueError, match=named):
        EarsConfig.from_env(env)


# --- request_limits: what a request's vllm_xargs may ask (docs/operator-limits.md) ---------------------------

POLICY_LIST = "['standard', 'ears', 'typical', 'fly', 'sglang', 'relaxed_topk', 'adasd', 'mars', 'frontier', 'ersd']"
LIMITS_KEYS = "['policies', 'max_tolerance', 'max_budget']"
BAD_LIMITS = {  # request_limits value -> the whole message
    "true": (
        True,
        "ears config key 'request_limits' = True has type bool; allowed: false (no per-request settings), or a "
        f"mapping with any of the keys {LIMITS_KEYS}",
    ),
    "a-string": (
        "none",
        "ears config key 'request_limits' = 'none' has type str; allowed: false (no per-request settings), or a "
        f"mapping with any of the keys {LIMITS_KEYS}",
    ),
    "unknown-key": (
        {"max_tol": 0.5},
        f"ears config key 'request_limits' has unknown key(s) ['max_tol'] (values [0.5]); allowed keys: {LIMITS_KEYS}",
    ),
    "policies-a-string": (
        {"policies": "fly"},
        "ears config key 'request_limits.policies' = 'fly' has type str; allowed: a list of policies, each one of "
        f"{POLICY_LIST}",
    ),
    "policies-unknown": (
        {"policies": ["ears", "bogus", 3]},
        "ears config key 'request_limits.policies' = ['ears', 'bogus', 3] names unknown policies ['bogus', 3]; "
        f"allowed: a list of policies, each one of {POLICY_LIST}",
    ),
    "max-tolerance-above-1": (
        {"max_tolerance": 1.5},
        "ears config key 'request_limits.max_tolerance' = 1.5 is out of range; allowed: a number in [0, 1] or null",
    ),
    "max-tolerance-a-string": (
        {"max_tolerance": "0.5"},
        "ears config key 'request_limits.max_tolerance' = '0.5' has type str; allowed: a number in [0, 1] or null",
    ),
    "max-budget-negative": (
        {"max_budget": -0.1},
        "ears config key 'request_limits.max_budget' = -0.1 is out of range; allowed: a number in [0, 1] or null",
    ),
    "max-budget-nan": (
        {"max_budget": float("nan")},
        "ears config key 'request_limits.max_budget' = nan is not a finite number; allowed: a number in [0, 1] or null",
    ),
}


@pytest.mark.parametrize(("limits", "message"), BAD_LIMITS.values(), ids=BAD_LIMITS.keys())
def test_bad_request_limits_are_refused_naming_key_value_and_what_is_allowed(limits, message):
    with pytest.raises(ValueError) as error:
        EarsConfig.from_dict({"policy": "ears", "tolerance": 0.2, "request_limits": limits})
    assert str(error.value) == message


GRANTED = {  # (the ears config) -> the startup line's / doctor's summary of what a request may ask
    "defaults": (
        {"policy": "ears", "tolerance": 0.2},
        "policies=standard,ears (default) max_tolerance=0.2 (default) max_budget=none (default)",
    ),
    "defaults-budgeted": (
        {"policy": "fly", "budget": 0.05},
        "policies=standard,fly (default) max_tolerance=0 (default) max_budget=0.05 (default)",
    ),
    "granted": (
        {
            "policy": "ears",
            "tolerance": 0.1,
            "request_limits": {"policies": ["standard", "ears", "fly"], "max_tolerance": 0.5, "max_budget": 0.05},
        },
        "policies=standard,ears,fly (set) max_tolerance=0.5 (set) max_budget=0.05 (set)",
    ),
    "no-budget": (
        {"policy": "ears", "budget": 0.05, "request_limits": {"max_budget": 0}},
        "policies=standard,ears (default) max_tolerance=0 (default) max_budget=none (set)",
    ),
    "none": (
        {"policy": "ears", "tolerance": 0.2, "request_limits": False},
        "none (request_limits: false, every ears_* key is refused)",
    ),
}


@pytest.mark.parametrize(("data", "summary"), GRANTED.values(), ids=GRANTED.keys())
def test_request_limits_default_to_the_servers_own_settings(data, summary):
    config = EarsConfig.from_dict(data)
    assert config.granted.summary == summary
    assert EarsConfig.from_dict(config.to_dict()) == config  # the limits survive a round trip (merged, presets)


def test_request_limits_load_from_yaml(tmp_path):
    path = tmp_path / "limits.yaml"
    path.write_text(
        "ears:\n  policy: ears\n  tolerance: 0.1\n  request_limits:\n    policies: [fly]\n    max_tolerance: 0.3\n"
    )
    granted = EarsConfig.from_yaml(path).granted
    assert (granted.policies, granted.max_tolerance, granted.max_budget) == (("standard", "ears", "fly"), 0.3, None)
    path.write_text("policy: ears\nrequest_limits: false\n")
    assert not EarsConfig.from_yaml(path).granted.overrides
