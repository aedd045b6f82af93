"""The rollout policy's pure functions: batches, gating, halting."""

from __future__ import annotations

from collections import Counter

import pytest

from service.models import JobState as S
from service.rollout import Decision, Policy, assign_batches, decide, over_limit

pytestmark = pytest.mark.unit


def test_the_canary_is_rounded_up_and_the_rest_goes_in_batches() -> None:
    batches = assign_batches(25, Policy(canary_percent=10, batch_size=10,
                                        max_failure_percent=10))
    assert Counter(batches) == {0: 3, 1: 10, 2: 10, 3: 2}
    assert batches == sorted(batches)
    assert assign_batches(1, Policy(1, 5, 0)) == [0]  # any share of one device is one
    assert assign_batches(4, Policy(0, 3, 0)) == [0, 0, 0, 1]  # no canary: batches only
    assert assign_batches(0, Policy(10, 3, 0)) == []


def test_the_next_batch_waits_until_every_job_of_the_current_one_is_settled() -> None:
    policy = Policy(10, 10, 50)
    running = Counter({S.INSTALLED: 1, S.OFFERED: 1})
    assert decide(policy, 0, 3, running, running).decision is Decision.WAIT
    settled = Counter({S.INSTALLED: 1, S.WAITING_OFFLINE: 1})
    assert decide(policy, 0, 3, settled, settled).decision is Decision.RELEASE
    assert decide(policy, 2, 3, settled, settled).decision is Decision.FINISH
    assert decide(policy, -1, 3, Counter({S.PENDING: 5}), Counter()).decision is (
        Decision.RELEASE)


def test_the_campaign_halts_as_soon_as_failures_exceed_the_share_of_finished_jobs() -> None:
    policy = Policy(10, 10, 25)
    total = Counter({S.INSTALLED: 3, S.FAILED: 1, S.DOWNLOADING: 4})  # 1/4 = 25 %: not over
    assert decide(policy, 1, 3, total, total).decision is Decision.WAIT
    total[S.FAILED] += 1  # 2/5 = 40 % > 25 %: halt at once, even mid-batch
    verdict = decide(policy, 1, 3, total, total)
    assert verdict.decision is Decision.HALT
    assert "2 of 5 finished jobs failed" in verdict.reason and "25 %" in verdict.reason
    # Skipped and aborted jobs were never tried: they count neither way.
    assert not over_limit(0, 0, 0)
    assert decide(Policy(10, 10, 0), 0, 2, Counter({S.SKIPPED: 3, S.INSTALLED: 1}),
                  Counter({S.INSTALLED: 1})).decision is Decision.RELEASE
