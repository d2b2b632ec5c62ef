"""Bounds how long a SIGTERM waits for the job to reach a safe point (see docs/protocol.md,
"Stopping").

A flag-only SIGTERM handler keeps a job that is blocked outside ckpt's code (a collective
whose peer died, a long C call) alive until its killer loses patience: torchrun SIGKILLs 30 s
after SIGTERM. Python runs its own handlers only between bytecodes, so while the main thread is
blocked the handler does not even run. The C-level handler still writes the signal number to
the wakeup fd (``signal.set_wakeup_fd``): a watchdog thread reads it, and ends the process with
status 143 when no client call came within the bound after a SIGTERM and no save is running.
Any client call after the SIGTERM disarms it: the job reached a safe point, and will save and
exit. The bound is ``CKPT_STOP_TIMEOUT`` (``7``, ``2.5``, ``500ms``, ``10s``, ``2m``), else the
longer of 5 s and twice the longest gap seen between two safe points.

When the program already uses the wakeup fd (asyncio's signal handlers), the watchdog stays
off: only a second SIGTERM then exits at once.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
from typing import Optional

from . import protocol as P
from .errors import EnvError

ENV_STOP_TIMEOUT = "CKPT_STOP_TIMEOUT"
STOP_TIMEOUT_MIN_S = 5.0


def parse_duration_env(s: str) -> Optional[float]:
    """Seconds from ``7``, ``2.5``, ``500ms``, ``10s``, ``2m``, ``1h``; None if invalid."""
    s = s.strip()
    i = next((k for k, c in enumerate(s) if c.isascii() and c.isalpha()), len(s))
    num, unit = s[:i].strip(), s[i:] or "s"
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}.get(unit)
    if scale is None:
        return None
    try:
        v = float(num) * scale
    except ValueError:
        return None
    return v if v == v and 0.0 <= v <= 366 * 86400 else None


class StopWatch:
    def __init__(self, pid: int) -> None:
        fixed = P.env(ENV_STOP_TIMEOUT)
        self._fixed: Optional[float] = None
        if fixed is not None:
            self._fixed = parse_duration_env(fixed)
            if self._fixed is None:
                raise EnvError(
                    f"environment variable {ENV_STOP_TIMEOUT}={fixed!r} is invalid: not a duration "
                    "(e.g. 10, 2.5, 500ms, 30s, 2m)"
                )
        self._pid = pid
        self._last_call: Optional[float] = None
        self._max_gap = 0.0
        self.busy = 0
        self._done = False
        self._r: Optional[int] = None
        self._w: Optional[int] = None

    def start(self) -> bool:
        """Takes the wakeup fd and starts the thread (main thread only); False if the program
        already uses the wakeup fd."""
        r, w = os.pipe()
        os.set_blocking(w, False)
        try:
            old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except (ValueError, OSError):
            os.close(r)
            os.close(w)
            return False
        if old != -1:
            signal.set_wakeup_fd(old)
            os.close(r)
            os.close(w)
            return False
        self._r, self._w = r, w
        threading.Thread(target=self._watch, name="ckpt-stopwatch", daemon=True).start()
        return True

    def stop(self) -> None:
        """Gives the wakeup fd back (main thread) and ends the thread."""
        self._done = True
        if self._w is not None:
            try:
                if signal.set_wakeup_fd(-1) != self._w:
                    pass
            except (ValueError, OSError):
                pass

    def touch(self) -> None:
        now = time.monotonic()
        last = self._last_call
        self._last_call = now
        if last is not None and self.busy == 0:
            self._max_gap = max(self._max_gap, now - last)

    def handled(self) -> float:
        """For the save rounds of a multi-rank job, after a SIGTERM: the stop timeout. A rank
        waiting in a round is in the client, which then bounds its wait by it
        (docs/multi-rank.md, "A stop that cannot complete"), so the watchdog stands down."""
        b = self.bound()
        self._last_call = time.monotonic()
        return b

    def bound(self) -> float:
        if self._fixed is not None:
            return self._fixed
        return max(STOP_TIMEOUT_MIN_S, 2.0 * self._max_gap)

    def _watch(self) -> None:
        assert self._r is not None
        term_at: Optional[float] = None
        while not self._done:
            ready, _, _ = select.select([self._r], [], [], 0.05)
            if ready:
                try:
                    data = os.read(self._r, 512)
                except OSError:
                    data = b""
                if term_at is None and signal.SIGTERM in data and os.getpid() == self._pid:
                    term_at = time.monotonic()
            if term_at is None:
                continue
            now = time.monotonic()
            if self._last_call is not None and self._last_call > term_at:
                return  # a safe point came after the SIGTERM: the job handles the stop
            if self.busy > 0:
                term_at = now
                continue
            bound = self.bound()
            if now - term_at >= bound:
                sys.stderr.write(
                    f"ckpt: SIGTERM: the job reached no safe point (no call of the ckpt client) within "
                    f"{bound:.1f}s; exiting now with status 143 (hint: set {ENV_STOP_TIMEOUT} to wait longer)\n"
                )
                sys.stderr.flush()
                os._exit(128 + signal.SIGTERM)
