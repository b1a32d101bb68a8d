"""The methods table of ``benchmarks/equal_macs.py --methods``: every pruning method at the same
MACs reduction and the same fine-tuning budget on the pretrained CIFAR-10 ResNet-56.

One protocol for every row:

* the same kept counts: every block's inner channels at one ratio, residual streams kept (the
  setting of the EPruner, FilterSketch and Central Filter papers), the ratio found once so
  the MACs fall by the target (47%); criteria that decide their own counts (EPruner's
  exemplars, PFP's error level) also get a row with their own counts, with the MACs they reach;
* one-shot rows: scored (calibration: 5 x 128 augmented train images, seed 0; held-out gates:
  4 x 128 val images), removed, evaluated right after and with BN re-estimated (8 x 64
  augmented train images), then the same fine-tuning budget: 1 epoch of SGD (lr 0.01 cosine,
  momentum 0.9, wd 5e-4, batch 128, seed 0) on the augmented train split;
* soft rows (SFP, ASFP, GHFP, decaying SFP, FSDP) prune *while* training: they get the same
  1 epoch with their masks and the same counts, and only the model removed at its end is
  evaluated (no "right after" value exists);
* method rows (FSDP, KDFS, CCEP, HBFP): the registered method run as the prune job runs it,
  with its default options, the common counts as its target and the same 1 epoch as its whole
  training budget (search and fine-tuning together);
* "+ distillation" rows: the one-shot row fine-tuned with knowledge distillation from the
  unpruned pretrained network (Hinton et al. 2015; temperature 4, weight 0.5, prunekit's
  defaults) instead of the task loss alone;
* the unpruned network given the same epoch.

Rows resume: a row whose values are stored is not run again; results are written after every
row (benchmarks/results/equal_macs_methods.{json,md,png}).
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

import prunekit
from prunekit import data, measure, models
from prunekit.criteria import get_criterion, list_criteria
from prunekit.files import atomic_write, atomic_write_json, atomic_write_text
from prunekit.methods import soft_prune
from prunekit.pipeline import calibration_batches
from prunekit.plan import PlanTarget, resolve_counts
from prunekit.train import TrainConfig
from prunekit.train.distill import DISTILL_DEFAULTS, Distillation

# the same evaluation, BN re-estimation and fine-tuning budget as the criteria table
from equal_macs import FINETUNE, _evaluate, _recalibrated, finetune_one_epoch

X = torch.randn(1, 3, 32, 32)

#: Row name -> how it is made. ``oneshot``: criterion (+ options) on the common counts or its
#: own target; ``soft``: soft_prune options on the common counts; ``unpruned``.
ROWS = {
    "unpruned": {"kind": "unpruned"},
    "l1": {"kind": "oneshot", "criterion": "l1"},
    "fpgm": {"kind": "oneshot", "criterion": "fpgm"},
    "chip": {"kind": "oneshot", "criterion": "chip"},
    # fine-tuned with knowledge distillation from the unpruned pretrained network (T 4, w 0.5)
    "l1 + distillation": {"kind": "oneshot", "criterion": "l1", "distill": True},
    "chip + distillation": {"kind": "oneshot", "criterion": "chip", "distill": True},
    "hrank": {"kind": "oneshot", "criterion": "hrank"},
    "random": {"kind": "oneshot", "criterion": "random"},
    "epruner": {"kind": "oneshot", "criterion": "epruner", "options": {"beta": 0.52}},
    "epruner own counts (beta 0.52)": {"kind": "oneshot", "criterion": "epruner",
                                       "options": {"beta": 0.52}, "own": "counts_from"},
    "epruner own counts (beta 0.76, paper)": {"kind": "oneshot", "criterion": "epruner",
                                              "options": {"beta": 0.76}, "own": "counts_from",
                                              "finetune": False},
    "filtersketch": {"kind": "oneshot", "criterion": "filtersketch"},
    # what the reference's BN reset (and unit-Frobenius consumer scaling) cost at this budget
    "filtersketch (bn_reset off)": {"kind": "oneshot", "criterion": "filtersketch",
                                    "options": {"bn_reset": False}},
    "central_filter": {"kind": "oneshot", "criterion": "central_filter"},
    "pfp": {"kind": "oneshot", "criterion": "pfp"},
    "pfp own counts (one error level)": {"kind": "oneshot", "criterion": "pfp",
                                         "own": "criterion-allocation"},
    "lfe": {"kind": "oneshot", "criterion": "lfe"},
    "sfp": {"kind": "soft", "options": {"criterion": "l2"}},
    "asfp": {"kind": "soft", "options": {"criterion": "l2", "schedule": "asymptotic"}},
    "ghfp": {"kind": "soft", "options": {"criterion": "l2", "schedule": "asymptotic",
                                         "decay": "exponential", "hard_fraction": "cubic"}},
    "sfp decay (exponential)": {"kind": "soft", "options": {"criterion": "l2",
                                                           "decay": "exponential"}},
    "fsdp": {"kind": "method", "method": "fsdp"},  # FSDP's defaults: cs_ratio 0.1, tau 10
    "kdfs": {"kind": "method", "method": "kdfs"},
    "ccep": {"kind": "method", "method": "ccep"},
    "hbfp": {"kind": "method", "method": "hbfp", "options": {"record_every": 16}},
}


def common_counts(base, reduction: float) -> dict[str, int]:
    """Kept channels per group: streams kept, one inner ratio reaching ``reduction``. The
    uniform allocation's counts do not depend on the scores (only the ratio is searched)."""
    graph = prunekit.build_graph(base, X)
    scores = get_criterion("l1").score(graph, base)
    return resolve_counts(graph, base, PlanTarget(macs_reduction=reduction, stream_scale=0.0),
                          scores, (X,), macs_before=measure.count_macs(base, X))


