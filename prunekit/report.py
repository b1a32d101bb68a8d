"""``prunekit report``: compare runs — a Markdown table and a PNG of accuracy against MACs."""
from __future__ import annotations

import json
from pathlib import Path


def load_runs(run_dirs) -> list[dict]:
    runs = []
    for d in run_dirs:
        path = Path(d) / "report.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: is {d} a `prunekit prune` run directory?")
        report = json.loads(path.read_text())
        report["run"] = Path(d).name
        runs.append(report)
    return runs


def _final(report: dict) -> dict:
    return report.get("finetuned") or report["pruned"]


def _method(report: dict) -> str:
    criterion = (report.get("options") or {}).get("criterion") or {}
    return report.get("recipe") or criterion.get("name", "?")


def write_report(run_dirs, out_stem: str, split: str | None = None) -> tuple[Path, Path]:
    runs = load_runs(run_dirs)
    split = split or next(iter(runs[0]["before"]["accuracy"]))
    lines = [f"Accuracy: top-1 on `{split}` "
             f"({runs[0]['before']['accuracy'][split]['description']}). MACs: conv + linear.",
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
    md.write_text("\n".join(lines) + "\n")
    png = Path(f"{out_stem}.png")
    _plot(runs, split, png)
    return md, png


def _plot(runs, split, path: Path) -> None:
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
    fig.savefig(path)
    plt.close(fig)
