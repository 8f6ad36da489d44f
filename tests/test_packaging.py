"""The built wheel, installed without the source tree: its data files (the shipped tables, the
RetNet's decay table, the C sources) come with it, and the commands run from it."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from retnet_integration.data import FORTUNES_DIR

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_and_runs_fit_and_a_retnet_command(tmp_path):
    wheels, target, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "work"
    src = tmp_path / "src"  # a copy: building in place would leave build/ in the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "runs",
                                                             "__pycache__", ".hypothesis", ".pytest_cache"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)], check=True,
                   capture_output=True, timeout=600)
    wheel = next(wheels.glob("gqa_lut-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True,
                   capture_output=True, timeout=600)
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}  # ahead of the editable install's finder
    run = lambda *args: subprocess.run([sys.executable, "-m", "gqa_lut", *args], cwd=work, env=env,  # noqa: E731
                                       capture_output=True, text=True, timeout=600)
    where = subprocess.run([sys.executable, "-c", "import gqa_lut, ops, retnet_integration; "
                            "print(gqa_lut.__file__, ops.__file__, retnet_integration.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(p.startswith(str(target)) for p in where), where
    fit = run("fit", "--op", "gelu", "--segments", "4", "--generations", "2", "--out", "g.json")
    assert fit.returncode == 0, fit.stderr
    assert (work / "g.json").exists()
    tables = subprocess.run([sys.executable, "-c", "from retnet_integration.integer.simulation import load_tables; "
                             "from ops.tables import default_table; t = load_tables(); default_table('gelu'); "
                             "print(sorted(t))"], cwd=work, env=env, capture_output=True, text=True)
    assert tables.returncode == 0, tables.stderr
    if FORTUNES_DIR.is_dir():  # .ci/run installs fortunes
        train = run("retnet", "train", "--preset", "tiny", "--steps", "3", "--out", "tiny.pt")
        assert train.returncode == 0, train.stderr
        assert (work / "tiny.pt").exists()