def _available(spec) -> str | None:
    """Why a row cannot run here (its criterion or method is not built), else None."""
    if spec["kind"] == "oneshot" and spec["criterion"] not in list_criteria():
        return f"criterion '{spec['criterion']}' not registered"
    if spec["kind"] == "method":
        from prunekit.methods import list_methods
        if spec["method"] not in list_methods():
            return f"method '{spec['method']}' not registered"
    return None


def _teacher(base, spec):
    """Knowledge distillation from (a copy of) the unpruned network for rows that ask for it."""
    return Distillation(copy.deepcopy(base), **DISTILL_DEFAULTS) if spec.get("distill") else None


def _oneshot(base, spec, counts, reduction, calib, held_out):
    crit = get_criterion(spec["criterion"], **spec.get("options", {}))
    own = spec.get("own")
    if own == "counts_from":
        target = PlanTarget(counts_from="criterion")
    elif own == "criterion-allocation":
        target = PlanTarget(macs_reduction=reduction, allocation="criterion")
    else:
        target = PlanTarget(counts=counts)
    model = copy.deepcopy(base)
    result = prunekit.prune(model, X, criterion=crit, target=target,
                            calibration=calib if crit.needs_data else None,
                            heldout_data=held_out if getattr(crit, "needs_heldout", False)
                            else None)
    info = {"criterion": repr(crit), "counts": "its own" if own else "common"}
    if result.rewrites:
        info["rewrites_applied"] = sum(r["applied"] for r in result.rewrites)
        info["rewrites"] = len(result.rewrites)
    return model, info


def _soft(base, spec, counts, root, work: Path):
    model = copy.deepcopy(base)
    model, result, _ = soft_prune(model, data.CIFAR10(root, split="train", train_augment=True),
                                  data.CIFAR10(root, split="val"), TrainConfig(**FINETUNE),
                                  work, example_inputs=X, keep=counts, **spec["options"])
    return model.eval(), {"options": spec["options"], "counts": "common"}


