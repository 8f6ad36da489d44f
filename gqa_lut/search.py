"""The genetic search (DEAP) for quantization-aware PWL tables, and `fit`, its public entry.

The genome is the N-1 real breakpoints shared by all scales, as in GQA-LUT. Decoding is
quantization-aware: breakpoints are rounded onto each scale's integer grid, the lines are
the best *integers* for that segmentation, and one Lloyd round re-places every scale's
breakpoints optimally (DP) and refits. The fitness is then exactly the spec's `mse` (or max
error) of that integer table, and the improved breakpoints are written back into the genome
(Lamarckian), so the GA searches over local optima rather than raw points.

Fitness is computed for the whole population in one numpy call; `toolbox.map` maps that call
over chunks of the population, so a process pool's `map` spreads the chunks over workers.
"""
from __future__ import annotations

import functools
import math
import random
import time
from dataclasses import replace
from typing import Callable, Optional

import numpy as np
from deap import base, creator, tools

from gqa_lut import __version__
from gqa_lut.config import FitConfig, FitSpec, resolve_op, validate_config
from gqa_lut.evaluator import metrics
from gqa_lut.functions import Op
from gqa_lut.blocks import MAX_SEGMENTS as BLOCKS_MAX_SEGMENTS
from gqa_lut.blocks import best_layouts
from gqa_lut.exact import lower_bound, minimax_lower_bound, scale_optimum
from gqa_lut.linefit import fit_lines, least_squares_slope, moments, segment_errors, total
from gqa_lut.localsearch import Population, exact_alternation, finish, improve, lloyd, resegment, split_segments
from gqa_lut.multistart import RANDOM_STARTS_MAX_SEGMENTS, finish_best, random_starts, start_count
from gqa_lut.problem import Problem, build_problem
from gqa_lut.quantization import choose_frac_bits
from gqa_lut.seeding import union_breakpoints
from gqa_lut.segmentation import assign, assign_real, encode
from gqa_lut.table import Table

OPTIMAL_REL_TOL = 1e-9  # a fit within this of its lower bound is the optimum
MIN_EMBED_SEGMENTS = 2  # a fit with N segments also starts from the N/2 fit down to this many

if not hasattr(creator, "GQAFitness"):
    creator.create("GQAFitness", base.Fitness, weights=(-1.0,))
    creator.create("GQAIndividual", list, fitness=creator.GQAFitness)


# --- initial breakpoints -----------------------------------------------------------------

def curvature_breakpoints(fn: Callable, lo: float, hi: float, n: int) -> np.ndarray:
    """Knots with density ~ |f''|^(2/5): where the L2 error of a PWL fit is spread evenly."""
    x = np.linspace(lo, hi, 4097)
    with np.errstate(all="ignore"):
        y = fn(x)
    h = x[1] - x[0]
    d2 = np.abs(np.gradient(np.gradient(y, h), h))
    d2 = np.where(np.isfinite(d2), d2, 0.0)
    dens = d2 ** 0.4 + 1e-3 * (np.max(d2 ** 0.4) + 1e-12)
    cdf = np.concatenate([[0.0], np.cumsum((dens[1:] + dens[:-1]) / 2)])
    cdf /= cdf[-1]
    return np.interp(np.arange(1, n + 1) / (n + 1), cdf, x)


def _repair(ind: list, lo: float, hi: float) -> list:
    ind[:] = sorted(min(max(v, lo), hi) for v in ind)
    return ind


def mutate_gaussian(ind: list, sigma: float, indpb: float, lo: float, hi: float) -> tuple[list]:
    tools.mutGaussian(ind, 0.0, sigma, indpb)
    return (_repair(ind, lo, hi),)


def mutate_round(ind: list, scales: tuple[int, ...], indpb: float) -> tuple[list]:
    """The paper's rounding mutation: snap breakpoints onto the 2^-d grid of a random scale."""
    for j in range(len(ind)):
        if random.random() < indpb:
            d = random.choice(scales)
            ind[j] = math.ldexp(round(math.ldexp(ind[j], d)), -d)
    return (ind,)


def mutate_relocate(ind: list, lo: float, hi: float) -> tuple[list]:
    """Move one breakpoint anywhere: lets the search shift resolution between regions."""
    ind[random.randrange(len(ind))] = random.uniform(lo, hi)
    return (_repair(ind, lo, hi),)


