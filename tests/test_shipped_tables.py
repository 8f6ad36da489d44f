"""The tables shipped in the package are what their scripts fit: anyone can reproduce them."""
import pytest

from ops.make_default_tables import comparable, fit_default
from ops.tables import default_table
from gqa_lut.table import load_table


@pytest.mark.parametrize("op", ["gelu", "rsqrt"])
def test_default_table_reproduces(op):
    assert comparable(fit_default(op)) == comparable(default_table(op))


def test_retnet_decay_table_reproduces():
    from gqa_lut.search import fit
    from retnet_integration.make_tables import CONFIG
    from retnet_integration.quantize import DECAY_TABLE
    assert comparable(fit("decay", CONFIG)) == comparable(load_table(DECAY_TABLE))
