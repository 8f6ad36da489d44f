"""A dependency-free progress bar on stderr, drawn only where a person is watching (a TTY, or
GQA_LUT_PROGRESS=1 where one wants it in a log), for every command that runs for more than a
few seconds: fit, retnet train, eval, study and check-int."""
from __future__ import annotations

import os
import sys
import time
from typing import Optional, TextIO


def _wanted(stream: TextIO) -> bool:
    forced = os.environ.get("GQA_LUT_PROGRESS")
    if forced is not None:
        return forced not in ("", "0")
    try:
        return stream.isatty()
    except (ValueError, AttributeError):  # a closed or odd stream: nobody is watching it
        return False


class ProgressBar:
    """`update(done, total, note)` redraws one line; `close()` ends it. Called as
    `bar(done, total, best)` it is the progress callback of `gqa_lut.search.fit`."""

    def __init__(self, label: str, stream: Optional[TextIO] = None, width: int = 30,
                 enabled: Optional[bool] = None, total: int = 0):
        self.label, self.width, self.total = label, width, total
        self.stream = stream if stream is not None else sys.stderr  # the stream of now, not of import time
        self.enabled = _wanted(self.stream) if enabled is None else enabled
        self.t0 = time.perf_counter()
        self.done = 0

    def update(self, done: int, total: Optional[int] = None, note: str = "") -> None:
        self.done = done
        if total is not None:
            self.total = total
        if not self.enabled:
            return
        frac = 0.0 if self.total <= 0 else min(1.0, done / self.total)
        filled = int(round(frac * self.width))
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(f"\r{self.label} [{bar}] {done}/{self.total} {note} "
                          f"{time.perf_counter() - self.t0:5.1f}s\033[K")
        self.stream.flush()

    def step(self, note: str = "") -> None:
        self.update(self.done + 1, note=note)

    def __call__(self, done: int, total: int, best: float) -> None:
        self.update(done, total, f"best {best:.3e}")

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
