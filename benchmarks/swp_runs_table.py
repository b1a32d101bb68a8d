"""Collect `prunekit prune --method swp` runs into one results table.

    python benchmarks/swp_runs_table.py runs/swp56_a runs/swp56_b ... [--out benchmarks/results/swp_pretrained]
    python benchmarks/swp_runs_table.py runs/swp56_c --append   # keep the rows already in OUT.json

Reads each run's report.json (written by the CLI) and writes OUT.json (the runs' settings,
per-epoch log, live-stripe history, accuracy, MACs, params, the CLI's latency) and OUT.md (a table, and
the |I| quantiles of the last run). Accuracy splits: `test` = 10,000 JPEG-decoded test images,
`test-lossless` = the first 1,000 original test images.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SETTINGS = ("sr", "threshold", "skeleton_lr_scale", "skeleton_weight_decay", "penalty_epochs",
            "bn_recalibration_batches")


def summarise(run: Path) -> dict:
    report = json.loads((run / "report.json").read_text())
    method = report["options"]["method"]
    finetune = report["options"].get("finetune", {})

    def side(key):
        m = report[key]
        return {"accuracy": {k: v["top1"] for k, v in m["accuracy"].items()}, "macs": m["macs"],
                "params": m["params"], "latency_ms": m.get("latency_ms")}

    return {"run": str(run), "settings": {k: method.get(k) for k in SETTINGS},
            "epochs": finetune.get("epochs"), "lr": finetune.get("lr"),
            "schedule": finetune.get("schedule"),
            "stripes_alive": report["stripes_alive"],
            "stripes_alive_history": report.get("stripes_alive_history"),
            "bn_recalibration": report.get("bn_recalibration"),
            "train_log": report["finetune"]["history"], "before": side("before"),
            "after": side("pruned"), "swp": {k: report["swp"][k] for k in
                                              ("stripes_before", "stripes_after",
                                               "removed_channels", "replaced_blocks")}}


def markdown(rows: list[dict]) -> str:
    lines = ["| sr | threshold | skeleton lr x | penalty epochs | epochs | BN recal. | stripes "
             "alive | test | test-lossless | MACs | params | note |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        s, a = r["settings"], r["after"]
        lines.append(
            f"| {s['sr']} | {s['threshold']} | {s['skeleton_lr_scale'] or 1} | "
            f"{s['penalty_epochs'] or 'all'} | {r['epochs']} | "
            f"{s['bn_recalibration_batches'] or 0} | {100 * r['stripes_alive']:.1f}% | "
            f"{a['accuracy']['test']:.2f} | {a['accuracy']['test-lossless']:.1f} | "
            f"{a['macs'] / 1e6:.2f}M | {a['params'] / 1e6:.3f}M | {r.get('note', '')} |")
    b = rows[0]["before"]
    lines += ["", f"Before (pretrained ResNet-56): test {b['accuracy']['test']:.2f}, test-lossless "
              f"{b['accuracy']['test-lossless']:.1f}, {b['macs'] / 1e6:.2f}M MACs, "
              f"{b['params'] / 1e6:.3f}M params. The CLI's latencies (in the JSON) were measured "
              "while other jobs shared the CPU; use benchmarks/stripe_speed.py --swp-model for "
              "speed."]
    last = rows[-1]
    if last["stripes_alive_history"]:
        lines += ["", f"Live stripes and |I| quantiles every 100 steps ({last['run']}):", "",
                  "| step | alive | q10 | q50 | q90 |", "|---:|---:|---:|---:|---:|"]
        for h in last["stripes_alive_history"]:
            if isinstance(h, dict) and h["step"] % 100 == 0:
                lines.append(f"| {h['step']} | {h['alive']:.3f} | {h['q10']:.3f} | "
                             f"{h['q50']:.3f} | {h['q90']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", default=str(RESULTS / "swp_pretrained"))
    p.add_argument("--note", action="append", default=[], metavar="RUN=TEXT",
                   help="a remark shown in the run's row (repeatable)")
    p.add_argument("--append", action="store_true",
                   help="keep OUT.json's rows (run directories need not exist any more); a run "
                        "given again replaces its row")
    args = p.parse_args()
    notes = dict(n.split("=", 1) for n in args.note)
    new = [{**summarise(Path(r)), "note": notes.get(r, "")} for r in args.runs]
    rows = []
    if args.append and Path(f"{args.out}.json").exists():
        given = {r["run"] for r in new}
        rows = [r for r in json.loads(Path(f"{args.out}.json").read_text())["runs"]
                if r["run"] not in given]
    rows += new
    Path(f"{args.out}.json").write_text(json.dumps({"runs": rows}, indent=1))
    Path(f"{args.out}.md").write_text("# SWP from the pretrained CIFAR-10 ResNet-56\n\n"
                                      + markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
