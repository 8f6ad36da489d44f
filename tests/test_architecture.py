"""The shape of the code: imports go one way (gqa_lut <- ops <- plots <- retnet_integration), the
spec in the repository is the shared one, the torch registry and the drop-ins agree, and the
torch floor pyproject.toml states is the one the code checks."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["gqa_lut", "ops", "plots", "retnet_integration"]  # each may import only those before it
# the composition root registers the other packages' commands when it builds its parser
ALLOWED_UPWARD = {("gqa_lut/cli.py", "plots"), ("gqa_lut/cli.py", "retnet_integration")}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("layer", LAYERS)
def test_no_package_imports_one_above_it(layer):
    above = set(LAYERS[LAYERS.index(layer) + 1:])
    bad = []
    for path in sorted((ROOT / layer).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for pkg in imported_packages(path) & above:
            if (rel, pkg) not in ALLOWED_UPWARD:
                bad.append(f"{rel} imports {pkg}")
    assert bad == []


def test_the_walk_sees_function_level_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from ops import registry\n    import plots.cli\n")
    assert imported_packages(f) == {"ops", "plots"}


def test_repo_spec_is_the_shared_spec():
    from gqa_lut.reference import shared_dir

    shared = shared_dir() / "lut-format.md"
    if not shared.is_file():
        pytest.skip(f"no shared spec at {shared}")
    assert (ROOT / "docs" / "lut-format.md").read_text() == shared.read_text()


def test_registry_drives_the_drop_ins():
    import ops
    from gqa_lut.functions import OPS
    from ops import modules, registry

    named = [r.drop_in for r in registry.swappable()]
    assert set(named) <= set(ops.__all__)
    for rec in registry.RECORDS:
        assert all(t in OPS for t in rec.tables), rec.name
        if rec.drop_in is not None:
            cls = getattr(modules, rec.drop_in)
            assert callable(getattr(cls, "from_float", None)), rec.drop_in
    lut_classes = {n for n in ops.__all__ if n.startswith("LUT") and n != "LUTActivation"}
    assert lut_classes == set(named)  # no drop-in without a record, no record without a drop-in
    assert registry.torch_op("silu") is registry.torch_op("swish")  # one spelling, aliases resolve


def test_torch_floor_is_stated_once_and_checked():
    from ops.registry import MIN_TORCH, check_torch_version

    text = (ROOT / "pyproject.toml").read_text()
    floor = tuple(int(v) for v in re.search(r'"torch>=(\d+)\.(\d+)"', text).groups())
    assert floor == MIN_TORCH
    check_torch_version(f"{MIN_TORCH[0]}.{MIN_TORCH[1]}.0+cpu")
    with pytest.raises(ImportError, match=r"need torch >= 2\.4"):
        check_torch_version("2.3.1")
