"""``ears-vllm bench load --faults``: what a plugin server does when things go wrong under load, per policy.

Three faults, each on its own real ``vllm serve`` (the load run's pair, settings and request mix):

* ``unwritable-stats``: ``EARS_VLLM_STATS_PATH`` points where no file can be written. The plugin must warn once
  and go on verifying and counting: no request fails or is lost, and ``/metrics`` still serves the counts.
* ``client-disconnects``: beside the mix (whose cancelled streams close cleanly after two chunks), streaming
  requests whose TCP connection the client drops without a word after the first bytes. No other request
  fails, and the server ends with no request running (``vllm:num_requests_running`` back to 0: nothing leaks).
* ``sigterm-mid-load``: SIGTERM to ``vllm serve`` once a third of the mix has finished, on a server started
  with ``--shutdown-timeout`` (:data:`DRAIN_S`), vLLM's graceful shutdown: it stops taking requests and lets
  those in flight finish. Every request must finish or fail cleanly (a connection error or an HTTP error), none
  may hang until the client's timeout, and the server must exit within :data:`EXIT_WITHIN_S`. (vLLM's default,
  ``--shutdown-timeout 0``, aborts: requests in flight get a 500, and streams stay open until their clients
  give up: vLLM's shutdown code kills the engine before it stops the HTTP server. Not what an operator who wants
  a clean restart configures: docs/results.md.)
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from typing import Any

from ears_vllm.bench.load import LoadConfig, failures, plugin_verifies, request_mix, send_all, start_server

FAULT_REQUESTS = 200  # requests of the mix per fault (at most the load run's own number)
DROPPED_STREAMS = 16  # connections the client-disconnects fault drops mid-stream
CLIENT_TIMEOUT_S = 120.0  # a request still unanswered after this long is counted as hung
EXIT_WITHIN_S = 60.0  # SIGTERM to exit
DRAIN_S = 30  # vllm serve --shutdown-timeout: how long a graceful shutdown lets requests in flight finish


def run_faults(config: LoadConfig, *, progress: bool = True) -> list[dict]:
    """Every fault for every policy; writes ``faults.json`` and ``faults.md``."""
    rows = []
    for name, ears in config.policies.items():
        for fault in (_unwritable_stats, _client_disconnects, _sigterm_mid_load):
            workdir = config.out_dir / "faults" / f"{name}-{fault.__name__.strip('_')}"
            rows.append({"policy": name, **fault(config, ears, workdir, progress)})
    (config.out_dir / "faults.json").write_text(json.dumps(rows, indent=1))
    (config.out_dir / "faults.md").write_text(fault_table(rows) + "\n")
    return rows


def _mix(config: LoadConfig, ears: dict) -> list[dict]:
    per_request = plugin_verifies(ears)
    return request_mix(min(config.num_requests, FAULT_REQUESTS), config.seed, per_request)


def _outcome(results: list[dict]) -> dict[str, Any]:
    _, _, errors, lost = failures(results)
    return {"requests": len(results), "errors": len(errors), "lost": len(lost)}


def _unwritable_stats(config: LoadConfig, ears: dict, workdir, progress: bool) -> dict[str, Any]:
    stats_path = "/proc/ears-vllm-unwritable/stats"  # /proc takes no new files, whoever runs this
    server = start_server(config, ears, workdir, {"EARS_VLLM_STATS_PATH": stats_path})
    try:
        results = asyncio.run(send_all(server.url, server.command[2], _mix(config, ears), config.concurrency, progress))
        time.sleep(2)  # the counters' next poll
        counted = server.metric("ears_vllm_draft_tokens_total")
        healthy = server.get("/health").ok
    finally:
        server.stop()
    warnings = server.log().count("cannot write the stats file")
    row = {"fault": "unwritable-stats", **_outcome(results), "metrics_drafts": counted, "stats_warnings": warnings}
    verifies = plugin_verifies(ears)
    row["problems"] = _problems(row) + [
        problem
        for problem, bad in (
            ("the server was not healthy after the run", not healthy),
            (f"{warnings} warnings about the stats file (one expected)", verifies and warnings != 1),
            ("/metrics served no ears counts", verifies and not counted),
        )
        if bad
    ]
    row["what_happened"] = (
        f"{'one warning, ' if warnings == 1 else ''}requests served, /metrics counted {counted:.0f} drafts"
    )
    return row


async def _drop_mid_stream(url: str, model: str, prompt: str) -> bool:
    """A streaming completion whose connection is dropped (reset, no close handshake) after its first bytes;
    True when the server had begun answering."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 64, "temperature": 0.8, "stream": True})
    writer.write(
        (
            f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}"
        ).encode()
    )
    await writer.drain()
    first = await asyncio.wait_for(reader.read(256), CLIENT_TIMEOUT_S)
    writer.transport.abort()
    return first.startswith(b"HTTP/1.1 200")


