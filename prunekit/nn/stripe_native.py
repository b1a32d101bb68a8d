"""The native CPU executor of :class:`~prunekit.nn.StripeConv2d` (``stripe_kernel.c``): a
conv's kept stripes packed into the kernel's chunks, and its layout per input shape.

The kernel library (compiled on first use, and its wide AVX-512 build) comes from
:mod:`.stripe_build`; without it StripeConv2d runs its pure-torch formulation.
"""
from __future__ import annotations

import ctypes
import threading

import torch

from . import stripe_chunks
from .stripe_build import _Plan, forward_address, library, source_digest, unavailable_reason, \
    wide_library

__all__ = ["NativeStripePlan", "kernel_identity", "library", "source_digest",
           "unavailable_reason", "wide_library"]

# Packed inputs fit in this much (a share of one core's L2): groups of images are packed and
# convolved while still in cache instead of streaming the whole packed batch through memory.
GROUP_BYTES = 256 * 1024
_scratch_local = threading.local()
# A block's inputs and outputs fit in this much (a share of a 32 KB L1 data cache): they are
# read (and the outputs written) once per chunk of kept stripes.
BLOCK_BYTES = 24 * 1024
MIN_BLOCK = 6  # vectors: a narrower block leaves tiles too few accumulators
# Accumulate straight into the NCHW output where every vector is full (VL divides Wo) instead
# of into a block buffer copied out afterwards: on. Measured (ResNet-56's layers at 50% stripes
# removed, 1 thread, paired rounds) 1.00-1.15x faster at batch 64 and no slower at batch 1
# with the one-pass stride-2 packing and the fused epilogue (an earlier kernel was slower
# this way: filter rows of a 32x32 output are 4 KB apart and collide in L1's sets).
DIRECT_OUTPUT = True
# Run convs whose output width is a multiple of the wide build's vector on that build (when
# the CPU has one: AVX-512); off: every conv on the default width.
WIDE_VECTORS = True
# Below this many multiply-adds per thread a call runs on fewer threads: a batch-1 layer
# (~1M MACs, ~25 us) loses more to the team's fork/join and idle threads than it gains.
MACS_PER_THREAD = 1 << 22


def kernel_identity() -> str:
    """What a cached timing of kernel convs depends on: the C source, and whether the wide
    build runs the convs it can take (``WIDE_VECTORS``, ``PRUNEKIT_WIDE``, an AVX-512 CPU), so
    that timings made one way are never reused the other way."""
    wide = wide_library() if WIDE_VECTORS else None
    return source_digest() + ("" if wide is None else f"+vl{wide.prunekit_stripe_vl()}")


