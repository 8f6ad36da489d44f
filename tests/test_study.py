"""`gqa-lut retnet study` on the tiny preset: every row group runs, seeds give a spread, a
stopped study resumes without redoing a run, the figures are drawn, bad input is refused."""
import json

import pytest
import torch

from gqa_lut.errors import UsageError
from retnet_integration.data import FORTUNES_DIR
from retnet_integration.experiments.pipeline import run_train
from retnet_integration.experiments.study import ROWS, TENSORS, keep_only, run_study
from retnet_integration.model import RetNet, RetNetConfig
from retnet_integration.quantize import quantize_

needs_fortunes = pytest.mark.skipif(not FORTUNES_DIR.is_dir(), reason="apt-get install fortunes (.ci/run does)")


@pytest.mark.slow
@needs_fortunes
def test_study_runs_resumes_and_plots(tmp_path):
    run_train("tiny", tmp_path / "t.pt", "cpu", steps=10, log=lambda s: None)
    out = tmp_path / "study.json"
    doc = run_study(tmp_path / "t.pt", out, seeds=2, windows=2, rows=["bits"], device_name="cpu", log=lambda s: None)
    names = {s["row"] for s in doc["summary"]}
    assert names == {"float", "float + same fine-tune"} | {r.name for r in ROWS if r.group == "bits"}
    by = {s["row"]: s for s in doc["summary"]}
    assert by["W4A8 all-lut, pact"]["seeds"] == 2 and by["float"]["seeds"] == 1
    assert by["W4A8 all-lut, lsq"]["spread"] > 0  # two seeds, two QAT data orders
    assert (tmp_path / "study.md").read_text().count("| W") == 4
    runs = len(json.loads(out.read_text())["runs"])
    lines = []
    again = run_study(tmp_path / "t.pt", out, seeds=2, windows=2, rows=["bits"], device_name="cpu", log=lines.append)
    assert len(again["runs"]) == runs and not any(" seed " in line for line in lines)  # nothing ran again
    assert [c["runs_added"] for c in again["calls"]] == [runs, 0] and again["calls"][0]["device"] == "cpu"
    run_train("tiny", tmp_path / "t.pt", "cpu", steps=5, log=lambda s: None)  # another model, same path
    with pytest.raises(UsageError, match="holds runs of another checkpoint"):
        run_study(tmp_path / "t.pt", out, seeds=2, windows=2, rows=["bits"], device_name="cpu")
    assert len(json.loads(out.read_text())["runs"]) == runs  # left as it was
    from plots.study_chart import study_chart
    study_chart(doc["summary"], tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 10_000
    with pytest.raises(UsageError, match="--seeds 0"):
        run_study(tmp_path / "t.pt", out, seeds=0)
    with pytest.raises(UsageError, match="row 'everything' is not a study row or group"):
        run_study(tmp_path / "t.pt", out, rows=["everything"], device_name="cpu")


def test_keep_only_leaves_one_tensor_type():
    torch.manual_seed(0)
    for t in TENSORS:
        m = RetNet(RetNetConfig(d_model=32, n_layers=2, n_heads=2, max_len=64))
        quantize_(m, "w8a8", [torch.randint(0, 256, (2, 16))], accumulator_bits=8)
        kept = keep_only(m, t)
        assert kept >= 1, t
        assert not any(getattr(x, "quantize_weight", False) for x in m.modules())
    m = RetNet(RetNetConfig(d_model=32, n_layers=2, n_heads=2, max_len=64))
    quantize_(m, "w8a8", [torch.randint(0, 256, (2, 16))])
    keep_only(m, "retention")
    on = [n for n, x in m.named_modules() if getattr(x, "quantize_weight", False)]
    assert on and all(".retention." in n for n in on)
