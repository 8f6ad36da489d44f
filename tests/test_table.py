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
    # lut-format.md section 6: the bounds every runtime can hold in 64 bits
    (lambda d: d.update(breakpoints={"1000": [1, 2]}), "scale 1000 is outside -24..24"),
    (lambda d: d.update(breakpoints={"-25": [1, 2]}), "scale -25 is outside"),
    (lambda d: d.update(frac_bits=10 ** 6), "key 'frac_bits': 1000000 is not an integer from 0 to 24"),
    (lambda d: d.update(frac_bits=25), "frac_bits"),
    (lambda d: d["breakpoints"].update({"0": [1, 10 ** 30]}), r"breakpoints.0\[1\]': 1000000000000000000000000000000 is outside"),
    (lambda d: d["breakpoints"].update({"0": [1, 2 ** 31]}), r"is outside \[-2147483648, 2147483647\]"),
    (lambda d: d.update(slopes=[0, 10 ** 40, 0]), r"slopes\[1\]"),
    (lambda d: d.update(output={"bits": 8, "frac_bits": -100}), "key 'output.frac_bits': -100"),
    (lambda d: d.update(output={"bits": 8, "frac_bits": 49}), "output.frac_bits"),
    (lambda d: d.update(output={"bits": 33, "frac_bits": 4}), "key 'output.bits': 33"),
    (lambda d: d.update(output={"bits": 1, "frac_bits": 4}), "output.bits"),
    (lambda d: d.update(input_bits=17), "input_bits"),
    (lambda d: d.update(segments=257, slopes=[0] * 257, intercepts=[0] * 257,
                        breakpoints={"0": list(range(256))}), "257 segments"),
    (lambda d: d.update(range=[-1e400, 4]), "range"),
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
    import gqa_lut.io as table_mod

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(table_mod.json, "dump", boom)
    t = Table(op="gelu", range=(-4.0, 4.0), slopes=[0, 64], intercepts=[0, 0], breakpoints={0: [0]}, frac_bits=6)
    with pytest.raises(RuntimeError):
        save_table(t, tmp_path / "out.json")
    assert list(tmp_path.iterdir()) == []


def test_output_shift_bound_names_the_key(tmp_path):
    doc = good_doc()
    doc.update(param_bits=16, input_bits=16, slopes=[-32768, 0, 1], breakpoints={"-24": [-1, 1]},
               frac_bits=0, output={"bits": 32, "frac_bits": 8})
    p = tmp_path / "t.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(UsageError, match=r"output.frac_bits': 8 shifts the largest accumulator of scale -24"):
        load_table(p)
    doc["output"]["frac_bits"] = 7  # 2^54 * 2^7 < 2^62: the largest shift this table allows
    p.write_text(json.dumps(doc))
    assert load_table(p).output.frac_bits == 7


def test_deeply_nested_json_is_one_clear_error(tmp_path):
    p = tmp_path / "deep.json"
    p.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(UsageError, match="nests JSON too deeply"):
        load_table(p)


def _table():
    return Table(op="gelu", range=(-4.0, 4.0), slopes=[0, 64], intercepts=[0, 0], breakpoints={0: [0]}, frac_bits=6)


def test_new_files_honour_the_umask_and_old_ones_keep_their_mode(tmp_path):
    import os
    import stat

    old = os.umask(0o027)
    try:
        save_table(_table(), tmp_path / "new.json")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "new.json").st_mode) == 0o640
    kept = tmp_path / "kept.json"
    kept.write_text("{}")
    os.chmod(kept, 0o604)
    save_table(_table(), kept)
    assert stat.S_IMODE(os.stat(kept).st_mode) == 0o604 and load_table(kept).segments == 2


def test_symlinks_folders_and_devices_are_never_replaced(tmp_path):
    import os

    target = tmp_path / "precious"
    target.write_text("keep me")
    link = tmp_path / "link.json"
    os.symlink(target, link)
    with pytest.raises(UsageError, match="is a symbolic link"):
        save_table(_table(), link)
    assert link.is_symlink() and target.read_text() == "keep me"
    with pytest.raises(UsageError, match="is a folder"):
        save_table(_table(), tmp_path)
    with pytest.raises(UsageError, match="not a regular file"):
        save_table(_table(), "/dev/null")
    with pytest.raises(UsageError, match="is not a folder"):
        save_table(_table(), target / "under_a_file.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "precious"]


def test_differences_integers_exact_floats_within_tolerance():
    from gqa_lut.table import differences

    a = {"slopes": [1, 2], "metrics": {"mse": 1.0000000000001e-5}, "search": {"seconds": 1.0}}
    b = {"slopes": [1, 2], "metrics": {"mse": 1e-5}, "search": {"seconds": 9.0}}
    assert differences(a, b) == []
    assert differences(a, {**b, "slopes": [1, 3]}) == ["slopes[1]: 2 against 3"]
    assert differences(a, {**b, "metrics": {"mse": 1.001e-5}}) != []
