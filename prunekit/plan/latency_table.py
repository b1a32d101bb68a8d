"""Per-layer latency lookup tables measured on this device: what a plan's convolutions cost.

Issue 21 item 2 asks for latency targets *measured, not modelled*, choosing channel counts the
hardware runs well -- the hardware-aware idea of HFP ("Hardware-aware Filter Pruning"), where
a layer's cost is read from measurements of that layer on the target device rather than from
its MACs. A :class:`LatencyTable` holds, for every ``nn.Conv2d`` the model runs (found by
running it once on the example), the measured time of a standalone convolution with the real
kernel size, stride, padding, dilation, groups and input spatial size at a grid of
``(in_channels, out_channels)`` counts; between grid points the time is interpolated
bilinearly (:meth:`LatencyTable.layer_ms`). The convolutions are timed with a bias and without
BatchNorm: deployed models fold BN into the conv (:func:`prunekit.deploy`), which is what a
user ships. Everything else the model does (ReLU, residual adds, pooling, the classifier,
Python overhead) is one measured constant, the *residual*: the deployed full model's time minus
the sum of its layers' times (:meth:`LatencyTable.calibrate`). This is a deviation from a
per-op model, documented: the closed loop of :mod:`prunekit.latency_target` measures the real
pruned model and corrects whatever the residual's constancy gets wrong.

Grid per prunable dimension of width ``n``: ``samples`` evenly spaced fractions of ``n``
(default 8: n/8, 2n/8, ..., n), each rounded to a multiple of 8 for ``n >= 64`` (4 for
``n >= 16``; the SIMD widths of AVX2 / AVX-512 float32), of the conv's groups, plus 1; a
dimension no plan can change (the stem's 3 input channels) has the one real width.

``kernel``: ``"onednn"`` times ``nn.Conv2d`` (PyTorch's own kernels); ``"native"`` times
each conv prunekit's C kernel can take (groups 1, float32 on the CPU, the kernel built) on that
kernel, as ``deploy(native_convs=True)`` runs it, and any other conv as ``nn.Conv2d``.

Measurements are cached as JSON (atomically written) under
``$PRUNEKIT_CACHE/latency_tables/`` (default ``~/.cache/prunekit``), one file per key: the
device and its name (the CPU model, or the CUDA device's), torch's thread count, the dtype,
the batch size, the kernel (for ``"native"`` also its source and vector widths:
``stripe_native.kernel_identity``), the torch version and the layer's signature (kind,
kernel, stride, padding, dilation, groups, depthwise, input spatial size, full widths). Models sharing a layer share
its measurements. ``PRUNEKIT_LATENCY_CACHE=0`` (or ``cache=False``) disables the cache.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..files import atomic_write_json, cache_root
from ..measure.context import model_device_and_dtype, prepare_inputs
from ..measure.latency import _device_name, _time_batch
from ..measure.machine_load import LoadMonitor, judge
from ..nn import stripe_native
from ..nn.native_call import takes_dense_conv
from ..nn.stripe import StripeConv2d
from .latency_plan import LATENCY_KERNELS as KERNELS

__all__ = ["CACHE_ENV", "ConvLayer", "LatencyTable", "axis_samples", "cache_dir", "table_key",
           "time_conv"]

CACHE_ENV = "PRUNEKIT_LATENCY_CACHE"
CACHE_DIR = "latency_tables"
# Timing of one table point: warm-up passes, then at least RUNS runs and MIN_TIME_S seconds.
POINT_WARMUP, POINT_RUNS, POINT_MIN_TIME_S = 2, 5, 0.01


@dataclass(frozen=True)
class ConvLayer:
    """One convolution call of the model: its signature (what its time depends on besides the
    channel counts) and its full widths."""

    module: str
    in_channels: int
    out_channels: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    depthwise: bool
    spatial: tuple[int, ...]    # the input's H, W
    in_variable: bool = True    # whether a plan can change in_channels
    out_variable: bool = True

    def signature(self) -> dict:
        d = asdict(self)
        d.pop("module")
        d["kind"] = "conv2d"
        d["padding"] = list(self.padding) if not isinstance(self.padding, str) else self.padding
        return d

    def shape_for(self, cin: int, cout: int) -> tuple[int, int, int]:
        """(in_channels, out_channels, groups) of this layer at those counts."""
        if self.depthwise:
            multiplier = max(1, self.out_channels // max(self.groups, 1))
            g = max(1, cout // multiplier)
            return g, g * multiplier, g
        return cin, cout, self.groups


def cache_dir() -> Path:
    return cache_root() / CACHE_DIR


def _cache_enabled(option: bool | None) -> bool:
    if option is not None:
        return bool(option)
    return os.environ.get(CACHE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def table_key(layer: ConvLayer, *, device: torch.device | str, threads: int, dtype: torch.dtype,
              batch: int, kernel: str = "onednn") -> dict:
    """The cache key of ``layer``'s measurements (a JSON-ready dict)."""
    device = torch.device(device)
    key = {"device": str(device), "device_name": _device_name(device), "threads": int(threads),
           "dtype": str(dtype).replace("torch.", ""), "batch": int(batch), "kernel": kernel,
           "torch": torch.__version__, "layer": layer.signature()}
    if kernel == "native":  # the kernel's source and widths: a changed kernel is measured anew
        key["kernel_source"] = stripe_native.kernel_identity()
    return json.loads(json.dumps(key))  # as it reads back from the file (lists, not tuples)


