"""How the native stripe kernel groups a conv's kept stripes into chunks (stripe_kernel.c): a
chunk is up to ``fc`` filters that all keep each of its taps, so a tile sums over taps x
channels before it adds into the outputs."""
from __future__ import annotations

__all__ = ["MIN_SHARED", "chunks"]

# Chunks of several taps: only for at least this many filters that keep every one of the taps
# (a chunk of fewer filters is a narrow tile, cheaper as part of a one-tap chunk).
MIN_SHARED = 3


def chunks(segments, out_index, fc: int) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Split the kept stripes into chunks (filters, taps): every filter of a chunk keeps every
    tap of it, at most ``fc`` filters, each stripe in exactly one chunk. A chunk's tiles sum
    over all its taps' channels before they add into the output, so a chunk of two or three
    taps amortises a tile's fixed cost (pointers, the final read-add-write of its outputs)
    over two or three times the multiply-adds; that matters for 16-channel layers, whose
    one-tap tiles are short. Greedy: the pair of taps sharing the most remaining filters
    (capped at ``fc``, at least MIN_SHARED), extended by further taps that all of those
    filters keep; what remains goes into one-tap chunks of near-equal size (9 -> 3 + 3 + 3,
    not 4 + 4 + 1: fewer filters, fewer accumulators to hide the FMA latency)."""
    remaining = {(i, j): set(out_index[lo:hi].tolist()) for (i, j, lo, hi) in segments}
    order = list(remaining)
    result = []
    while True:
        best = None
        for a, t1 in enumerate(order):
            for t2 in order[a + 1:]:
                common = remaining[t1] & remaining[t2]
                if len(common) >= MIN_SHARED and (best is None or min(len(common), fc) > best[0]):
                    best = (min(len(common), fc), t1, t2, common)
        if best is None:
            break
        _, t1, t2, common = best
        chosen = sorted(common)[:fc]
        chunk_taps = [t1, t2] + [t for t in order if t not in (t1, t2)
                                 and remaining[t].issuperset(chosen)]
        for t in chunk_taps:
            remaining[t].difference_update(chosen)
        result.append((chosen, sorted(chunk_taps)))
    for t in order:
        index = sorted(remaining[t])
        if not index:
            continue
        count = -(-len(index) // fc)
        bounds = [len(index) * k // count for k in range(count + 1)]
        result += [(index[lo:hi], [t]) for lo, hi in zip(bounds[:-1], bounds[1:])]
    return sorted(result, key=lambda chunk: chunk[1])  # tap-major: neighbours share inputs
