"""A table fitted again from its own file: the request it records (`search.config`), its op or
expression, and for a weighted fit the same weights (checked by digest)."""
from __future__ import annotations

from typing import Optional

import numpy as np

from gqa_lut.config import FitConfig
from gqa_lut.errors import UsageError
from gqa_lut.expr import Expression
from gqa_lut.functions import Op, custom_op, get_op
from gqa_lut.search import fit
from gqa_lut.table import Table


def recorded_request(table: Table, weights: Optional[np.ndarray] = None) -> tuple[Op, FitConfig]:
    """The op and FitConfig a table file says it was fitted with."""
    search = table.search or {}
    if "config" not in search:
        raise UsageError(f"table of {table.op!r} records no fit request (search.config): it was imported "
                         "or written by an older gqa-lut; fit it again with `gqa-lut fit`")
    cfg = FitConfig.from_json(search["config"], weights)
    if table.op.startswith("custom:"):
        if "expr" not in search:
            raise UsageError(f"custom table {table.op!r} carries no expression (search.expr) to refit")
        cfg.extra["expr"] = search["expr"]
        return custom_op(table.op.split(":", 1)[1], Expression(search["expr"]), *table.range), cfg
    return get_op(table.op), cfg


def refit(table: Table, weights: Optional[np.ndarray] = None) -> Table:
    """Fit the table again exactly as requested; compare with gqa_lut.table.differences."""
    op, cfg = recorded_request(table, weights)
    return fit(op, cfg)
