"""Running counts of the verification steps a process has made, reported in a periodic log line.

``relaxed`` counts drafts accepted only because of the relaxation (the standard test with the same uniform
rejects them). Per *verified* position (a draft the verifier decided on: every accepted one and the first
rejected one of a request; the drafts after a rejection are never examined) it is an unbiased estimate of the
total-variation distance added to the output distribution at that position for the policies whose registry entry
says so (``PolicySpec.relaxed_rate``: ears, relaxed_topk, adasd, ersd; sglang with one-hot drafts), a sequence-level
bound for fly, and only a rate for the others; the log line says which. With
``EARS_VLLM_STATS_PATH`` set, the counts are also written there as JSON at each report (one file per
process: the process id is appended; under tensor parallelism by TP rank 0 only).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from ears_vllm.config import settings
from ears_vllm.policies.registry import relaxed_rate_label
from ears_vllm.stats_registry import tensor_parallel_rank
from ears_vllm.step import MICRONATS_PER_NAT, StepCounts

STATS_SUFFIX = "json"


# The counters kept per policy (a server verifies each request with its own policy when it asks for one): StepCounts
# fields.
POLICY_COUNTERS = ("drafts", "accepted", "random_verified", "relaxed", "greedy_relaxed", "relaxed_surprisal_micronats")
# Ratios as_dict derives from the counters (not summed across processes).
DERIVED = ("relaxed_per_verified", "relaxed_surprisal_per_verified")


def read_stats(prefix: str | os.PathLike[str]) -> dict[str, Any]:
    """The counters written under ``prefix`` (``EARS_VLLM_STATS_PATH``), summed over the processes."""
    total: dict[str, Any] = {}
    for path in Path(prefix).parent.glob(f"{Path(prefix).name}.*.{STATS_SUFFIX}"):
        add_counts(total, json.loads(path.read_text()))
    return total


def add_counts(total: dict[str, Any], counts: dict[str, Any]) -> dict[str, Any]:
    """``total += counts``, key by key, into nested mappings (``by_policy``)."""
    for key, value in counts.items():
        if isinstance(value, dict):
            add_counts(total.setdefault(key, {}), value)
        else:
            total[key] = total.get(key, 0) + value
    return total


@dataclasses.dataclass
class VerifyStats:
    steps: int = 0
    drafts: int = 0  # draft tokens verified, all requests
    accepted: int = 0
    random_drafts: int = 0  # draft tokens of requests with temperature > 0
    random_accepted: int = 0
    random_verified: int = 0  # verified positions of requests with temperature > 0 (see the module docstring)
    relaxed: int = 0  # of requests with temperature > 0: the added-TV numerator
    # Drafts other than the argmax accepted on greedy requests (fly and relaxed_topk apply there, as their sources
    # do): a deviation from greedy decoding, counted apart from the sampled requests' relaxed acceptances.
    greedy_relaxed: int = 0
    # The target's -log p of those relaxed acceptances, summed, in micro-nats (StepCounts): the deviation axis that
    # sees plausibility (a relaxed draft with p = 1e-4 weighs 9.2 nats, one with p = 0.3 weighs 1.2).
    relaxed_surprisal_micronats: int = 0
    invalid: int = 0  # draft ids outside the target vocabulary, rejected
    draft_dist_steps: int = 0  # steps whose drafter passed its distribution (else one-hot drafts: greedy, n-gram)
    shadow_steps: int = 0
    shadow_mismatches: int = 0
    fallback_steps: int = 0  # steps vLLM's own rule verified because ears-vllm's kernel failed
    # AdaSD's draft length (seam/vllm_drafter.py; 0 with the proposer untouched): proposer calls, their batched
    # draft forward passes, and the calls whose loop ended before k drafts because every request had stopped.
    proposals: int = 0
    draft_forward_passes: int = 0
    proposals_ended_early: int = 0
    # policy -> POLICY_COUNTERS, for the steps (or the requests of a step) each policy verified
    by_policy: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    log_interval_s: float = dataclasses.field(default_factory=lambda: settings().log_interval_s)
    _last_report: float = dataclasses.field(default_factory=time.monotonic)
    _write_failed: bool = False  # a stats file could not be written (warned once)

    def record(
        self,
        counts: StepCounts,  # of ints: the step's counts, summed over its requests (of this policy)
        *,
        invalid: int = 0,
        steps: int = 1,
        draft_dist_steps: int = 0,
        policy: str | None = None,
    ) -> None:
        """Add a step's counts (``steps`` > 1: several steps summed); ``policy``: which policy verified them
        (several calls per step when requests asked for different policies, ``steps`` 0 after the first)."""
        if policy is not None:
            counters = self.by_policy.setdefault(policy, dict.fromkeys(POLICY_COUNTERS, 0))
            add_counts(counters, {name: getattr(counts, name) for name in POLICY_COUNTERS})
        for name, value in counts._asdict().items():
            setattr(self, name, getattr(self, name) + value)
        self.steps += steps
        self.draft_dist_steps += draft_dist_steps
        self.invalid += invalid

    def record_shadow(self, mismatch: bool) -> None:
        self.shadow_steps += 1
        self.shadow_mismatches += int(mismatch)

    def as_dict(self) -> dict[str, float]:
        counts = {k: v for k, v in dataclasses.asdict(self).items() if not k.startswith("_") and k != "log_interval_s"}
        counts["by_policy"] = {name: dict(c) for name, c in self.by_policy.items()}
        verified = max(self.random_verified, 1)
        counts["relaxed_per_verified"] = self.relaxed / verified
        counts["relaxed_surprisal_per_verified"] = self.relaxed_surprisal_micronats / MICRONATS_PER_NAT / verified
        counts["pid"] = os.getpid()
        return counts

    def maybe_report(self, logger: logging.Logger) -> None:
        now = time.monotonic()
        if now - self._last_report < self.log_interval_s:
            return
        self._last_report = now
        self.report(logger)

    def report(self, logger: logging.Logger) -> None:
        s = self.as_dict()
        shadow = f", shadow steps={self.shadow_steps} mismatches={self.shadow_mismatches}" if self.shadow_steps else ""
        one_hot = self.draft_dist_steps == 0  # no step had the drafter's distribution: greedy drafting, n-gram
        meaning = ", ".join(f"{policy}: {relaxed_rate_label(policy, one_hot)}" for policy in self.by_policy)
        logger.info(
            "ears-vllm stats: steps=%d drafts=%d accepted=%d relaxed=%d (relaxed per verified position %.4f%s; "
            "their -log p per verified position %.4f nats)%s",
            self.steps,
            self.drafts,
            self.accepted,
            self.relaxed,
            s["relaxed_per_verified"],
            f"; as a TV: {meaning}" if meaning else "",
            s["relaxed_surprisal_per_verified"],
            shadow,
        )
        path = settings().stats_path
        if path and tensor_parallel_rank() == 0:  # the other ranks of a TP group verify the same steps again
            self._write(Path(f"{path}.{os.getpid()}.{STATS_SUFFIX}"), s, logger)

    def _write(self, target: Path, counts: dict[str, Any], logger: logging.Logger) -> None:
        """Write the counts to ``target``; a path that cannot be written is logged once and verification goes
        on (the counts stay in memory: ``/metrics`` and ``/ears_vllm/stats`` still serve them)."""
        tmp = target.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(counts))
            tmp.replace(target)
        except OSError as exc:
            if not self._write_failed:
                logger.warning(
                    "ears-vllm: cannot write the stats file %s (%s: %s); verification and counting go on, "
                    "/metrics keeps serving the counts",
                    target,
                    type(exc).__name__,
                    exc,
                )
            self._write_failed = True


class RecentRequests:
    """Each request's own counts, for the last ``limit`` requests verified (a request can read its relaxed
    acceptances, :mod:`ears_vllm.control.metrics`); keyed by vLLM's internal request id."""

    FIELDS = StepCounts._fields

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self._counts: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()

    def record(self, req_id: str, policy: str, counts: StepCounts) -> None:
        """Add one request's counts of a step (ints)."""
        mine = self._counts.pop(req_id, None) or {"policy": policy, **dict.fromkeys(self.FIELDS, 0)}
        for field, value in counts._asdict().items():
            mine[field] += value
        self._counts[req_id] = mine  # most recent last
        while len(self._counts) > self.limit:
            self._counts.popitem(last=False)

    def starting_with(self, prefix: str) -> dict[str, dict[str, Any]]:
        return {req_id: dict(c) for req_id, c in self._counts.items() if req_id.startswith(prefix)}
