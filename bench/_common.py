"""Shared bits of the benchmarks: where things are, how results are written and printed."""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from gqa_lut.io import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# The six configurations of the published GQA-LUT tables: (file stem, op, range, segments).
PUBLISHED = [
    ("gelu_pwl_7", "gelu", (-4.0, 4.0), 8), ("gelu_pwl_15", "gelu", (-4.0, 4.0), 16),
    ("hswish_pwl_7", "hswish", (-4.0, 4.0), 8), ("hswish_pwl_15", "hswish", (-4.0, 4.0), 16),
    ("exp_pwl_7", "exp", (-8.0, 0.0), 8), ("exp_pwl_15", "exp", (-8.0, 0.0), 16),
]


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def cpu_model() -> str:
    """The processor's name (/proc/cpuinfo on Linux), so a timing says what it was timed on."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (an upper bound on any one fit's in it)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict:
    return {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "cpu_model": cpu_model()}


def write_results(name: str, doc: dict) -> Path:
    path = RESULTS / name
    write_json_atomic(path, doc)
    return path


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def names_in(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    """argparse type: a comma-separated list of names from `allowed`; anything else is a
    one-line usage error (exit 2) naming the bad value and what is allowed."""
    def parse(text: str) -> list[str]:
        names = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in names if t not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"{', '.join(bad) or repr(text)} is not allowed: use a comma-separated "
                                              f"list of {', '.join(allowed)}")
        return names
    return parse


def ints_in(lo: int, hi: int) -> Callable[[str], list[int]]:
    """argparse type: a comma-separated list of integers in [lo, hi]."""
    def parse(text: str) -> list[int]:
        try:
            values = [int(t) for t in text.split(",")]
        except ValueError:
            values = []
        if not values or any(not lo <= v <= hi for v in values):
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed: use comma-separated integers from {lo} to {hi}")
        return values
    return parse


def positive_int(text: str) -> int:
    """argparse type: an integer of 1 or more."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: use an integer of 1 or more")
    return value


def timer(device: str, fn: Callable[[], Any], reps: int, batch: int = 20) -> float:
    """Median seconds of one fn() call, after a warm-up.

    On CUDA each sample is `batch` back-to-back calls between two events, divided by batch:
    the GPU stays busy while Python enqueues, so launch overhead (a few tens of microseconds
    of Python for any op, more for a Triton launch) is not counted as GPU time, for the
    native op and the LUT alike."""
    fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            import torch  # the CPU-only benchmarks never need it here
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            a.record()
            for _ in range(batch):
                fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3 / batch)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timers_interleaved(fns: list[Callable[[], Any]], reps: int) -> list[float]:
    """Median seconds of each CPU fn, sampled in rotation (one call of each per round), so that
    a slow spell of a shared machine weighs on every variant alike instead of on one of them."""
    for fn in fns:
        fn()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            samples[i].append(time.perf_counter() - t0)
    return [statistics.median(s) for s in samples]
