"""The exact steps and what they promise: exact integer lines, provably optimal single-scale
fits, a lower bound below every table, monotone in segments, minimax never worse than mse,
and memory that stays bounded at many segments."""
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gqa_lut.config import FitConfig, validate_config
from gqa_lut.exact import exact_lines, lower_bound, minimax_bound, minimax_lower_bound, scale_optimum
from gqa_lut.functions import get_op
from gqa_lut.linefit import quadratic_error
from gqa_lut.localsearch import resegment
from gqa_lut.problem import build_problem
from gqa_lut.search import fit

ROOT = Path(__file__).resolve().parents[1]


def moments_of(x, w, f):
    wx, wf = w * x, w * f
    return np.array([w.sum(), wx.sum(), (wx * x).sum(), wf.sum(), (wx * f).sum(), (wf * f).sum()])


def brute_line(x, w, f, F, pmin, pmax):
    best = np.inf
    for K in range(pmin, pmax + 1):
        for B in range(pmin, pmax + 1):
            err = np.ldexp(np.float64(K), -F) * x + np.ldexp(np.float64(B), -F) - f
            best = min(best, float((w * err * err).sum()))
    return best


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 6), F=st.integers(0, 4), seed=st.integers(0, 10_000), P=st.integers(3, 5))
def test_exact_lines_equal_brute_force_over_every_integer_line(n, F, seed, P):
    rng = np.random.default_rng(seed)
    x = np.ldexp(rng.integers(-8, 8, n).astype(float), -rng.integers(0, 3))
    f, w = rng.normal(0, 2, n), rng.uniform(0.1, 1, n)
    pmin, pmax = -(1 << (P - 1)), (1 << (P - 1)) - 1
    K, B, E = exact_lines(moments_of(x, w, f)[:, None], F, pmin, pmax)
    want = brute_line(x, w, f, F, pmin, pmax)
    assert E[0] == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert quadratic_error(moments_of(x, w, f)[:, None], K, B, F)[0] == pytest.approx(want, rel=1e-9, abs=1e-12)


def tiny(op, segments, d, input_bits=4, param_bits=4, rng=None):
    spec = validate_config(get_op(op), FitConfig(segments=segments, param_bits=param_bits, input_bits=input_bits,
                                                 frac_bits=2, range=rng or get_op(op).range, scale_range=(d, d)))
    return build_problem(spec)


def brute_scale_optimum(problem) -> float:
    """Every split of the scale's codes into at most N runs (tails optionally first/last), each
    run with its best integer line over the whole P-bit range."""
    sel = problem.inside[0]
    x, w, f = problem.x[0, sel], problem.w[0, sel], problem.f[0, sel]
    T, N, F = x.size, problem.segments, problem.frac_bits
    line = {}

    def run_cost(s, t, fixed=None):
        if fixed is not None:
            err = np.ldexp(np.float64(fixed[0]), -F) * x[s:t] + np.ldexp(np.float64(fixed[1]), -F) - f[s:t]
            return float((w[s:t] * err * err).sum())
        if (s, t) not in line:
            line[s, t] = brute_line(x[s:t], w[s:t], f[s:t], F, problem.pmin, problem.pmax)
        return line[s, t]

    left, right = problem.left_tail, problem.right_tail
    free = N - (left is not None) - (right is not None)
    best = np.inf
    for a in range(T + 1) if left is not None else [0]:          # codes 0..a-1 on the left tail
        for b in range(a, T + 1) if right is not None else [T]:  # codes b.. on the right tail
            inner = b - a
            base = (run_cost(0, a, left) if a else 0.0) + (run_cost(b, T, right) if b < T else 0.0)
            if inner == 0:
                best = min(best, base)
            for m in range(1, min(free, inner) + 1):
                for cuts in itertools.combinations(range(a + 1, b), m - 1):
                    edges = (a, *cuts, b)
                    best = min(best, base + sum(run_cost(s, t) for s, t in zip(edges, edges[1:])))
    return best


@pytest.mark.parametrize("op,segments,d", [("gelu", 3, 1), ("exp", 3, 2), ("rsqrt", 2, 2), ("swish", 4, 0),
                                           ("tanh", 3, 1)])
def test_single_scale_optimum_equals_brute_force(op, segments, d):
    problem = tiny(op, segments, d, rng={"swish": (-3.0, 3.0), "rsqrt": (1.0, 3.0)}.get(op))
    opt = scale_optimum(problem, 0)
    assert opt.cost == pytest.approx(brute_scale_optimum(problem), rel=1e-9, abs=1e-15)
    # and its lines, placed by the breakpoint DP, reach it: a valid table with that error
    idx, value = resegment(problem, opt.K[None], opt.B[None])
    assert value[0] == pytest.approx(opt.cost, rel=1e-6, abs=1e-12)


def test_single_scale_fit_is_optimal_and_says_so():
    t = fit("gelu", FitConfig(segments=8, scale_range=(4, 4)))
    problem = build_problem(validate_config(get_op("gelu"), FitConfig(segments=8, scale_range=(4, 4),
                                                                       frac_bits=t.frac_bits)))
    assert t.search["optimal"] is True
    assert t.search["objective_value"] == pytest.approx(scale_optimum(problem, 0).cost, rel=1e-9)
    assert t.search["lower_bound"] == pytest.approx(t.search["objective_value"], rel=1e-9)
    multi = fit("gelu", FitConfig(segments=8, population=8, generations=2))
    assert multi.search["optimal"] is False and multi.search["objective_value"] >= multi.search["lower_bound"]


