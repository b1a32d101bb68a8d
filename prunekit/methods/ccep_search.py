"""CCEP's per-group evolutionary search: individuals, mutation, crossover, (mu + lambda).

Shang, Wu, Hong & Qian, "Neural Network Pruning by Cooperative Coevolution", IJCAI 2022
(arXiv:2204.05639), as the authors' ``CCEP.py`` computes it (notes: shared/research/
related_methods_1.md section 4). An individual is the kept-channel bit vector of one group
(``True`` = kept). :func:`evolve` runs one sub-problem: the initial population, ``generations``
rounds of children by bit-wise mutation of random parents (optionally after one-point
crossover) and (mu + lambda) selection by (fitness desc, #kept asc); :func:`choose` returns the
best individual, or the runner-up when the best is the unpruned one.

Reconstructed details (each an argument of these functions, with its default in
:class:`prunekit.methods.ccep.CCEP.Config`):

* the bound: a kept bit is pruned only if the individual keeps at least ``lower`` =
  ``ceil(n * prune_limitation)`` bits afterwards (the code tests ``#kept >= n * limit`` before
  the flip; prunekit never goes below the ceiling the initial top-up uses);
* a child made by crossover that falls below the bound is topped up at random (the code's
  crossover is off by default and unspecified here);
* the exact-size variant (explicit counts, prunekit's equal-MACs benchmark): every individual
  keeps exactly ``k`` bits; mutation swaps each kept bit with probability ``mutation_rate``
  with a random pruned one;
* ``fixed`` channels (the graph cannot remove them) are kept in every individual;
* fitness values are cached per bit vector (the evaluation is deterministic, so this only
  saves time).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

__all__ = ["lower_bound", "initial_population", "mutate", "swap_mutate", "crossover",
           "select", "choose", "evolve"]


def lower_bound(n: int, prune_limitation: float) -> int:
    """The fewest bits an individual of an ``n``-channel group may keep this round."""
    return max(1, min(n, math.ceil(n * prune_limitation - 1e-9)))


def _top_up(bits: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``bits`` with random pruned bits restored until ``count`` are kept."""
    bits = bits.copy()
    missing = count - int(bits.sum())
    if missing > 0:
        pruned = np.flatnonzero(~bits)
        bits[rng.choice(pruned, size=missing, replace=False)] = True
    return bits


def _exact(bits: np.ndarray, k: int, rng: np.random.Generator,
           fixed: np.ndarray) -> np.ndarray:
    """``bits`` with exactly ``k`` kept: random restores, or random non-fixed prunes."""
    bits = _top_up(bits | fixed, k, rng)
    extra = int(bits.sum()) - k
    if extra > 0:
        kept = np.flatnonzero(bits & ~fixed)
        bits[rng.choice(kept, size=extra, replace=False)] = False
    return bits


def initial_population(n: int, pop_size: int, init_rate: float, lower: int,
                       rng: np.random.Generator, fixed: np.ndarray | None = None,
                       exact: int | None = None) -> list[np.ndarray]:
    """The code's start: the full group, then individuals keeping each bit with probability
    ``init_rate``, topped up at random to ``lower`` kept bits. ``exact``: every individual
    keeps exactly that many (no full individual)."""
    fixed = np.zeros(n, dtype=bool) if fixed is None else fixed
    population = [] if exact is not None else [np.ones(n, dtype=bool)]
    while len(population) < pop_size:
        bits = (rng.random(n) < init_rate) | fixed
        population.append(_exact(bits, exact, rng, fixed) if exact is not None
                          else _top_up(bits, lower, rng))
    return population


def mutate(bits: np.ndarray, rate: float, lower: int, rng: np.random.Generator,
           fixed: np.ndarray | None = None) -> np.ndarray:
    """Bit-wise mutation with the ratio bound: each bit flips with probability ``rate``; a
    pruned bit is always restored, a kept bit is pruned only if ``lower`` bits stay kept."""
    child = bits.copy()
    flips = rng.random(child.size) < rate
    kept = int(child.sum())
    for i in np.flatnonzero(flips):
        if not child[i]:
            child[i], kept = True, kept + 1
        elif kept - 1 >= lower and not (fixed is not None and fixed[i]):
            child[i], kept = False, kept - 1
    return child


