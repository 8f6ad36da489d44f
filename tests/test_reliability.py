"""What a careless user or an attacker feeds the tool: strings that reach generated code, threads,
odd files and values, interrupted writes. Each must be refused in one line or handled right."""
import json
import os
import threading

import numpy as np
import pytest
import torch

from gqa_lut.cli import main
from gqa_lut.errors import UsageError
from gqa_lut.table import load_table
from gqa_lut.io import TMP_PREFIX, write_json_atomic
from ops.tables import TABLE_DIR, default_table

GELU = TABLE_DIR / "gelu.json"


def _doc(**changes):
    doc = json.loads(GELU.read_text())
    doc.update(changes)
    return doc


# --- 1. strings that reach C, Verilog, ONNX and file names ----------------------------------

INJECTIONS = ["gelu */ int evil(void) { return 1; } /*", 'gelu"', "gelu\nint x;", "custom:a b", "custom:-x",
              "", "custom:", "x" * 65, "custom:" + "y" * 65, "gélu", "../gelu", 7, None]


@pytest.mark.parametrize("op", INJECTIONS)
def test_loader_refuses_an_op_that_is_not_a_name(op, tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(_doc(op=op)))
    with pytest.raises(UsageError, match="key 'op'") as exc:
        load_table(path)
    assert "\n" not in str(exc.value)
    assert main(["export", str(path), "--c", str(tmp_path / "t.h")]) == 2
    assert not (tmp_path / "t.h").exists()


def test_a_table_object_with_a_bad_op_is_refused_before_export():
    from gqa_lut.export_c import export_c
    t = default_table("gelu")
    with pytest.raises(UsageError, match="key 'op'"):
        export_c(t.with_(op="gelu */ int evil(void) { return 1; } /*"))
    for op in ("gelu", "custom:mish", "custom:my-act_2"):
        assert t.with_(op=op).validate().op == op


def test_fit_refuses_a_bad_name_before_fitting(tmp_path):
    for name in ("a" * 300, "-x", "a b", "a*/b"):
        assert main(["fit", "--expr", "x", "--name", name, "--out", str(tmp_path / "t.json")]) == 2
    assert not list(tmp_path.iterdir())


# --- 2. lookups from several threads --------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", [True, False])
def test_concurrent_lookups_from_four_threads(dtype, kernel, monkeypatch):
    """float16 always, and float32/bfloat16 without the compiled kernel, shared one scratch
    buffer: 4 threads got each other's codes (47 wrong outputs and 32 IndexErrors in 100)."""
    from ops.kernels import cpu_kernel
    from ops.nn import LUTSiLU
    if not kernel:
        monkeypatch.setattr(cpu_kernel, "_state", {"dll": None, "status": "off for this test"})
    m = LUTSiLU()
    gen = torch.Generator().manual_seed(0)
    inputs = [(torch.randn(50_000 + 1_000 * i, generator=gen) * 6).to(dtype) for i in range(8)]
    with torch.no_grad():
        want = [m(x) for x in inputs]
    errors, wrong = [], []
    barrier = threading.Barrier(4)

    def worker(k):
        try:
            barrier.wait()
            for rep in range(25):
                i = (k + rep) % len(inputs)
                with torch.no_grad():
                    y = m(inputs[i])
                if not torch.equal(y, want[i]):
                    wrong.append(i)
        except Exception as exc:  # noqa: BLE001 - any failure in a thread is the bug
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and wrong == []


