"""The fitter's exact steps against brute force on problems small enough to enumerate: the
breakpoint DP is optimal, the integer line step loses to no line in a window around it, and
the local search never makes a table worse."""
import itertools

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gqa_lut.config import FitConfig, validate_config
from gqa_lut.functions import get_op
from gqa_lut.linefit import fit_lines, total
from gqa_lut.localsearch import Population, improve, lloyd, polish
from gqa_lut.problem import build_problem
from gqa_lut.segmentation import assign, assigned_outputs, line_outputs, place, position_costs


def tiny_problem(op: str, segments: int, objective: str = "mse", scale_range=(1, 2), input_bits=4, param_bits=4):
    rng = {"exp": (-2.0, 0.0), "rsqrt": (1.0, 2.0)}.get(op, (-1.5, 1.5))
    return build_problem(validate_config(get_op(op), FitConfig(
        segments=segments, param_bits=param_bits, input_bits=input_bits, frac_bits=2, range=rng,
        scale_range=scale_range, objective=objective)))


def brute_force_place(cost: np.ndarray, start: np.ndarray, is_max: bool) -> float:
    """Every way to split each scale's positions into N runs in order (positions up to start[d]
    in segment 0): the best total, summed (mse) or maxed (minimax) over scales."""
    T, _, D, N = cost.shape
    per_scale = []
    for d in range(D):
        best = np.inf
        for steps in itertools.combinations(range(int(start[d]) + 1, T), N - 1):
            seg = np.searchsorted(np.array(steps), np.arange(T), side="right")
            c = cost[np.arange(T), 0, d, seg]
            best = min(best, c.max() if is_max else c.sum())
        per_scale.append(best)
    return max(per_scale) if is_max else sum(per_scale)


@settings(max_examples=25, deadline=None)
@given(op=st.sampled_from(["gelu", "swish", "exp", "tanh"]), segments=st.integers(2, 4),
       objective=st.sampled_from(["mse", "max"]), seed=st.integers(0, 10_000))
def test_breakpoint_dp_equals_brute_force(op, segments, objective, seed):
    problem = tiny_problem(op, segments, objective)
    rng = np.random.default_rng(seed)
    K = rng.integers(problem.pmin, problem.pmax + 1, size=(1, segments))
    B = rng.integers(problem.pmin, problem.pmax + 1, size=(1, segments))
    cost = position_costs(problem, line_outputs(problem, K, B))
    idx, value = place(cost, problem.start, objective == "max")
    assert value[0] == pytest.approx(brute_force_place(cost, problem.start, objective == "max"), rel=1e-12, abs=1e-300)
    # and the breakpoints it returns do reach that value
    seg = assign(problem, idx)
    reached = cost[np.arange(cost.shape[0])[:, None], 0, np.arange(cost.shape[2])[None, :], seg[0].T]
    got = reached.max() if objective == "max" else reached.sum()
    assert got == pytest.approx(value[0], rel=1e-12, abs=1e-300)


@settings(max_examples=25, deadline=None)
@given(op=st.sampled_from(["gelu", "swish", "exp", "rsqrt"]), segments=st.integers(2, 4),
       seed=st.integers(0, 10_000))
def test_line_step_loses_to_no_line_in_a_window(op, segments, seed):
    """For a fixed segmentation, no integer line within +-2 LSB of slope (any intercept) of the
    one fit_lines returns has a smaller error on that segment, tails pinned aside."""
    problem = tiny_problem(op, segments, param_bits=6)
    rng = np.random.default_rng(seed)
    steps = np.sort(rng.choice(np.arange(1, problem.num_positions), size=segments - 1, replace=False))
    idx = np.broadcast_to(steps - 1, (1, problem.dscale.size, segments - 1)).copy()
    seg = assign(problem, idx)
    K, B, E = fit_lines(problem, seg)
    pinned = {0} if problem.left_tail is not None else set()
    pinned |= {segments - 1} if problem.right_tail is not None else set()
    for i in set(range(segments)) - pinned:
        mask = seg[0] == i
        if not (problem.w[mask] > 0).any():
            continue
        for k in range(max(problem.pmin, K[0, i] - 2), min(problem.pmax, K[0, i] + 2) + 1):
            for b in range(problem.pmin, problem.pmax + 1):
                K2, B2 = K.copy(), B.copy()
                K2[0, i], B2[0, i] = k, b
                err = assigned_outputs(problem, seg, K2, B2)[0] - problem.f
                assert (problem.w * err * err)[mask].sum() >= E[0, i] * (1 - 1e-9) - 1e-15


