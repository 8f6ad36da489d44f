"""Bad inputs for the fuzz tests (tests/test_fuzz.py): files a careless user or an attacker could
hand the tool, and argument vectors for every subcommand built from values near every edge."""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
from pathlib import Path

import numpy as np
from hypothesis import strategies as st

from ops.tables import TABLE_DIR

GOOD_TABLE = TABLE_DIR / "hswish.json"


def make_files(folder: Path) -> dict[str, str]:
    """Every kind of bad (and one good) input file, by name."""
    folder.mkdir(parents=True, exist_ok=True)
    text = GOOD_TABLE.read_text()
    files = {
        "table": text,
        "truncated": text[: len(text) // 2],
        "empty": "",
        "list": "[]",
        "nested": "[" * 100_000 + "]" * 100_000,
        "not_utf8": b"\xff\xfe{\x00",
        "random": bytes(range(256)) * 4,
        "dup_keys": text.replace('"segments":', '"segments": 8, "segments":', 1),
        "no_config": json.dumps({k: v for k, v in json.loads(text).items() if k != "search"}),
        "bad_config": json.dumps({**json.loads(text), "search": {"config": {"segments": "many"}}}),
        "config_list": json.dumps({**json.loads(text), "search": {"config": []}}),
        "reference": (Path(__file__).resolve().parents[2] / "shared" / "reference-tables" / "gelu_pwl_7.json")
        .read_text() if (Path(__file__).resolve().parents[2] / "shared" / "reference-tables").is_dir() else "{}",
        "ckpt_empty": "",
        "ckpt_json": text,
        "ckpt_zip": b"PK\x03\x04" + bytes(64),
    }
    paths = {}
    for name, data in files.items():
        p = folder / (name + (".pt" if name.startswith("ckpt") else ".json"))
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
        paths[name] = str(p)
    for name, arr in {"w_ok": np.linspace(-3, 3, 50), "w_complex": np.array([1 + 1j]), "w_nan": np.array([np.nan]),
                      "w_3d": np.zeros((2, 2, 2)), "w_rows": np.array([[0.0, -1.0]]), "w_empty": np.zeros(0),
                      "w_str": np.array(["a"]), "w_outside": np.array([1e6])}.items():
        p = folder / f"{name}.npy"
        np.save(p, arr)
        paths[name] = str(p)
    fifo = folder / "fifo"
    os.mkfifo(fifo)
    paths["fifo"] = str(fifo)
    paths["dir"] = str(folder)
    paths["missing"] = str(folder / "missing.json")
    paths["dev_zero"] = "/dev/zero"
    paths["through_file"] = str(folder / "table.json" / "x.json")
    link = folder / "link.json"
    link.symlink_to(folder / "table.json")
    paths["symlink"] = str(link)
    return paths


INTS = ["-1", "0", "1", "2", "3", "4", "7", "16", "17", "25", "257", "-25", str(2 ** 31), str(2 ** 63),
        "-" + str(2 ** 63), "1.5", "x", ""]
# Segments and bit widths: every invalid edge, but valid values only where a fit stays short (a
# valid 16-bit, 17-segment fit is legitimately minutes long, which is no hang).
SEGMENTS = ["-1", "0", "1", "2", "3", "4", "257", "-25", str(2 ** 63), "1.5", "x", ""]
BITS = ["-1", "0", "1", "2", "4", "8", "17", "25", "-25", str(2 ** 63), "1.5", "x", ""]
BUDGET = ["-1", "0", "1", "2", "3", str(2 ** 63), "1.5", "x", ""]  # generations, population, workers...
SCALES = ["-1", "0", "1", "2", "25", "-25", str(2 ** 63), "1.5", "x", ""]
FLOATS = ["nan", "inf", "-inf", "-1e308", "1e308", "0", "-4", "4", "1", "-1e-3", "1e-320", "x", ""]
OPS = ["gelu", "swish", "exp", "rsqrt", "decay", "nope", "", "silu"]
EXPRS = ["x", "x*", "exp(x)", "1/x", "x**1000", "log(x)", "sin(x)", "__import__('os')", "(" * 200, "x" * 5000]


def _values(kind: str, files: dict[str, str], out_dir: str) -> st.SearchStrategy[str]:
    anything = st.sampled_from(sorted(files.values()))
    outs = st.sampled_from([f"{out_dir}/o.json", f"{out_dir}/o.h", f"{out_dir}/sub/o.json", "", "x" * 300,
                            files["dir"], files["symlink"], files["through_file"], "/proc/version",
                            f"{out_dir}/o.png", f"{out_dir}/o.pt", f"{out_dir}/" + "y" * 256])
    return {"int": st.sampled_from(INTS), "segments": st.sampled_from(SEGMENTS), "bits": st.sampled_from(BITS),
            "scales": st.sampled_from(SCALES), "budget": st.sampled_from(BUDGET), "steps": st.sampled_from(["-1", "0", "1", "x", "", "1e3"]), "float": st.sampled_from(FLOATS), "op": st.sampled_from(OPS),
            "expr": st.sampled_from(EXPRS), "file": anything, "out": outs,
            "word": st.sampled_from(["mse", "max", "cpu", "cuda", "auto", "tiny", "cpu", "nope", "", "png", "svg",
                                     "quantizer", "bits", "mish", "a b", "-x"])}[kind]


# Each subcommand's options and the kind of value each takes; fit's run time is kept short by
# its own small values (generations, population), the rest fail fast or run on tiny inputs.
SUBCOMMANDS: dict[tuple[str, ...], dict[str, tuple[str, int]]] = {
    ("fit",): {"--op": ("op", 1), "--expr": ("expr", 1), "--name": ("word", 1), "--bits": ("bits", 1),
               "--param-bits": ("bits", 1), "--input-bits": ("bits", 1), "--segments": ("segments", 1),
               "--range": ("float", 2), "--scales": ("scales", 2), "--frac-bits": ("int", 1),
               "--output-bits": ("int", 1), "--output-frac-bits": ("int", 1), "--population": ("budget", 1),
               "--generations": ("budget", 1), "--patience": ("budget", 1), "--seed": ("int", 1),
               "--objective": ("word", 1), "--weights": ("file", 1), "--workers": ("budget", 1), "--out": ("out", 1),
               "--quiet": ("flag", 0), "--json": ("flag", 0)},
    ("refit",): {"": ("file", 1), "--check": ("flag", 0), "--weights": ("file", 1)},
    ("eval",): {"": ("file", 1), "--expr": ("expr", 1), "--json": ("flag", 0)},
    ("export",): {"": ("file", 1), "--c": ("out", 1), "--name": ("word", 1)},
    ("ops",): {"--json": ("flag", 0)},
    ("import-reference",): {"": ("file", 1), "--op": ("op", 1), "--range": ("float", 2),
                            "--input-bits": ("bits", 1), "--param-bits": ("bits", 1), "--out": ("out", 1),
                            "--json": ("flag", 0)},
    ("plot",): {"": ("file", 1), "--out": ("out", 1), "--scale": ("int", 1), "--range": ("float", 2),
                "--format": ("word", 1), "--convergence": ("flag", 0), "--label": ("word", 1)},
    ("sweep",): {"--op": ("op", 1), "--segments": ("segments", 1), "--bits": ("bits", 1), "--out-dir": ("out", 1),
                 "--workers": ("budget", 1), "--generations": ("budget", 1), "--seed": ("int", 1)},
    ("retnet", "train"): {"--preset": ("word", 1), "--out": ("out", 1), "--steps": ("steps", 1),
                          "--device": ("word", 1), "--seed": ("int", 1), "--corpus": ("word", 1),
                          "--max-seconds": ("int", 1)},
    ("retnet", "eval"): {"--checkpoint": ("file", 1), "--out": ("out", 1), "--device": ("word", 1)},
    ("retnet", "report"): {"": ("file", 1), "--out": ("out", 1), "--markdown": ("out", 1), "--plot": ("out", 1)},
    ("retnet", "qat-int"): {"--checkpoint": ("file", 1), "--out": ("out", 1), "--steps": ("steps", 1),
                            "--device": ("word", 1)},
    ("retnet", "export-c"): {"--checkpoint": ("file", 1), "--out": ("out", 1)},
    ("retnet", "check-int"): {"--checkpoint": ("file", 1), "--c": ("out", 1), "--windows": ("int", 1),
                              "--json": ("out", 1)},
    ("retnet", "study"): {"--checkpoint": ("file", 1), "--out": ("out", 1), "--seeds": ("int", 1),
                          "--windows": ("int", 1), "--rows": ("word", 1), "--device": ("word", 1),
                          "--merge": ("file", 1)},
}
# what keeps a fuzzed run short where all its values happen to be valid
SHORT = {("fit",): ["--generations", "1", "--population", "4", "--patience", "1"],
         ("sweep",): ["--generations", "1"], ("retnet", "train"): ["--steps", "1", "--out", "{out}/t.pt"],
         ("retnet", "qat-int"): ["--steps", "1"], ("retnet", "study"): ["--seeds", "1", "--windows", "1"],
         ("retnet", "check-int"): ["--windows", "1"]}


@st.composite
def argvs(draw, files: dict[str, str], out_dir: str) -> list[str]:
    sub = draw(st.sampled_from(sorted(SUBCOMMANDS)))
    options = SUBCOMMANDS[sub]
    chosen = draw(st.lists(st.sampled_from(sorted(options)), max_size=5, unique=True))
    argv = list(sub)
    for opt in chosen:
        kind, n = options[opt]
        if opt:
            argv.append(opt)
        if kind != "flag":
            argv += [draw(_values(kind, files, out_dir)) for _ in range(n)]
    short = [a for i, a in enumerate(SHORT.get(sub, [])) if i % 2 == 0 and a not in chosen]
    for opt in short:
        i = SHORT[sub].index(opt)
        argv += [a.format(out=out_dir) for a in SHORT[sub][i:i + 2]]
    return argv


class Hang(Exception):
    pass


def run_main(argv: list[str], seconds: int = 60) -> tuple[int, str, str]:
    """gqa-lut's main in this process, its exit code and what it printed; Hang after `seconds`."""
    from gqa_lut.cli import main

    def on_alarm(signum, frame):
        raise Hang(" ".join(argv)[:300])

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return code, out.getvalue(), err.getvalue()
