"""The shape of the code: imports go one way (gqa_lut <- ops <- plots <- retnet_integration; inside
ops, registry and tables <- kernels <- nn <- convert, with only ops.kernels.dispatch choosing a
backend; the RetNet's integer reference imports no torch and nothing it checks), no module
imports itself round a circle, the spec in the repository is the shared one, the torch registry
and the drop-ins agree, and the torch floor pyproject.toml states is the one the code checks."""
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


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for layer in LAYERS for p in sorted((ROOT / layer).rglob("*.py"))}


def imported_modules(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules a file imports (at any level, in functions too): `from a import b`
    counts a.b where that is a module, else a."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in known else node.module)
    return {m for m in out if m in known}


def test_no_import_circle():
    known = _modules()
    graph = {m: imported_modules(p, known) - {m} for m, p in known.items()}
    state: dict[str, int] = {}
    circles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                circles.append(" -> ".join(path[path.index(n):] + [n]) if n in path else f"{m} -> {n}")
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert circles == []


# inside ops: each sub-package may import only those before it (registry and tables are the base)
OPS_LAYERS = [("ops.registry", "ops.tables"), ("ops.kernels",), ("ops.nn",), ("ops.convert",)]
BACKENDS = {"ops.kernels.cpu_kernel", "ops.kernels.cuda_kernel", "ops.kernels.triton_attention",
            "ops.kernels.triton_lut", "ops.kernels.triton_norm", "ops.kernels.triton_quant"}


def _layer_of(module: str) -> int | None:
    for i, prefixes in enumerate(OPS_LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def test_ops_sub_packages_import_downward_only():
    known = _modules()
    bad = []
    for m, path in known.items():
        here = _layer_of(m)
        if here is None:
            continue
        for n in imported_modules(path, known):
            there = _layer_of(n)
            if there is not None and there > here:
                bad.append(f"{m} imports {n}")
    assert bad == []


def test_only_dispatch_imports_a_backend():
    """Which kernel runs a call is decided in ops/kernels/dispatch.py alone: the drop-ins, the
    conversion and the autograd layer ask it (the kernels may share helpers among themselves)."""
    known = _modules()
    bad = [f"{m} imports {n}" for m, p in known.items() if m not in BACKENDS and m != "ops.kernels.dispatch"
           for n in imported_modules(p, known) & BACKENDS if not m.startswith("tests")]
    assert bad == []


def test_integer_reference_imports_no_torch_and_not_what_it_checks():
    import subprocess
    import sys
    known = _modules()
    direct = imported_modules(known["retnet_integration.integer.reference"], known)
    assert not direct & {"retnet_integration.integer.simulation", "retnet_integration.integer.export",
                         "retnet_integration.model", "retnet_integration.quantize"}
    code = ("import sys, retnet_integration.integer.reference, retnet_integration.integer.spec; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ops')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


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
    from ops import nn as lut_nn, registry

    named = [r.drop_in for r in registry.swappable()]
    assert set(named) <= set(ops.__all__)
    for rec in registry.RECORDS:
        assert all(t in OPS for t in rec.tables), rec.name
        if rec.drop_in is not None:
            cls = getattr(lut_nn, rec.drop_in)
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


def _kernel_name(op: str) -> str:
    return op.upper() or "SLOPE"


def test_gpu_kernels_number_the_derivatives_as_the_registry_does():
    """Triton and CUDA name every derivative branch by the registry's number (no literal left),
    and the names they use are exactly the registry's."""
    from ops import registry
    from ops.kernels import cuda_kernel

    numbers = registry.derivative_numbers()
    want = {_kernel_name(op) for op in numbers}
    triton_src = (ROOT / "ops/kernels/triton_lut.py").read_text()
    bound = dict(re.findall(r'D_([A-Z_]+) = tl\.constexpr\(DERIVATIVE_NUMBERS\["([a-z_]*)"\]\)', triton_src))
    assert bound == {_kernel_name(op): op for op in numbers}
    assert set(re.findall(r"KIND == D_([A-Z_]+):", triton_src)) == want
    assert re.findall(r"KIND == \d", triton_src) == []
    cuda_src = (ROOT / "ops/kernels/csrc/lut_cuda.cu").read_text()
    body = cuda_src[cuda_src.index("float derivative("):]
    body = body[:body.index("\n}\n")]
    assert set(re.findall(r"case GQA_D_([A-Z_]+):", body)) == want
    assert re.findall(r"case \d", body) == []
    defines = dict(re.findall(r"-DGQA_D_([A-Z_]+)=(\d+)", " ".join(cuda_kernel.CUDA_FLAGS)))
    assert defines == {_kernel_name(op): str(n) for op, n in numbers.items()}


def test_call_site_maps_come_from_the_catalogue():
    from ops import registry
    from ops.convert import call_sites

    kinds = {k.rstrip("_") for k in call_sites.KIND_OF.values()}
    assert kinds == set(registry.CALL_KINDS) - {"gelu_tanh"}  # gelu_tanh is F.gelu(approximate="tanh")
    assert set(call_sites.SITE_TABLES) == set(call_sites.KIND_OP) == set(registry.CALL_KINDS)
    assert {c.site for c in registry.CALLS} <= set(call_sites.MAKERS) == set(registry.SITES)
    for c in registry.CALLS:
        assert c.op in registry.TORCH_OPS, c.name
        assert call_sites.SITE_TABLES[c.name] == registry.torch_op(c.op).tables
