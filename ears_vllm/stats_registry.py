"""Where this process's live counters are found: the adapters register their sources here, the readers (the
metrics' worker methods, the AdaSD drafter's counts) read them here instead of importing the adapters.

A source is read through callables, so that what it returns is the adapter's state at the time of reading (a
test that swaps an adapter's ``state.stats`` is read, not the object registered at import). The tensor-parallel
rank comes from the seam too (:func:`ears_vllm.seam.hooks.tensor_parallel_rank`): 0 until it registers, as
outside vLLM's workers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class StatsSource:
    """One runner's counters: its :class:`ears_vllm.stats.VerifyStats`, what brings them up to date (MRV2 keeps
    its counts on the device until read), and its per-request counts (:class:`ears_vllm.stats.RecentRequests`)."""

    stats: Callable[[], Any]
    flush: Callable[[], None] | None = None
    requests: Callable[[], Any] | None = None


_sources: dict[str, StatsSource] = {}
_rank: list[Callable[[], int]] = []


def register(runner: str, source: StatsSource) -> None:
    """``runner``'s counters are read from ``source`` (a second registration replaces the first)."""
    _sources[runner] = source


def sources() -> dict[str, StatsSource]:
    """The registered runners' sources, by runner ("V1", "MRV2")."""
    return dict(_sources)


def stats_of(runner: str) -> Any:
    """``runner``'s live :class:`ears_vllm.stats.VerifyStats` (KeyError when its adapter has not registered)."""
    return _sources[runner].stats()


def requests_of(runner: str) -> Any:
    """``runner``'s :class:`ears_vllm.stats.RecentRequests`, or None when it keeps none (or has not registered)."""
    source = _sources.get(runner)
    return None if source is None or source.requests is None else source.requests()


def register_rank(rank: Callable[[], int]) -> None:
    """Where this worker's tensor-parallel rank is read (the seam, which asks vLLM)."""
    _rank[:] = [rank]


def tensor_parallel_rank() -> int:
    """This worker's rank in its tensor-parallel group (0 outside vLLM's workers): under tensor parallelism every
    rank runs the same rejection sampling, so only rank 0's counts are reported, and each step counts once."""
    return _rank[0]() if _rank else 0
