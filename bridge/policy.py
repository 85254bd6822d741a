"""What happens after a handler fails: retry when, or dead-letter why. Pure: `now_ms` is passed in.

Defaults, and why: 5 attempts with exponential backoff and jitter, 2 s doubling to a 10-minute
cap (about 2, 4, 8, 16 s plus up to 2 s of jitter each: the whole budget fits in under a minute).
Most failures worth retrying are transient (a deploy, a dropped connection, a rate limit) and
clear within seconds; jitter keeps a burst of failures from retrying in lockstep; a job that keeps
failing reaches the dead-letter queue, where a person can look at it, within a minute rather than
after Sidekiq's three weeks. Backoff is computed with tenacity's wait strategies; nothing sleeps:
the job waits in the broker's delay tiers.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tenacity import RetryCallState, wait_exponential, wait_fixed, wait_random
from tenacity.wait import wait_base

from bridge.envelope import LONGEST_S, MAX_INT
from bridge.errors import ConfigError, Permanent, Retry, describe

Backoff = wait_base | Callable[[int], float]  # a tenacity wait, or attempt -> seconds

DEFAULT_MAX_ATTEMPTS = 5
# (The jitter after the cap: tenacity's wait_exponential_jitter adds it before, so from the 10th
# attempt on every retry waited exactly 600 s, in lockstep.)
DEFAULT_BACKOFF = wait_exponential(multiplier=2, max=600, exp_base=2) + wait_random(0, 2)
MAX_ERRORS_KEPT = 10
DEFAULT_TIERS_S = (1, 5, 30, 120, 600, 3600, 21600)
# The largest attempt a backoff is asked about. An envelope may say any attempt up to 2**31 - 1,
# and tenacity's exponential wait computes its base to that power exactly before capping it:
# at 2**31 the event loop stalled for seconds and grew by gigabytes. Every backoff has long
# reached its cap by this attempt.
MAX_BACKOFF_ATTEMPT = 10_000


@dataclass(frozen=True)
class RetryPolicy:
    """How a job type retries: attempts, backoff, and which exceptions retry or give up."""

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    backoff: Backoff = DEFAULT_BACKOFF
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    give_up_on: tuple[type[BaseException], ...] = field(default=())

    def problems(self, job_type: str) -> list[str]:
        """Every way this policy cannot work, for reporting at start."""
        problems = []
        attempts = self.max_attempts
        # (not a float: NaN was never reached, so its job retried for good)
        # (nor over an Avro int: an envelope whose attempt passed it could not be read back)
        if isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= MAX_INT:
            problems.append(
                f"{job_type}: max_attempts must be a whole number from 1 to {MAX_INT:,}, not {attempts!r}"
            )
        if not (isinstance(self.backoff, wait_base) or callable(self.backoff)):
            problems.append(f"{job_type}: backoff must be a tenacity wait or a function of the attempt")
        for name in ("retry_on", "give_up_on"):
            classes = getattr(self, name)
            if not all(isinstance(c, type) and issubclass(c, BaseException) for c in classes):
                problems.append(f"{job_type}: {name} must be a tuple of exception classes")
        return problems

    def delay_s(self, attempt: int, exc: BaseException | None = None) -> float:
        """Seconds to wait after failed attempt `attempt` (1 for the first run; at most
        MAX_BACKOFF_ATTEMPT is asked about), which raised `exc`."""
        attempt = min(attempt, MAX_BACKOFF_ATTEMPT)
        if isinstance(self.backoff, wait_base):
            state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
            state.attempt_number = attempt
            if exc is not None:  # (for a wait that looks at it, as `wait_exception` does)
                state.set_exception((type(exc), exc, exc.__traceback__))
            return float(self.backoff(state))
        return float(self.backoff(attempt))


def fixed(seconds: float) -> wait_base:
    """A backoff of the same `seconds` after every failure."""
    return wait_fixed(seconds)


@dataclass(frozen=True)
class RetryAt:
    """Run again at `run_at` (epoch ms)."""

    run_at: int


@dataclass(frozen=True)
class GiveUp:
    """Dead-letter with `reason` (exhausted or permanent)."""

    reason: str
    detail: str


Decision = RetryAt | GiveUp


def decide(
    policy: RetryPolicy, exc: BaseException, attempt: int, max_attempts: int | None, now_ms: int
) -> Decision:
    """After attempt `attempt` raised `exc`: retry when, or give up why."""
    detail = describe(exc)
    if isinstance(exc, (Permanent, *policy.give_up_on)):
        return GiveUp("permanent", detail)
    if not isinstance(exc, (Retry, *policy.retry_on)):
        return GiveUp("permanent", f"{detail} (not in retry_on)")
    # (an envelope's 0, or a negative such as another language's "unlimited" -1, is unset)
    limit = max_attempts if max_attempts is not None and max_attempts > 0 else policy.max_attempts
    if attempt >= limit:
        return GiveUp("exhausted", f"{detail} (attempt {attempt} of {limit})")
    chosen = exc.delay_s if isinstance(exc, Retry) else None
    delay_s = chosen if chosen is not None else policy.delay_s(attempt, exc)
    if not delay_s <= LONGEST_S:  # (NaN too)
        return GiveUp(
            "permanent", f"{detail} (its retry delay, {delay_s!r} s, is not a time up to 100 years)"
        )
    return RetryAt(now_ms + int(max(0.0, delay_s) * 1000))  # (below zero, -inf too: at once)


def tier_for(remaining_s: float, tiers_s: tuple[float, ...]) -> float | None:
    """The delay tier to wait in: the longest not past `remaining_s`.

    None when `remaining_s` is shorter than every tier: so short a wait is better spent in the
    worker than a whole tier late. A job hops through tiers until its time comes, so a 3-day
    delay works with a 6-hour tier.
    """
    fitting = [t for t in tiers_s if t <= remaining_s]
    return max(fitting) if fitting else None


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(text: str | float) -> float:
    """Seconds from `90s`, `5m`, `2h`, `3d`, `250ms` or a plain number of seconds."""
    if isinstance(text, int | float) and not isinstance(text, bool):  # (True was 1 s)
        return float(text)
    match = _DURATION.match(text) if isinstance(text, str) else None
    if not match:
        raise ConfigError(
            f"duration {text!r}: write seconds, or a number with ms, s, m, h or d, e.g. 90s, 5m, 2h, 3d"
        )
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def tier_name(seconds: float) -> str:
    """A tier's name in topic and queue names: 1s, 30s, 2m, 1h, 6h, 250ms."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{round(seconds * 1000)}ms"  # (int() cut 4.007 s to 4006 ms)


def keep_recent(errors: list[Any], limit: int = MAX_ERRORS_KEPT) -> list[Any]:
    """The first error and the most recent ones: a long-failing job cannot grow without bound."""
    return errors if len(errors) <= limit else [errors[0], *errors[-(limit - 1) :]]
