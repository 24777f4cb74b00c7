"""How many workers a model should have: a queue-depth target with hysteresis.

desired = clamp(ceil(backlog / target_per_worker), min_workers, max_workers). A change is applied
only once demand has stayed beyond the current count for a while: `upscale_delay` for more
workers (except from zero, which is immediate: work waits for nobody otherwise), and
`downscale_delay` for fewer, so a short lull never retires a worker that is needed again soon.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    min_workers: int
    max_workers: int
    target_per_worker: int
    upscale_delay_s: float
    downscale_delay_s: float


def desired_workers(backlog: int, limits: Limits) -> int:
    need = math.ceil(backlog / max(1, limits.target_per_worker)) if backlog > 0 else 0
    return max(limits.min_workers, min(limits.max_workers, need))


class Hysteresis:
    """Remembers recent `desired` values and turns them into a target worker count.

    Scale up to the lowest demand seen over the upscale window (demand must have stayed high);
    scale down to the highest demand seen over the downscale window (it must have stayed low).
    """

    def __init__(self, upscale_delay_s: float, downscale_delay_s: float) -> None:
        self.up_s, self.down_s = upscale_delay_s, downscale_delay_s
        self._history: deque[tuple[float, int]] = deque()
        self._since: float | None = None  # first observation: windows need this much history

    def decide(self, t: float, current: int, desired: int) -> tuple[int, str]:
        """Returns (target, why). target == current means hold."""
        if self._since is None:
            self._since = t
        self._history.append((t, desired))
        horizon = t - max(self.up_s, self.down_s)
        while self._history and self._history[0][0] < horizon:
            self._history.popleft()

        if desired > current:
            if current == 0:
                return desired, "scale up from zero: work arrived"
            low = self._window_min(t, self.up_s)
            if low is not None and low > current:
                return low, f"scale up: demand above {current} for {self.up_s:g}s"
            return current, f"hold: wait {self.up_s:g}s of demand before scaling up"
        if desired < current:
            high = self._window_max(t, self.down_s)
            if high is not None and high < current:
                return high, f"scale down: demand below {current} for {self.down_s:g}s"
            return current, f"hold: wait {self.down_s:g}s of lower demand before scaling down"
        return current, "steady"

    def _window(self, t: float, span: float) -> list[int] | None:
        assert self._since is not None
        if t - self._since < span:
            return None  # not observed long enough yet
        return [d for (at, d) in self._history if at >= t - span]

    def _window_min(self, t: float, span: float) -> int | None:
        w = self._window(t, span)
        return min(w) if w else None

    def _window_max(self, t: float, span: float) -> int | None:
        w = self._window(t, span)
        return max(w) if w else None
