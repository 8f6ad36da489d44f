"""gqa-lut: quantization-aware piecewise-linear look-up tables for integer hardware.

The front door: `from gqa_lut import fit, FitConfig, Table, load_table, save_table`. They are
imported on first use, so `gqa-lut --help` and a table load do not pay for the search.
"""
from gqa_lut.lazy import lazy_exports

__version__ = "0.2.0"
_EXPORTS = {"fit": "gqa_lut.search", "FitConfig": "gqa_lut.config", "Table": "gqa_lut.table",
            "load_table": "gqa_lut.table", "save_table": "gqa_lut.table"}
__all__ = ["__version__", *_EXPORTS]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
