"""ears-vllm's counters on vLLM's own ``/metrics``, through vLLM's two plugin contracts.

Engine side (``vllm.general_plugins``: the manifest's ``metrics`` entries, :mod:`ears_vllm.seam.patches`): every
worker gets a method ``ears_vllm_stats`` that returns its verifier's counters (V1 and MRV2, read from
:mod:`ears_vllm.stats_registry`). API-server side
(``vllm.endpoint_plugins`` entry ``ears_metrics``, :class:`EarsMetricsPlugin`): a task polls that method
through ``engine_client.collective_rpc`` (every ``EARS_VLLM_METRICS_INTERVAL`` seconds, default 1) and a
Prometheus collector registered where vLLM's ``/metrics`` reads serves the latest totals. vLLM loads endpoint
plugins only when named in ``VLLM_PLUGINS``, so a server opts in with ``VLLM_PLUGINS=ears,ears_metrics``.

Why this route and not Prometheus multiprocess mode: the counts come from the process that verifies, over the
RPC vLLM offers plugins for exactly this, with no shared directory to configure and wipe between runs, and it
works whether or not the API server runs in multiprocess mode. Each verification step is counted once: with
tensor parallelism every rank of a TP group runs the same rejection sampling on the same inputs, so only
TP rank 0 of each group is counted (:func:`aggregate`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Iterator
from typing import Any

from ears_vllm import stats_registry
from ears_vllm._log import get_logger
from ears_vllm.stats import DERIVED, POLICY_COUNTERS, add_counts
from ears_vllm.stats_registry import tensor_parallel_rank

logger = get_logger()
WORKER_METHOD = "ears_vllm_stats"
REQUEST_METHOD = "ears_vllm_request_stats"
PREFIX = "ears_vllm"
# (name, counter in the stats, help); by policy when the counter is one of stats.POLICY_COUNTERS.
COUNTERS = (
    ("verification_steps", "steps", "verification steps ears-vllm ran"),
    ("draft_tokens", "drafts", "draft tokens verified by ears-vllm"),
    ("accepted_drafts", "accepted", "draft tokens accepted"),
    ("verified_positions", "random_verified", "verified positions of sampled requests (accepted + first rejected)"),
    (
        "relaxed_acceptances",
        "relaxed",
        "sampled requests' drafts accepted only because of the relaxation: the added-TV numerator",
    ),
    (
        "relaxed_surprisal_micronats",
        "relaxed_surprisal_micronats",
        "the target's -log p of the relaxed acceptances (sampled requests), summed, in micro-nats",
    ),
    ("greedy_relaxed_acceptances", "greedy_relaxed", "drafts other than the argmax accepted on greedy requests"),
    ("invalid_drafts", "invalid", "draft ids outside the target vocabulary, rejected"),
    ("fallback_steps", "fallback_steps", "steps verified by vLLM's own rule because ears-vllm's kernel failed"),
)


def worker_stats(worker: Any = None) -> dict[str, Any]:
    """This worker's counters (every runner registered in :mod:`ears_vllm.stats_registry`), and whether they count
    (TP rank 0); the method vLLM's RPC calls."""
    counts: dict[str, Any] = {}
    for source in stats_registry.sources().values():
        if source.flush is not None:
            source.flush()
        add_counts(counts, {k: v for k, v in source.stats().as_dict().items() if k != "pid" and k not in DERIVED})
    return {"counts": counts, "tp_rank": tensor_parallel_rank()}


def worker_request_stats(worker: Any = None, prefix: str = "") -> dict[str, Any]:
    """The counts of the requests whose vLLM request id starts with ``prefix`` (V1: as verified so far; MRV2: once
    finished), and whether they count (TP rank 0; the caller keeps those)."""
    counts: dict[str, Any] = {}
    for runner in stats_registry.sources():
        requests = stats_registry.requests_of(runner)
        if requests is not None:
            counts |= requests.starting_with(prefix)
    return {"counts": counts, "tp_rank": tensor_parallel_rank()}


def choices_of(response_id: str, per_worker: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A response's counts by choice index. vLLM's request id of choice i of response ``cmpl-X`` is
    ``cmpl-X-i`` plus its own suffix (``-`` and 8 characters)."""
    choices: dict[str, dict[str, Any]] = {}
    for reply in per_worker:
        for req_id, counts in reply["counts"].items():
            choice = req_id[len(response_id) + 1 :].rsplit("-", 1)[0]
            choices[choice] = counts
    return choices


def aggregate(per_worker: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Sum the workers' counters, each step once: only TP rank 0 of each group counts (the other ranks verify
    the same step again)."""
    total: dict[str, Any] = {}
    for reply in per_worker:
        if reply.get("tp_rank", 0) == 0:
            add_counts(total, reply["counts"])
    return total


class EarsCollector:
    """A Prometheus collector serving the latest polled totals (counters by policy, the running relaxed rate)."""

    def __init__(self) -> None:
        self.totals: dict[str, Any] = {}

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        by_policy = self.totals.get("by_policy", {})
        for name, key, doc in COUNTERS:
            if key in POLICY_COUNTERS:
                family = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=["policy"])
                for policy, counts in sorted(by_policy.items()):
                    family.add_metric([policy], counts.get(key, 0))
            else:
                family = CounterMetricFamily(f"{PREFIX}_{name}", doc, value=self.totals.get(key, 0))
            yield family
        rate = GaugeMetricFamily(
            f"{PREFIX}_relaxed_per_verified_position",
            "relaxed acceptances per verified position of sampled requests (the added TV per "
            "position for ears, relaxed_topk and adasd; for fly only a bound on the "
            "deviation of whole texts)",
            labels=["policy"],
        )
        for policy, counts in sorted(by_policy.items()):
            verified = counts.get("random_verified", 0)
            rate.add_metric([policy], counts.get("relaxed", 0) / verified if verified else 0.0)
        yield rate


