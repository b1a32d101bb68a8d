"""The closed latency loop's search for its next aim (plan.latency_plan.counts_for_latency).

The loop asks the allocation for a plan whose *predicted* reduction is the aim, measures it, and
moves the aim until the *measured* reduction is the target. The measured reduction is a noisy,
locally linear, sometimes stepped function of the aim (a group rounded up to a SIMD multiple or
not): interpolate, but never creep, and step over the steps.
"""
from __future__ import annotations

__all__ = ["BRACKET_GUARD", "STEP_AIM", "next_aim", "straddles_a_step"]

# Once plans are measured on both sides of the target, an interpolated aim in the outer
# BRACKET_GUARD of the bracket is replaced by its midpoint: regula falsi otherwise creeps
# (resnet18, 2026-12-04: aims 0.419, 0.380, 0.356, 0.350, 0.343 against one fixed end at 0.3).
BRACKET_GUARD = 0.2
# Plans for aims closer than this landing on both sides of the target: a rounding step, which
# the loop then measures with the allocation's unrounded counts.
STEP_AIM = 0.02


def straddles_a_step(history: list[dict], target: float) -> bool:
    """Plans measured below and above the target whose aims differ by less than STEP_AIM."""
    below = [h["aim"] for h in history if h["measured"] < target]
    above = [h["aim"] for h in history if h["measured"] > target]
    return bool(below and above) and min(above) - max(below) < STEP_AIM


def _bracketed(xs, ys, target) -> float | None:
    """Regula falsi between the nearest plans below and above the target (None: no such
    bracket, or one whose aims run the wrong way), the bracket's midpoint where that lands in
    its outer BRACKET_GUARD."""
    below = [(y, x) for x, y in zip(xs, ys) if y < target]
    above = [(y, x) for x, y in zip(xs, ys) if y > target]
    if not below or not above:
        return None
    (y0, x0), (y1, x1) = max(below), min(above)
    if x1 <= x0:
        return None
    aim = x0 + (target - y0) * (x1 - x0) / (y1 - y0)
    guard = BRACKET_GUARD * (x1 - x0)
    return aim if x0 + guard <= aim <= x1 - guard else (x0 + x1) / 2


def _line(xs, ys) -> tuple[float, float]:
    """measured = slope * aim + offset: least squares through every pair once two aims differ,
    else (or when noise swamps that fit) a line through the origin (both are 0 for the
    unpruned model)."""
    if len(xs) >= 2 and max(xs) - min(xs) > 1e-3:
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = (sum((x - mx) * (y - my) for x, y in zip(xs, ys))
                 / sum((x - mx) ** 2 for x in xs))
        if 0.2 <= slope <= 5:
            return slope, my - slope * mx
    sxx = sum(x * x for x in xs)
    return (sum(x * y for x, y in zip(xs, ys)) / sxx if sxx > 0 else 1.0), 0.0


def next_aim(history: list[dict], target: float, reachable: float, control: str = "aim",
             tried: list[float] | None = None) -> float | None:
    """The next aim from every (``control``, measured) pair so far (``history``: dicts with
    ``"aim"``, ``"predicted"`` and ``"measured"``): interpolated inside a bracket of plans
    measured on both sides of the target, else where a fitted line meets the target; clipped
    into [0.01, reachable]. None when it would repeat an aim. With auto rounding the loop
    steers by the aim, not the plan's predicted reduction: the prediction of plans for aims
    0.34-0.36 stayed at 0.31-0.32 (2026-12-04), so a fit against it was degenerate and the
    aims wandered while the measured reduction followed the aim. Without rounding a plan's
    prediction is its aim, and ``control="predicted"`` also uses rounded plans' pairs.
    ``tried``: the aims whose plans (as they would be planned now) were measured already
    (default: every aim in ``history``)."""
    xs = [h[control] for h in history]
    ys = [h["measured"] for h in history]
    slope, offset = _line(xs, ys)
    aim = _bracketed(xs, ys, target)
    if aim is None:
        if slope <= 0:
            return None
        aim = (target - offset) / slope
    aim = min(max(aim, 0.01), reachable)
    aims = [h["aim"] for h in history] if tried is None else tried
    if any(abs(aim - a) < 1e-4 for a in aims):
        # the plan for this aim was measured already (its channel steps overshoot): move the
        # last aim by the last error instead
        aim = min(max(history[-1]["aim"] + (target - ys[-1]) / max(slope, 0.2), 0.01),
                  reachable)
        if any(abs(aim - a) < 1e-4 for a in aims):
            return None
    return aim