def mate(a: list, b: list, lo: float, hi: float) -> tuple[list, list]:
    tools.cxBlend(a, b, 0.3)
    return _repair(a, lo, hi), _repair(b, lo, hi)


# --- fitness -------------------------------------------------------------------------------

def evaluate_chunk(problem: Problem, genomes: np.ndarray) -> Population:
    """The vectorized fitness of a chunk of genomes (one call, no per-individual loop)."""
    return lloyd(problem, genomes, rounds=1)


def _concat(parts: list[Population]) -> Population:
    return Population(*(np.concatenate([getattr(p, k) for p in parts])
                        for k in ("K", "B", "idx", "fitness")))


def evaluate_population(toolbox: base.Toolbox, problem: Problem, individuals: list, chunks: int) -> Population:
    genomes = np.array(individuals, dtype=np.float64).reshape(len(individuals), -1)
    parts = np.array_split(genomes, max(1, min(chunks, len(individuals))))
    res = _concat(list(toolbox.map(toolbox.evaluate_chunk, parts)))
    # Lamarckian write-back: the genome becomes the breakpoints the local step found.
    better = encode(problem, res.idx)
    for ind, g, fit in zip(individuals, better, res.fitness):
        ind[:] = g.tolist()
        ind.fitness.values = (float(fit),)
    return res


def make_toolbox(problem: Problem, map_fn: Callable = map) -> base.Toolbox:
    lo, hi, n1 = problem.lo, problem.hi, problem.segments - 1
    tb = base.Toolbox()
    tb.register("map", map_fn)
    tb.register("evaluate_chunk", functools.partial(evaluate_chunk, problem))
    tb.register("mate", mate, lo=lo, hi=hi)
    tb.register("mutate", mutate_gaussian, sigma=0.3 * (hi - lo) / (n1 + 1), indpb=0.3, lo=lo, hi=hi)
    tb.register("mutate_round", mutate_round, scales=problem.scales, indpb=0.3)
    tb.register("mutate_relocate", mutate_relocate, lo=lo, hi=hi)
    tb.register("select", tools.selTournament, tournsize=3)
    return tb


def initial_population(problem: Problem, size: int) -> list:
    lo, hi, n1 = problem.lo, problem.hi, problem.segments - 1
    seeds = [union_breakpoints(problem), curvature_breakpoints(problem.fn, lo, hi, n1),
             np.linspace(lo, hi, n1 + 2)[1:-1]]
    pop = [creator.GQAIndividual(s.tolist()) for s in seeds]
    around = seeds[0]  # jittered copies of the union-grid optimum fill every other slot
    while len(pop) < size:
        if len(pop) % 2:
            g = sorted(random.uniform(lo, hi) for _ in range(n1))
        else:
            g = sorted(min(max(v + random.gauss(0, 0.5 * (hi - lo) / (n1 + 1)), lo), hi) for v in around)
        pop.append(creator.GQAIndividual(g))
    return pop


# --- the fit ---------------------------------------------------------------------------------

def auto_frac_bits(spec: FitSpec) -> int:
    """F from the parameters a good float fit needs: the curvature-placed lines and the tails."""
    prob = build_problem(replace(spec, frac_bits=0, param_bits=16, output=None, objective="mse"),
                         max_positions=256)
    seg = assign_real(prob, curvature_breakpoints(prob.fn, spec.lo, spec.hi, spec.segments - 1)[None])
    S1, Sx, _, Sf, _, _ = S = moments(prob, seg)
    k, ok = least_squares_slope(S)
    b = np.where(S1 > 0, (Sf - k * Sx) / np.where(S1 > 0, S1, 1.0), 0.0)
    vals = [k[ok], b[S1 > 0]]
    for tail in (spec.op.left_tail, spec.op.right_tail):
        if tail is not None:
            vals.append(np.array(tail))
    return choose_frac_bits(np.concatenate(vals), spec.param_bits)


# steps after the GA's generations that a fit reports: the polish phases of its own search
# (alternate, polish, per-scale optima, block layouts, random starts, full grid), the fit with
# half the segments it embeds, and for minimax the start from the mse fit
AFTER_GA_STEPS = 8


