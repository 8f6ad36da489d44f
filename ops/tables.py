"""Default tables shipped inside the package (fitted by `python -m ops.make_default_tables`)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from gqa_lut.errors import UsageError
from gqa_lut.table import Table, load_table

TABLE_DIR = Path(__file__).resolve().parent / "tables"


@lru_cache(maxsize=None)
def default_table(op: str) -> Table:
    path = TABLE_DIR / f"{op}.json"
    if not path.exists():
        known = sorted(p.stem for p in TABLE_DIR.glob("*.json"))
        raise UsageError(f"no default table for op {op!r}: shipped tables are {', '.join(known)}")
    return load_table(path)


def as_table(table: Table | str | Path | None, op: str) -> Table:
    """A Table from a Table, a file path, or None (the op's shipped default)."""
    if table is None:
        return default_table(op)
    if isinstance(table, Table):
        return table.validate()
    return load_table(table)
