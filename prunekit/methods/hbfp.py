"""HBFP, History Based Filter Pruning (method ``hbfp``).

S. H. Shabbeer Basha, M. Farazuddin, V. Pulabaigari, S. R. Dubey, S. Mukherjee, "Deep Model
Compression based on the Training History", arXiv:2102.00160; code
shabbeersh/History_Based_Filter_Pruning @f4514d3e (Keras; shared/research/related_methods_1.md
section 6). The paper's version, not the code's where they differ (the definitions and the
code's bugs are in :mod:`prunekit.methods.hbfp_history`). One iteration:

1. train while :class:`~prunekit.methods.hbfp_history.NormHistory` records each channel's L1
   norm N_i(t) (every pairable group; the first iteration trains ``history_epochs``, later
   ones use the previous iteration's retraining as their history, as the code does);
2. pair: D_ij = sum_t |N_i(t) - N_j(t)|, greedy disjoint pairs by ascending D, as many
   pairs per group as the target asks of this iteration (at most half its channels);
3. optimise ``optimize_epochs`` with the regulariser ``reg_weight * sum_pairs |N_i - N_j|``
   on the current weights (differentiable; the code's is a constant);
4. remove the smaller-norm member of each pair physically (``prune_by``: summed over the
   history, the code's, or the current norm after step 3);
5. retrain (recording the next history); the last iteration's retraining is the
   fine-tuning (``out/finetune``). The code stops iterating once val accuracy falls more
   than 2 points below the best (``stop_drop``; off by default: the target decides, and a
   stop short of it warns); the model is kept as it is then (no revert).

Targets (the code has a fixed number of filters per stage and iteration instead):

* ``counts`` (the equal-MACs benchmark): each named group ends with exactly that many
  channels, the removals spread evenly over ``iterations`` (more in the early ones when a
  later one could not remove enough: one iteration removes at most half of a group's free
  channels, one per pair). A count out of reach in ``iterations`` is refused before work.
* ``macs_reduction`` T: iteration i (1-based) of I prunes to (1 - T)^(i / I) of the original
  MACs (the same share of the remaining MACs each time), a uniform fraction of every group
  (residual streams scaled by the target's ``stream_scale``), then one pair at a time, so each
  iteration lands within 1% of the original MACs below its goal (as prunekit's uniform MACs
  allocation; the nearest below it when a channel costs more). Missing the target (the pairs run
  out, or ``stop_drop``) warns :class:`~prunekit.plan.MacsTargetWarning`.

Groups paired: every prunable group with two or more free channels and no grouped-layer
blocks; fixed channels, and channels a zero-padding shortcut ties to a kept channel
(``graph.requirements``), are never paired. The code prunes every conv (streams too).

Budget: the whole training is the job's ``--finetune-epochs`` E (``trains``), in steps
(E x steps per epoch): the first history ``history_epochs``, each optimisation
``optimize_epochs``, and the rest split evenly over the I retrainings. Unset, they take the
code's shares (200 history, 10 optimisation and 200 retraining epochs per iteration). A phase
of at least an epoch is rounded to whole epochs; a shorter one is one truncated epoch
(``max_steps_per_epoch``). Each phase is its own :func:`prunekit.train.fit` (its own lr
schedule, as the code's separate Keras fits) in ``out/hbfp/...`` with seed = the run's seed +
phase index (a truncated epoch would otherwise see the same first batches every phase) and
the run's distillation; phases resume (a rerun replays the finished ones from their
checkpoints, the pairing is deterministic). Optimiser: the run's SGD (the code: Adam).

Cost: recording is one abs-sum of every producing weight per record (negligible); a ResNet-56
epoch is ~7 min on this machine's 2 cores, so the paper's setting (recipes/hbfp_resnet56.yaml:
200 + 4 x (10 + 200) = 1040 epochs) is ~120 CPU hours; the small defaults (1 iteration) use
whatever budget the run gives.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..graph import build_graph
from ..measure import count_macs
from ..plan import MacsEstimator, MacsTargetWarning
from ..plan.macs import bisect
from ..plan.streams import is_stream
from ..pruning import prune
from ..surgery import ModelSnapshot
from ..train import TrainConfig, fit
from .context import MethodContext
from .hbfp_history import (IterationPairs, NormHistory, PairRegulariser, channel_norms,
                           check_every)
from .registry import MethodConfig, MethodResult, PruningMethod, option, register_method

__all__ = ["HBFP", "HBFPStopWarning", "most_removable", "pairable_groups", "phase_steps"]

#: The code's epochs: base training (the first history), optimisation, retraining.
CODE_EPOCHS = {"history": 200, "optimize": 10, "retrain": 200}


class HBFPStopWarning(UserWarning):
    """HBFP ended before its counts were reached (``stop_drop``, or too few free pairs)."""


def pairable_groups(graph, stream_scale: float = 1.0) -> list[str]:
    """Groups HBFP pairs: prunable, >= 2 free channels, no blocks (streams unless scaled 0)."""
    return [g.name for g in graph.prunable_groups()
            if not g.blocks and int((~g.fixed).sum()) >= 2
            and any(m.tensor.endswith("weight") for m, _ in g.producers())
            and (stream_scale > 0 or not is_stream(g))]


def most_removable(free: int, iterations: int) -> int:
    """Channels ``iterations`` iterations can remove from ``free`` free channels (each pairs
    them and removes one of each pair: ``free`` -> ceil(free / 2))."""
    return free - math.ceil(free / 2 ** iterations)


def pairs_this_iteration(remaining: int, free: int, left: int) -> int:
    """An even share of ``remaining`` over ``left`` iterations, more when the later ones could
    not remove the rest."""
    cap = free // 2
    count = min(cap, math.ceil(remaining / left))
    while count < cap and remaining - count > most_removable(free - count, left - 1):
        count += 1
    return count


def phase_steps(total: int, per_epoch: int, iterations: int, history_epochs=None,
                optimize_epochs=None) -> tuple[int, int, list[int]]:
    """``(history, optimisation, [retraining per iteration])`` steps of a ``total``-step
    budget (the module doc)."""
    unit = CODE_EPOCHS["history"] + iterations * (CODE_EPOCHS["optimize"] +
                                                  CODE_EPOCHS["retrain"])
    history = history_epochs * per_epoch if history_epochs is not None \
        else max(1, round(total * CODE_EPOCHS["history"] / unit))
    optimize = optimize_epochs * per_epoch if optimize_epochs is not None \
        else max(1, round(total * CODE_EPOCHS["optimize"] / unit))
    rest = total - history - iterations * optimize
    if rest < iterations:
        raise ConfigError(f"HBFP's budget of {total} steps ({total // per_epoch} epochs of "
                          f"{per_epoch}) leaves {rest} for {iterations} retraining(s) after "
                          f"{history} history and {iterations} x {optimize} optimisation "
                          "steps: raise --finetune-epochs or lower history_epochs / "
                          "optimize_epochs / iterations")
    base, extra = divmod(rest, iterations)
    return history, optimize, [base + (i >= iterations - extra) for i in range(iterations)]


def _fit_length(steps: int, per_epoch: int) -> tuple[int, int | None]:
    """``(epochs, max_steps_per_epoch or None: the run's)`` of a ``steps``-step phase."""
    return (max(1, round(steps / per_epoch)), None) if steps >= per_epoch else (1, steps)


@register_method
class HBFP(PruningMethod):
    """History Based Filter Pruning (Basha et al., arXiv:2102.00160): pair channels whose
    L1-norm histories stay close, pull each pair together with a differentiable regulariser,
    remove the smaller member of each pair; iterate."""

    name = "hbfp"
    summary = ("history-based filter pruning: pair channels whose L1-norm histories stay "
               "close, pull the pairs together, remove one of each pair; iterated")
    trains = True
    target_kinds = ("macs_reduction", "counts")

    @dataclass
    class Config(MethodConfig):
        iterations: int = option(1, "pair-optimise-prune-retrain iterations (the code: up "
                                 "to 4; small default)")
        stop_drop: float | None = option(None, "stop iterating once val top-1 falls more than "
                                         "this many points below the best so far (the code: "
                                         "2); unset: off, the target decides")
        history_epochs: int | None = option(None, "epochs recorded before the first pairing "
                                            "(the code: 200); unset: its share of the budget")
        optimize_epochs: int | None = option(None, "epochs with the pair regulariser per "
                                             "iteration (the code: 10); unset: its share")
        record_every: str | int = option("epoch", "norm records: 'epoch' (every epoch end, "
                                         "the code's) or every N optimiser steps (and epoch "
                                         "ends), for budgets shorter than a few epochs")
        reg_weight: float = option(1e-3, "lam of lam * sum_pairs |N_i - N_j| (reconstructed: "
                                   "the paper's value is unread; the code scales its constant "
                                   "term by 0.001)")
        prune_by: str = option("history", "which pair member goes: the smaller norm summed "
                               "over the history (the code's) or the current norm after the "
                               "optimisation", choices=("history", "current"))

        def validate(self) -> None:
            if isinstance(self.record_every, str) and self.record_every.isdigit():
                self.record_every = int(self.record_every)  # from the command line
            check_every(self.record_every)
            for key, low in (("iterations", 1), ("history_epochs", 1), ("optimize_epochs", 0)):
                value = getattr(self, key)
                if value is None and key != "iterations":
                    continue
                if isinstance(value, bool) or not isinstance(value, int) or value < low:
                    raise ConfigError(f"hbfp: {key} must be a whole number >= {low}, got "
                                      f"{value!r}")
            for key in ("stop_drop", "reg_weight"):
                value = getattr(self, key)
                if value is None and key == "stop_drop":
                    continue
                if isinstance(value, bool) or not isinstance(value, (int, float)) \
                        or not math.isfinite(value) or value < 0:
                    raise ConfigError(f"hbfp: {key} must be a finite number >= 0, got "
                                      f"{value!r}")

    def run(self, model: nn.Module, context: MethodContext) -> MethodResult:
        c, target = self.config, context.target
        if target.kind not in self.target_kinds:
            raise ConfigError(f"method hbfp takes a macs_reduction or counts target, got "
                              f"{target.kind}")
        data = context.require_data("method hbfp")
        graph = context.graph(model)
        counts = self._checked_counts(graph, target.counts) if target.kind == "counts" \
            else None
        train_set, val_set = data.train_set(), data.val_set()
        if c.stop_drop is not None and val_set is None:
            raise ConfigError("hbfp: stop_drop compares val accuracy; this run has no val split")
        per_epoch = math.ceil(len(train_set) / context.finetune.batch_size)
        per_epoch = min(per_epoch, context.finetune.max_steps_per_epoch or per_epoch)
        phases = phase_steps(context.finetune.epochs * per_epoch, per_epoch, c.iterations,
                             c.history_epochs, c.optimize_epochs)
        snapshot, weights = ModelSnapshot(model), copy.deepcopy(model.state_dict())
        try:
            return self._iterate(model, context, graph, counts, (train_set, val_set),
                                 phases, per_epoch)
        except BaseException:  # put the user's model back: structure, then the weights
            snapshot.restore()
            with torch.no_grad():
                model.load_state_dict(weights)
            raise

    def _checked_counts(self, graph, given) -> dict[str, int]:
        c, counts = self.config, {k: int(v) for k, v in given.items()}
        names = set(pairable_groups(graph))
        for name, keep in counts.items():
            group = graph.by_name.get(name)
            if group is None:
                raise ConfigError(f"hbfp: counts name unknown group {name!r}")
            if not 1 <= keep <= group.size:
                raise ConfigError(f"hbfp: counts[{name!r}] = {keep} must be in [1, "
                                  f"{group.size}]")
            if keep == group.size:
                continue
            if name not in names:
                raise ConfigError(f"hbfp: group {name!r} cannot be paired (fixed channels, "
                                  "grouped-layer blocks or fewer than 2 free channels); keep "
                                  "it whole")
            free = int((~group.fixed).sum())
            need = next((i for i in range(1, 64) if group.size - keep <=
                         most_removable(free, i)), None)
            if need is None or need > c.iterations:
                raise ConfigError(f"hbfp: keeping {keep} of the {group.size} channels of "
                                  f"{name!r} needs {need or 'more'} iterations (each removes "
                                  f"at most half of the free channels, one per pair); set "
                                  f"iterations >= {need} or keep more")
        return counts

    def _wanted(self, model, graph, pairing, context, counts, macs0, it) -> dict[str, int]:
        """Pairs per group this iteration (the module doc's targets)."""
        c, target, example = self.config, context.target, context.example_inputs
        left = c.iterations - it
        if counts is not None:
            wanted = {}
            for name, keep in counts.items():
                group = graph.by_name[name]
                if group.size > keep:
                    wanted[name] = pairs_this_iteration(group.size - keep,
                                                        int((~group.fixed).sum()), left)
            return wanted
        floor = macs0 * (1 - target.macs_reduction) ** ((it + 1) / c.iterations)
        estimate = MacsEstimator(model, graph, example)
        names = list(pairing.distances)
        scale = {n: target.stream_scale if is_stream(graph.by_name[n]) else 1.0 for n in names}
        caps = {n: pairing.capacity(n) for n in names}

        def at(ratio: float) -> dict[str, int]:
            return {n: min(caps[n], int(ratio * scale[n] * graph.by_name[n].size + 1e-9))
                    for n in names}

        def macs(wanted: dict[str, int]) -> float:
            return estimate(pairing.plan(wanted)[0])

        current = estimate({})
        if current <= floor:
            return {}
        if macs(at(1.0)) > floor:
            return at(1.0)  # all this iteration can do; the next ones catch up or it warns
        lo, hi = bisect(lambda r: macs(at(r)) <= floor, 0.0, 1.0, 20)
        wanted, current = at(lo), macs(at(lo))
        order = sorted(names, key=lambda n: -graph.by_name[n].size)
        crossing, progressed = None, True
        while progressed:  # one pair at a time: land within 1% (a channel) below the goal
            progressed = False
            for name in order:
                if wanted[name] >= caps[name] or scale[name] == 0:
                    continue
                trial = {**wanted, name: wanted[name] + 1}
                value = macs(trial)
                if value <= floor:
                    if value >= floor - 0.01 * macs0:
                        return trial
                    if crossing is None or value > crossing[0]:
                        crossing = (value, trial)  # too costly a channel: try the others
                elif value < current:
                    wanted, current, progressed = trial, value, True
        return crossing[1] if crossing is not None else at(hi)

    def _iterate(self, model, context, graph, counts, sets, phases, per_epoch) -> MethodResult:
        c, target, example = self.config, context.target, context.example_inputs
        history_steps, optimize_steps, retrain_steps = phases
        root, index = context.out_dir / "hbfp", [0]
        scale = target.stream_scale if target.kind == "macs_reduction" else 1.0

        def train(steps, out, hooks):
            epochs, max_steps = _fit_length(steps, per_epoch)
            values = {**context.finetune.to_dict(), "epochs": epochs,
                      "seed": context.finetune.seed + index[0]}
            if max_steps is not None:
                values["max_steps_per_epoch"] = max_steps
            values["warmup_epochs"] = min(values.get("warmup_epochs") or 0, epochs)
            index[0] += 1
            return fit(model, sets[0], sets[1], TrainConfig.from_dict(values), out,
                       hooks=hooks, distill=context.distill)

        sizes = {g.name: g.size for g in graph.groups}
        original = {name: list(range(size)) for name, size in sizes.items()}
        macs0 = count_macs(model, example)
        recorder = NormHistory(graph, pairable_groups(graph, scale), c.record_every)
        with context.stage("hbfp_history"):
            summary = train(history_steps, root / "history", [recorder])
        best, log, stopped = summary["final_val_top1"], [], None
        for it in range(c.iterations):
            records = recorder.records
            pairing = IterationPairs(graph, records,
                                     {n: h.sum(0) for n, h in records.items()})
            wanted = self._wanted(model, graph, pairing, context, counts, macs0, it)
            plan, pairs, _ = pairing.plan(wanted)
            if not plan:
                break
            entry = {"iteration": it + 1, "records": len(recorder),
                     "pairs": {n: [list(p) for p in v] for n, v in pairs.items()}}
            if optimize_steps:
                regulariser = PairRegulariser(graph, pairs, c.reg_weight)
                with context.stage("hbfp_optimize"):
                    train(optimize_steps, root / f"iteration{it + 1}" / "optimize",
                          [regulariser])
                if regulariser.values and c.reg_weight:
                    entry["penalty"] = [regulariser.values[0] / c.reg_weight,
                                        regulariser.values[-1] / c.reg_weight]
            if c.prune_by == "current":
                with torch.no_grad():
                    pairing.importance = {n: channel_norms(model, graph.by_name[n]).double()
                                          .cpu().numpy() for n in pairing.distances}
                plan, _, _ = pairing.plan(wanted)
            prune(model, example, plan=plan, graph=graph)
            entry["removed"] = {n: sorted(set(original[n]) - {original[n][i] for i in kept})
                                for n, kept in plan.items()}
            for name, kept in plan.items():
                original[name] = [original[name][i] for i in kept]
            graph = build_graph(model, example, ignore=target.ignore,
                                leaf_modules=context.leaf_modules)
            if set(graph.by_name) - set(sizes):
                raise ConfigError("hbfp: the pruned model's groups are named differently "
                                  f"({sorted(set(graph.by_name) - set(sizes))[:3]}); the "
                                  "iterations cannot be composed into one plan")
            last = it == c.iterations - 1
            recorder = None if last else NormHistory(graph, pairable_groups(graph, scale),
                                                     c.record_every)
            with context.stage("hbfp_finetune" if last else "hbfp_retrain"):
                summary = train(retrain_steps[it], context.out_dir / "finetune" if last
                                else root / f"iteration{it + 1}" / "retrain",
                                [recorder] if recorder is not None else [])
            val = summary["final_val_top1"]
            entry.update(macs_reduction=1 - count_macs(model, example) / macs0, val_top1=val)
            log.append(entry)
            if c.stop_drop is not None and val is not None and best is not None \
                    and val < best - c.stop_drop and not last:
                stopped = f"val top-1 {val:.2f} fell more than {c.stop_drop} below {best:.2f}"
                break
            best = val if best is None or (val is not None and val > best) else best
        reduction = 1 - count_macs(model, example) / macs0
        if counts is not None:
            reached = all(len(original[n]) == k for n, k in counts.items())
            if not reached:
                why = stopped or "too few free pairs: zero-padding shortcut locks"
                warnings.warn(f"hbfp ended before its counts were reached ({why})",
                              HBFPStopWarning, stacklevel=2)
        else:
            reached = reduction >= target.macs_reduction - 1e-9
            if not reached:
                warnings.warn(f"hbfp: {len(log)} iteration(s) removed {reduction:.1%} of the "
                              f"MACs, short of the target {target.macs_reduction:.1%}"
                              f"{f' ({stopped})' if stopped else ''}: raise iterations",
                              MacsTargetWarning, stacklevel=2)
        extras = {"hbfp": {"reached": reached, "stopped": stopped, "macs_reduction": reduction,
                           "phase_steps": {"history": history_steps, "optimize": optimize_steps,
                                           "retrain": retrain_steps},
                           "steps_per_epoch": per_epoch, "iterations": log}}
        plan = {k: v for k, v in original.items() if len(v) < sizes[k]}
        return MethodResult(plan=plan, trained=True, summary=summary, extras=extras,
                            group_sizes=sizes)