# --- 5. checked before work starts; interrupted writes --------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--seed", "-1"], "seed -1 is not allowed"),
    (["--seed", str(2 ** 32)], "is not allowed"),
    (["--out", "x" * 300 + ".json"], "at most 255"),
    (["--out", ""], "'' is not a file name"),
    (["--out", "sub/" + "y" * 256], "at most 255"),
])
def test_fit_refuses_before_any_fitting(args, message, tmp_path, capsys):
    code = main(["fit", "--op", "gelu", "--generations", "2000", "--population", "200", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_refit_writes_none_when_one_file_is_bad(tmp_path, capsys):
    good, bad = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["fit", "--op", "hswish", "--segments", "4", "--generations", "2", "--quiet", "--out", str(good)]) == 0
    before = good.read_bytes()
    doc = json.loads(before)
    del doc["search"]["config"]["segments"]
    bad.write_text(json.dumps(doc))
    assert main(["refit", str(good), str(bad)]) == 2
    err = capsys.readouterr().err
    assert "b.json" in err and "'segments' is missing" in err
    assert good.read_bytes() == before


def test_refit_validates_every_request_before_the_first_fit(tmp_path, capsys):
    good, bad = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["fit", "--op", "hswish", "--segments", "4", "--generations", "2", "--quiet", "--out", str(good)]) == 0
    before = good.read_bytes()
    doc = json.loads(before)
    doc["search"]["config"]["seed"] = -5
    bad.write_text(json.dumps(doc))
    assert main(["refit", str(good), str(bad)]) == 2
    err = capsys.readouterr().err
    assert "b.json" in err and "seed -5 is not allowed" in err
    assert good.read_bytes() == before


def test_a_killed_write_leaves_a_temporary_the_next_write_removes(tmp_path):
    import subprocess
    import sys
    target = tmp_path / "t.json"
    # a writer killed inside the write: its temporary stays, named by its (now gone) process
    code = ("import os, signal, json; from gqa_lut import io; "
            "io.json.dump = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL); "
            f"io.write_json_atomic({str(target)!r}, {{}})")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -9
    left = [n for n in os.listdir(tmp_path) if n.startswith(TMP_PREFIX)]
    assert len(left) == 1 and not target.exists()
    write_json_atomic(target, {"a": 1})
    assert sorted(os.listdir(tmp_path)) == ["t.json"]


# --- 6. odd input accepted silently ----------------------------------------------------------

def test_complex_weights_are_refused(tmp_path, capsys):
    w = tmp_path / "w.npy"
    np.save(w, np.array([1 + 2j, 0.5j]))
    assert main(["fit", "--op", "gelu", "--weights", str(w), "--out", str(tmp_path / "t.json")]) == 2
    assert "complex128" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()


def test_duplicate_keys_in_a_table_file_are_refused(tmp_path):
    text = GELU.read_text()
    first = text.index('"0": [')
    end = text.index("]", first) + 1
    dup = text[:end] + ", " + text[first:end] + text[end:]
    path = tmp_path / "t.json"
    path.write_text(dup)
    with pytest.raises(UsageError, match="given twice"):
        load_table(path)
    path.write_text(text.replace('"0": [', '" 0": ['))
    with pytest.raises(UsageError, match="not an integer"):
        load_table(path)


def test_a_state_dict_of_another_op_is_refused():
    from ops.nn import LUTGELU, LUTSiLU
    g = LUTGELU()
    with pytest.raises(ValueError, match="takes a table of op 'gelu', got one of 'swish'"):
        g.load_state_dict(LUTSiLU().state_dict())
    with pytest.raises(ValueError, match="got one of 'swish'"):
        LUTGELU(default_table("swish"))
    x = torch.linspace(-5, 5, 101)
    assert torch.equal(g(x), LUTGELU()(x))  # the refused load changed nothing


def test_a_scale_index_outside_the_table_is_refused():
    from ops.nn import LUTGELU
    sd = LUTGELU().state_dict()
    for bad in (-1, 7, 100):
        sd["scale_index"] = torch.tensor(bad)
        with pytest.raises(ValueError, match="scale_index"):
            LUTGELU().load_state_dict(sd)


def test_range_reduced_lookup_propagates_nan():
    from ops.nn import RangeReducedLUT
    for op in ("rsqrt", "reciprocal"):
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            r = RangeReducedLUT(op)
            v = torch.tensor([float("nan"), 4.0, 2.0], dtype=dtype)
            y = r(v)
            assert torch.isnan(y[0]) and torch.isfinite(y[1:]).all()
            vg = v.clone().float().requires_grad_(True)
            r(vg).sum().backward()
            assert vg.grad[0] == 0 and torch.isfinite(vg.grad).all()