def _client_disconnects(config: LoadConfig, ears: dict, workdir, progress: bool) -> dict[str, Any]:
    server = start_server(config, ears, workdir)
    model = server.command[2]

    async def load_and_drops() -> tuple[list[dict], list[bool]]:
        load = asyncio.create_task(send_all(server.url, model, _mix(config, ears), config.concurrency, progress))
        drops = await asyncio.gather(
            *(_drop_mid_stream(server.url, model, "Once upon a time") for _ in range(DROPPED_STREAMS))
        )
        return await load, list(drops)

    try:
        results, dropped = asyncio.run(load_and_drops())
        deadline = time.monotonic() + 30
        while (running := server.metric("vllm:num_requests_running")) and time.monotonic() < deadline:
            time.sleep(1)
        healthy = server.get("/health").ok
    finally:
        server.stop()
    row = {"fault": "client-disconnects", **_outcome(results), "dropped_streams": sum(dropped)}
    row["problems"] = _problems(row) + [
        problem
        for problem, bad in (
            ("the server was not healthy after the run", not healthy),
            (f"{running:.0f} request(s) still running 30 s after the clients left", running),
            (f"only {sum(dropped)} of {len(dropped)} dropped streams had begun", sum(dropped) < len(dropped)),
        )
        if bad
    ]
    row["what_happened"] = f"{sum(dropped)} streams dropped mid-answer; the rest served; 0 requests left running"
    return row


def _sigterm_mid_load(config: LoadConfig, ears: dict, workdir, progress: bool) -> dict[str, Any]:
    server = start_server(config, ears, workdir, args=("--shutdown-timeout", str(DRAIN_S)))
    requests = _mix(config, ears)
    signalled: list[float] = []

    def on_done(finished: int) -> None:
        if not signalled and finished >= len(requests) // 3:
            signalled.append(time.monotonic())
            server.process.send_signal(signal.SIGTERM)

    try:
        results = asyncio.run(
            send_all(
                server.url,
                server.command[2],
                requests,
                config.concurrency,
                progress,
                timeout_s=CLIENT_TIMEOUT_S,
                on_done=on_done,
            )
        )
        try:
            server.process.wait(max(0.0, EXIT_WITHIN_S - (time.monotonic() - signalled[0])))
            exit_s: float | None = time.monotonic() - signalled[0]
        except subprocess.TimeoutExpired:
            exit_s = None
    finally:
        server.stop()
    hung = [r for r in results if "Timeout" in (r["error"] or "")]
    finished = [r for r in results if not r["error"]]
    row = {
        "fault": "sigterm-mid-load",
        "requests": len(results),
        "finished": len(finished),
        "failed_cleanly": len(results) - len(finished) - len(hung),
        "hung": len(hung),
        "exit_code": server.process.returncode,
        "exit_s": exit_s,
    }
    row["problems"] = [
        problem
        for problem, bad in (
            (f"{len(hung)} request(s) hung until the client's {CLIENT_TIMEOUT_S:.0f} s timeout", hung),
            (f"the server had not exited {EXIT_WITHIN_S:.0f} s after SIGTERM", exit_s is None),
        )
        if bad
    ]
    errors = sorted({(r["error"] or "").split(":")[0] for r in results if r["error"]})
    row["what_happened"] = (
        f"{len(finished)} finished, {row['failed_cleanly']} failed cleanly ({', '.join(errors) or 'none'}), "
        f"{len(hung)} hung; exit code {row['exit_code']} after {exit_s:.1f} s"
        if exit_s is not None
        else f"{len(finished)} finished; the server did not exit in time"
    )
    return row


def _problems(row: dict[str, Any]) -> list[str]:
    return [
        problem
        for problem, bad in (
            (f"{row['errors']} request(s) failed", row["errors"]),
            (f"{row['lost']} request(s) lost", row["lost"]),
        )
        if bad
    ]


def fault_table(rows: list[dict]) -> str:
    lines = ["| policy | fault | requests | what happened | problems |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['policy']} | {r['fault']} | {r['requests']} | {r['what_happened']} | {_listed(r['problems'])} |"
        for r in rows
    ]
    return "\n".join(lines)


def _listed(problems: list[str]) -> str:
    return "; ".join(problems) or "none"