def check_bound_below_tables(op: str, segments: int, seed: int, objective: str) -> None:
    """The bound against 20 random integer tables (pinned tails kept) and a short fit."""
    cfg = dict(segments=segments, frac_bits=6, scale_range=(0, 3), objective=objective)
    problem = build_problem(validate_config(get_op(op), FitConfig(**cfg)))
    lb = lower_bound(problem) if objective == "mse" else minimax_lower_bound(problem)
    assert lb is not None and lb > 0
    rng = np.random.default_rng(seed)
    K = rng.integers(-40, 80, (20, segments))
    B = rng.integers(-40, 40, (20, segments))
    if problem.left_tail is not None:
        K[:, 0], B[:, 0] = problem.left_tail
    if problem.right_tail is not None:
        K[:, -1], B[:, -1] = problem.right_tail
    _, value = resegment(problem, K, B)
    assert np.all(value >= lb * (1 - 1e-9))
    t = fit(op, FitConfig(**cfg, population=6, generations=2, seed=seed))
    assert t.search["objective_value"] >= t.search["lower_bound"] * (1 - 1e-9)


@settings(max_examples=15, deadline=None)
@given(op=st.sampled_from(["gelu", "swish", "exp", "hswish"]), segments=st.integers(2, 6), seed=st.integers(0, 1000))
def test_lower_bound_is_below_every_table(op, segments, seed):
    check_bound_below_tables(op, segments, seed, "mse")


def test_minimax_bound_is_the_float_minimax_on_a_dense_grid():
    """x^2 on [0, 1]: N equal pieces, each line h^2 / 8 from the parabola (h = 1/N), is the
    continuous minimax; on 513 points the bound sits just below it. With weights, a point
    of weight 2 counts twice its error; a pinned tail that fits everything needs no line."""
    x = np.linspace(0.0, 1.0, 513)
    for n in (1, 4):
        assert minimax_bound(x, x * x, np.ones_like(x), n) == pytest.approx(1 / (8 * n * n), rel=2e-3)
        assert minimax_bound(x, x * x, np.ones_like(x), n) <= 1 / (8 * n * n)
    three = np.array([0.0, 1.0, 2.0])
    assert minimax_bound(three, np.array([0.0, 1.0, 0.0]), np.ones(3), 1) == pytest.approx(0.5, rel=1e-6)
    assert minimax_bound(three, np.array([0.0, 1.0, 0.0]), np.array([1.0, 2.0, 1.0]), 1) == pytest.approx(
        2 / 3, rel=1e-6)  # 2 e = 1 - e' with e' = e on the two light points: e = 1/3, weighted 2/3
    assert minimax_bound(three, 2 * three, np.ones(3), 0, left=(2.0, 0.0)) == 0.0


@settings(max_examples=4, deadline=None)
@given(op=st.sampled_from(["gelu", "swish", "exp", "hswish"]), segments=st.integers(2, 6), seed=st.integers(0, 1000))
def test_minimax_lower_bound_is_below_every_table(op, segments, seed):
    check_bound_below_tables(op, segments, seed, "max")


@pytest.mark.slow
def test_more_segments_never_worse():
    mse = [fit("gelu", FitConfig(segments=n, population=8, generations=3, patience=2)).metrics["mse"]
           for n in (2, 4, 8, 16)]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(mse, mse[1:])), mse


@pytest.mark.slow
@pytest.mark.parametrize("op,segments", [("gelu", 8), ("hswish", 16), ("exp", 16)])
def test_minimax_never_above_the_mse_fit(op, segments):
    cfg = dict(segments=segments, population=10, generations=4, patience=3)
    by_mse = fit(op, FitConfig(**cfg))
    by_max = fit(op, FitConfig(objective="max", **cfg))
    assert by_max.metrics["max_abs_err"] <= by_mse.metrics["max_abs_err"] * (1 + 1e-9)


def test_history_covers_every_phase():
    t = fit("gelu", FitConfig(segments=8, population=8, generations=3))
    phases = [h["phase"] for h in t.search["history"] if "phase" in h]
    assert {"alternate", "polish"} <= set(phases)
    assert t.search["history"][-1]["best"] == pytest.approx(t.search["objective_value"])


MEMORY_CHILD = """
import json, resource
from gqa_lut.config import FitConfig
from gqa_lut.search import fit
t = fit("gelu", FitConfig(segments=128, scale_range=(4, 6), population=6, generations=1, patience=1))
print(json.dumps({"mse": t.metrics["mse"], "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


@pytest.mark.slow
def test_128_segments_fit_in_bounded_memory():
    r = subprocess.run([sys.executable, "-c", MEMORY_CHILD], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["peak_mb"] < 2048 and out["mse"] < 1e-4


def test_no_sharing_allocation_is_the_best_split_and_never_below_the_per_scale_bound():
    """bench.sharing_bound's knapsack (blocks.scale_block_sizes, no least share): the best split
    of the lines over the scales (brute force on small random non-increasing optima), and with
    every scale given all the lines it would be the per-scale bound, so the split is never below it."""
    from gqa_lut.blocks import scale_block_sizes

    rng = np.random.default_rng(0)
    for _ in range(20):
        scales, lines = int(rng.integers(1, 4)), int(rng.integers(0, 6))
        optima = -np.sort(-rng.random((scales, lines + 1)), axis=1)  # non-increasing in the line count
        brute = min(sum(optima[s, n] for s, n in enumerate(split))
                    for split in itertools.product(range(lines + 1), repeat=scales) if sum(split) <= lines)
        got = scale_block_sizes(optima, lines, least=0)[0]
        assert got == pytest.approx(brute, rel=1e-12)
        assert got >= optima[:, lines].sum() - 1e-12