def test_norms_of_rows_near_1e30_are_unit_size():
    """float32 squares of 1e30 overflow: LUTLayerNorm gave +-5e10 (torch's own layer_norm NaN)."""
    from ops.nn import LUTGroupNorm, LUTLayerNorm, LUTRMSNorm
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, generator=gen) * 1e30
    exact = torch.nn.functional.layer_norm(x.double(), (64,))
    y = LUTLayerNorm(64)(x).double()
    assert torch.allclose(y, exact, rtol=0.02, atol=0.02)  # the rsqrt table's error, 8-bit
    rms = x.double() / x.double().pow(2).mean(-1, keepdim=True).sqrt()
    assert torch.allclose(LUTRMSNorm(64)(x).double(), rms, rtol=0.02, atol=0.02)
    gn = torch.nn.functional.group_norm(x.double(), 4)
    assert torch.allclose(LUTGroupNorm(4, 64)(x).double(), gn, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("cast", ["bfloat16", "half", "double"])
def test_a_dtype_round_trip_keeps_the_tables(cast):
    """LUTGELU().bfloat16().float() rounded its tables: 502 of 2001 outputs changed."""
    from ops.nn import LUTGELU
    x = torch.linspace(-8, 8, 2001)
    want = LUTGELU()(x)
    m = getattr(LUTGELU(), cast)().float()
    assert torch.equal(m(x), want)
    assert m.table_real.dtype == torch.float32 and m.table_real64.dtype == torch.float64


def test_regular_files_only_and_size_capped(tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for args in (["eval", str(fifo)], ["fit", "--op", "gelu", "--weights", str(fifo)],
                 ["eval", str(tmp_path)], ["eval", "/dev/zero"], ["eval", ""]):
        assert main(args) == 2  # returns at once: nothing opens the FIFO for reading
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ("regular file" in err or "not a file name" in err), err


# --- 7. custom functions outside their fitted range --------------------------------------------

@pytest.mark.slow
def test_expr_table_follows_its_function_on_every_code(tmp_path):
    """mish fitted on [-4, 4]: mish(5) came out -0.36 and mish(8) -0.59 at scale 0 (codes outside
    the range fell on lines meant for elsewhere). Now the outer lines follow its asymptotes, and
    the fit states its error on every code: checked here code by code, and small."""
    import subprocess
    import sys
    from gqa_lut.evaluator import evaluate, outside_metrics
    from gqa_lut.expr import Expression
    from gqa_lut.quantization import code_values
    out = tmp_path / "mish.json"
    proc = subprocess.run([sys.executable, "-m", "gqa_lut", "fit", "--expr", "x*tanh(log1p(exp(x)))", "--name",
                           "mish", "--range", "-4", "4", "--segments", "8", "--generations", "10", "--json",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    stated = json.loads(proc.stdout)
    t = load_table(out)
    fn = Expression("x*tanh(log1p(exp(x)))")
    codes = np.arange(-128, 128)
    for d in t.scales:
        x = code_values(codes, d)
        err = np.abs(evaluate(t, codes, d) - fn(x))
        inside = (x >= -4) & (x <= 4)
        assert err[inside].max() <= stated["metrics"]["max_abs_err"] * (1 + 1e-9)
        if (~inside).any():
            assert err[~inside].max() <= stated["outside"]["outside_max_abs_err"] * (1 + 1e-9)
    assert stated["outside"]["outside_max_abs_err"] < 0.1  # was 8.6 at 16 segments
    assert abs(float(evaluate(t, np.array([8]), 0)[0]) - 8.0) < 0.1
    assert stated["outside"] == outside_metrics(t, fn, t.metrics["max_abs_err"])


def test_fit_output_says_where_the_table_is_valid(tmp_path, capsys):
    """A function without asymptotes cannot be followed outside its range: the fit says so."""
    assert main(["fit", "--expr", "x**2", "--name", "sq", "--range", "-2", "2", "--segments", "4",
                 "--generations", "2", "--out", str(tmp_path / "sq.json")]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("outside the fitted range")]
    assert len(line) == 1 and "within the in-range max error only for" in line[0]
    assert main(["eval", str(GELU)]) == 0
    assert "every code of every scale is within the in-range max error" in capsys.readouterr().out


# --- 8. progress on long work ---------------------------------------------------------------

@pytest.mark.slow
def test_fit_progress_counts_the_phases_after_the_genetic_search():
    """The bar reached 100% after 0.3 s of a 6.4 s fit: only generations were counted."""
    from gqa_lut.config import FitConfig
    from gqa_lut.search import fit
    calls = []
    fit("gelu", FitConfig(segments=8, generations=6, patience=6), progress=lambda d, t, b: calls.append((d, t)))
    done = [d for d, _ in calls]
    total = calls[-1][1]
    assert done == sorted(done) and done[-1] == total and total > 6
    assert sum(d > 6 for d in done) >= 4  # alternate, polish, ... each a step of its own
    assert all(d < total for d in done[:-1])  # 100% only once everything is done


def test_progress_bar_on_a_terminal_only(monkeypatch):
    import io
    from gqa_lut.progress import ProgressBar
    monkeypatch.delenv("GQA_LUT_PROGRESS", raising=False)
    quiet = io.StringIO()
    ProgressBar("x", stream=quiet, total=3).update(1)
    assert quiet.getvalue() == ""  # not a TTY: nothing drawn
    monkeypatch.setenv("GQA_LUT_PROGRESS", "1")
    loud = io.StringIO()
    bar = ProgressBar("train", stream=loud, total=4)
    bar.update(2, note="loss 1.0")
    bar.close()
    assert "train [" in loud.getvalue() and "2/4" in loud.getvalue()
    closed = io.StringIO()
    closed.close()
    monkeypatch.delenv("GQA_LUT_PROGRESS")
    ProgressBar("x", stream=closed).update(1)  # a closed stream (a finished capture) is not a TTY


@pytest.mark.slow
def test_retnet_train_and_check_int_draw_progress(tmp_path):
    import subprocess
    import sys
    from retnet_integration.data import FORTUNES_DIR
    if not FORTUNES_DIR.is_dir():
        pytest.skip("apt-get install fortunes (.ci/run does)")
    env = {**os.environ, "GQA_LUT_PROGRESS": "1"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "gqa_lut", "retnet", *a], cwd=tmp_path, env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=600)
    train = run("train", "--preset", "tiny", "--steps", "4", "--out", "t.pt")
    assert train.returncode == 0, train.stderr
    assert "train [" in train.stderr and "4/4" in train.stderr
    check = run("check-int", "--checkpoint", "t.pt", "--windows", "2")
    assert check.returncode == 0, check.stderr
    assert "check-int [" in check.stderr


def test_workers_zero_names_workers(capsys):
    assert main(["fit", "--op", "gelu", "--workers", "0"]) == 2
    assert "workers 0 is not allowed" in capsys.readouterr().err  # it said "chunks 0"


# --- 9. a user's runs never overwrite the published results ---------------------------------

def test_retnet_commands_write_under_runs_by_default():
    import argparse
    from gqa_lut.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    retnet = next(a for a in sub.choices["retnet"]._actions if isinstance(a, argparse._SubParsersAction))
    defaults = []
    for name, parser in retnet.choices.items():
        for action in parser._actions:
            if isinstance(action.default, str) and action.default.endswith((".json", ".md", ".png", ".pt")):
                defaults.append((name, action.default))
            if isinstance(action.const, str) and action.const:
                defaults.append((name, action.const))
            if isinstance(action.default, list):
                defaults += [(name, d) for d in action.default]
    assert len(defaults) >= 8
    assert all(d.startswith("runs/") for _, d in defaults), defaults
