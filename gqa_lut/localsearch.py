"""Local improvement of tables: alternate optimal lines and optimal breakpoints, then polish.

Each half-step is optimal for the other fixed (integer lines for given segments; DP
breakpoints for given lines), and `fit_lines` keeps the old lines as a candidate, so the
objective never increases: the same monotone scheme as Lloyd's algorithm. The polish then
tries every +-1 LSB move of one slope or intercept (and a slope move that pivots about the
segment's centre), re-placing all breakpoints optimally for each move, and takes the best.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from gqa_lut.exact import exact_lines
from gqa_lut.linefit import fit_lines, moments, pin_tails, total
from gqa_lut.problem import Problem
from gqa_lut.segmentation import assign, assign_real, line_outputs, one_line_moves, place, position_costs


@dataclass
class Population:
    """Integer tables of a population: lines (M, N), breakpoint indices (M, D, N-1), objective."""

    K: np.ndarray
    B: np.ndarray
    idx: np.ndarray
    fitness: np.ndarray

    def keep_better(self, K: np.ndarray, B: np.ndarray, idx: np.ndarray, fitness: np.ndarray,
                    better: np.ndarray) -> "Population":
        """Each individual replaced by the candidate where `better`, kept elsewhere."""
        return Population(np.where(better[:, None], K, self.K), np.where(better[:, None], B, self.B),
                          np.where(better[:, None, None], idx, self.idx), np.where(better, fitness, self.fitness))

    def take(self, i: int | np.ndarray) -> "Population":
        i = np.atleast_1d(i)
        return Population(self.K[i], self.B[i], self.idx[i], self.fitness[i])


FAST_POLISH_SEGMENTS = 16  # past this many segments a move is scored by one_line_moves, not a full DP
CHUNK_ELEMENTS = 1 << 22  # (individuals x scales x positions x segments) per DP batch: ~32 MB a float array


def resegment(problem: Problem, K: np.ndarray, B: np.ndarray,
              allowed: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """Optimal breakpoints of every scale for each table's lines (the DP), in batches whose
    memory is linear in positions x segments, whatever the population. `allowed` (M, D, N)
    confines each scale's scored codes to some lines (the others may only be parked)."""
    per_table = problem.dscale.size * problem.num_positions * problem.segments
    step = max(1, CHUNK_ELEMENTS // per_table)
    parts = []
    for i in range(0, K.shape[0], step):
        cost = position_costs(problem, line_outputs(problem, K[i:i + step], B[i:i + step]))
        if allowed is not None:
            cost = np.where(problem.inside.T[:, None, :, None] & ~allowed[None, i:i + step], np.inf, cost)
        parts.append(place(cost, problem.start, problem.objective == "max"))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def lloyd(problem: Problem, p: np.ndarray, rounds: int = 1) -> Population:
    """Lines for real breakpoints, valid integer breakpoints for them (DP), then `rounds` more
    rounds of (re-place breakpoints, refit lines). The result is always a valid table."""
    K, B, _ = fit_lines(problem, assign_real(problem, p))
    idx, fit = resegment(problem, K, B)
    K, B, E = fit_lines(problem, assign(problem, idx), keep=(K, B))
    pop = Population(K, B, idx, total(problem, E))
    return improve(problem, pop, rounds - 1) if rounds > 1 else pop


def improve(problem: Problem, pop: Population, rounds: int, tol: float = 0.0) -> Population:
    for _ in range(rounds):
        idx, _ = resegment(problem, pop.K, pop.B)
        K, B, E = fit_lines(problem, assign(problem, idx), keep=(pop.K, pop.B))
        fit = total(problem, E)
        better = fit < pop.fitness
        if not better.any():
            break
        gain = np.max((pop.fitness - fit) / np.maximum(pop.fitness, 1e-300))
        pop = pop.keep_better(K, B, idx, fit, better)
        if gain <= tol:
            break
    return pop


def _moves(problem: Problem, K: np.ndarray, B: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every single-segment +-1 LSB move of one table (K, B: (N,)), as a batch of tables."""
    N = K.shape[0]
    seg = assign(problem, idx[None])[0]
    w = problem.w
    centre = np.zeros(N)
    for i in range(N):
        sel = (seg == i) & problem.inside
        if sel.any():
            centre[i] = np.average(problem.x[sel], weights=w[sel])
    pivot = np.rint(centre).astype(np.int64)
    free = [i for i in range(N) if not ((i == 0 and problem.left_tail is not None)
                                        or (i == N - 1 and problem.right_tail is not None))]
    Ks, Bs = [], []
    for i in free:
        for dk, db in ((1, 0), (-1, 0), (0, 1), (0, -1), (1, -pivot[i]), (-1, pivot[i])):
            if dk == 0 and db == 0:
                continue
            k2, b2 = K.copy(), B.copy()
            k2[i] += dk
            b2[i] += db
            if problem.pmin <= k2[i] <= problem.pmax and problem.pmin <= b2[i] <= problem.pmax:
                Ks.append(k2)
                Bs.append(b2)
    return np.array(Ks, dtype=np.int64).reshape(-1, N), np.array(Bs, dtype=np.int64).reshape(-1, N)


def exact_lines_step(problem: Problem, pop: Population) -> tuple[np.ndarray, np.ndarray]:
    """Every segment's exact integer line for the current breakpoints (pooled over all scales);
    pinned tails and segments no scored code reaches keep their lines."""
    return exact_lines_of(problem, assign(problem, pop.idx), pop.K, pop.B)


def exact_lines_of(problem: Problem, seg: np.ndarray, K: np.ndarray, B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The exact integer line of each segment of the assignment seg (M, D, T), pooled over the
    scales; pinned tails and segments without weight keep the lines K, B (M, N)."""
    S = moments(problem, seg)
    Ke, Be, _ = exact_lines(S, problem.frac_bits, problem.pmin, problem.pmax)
    empty = S[0] <= 0
    K, B = np.where(empty, K, Ke.astype(np.int64)), np.where(empty, B, Be.astype(np.int64))
    pin_tails(problem, K, B)
    return K, B


def exact_alternation(problem: Problem, pop: Population, rounds: int = 100,
                      allowed: Optional[np.ndarray] = None) -> Population:
    """Alternate exact lines and exact breakpoints until nothing improves (mse objective without
    output quantization; otherwise the windowed `improve`). Never makes a table worse.
    With `allowed`, the breakpoints keep each scale on its lines (see `resegment`)."""
    if problem.objective != "mse" or problem.output is not None:
        return improve(problem, pop, rounds)
    for _ in range(rounds):
        K, B = exact_lines_step(problem, pop)
        idx, fit = resegment(problem, K, B, allowed)
        better = fit < pop.fitness * (1 - 1e-12)
        if not better.any():
            break
        pop = pop.keep_better(K, B, idx, fit, better)
    return pop


def polish_budget(segments: int, objective: str = "mse") -> int:
    """Polish iterations: 200 up to 16 segments, then falling as 1/N where moves are scored in
    O(N) each (`polish`'s fast path: an iteration costs ~N^2) and as 1/N^2 where every move
    gets the full DP (minimax: N^3 an iteration), at least 1."""
    if objective == "mse" and segments > FAST_POLISH_SEGMENTS:
        return max(1, min(200, 200 * 16 // segments))
    return max(1, min(200, 200 * 16 * 16 // (segments * segments)))


def finish(problem: Problem, best: Population) -> Population:
    """Exact alternation, then the +-1 LSB polish, for one table."""
    best = exact_alternation(problem, best)
    return polish(problem, best, polish_budget(problem.segments, problem.objective))


def polish(problem: Problem, best: Population, max_iters: int = 200) -> Population:
    """Greedy best-improvement descent over +-1 LSB moves, breakpoints re-placed for each move.
    Past FAST_POLISH_SEGMENTS the moves are ranked by `one_line_moves` (the same optimum in
    O(T) per move instead of O(T N): 7.5x faster at 32 segments) and the best one is placed by
    the full DP; up to it (and for minimax) every move gets the full DP, as it always has."""
    fast = problem.segments > FAST_POLISH_SEGMENTS and problem.objective == "mse"
    for _ in range(max_iters):
        Ks, Bs = _moves(problem, best.K[0], best.B[0], best.idx[0])
        if Ks.shape[0] == 0:
            break
        if fast:  # the best-scored move alone gets the DP
            j = int(np.argmin(one_line_moves(problem, best.K[0], best.B[0], Ks, Bs)))
            Ks, Bs = Ks[j:j + 1], Bs[j:j + 1]
        idx, fit = resegment(problem, Ks, Bs)
        j = int(np.argmin(fit))
        if not fit[j] < best.fitness[0] * (1 - 1e-12):
            break
        cand = Population(Ks[j:j + 1], Bs[j:j + 1], idx[j:j + 1], fit[j:j + 1])
        best = improve(problem, cand, rounds=3)
    return best


def split_segments(pop: Population, problem: Problem) -> Population:
    """A table of N/2 segments (pop's first) as one of N = problem.segments, each segment cut in
    two (the LBG splitting of vector quantization): at every scale a segment's scored codes are
    divided at their middle, the lower half going to line 2i and the upper to 2i + 1, and each
    new line is the exact integer line of its own codes pooled over the scales, then the
    breakpoints DP places every scale on the new lines. Copies of a line (the embedded N/2
    table) leave the error where it was, because the DP never tells them apart; split halves
    each fit their own codes better than the parent did, although the start can come out worse
    than the N/2 table where a coarse scale has too few codes to give each child one (its
    alternation and polish then decide, and the fit keeps the better of both starts)."""
    parent_K, parent_B = np.repeat(pop.K[:1], 2, axis=1), np.repeat(pop.B[:1], 2, axis=1)
    idx, _ = resegment(problem, parent_K, parent_B)  # the N/2 table's segments on this problem's positions
    seg = assign(problem, idx)[0] // 2  # (D, T)
    new = 2 * seg
    t = np.arange(seg.shape[1])
    for row in range(seg.shape[0]):
        for i in range(pop.K.shape[1]):
            scored = np.nonzero((seg[row] == i) & problem.inside[row])[0]
            if scored.size >= 2:  # the upper half of its scored codes, and what follows them in i
                new[row, (seg[row] == i) & (t >= scored[scored.size // 2])] = 2 * i + 1
    K, B = exact_lines_of(problem, new[None], parent_K, parent_B)
    idx, fitness = resegment(problem, K, B)
    return Population(K, B, idx, fitness)
