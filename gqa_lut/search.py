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
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
from deap import base, creator, tools

from gqa_lut import __version__, bounds
from gqa_lut.errors import UsageError
from gqa_lut.evaluator import metrics
from gqa_lut.linefit import fit_lines
from gqa_lut.localsearch import Population, improve, lloyd, polish
from gqa_lut.problem import Problem, build_problem
from gqa_lut.quantization import check_bits, choose_frac_bits
from gqa_lut.seeding import union_breakpoints
from gqa_lut.segmentation import assign, assign_real, encode
from gqa_lut.table import OutputFormat, Table
from ops.registry import Op, custom_op, get_op

if not hasattr(creator, "GQAFitness"):
    creator.create("GQAFitness", base.Fitness, weights=(-1.0,))
    creator.create("GQAIndividual", list, fitness=creator.GQAFitness)


@dataclass
class FitConfig:
    """Everything `fit` takes besides the function; None means the op's default."""

    segments: int = 8
    param_bits: int = 8
    input_bits: int = 8
    frac_bits: Optional[int] = None
    range: Optional[tuple[float, float]] = None
    scales: Optional[tuple[int, int]] = None  # inclusive
    population: int = 40
    generations: int = 30
    seed: int = 0
    objective: str = "mse"
    weights: Optional[np.ndarray] = None  # activation samples (1-D) or (value, weight) rows
    output: Optional[OutputFormat] = None
    patience: int = 10  # generations without improvement before stopping early
    cxpb: float = 0.6
    mutpb: float = 0.5
    chunks: int = 1  # population chunks handed to toolbox.map (set to the pool's size)
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_op(op: Op | str | Callable[[np.ndarray], np.ndarray], cfg: FitConfig) -> Op:
    if isinstance(op, Op):
        return op
    if isinstance(op, str):
        return get_op(op)
    if callable(op):
        if cfg.range is None:
            raise UsageError("a custom function needs a range: pass FitConfig(range=(lo, hi))")
        name = getattr(op, "__name__", "fn")
        return custom_op(name if name != "<lambda>" else "fn", op, *cfg.range)
    raise UsageError(f"op {op!r} is neither an op name nor a callable")


def validate_config(op: Op, cfg: FitConfig) -> tuple[tuple[float, float], tuple[int, ...]]:
    check_bits("param bits", cfg.param_bits)
    check_bits("input bits", cfg.input_bits)
    if isinstance(cfg.segments, bool) or not isinstance(cfg.segments, int) or not 2 <= cfg.segments <= 256:
        raise UsageError(f"segments {cfg.segments!r} is not allowed: use an integer from 2 to 256")
    lo, hi = cfg.range if cfg.range is not None else op.range
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise UsageError(f"range [{lo}, {hi}] is not finite")
    if not lo < hi:
        raise UsageError(f"range [{lo:g}, {hi:g}] is empty or reversed: LO must be below HI")
    op.check_range(lo, hi)
    d0, d1 = cfg.scales if cfg.scales is not None else op.scales
    if d0 > d1:
        raise UsageError(f"scales {d0} {d1} are reversed: give the smallest exponent first")
    if d0 < -24 or d1 > 24:
        raise UsageError(f"scales {d0} {d1} are not allowed: exponents must lie in -24..24")
    if cfg.frac_bits is not None and not 0 <= cfg.frac_bits <= 24:
        raise UsageError(f"frac bits {cfg.frac_bits} is not allowed: use an integer from 0 to 24")
    if cfg.patience < 1:
        raise UsageError(f"patience {cfg.patience} is not allowed: use 1 or more")
    if cfg.output is not None:
        check_output(op, lo, hi, cfg.output)
    if cfg.weights is not None:
        check_weights(cfg.weights, lo, hi)
    if cfg.population < 4:
        raise UsageError(f"population {cfg.population} is not allowed: use at least 4")
    if cfg.generations < 0:
        raise UsageError(f"generations {cfg.generations} is not allowed: use 0 or more")
    if cfg.objective not in ("mse", "max"):
        raise UsageError(f"objective {cfg.objective!r} is not allowed: use mse or max")
    return (float(lo), float(hi)), tuple(range(d0, d1 + 1))


def check_output(op: Op, lo: float, hi: float, output: OutputFormat) -> None:
    """Output bits and fractional bits within the spec, and a grid that holds the function:
    a format whose largest value is under half the function's reach saturates most outputs."""
    check_bits("output bits", output.bits, *bounds.OUTPUT_BITS)
    e = output.frac_bits
    if isinstance(e, bool) or not isinstance(e, int) or not bounds.OUTPUT_FRAC_BITS[0] <= e <= bounds.OUTPUT_FRAC_BITS[1]:
        raise UsageError(f"output frac bits {e!r} is not allowed: use an integer from "
                         f"{bounds.OUTPUT_FRAC_BITS[0]} to {bounds.OUTPUT_FRAC_BITS[1]}")
    with np.errstate(all="ignore"):
        y = op.fn(np.linspace(lo, hi, 4097))
    reach = float(np.max(np.abs(y[np.isfinite(y)]), initial=0.0))
    holds = math.ldexp((1 << (output.bits - 1)) - 1, -e)
    if reach > 2 * holds:
        best = math.floor(output.bits - 1 - math.log2(reach))
        fix = (f"use --output-frac-bits {best} or fewer" if best >= 0 else
               f"raise --output-bits (at least {math.ceil(math.log2(reach)) + 1})")
        raise UsageError(f"output frac bits {e} is not allowed: {output.bits}-bit outputs with {e} fractional "
                         f"bits hold |y| <= {holds:.3g}, but {op.name} reaches {reach:.3g} on [{lo:g}, {hi:g}]: {fix}")