def _key_file(key: dict) -> Path:
    text = json.dumps(key, sort_keys=True)
    return cache_dir() / f"{hashlib.sha256(text.encode()).hexdigest()[:24]}.json"


def axis_samples(n: int, samples: int = 8, multiple: int = 1, variable: bool = True) -> list[int]:
    """The grid of one dimension of width ``n`` (see the module doc)."""
    if not variable or n <= 2:
        return [n]
    simd = 8 if n >= 64 else 4 if n >= 16 else 1
    step = math.lcm(simd, multiple)
    points = {n, multiple}
    for i in range(1, samples + 1):
        value = max(step, round(n * i / samples / step) * step)
        points.add(min(n, value))
    return sorted(p for p in points if 1 <= p <= n and p % multiple == 0)


def time_conv(layer: ConvLayer, cin: int, cout: int, *, batch: int, device, dtype,
              kernel: str = "onednn") -> float:
    """Median ms of a standalone conv (with bias) of ``layer``'s signature at those counts, on
    ``kernel`` (see the module doc)."""
    cin, cout, groups = layer.shape_for(cin, cout)
    conv = nn.Conv2d(cin, cout, layer.kernel, layer.stride, layer.padding, layer.dilation,
                     groups, bias=True).to(device=device, dtype=dtype).eval()
    if kernel == "native" and takes_dense_conv(conv):  # a dense conv: every stripe kept
        conv = StripeConv2d.from_dense(conv, torch.ones(cout, *conv.kernel_size,
                                                        dtype=torch.bool)).eval()
    x = torch.randn(batch, cin, *layer.spatial, device=device, dtype=dtype)
    with torch.inference_mode():
        times = _time_batch(conv, x, POINT_WARMUP, POINT_RUNS, POINT_MIN_TIME_S)
    return statistics.median(times)


def _interp(axis: list[int], value: float) -> tuple[int, int, float]:
    """Indices (i, j) of the grid points around ``value`` and the weight of j (linear; beyond
    the grid the nearest segment is extended)."""
    if len(axis) == 1:
        return 0, 0, 0.0
    j = int(np.searchsorted(axis, value))
    j = min(max(j, 1), len(axis) - 1)
    i = j - 1
    return i, j, (value - axis[i]) / (axis[j] - axis[i])


