"""The native CPU executor of :class:`~prunekit.nn.StripeConv2d` (``stripe_kernel.c``).

The C file is compiled on first use with the system C compiler (``$CC``, else ``cc``/``gcc``;
``-O3 -march=native -ffp-contract=fast -fopenmp``, under a second) into ``$PRUNEKIT_CACHE``
(default ``~/.cache/prunekit``), keyed by the source, compiler, flags and the CPU's
instruction sets (a cache shared between machines never hands an AVX-512 build to a CPU
without it), and loaded with ctypes. Without a
compiler, or with ``PRUNEKIT_NATIVE=0``, :func:`library` returns None (the reason is in
:func:`unavailable_reason`) and StripeConv2d runs its pure-torch formulation, which computes the
same result.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

__all__ = ["NativeStripePlan", "library", "unavailable_reason"]

SOURCE = Path(__file__).with_name("stripe_kernel.c")
# -ffp-contract=fast: ISO C mode (-std=c11) otherwise forbids fusing a * b + c into one FMA,
# which halves the arithmetic throughput of the kernel
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-fPIC", "-shared", "-std=c11"]
_lock = threading.Lock()
_state: dict = {}


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_identity() -> str:
    """What -march=native depends on: the architecture and the CPU's feature flags."""
    import platform
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags.strip()}"


def _build() -> ctypes.CDLL:
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    text = SOURCE.read_bytes()
    key = hashlib.sha256(text + " ".join([compiler, *FLAGS, _cpu_identity()]).encode()
                         ).hexdigest()[:16]
    cache = Path(os.environ.get("PRUNEKIT_CACHE", Path.home() / ".cache" / "prunekit"))
    target = cache / f"stripe_kernel_{key}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so")
        os.close(fd)
        try:
            result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp],
                                    capture_output=True, text=True, timeout=120)
            if result.returncode != 0:
                raise RuntimeError(f"compiling {SOURCE.name} failed: {result.stderr.strip()[:500]}")
            os.replace(tmp, target)  # atomic: concurrent builders never load a partial file
        finally:
            Path(tmp).unlink(missing_ok=True)
    lib = ctypes.CDLL(str(target))
    p = ctypes.c_void_p
    lib.prunekit_stripe_forward.argtypes = [ctypes.POINTER(_Plan), p, p, p, ctypes.c_int]
    lib.prunekit_stripe_forward.restype = None
    lib.prunekit_stripe_block.restype = lib.prunekit_stripe_chunk.restype = ctypes.c_int
    lib.prunekit_stripe_plan_size.restype = ctypes.c_int64
    if lib.prunekit_stripe_plan_size() != ctypes.sizeof(_Plan):
        raise RuntimeError(f"{SOURCE.name} does not match this stripe_native.py (plan struct "
                           f"{lib.prunekit_stripe_plan_size()} vs {ctypes.sizeof(_Plan)} bytes; "
                           "prunekit was changed while this process ran: restart it)")
    return lib


class _Plan(ctypes.Structure):
    """Mirror of ``stripe_plan`` in stripe_kernel.c (same fields, same order)."""

    _fields_ = ([(name, ctypes.c_int64) for name in
                 ("N", "C", "H", "W", "s", "Ho", "Wo", "G", "R", "u_min", "plane", "nsets")]
                + [("sets", ctypes.c_void_p), ("chunk_w", ctypes.c_void_p),
                   ("chunk_off", ctypes.c_void_p), ("chunk_filt", ctypes.c_void_p),
                   ("nchunks", ctypes.c_int64), ("bias", ctypes.c_void_p)]
                + [(name, ctypes.c_int64) for name in ("F", "packed_end", "length")])


