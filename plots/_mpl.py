"""matplotlib with the Agg backend: figures are files, no window ever opens."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from gqa_lut.errors import UsageError  # noqa: E402

FORMATS = ("png", "svg", "pdf")


def save(fig, out, fmt: str | None = None) -> str:
    """Save atomically-enough for figures (to a temp name, then rename); return the path."""
    import os
    from pathlib import Path

    p = Path(out)
    fmt = fmt or (p.suffix[1:].lower() if p.suffix else "png")
    if fmt not in FORMATS:
        raise UsageError(f"format {fmt!r} is not allowed: use {', '.join(FORMATS)}")
    if p.suffix[1:].lower() != fmt:
        p = p.with_suffix(f".{fmt}")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    fig.savefig(tmp, format=fmt, dpi=110, bbox_inches="tight")
    os.replace(tmp, p)
    plt.close(fig)
    return str(p)
