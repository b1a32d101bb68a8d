"""The timm survey's verdict per model and its Markdown report (benchmarks/timm_survey.py)."""
from __future__ import annotations

MIN_REDUCTION = 0.2  # what test_timm_pruning asserts for MACs and parameters


def verdict(rec: dict) -> tuple[str, str]:
    """("ok" | "expected" | "failing", why): what test_timm_pruning would say about the model,
    with a channel-coupling mismatch counted as expected (its SHAPES_ONLY)."""
    if rec.get("status") != "ok":
        return "failing", f"{rec.get('status')}: {rec.get('error_class')}"
    problems = []
    if rec.get("compare_error"):
        problems.append("compare error")
    elif not rec.get("shape_ok"):
        problems.append("output shape changed")
    elif not rec.get("changed_vs_original"):
        problems.append("output unchanged by pruning")
    if not rec.get("backward_ok"):
        problems.append("backward failed")
    if min(rec.get("macs_red", 0), rec.get("params_red", 0)) < MIN_REDUCTION:
        problems.append(f"reduction < {MIN_REDUCTION:.0%}")
    reason = expected_mismatch(rec)
    if not rec.get("compare_error") and not rec.get("equal_masked") and reason is None:
        problems.append("not equal to the masked reference")
    if problems:
        return "failing", ", ".join(problems)
    return ("expected", reason) if not rec.get("equal_masked") else ("ok", "")


def expected_mismatch(rec: dict) -> str | None:
    """Why the model cannot equal its zeroed reference, or None."""
    reasons = sorted(set(rec.get("channel_norms", {}).values()))
    if rec.get("std_conv"):
        reasons.append("weight standardisation over input channels (" + ", ".join(rec["std_conv"]) + ")")
    return "; ".join(reasons) or None


def summary_counts(records) -> dict[str, int]:
    kinds = [verdict(r)[0] for r in records]
    return {"surveyed": len(kinds), "ok": kinds.count("ok"),
            "ok (shapes only, expected)": kinds.count("expected"), "failing": kinds.count("failing")}


def _pct(rec: dict, key: str) -> str:
    return f"-{rec[key]:.1%}" if key in rec else "-"


def _equal_cell(rec: dict) -> str:
    if "equal_masked" not in rec:
        return "error" if rec.get("compare_error") else "-"
    if rec["equal_masked"]:
        return "yes"
    reason = expected_mismatch(rec)
    return f"expected-no ({reason}; rel {rec['rel_diff']:.1e})" if reason else f"**no** (rel {rec['rel_diff']:.1e})"


def _failure_key(rec: dict, why: str) -> str:
    if rec.get("status") != "ok":
        where = f" at {rec['error_where']}" if rec.get("error_where") else ""
        return f"{rec.get('status')}: {rec.get('error_class')}{where}"
    if rec.get("compare_error"):
        return f"compare error: {rec['compare_error'][:160]}"
    return why


def render(survey: dict, order_names=(), setup: str = "") -> str:
    env, records = survey.get("environment", {}), survey["models"]
    order = {n: i for i, n in enumerate(order_names)}
    recs = sorted(records.values(), key=lambda r: (order.get(r["model"], len(order)), r["model"]))
    counts = summary_counts(recs)
    lines = ["# prunekit on timm CNNs outside the test list", "",
             f"timm {env.get('timm', '?')}, torch {env.get('torch', '?')}, prunekit {env.get('prunekit', '?')}, "
             f"Python {env.get('python', '?')}, {env.get('cpu', '?')}; last update {survey.get('updated', '?')}.", "",
             f"Setup: {env.get('setup', setup)}. Written by `benchmarks/timm_survey.py` (raw records in "
             "`timm_survey.json`). 'expected-no': the model normalises over channels or standardises "
             "its conv weights, so zeroing a channel is not removing it (as SHAPES_ONLY in "
             "tests/test_timm_pruning.py).", "",
             "**Summary:** " + ", ".join(f"{v} {k}" for k, v in counts.items()) + ".", "",
             "| model | input | status | MACs | params | equal masked | backward ok | prune s |",
             "|---|---|---|---|---|---|---|---|"]
    groups: dict[str, list[dict]] = {}
    for rec in recs:
        kind, why = verdict(rec)
        status = rec.get("status", "?") if kind != "failing" or rec.get("status") != "ok" else f"ok, **{why}**"
        lines.append(f"| {rec['model']} | {rec.get('size', '-')} | {status} | {_pct(rec, 'macs_red')} | "
                     f"{_pct(rec, 'params_red')} | {_equal_cell(rec)} | {rec.get('backward_ok', '-')} | "
                     f"{rec.get('prune_s', '-')} |")
        if kind == "failing":
            groups.setdefault(_failure_key(rec, why), []).append(rec)
    lines += ["", "## Failures grouped by error", ""] + ([] if groups else ["None."])
    for key, members in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        lines.append(f"- **{key}** ({len(members)}): {', '.join(r['model'] for r in members)}")
        for rec in members:
            details = [rec[k] for k in ("error", "backward_error") if rec.get(k)]
            if rec.get("model_modified_on_error"):
                details.append(f"model left modified: {rec['model_modified_on_error']} tensors "
                               f"changed shape, e.g. {rec['modified_examples']}")
            if rec.get("backward_bad"):
                details.append(f"bad gradients: {rec['backward_bad']}")
            if rec.get("status") == "ok":
                details.append(f"MACs {_pct(rec, 'macs_red')}, params {_pct(rec, 'params_red')}, "
                               f"{rec.get('groups_pruned')}/{rec.get('groups_total')} groups pruned, "
                               f"rel diff {rec.get('rel_diff', float('nan')):.1e}")
            if rec.get("unreached"):
                details.append(f"unreached modules: {rec['unreached'][:5]}")
            if details:
                lines.append(f"    - {rec['model']}: " + "; ".join(str(d).replace('|', '/') for d in details))
    return "\n".join(lines) + "\n"
