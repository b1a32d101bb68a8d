"""Building and loading the native stripe kernel (``stripe_kernel.c``), the library a
:class:`~prunekit.nn.stripe_native.NativeStripePlan` runs on.

The C file is compiled on first use with the system C compiler (``$CC``, else ``cc``/``gcc``;
``-O3 -march=native -ffp-contract=fast -fopenmp``, a few seconds: every tile shape is
specialised) into ``$PRUNEKIT_CACHE`` (default ``~/.cache/prunekit``), keyed by the source,
compiler, flags and the CPU's instruction sets (a cache shared between machines never hands an
AVX-512 build to a CPU without it), and loaded with ctypes. A compiler that rejects the flags
is retried without OpenMP, then also without ``-march=native`` (:func:`_flag_variants`). The
kernel is portable C (vector extensions, no intrinsics): 8-float vectors on any x86-64 with
AVX (AVX2, AVX-512 machines included), 4-float ones elsewhere; where the CPU has AVX-512, a
second build with 16-float vectors (:func:`wide_library`). Without a compiler, when every
build fails (a RuntimeWarning says why), or with ``PRUNEKIT_NATIVE=0``, :func:`library` returns
None (the reason is in :func:`unavailable_reason`) and StripeConv2d runs its pure-torch
formulation, which computes the same result.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

from ..files import cache_root

__all__ = ["forward_address", "library", "source_digest", "unavailable_reason", "wide_library"]

SOURCE = Path(__file__).with_name("stripe_kernel.c")
# -ffp-contract=fast: ISO C mode (-std=c11) otherwise forbids fusing a * b + c into one FMA,
# which halves the arithmetic throughput of the kernel
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-fPIC", "-shared", "-std=c11"]
_lock = threading.Lock()


# The second build: 16-float vectors where the CPU has AVX-512 (see wide_library)
WIDE_FLAGS = ["-DPRUNEKIT_WIDE"]


def _flag_variants(extra: tuple = ()) -> list[list[str]]:
    """Tried in turn when a compiler rejects one: without OpenMP (the kernel then runs on one
    thread), then also without -march=native (a compiler that does not know this CPU)."""
    flags = [*FLAGS, *extra]
    no_omp = [f for f in flags if f != "-fopenmp"]
    return [flags, no_omp, [f for f in no_omp if f != "-march=native"]]


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


def _build(extra: tuple = ()) -> ctypes.CDLL:
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    text = SOURCE.read_bytes()
    key = hashlib.sha256(text + " ".join([compiler, *FLAGS, *extra, _cpu_identity()]).encode()
                         ).hexdigest()[:16]
    cache = cache_root()
    target = cache / f"stripe_kernel_{key}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so")
        os.close(fd)
        try:
            errors = []
            for flags in _flag_variants(extra):
                result = subprocess.run([compiler, *flags, str(SOURCE), "-o", tmp],
                                        capture_output=True, text=True, timeout=120)
                if result.returncode == 0:
                    break
                errors.append(result.stderr.strip()[:400])
            else:
                raise RuntimeError(f"compiling {SOURCE.name} failed: {errors[0]}")
            os.replace(tmp, target)  # atomic: concurrent builders never load a partial file
        finally:
            Path(tmp).unlink(missing_ok=True)
    lib = ctypes.CDLL(str(target))
    p = ctypes.c_void_p
    lib.prunekit_stripe_forward.argtypes = [ctypes.POINTER(_Plan), p, p, p, ctypes.c_int]
    lib.prunekit_stripe_forward.restype = ctypes.c_int
    lib.prunekit_stripe_forward_fused.argtypes = [ctypes.POINTER(_Plan), p, p, p, p, ctypes.c_int,
                                                  ctypes.c_int]
    lib.prunekit_stripe_forward_fused.restype = ctypes.c_int
    for name in ("vl", "chunk", "acc", "max_block"):
        getattr(lib, f"prunekit_stripe_{name}").restype = ctypes.c_int
    lib.prunekit_stripe_plan_size.restype = ctypes.c_int64
    if lib.prunekit_stripe_plan_size() != ctypes.sizeof(_Plan):
        raise RuntimeError(f"{SOURCE.name} does not match this stripe_build.py (plan struct "
                           f"{lib.prunekit_stripe_plan_size()} vs {ctypes.sizeof(_Plan)} bytes; "
                           "prunekit was changed while this process ran: restart it)")
    return lib


class _Plan(ctypes.Structure):
    """Mirror of ``stripe_plan`` in stripe_kernel.c (same fields, same order)."""

    _fields_ = ([(name, ctypes.c_int64) for name in
                 ("N", "C", "H", "W", "s", "p", "Ho", "Wo", "G", "Hq", "Wq", "plane", "img",
                  "nphases")]
                + [("phases", ctypes.c_void_p), ("nvec", ctypes.c_int64), ("vecs", ctypes.c_void_p),
                   ("direct", ctypes.c_int64), ("BV", ctypes.c_int64),
                   ("chunk_w", ctypes.c_void_p), ("chunk_off", ctypes.c_void_p),
                   ("chunk_filt", ctypes.c_void_p), ("chunk_live", ctypes.c_void_p),
                   ("chunk_tap0", ctypes.c_void_p),
                   ("nchunks", ctypes.c_int64), ("bias", ctypes.c_void_p)]
                + [(name, ctypes.c_int64) for name in ("F", "packed_end", "length")]
                + [("single", ctypes.c_int64), ("orphans", ctypes.c_void_p),
                   ("norphans", ctypes.c_int64)])


def source_digest() -> str:
    """A short hash of the kernel's C source (cached decisions about it go stale with it)."""
    if "digest" not in _state:
        _state["digest"] = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    return _state["digest"]


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
                    warnings.warn(f"prunekit: the native stripe kernel is unavailable ({exc}); "
                                  "StripeConv2d runs its torch formulation instead (same "
                                  "result, slower)", RuntimeWarning, stacklevel=2)
        return _state["lib"]