class _Progress:
    """The fit's steps for a progress callback (done, total, best): the GA's generations, then
    every phase after them, so that 100% means finished (the bar reached it after 0.3 s of a
    6.4 s fit when only generations were counted)."""

    def __init__(self, callback: Optional[Callable[[int, int, float], None]], generations: int):
        self.callback, self.generations = callback, generations
        self.total = generations + AFTER_GA_STEPS
        self.done = 0

    def __call__(self, gen: int, best: float) -> None:
        """Generation `gen` of the GA is done."""
        self._report(min(gen, self.generations), best)

    def phase(self, best: float) -> None:
        """One more step after the GA (an early stop skips the generations it did not run)."""
        self._report(max(self.done, self.generations) + 1, best)

    def finish(self, best: float) -> None:
        self._report(self.total, best)

    def _report(self, done: int, best: float) -> None:
        self.done = min(done, self.total)
        if self.callback is not None:
            self.callback(self.done, self.total, best)


def fit(op: Op | str | Callable, config: Optional[FitConfig] = None, *, map_fn: Callable = map,
        progress: Optional[Callable[[int, int, float], None]] = None) -> Table:
    """Fit a quantization-aware integer PWL table; the same config and seed give the same table.

    Never worse than the table the same request finds with half the segments (it is one of
    the starts), and with --objective max never above the mse fit's max_abs_err."""
    cfg = config or FitConfig()
    spec = validate_config(resolve_op(op, cfg), cfg)
    t0 = time.perf_counter()
    steps = _Progress(progress, spec.generations)
    result = _best_of_fits(spec, map_fn, steps)
    if spec.objective == "max":  # start minimax from the mse solution too; keep the smaller max error
        mse = _best_of_fits(replace(spec, objective="mse"), map_fn, _Progress(None, 0))
        at_mse = replace(spec, frac_bits=mse.problem.frac_bits)
        # also the mse fit's table as it is: a tie in max error goes to the lower mse, which
        # minimax polishing has no reason to keep
        as_is = _Fit(at_mse, build_problem(at_mse), mse.best, mse.history, mse.generations)
        result = min(result, _restart(mse, at_mse), as_is, key=lambda r: (r.metrics["max_abs_err"], r.metrics["mse"]))
    steps.finish(result.objective)
    table = result.table
    seconds = time.perf_counter() - t0
    search = {
        "config": cfg.to_json(), "seed": spec.seed, "generations_run": result.generations,
        "seconds": round(seconds, 3), "tool_version": __version__, "objective": spec.objective,
        "objective_value": result.objective, "frac_bits_auto": cfg.frac_bits is None,
        "weighted": spec.weights is not None, "history": result.history,
        "lower_bound": result.lower_bound, "optimal": result.optimal, **cfg.extra,
    }
    return table.with_(search=search)


class _Fit:
    """One finished search: the problem it ran on, its best table and how it got there."""

    def __init__(self, spec: FitSpec, problem: Problem, best: Population, history: list[dict], generations: int):
        self.spec, self.problem, self.best, self.history, self.generations = spec, problem, best, history, generations
        table = _to_table(problem, spec.op, best)
        self.table = table.with_(metrics=metrics(table, spec.op.fn))
        self.metrics = self.table.metrics
        self.objective = scored_objective(problem, best)

    @functools.cached_property
    def lower_bound(self) -> Optional[float]:
        """What no table of the problem goes below (computed for the fit that is returned only)."""
        if self.problem.objective == "mse":
            return lower_bound(self.problem)
        return minimax_lower_bound(self.problem)

    @functools.cached_property
    def optimal(self) -> bool:
        return bool(self.lower_bound is not None
                    and self.objective <= self.lower_bound * (1 + OPTIMAL_REL_TOL) + 1e-300)


def scored_objective(problem: Problem, best: Population) -> float:
    """The objective of the table on the codes the spec scores: the breakpoint DP's own value
    also holds a tiny tie-breaking weight for codes outside the fitted range."""
    seg = assign(problem, best.idx[:1])
    return float(total(problem, segment_errors(problem, moments(problem, seg), seg, best.K[:1], best.B[:1]))[0])


