"""The plugin's counters (``ears_vllm.stats``): what a stats file that cannot be written does."""

from __future__ import annotations

import json
import logging

import pytest

from ears_vllm.stats import VerifyStats
from ears_vllm.step import StepCounts

STEP = StepCounts(
    drafts=4,
    accepted=2,
    random_drafts=4,
    random_accepted=2,
    relaxed=1,
    random_verified=3,
    greedy_relaxed=0,
    relaxed_surprisal_micronats=1_203_973,  # one relaxed draft with p = 0.3: -log 0.3 = 1.203973 nats
)


@pytest.mark.parametrize(
    "prefix, written",
    [
        pytest.param("{tmp}/stats", True, id="writable"),
        pytest.param("{tmp}/no-such-dir/stats", False, id="missing-directory"),
        pytest.param("/proc/ears-vllm-unwritable/stats", False, id="unwritable-filesystem"),
    ],
)
def test_a_stats_file_that_cannot_be_written_is_warned_once_and_counting_goes_on(
    tmp_path, monkeypatch, caplog, prefix, written
):
    monkeypatch.setenv("EARS_VLLM_STATS_PATH", prefix.format(tmp=tmp_path))
    stats = VerifyStats(log_interval_s=0.0)
    logger = logging.getLogger("ears-vllm-test-stats")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        for _ in range(3):
            stats.record(STEP)
            stats.report(logger)
    assert (stats.steps, stats.accepted, stats.relaxed) == (3, 6, 3)
    warnings = [r.getMessage() for r in caplog.records if "cannot write the stats file" in r.getMessage()]
    assert len(warnings) == (0 if written else 1)
    files = list(tmp_path.glob("stats.*.json"))
    assert len(files) == (1 if written else 0)
    if written:
        assert json.loads(files[0].read_text())["accepted"] == 6
