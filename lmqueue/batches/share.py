"""Weighted fair share of a model's dispatch window between API keys (pure arithmetic).

The window is the number of batch lines that may be sent to Redis and not yet finished. Each key
with lines waiting or in flight is entitled to a part of it proportional to its weight
(water-filling: a key that needs less than its part leaves the rest to the others), so a key's
100-line batch gets half the window as soon as the other key's lines drain below their half,
and a key alone gets the whole window. Stateless: it depends only on what the store says is in
flight, so it survives restarts and works from several processes at once.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class Tenant:
    weight: float
    in_flight: int  # sent (or running) and not finished
    held: int  # inserted, waiting for the dispatcher


def shares(window: int, tenants: Mapping[K, Tenant]) -> dict[K, float]:
    """Each active key's part of the window (weighted water-filling)."""
    need = {k: t.in_flight + t.held for k, t in tenants.items() if t.in_flight + t.held > 0}
    out: dict[K, float] = {}
    left, keys = float(window), set(need)
    while keys:
        total_weight = sum(tenants[k].weight for k in keys)
        fair = {k: left * tenants[k].weight / total_weight for k in keys}
        sated = [k for k in keys if need[k] <= fair[k]]
        if not sated:
            out.update(fair)
            break
        for k in sated:
            out[k] = float(need[k])
            left -= need[k]
            keys.discard(k)
    return out


def allocate(window: int, tenants: Mapping[K, Tenant]) -> dict[K, int]:
    """How many held lines of each key to send now: up to its share minus what it has in
    flight, never more than the window's free room in total."""
    free = window - sum(t.in_flight for t in tenants.values())
    if free <= 0:
        return {}
    part = shares(window, tenants)
    grant = {
        k: max(0, min(t.held, math.floor(part.get(k, 0.0)) - t.in_flight))
        for k, t in tenants.items()
    }
    total = sum(grant.values())
    if total > free:  # keys over their share hold room the others are entitled to
        grant = {k: g * free // total for k, g in grant.items()}
    # Rounding down can leave room nobody gets; hand it out one line at a time to the keys
    # furthest below their share (at most one per key), so a tiny window still moves.
    spare = free - sum(grant.values())
    while spare > 0:
        room = [k for k, t in tenants.items() if grant[k] < t.held]
        if not room:
            break
        k = max(room, key=lambda k: part.get(k, 0.0) - tenants[k].in_flight - grant[k])
        grant[k] += 1
        spare -= 1
    return {k: n for k, n in grant.items() if n > 0}