def _best_of_fits(spec: FitSpec, map_fn: Callable, progress: _Progress) -> _Fit:
    """The search at this many segments, and the half-as-many fit embedded into it: the better.
    The half-as-many fit is exactly what that request gives on its own, so the N-segment fit is
    never worse than it."""
    rstate = random.getstate()
    random.seed(spec.seed)
    try:
        resolved = spec if spec.frac_bits is not None else replace(spec, frac_bits=auto_frac_bits(spec))
        own = _search(resolved, map_fn, progress)
    finally:
        random.setstate(rstate)
    if own.optimal or spec.segments // 2 < MIN_EMBED_SEGMENTS:
        return own
    # the same request with half the segments (its own automatic frac_bits, if asked for)
    fewer = _best_of_fits(replace(spec, segments=spec.segments // 2), map_fn, _Progress(None, 0))
    at_fewer = replace(resolved, frac_bits=fewer.problem.frac_bits)
    # own ran the layouts at its own frac_bits; where the N/2 chain chose another, its restart tries them too
    candidates = [own, _restart(fewer, at_fewer, layouts=at_fewer.frac_bits != resolved.frac_bits)]
    if spec.segments == 2 * fewer.problem.segments and spec.segments > RANDOM_STARTS_MAX_SEGMENTS:
        # past the random starts every segment cut in two is the start that buys error (exp 64,
        # frac_bits 6: 8.05e-6 as the embedded 32 fit, 7.79e-6 split); up to them, they do
        candidates.append(_split(fewer, at_fewer))
    best = min(candidates, key=lambda r: (r.objective, r.metrics["mse"]))  # (minimax ties: the lower mse)
    progress.phase(best.objective)
    return best


def _restart(src: _Fit, spec: FitSpec, layouts: bool = False) -> _Fit:
    """src's table as a start for `spec` (more segments: copies of its first line, which change no
    output), then exact alternation and polish on spec's problem; with `layouts`, past the block
    layouts' sizes, the one-block-per-scale layout too."""
    problem = build_problem(spec)
    extra = spec.segments - src.problem.segments
    K = np.concatenate([np.repeat(src.best.K[:, :1], extra, axis=1), src.best.K], axis=1)
    B = np.concatenate([np.repeat(src.best.B[:, :1], extra, axis=1), src.best.B], axis=1)
    idx, fitness = resegment(problem, K, B)
    best = finish(problem, Population(K, B, idx, fitness))
    history = src.history + [{"phase": f"from {src.problem.segments} segments", "best": float(best.fitness[0])}]
    if layouts and problem.segments > BLOCKS_MAX_SEGMENTS and problem.objective == "mse" and problem.output is None:
        # past the layouts' sizes the one-block-per-scale layout is the start that buys error, and
        # the own search ran at another automatic frac_bits (gelu 256: 5, where the N/2 fits
        # chose 6): try it at the N/2 fit's frac_bits too (gelu 256: 2.51e-6 -> 2.14e-6)
        best = finish_best(problem, best, best_layouts(problem))
        history.append({"phase": "one block per scale", "best": float(best.fitness[0])})
    return _Fit(spec, problem, best, history, src.generations)


def _split(src: _Fit, spec: FitSpec) -> _Fit:
    """src's table with every segment cut in two (localsearch.split_segments), then exact
    alternation and polish on spec's problem: the start that lets twice the segments buy error."""
    problem = build_problem(spec)
    start = split_segments(src.best, problem)
    best = finish(problem, start)
    history = src.history + [{"phase": f"{src.problem.segments} segments split", "best": float(best.fitness[0])}]
    return _Fit(spec, problem, best, history, src.generations)


def _search(spec: FitSpec, map_fn: Callable, progress: _Progress) -> _Fit:
    problem = build_problem(spec)
    if len(spec.scales) == 1:
        opt = scale_optimum(problem, 0)
        if opt is not None:  # one scale: the exact DP is the optimum, no search needed
            idx, fitness = resegment(problem, opt.K[None], opt.B[None])
            best = Population(opt.K[None], opt.B[None], idx, fitness)
            progress(0, float(fitness[0]))
            return _Fit(spec, problem, best, [{"phase": "exact", "best": float(fitness[0])}], 0)
    best, history, gens = _genetic_search(problem, spec, map_fn, progress)
    best = improve(problem, best, rounds=50, tol=0.0)
    history.append({"phase": "alternate", "best": float(best.fitness[0])})
    progress.phase(float(best.fitness[0]))
    best = finish(problem, best)
    history.append({"phase": "polish", "best": float(best.fitness[0])})
    progress.phase(float(best.fitness[0]))
    if problem.objective == "mse" and problem.output is None:
        starts = [scale_optimum(problem, r) for r in range(problem.dscale.size)]
        starts = [s for s in starts if s is not None]
        if starts:
            K = np.stack([s.K for s in starts])
            B = np.stack([s.B for s in starts])
            idx, fitness = resegment(problem, K, B)
            cand = exact_alternation(problem, Population(K, B, idx, fitness))
            j = int(np.argmin(cand.fitness))
            if cand.fitness[j] < best.fitness[0]:
                best = finish(problem, cand.take(j))
            history.append({"phase": "per-scale optima", "best": float(best.fitness[0])})
            progress.phase(float(best.fitness[0]))
        layouts = best_layouts(problem)
        if layouts.fitness.size:
            best = finish_best(problem, best, layouts)
            history.append({"phase": "block layouts", "best": float(best.fitness[0])})
            progress.phase(float(best.fitness[0]))
        if problem.segments <= RANDOM_STARTS_MAX_SEGMENTS:  # beyond, the N/2 fit brings them up
            best = finish_best(problem, best, random_starts(problem, spec.seed, start_count(spec.population)))
            history.append({"phase": "random starts", "best": float(best.fitness[0])})
            progress.phase(float(best.fitness[0]))
    if not problem.full:
        problem = build_problem(spec, max_positions=1 << 30)
        idx, _ = resegment(problem, best.K, best.B)  # the best lines' breakpoints on the full grid
        K, B, E = fit_lines(problem, assign(problem, idx), keep=(best.K, best.B))
        best = improve(problem, Population(K, B, idx, total(problem, E)), rounds=3)
        history.append({"phase": "full grid", "best": float(best.fitness[0])})
        progress.phase(float(best.fitness[0]))
    return _Fit(spec, problem, best, history, gens)


def _genetic_search(problem: Problem, cfg: FitSpec, map_fn: Callable, progress: _Progress
                    ) -> tuple[Population, list[dict], int]:
    tb = make_toolbox(problem, map_fn)
    pop = initial_population(problem, cfg.population)
    res = evaluate_population(tb, problem, pop, cfg.chunks)
    best_i = int(np.argmin(res.fitness))
    best = res.take(best_i)
    history = [{"gen": 0, "best": float(best.fitness[0]), "mean": float(np.mean(res.fitness))}]
    progress(0, float(best.fitness[0]))
    stale, gen = 0, 0
    n_elite = max(1, cfg.population // 10)
    for gen in range(1, cfg.generations + 1):
        offspring = [tb.clone(ind) for ind in tb.select(pop, len(pop) - n_elite)]
        for a, b in zip(offspring[::2], offspring[1::2]):
            if random.random() < cfg.cxpb:
                tb.mate(a, b)
                del a.fitness.values, b.fitness.values
        for ind in offspring:
            r = random.random()
            if r < cfg.mutpb * 0.5:
                tb.mutate(ind)
            elif r < cfg.mutpb * 0.8:
                tb.mutate_round(ind)
            elif r < cfg.mutpb:
                tb.mutate_relocate(ind)
            else:
                continue
            if ind.fitness.valid:
                del ind.fitness.values
        fresh = [ind for ind in offspring if not ind.fitness.valid]
        if fresh:
            res = evaluate_population(tb, problem, fresh, cfg.chunks)
            j = int(np.argmin(res.fitness))
            if res.fitness[j] < best.fitness[0]:
                improvement = (best.fitness[0] - res.fitness[j]) / max(best.fitness[0], 1e-300)
                best = res.take(j)
                stale = 0 if improvement > 1e-9 else stale + 1
            else:
                stale += 1
        elites = tools.selBest(pop, n_elite)
        pop = elites + offspring
        fits = [ind.fitness.values[0] for ind in pop]
        history.append({"gen": gen, "best": float(best.fitness[0]), "mean": float(np.mean(fits))})
        progress(gen, float(best.fitness[0]))
        if stale >= cfg.patience:
            break
    return best, history, gen


def _to_table(problem: Problem, op: Op, best: Population) -> Table:
    bps = {int(d): problem.pos[r, best.idx[0, r]] for r, d in enumerate(problem.dscale)}
    return Table(op=op.name, range=(problem.lo, problem.hi), slopes=best.K[0], intercepts=best.B[0],
                 breakpoints=bps, frac_bits=problem.frac_bits, param_bits=problem.param_bits,
                 input_bits=problem.input_bits, output=problem.output).validate()
