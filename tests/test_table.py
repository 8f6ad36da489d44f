"""The file format: round trip, atomic writes, and a clear error naming every bad key."""
import json

import pytest

from gqa_lut.errors import UsageError
from gqa_lut.table import Table, load_table, save_table


def good_doc():
    t = Table(op="gelu", range=(-4.0, 4.0), slopes=[0, 32, 64], intercepts=[0, 1, 0],
              breakpoints={0: [-1, 1], 2: [-3, 5]}, frac_bits=6)
    return t.to_json()


def test_round_trip(tmp_path):
    p = tmp_path / "t.json"
    save_table(Table(op="gelu", range=(-4.0, 4.0), slopes=[0, 32, 64], intercepts=[0, 1, 0],
                     breakpoints={0: [-1, 1], 2: [-3, 5]}, frac_bits=6), p)
    t = load_table(p)
    assert t.slopes.tolist() == [0, 32, 64] and t.breakpoints[2].tolist() == [-3, 5]
    assert json.loads(p.read_text())["format"] == "gqa-lut/1"


BAD = [
    (lambda d: d.update(format="gqa-lut/2"), "format"),
    (lambda d: d.pop("slopes"), "slopes"),
    (lambda d: d.update(slopes=[0, 1.5, 64]), r"slopes\[1\]"),
    (lambda d: d.update(slopes=[0, 300, 64]), "slopes"),
    (lambda d: d.update(intercepts=[0, -129, 0]), "intercepts"),
    (lambda d: d["breakpoints"].update({"0": [1, 1]}), "breakpoints.0"),
    (lambda d: d["breakpoints"].update({"0": [1]}), "breakpoints.0"),
    (lambda d: d["breakpoints"].update({"x": [1, 2]}), "breakpoints"),
    (lambda d: d.update(segments=4), "segments"),
    (lambda d: d.update(range=[4, -4]), "range"),
    (lambda d: d.update(param_bits=40), "param_bits"),
    (lambda d: d.update(frac_bits=-1), "frac_bits"),
    (lambda d: d.update(output={"bits": 8}), "output"),
]


@pytest.mark.parametrize("edit,key", BAD)
def test_loader_names_the_bad_key(tmp_path, edit, key):
    doc = good_doc()
    edit(doc)
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(UsageError, match=key):
        load_table(p)


def test_not_json_and_missing_file(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        load_table(p)
    with pytest.raises(UsageError, match="does not exist"):
        load_table(tmp_path / "missing.json")


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    import gqa_lut.table as table_mod

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(table_mod.json, "dump", boom)
    t = Table(op="gelu", range=(-4.0, 4.0), slopes=[0, 64], intercepts=[0, 0], breakpoints={0: [0]}, frac_bits=6)
    with pytest.raises(RuntimeError):
        save_table(t, tmp_path / "out.json")
    assert list(tmp_path.iterdir()) == []