def check_weights(weights: np.ndarray, lo: float, hi: float) -> None:
    """An activation histogram must put some weight inside the fitted range, or the fit would
    silently be unweighted while its file says it is weighted."""
    if weights.ndim == 1:
        inside = (weights >= lo) & (weights <= hi)
        if not inside.any():
            raise UsageError(f"weights: none of the {weights.size} samples lies inside range [{lo:g}, {hi:g}] "
                             f"(they span [{weights.min():g}, {weights.max():g}])")
        return
    if not np.any(weights[:, 1] > 0):
        raise UsageError("weights: every weight is 0: give at least one positive weight")
    inside = (weights[:, 0] >= lo) & (weights[:, 0] <= hi) & (weights[:, 1] > 0)
    if not inside.any():
        raise UsageError(f"weights: no row with a positive weight lies inside range [{lo:g}, {hi:g}]")


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


def make_toolbox(problem: Problem, cfg: FitConfig, map_fn: Callable = map) -> base.Toolbox:
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
    curv = seeds[0]
    while len(pop) < size:
        if len(pop) % 2:
            g = sorted(random.uniform(lo, hi) for _ in range(n1))
        else:
            g = sorted(min(max(v + random.gauss(0, 0.5 * (hi - lo) / (n1 + 1)), lo), hi) for v in curv)
        pop.append(creator.GQAIndividual(g))
    return pop


# --- the fit ---------------------------------------------------------------------------------

def auto_frac_bits(op: Op, lo: float, hi: float, scales: tuple[int, ...], cfg: FitConfig) -> int:
    """F from the parameters a good float fit needs: the curvature-placed lines and the tails."""
    prob = build_problem(op.fn, lo, hi, cfg.segments, scales, 0, 16, cfg.input_bits,
                         hist=cfg.weights, max_positions=256)
    n1 = cfg.segments - 1
    seg = assign_real(prob, curvature_breakpoints(prob.fn, lo, hi, n1)[None])
    from gqa_lut.linefit import moments
    S1, Sx, Sxx, Sf, Sxf, _ = moments(prob, seg)
    det = S1 * Sxx - Sx * Sx
    ok = (S1 > 0) & (det > 1e-12 * np.maximum(S1, 1e-300) ** 2)
    k = np.where(ok, (Sxf * S1 - Sx * Sf) / np.where(ok, det, 1.0), 0.0)
    b = np.where(S1 > 0, (Sf - k * Sx) / np.where(S1 > 0, S1, 1.0), 0.0)
    vals = [k[ok], b[S1 > 0]]
    for tail in (op.left_tail, op.right_tail):
        if tail is not None:
            vals.append(np.array(tail))
    return choose_frac_bits(np.concatenate(vals), cfg.param_bits)


class _Progress:
    def __init__(self, callback: Optional[Callable[[int, int, float], None]], total: int):
        self.callback, self.total = callback, total

    def __call__(self, gen: int, best: float) -> None:
        if self.callback is not None:
            self.callback(gen, self.total, best)


def fit(op: Op | str | Callable, config: Optional[FitConfig] = None, *, map_fn: Callable = map,
        progress: Optional[Callable[[int, int, float], None]] = None) -> Table:
    """Fit a quantization-aware integer PWL table; the same config and seed give the same table."""
    cfg = config or FitConfig()
    op = resolve_op(op, cfg)
    (lo, hi), scales = validate_config(op, cfg)
    t0 = time.perf_counter()
    rstate = random.getstate()
    random.seed(cfg.seed)
    try:
        frac_bits = cfg.frac_bits if cfg.frac_bits is not None else auto_frac_bits(op, lo, hi, scales, cfg)
        problem = build_problem(op.fn, lo, hi, cfg.segments, scales, frac_bits, cfg.param_bits,
                                cfg.input_bits, cfg.output, cfg.objective, op.left_tail, op.right_tail,
                                cfg.weights)
        best, history, gens = _genetic_search(problem, cfg, map_fn, _Progress(progress, cfg.generations))
    finally:
        random.setstate(rstate)
    best = improve(problem, best, rounds=50, tol=0.0)
    best = polish(problem, best)
    if not problem.full:
        problem = build_problem(op.fn, lo, hi, cfg.segments, scales, frac_bits, cfg.param_bits,
                                cfg.input_bits, cfg.output, cfg.objective, op.left_tail, op.right_tail,
                                cfg.weights, max_positions=1 << 30)
        idx = _reindex(problem, best)
        K, B, E = fit_lines(problem, assign(problem, idx), keep=(best.K, best.B))
        from gqa_lut.linefit import total
        best = improve(problem, Population(K, B, idx, total(problem, E)), rounds=3)
    table = _to_table(problem, op, best)
    seconds = time.perf_counter() - t0
    table = table.with_(metrics=metrics(table, op.fn), search={
        "seed": cfg.seed, "population": cfg.population, "generations": gens,
        "seconds": round(seconds, 3), "tool_version": __version__, "objective": cfg.objective,
        "objective_value": float(best.fitness[0]), "frac_bits_auto": cfg.frac_bits is None,
        "weighted": cfg.weights is not None, "history": history, **cfg.extra,
    })
    return table


def _reindex(full: Problem, best: Population) -> np.ndarray:
    """Re-place breakpoints of the best lines on a full-resolution grid (after a blocked search)."""
    from gqa_lut.localsearch import resegment
    idx, _ = resegment(full, best.K, best.B)
    return idx


def _genetic_search(problem: Problem, cfg: FitConfig, map_fn: Callable, progress: _Progress
                    ) -> tuple[Population, list[dict], int]:
    tb = make_toolbox(problem, cfg, map_fn)
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
