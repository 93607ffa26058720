r"""When to update the subspace and how many entries to swap (Li et al., ICLR 2024, arXiv 2402.11025).

A :class:`SwapSchedule` is a pure function of the (1-based) step counter ``t``::

    update at t   iff   t % update_every == 0  and  t < T_end,   T_end = floor(stop_updates_at * total_steps)
    f(t)          =     removal_fraction / 2 * (1 + cos(pi * t / T_end))
    swaps(k, t)   =     floor(f(t) * k)

It holds no mutable state, so a checkpoint only needs the step counter (kept in
the guide's ``ssvi_step`` buffer) to resume the schedule exactly.
"""

import math
from dataclasses import dataclass


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")


def _check_unit(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")


@dataclass(frozen=True)
class SwapSchedule:
    """Cosine-annealed subspace update schedule.

    :param int total_steps: the number of SVI steps ``T`` of the run.
    :param int update_every: ``DeltaT``, steps between updates (default 100).
    :param float removal_fraction: ``alpha``, the fraction swapped at ``t = 0`` (default 0.3).
    :param float stop_updates_at: ``T_end / T``; the subspace is frozen after (default 0.75).
    """

    total_steps: int
    update_every: int = 100
    removal_fraction: float = 0.3
    stop_updates_at: float = 0.75

    def __post_init__(self):
        _check_int("total_steps", self.total_steps, 1)
        _check_int("update_every", self.update_every, 1)
        _check_unit("removal_fraction", self.removal_fraction)
        _check_unit("stop_updates_at", self.stop_updates_at)

    @property
    def end_step(self):
        """``T_end``: no update happens at or after this step."""
        return int(math.floor(self.stop_updates_at * self.total_steps))

    def is_update_step(self, t):
        """Whether step ``t`` (1-based) ends with a subspace update."""
        return t > 0 and t % self.update_every == 0 and t < self.end_step

    def fraction(self, t):
        """The cosine-annealed swap fraction ``f(t)``."""
        if self.end_step <= 0:
            return 0.0
        return self.removal_fraction / 2.0 * (1.0 + math.cos(math.pi * t / self.end_step))

    def num_swaps(self, k, t):
        """Entries to swap in a site with ``k`` active entries at step ``t``."""
        return int(math.floor(self.fraction(t) * k))

    def update_steps(self):
        """All steps at which an update happens, in order."""
        return list(range(self.update_every, self.end_step, self.update_every))


__all__ = [
    "SwapSchedule",
]
