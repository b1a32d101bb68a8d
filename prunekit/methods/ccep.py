"""CCEP: pruning by cooperative coevolution (method ``ccep``).

Shang, Wu, Hong & Qian, "Neural Network Pruning by Cooperative Coevolution", IJCAI 2022,
pp. 4814-4820 (arXiv:2204.05639), as the authors' code computes it (``CCEP.py``; notes:
shared/research/related_methods_1.md section 4). Per round: one sub-problem per prunable
inner group (ResNet-56: each block's conv1; residual streams are not pruned unless
``prune_streams``), each searched independently against the same current model by
:func:`prunekit.methods.ccep_search.evolve` with fitness = top-1 on a fixed subset of the
``val`` split with only that group masked (:mod:`prunekit.criteria.masked_eval`, no surgery
per candidate); then all groups' solutions are spliced into one plan, removed physically and
the model is fine-tuned; the next round starts from the pruned model.

Targets (prunekit's, the code has only a round count):

* ``macs_reduction``: rounds run until the target is reached and stop there. The round that
  would overshoot is limited: the groups' solutions are applied in order of their fitness
  (best first) and the group that crosses the target removes only as many of its chosen
  channels (in random order) as bring the MACs to the target, so the reduction lands at the
  target within one channel's MACs. If ``rounds`` run out first a :class:`MacsTargetWarning`
  says so and the report's ``ccep.reached`` is false.
* ``counts`` (the equal-MACs benchmark: every inner group to k channels): the "equal-MACs
  variant", one round in which the EA searches subsets of exactly those sizes (mutation swaps
  a kept and a pruned bit; ``prune_limitation`` does not apply).

Fine-tuning: after every round but the last, ``round_finetune_epochs`` epochs (at most
``round_finetune_max_steps`` steps each) with the run's fine-tuning settings and its
distillation, in ``out/ccep/round<r>`` (restarted, not resumed, on a rerun); the last round's
fine-tuning is the job's ``--finetune-epochs`` stage (the code's ``ft_epoch`` after every
round), so a rerun resumes from ``pruned.safetensors``. Seeded (``search_seed``) and deterministic.

Cost with the defaults (measured here, one thread, nice 19 beside a running benchmark, CIFAR
ResNet-56 at 32 x 32): one round = 27 groups, 302 fitness evaluations of 256 images (~0.7 s
each; the cache spares repeats), 220 s, and removes ~8.3% of the MACs (prune_limitation 0.9);
a 50% MACs target takes ~8 rounds, ~30 min of search plus ~7 x 20 fine-tuning steps (~1.2 s
per step of 128) and their val passes. The paper's setting (recipes/ccep_resnet56.yaml:
10 generations, the whole val split, 100 epochs per round) is hundreds of CPU hours.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..criteria.masked_eval import evaluate_masked, prepared_batches
from ..errors import ConfigError
from ..graph import build_graph
from ..plan import MacsEstimator, MacsTargetWarning
from ..plan.streams import is_stream
from ..pruning import prune
from ..train import TrainConfig, fit
from .ccep_search import evolve
from .context import MethodContext
from .registry import MethodConfig, MethodResult, PruningMethod, option, register_method

__all__ = ["CCEP", "fitness_batches", "search_round"]


def fitness_batches(dataset, images: int, batch_size: int, seed: int) -> list:
    """A fixed, seeded subset of ``images`` samples of ``dataset`` as prepared batches."""
    if len(dataset) == 0:
        raise ConfigError("CCEP's fitness needs a non-empty val split")
    picked = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    picked = picked[:min(images, len(dataset))].tolist()
    batches = []
    for start in range(0, len(picked), batch_size):
        items = [dataset[i] for i in picked[start:start + batch_size]]
        x = torch.stack([torch.as_tensor(a) for a, _ in items])
        y = torch.as_tensor([int(b) for _, b in items])
        batches.append((x, y))
    return prepared_batches(batches, what="CCEP fitness")


def search_round(model: nn.Module, graph, groups: list[str], batches, config, rng_seed,
                 exact: dict[str, int] | None = None) -> dict[str, dict]:
    """Run the EA of every group in ``groups`` against ``model`` (unchanged afterwards);
    ``{group: evolve's result}``."""
    results = {}
    for index, name in enumerate(groups):
        group = graph.by_name[name]

        def fitness_of(bits, name=name):
            plan = {name: np.flatnonzero(bits).tolist()}
            return evaluate_masked(model, graph, plan, batches)["accuracy"]

        rng = np.random.default_rng([int(config.search_seed), int(rng_seed), index])
        results[name] = evolve(
            group.size, fitness_of, rng, pop_size=config.pop_size,
            generations=config.generations, init_rate=config.pop_init_rate,
            prune_limitation=config.prune_limitation, mutation_rate=config.mutation_rate,
            crossover_rate=config.crossover_rate if config.crossover else 0.0,
            keep_unpruned=config.keep_unpruned, fixed=np.asarray(group.fixed, dtype=bool),
            exact=None if exact is None else exact[name])
    return results


def splice(results: dict[str, dict], estimator: MacsEstimator | None,
           target_macs: float | None, rng: np.random.Generator) -> tuple[dict, bool]:
    """One plan from the groups' solutions. With ``target_macs``: applied best fitness first;
    the group whose solution would take the MACs to or below the target removes only as many
    of its chosen channels (random order) as reach it, and later groups nothing. Returns
    ``(plan, target reached)``."""
    plan: dict[str, list[int]] = {}
    for name in sorted(results, key=lambda g: -results[g]["fitness"]):
        bits = results[name]["bits"]
        if bits.all():
            continue
        trial = {**plan, name: np.flatnonzero(bits).tolist()}
        if target_macs is None or estimator(trial) > target_macs:
            plan = trial
            continue
        removed = np.flatnonzero(~bits)
        kept = np.ones(bits.size, dtype=bool)
        for channel in removed[rng.permutation(removed.size)]:
            kept[channel] = False
            trial = {**plan, name: np.flatnonzero(kept).tolist()}
            if estimator(trial) <= target_macs:
                return trial, True
    return plan, target_macs is not None and bool(plan) and estimator(plan) <= target_macs


@register_method
class CCEP(PruningMethod):
    """Cooperative-coevolution pruning (Shang et al., IJCAI 2022, arXiv:2204.05639): per
    round an EA per inner group on validation accuracy under the mask, splice, remove,
    fine-tune; rounds until the MACs target (or one exact-size round for explicit counts)."""

    name = "ccep"
    summary = ("cooperative coevolution: per-group (mu+lambda) search of kept channels on "
               "val accuracy, prune-and-fine-tune rounds")
    target_kinds = ("macs_reduction", "counts")

    @dataclass
    class Config(MethodConfig):
        rounds: int = option(20, "most prune-and-fine-tune rounds (the code's run_epoch 20); "
                             "stops early at a macs_reduction target")
        pop_size: int = option(6, "population size mu = lambda (the code's 6)")
        generations: int = option(2, "generations per group and round (the code's "
                                  "evolution_epoch 10; small budget default)")
        pop_init_rate: float = option(0.95, "initial individuals keep each channel with this "
                                      "probability (the code's pop_init_rate)")
        prune_limitation: float = option(0.9, "an individual keeps >= ceil(n * this) of the "
                                         "round's n channels (the code's prune_limitation)")
        mutation_rate: float = option(0.1, "bit flip probability (the code's 0.1)")
        crossover: bool = option(False, "one-point crossover before mutation (off in the code)")
        crossover_rate: float = option(0.3, "crossover probability when on (the code's 0.3)")
        keep_unpruned: bool = option(False, "allow the unpruned individual as the result "
                                     "(the code's --keep; off: take the runner-up)")
        fitness_images: int = option(256, "fitness = top-1 on this many fixed val images "
                                     "(the code: its whole valid split; small default)")
        fitness_batch_size: int = option(128, "batch size of the fitness evaluations")
        round_finetune_epochs: int = option(1, "fine-tuning epochs after each round but the "
                                            "last (the code's ft_epoch 100; the last round's "
                                            "is the job's --finetune-epochs)")
        round_finetune_max_steps: int = option(20, "at most this many steps per round "
                                               "fine-tuning epoch (0: whole epochs)")
        prune_streams: bool = option(False, "also search residual-stream groups (the code "
                                     "prunes only each block's conv1)")
        search_seed: int = option(0, "seed of the search's randomness and of the fitness "
                                  "subset (the fine-tuning uses the run's seed)")

        def validate(self) -> None:
            if isinstance(self.search_seed, bool) or not isinstance(self.search_seed, int):
                raise ConfigError(f"ccep: search_seed must be an int, got {self.search_seed!r}")
            for key in ("rounds", "pop_size", "fitness_images", "fitness_batch_size"):
                value = getattr(self, key)
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ConfigError(f"ccep: {key} must be an int >= 1, got {value!r}")
            for key in ("generations", "round_finetune_epochs", "round_finetune_max_steps"):
                value = getattr(self, key)
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ConfigError(f"ccep: {key} must be an int >= 0, got {value!r}")
            for key in ("pop_init_rate", "prune_limitation", "mutation_rate", "crossover_rate"):
                value = getattr(self, key)
                if isinstance(value, bool) or not isinstance(value, (int, float)) \
                        or not 0 < value <= 1 or (key == "prune_limitation" and value == 1):
                    raise ConfigError(f"ccep: {key} must be a number in (0, 1]"
                                      f"{' and < 1' if key == 'prune_limitation' else ''}, "
                                      f"got {value!r}")

    def run(self, model: nn.Module, context: MethodContext) -> MethodResult:
        cfg, target = self.config, context.target
        if target.kind not in self.target_kinds:
            raise ConfigError(f"method ccep takes a macs_reduction or counts target, got "
                              f"{target.kind}")
        data = context.require_data("method ccep")
        graph = context.graph(model)
        sizes = {g.name: g.size for g in graph.prunable_groups()}
        if target.kind == "counts":
            exact = {k: int(v) for k, v in target.counts.items()}
            unknown = sorted(set(exact) - set(sizes))
            if unknown:
                raise ConfigError(f"ccep: counts name unknown groups {unknown}")
            bad = [k for k, v in exact.items() if not 1 <= v <= sizes[k]]
            if bad:
                raise ConfigError(f"ccep: counts of {bad} must be in [1, group size]")
        batches = fitness_batches(data.val_set(), cfg.fitness_images, cfg.fitness_batch_size,
                                  cfg.search_seed)
        original = {name: list(range(n)) for name, n in sizes.items()}
        macs0 = MacsEstimator(model, graph, context.example_inputs)({})
        history, reached = [], False
        with context.stage("ccep_search"):
            for round_ in range(1 if target.kind == "counts" else cfg.rounds):
                if round_:
                    graph = build_graph(model, context.example_inputs, ignore=target.ignore,
                                        leaf_modules=context.leaf_modules)
                estimator = MacsEstimator(model, graph, context.example_inputs)
                if target.kind == "counts":
                    groups = [k for k, v in exact.items() if v < sizes[k]]
                    floor, counts = None, exact
                else:
                    groups = [g.name for g in graph.prunable_groups()
                              if cfg.prune_streams or not is_stream(g)]
                    floor, counts = (1 - target.macs_reduction) * macs0, None
                results = search_round(model, graph, groups, batches, cfg, round_, counts)
                rng = np.random.default_rng([int(cfg.search_seed), int(round_), 7])
                plan, reached = splice(results, estimator, floor, rng)
                if target.kind == "counts":
                    reached = True
                if not plan:
                    break
                prune(model, context.example_inputs, plan=plan, graph=graph)
                for name, kept in plan.items():
                    original[name] = [original[name][i] for i in kept]
                history.append({
                    "round": round_, "macs_reduction": 1 - estimator(plan) / macs0,
                    "groups": {n: {"kept": int(r["bits"].sum()), "fitness": r["fitness"],
                                   "initial_best": r["initial_best"],
                                   "evaluations": r["evaluations"]}
                               for n, r in results.items()}})
                if reached or round_ == cfg.rounds - 1:
                    break
                self._finetune(model, context, data, round_)
        if not reached:
            warnings.warn(f"ccep: {len(history)} rounds reached "
                          f"{history[-1]['macs_reduction'] if history else 0:.1%} fewer MACs, "
                          f"short of the target {target.macs_reduction:.1%}: raise rounds or "
                          "lower prune_limitation", MacsTargetWarning, stacklevel=2)
        plan = {k: v for k, v in original.items() if len(v) < sizes[k]}
        return MethodResult(plan=plan, group_sizes=sizes,
                            extras={"ccep": {"reached": reached, "history": history}})

    def _finetune(self, model, context, data, round_: int) -> None:
        cfg = self.config
        if cfg.round_finetune_epochs == 0:
            return
        values = {**context.finetune.to_dict(), "epochs": cfg.round_finetune_epochs,
                  "max_steps_per_epoch": cfg.round_finetune_max_steps or None}
        values["warmup_epochs"] = min(values.get("warmup_epochs") or 0,
                                      cfg.round_finetune_epochs)
        with context.stage("ccep_finetune"):
            fit(model, data.train_set(), data.val_set(), TrainConfig.from_dict(values),
                context.out_dir / "ccep" / f"round{round_}", resume=False,
                distill=context.distill)
