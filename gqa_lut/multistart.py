"""Many starts, few finishes: the search's non-genetic phases for shared multi-scale tables.

The GA explores breakpoints but scores each individual after one Lloyd round; some of the best
tables only appear after a full exact alternation from a start the GA would not keep. So a
fit also alternates (exact lines <-> exact breakpoints) from many cheap starts, in one
vectorised batch, and spends the expensive +-1 LSB polish only on the few best.
"""
from __future__ import annotations

import numpy as np

from gqa_lut.localsearch import Population, exact_alternation, finish, lloyd
from gqa_lut.problem import Problem

FINISHED = 4  # candidates of a start family that get the polish
FINISH_WITHIN = 1.25  # ... if within this factor of the incumbent (the polish gains less than 20%)
STARTS_PER_INDIVIDUAL = 25  # random starts per GA individual: 1000 by default, what exp at 8 segments needs
RANDOM_STARTS_MAX_SEGMENTS = 16  # their alternations cost O(N) each; larger fits embed the N/2 fit
SCREEN_ROUNDS = 3  # alternation rounds every random start gets
SHORTLIST = 64  # random starts that alternate until nothing improves


def start_count(population: int) -> int:
    """Random starts for a fit: in proportion to the GA's population (the effort asked for)."""
    return STARTS_PER_INDIVIDUAL * population


def random_starts(problem: Problem, seed: int, count: int) -> Population:
    """`count` uniform random shared breakpoints, each taken through Lloyd and the exact
    alternation. The seed makes it reproducible (numpy's generator, not DEAP's `random`)."""
    rng = np.random.default_rng(seed)
    genomes = np.sort(rng.uniform(problem.lo, problem.hi, (count, problem.segments - 1)), axis=1)
    pop = exact_alternation(problem, lloyd(problem, genomes), rounds=SCREEN_ROUNDS)
    pop = exact_alternation(problem, pop.take(np.argsort(pop.fitness, kind="stable")[:SHORTLIST]))
    return pop.take(np.argsort(pop.fitness, kind="stable"))


def finish_best(problem: Problem, best: Population, candidates: Population, count: int = FINISHED) -> Population:
    """The better of `best` and the polished first `count` distinct candidates (sorted best first)
    that come within FINISH_WITHIN of it."""
    seen: set[bytes] = set()
    for j in range(candidates.fitness.shape[0]):
        if len(seen) >= count or not candidates.fitness[j] < best.fitness[0] * FINISH_WITHIN:
            break
        key = candidates.K[j].tobytes() + candidates.B[j].tobytes()
        if key in seen:
            continue
        seen.add(key)
        done = finish(problem, candidates.take(j))
        if done.fitness[0] < best.fitness[0] * (1 - 1e-12):
            best = done
    return best