def _method(base, spec, counts, root, work: Path, distill=None):
    """A registered training or search method (FSDP, KDFS, CCEP, HBFP, ...) run as the prune
    job runs it: its default options (plus the row's), the common counts as its target, the
    same 1-epoch budget as its ``finetune``, CIFAR-10 as its data (calibration 5 x 128
    augmented train images, seed 0, as the one-shot rows)."""
    from prunekit.methods import MethodContext, get_method
    from prunekit.pipeline.run_data import CifarRunData

    method = get_method(spec["method"])(spec.get("options", {}))
    model = copy.deepcopy(base)
    context = MethodContext(example_inputs=(X,), target=PlanTarget(counts=counts),
                            finetune=TrainConfig(**FINETUNE), out_dir=work,
                            data=CifarRunData(root, calibration={"batches": 5,
                                                                 "batch_size": 128}),
                            criterion=spec.get("criterion"), distill=distill)
    result = method.run(model, context)
    if not result.trained:  # a search (CCEP): the job would fine-tune its result; so do we
        finetune_one_epoch(model, root, work / "finetune", distill)
    return model.eval(), {"options": method.config.to_dict(), "counts": "common",
                          "trained_by_method": result.trained}


def run_methods(root: Path, out: Path, reduction: float, splits, bn_batches: int,
                only: str, work: Path) -> dict:
    path = out.with_suffix(".json")
    results = json.loads(path.read_text()) if path.exists() else {}
    rows = results.setdefault("rows", {})
    base = models.create("cifar_resnet56", weights="pretrained").eval()
    macs_before = measure.count_macs(base, X)
    counts = common_counts(base, reduction)
    calib = calibration_batches(root, {"batches": 5, "batch_size": 128}, seed=0)
    held_out = calibration_batches(data.CIFAR10(root, split="val"),
                                   {"batches": 4, "batch_size": 128}, seed=0)
    results["setup"] = {"model": "cifar_resnet56 (pretrained, option A)",
                        "macs_before": macs_before, "target_reduction": reduction,
                        "splits": list(splits), "counts": counts, "finetune": FINETUNE,
                        "bn_recalibration": f"{bn_batches} x 64 augmented train images",
                        "calibration": "5 x 128 augmented train images, seed 0",
                        "heldout": "4 x 128 val images, seed 0", "torch": torch.__version__}
    for name, spec in ROWS.items():
        if only and not any(part == name or (part.endswith("*") and name.startswith(part[:-1]))
                            for part in only.split(",")):
            continue
        row = rows.get(name, {})
        done = all(s in row.get("top1_ft", {}) for s in splits) or (
            spec.get("finetune") is False and all(s in row.get("top1", {}) for s in splits))
        if done:
            continue
        missing = _available(spec)
        if missing:
            print(f"{name:40s} skipped: {missing}", flush=True)
            continue
        started = time.perf_counter()
        workdir = work / name.replace(" ", "_").replace("(", "").replace(")", "")
        if spec["kind"] == "unpruned":
            model, info = copy.deepcopy(base), {}
            row.update(top1=_evaluate(model, splits, root))
            row["top1_ft"] = _evaluate(finetune_one_epoch(model, root, workdir), splits, root)
        elif spec["kind"] == "oneshot":
            model, info = _oneshot(base, spec, counts, reduction, calib, held_out)
            row.update(top1=_evaluate(model, splits, root))
            model = _recalibrated(model, root, bn_batches)
            row["top1_bn"] = _evaluate(model, splits, root)
            if spec.get("finetune", True):
                row["top1_ft"] = _evaluate(finetune_one_epoch(model, root, workdir,
                                                              _teacher(base, spec)), splits, root)
        else:
            if spec["kind"] == "soft":
                model, info = _soft(base, spec, counts, root, workdir)
            else:
                model, info = _method(base, spec, counts, root, workdir, _teacher(base, spec))
            row["top1_ft"] = _evaluate(model, splits, root)
        if spec.get("distill"):
            info["distill"] = dict(DISTILL_DEFAULTS, teacher="the unpruned pretrained network")
        macs = measure.count_macs(model, X)
        row.update(kind=spec["kind"], **info, macs=macs, params=measure.count_params(model),
                   macs_reduction=1 - macs / macs_before,
                   seconds=round(time.perf_counter() - started, 1))
        rows[name] = row
        print(f"{name:40s} {macs / 1e6:7.2f}M {row.get('top1')} bn {row.get('top1_bn')} "
              f"ft {row.get('top1_ft')}", flush=True)
        atomic_write_json(path, results, indent=1)
        write_table(results, out.with_suffix(".md"))  # the table as it goes, too
    write_table(results, out.with_suffix(".md"))
    plot(results, out.with_suffix(".png"))
    return results