def _group_size(n: int, floats_per_image: int) -> int:
    """The largest divisor of the batch whose packed input fits GROUP_BYTES (at least 1)."""
    limit = max(1, GROUP_BYTES // (4 * floats_per_image))
    return max(g for g in range(1, min(n, limit) + 1) if n % g == 0)


def _scratch(floats: int) -> int:
    """Address of this thread's packing buffer (grown on demand, reused across calls and
    layers: a fresh multi-MB allocation per call costs page faults comparable to the conv)."""
    buffer = getattr(_scratch_local, "buffer", None)
    if buffer is None or buffer.numel() < floats:
        buffer = _scratch_local.buffer = torch.empty(floats, dtype=torch.float32)
    return buffer.data_ptr()


class NativeStripePlan:
    """Kept stripes of one conv packed for the kernel: tap-major chunks of filters."""

    def __init__(self, weight: torch.Tensor, out_index: torch.Tensor, segments, bias,
                 out_channels: int, stride, padding, dilation, kernel_size):
        lib = library()
        self.fc = lib.prunekit_stripe_chunk()
        self.vl = lib.prunekit_stripe_vl()
        self.acc = lib.prunekit_stripe_acc()
        self.max_block = lib.prunekit_stripe_max_block()
        self.f, self.c = int(out_channels), int(weight.shape[1])
        self.stride, self.padding, self.dilation = stride[0], padding[0], dilation[0]
        self.kernel_size = kernel_size
        w = weight.detach().float().cpu()
        row = {}  # (filter, tap) -> row of `weight`
        for (i, j, lo, hi) in segments:
            for k, f in enumerate(out_index[lo:hi].tolist()):
                row[(f, (i, j))] = lo + k
        taps, filters, chunks, live, tap0 = [], [], [], [], [0]
        for chunk_filters, chunk_taps in stripe_chunks.chunks(segments, out_index, self.fc):
            for t in chunk_taps:
                packed = torch.zeros(self.c, self.fc)
                packed[:, :len(chunk_filters)] = w[[row[(f, t)] for f in chunk_filters]].t()
                chunks.append(packed)
                taps.append(t)
            filters.append(chunk_filters + [self.f] * (self.fc - len(chunk_filters)))
            live.append(len(chunk_filters))
            tap0.append(len(taps))
        self.taps = taps  # every (chunk, tap) entry, in order
        self.stripes = int(out_index.numel())
        self.chunk_w = (torch.stack(chunks) if chunks else torch.zeros(0, self.c, self.fc)).contiguous()
        self.chunk_filt = torch.tensor(filters, dtype=torch.int32).reshape(-1, self.fc).contiguous()
        self.chunk_live = torch.tensor(live, dtype=torch.int32)
        self.chunk_tap0 = torch.tensor(tap0, dtype=torch.int32)
        # every filter in at most one chunk (a dense conv): the kernel's tiles store finished
        # outputs; filters in no chunk (every stripe removed) are written on their own
        covered = [f for k, n in enumerate(live) for f in filters[k][:n]]
        self.single = len(covered) == len(set(covered))
        self.orphans = torch.tensor(sorted(set(range(self.f)) - set(covered)), dtype=torch.int32)
        self.bias = None if bias is None else bias.detach().float().cpu().contiguous()
        self._shapes: dict = {}

    @staticmethod
    def supports(stride, padding, dilation, kernel_size) -> bool:
        """Square stride, dilation, kernel and symmetric padding (what the plan describes)."""
        return not isinstance(padding, str) and padding[0] == padding[1] \
            and stride[0] == stride[1] and dilation[0] == dilation[1] \
            and kernel_size[0] == kernel_size[1]

    def _library_for(self, wo: int) -> tuple[ctypes.CDLL, int]:
        """The build (and its vector width) that runs a conv with output rows of ``wo``: the
        wide one where its vectors tile the rows exactly (a partial vector would waste lanes
        and leave the direct output), else the default."""
        wide = wide_library() if WIDE_VECTORS else None
        if wide is not None and wo % wide.prunekit_stripe_vl() == 0:
            return wide, wide.prunekit_stripe_vl()
        return library(), self.vl

    def _block_vectors(self, nvec: int, wo: int, wq: int, phases: int,
                       row_shift: int, vl: int) -> int:
        """Output vectors per block: as many as keep a block's inputs (C channels x the
        planes' rows it reads) and its outputs (F x BV vectors) within BLOCK_BYTES (every
        chunk re-reads both, so they should stay in L1), at least MIN_BLOCK."""
        per_row = -(-wo // vl)

        def footprint(bv: int) -> int:
            rows = -(-bv // per_row) + 1 + row_shift
            return 4 * (self.c * phases * rows * wq + self.f * bv * vl)
        bv = MIN_BLOCK
        while bv < self.max_block and footprint(bv + 1) <= BLOCK_BYTES:
            bv += 1
        # the same number of blocks, of near-equal size: no short last block of narrow tiles
        blocks = -(-nvec // bv)
        return max(1, -(-nvec // blocks))

    def _layout(self, n: int, h: int, w: int) -> dict:
        """The padded-phase-plane packing of stripe_kernel.c for an input of n x C x h x w:
        one Hq x Wq plane per phase (a, b) a kept tap uses; tap (i, j) with i*d = s*u + a,
        j*d = s*v + b -> offset of its phase plus u rows and v columns."""
        key = (n, h, w)
        if key in self._shapes:
            return self._shapes[key]
        s, p, d, c = self.stride, self.padding, self.dilation, self.c
        ho, wo = self._out_hw(h, w)
        if ho < 1 or wo < 1:
            raise ValueError(f"input {h}x{w} is smaller than the kernel's extent")
        lib, vl = self._library_for(wo)
        hq, wq = -(-(h + 2 * p) // s), -(-(w + 2 * p) // s)
        plane = hq * wq
        rows = {t: divmod(t[0] * d, s) for t in self.taps}  # (u, a)
        cols = {t: divmod(t[1] * d, s) for t in self.taps}  # (v, b)
        phases = sorted({(rows[t][1], cols[t][1]) for t in self.taps})
        phase_index = {key: i for i, key in enumerate(phases)}
        img = len(phases) * c * plane
        g = _group_size(n, img)
        offsets = [phase_index[(rows[t][1], cols[t][1])] * c * plane
                   + rows[t][0] * wq + cols[t][0] for t in self.taps]
        per_row = -(-wo // vl)
        vecs = [(k * img + r * wq + q * vl, k * self.f * ho * wo + r * wo + q * vl,
                 min(vl, wo - q * vl))
                for k in range(g) for r in range(ho) for q in range(per_row)]
        packed_end = g * img
        # the furthest float any vector reads: last vector, furthest tap, last channel
        length = max(packed_end, vecs[-1][0] + max(offsets) + (c - 1) * plane + vl) + 16
        tensors = {  # kept alive with the plan: the struct holds raw pointers to them
            "offsets": torch.tensor(offsets, dtype=torch.int64),
            "phases": torch.tensor(phases, dtype=torch.int64).reshape(-1).contiguous(),
            "vecs": torch.tensor(vecs, dtype=torch.int64).reshape(-1).contiguous(),
        }
        plan = _Plan(N=n, C=c, H=h, W=w, s=s, p=p, Ho=ho, Wo=wo, G=g, Hq=hq, Wq=wq,
                     plane=plane, img=img, nphases=len(phases),
                     phases=tensors["phases"].data_ptr(), nvec=len(vecs),
                     vecs=tensors["vecs"].data_ptr(), direct=int(DIRECT_OUTPUT and wo % vl == 0),
                     BV=self._block_vectors(len(vecs), wo, wq, len(phases),
                                            max(u for u, _ in rows.values()), vl),
                     chunk_w=self.chunk_w.data_ptr(),
                     chunk_off=tensors["offsets"].data_ptr(),
                     chunk_filt=self.chunk_filt.data_ptr(),
                     chunk_live=self.chunk_live.data_ptr(),
                     chunk_tap0=self.chunk_tap0.data_ptr(), nchunks=len(self.chunk_live),
                     bias=None if self.bias is None else self.bias.data_ptr(), F=self.f,
                     packed_end=packed_end, length=length,
                     single=int(self.single), orphans=self.orphans.data_ptr(),
                     norphans=len(self.orphans))
        macs = n * ho * wo * c * self.stripes
        layout = {"shape": (n, self.f, ho, wo), "length": length, "groups": n // g,
                  "plan": plan, "plan_ref": ctypes.byref(plan), "tensors": tensors,
                  "vl": vl, "forward": lib.prunekit_stripe_forward_fused,
                  "forward_address": forward_address(lib),
                  "max_threads": max(1, macs // MACS_PER_THREAD)}
        self._shapes[key] = layout
        return layout

    @staticmethod
    def threads_and_scratch(lay: dict, threads: int) -> tuple[int, int]:
        """The threads a call on layout ``lay`` runs on (at most ``threads``) and the floats
        of packing buffer it needs (a copy per thread when each packs whole groups)."""
        threads = min(threads, lay["max_threads"])
        return threads, (threads if lay["groups"] >= threads else 1) * lay["length"]

    def _out_hw(self, h: int, w: int) -> tuple[int, int]:
        s, p, d, k = self.stride, self.padding, self.dilation, self.kernel_size[0]
        return (h + 2 * p - d * (k - 1) - 1) // s + 1, (w + 2 * p - d * (k - 1) - 1) // s + 1

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                 relu: bool = False) -> torch.Tensor:
        """``relu?(conv(x) + bias [+ residual])``. The residual add and the ReLU run in the
        kernel's epilogue when ``residual`` is a contiguous float32 CPU tensor of exactly the
        output's shape (else after the kernel, in torch, with broadcasting)."""
        if not x.is_contiguous():
            x = x.contiguous()
        n, c, h, w = x.shape
        if c != self.c:  # the kernel would read past the input
            raise RuntimeError(f"expected input with {self.c} channels, got {c} (input shape "
                               f"{tuple(x.shape)})")
        if not self.taps:  # every stripe removed: the output is the bias
            bias = self.bias if self.bias is not None else torch.zeros(self.f)
            out = bias.view(1, -1, 1, 1).expand(n, self.f, *self._out_hw(h, w)).contiguous()
            if residual is not None:
                out = out + residual
            return out.relu_() if relu else out
        lay = self._shapes.get((n, h, w)) or self._layout(n, h, w)
        shape = lay["shape"]
        if residual is not None and not _epilogue_operand(residual, shape):
            out = self(x)
            out = out + residual
            return out.relu_() if relu else out
        out = torch.empty(shape)
        threads, floats = self.threads_and_scratch(lay, torch.get_num_threads())
        if lay["forward"](lay["plan_ref"], x.data_ptr(), _scratch(floats),
                         out.data_ptr(), None if residual is None else residual.data_ptr(),
                         int(bool(relu)), threads) != 0:
            raise MemoryError("the native stripe kernel could not allocate its block buffer")
        return out


def _epilogue_operand(t: torch.Tensor, shape: tuple) -> bool:
    """The kernel reads a residual as a plain NCHW float32 array of the output's shape."""
    return (type(t) is torch.Tensor and t.dtype == torch.float32 and t.device.type == "cpu"
            and tuple(t.shape) == shape and t.is_contiguous())
