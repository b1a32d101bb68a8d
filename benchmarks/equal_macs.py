"""Accuracy at equal MACs after one-shot pruning: prunekit's criteria x allocations x BN
recalibration, side by side with Torch-Pruning (when installed), on the pretrained CIFAR-10
ResNet-56 (option-A shortcuts) cut to the same MACs reduction (default 47%); then one epoch of
the same fine-tuning for the best settings of each tool.

    python benchmarks/equal_macs.py                       # resumes; results as it goes
    python benchmarks/equal_macs.py --splits test-lossless --finetune-best 0
    python benchmarks/equal_macs.py --other-models        # resnet18/mobilenet_v2 MACs/params
    python benchmarks/equal_macs.py --methods             # every method, same counts + epoch

``--methods`` is the methods table (benchmarks/equal_macs_methods.py): every registered
pruning method at the same MACs and the same one-epoch budget, with the unpruned network.

Allocations: ``uniform`` (every group at one ratio), ``streams-half`` / ``streams-kept``
(residual streams at half / none of the inner ratio: PlanTarget.stream_scale), ``global`` (one
global ranking of per-group-normalised scores, its ratio bisected to the MACs target),
``sensitivity`` (each group pruned alone on 4 x 128 held-out val images, then the counts with
the least predicted loss: PlanTarget(allocation="sensitivity")).
BN recalibration: 8 batches of 64 augmented *training* images (never an evaluation split).
Torch-Pruning cannot prune this net's residual streams (its zero-padding shortcut), so its
streams are excluded by hand (stem and every block's conv2 ignored), its ratio bisected to the
same MACs. Accuracy is top-1 on ``test-lossless`` (the 1,000 original-pixel test images) and
``test`` (the JPEG-decoded 10,000). Writes benchmarks/results/equal_macs.{json,md,png}.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import prunekit  # noqa: E402
from prunekit import data, measure, models  # noqa: E402
from prunekit.criteria import Criterion, get_criterion  # noqa: E402
from prunekit.files import atomic_write, atomic_write_json, atomic_write_text  # noqa: E402
from prunekit.pipeline import calibration_batches  # noqa: E402
from prunekit.plan import PlanTarget  # noqa: E402
from prunekit.train import TrainConfig, fit  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
CRITERIA = ("l1", "group_l1", "fpgm", "chip", "hrank", "taylor", "epruner")
# EPruner decides its own counts; this beta reaches the 47% target on these weights
# (beta 0.76, the paper's, removes 91% here: recipes/epruner_resnet56.yaml).
EPRUNER_BETA = 0.52
ALLOCATIONS = {"uniform": 1.0, "streams-half": 0.5, "streams-kept": 0.0, "global": None,
               "sensitivity": "sensitivity"}
SENSITIVITY = {"batches": 4, "batch_size": 128}  # held-out val images, not augmented
X = torch.randn(1, 3, 32, 32)


class FixedScores(Criterion):
    """Scores computed once (a criterion on calibration data is costly) reused by every
    bisection step; group names are those of the same architecture."""

    name = "fixed"

    def __init__(self, scores):
        self.scores = scores

    def score(self, graph, model, calibration=None):
        return {g.name: self.scores[g.name] for g in graph.prunable_groups()}


def _evaluate(model, splits, root) -> dict:
    out = {}
    for split in splits:
        loader = data.build_loader(data.CIFAR10(root, split=split), batch_size=500,
                                   shuffle=False)
        out[split] = measure.evaluate(model, loader, progress=False)["top1"]
    return out


def _recalibrated(model, root, batches: int):
    model = copy.deepcopy(model)
    torch.manual_seed(0)
    loader = data.build_loader(data.CIFAR10(root, split="train", train_augment=True),
                               batch_size=64, shuffle=True)
    measure.recalibrate_bn(model, loader, batches, progress=False)
    return model


def _bisect(make, target_macs: float, lo=0.0, hi=0.95, steps=14, x=X):
    """The ratio whose pruned model (``make(ratio)``) has MACs closest above ``target``."""
    best = None
    for _ in range(steps):
        mid = (lo + hi) / 2
        model = make(mid)
        macs = measure.count_macs(model, x)
        if macs <= target_macs:
            hi = mid
            if best is None or macs > best[1]:
                best = (model, macs, mid)
        else:
            lo = mid
    return best


def prunekit_runs(base, calib, target_macs, macs_before, reduction, held_out, wanted):
    for crit_name in CRITERIA:
        if not any(wanted(f"prunekit {crit_name} {a}") for a in ALLOCATIONS):
            continue
        crit = get_criterion(crit_name, **({"beta": EPRUNER_BETA} if crit_name == "epruner"
                                           else {}))
        graph = prunekit.build_graph(base, X)
        started = time.perf_counter()
        scores = crit.score(graph, base, calib if crit.needs_data else None)
        score_seconds = time.perf_counter() - started
        fixed = FixedScores(scores)
        own = f"prunekit {crit_name} own-counts"
        if crit_name == "epruner" and wanted(own):
            model = copy.deepcopy(base)
            prunekit.prune(model, X, criterion=crit, target=PlanTarget(counts_from="criterion"))
            yield (own, {"tool": "prunekit", "criterion": f"epruner (beta {EPRUNER_BETA})",
                         "allocation": "its exemplars", "score_seconds": round(score_seconds, 2)},
                   model)
        for alloc, scale in ALLOCATIONS.items():
            name = f"prunekit {crit_name} {alloc}"
            if not wanted(name):
                continue
            if scale is None:
                def make(r):
                    m = copy.deepcopy(base)
                    prunekit.prune(m, X, criterion=fixed, target=PlanTarget(global_ratio=r))
                    return m
                found = _bisect(make, target_macs)
                if found is None:
                    continue
                model, ratio = found[0], {"global_ratio": round(found[2], 4)}
            elif scale == "sensitivity":
                model = copy.deepcopy(base)
                prunekit.prune(model, X, criterion=fixed, sensitivity_data=held_out,
                               target=PlanTarget(macs_reduction=reduction,
                                                 allocation="sensitivity"))
                ratio = {"sensitivity": f"{SENSITIVITY['batches']} x "
                                        f"{SENSITIVITY['batch_size']} val images"}
            else:
                model = copy.deepcopy(base)
                prunekit.prune(model, X, criterion=fixed,
                               target=PlanTarget(macs_reduction=reduction, stream_scale=scale))
                ratio = {"stream_scale": scale}
            yield (name,
                   {"tool": "prunekit", "criterion": crit_name, "allocation": alloc, **ratio,
                    "score_seconds": round(score_seconds, 2)}, model)


def torch_pruning_runs(base, calib, target_macs, wanted):
    try:
        import torch_pruning as tp
    except ImportError:
        return
    importances = {"l1": lambda: tp.importance.MagnitudeImportance(p=1),
                   "group_norm": lambda: tp.importance.GroupMagnitudeImportance(p=2),
                   "fpgm": lambda: tp.importance.FPGMImportance(),
                   "taylor": lambda: tp.importance.GroupTaylorImportance()}
    for name, importance in importances.items():
        if not wanted(f"torch-pruning {name} streams-excluded"):
            continue

        def make(r, importance=importance, name=name):
            m = copy.deepcopy(base)
            blocks = [b for b in m.modules() if isinstance(b, models.cifar_resnet.BasicBlock)]
            ignored = [m.linear, m.conv1] + [b.conv2 for b in blocks]
            pruner = tp.pruner.MetaPruner(m, X, importance=importance(), pruning_ratio=r,
                                          ignored_layers=ignored)
            if name == "taylor":
                m.zero_grad()
                for inputs, targets in calib:
                    torch.nn.functional.cross_entropy(m(inputs), targets).backward()
            pruner.step()
            m.zero_grad(set_to_none=True)
            return m.eval()
        found = _bisect(make, target_macs)
        if found is not None:
            yield (f"torch-pruning {name} streams-excluded",
                   {"tool": f"torch-pruning {tp.__version__}", "criterion": name,
                    "allocation": "streams excluded by hand", "pruning_ratio": round(found[2], 4)},
                   found[0])


FINETUNE_NOTE = ("BN recalibrated, then 1 epoch of SGD (lr 0.01 cosine, momentum 0.9, wd 5e-4, "
                 "batch 128, seed 0) on the augmented train split, the same for every tool")


#: The one fine-tuning budget of both tables (this one and --methods).
FINETUNE = dict(epochs=1, lr=0.01, momentum=0.9, weight_decay=5e-4, schedule="cosine",
                batch_size=128, seed=0)


def finetune_one_epoch(model, root, work: Path, distill=None):
    """The shared budget; ``distill``: an optional :class:`prunekit.train.Distillation`."""
    fit(model, data.CIFAR10(root, split="train", train_augment=True),
        data.CIFAR10(root, split="val"), TrainConfig(**FINETUNE), work, resume=True,
        distill=distill)
    return model.eval()


def _best_per_tool(rows, split, n):
    by_tool = {}
    for name, r in rows.items():
        by_tool.setdefault(r["tool"].split()[0], []).append((r["top1_bn"][split], name))
    return [name for entries in by_tool.values() for _, name in sorted(entries)[::-1][:n]]


def _rebuild(name, base, calib, target_macs, macs_before, reduction, held_out):
    """The pruned model of a stored row, built again the same way (deterministic)."""
    def only(n):
        return n == name
    for source in (prunekit_runs(base, calib, target_macs, macs_before, reduction, held_out,
                                 only), torch_pruning_runs(base, calib, target_macs, only)):
        for found, _, model in source or ():
            return model
    raise KeyError(name)


OTHER_MODELS = {"resnet18": "fc", "mobilenet_v2": "classifier.1"}
OTHER_INPUT = (1, 3, 224, 224)


def other_models(reduction: float) -> dict:
    """torchvision's resnet18 and mobilenet_v2 (random init: no weights on this machine, so
    MACs and params only) cut to the same MACs reduction by prunekit's uniform, streams-kept
    and global allocations (l1) and by Torch-Pruning's L1 (ratio bisected, classifier kept)."""
    import torchvision
    out = {}
    x = torch.randn(*OTHER_INPUT)
    for arch, head in OTHER_MODELS.items():
        torch.manual_seed(0)
        base = getattr(torchvision.models, arch)(weights=None).eval()
        before = measure.count_macs(base, x)
        row = {"macs_before": before, "params_before": measure.count_params(base)}
        for label, target in (("prunekit l1 uniform", PlanTarget(macs_reduction=reduction)),
                              ("prunekit l1 streams-kept",
                               PlanTarget(macs_reduction=reduction, stream_scale=0.0)),
                              ("prunekit l1 global",
                               PlanTarget(macs_reduction=reduction, allocation="global"))):
            m = copy.deepcopy(base)
            try:
                prunekit.prune(m, x, criterion="l1", target=target, ignore=[head])
            except prunekit.plan.PlanError as exc:  # e.g. the streams are most of the MACs
                row[label] = {"error": str(exc).split(" (prunekit.prune")[0]}
                continue
            row[label] = {"macs": measure.count_macs(m, x), "params": measure.count_params(m)}
        try:
            import torch_pruning as tp
        except ImportError:
            tp = None
        if tp is not None:
            def make(r):
                m = copy.deepcopy(base)
                pruner = tp.pruner.MetaPruner(m, x, importance=tp.importance.MagnitudeImportance(
                    p=1), pruning_ratio=r, ignored_layers=[m.get_submodule(head)])
                pruner.step()
                return m
            found = _bisect(make, before * (1 - reduction), x=x)
            if found is not None:
                row[f"torch-pruning {tp.__version__} l1"] = {
                    "macs": found[1], "params": measure.count_params(found[0]),
                    "pruning_ratio": round(found[2], 4)}
        out[arch] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", type=float, default=0.47)
    parser.add_argument("--splits", default="test-lossless,test")
    parser.add_argument("--bn-batches", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "equal_macs"))
    parser.add_argument("--only", default="", help="run only names containing this text "
                        "(--methods: comma-separated row names, 'epruner*' for a prefix)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--finetune-best", type=int, default=2,
                        help="fine-tune this many best settings of each tool for one epoch")
    parser.add_argument("--finetune", default="",
                        help="comma-separated row names to fine-tune too (e.g. the default)")
    parser.add_argument("--other-models", action="store_true",
                        help="only the MACs/params of torchvision resnet18 and mobilenet_v2")
    parser.add_argument("--methods", action="store_true",
                        help="the methods table (equal_macs_methods.py) instead")
    parser.add_argument("--work", default="/tmp/equal_macs_work",
                        help="fine-tuning checkpoints (resumable)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    splits = [s for s in args.splits.split(",") if s]
    out = Path(args.out)
    path = out.with_suffix(".json")
    results = json.loads(path.read_text()) if path.exists() else {}
    if args.methods:
        from equal_macs_methods import run_methods
        run_methods(SHARED, out.with_name("equal_macs_methods"), args.target, splits,
                    args.bn_batches, args.only, Path(args.work) / "methods")
        return
    if args.other_models:
        results["other_models"] = other_models(args.target)
        atomic_write_json(path, results, indent=1)
        if "setup" in results:  # the ResNet-56 table exists: render both
            _write_table(results, out.with_suffix(".md"), results["setup"]["splits"])
        return
    rows = results.setdefault("runs", {})
    base = models.create("cifar_resnet56", weights="pretrained").eval()
    macs_before = measure.count_macs(base, X)
    target_macs = macs_before * (1 - args.target)
    results["setup"] = {
        "model": "cifar_resnet56 (pretrained, option A)", "macs_before": macs_before,
        "target_reduction": args.target, "splits": splits,
        "bn_recalibration": f"{args.bn_batches} batches x 64 augmented train images",
        "calibration": "5 batches x 128 augmented train images, seed 0",
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "unpruned": rows.get("unpruned", {}).get("top1") or _evaluate(base, splits, SHARED)}
    results["setup"]["sensitivity"] = (f"{SENSITIVITY['batches']} x "
                                       f"{SENSITIVITY['batch_size']} val images, seed 0")
    results["setup"]["finetune"] = FINETUNE_NOTE
    calib = calibration_batches(SHARED, {"batches": 5, "batch_size": 128}, seed=0)
    held_out = calibration_batches(data.CIFAR10(SHARED, split="val"), SENSITIVITY, seed=0)

    def wanted(name):
        if args.only and args.only not in name:
            return False
        return not (name in rows and all(s in rows[name].get("top1", {}) for s in splits))

    sources = [prunekit_runs(base, calib, target_macs, macs_before, args.target, held_out,
                             wanted),
               torch_pruning_runs(base, calib, target_macs, wanted)]
    for source in sources:
        for name, info, model in source or ():
            macs = measure.count_macs(model, X)
            row = {**info, "macs": macs, "params": measure.count_params(model),
                   "macs_reduction": 1 - macs / macs_before,
                   "top1": _evaluate(model, splits, SHARED),
                   "top1_bn": _evaluate(_recalibrated(model, SHARED, args.bn_batches), splits,
                                        SHARED)}
            rows[name] = row
            print(f"{name:45s} {macs / 1e6:7.2f}M  {row['top1']}  bn: {row['top1_bn']}",
                  flush=True)
            atomic_write_json(path, results, indent=1)  # as it goes: a rerun resumes
    extra = [n for n in args.finetune.split(",") if n]
    for name in _best_per_tool(rows, splits[0], args.finetune_best) + extra:
        if all(s in (rows[name].get("top1_ft") or {}) for s in splits):
            continue
        model = _rebuild(name, base, calib, target_macs, macs_before, args.target, held_out)
        model = _recalibrated(model, SHARED, args.bn_batches)
        rows[name]["top1_ft"] = _evaluate(finetune_one_epoch(model, SHARED, Path(args.work) /
                                                             name.replace(" ", "_")),
                                          splits, SHARED)
        print(f"{name:45s} after 1 epoch: {rows[name]['top1_ft']}", flush=True)
        atomic_write_json(path, results, indent=1)
    _write_table(results, out.with_suffix(".md"), splits)
    _plot(results, out.with_suffix(".png"), splits[0])


def _plot(results, png: Path, split: str) -> None:
    """Top-1 right after pruning and with BN re-estimated, every setting, best first."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [(n, r) for n, r in results["runs"].items() if split in r["top1"]]
    rows.sort(key=lambda nr: -nr[1]["top1_bn"][split])
    fig, ax = plt.subplots(figsize=(8, 0.26 * len(rows) + 1.2))
    ys = range(len(rows))
    colors = ["tab:blue" if r["tool"] == "prunekit" else "tab:orange" for _, r in rows]
    ax.barh(ys, [r["top1_bn"][split] for _, r in rows], color=colors, alpha=0.45,
            label="+BN re-estimation")
    ax.scatter([r["top1"][split] for _, r in rows], ys, c=colors, marker="o", s=14,
               label="right after pruning")
    ax.set_yticks(list(ys), [n.replace(" streams-excluded", "") for n, _ in rows], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(results["setup"]["unpruned"][split], color="gray", ls="--", lw=1,
               label="unpruned")
    ax.set_xlabel(f"top-1 % on {split} (ResNet-56, 47% fewer MACs)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    atomic_write(png, lambda stream: fig.savefig(stream, format="png", dpi=120))
    plt.close(fig)


def _write_table(results, md: Path, splits) -> None:
    setup, rows = results["setup"], results["runs"]
    rows = {n: r for n, r in rows.items() if all(s in r["top1"] for s in splits)}
    lines = ["# Accuracy at equal MACs after one-shot pruning (ResNet-56, CIFAR-10)", "",
             f"Target {setup['target_reduction']:.0%} fewer MACs (conv + linear) of "
             f"{setup['macs_before'] / 1e6:.2f}M; unpruned top-1 "
             f"{', '.join(f'{v:.1f} ({k})' for k, v in setup['unpruned'].items())}; "
             f"BN recalibration: {setup['bn_recalibration']}; calibration for chip/hrank/"
             f"taylor: {setup['calibration']}; sensitivity allocation: "
             f"{setup.get('sensitivity', '-')}; *1 epoch*: {setup.get('finetune', '-')}, for "
             f"the best settings of each tool. Top-1 (%) on {', '.join(splits)}; `test` is the "
             "JPEG-decoded copy (~10 points below the original pixels), `test-lossless` the "
             "first 1,000 original test images.", "",
             "| tool | criterion | allocation | MACs | params | " +
             " | ".join(f"top-1 {s}" for s in splits) + " | " +
             " | ".join(f"+BN recal. {s}" for s in splits) + " | " +
             " | ".join(f"1 epoch {s}" for s in splits) + " |",
             "|---|---|---|---:|---:|" + "---:|" * (3 * len(splits))]
    order = sorted(rows.items(), key=lambda kv: -kv[1]["top1_bn"][splits[0]])
    for name, r in order:
        tuned = r.get("top1_ft") or {}
        lines.append(f"| {r['tool']} | {r['criterion']} | {r['allocation']} | "
                     f"{r['macs'] / 1e6:.2f}M | {r['params'] / 1e6:.3f}M | " +
                     " | ".join(f"{r['top1'][s]:.1f}" for s in splits) + " | " +
                     " | ".join(f"{r['top1_bn'][s]:.1f}" for s in splits) + " | " +
                     " | ".join(f"{tuned[s]:.1f}" if s in tuned else "-" for s in splits) +
                     " |")
    others = results.get("other_models") or {}
    if others:
        lines += ["", f"## torchvision models at {setup['target_reduction']:.0%} fewer MACs "
                  "(random init: MACs and params only, 1x3x224x224, classifier kept)", "",
                  "| model | tool, setting | GMACs | Mparams |", "|---|---|---:|---:|"]
        for arch, row in others.items():
            lines.append(f"| {arch} | unpruned | {row['macs_before'] / 1e9:.3f} | "
                         f"{row['params_before'] / 1e6:.2f} |")
            for label, r in row.items():
                if isinstance(r, dict) and "error" in r:
                    lines.append(f"| {arch} | {label} | {r['error']} | - |")
                elif isinstance(r, dict):
                    lines.append(f"| {arch} | {label} | {r['macs'] / 1e9:.3f} | "
                                 f"{r['params'] / 1e6:.2f} |")
    atomic_write_text(md, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