def _cell(row, key, split):
    value = (row.get(key) or {}).get(split)
    return "-" if value is None else f"{value:.1f}"


def write_table(results, md: Path) -> None:
    setup, rows = results["setup"], results["rows"]
    splits = setup["splits"]
    ft = setup["finetune"]
    lines = [
        "# Every method at equal MACs and equal fine-tuning (ResNet-56, CIFAR-10)", "",
        f"Pretrained ResNet-56 ({setup['macs_before'] / 1e6:.2f}M MACs), common counts: every "
        f"block's inner channels at one ratio, residual streams kept, {setup['target_reduction']:.0%} "
        "fewer MACs (rows marked *own* use the criterion's own counts). One-shot rows: top-1 "
        f"right after pruning, with BN re-estimated ({setup['bn_recalibration']}), then after "
        f"{ft['epochs']} epoch of SGD (lr {ft['lr']} {ft['schedule']}, momentum {ft['momentum']}, "
        f"wd {ft['weight_decay']}, batch {ft['batch_size']}, seed {ft['seed']}) on the augmented "
        "train split. Soft rows prune while training that same epoch: only their final removed "
        f"model exists. Calibration: {setup['calibration']}; held-out gates: {setup['heldout']}. "
        f"Top-1 (%) on {', '.join(splits)} (`test`: the JPEG-decoded 10,000; `test-lossless`: "
        "the first 1,000 original images).", "",
        "| method | kind | counts | MACs | MACs reduction | params | " +
        " | ".join(f"right after {s}" for s in splits) + " | " +
        " | ".join(f"+BN {s}" for s in splits) + " | " +
        " | ".join(f"1 epoch {s}" for s in splits) + " |",
        "|---|---|---|---:|---:|---:|" + "---:|" * (3 * len(splits))]
    key = lambda kv: -((kv[1].get("top1_ft") or {}).get(splits[-1], -1))  # noqa: E731
    for name, r in sorted(rows.items(), key=key):
        lines.append(
            f"| {name} | {r['kind']} | {r.get('counts', '-')} | {r['macs'] / 1e6:.2f}M | "
            f"{100 * r['macs_reduction']:.1f}% | {r['params'] / 1e6:.3f}M | " +
            " | ".join(_cell(r, "top1", s) for s in splits) + " | " +
            " | ".join(_cell(r, "top1_bn", s) for s in splits) + " | " +
            " | ".join(_cell(r, "top1_ft", s) for s in splits) + " |")
    atomic_write_text(md, "\n".join(lines) + "\n")


def plot(results, png: Path) -> None:
    """Top-1 after the epoch (bars) and right after pruning + BN (dots), per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    split = results["setup"]["splits"][-1]
    rows = [(n, r) for n, r in results["rows"].items() if split in (r.get("top1_ft") or {})]
    if not rows:
        return
    rows.sort(key=lambda nr: -nr[1]["top1_ft"][split])
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(rows) + 1.2))
    ys = list(range(len(rows)))
    ax.barh(ys, [r["top1_ft"][split] for _, r in rows], alpha=0.5, label="after 1 epoch")
    bn = [(y, r["top1_bn"][split]) for y, (_, r) in zip(ys, rows) if r.get("top1_bn")]
    if bn:
        ax.scatter([v for _, v in bn], [y for y, _ in bn], s=14, color="tab:red",
                   label="right after pruning, +BN")
    ax.set_yticks(ys, [n for n, _ in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"top-1 % on {split} (ResNet-56, {results['setup']['target_reduction']:.0%} "
                  "fewer MACs)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    atomic_write(png, lambda stream: fig.savefig(stream, format="png", dpi=120))
    plt.close(fig)
