"""A dependency-free progress bar on stderr, drawn only where a person is watching (a TTY)."""
from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    def __init__(self, label: str, stream: TextIO = sys.stderr, width: int = 30, enabled: bool | None = None):
        self.label, self.stream, self.width = label, stream, width
        self.enabled = stream.isatty() if enabled is None else enabled
        self.t0 = time.perf_counter()

    def __call__(self, done: int, total: int, best: float) -> None:
        if not self.enabled:
            return
        frac = 0.0 if total <= 0 else min(1.0, done / total)
        filled = int(round(frac * self.width))
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(f"\r{self.label} [{bar}] gen {done}/{total} best {best:.3e} "
                          f"{time.perf_counter() - self.t0:5.1f}s")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