@dataclass
class LatencyTable:
    """Measured per-layer times (ms) on a grid of channel counts, and the residual.

    Build with :meth:`measure`; ``timer(layer, cin, cout) -> ms`` replaces the real timing
    (tests inject a deterministic one). ``residual_ms`` is set by :meth:`calibrate`.
    """

    layers: list[ConvLayer]
    batch: int
    device: str
    dtype: str
    threads: int
    samples: int = 8
    points: list[dict] = field(default_factory=list)   # per layer: "cin,cout" -> ms
    residual_ms: float = 0.0          # the constant part of the non-conv time
    scaled_ms: float = 0.0            # the part that scales with the conv output volume
    full_ms: float | None = None
    probe: dict | None = None
    measured_points: int = 0
    cached_points: int = 0
    machine: dict | None = None
    warnings: list[str] = field(default_factory=list)
    timer: Callable | None = field(default=None, repr=False)
    _volume: float | None = field(default=None, repr=False)
    cache: bool | None = field(default=None, repr=False)
    kernel: str = "onednn"

    # ---------------------------------------------------------------- building
    @classmethod
    def measure(cls, model: nn.Module, graph, example_inputs, *, batch: int = 1,
                samples: int = 8, timer: Callable | None = None,
                cache: bool | None = None, kernel: str = "onednn") -> "LatencyTable":
        """Find the model's convolutions and measure their grids (cached points are read)."""
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {list(KERNELS)}, got {kernel!r}")
        device, dtype = model_device_and_dtype(model)
        table = cls(layers=conv_layers(model, graph, example_inputs), batch=int(batch),
                    device=str(device), dtype=str(dtype).replace("torch.", ""),
                    threads=torch.get_num_threads(), samples=samples, timer=timer, cache=cache,
                    kernel=kernel)
        # Layers of one signature (ResNet blocks) share their measurements.
        shared: dict[str, dict] = {}
        table.points = [shared.setdefault(json.dumps(layer.signature(), sort_keys=True), {})
                        for layer in table.layers]
        with LoadMonitor() as monitor:
            for i, layer in enumerate(table.layers):
                cins, couts = table.axes(i)
                table.fill(i, [(a, b) for a in cins for b in couts])
        if table.measured_points and timer is None:  # an injected timer measures nothing
            table.machine = monitor.result.as_dict() if monitor.result else None
            table.warnings = judge(monitor.result, {}, table.threads)
        return table

    def axes(self, i: int) -> tuple[list[int], list[int]]:
        layer = self.layers[i]
        if layer.depthwise:
            return [layer.in_channels], axis_samples(layer.out_channels, self.samples,
                                                     max(1, layer.out_channels // layer.groups),
                                                     layer.out_variable)
        return (axis_samples(layer.in_channels, self.samples, layer.groups, layer.in_variable),
                axis_samples(layer.out_channels, self.samples, layer.groups, layer.out_variable))

    def key(self, i: int) -> dict:
        return table_key(self.layers[i], device=self.device, threads=self.threads,
                         dtype=getattr(torch, self.dtype), batch=self.batch, kernel=self.kernel)

    def fill(self, i: int, wanted: list[tuple[int, int]]) -> None:
        """Measure the points of layer ``i`` not yet known (reading and updating the cache)."""
        known = self.points[i]
        missing = [p for p in wanted if f"{p[0]},{p[1]}" not in known]
        if not missing:
            return
        use_cache = _cache_enabled(self.cache)
        key = self.key(i)
        path = _key_file(key)
        stored = _read(path, key) if use_cache else {}
        fresh = 0
        for cin, cout in missing:
            name = f"{cin},{cout}"
            if name in stored:
                known[name] = stored[name]
                self.cached_points += 1
                continue
            layer = self.layers[i]
            ms = (self.timer(layer, cin, cout) if self.timer is not None else
                  time_conv(layer, cin, cout, batch=self.batch, device=self.device,
                            dtype=getattr(torch, self.dtype), kernel=self.kernel))
            known[name] = stored[name] = float(ms)
            self.measured_points += 1
            fresh += 1
        if use_cache and fresh:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_json(path, {"key": key, "points": stored, "updated":
                                         time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                                  indent=1, sort_keys=True)
            except OSError:
                pass  # an unwritable cache only costs the measurement next time

    # ---------------------------------------------------------------- reading
    def layer_ms(self, i: int, cin: float, cout: float) -> float:
        """Bilinear interpolation of layer ``i``'s grid at (cin, cout) (exact at grid points)."""
        cins, couts = self.axes(i)
        pts = self.points[i]
        a0, a1, wa = _interp(cins, cin)
        b0, b1, wb = _interp(couts, cout)

        def at(a, b):
            return pts[f"{cins[a]},{couts[b]}"]
        low = (1 - wb) * at(a0, b0) + wb * at(a0, b1)
        high = (1 - wb) * at(a1, b0) + wb * at(a1, b1)
        return max(0.0, (1 - wa) * low + wa * high)

    def exact_ms(self, i: int, cin: int, cout: int) -> float:
        """Layer ``i`` measured at exactly (cin, cout) (measured now if not known)."""
        self.fill(i, [(int(cin), int(cout))])
        return self.points[i][f"{int(cin)},{int(cout)}"]

    def layers_ms(self, shapes: list[tuple[float, float]]) -> float:
        return sum(self.layer_ms(i, a, b) for i, (a, b) in enumerate(shapes))

    def full_shapes(self) -> list[tuple[int, int]]:
        return [(layer.in_channels, layer.out_channels) for layer in self.layers]

    def activation(self, shapes: list[tuple[float, float]]) -> float:
        """The conv outputs' volume under ``shapes``, as a fraction of the full model's."""
        full = sum(layer.out_channels * math.prod(layer.spatial) / math.prod(layer.stride)
                   for layer in self.layers)
        kept = sum(cout * math.prod(layer.spatial) / math.prod(layer.stride)
                   for layer, (_, cout) in zip(self.layers, shapes))
        return kept / full if full > 0 else 1.0

    def calibrate(self, full_ms: float, probe_ms: float | None = None,
                  probe_shapes: list[tuple[float, float]] | None = None) -> None:
        """Split the non-conv time of the whole deployed model (``full_ms`` measured) into a
        constant and a part proportional to the conv output volume (elementwise ReLU / add
        work shrinks with the channels): from a second measured model (``probe_ms`` at
        ``probe_shapes``, e.g. a uniform half), two equations in two unknowns. Without a
        probe all of it is constant."""
        self.full_ms = float(full_ms)
        rest_full = max(0.0, self.full_ms - self.layers_ms(self.full_shapes()))
        scaled = 0.0
        if probe_ms is not None and probe_shapes is not None:
            kept = self.activation(probe_shapes)
            rest_probe = float(probe_ms) - self.layers_ms(probe_shapes)
            if kept < 1:
                scaled = min(max((rest_full - rest_probe) / (1 - kept), 0.0), rest_full)
            self.probe = {"ms": float(probe_ms), "activation": kept}
        self.scaled_ms, self.residual_ms = scaled, rest_full - scaled

    def layer_cost(self, i: int, cin: float, cout: float) -> float:
        """Layer ``i``'s time plus its share of the volume-proportional non-conv time."""
        ms = self.layer_ms(i, cin, cout)
        if self.scaled_ms:
            if self._volume is None:
                self._volume = sum(layer.out_channels * math.prod(layer.spatial)
                                   / math.prod(layer.stride) for layer in self.layers)
            layer = self.layers[i]
            ms += self.scaled_ms * cout * math.prod(layer.spatial) / math.prod(layer.stride) \
                / self._volume
        return ms

    def predict_ms(self, shapes: list[tuple[float, float]]) -> float:
        """The predicted time of the deployed model whose layers have ``shapes``."""
        return self.residual_ms + sum(self.layer_cost(i, a, b) for i, (a, b) in enumerate(shapes))

    def describe(self) -> dict:
        return {"layers": len(self.layers), "batch": self.batch, "device": self.device,
                "device_name": _device_name(torch.device(self.device)), "dtype": self.dtype,
                "threads": self.threads, "samples": self.samples, "kernel": self.kernel,
                "points": sum(len(p) for p in {id(p): p for p in self.points}.values()),
                "signatures": len({id(p) for p in self.points}), "measured_points":
                self.measured_points, "cached_points": self.cached_points,
                "residual_ms": self.residual_ms, "scaled_ms": self.scaled_ms,
                "full_ms": self.full_ms, "probe": self.probe,
                "layers_full_ms": self.layers_ms(self.full_shapes()) if self.layers else 0.0,
                "machine": self.machine, "warnings": list(self.warnings),
                "cache_dir": str(cache_dir()) if _cache_enabled(self.cache) else None}


def _read(path: Path, key: dict) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # missing or damaged: measured again and rewritten
    if not isinstance(value, dict) or value.get("key") != key:
        return {}
    points = value.get("points")
    return {k: float(v) for k, v in points.items()} if isinstance(points, dict) else {}


@torch.no_grad()
def conv_layers(model: nn.Module, graph, example_inputs) -> list[ConvLayer]:
    """Every ``nn.Conv2d`` call of ``model`` on the example (a conv called twice counts twice),
    with whether a plan on ``graph`` can change its input and output widths."""
    variable = {(m.module, m.dim) for g in graph.prunable_groups() for m, pos in g.members
                if m.tensor.endswith("weight") and (pos >= 0).any()}
    calls: list[ConvLayer] = []
    names = {id(m): n for n, m in model.named_modules()}
    hooks = []

    def hook(module, args, _out):
        name, x = names[id(module)], args[0]
        depthwise = graph.module_meta(name).get("kind") == "depthwise" or (
            module.groups > 1 and module.groups == module.in_channels)
        calls.append(ConvLayer(
            module=name, in_channels=module.in_channels, out_channels=module.out_channels,
            kernel=tuple(module.kernel_size), stride=tuple(module.stride),
            padding=module.padding if isinstance(module.padding, str) else tuple(module.padding),
            dilation=tuple(module.dilation), groups=module.groups, depthwise=depthwise,
            spatial=tuple(int(s) for s in x.shape[2:]),
            in_variable=(name, 1) in variable or (depthwise and (name, 0) in variable),
            out_variable=(name, 0) in variable))

    for module in model.modules():
        if type(module) is nn.Conv2d and module.padding_mode == "zeros":
            hooks.append(module.register_forward_hook(hook))
    was_training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        model(*prepare_inputs(model, example_inputs))
    finally:
        for h in hooks:
            h.remove()
        for m, flag in was_training.items():
            m.training = flag
    return calls
