"""Where a stage's wall time went: seconds per named phase, for its result and the bench.

In: laps taken as a stage passes from one phase to the next. Out: ``{phase: seconds}``
(rounded to 10 ms; a phase entered twice adds up), the ``phases`` of ``dlpipe train`` and
``dlpipe score`` results, which ``dlpipe bench overhead`` reads.
"""

from __future__ import annotations

import time


class PhaseClock:
    """Wall seconds per phase: each lap adds the time since the last one to a phase."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._last = time.time()

    def lap(self, phase: str | None = None) -> float:
        """Seconds since the last lap, added to ``phase`` (None: only returned)."""
        now = time.time()
        seconds, self._last = now - self._last, now
        if phase is not None:
            self.add(phase, seconds)
        return seconds

    def add(self, phase: str, seconds: float) -> None:
        """Count ``seconds`` to ``phase``."""
        self.phases[phase] = round(self.phases.get(phase, 0.0) + seconds, 2)
