"""A small progress bar for long work (no dependency): redraws in place on a terminal,
prints a line every ~10% otherwise (CI logs stay short)."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str = "", unit: str = "it", enabled: bool = True, stream=None):
        self.total, self.desc, self.unit = int(total), desc, unit
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.n = 0
        self.t0 = time.perf_counter()
        self._tty = getattr(self.stream, "isatty", lambda: False)()
        self._last_draw = 0.0
        self._last_pct = -1

    def update(self, k: int = 1) -> None:
        self.n += k
        if not self.enabled:
            return
        now = time.perf_counter()
        if self._tty:
            if now - self._last_draw > 0.1 or self.n >= self.total:
                self._last_draw = now
                self._draw(now, "\r")
        else:
            pct = int(100 * self.n / max(1, self.total)) // 10 * 10
            if pct != self._last_pct:
                self._last_pct = pct
                self._draw(now, "")
                self.stream.write("\n")

    def _draw(self, now: float, prefix: str) -> None:
        dt = max(now - self.t0, 1e-9)
        frac = self.n / max(1, self.total)
        bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
        self.stream.write(f"{prefix}{self.desc} [{bar}] {self.n}/{self.total} {self.n / dt:,.1f} {self.unit}/s")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._tty:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
