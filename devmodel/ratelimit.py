"""Rate-limited logging: a hostile guest or peer must not be able to flood the log."""

from __future__ import annotations

import logging
import time


class RateLimitedLogger:
    """Lets `burst` messages through per `period` seconds, then counts what it suppressed."""

    def __init__(self, logger: logging.Logger, burst: int = 10, period: float = 10.0) -> None:
        self._logger = logger
        self._burst = burst
        self._period = period
        self._window_start = time.monotonic()
        self._sent = 0
        self._suppressed = 0

    def warning(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._window_start >= self._period:
            if self._suppressed:
                self._logger.warning("%d similar messages suppressed", self._suppressed)
            self._window_start = now
            self._sent = 0
            self._suppressed = 0
        if self._sent < self._burst:
            self._sent += 1
            self._logger.warning(msg, *args)
        else:
            self._suppressed += 1
