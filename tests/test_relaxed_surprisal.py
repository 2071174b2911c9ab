"""The second deviation axis, counted by the plugin: the target's ``-log p(d)`` of each relaxed acceptance of a
sampled request (docs/frontier-rule.md). The relaxed rate counts moved mass; this sees where it went: a relaxed
draft with p = 0.3 weighs 1.204 nats, one with p = 1e-4 weighs 9.21.

Worked by hand: one target row p = (0.5, 0.3, 0.2) (logits log p) at every position, one-hot drafts, EARS at
tolerance 1, so the relaxed threshold is ``u - (1 - max p) = u - 0.5``:

* request "relaxes-p0.3": draft 1 (p 0.3) with u = 0.5 fails the standard test (0.3 < 0.5) and passes EARS's
  (0.3 >= 0): relaxed, -log 0.3 = 1.2039728; then draft 0 (p 0.5) with u = 0.1 passes natively;
* request "greedy": the same drafts on a greedy row, argmax match: draft 1 is rejected, nothing relaxed;
* request "native-then-rejected": draft 2 (p 0.2) with u = 0.1 passes natively, then draft 1 with u = 0.9 fails
  both (0.3 < 0.4): nothing relaxed.
"""

from __future__ import annotations

import math

import pytest
import torch

from ears_vllm.bench.e2e import _relaxed_surprisal
from ears_vllm.config import EarsConfig
from ears_vllm.reference import verify_reference
from ears_vllm.stats import VerifyStats
from ears_vllm.step import StepCounts, VerifyStep

ROW = torch.tensor([0.5, 0.3, 0.2]).log()
MINUS_LOG_03 = -math.log(0.3)  # 1.2039728


def hand_worked_step() -> VerifyStep:
    drafts = torch.tensor([1, 0, 1, 0, 2, 1])
    return VerifyStep.build(
        ROW.expand(6, 3).clone(),
        drafts,
        [2, 2, 2],
        torch.zeros(3, dtype=torch.long),
        is_greedy=torch.tensor([False, True, False]),
        uniform=torch.tensor([0.5, 0.1, 0.5, 0.1, 0.1, 0.9], dtype=torch.float64),
        config=EarsConfig(policy="ears", tolerance=1.0),
    )


def test_the_reference_sums_each_requests_relaxed_drafts_minus_log_p():
    result = verify_reference(hand_worked_step())
    assert result.num_accepted.tolist() == [2, 0, 1]
    assert result.num_relaxed.tolist() == [1, 0, 0]
    torch.testing.assert_close(result.relaxed_surprisal, torch.tensor([MINUS_LOG_03, 0.0, 0.0]))


@pytest.mark.parametrize(
    "surprisal, is_random, micronats",
    [
        pytest.param([MINUS_LOG_03], [True], [1_203_973], id="p0.3-rounded-to-the-micronat"),
        pytest.param([0.5, 2.0], [False, True], [0, 2_000_000], id="greedy-request-counts-nothing"),
        pytest.param([0.0], [True], [0], id="nothing-relaxed"),
    ],
)
def test_step_counts_keep_it_in_micronats_of_sampled_requests(surprisal, is_random, micronats):
    n = len(surprisal)
    counts = StepCounts.of_requests(
        torch.full((n,), 4),
        torch.full((n,), 2),
        torch.ones(n, dtype=torch.int32),
        torch.tensor(is_random),
        torch.tensor(surprisal, dtype=torch.float32),
    )
    assert counts.relaxed_surprisal_micronats.tolist() == micronats


def test_the_stats_report_it_per_verified_position():
    stats = VerifyStats()
    one = StepCounts(4, 2, 4, 2, relaxed=1, random_verified=3, greedy_relaxed=0, relaxed_surprisal_micronats=1_203_973)
    for _ in range(3):
        stats.record(one, policy="ears")
    counts = stats.as_dict()
    assert counts["relaxed_surprisal_micronats"] == 3_611_919
    assert counts["by_policy"]["ears"]["relaxed_surprisal_micronats"] == 3_611_919
    assert counts["relaxed_surprisal_per_verified"] == pytest.approx(3.611919 / 9)


@pytest.mark.parametrize(
    "relaxed_rate, verified, micronats, expected",
    [
        pytest.param(0.0, 100, [None], 0.0, id="nothing-relaxed-is-0-even-uncounted"),
        pytest.param(0.05, 100, [1_500_000, 500_000], 0.02, id="two-shards-summed-over-verified"),
        pytest.param(0.05, 100, [1_500_000, None], None, id="a-shard-made-before-the-count"),
        pytest.param(None, 100, [1_500_000], None, id="relaxed-rate-only-an-interval"),
    ],
)
def test_bench_e2e_row_reads_the_plugins_count(relaxed_rate, verified, micronats, expected):
    items = [({}, {} if m is None else {"relaxed_surprisal_micronats": m}) for m in micronats]
    result = _relaxed_surprisal(relaxed_rate, verified, items)
    assert result is None if expected is None else result == pytest.approx(expected)
