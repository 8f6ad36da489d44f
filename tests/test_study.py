"""`gqa-lut retnet study` on the tiny preset: every row group runs, seeds give a spread, a
stopped study resumes without redoing a run, the figures are drawn, bad input is refused."""
import json

import pytest
import torch

from gqa_lut.errors import UsageError
from retnet_integration.data import FORTUNES_DIR
from retnet_integration.experiments.pipeline import run_train
from retnet_integration.experiments.study import ROWS, TENSORS, keep_only, merge_studies, ranking, run_study
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
    assert by["W4A8 all-lut, lsq"]["runs"] == 2 and by["W4A8 all-lut, lsq"]["models"] == 1
    assert (tmp_path / "study.md").read_text().count("| W") == 4
    runs = len(json.loads(out.read_text())["runs"])
    lines = []
    again = run_study(tmp_path / "t.pt", out, seeds=2, windows=2, rows=["bits"], device_name="cpu", log=lines.append)
    assert len(again["runs"]) == runs and not any(" seed " in line for line in lines)  # nothing ran again
    assert [c["runs_added"] for c in again["calls"]] == [runs, 0] and again["calls"][0]["device"] == "cpu"
    assert ranking(again["summary"], "bits") is None  # one trained model: no ranking claimed
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


@pytest.mark.slow
@needs_fortunes
def test_study_over_training_seeds_pairs_costs_and_merges(tmp_path):
    """Two trained models (training seeds 0 and 1): every row runs on both, the spread is across
    them, the costs are paired per model; two one-model studies run side by side merge into the
    same numbers as the joint study."""
    for s in (0, 1):
        run_train("tiny", tmp_path / f"s{s}.pt", "cpu", steps=5, log=lambda _: None, seed=s)
    both = run_study([tmp_path / "s0.pt", tmp_path / "s1.pt"], tmp_path / "both.json", windows=3,
                     rows=["W8A8 all-lut, lsq"], device_name="cpu", log=lambda _: None)
    assert [m["train_seed"] for m in both["models"]] == [0, 1] and both["test_windows"] == 3
    by = {s["row"]: s for s in both["summary"]}
    assert set(by) == {"float", "float + same fine-tune", "W8A8 all-lut, lsq"}
    lsq = by["W8A8 all-lut, lsq"]
    assert (lsq["models"], lsq["seeds"]) == (2, 1) and lsq["spread"] > 0
    runs = {(r["row"], r["model"]): r["test_bpc"] for r in both["runs"]}
    paired = [runs[("W8A8 all-lut, lsq", m)] / runs[("float + same fine-tune", m)] - 1 for m in (0, 1)]
    assert lsq["vs_float_finetuned"] == pytest.approx(sum(paired) / 2, rel=1e-12)
    assert lsq["vs_float_finetuned_range"] == pytest.approx([min(paired), max(paired)], rel=1e-12)
    md = (tmp_path / "both.md").read_text()
    assert "2 x 1" in md and "3 of the" in md and "evenly spaced" in md and "near-duplicate" in md
    parts = []
    for s in (0, 1):
        parts.append(tmp_path / f"p{s}.json")
        run_study(tmp_path / f"s{s}.pt", parts[-1], seeds=1, windows=3, rows=["W8A8 all-lut, lsq"],
                  device_name="cpu", log=lambda _: None)
    merged = merge_studies(parts, tmp_path / "merged.json", log=lambda _: None)
    for a, b in zip(merged["summary"], both["summary"]):
        assert a["row"] == b["row"] and a["per_model_bpc"] == pytest.approx(b["per_model_bpc"], rel=1e-9)
    with pytest.raises(UsageError, match="the same trained model"):
        merge_studies([parts[0], parts[0]], tmp_path / "m2.json")
    (tmp_path / "other.json").write_text('{"benchmark": "retnet"}')
    for bad, why in ((tmp_path / "other.json", "is not a study"), ("/dev/zero", "study file '/dev/zero'"),
                     (tmp_path / "none.json", "does not exist")):
        with pytest.raises(UsageError, match=why):
            merge_studies([parts[0], bad], tmp_path / "m3.json")
    assert not (tmp_path / "m3.json").exists()
    with pytest.raises(UsageError, match="named twice"):
        run_study([tmp_path / "s0.pt", tmp_path / "s0.pt"], tmp_path / "x.json", device_name="cpu")


def _row(name, lo, hi, group="quantizer"):
    return {"row": name, "group": group, "models": 3, "vs_float_finetuned": (lo + hi) / 2,
            "vs_float_finetuned_range": [lo, hi]}


def test_ranking_is_stated_only_where_the_ranges_separate():
    s = [_row("W8A8 all-lut, a", 0.001, 0.002), _row("W8A8 all-lut, b", 0.0015, 0.003),
         _row("W8A8 all-lut, c", 0.004, 0.005)]
    assert "{a; b} < {c}" in ranking(s)
    assert ranking([_row("W8A8 all-lut, a", 0.0, 0.01), _row("W8A8 all-lut, b", 0.005, 0.02)]).startswith("No ranking")
    one = [{**r, "models": 1} for r in s]
    assert ranking(one) is None  # one trained model: no spread, no ranking