def poll_interval_s() -> float:
    raw = os.environ.get("EARS_VLLM_METRICS_INTERVAL", "1")
    try:
        interval = float(raw)
    except ValueError:
        raise ValueError(f"environment variable EARS_VLLM_METRICS_INTERVAL = {raw!r} is not a number") from None
    if not interval > 0:
        raise ValueError(f"environment variable EARS_VLLM_METRICS_INTERVAL = {raw!r} must be > 0 seconds")
    return interval


# Under /v1, where vLLM's API-key middleware checks every request (see EarsMetricsPlugin).
REQUEST_ROUTE = "/v1/ears_vllm/requests/{response_id}"


class EarsMetricsPlugin:
    """vLLM endpoint plugin (``vllm.endpoint_plugins``: ``ears_metrics``): ears counters on ``/metrics``, the same
    totals as JSON at ``GET /ears_vllm/stats``, and one response's own counts (its relaxed acceptances, by
    choice) at ``GET /v1/ears_vllm/requests/{response id}`` (the ``id`` of an OpenAI response, e.g. ``cmpl-...``;
    each runner keeps the last 10000 requests; Model Runner V2 reads a request's counts when it finishes).

    A response's record lives under ``/v1`` so that vLLM's own authentication (``--api-key``, ``VLLM_API_KEY``)
    guards it exactly as it guards ``/v1/completions``: vLLM's middleware checks every ``/v1`` path, and the
    plugin adds no check of its own. The old path answers 307 to the guarded one. ``/ears_vllm/stats`` stays open,
    as vLLM's ``/metrics`` is: aggregate counts, nothing of any one request."""

    name = "ears_metrics"
    required_tasks = ("generate",)

    def __init__(self) -> None:
        self.collector = EarsCollector()
        self._task: asyncio.Task | None = None
        self._engine: Any = None

    def attach_router(self, app: Any) -> None:
        from fastapi import HTTPException
        from fastapi.responses import RedirectResponse

        plugin = self

        @app.get("/ears_vllm/stats")
        async def ears_vllm_stats() -> dict[str, Any]:
            return plugin.collector.totals

        @app.get("/ears_vllm/requests/{response_id}")
        async def ears_vllm_request_moved(response_id: str) -> RedirectResponse:
            return RedirectResponse(REQUEST_ROUTE.format(response_id=response_id), status_code=307)

        @app.get(REQUEST_ROUTE)
        async def ears_vllm_request(response_id: str) -> dict[str, Any]:
            if plugin._engine is None:
                raise HTTPException(status_code=503, detail="no engine")
            replies = await plugin._engine.collective_rpc(REQUEST_METHOD, args=(response_id + "-",))
            choices = choices_of(response_id, (r for r in replies if r.get("tp_rank", 0) == 0))
            if not choices:
                raise HTTPException(
                    status_code=404,
                    detail=f"no verified request of response {response_id!r} among "
                    "the last ones this server kept (on Model Runner V2: once it has finished)",
                )
            return {"id": response_id, "choices": choices}

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        if engine_client is None:
            return
        from prometheus_client import REGISTRY

        self._engine = engine_client
        interval = poll_interval_s()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            logger.warning(
                "ears-vllm: vLLM serves /metrics in Prometheus multiprocess mode (several API servers), which shows "
                "only file-backed metrics; the ears counters are at GET /ears_vllm/stats"
            )
        else:
            REGISTRY.register(self.collector)  # the registry vLLM's /metrics serves in single-process mode
        self._task = asyncio.create_task(self._poll(engine_client, interval))
        logger.info("ears-vllm: counters on /metrics (ears_vllm_*), polled every %gs", interval)

    async def _poll(self, engine_client: Any, interval: float) -> None:
        warned = False
        while True:
            try:
                self.collector.totals = aggregate(await engine_client.collective_rpc(WORKER_METHOD))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # an engine that is shutting down, or a worker without the plugin
                if not warned and not getattr(engine_client, "errored", False):
                    logger.warning(
                        "ears-vllm: cannot read the workers' counters (%s: %s); /metrics keeps the last ones read",
                        type(exc).__name__,
                        exc,
                    )
                    warned = True
            await asyncio.sleep(interval)