def unavailable_reason() -> str | None:
    library()
    return _state.get("reason")


def wide_library() -> ctypes.CDLL | None:
    """The kernel built with 16-float vectors, or None: without AVX-512 (the build then has
    the default width), without the default library, or with PRUNEKIT_WIDE=0. Plans use it
    for convs whose output rows are whole wide vectors (see NativeStripePlan._library_for):
    measured on AMD EPYC (Zen 4) 4-9% faster on ResNet-56's 32x32 and 16x16 stripe layers
    (benchmarks/wide_vectors.py), whose tiles then store, load and broadcast once per 16
    outputs instead of 8."""
    base = library()
    with _lock:
        if "wide" not in _state:
            wide = None
            # (a build for a CPU without AVX-512 would only repeat the default width)
            if base is not None and os.environ.get("PRUNEKIT_WIDE", "1") != "0" \
                    and "-march=native" in FLAGS and " avx512f" in _cpu_identity():
                try:
                    lib = _build(tuple(WIDE_FLAGS))
                except (RuntimeError, OSError, subprocess.SubprocessError):
                    lib = None  # the default library serves every conv
                # only a true second width with the same chunk layout (filters per chunk)
                if lib is not None and lib.prunekit_stripe_vl() == 2 * base.prunekit_stripe_vl() \
                        and lib.prunekit_stripe_chunk() == base.prunekit_stripe_chunk() \
                        and lib.prunekit_stripe_max_block() == base.prunekit_stripe_max_block():
                    wide = lib
            _state["wide"] = wide
        return _state["wide"]


def forward_address(lib: ctypes.CDLL) -> int:
    """Address of ``lib``'s prunekit_stripe_forward_fused (a sequence step names the library
    its plan was built for)."""
    return ctypes.cast(lib.prunekit_stripe_forward_fused, ctypes.c_void_p).value