@settings(max_examples=15, deadline=None)
@given(op=st.sampled_from(["gelu", "swish", "hswish", "exp"]), segments=st.integers(2, 6),
       objective=st.sampled_from(["mse", "max"]), seed=st.integers(0, 10_000))
def test_local_search_never_makes_a_table_worse(op, segments, objective, seed):
    problem = tiny_problem(op, segments, objective, scale_range=(0, 3), input_bits=5, param_bits=8)
    rng = np.random.default_rng(seed)
    genomes = np.sort(rng.uniform(problem.lo, problem.hi, size=(6, segments - 1)), axis=1)
    start = lloyd(problem, genomes, rounds=1)
    better = improve(problem, start, rounds=5)
    assert np.all(better.fitness <= start.fitness)
    for j in range(genomes.shape[0]):
        one = start.take(j)
        polished = polish(problem, one, max_iters=20)
        assert polished.fitness[0] <= one.fitness[0]
        # the objective it reports is the table's own
        seg = assign(problem, polished.idx)
        _, _, E = fit_lines(problem, seg, keep=(polished.K, polished.B))
        assert total(problem, E)[0] <= polished.fitness[0] * (1 + 1e-12)


def test_population_take_keeps_rows():
    p = Population(np.arange(6).reshape(2, 3), np.arange(6).reshape(2, 3), np.zeros((2, 1, 2), int), np.array([2.0, 1.0]))
    assert p.take(1).fitness.tolist() == [1.0] and p.take(1).K.tolist() == [[3, 4, 5]]


@settings(max_examples=25, deadline=None)
@given(op=st.sampled_from(["gelu", "exp", "swish", "tanh"]), segments=st.integers(2, 24),
       input_bits=st.integers(4, 7), seed=st.integers(0, 10**6))
def test_one_line_moves_reach_what_the_full_dp_reaches(op, segments, input_bits, seed):
    """Scoring tables that differ in one line from the forward and backward DP of the unchanged
    lines gives each table the optimum `place` finds for it (to float rounding of the sums)."""
    from gqa_lut.localsearch import _moves, resegment
    from gqa_lut.segmentation import one_line_moves
    p = tiny_problem(op, segments, scale_range=(0, 3), input_bits=input_bits, param_bits=6)
    rng = np.random.default_rng(seed)
    K = rng.integers(p.pmin, p.pmax + 1, segments)
    B = rng.integers(p.pmin, p.pmax + 1, segments)
    idx, _ = resegment(p, K[None], B[None])
    Ks, Bs = _moves(p, K, B, idx[0])
    assume(Ks.shape[0] > 0)  # both lines pinned tails: nothing moves
    _, ref = resegment(p, Ks, Bs)
    fast = one_line_moves(p, K, B, Ks, Bs)
    assert fast.shape == ref.shape
    assert np.allclose(fast, ref, rtol=1e-9, atol=1e-300)


@pytest.mark.slow
def test_wide_layouts_buy_error_past_16_segments(monkeypatch):
    """Past 16 segments the layouts of three groups of scales, blocks of several scales from
    their shared-breakpoint optimum, find tables the two-group layouts do not (gelu, 6-bit,
    scales 0..5, 32 segments: 1.235e-4 against 1.280e-4); at 16 nothing changes."""
    from gqa_lut import blocks
    from gqa_lut.search import fit
    cfg = dict(param_bits=6, input_bits=6, frac_bits=4, scale_range=(0, 5), seed=0, generations=5, population=12)
    wide32 = fit("gelu", FitConfig(segments=32, **cfg)).metrics["mse"]
    wide16 = fit("gelu", FitConfig(segments=16, **cfg))
    monkeypatch.setattr(blocks, "WIDE_SEGMENTS", 10**6)
    assert fit("gelu", FitConfig(segments=32, **cfg)).metrics["mse"] > 1.02 * wide32
    narrow16 = fit("gelu", FitConfig(segments=16, **cfg))  # the same search: the same integers
    assert same_integers(narrow16, wide16)


def same_integers(a, b) -> bool:
    """Two tables with the same integers (slopes, intercepts, breakpoints of every scale)."""
    ja, jb = a.to_json(), b.to_json()
    return all(ja[k] == jb[k] for k in ("slopes", "intercepts", "breakpoints", "frac_bits"))
