"""The rollout policy as pure functions: batches, gating, halting (no I/O here).

- The canary batch (batch 0) holds ceil(canary_percent % of the jobs) devices, at least
  one when the percent is above 0; the rest go in batches of `batch_size`.
- Batch k+1 is released when every job of batch k is settled (terminal, or waiting for its
  device to come online) and batch k's own failure rate is within the maximum.
- The campaign halts, with its reason, as soon as cumulative failures exceed the maximum
  share of finished jobs (failures / finished > max_failure_percent / 100).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass

from service.models import JobState

# A job in one of these states will not change again on its own.
TERMINAL = frozenset({JobState.INSTALLED, JobState.FAILED, JobState.SKIPPED, JobState.ABORTED,
                      JobState.ROLLBACK_SENT, JobState.ROLLED_BACK, JobState.CLOSED})
# Settled: terminal, or built and waiting for the device to come online (it does not hold
# back the next batch; the campaign ends `waiting-offline` if it is still there at the end).
SETTLED = TERMINAL | {JobState.WAITING_OFFLINE}
FAILURES = frozenset({JobState.FAILED})
SUCCESSES = frozenset({JobState.INSTALLED, JobState.ROLLBACK_SENT, JobState.ROLLED_BACK})
# Not counted for the failure share: never attempted.
NOT_ATTEMPTED = frozenset({JobState.SKIPPED, JobState.ABORTED, JobState.CLOSED})


@dataclass(frozen=True)
class Policy:
    """The rollout policy of a campaign."""

    canary_percent: float
    batch_size: int
    max_failure_percent: float


def assign_batches(count: int, policy: Policy) -> list[int]:
    """The batch of each of `count` jobs, in order: the canary first, then `batch_size`s."""
    if count <= 0:
        return []
    canary = min(count, math.ceil(count * policy.canary_percent / 100.0 - 1e-9))
    out = [0] * canary
    rest = count - canary
    first = 1 if canary else 0
    out.extend(first + i // policy.batch_size for i in range(rest))
    return out


class Decision(enum.Enum):
    """What the campaign does next."""

    WAIT = "wait"  # the current batch is still running
    RELEASE = "release"  # release the next batch
    HALT = "halt"  # failures over the limit
    FINISH = "finish"  # every batch settled


@dataclass(frozen=True)
class Verdict:
    """A decision and, for HALT, its reason."""

    decision: Decision
    reason: str = ""


def failure_share(counts: Mapping[JobState, int]) -> tuple[int, int]:
    """(failures, finished) over every job counted in `counts`."""
    failures = sum(counts.get(s, 0) for s in FAILURES)
    finished = failures + sum(counts.get(s, 0) for s in SUCCESSES)
    return failures, finished


def over_limit(failures: int, finished: int, max_failure_percent: float) -> bool:
    """True when failures exceed the maximum share of finished jobs."""
    return finished > 0 and failures * 100.0 > max_failure_percent * finished


def decide(policy: Policy, current_batch: int, batch_count: int,
           total: Mapping[JobState, int], batch: Mapping[JobState, int]) -> Verdict:
    """The next step, from the job counts of the whole campaign and of the current batch."""
    failures, finished = failure_share(total)
    if over_limit(failures, finished, policy.max_failure_percent):
        return Verdict(Decision.HALT,
                       f"{failures} of {finished} finished jobs failed "
                       f"({100.0 * failures / finished:.1f} % > the maximum "
                       f"{policy.max_failure_percent:g} %)")
    if current_batch >= 0 and any(n for s, n in batch.items() if s not in SETTLED):
        return Verdict(Decision.WAIT)
    if current_batch >= 0:
        b_fail, b_done = failure_share(batch)
        if over_limit(b_fail, b_done, policy.max_failure_percent):
            return Verdict(Decision.HALT,
                           f"batch {current_batch}: {b_fail} of {b_done} jobs failed "
                           f"(> the maximum {policy.max_failure_percent:g} %)")
    if current_batch + 1 >= batch_count:
        return Verdict(Decision.FINISH)
    return Verdict(Decision.RELEASE)