def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None when it cannot be used here (see unavailable_reason)."""
    with _lock:
        if "lib" not in _state:
            if os.environ.get("PRUNEKIT_NATIVE", "1") == "0":
                _state.update(lib=None, reason="disabled by PRUNEKIT_NATIVE=0")
            else:
                try:
                    _state.update(lib=_build(), reason=None)
                except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                    _state.update(lib=None, reason=str(exc))
        return _state["lib"]


def unavailable_reason() -> str | None:
    library()
    return _state.get("reason")


# Packed inputs fit in this much (a share of one core's L2): groups of images are packed and
# convolved while still in cache instead of streaming the whole packed batch through memory.
GROUP_BYTES = 256 * 1024
_scratch_local = threading.local()
# Below this many multiply-adds per thread a call runs on fewer threads: a batch-1 layer
# (~1M MACs, ~25 us) loses more to the team's fork/join and idle threads than it gains.
MACS_PER_THREAD = 1 << 22


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
        self._forward = lib.prunekit_stripe_forward
        self.fc = lib.prunekit_stripe_chunk()
        self.block = lib.prunekit_stripe_block()
        self.f, self.c = int(out_channels), int(weight.shape[1])
        self.stride, self.padding, self.dilation = stride[0], padding[0], dilation[0]
        self.kernel_size = kernel_size
        w = weight.detach().float().cpu()
        taps, filters, chunks = [], [], []
        for (i, j, lo, hi) in segments:
            index = out_index[lo:hi].tolist()
            for a in range(0, len(index), self.fc):
                part = index[a:a + self.fc]
                packed = torch.zeros(self.c, self.fc)
                packed[:, :len(part)] = w[lo + a:lo + a + len(part)].t()
                taps.append((i, j))
                filters.append(part + [self.f] * (self.fc - len(part)))
                chunks.append(packed)
        self.taps = taps
        self.stripes = int(out_index.numel())
        self.chunk_w = (torch.stack(chunks) if chunks else torch.zeros(0, self.c, self.fc)).contiguous()
        self.chunk_filt = torch.tensor(filters, dtype=torch.int32).reshape(-1, self.fc).contiguous()
        self.bias = None if bias is None else bias.detach().float().cpu().contiguous()
        self._shapes: dict = {}

    @staticmethod
    def supports(stride, padding, dilation, kernel_size) -> bool:
        """Square stride, dilation, kernel and symmetric padding (what the plan describes)."""
        return not isinstance(padding, str) and padding[0] == padding[1] \
            and stride[0] == stride[1] and dilation[0] == dilation[1] \
            and kernel_size[0] == kernel_size[1]

    def _layout(self, n: int, h: int, w: int) -> dict:
        """The exact-grid packing of stripe_kernel.c for an input of n x C x h x w: one plane
        set per (a, b, v) a kept tap uses, tap (i, j) -> offset of its set plus its row shift."""
        key = (n, h, w)
        if key in self._shapes:
            return self._shapes[key]
        s, p, d, c = self.stride, self.padding, self.dilation, self.c
        ho, wo = self._out_hw(h, w)
        if ho < 1 or wo < 1:
            raise ValueError(f"input {h}x{w} is smaller than the kernel's extent")
        # tap offset i*d - p = s*u + a (0 <= a < s): Python's divmod floors, as wanted
        rows = {t: divmod(t[0] * d - p, s) for t in self.taps}
        cols = {t: divmod(t[1] * d - p, s) for t in self.taps}
        sets = sorted({(rows[t][1], cols[t][1], cols[t][0]) for t in self.taps})
        set_index = {key: i for i, key in enumerate(sets)}
        u_min = min(u for u, _ in rows.values())
        r_count = ho + max(u for u, _ in rows.values()) - u_min
        g = _group_size(n, len(sets) * c * r_count * wo)
        plane = g * r_count * wo
        offsets = [set_index[(rows[t][1], cols[t][1], cols[t][0])] * c * plane
                   + (rows[t][0] - u_min) * wo for t in self.taps]
        per_image = -(-(ho * wo) // self.block)
        packed_end = len(sets) * c * plane
        # the furthest float any block reads: last image, last block, furthest tap, last channel
        length = max(packed_end, (g - 1) * r_count * wo + per_image * self.block
                     + max(offsets) + (c - 1) * plane) + 16
        tensors = {  # kept alive with the plan: the struct holds raw pointers to them
            "offsets": torch.tensor(offsets, dtype=torch.int64),
            "sets": torch.tensor(sets, dtype=torch.int64).reshape(-1).contiguous(),
        }
        plan = _Plan(N=n, C=c, H=h, W=w, s=s, Ho=ho, Wo=wo, G=g, R=r_count, u_min=u_min,
                     plane=plane, nsets=len(sets), sets=tensors["sets"].data_ptr(),
                     chunk_w=self.chunk_w.data_ptr(), chunk_off=tensors["offsets"].data_ptr(),
                     chunk_filt=self.chunk_filt.data_ptr(), nchunks=len(self.taps),
                     bias=None if self.bias is None else self.bias.data_ptr(), F=self.f,
                     packed_end=packed_end, length=length)
        macs = n * ho * wo * c * self.stripes
        layout = {"ho": ho, "wo": wo, "length": length, "groups": n // g, "plan": plan,
                  "plan_ref": ctypes.byref(plan), "tensors": tensors,
                  "max_threads": max(1, macs // MACS_PER_THREAD)}
        self._shapes[key] = layout
        return layout

    def _out_hw(self, h: int, w: int) -> tuple[int, int]:
        s, p, d, k = self.stride, self.padding, self.dilation, self.kernel_size[0]
        return (h + 2 * p - d * (k - 1) - 1) // s + 1, (w + 2 * p - d * (k - 1) - 1) // s + 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_contiguous():
            x = x.contiguous()
        n, _, h, w = x.shape
        if not self.taps:  # every stripe removed: the output is the bias
            ho, wo = self._out_hw(h, w)
            bias = self.bias if self.bias is not None else torch.zeros(self.f)
            return bias.view(1, -1, 1, 1).expand(n, self.f, ho, wo).contiguous()
        lay = self._shapes.get((n, h, w)) or self._layout(n, h, w)
        out = torch.empty((n, self.f, lay["ho"], lay["wo"]), dtype=torch.float32)
        threads = min(torch.get_num_threads(), lay["max_threads"])
        copies = threads if lay["groups"] >= threads else 1
        self._forward(lay["plan_ref"], x.data_ptr(), _scratch(copies * lay["length"]),
                      out.data_ptr(), threads)
        return out
