"""A rate-limited error log for servers: a peer that sends garbage in a loop cannot flood
stderr (or the disk behind it). At most ``burst`` lines per ``window_s``; what is held back
is counted and reported in one line when the window turns."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class RateLimitedLog:
    def __init__(self, prefix: str, burst: int = 10, window_s: float = 60.0,
                 stream: TextIO | None = None) -> None:
        self.prefix = prefix
        self.burst = burst
        self.window_s = window_s
        self.stream = stream
        self._start = -float("inf")
        self._count = 0
        self.suppressed = 0

    def __call__(self, message: str) -> bool:
        """Write ``message`` (one line, already cleaned by the caller) unless the window is
        full; True if written."""
        stream = self.stream or sys.stderr
        now = time.monotonic()
        if now - self._start >= self.window_s:
            if self.suppressed:
                print(f"{self.prefix}: {self.suppressed} more errors in the last "
                      f"{self.window_s:g} s were not logged", file=stream)
            self._start, self._count, self.suppressed = now, 0, 0
        if self._count >= self.burst:
            self.suppressed += 1
            return False
        self._count += 1
        print(f"{self.prefix}: {message}", file=stream)
        return True
