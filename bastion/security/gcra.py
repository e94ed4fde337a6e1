"""GCRA (the generic cell rate algorithm), the arithmetic behind every rate limit: pure functions on one
number of state per key, the theoretical arrival time (TAT).

With `interval` = 1 / rate and `tolerance` = burst * interval, a request at `now` conforms when
max(tat, now) - now <= tolerance; it then moves the TAT on by one interval. An idle key therefore lets
burst + 1 requests through at once, then one per interval: a token bucket of burst + 1 tokens refilled at
`rate`, kept in one float instead of two.
"""

from __future__ import annotations

import math


def decide(tat: float, now: float, interval: float, tolerance: float) -> tuple[bool, float, float]:
    """(allowed, new TAT, wait): `wait` is how long a refused request must wait to conform, or for an
    allowed one, how far ahead of the steady rate the key now is (its queue, in seconds)."""
    if tat < now:
        tat = now
    ahead = tat - now
    if ahead > tolerance:
        return False, tat, ahead - tolerance
    return True, tat + interval, ahead


def remaining(tat: float, now: float, interval: float, tolerance: float) -> int:
    """Requests that would still pass right now after this state."""
    ahead = max(0.0, tat - now)
    return max(0, int((tolerance + interval - ahead) / interval + 1e-9))


def reset_after(tat: float, now: float) -> int:
    """Whole seconds until the key is back to a full burst."""
    return max(0, math.ceil(tat - now))


def delay_for(ahead: float, interval: float, nodelay: int | None) -> float:
    """nginx's `delay`: the first `nodelay` excess requests pass at once, later ones within the burst wait
    until they conform to the rate. None: nothing is delayed."""
    if nodelay is None:
        return 0.0
    wait = ahead - nodelay * interval
    return wait if wait > 1e-6 else 0.0
