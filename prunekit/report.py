"""``prunekit report``: compare runs — a Markdown table and a PNG of accuracy against MACs."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import ConfigError
from .files import atomic_write, atomic_write_text


def load_runs(run_dirs) -> list[dict]:
    runs = []
    for d in run_dirs:
        path = Path(d) / "report.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: is {d} a `prunekit prune` run directory?")
        try:
            report = json.loads(path.read_text())
            report["before"]["accuracy"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path} is not a complete prunekit report ({exc!r}); rerun "
                              f"the prune command for {d}") from None
        report["run"] = Path(d).name
        runs.append(report)
    return runs


def _final(report: dict) -> dict:
    return report.get("finetuned") or report["pruned"]


def _method(report: dict) -> str:
    criterion = (report.get("options") or {}).get("criterion") or {}
    return report.get("recipe") or criterion.get("name", "?")


def _check_same_images(runs: list[dict], split: str) -> str:
    """The one description of the images every run evaluated on ``split``; runs measured on
    other images (a ``--limit`` subset, another data copy) cannot share one accuracy column."""
    seen: dict[str, list[str]] = {}
    for r in runs:
        for stage in ("before", "pruned", "finetuned"):
            accuracy = (r.get(stage) or {}).get("accuracy")
            if accuracy is None:
                continue
            if split not in accuracy:
                raise ConfigError(f"run {r['run']} has no accuracy on split {split!r} (it has "
                                  f"{', '.join(accuracy)}); choose one with --split")
            seen.setdefault(accuracy[split].get("description", "?"), []).append(r["run"])
    if len(seen) > 1:
        listed = "; ".join(f"{', '.join(dict.fromkeys(names))}: {description}"
                           for description, names in seen.items())
        raise ConfigError(f"the runs were evaluated on different {split!r} images ({listed}), so "
                          "their accuracies are not comparable; report them separately or "
                          "rerun them with the same --limit and data")
    return next(iter(seen))


def write_report(run_dirs, out_stem: str, split: str | None = None) -> tuple[Path, Path]:
    """Write ``OUT.md`` (a table) and ``OUT.png`` (accuracy vs MACs) comparing the runs,
    atomically; refuses runs whose accuracies were measured on different images."""
    runs = load_runs(run_dirs)
    split = split or next(iter(runs[0]["before"]["accuracy"]))
    description = _check_same_images(runs, split)
    lines = [f"Accuracy: top-1 on `{split}` ({description}). MACs: conv + linear.",
             "",
             "| run | method | top-1 before | after pruning | after fine-tuning | MACs | MACs -% "
             "| params | latency bs=1 speed-up | MACs speed-up |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        before, pruned, final = r["before"], r["pruned"], _final(r)
        tuned = r.get("finetuned")
        lat = (r.get("speedup") or {}).get("latency_x") or {}
        lat1 = lat.get("1") or lat.get(1)
        lines.append(
            f"| {r['run']} | {_method(r)} | {before['accuracy'][split]['top1']:.2f} | "
            f"{pruned['accuracy'][split]['top1']:.2f} | "
            f"{tuned['accuracy'][split]['top1']:.2f} | " if tuned else
            f"| {r['run']} | {_method(r)} | {before['accuracy'][split]['top1']:.2f} | "
            f"{pruned['accuracy'][split]['top1']:.2f} | – | ")
        lines[-1] += (f"{final['macs'] / 1e6:.2f}M | {100 * (1 - final['macs'] / before['macs']):.1f} | "
                      f"{final['params'] / 1e6:.3f}M | {f'{lat1:.2f}x' if lat1 else '–'} | "
                      f"{before['macs'] / final['macs']:.2f}x |")
    md = Path(f"{out_stem}.md")
    md.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(md, "\n".join(lines) + "\n")
    png = Path(f"{out_stem}.png")
    atomic_write(png, lambda stream: _plot(runs, split, stream))
    return md, png


def _plot(runs, split, stream) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    base = runs[0]["before"]
    ax.scatter([base["macs"] / 1e6], [base["accuracy"][split]["top1"]], marker="*", s=160,
               color="black", label="unpruned", zorder=3)
    for r in runs:
        final = _final(r)
        x = final["macs"] / 1e6
        ax.scatter([x], [r["pruned"]["accuracy"][split]["top1"]], marker="x", color="grey")
        ax.scatter([x], [final["accuracy"][split]["top1"]], s=40, zorder=3)
        ax.annotate(f"{r['run']}", (x, final["accuracy"][split]["top1"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("MACs (millions; conv + linear)")
    ax.set_ylabel(f"top-1 % [{split}]")
    ax.set_title("accuracy vs MACs (x: right after pruning, dot: after fine-tuning)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(stream, format="png")
    plt.close(fig)