def swap_mutate(bits: np.ndarray, rate: float, rng: np.random.Generator,
                fixed: np.ndarray | None = None) -> np.ndarray:
    """The exact-size mutation: each non-fixed kept bit, with probability ``rate``, swaps
    with a random pruned bit (the kept count never changes)."""
    child = bits.copy()
    movable = child & ~(np.zeros_like(child) if fixed is None else fixed)
    for i in np.flatnonzero(movable & (rng.random(child.size) < rate)):
        pruned = np.flatnonzero(~child)
        if pruned.size == 0:
            break
        j = rng.choice(pruned)
        child[i], child[j] = False, True
    return child


def crossover(a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One-point crossover: ``a``'s bits before a random cut, ``b``'s after it."""
    cut = int(rng.integers(1, a.size)) if a.size > 1 else 0
    return np.concatenate([a[:cut], b[cut:]])


def select(population: list[np.ndarray], fitness: list[float],
           mu: int) -> tuple[list[np.ndarray], list[float]]:
    """(mu + lambda) survivors: sorted by (fitness desc, #kept asc), stable, the first ``mu``."""
    order = sorted(range(len(population)),
                   key=lambda i: (-fitness[i], int(population[i].sum())))[:mu]
    return [population[i] for i in order], [fitness[i] for i in order]


def choose(population: list[np.ndarray], fitness: list[float],
           keep_unpruned: bool = False) -> tuple[np.ndarray, float]:
    """The sorted population's best; if that is the unpruned individual and not
    ``keep_unpruned``, the first pruned one (the code's runner-up)."""
    if not keep_unpruned:
        for bits, value in zip(population, fitness):
            if not bits.all():
                return bits, value
    return population[0], fitness[0]


def evolve(n: int, fitness_of: Callable[[np.ndarray], float], rng: np.random.Generator, *,
           pop_size: int = 6, generations: int = 10, init_rate: float = 0.95,
           prune_limitation: float = 0.9, mutation_rate: float = 0.1,
           crossover_rate: float = 0.0, keep_unpruned: bool = False,
           fixed: np.ndarray | None = None, exact: int | None = None) -> dict:
    """One sub-problem: ``{"bits", "fitness", "initial_best", "initial_mean", "history",
    "evaluations"}``. ``fitness_of(bits)`` is the accuracy with only this group masked;
    ``exact``: search subsets of exactly that size (swap mutation)."""
    fixed = np.zeros(n, dtype=bool) if fixed is None else np.asarray(fixed, dtype=bool)
    lower = lower_bound(n, prune_limitation)
    cache: dict[bytes, float] = {}

    def value(bits):
        key = np.packbits(bits).tobytes()
        if key not in cache:
            cache[key] = float(fitness_of(bits))
        return cache[key]

    population = initial_population(n, pop_size, init_rate, lower, rng, fixed, exact)
    fitness = [value(b) for b in population]
    pruned_start = [f for b, f in zip(population, fitness) if not b.all()]
    initial_best = max(pruned_start) if pruned_start else max(fitness)
    initial_mean = float(np.mean(pruned_start)) if pruned_start else float(np.mean(fitness))
    population, fitness = select(population, fitness, pop_size)
    history = [fitness[0]]
    for _ in range(generations):
        children = []
        for _ in range(pop_size):
            parent = population[int(rng.integers(len(population)))]
            if crossover_rate > 0 and rng.random() < crossover_rate:
                other = population[int(rng.integers(len(population)))]
                parent = crossover(parent, other, rng) | fixed
                parent = _exact(parent, exact, rng, fixed) if exact is not None \
                    else _top_up(parent, lower, rng)
            children.append(swap_mutate(parent, mutation_rate, rng, fixed) if exact is not None
                            else mutate(parent, mutation_rate, lower, rng, fixed))
        population, fitness = select(population + children,
                                     fitness + [value(c) for c in children], pop_size)
        history.append(fitness[0])
    bits, best = choose(population, fitness, keep_unpruned)
    return {"bits": bits, "fitness": best, "initial_best": initial_best,
            "initial_mean": initial_mean, "history": history, "evaluations": len(cache)}
