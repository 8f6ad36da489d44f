"""matplotlib with the Agg backend: figures are files, no window ever opens."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from gqa_lut.errors import UsageError  # noqa: E402
from gqa_lut.io import write_atomic

FORMATS = ("png", "svg", "pdf")


def figure_format(out, fmt: str | None = None) -> str:
    """The format of a figure file: --format, else the file's suffix, else png. A suffix that
    names another format than --format is refused rather than silently renamed."""
    from pathlib import Path

    suffix = Path(out).suffix[1:].lower()
    chosen = fmt or suffix or "png"
    if chosen not in FORMATS:
        raise UsageError(f"format {chosen!r} is not allowed: use {', '.join(FORMATS)}")
    if suffix and fmt and suffix != fmt:
        raise UsageError(f"--out {str(out)!r} ends in .{suffix} but --format is {fmt}: make them agree")
    return chosen


def save(fig, out, fmt: str | None = None) -> str:
    """Save atomically to exactly `out` (a temporary file, then rename); return the path."""
    fmt = figure_format(out, fmt)
    try:
        write_atomic(out, lambda tmp: fig.savefig(tmp, format=fmt, dpi=110, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return str(out)
