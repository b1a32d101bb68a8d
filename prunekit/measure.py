"""Cost and quality measurements: MACs, parameters, latency, accuracy.

Counting conventions (read this before comparing numbers with papers):

* **MACs** (multiply-accumulates) are what the pruning literature calls "FLOPs".
  The ResNet paper and almost every pruning paper (SFP, FPGM, HRank, CHIP, ...)
  report MACs under that name, e.g. CIFAR ResNet-56 = "125.49M FLOPs".
* ``include="conv+linear"`` (default) counts convolutions and the matmul family
  (``nn.Linear``, ``matmul``, ``bmm``, ...) via
  :class:`torch.utils.flop_counter.FlopCounterMode`, which reports FLOPs = 2 x MACs;
  we halve it. Bias additions, BN, activations, pooling and residual adds count 0.
* ``include="thop"`` additionally adds 2 x (number of output elements) for every
  BatchNorm layer, which is what the thop versions used by CHIP counted. Use it
  only to reproduce CHIP-style numbers, and always compare against a baseline
  counted the same way. Activations and pooling are not added (thop's share for
  them is < 0.01% on CIFAR ResNets).
* Counts are for the whole ``example_inputs`` batch and are not normalised:
  pass a batch of 1 to get the per-image number papers report.
* Parameters are unique ``nn.Parameter`` objects (shared/tied ones once),
  including BN affine weights, excluding buffers (BN running statistics).
"""

from __future__ import annotations

import contextlib
import itertools
import platform
import statistics
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

__all__ = [
    "count_macs",
    "count_params",
    "macs_by_module",
    "profile",
    "BatchLatency",
    "LatencyResult",
    "measure_latency",
    "evaluate",
    "recalibrate_bn",
    "resolve_device",
    "speedup",
]

MAC_CONVENTIONS = ("conv+linear", "thop")

ExampleInputs = torch.Tensor | Sequence[torch.Tensor] | Sequence[int] | torch.Size


# --------------------------------------------------------------------------- helpers
def _model_device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in list(model.parameters()) + list(model.buffers()):
        dtype = tensor.dtype if tensor.is_floating_point() else torch.float32
        return tensor.device, dtype
    return torch.device("cpu"), torch.float32


def _is_shape(value: Any) -> bool:
    return isinstance(value, (tuple, list, torch.Size)) and len(value) > 0 and all(
        isinstance(v, int) for v in value
    )


def _prepare_inputs(model: nn.Module, example_inputs: ExampleInputs) -> tuple[torch.Tensor, ...]:
    """Return the inputs as a tuple of tensors on the model's device.

    A shape (tuple of ints, batch dimension included) is turned into a random tensor,
    because MAC counts depend only on shapes.
    """
    device, dtype = _model_device_and_dtype(model)
    if _is_shape(example_inputs):
        return (torch.randn(*example_inputs, device=device, dtype=dtype),)
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put the model in eval mode and restore every submodule's own flag afterwards.

    ``model.train(was_training)`` is not enough: it would flip submodules that the
    caller deliberately kept in a different mode (e.g. frozen BN while fine-tuning).
    """
    previous = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, was_training in previous.items():
            module.training = was_training


@contextlib.contextmanager
def _on_device(model: nn.Module, device: torch.device | str | None) -> Iterator[torch.device]:
    """Run on ``device`` (None = where the model already is), moving the model back afterwards."""
    current, _ = _model_device_and_dtype(model)
    if device is None:
        yield current
        return
    target = resolve_device(device)
    if target == current:
        yield current
        return
    model.to(target)
    try:
        yield target
    finally:
        model.to(current)


def _check_convention(include: str) -> None:
    if include not in MAC_CONVENTIONS:
        raise ValueError(f"include must be one of {MAC_CONVENTIONS}, got {include!r}")


# --------------------------------------------------------------------------- MACs / params
@dataclass
class _MacCounts:
    """Result of one counting pass; per-module dicts are keyed by ``named_modules()`` names."""

    conv_linear: int
    bn_extra: int
    conv_linear_by_module: dict[str, int]
    bn_extra_by_module: dict[str, int]


def _count(model: nn.Module, example_inputs: ExampleInputs) -> _MacCounts:
    """Run one forward pass, counting conv/matmul MACs and BN output elements per module."""
    inputs = _prepare_inputs(model, example_inputs)
    counter = FlopCounterMode(display=False)
    flops_by_module: dict[str, int] = defaultdict(int)
    bn_extra_by_module: dict[str, int] = defaultdict(int)
    # Stack of [name, global FLOPs at entry, FLOPs of already-finished children] so each
    # module is credited only with the ops executed directly in its own forward.
    stack: list[list[Any]] = []

    def pre_hook(name: str):
        def hook(module, args):
            stack.append([name, counter.get_total_flops(), 0])
        return hook

    def post_hook(name: str):
        def hook(module, args, output):
            entry_name, start, children = stack.pop()
            inclusive = counter.get_total_flops() - start
            flops_by_module[entry_name] += inclusive - children
            if stack:
                stack[-1][2] += inclusive
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and isinstance(output, torch.Tensor):
                bn_extra_by_module[entry_name] += 2 * output.numel()
        return hook

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(pre_hook(name)))
        handles.append(module.register_forward_hook(post_hook(name)))
    try:
        with _eval_mode(model), torch.no_grad(), counter:
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()

    # FlopCounterMode counts a multiply-add as 2 FLOPs, so every entry is even.
    return _MacCounts(
        conv_linear=counter.get_total_flops() // 2,
        bn_extra=sum(bn_extra_by_module.values()),
        conv_linear_by_module={name: flops // 2 for name, flops in flops_by_module.items()},
        bn_extra_by_module=dict(bn_extra_by_module),
    )


def count_macs(model: nn.Module, example_inputs: ExampleInputs, *, include: str = "conv+linear") -> int:
    """MACs of one forward pass over ``example_inputs`` (a tensor, tuple of tensors, or a shape).

    ``include="conv+linear"`` counts conv and matmul-family ops (the "FLOPs" of papers);
    ``include="thop"`` also adds 2 x output elements of every BatchNorm, as CHIP's thop did.
    The count covers the whole batch; pass batch size 1 for per-image numbers. The model is
    run in eval mode under ``no_grad`` and its training flags are restored afterwards.
    """
    _check_convention(include)
    counts = _count(model, example_inputs)
    return counts.conv_linear + (counts.bn_extra if include == "thop" else 0)


def macs_by_module(
    model: nn.Module, example_inputs: ExampleInputs, *, include: str = "conv+linear"
) -> dict[str, int]:
    """MACs per module name (as in ``model.named_modules()``, root = ``""``), for reports.

    Each module gets the MACs executed directly in its own forward, not in its children,
    so for ordinary CNNs the entries are the conv/linear leaves and the values sum to
    :func:`count_macs`. Modules with zero MACs are omitted.
    """
    _check_convention(include)
    counts = _count(model, example_inputs)
    result = dict(counts.conv_linear_by_module)
    if include == "thop":
        for name, macs in counts.bn_extra_by_module.items():
            result[name] = result.get(name, 0) + macs
    return {name: macs for name, macs in result.items() if macs}


def count_params(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of unique parameters (tied ones counted once); buffers are excluded."""
    # model.parameters() already de-duplicates by identity, which handles weight tying.
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def profile(model: nn.Module, example_inputs: ExampleInputs) -> dict[str, int]:
    """``{"macs", "macs_thop", "params"}`` from a single forward pass."""
    counts = _count(model, example_inputs)
    return {
        "macs": counts.conv_linear,
        "macs_thop": counts.conv_linear + counts.bn_extra,
        "params": count_params(model),
    }


# --------------------------------------------------------------------------- latency
@dataclass
class BatchLatency:
    """Timing statistics of one batch size, in milliseconds per forward pass."""

    batch_size: int
    median_ms: float
    mean_ms: float
    std_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    runs: int
    throughput_per_s: float  # examples per second at the median latency


@dataclass
class LatencyResult:
    """Latency per batch size plus the conditions it was measured under."""

    device: str
    device_name: str
    num_threads: int
    torch_version: str
    input_shape: list[int]  # per-example shape (without the batch dimension)
    warmup: int
    batches: dict[int, BatchLatency] = field(default_factory=dict)

    @property
    def median_ms(self) -> dict[int, float]:
        return {bs: stats.median_ms for bs, stats in self.batches.items()}

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict. Batch sizes become string keys so a JSON round trip is lossless."""
        result = asdict(self)
        result["batches"] = {str(bs): asdict(stats) for bs, stats in self.batches.items()}
        return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _summarise(batch_size: int, times_ms: list[float]) -> BatchLatency:
    median = statistics.median(times_ms)
    return BatchLatency(
        batch_size=batch_size,
        median_ms=median,
        mean_ms=statistics.fmean(times_ms),
        std_ms=statistics.stdev(times_ms) if len(times_ms) > 1 else 0.0,
        p10_ms=float(np.percentile(times_ms, 10)),
        p90_ms=float(np.percentile(times_ms, 90)),
        min_ms=min(times_ms),
        runs=len(times_ms),
        throughput_per_s=batch_size * 1000.0 / median if median > 0 else float("inf"),
    )


def _time_once_ms(model: nn.Module, batch: torch.Tensor, on_cuda: bool) -> float:
    if on_cuda:
        # Kernel launches are asynchronous; events measure GPU time, synchronize waits for it.
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(batch)
        end.record()
        torch.cuda.synchronize(batch.device)
        return start.elapsed_time(end)
    start_s = time.perf_counter()
    model(batch)
    return (time.perf_counter() - start_s) * 1000.0


def measure_latency(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[int] | torch.Size,
    *,
    batch_sizes: Iterable[int] = (1, 64),
    warmup: int = 10,
    runs: int = 50,
    device: torch.device | str | None = None,
    threads: int | None = None,
    min_time_s: float | None = None,
    progress: bool = False,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> LatencyResult:
    """Time forward passes for each batch size on random inputs.

    ``example_input`` is a tensor or a full shape *including* a batch dimension, e.g.
    ``(1, 3, 32, 32)``; only the per-example part is used. ``device=None`` measures where
    the model already is; an explicit device moves the model there for the measurement and
    back afterwards. ``threads`` sets ``torch.set_num_threads`` during the measurement only.
    ``min_time_s`` keeps timing past ``runs`` until that much timed time has accumulated.
    ``memory_format`` lays the random inputs out as, e.g., ``torch.channels_last`` for a model
    converted with ``model.to(memory_format=torch.channels_last)`` (4-D inputs only), so the
    timing holds no layout conversion the model would not see in a channels-last pipeline.
    """
    if isinstance(example_input, torch.Tensor):
        per_example_shape, dtype = list(example_input.shape[1:]), example_input.dtype
    else:
        per_example_shape, dtype = list(example_input)[1:], None
    batch_sizes = [int(bs) for bs in batch_sizes]
    if runs < 1 or warmup < 0:
        raise ValueError("runs must be >= 1 and warmup >= 0")

    previous_threads = torch.get_num_threads()
    bar = tqdm(total=len(batch_sizes) * (warmup + runs), desc="latency", disable=not progress, leave=False)
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        with _on_device(model, device) as run_device, _eval_mode(model), torch.inference_mode():
            _, model_dtype = _model_device_and_dtype(model)
            on_cuda = run_device.type == "cuda"
            result = LatencyResult(
                device=str(run_device),
                device_name=_device_name(run_device),
                num_threads=torch.get_num_threads(),
                torch_version=torch.__version__,
                input_shape=per_example_shape,
                warmup=warmup,
            )
            for batch_size in batch_sizes:
                batch = torch.randn(batch_size, *per_example_shape, device=run_device,
                                    dtype=dtype or model_dtype).contiguous(memory_format=memory_format)
                for _ in range(warmup):
                    model(batch)
                    bar.update()
                if on_cuda:
                    torch.cuda.synchronize(run_device)
                times_ms: list[float] = []
                while len(times_ms) < runs or (min_time_s and sum(times_ms) < min_time_s * 1000.0):
                    times_ms.append(_time_once_ms(model, batch, on_cuda))
                    if len(times_ms) <= runs:
                        bar.update()
                result.batches[batch_size] = _summarise(batch_size, times_ms)
    finally:
        bar.close()
        torch.set_num_threads(previous_threads)
    return result


# --------------------------------------------------------------------------- accuracy
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
    desc: str = "eval",
    max_batches: int | None = None,
) -> dict[str, float | int]:
    """Top-1 / top-5 accuracy (percent) and mean cross-entropy over a loader of (inputs, targets).

    Top-5 uses ``min(5, num_classes)`` so it is defined for small label sets. ``device=None``
    evaluates where the model already is; an explicit device moves it there and back.
    """
    try:
        total_batches = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total_batches = None
    if max_batches is not None and total_batches is not None:
        total_batches = min(total_batches, max_batches)

    seen = correct_top1 = correct_top5 = 0
    loss_sum = 0.0
    with _on_device(model, device) as run_device, _eval_mode(model), torch.inference_mode():
        bar = tqdm(loader, total=total_batches, desc=desc, disable=not progress, leave=False)
        try:
            for batch_index, batch in enumerate(bar):
                if max_batches is not None and batch_index >= max_batches:
                    break
                if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                    raise TypeError("evaluate expects the loader to yield (inputs, targets) pairs")
                inputs = batch[0].to(run_device, non_blocking=True)
                targets = batch[1].to(run_device, non_blocking=True)
                logits = model(inputs)
                if isinstance(logits, (tuple, list)):  # e.g. models that also return aux outputs
                    logits = logits[0]
                loss_sum += F.cross_entropy(logits.float(), targets, reduction="sum").item()
                k = min(5, logits.shape[1])
                top_k = logits.topk(k, dim=1).indices
                hits = top_k.eq(targets.unsqueeze(1))
                correct_top1 += hits[:, 0].sum().item()
                correct_top5 += hits.any(dim=1).sum().item()
                seen += targets.numel()
                bar.set_postfix(top1=f"{100.0 * correct_top1 / seen:.2f}")
        finally:
            bar.close()
    if seen == 0:
        raise ValueError("evaluate: the loader yielded no examples")
    return {
        "top1": 100.0 * correct_top1 / seen,
        "top5": 100.0 * correct_top5 / seen,
        "loss": loss_sum / seen,
        "n": seen,
    }


# --------------------------------------------------------------------------- devices / reports
@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Iterable, batches: int = 50, *,
                   device: torch.device | str | None = None, progress: bool = True) -> int:
    """Re-estimate every batch-norm layer's running mean and variance from ``batches``
    batches of ``loader`` (a cumulative average, train-mode forward, no gradients, weights
    untouched); returns the number of batches used. The model is left in eval mode.

    Needed when the network changed after its statistics were last updated, e.g. stripes cut
    during the last steps of SWP's skeleton training: train-mode accuracy stays high while the
    eval-mode statistics describe the unpruned filters.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    if not norms:
        return 0
    if batches < 1:
        raise ValueError(f"batches must be >= 1, got {batches!r}")
    iterator = iter(loader)
    first = next(iterator, None)
    if first is None:
        raise ValueError("recalibrate_bn got an empty loader; the statistics are unchanged")
    saved = [(m, m.momentum) for m in norms]
    used = 0
    with _on_device(model, device) as run_device:
        try:
            for m in norms:
                m.reset_running_stats()
                m.momentum = None  # cumulative moving average over the batches seen
            model.train()
            bar = tqdm(itertools.chain([first], iterator), total=batches,
                       desc="bn recalibration", disable=not progress, leave=False)
            for batch in bar:
                if used >= batches:
                    break
                inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(inputs.to(run_device))
                used += 1
        finally:
            for m, momentum in saved:
                m.momentum = momentum
            model.eval()
    return used


def resolve_device(device: torch.device | str | None = None) -> torch.device:
    """``None``/``"auto"`` -> cuda if available else cpu; otherwise validate the request."""
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"invalid device {device!r}: {error}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("CUDA requested but torch.cuda.is_available() is False; use --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(
                f"{resolved} requested but only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    return resolved


def _latency_medians(summary: Mapping[str, Any]) -> dict[int, float] | None:
    """Batch size -> median ms from a LatencyResult, its as_dict(), or a plain mapping."""
    latency = summary.get("latency", summary.get("median_ms"))
    if latency is None:
        return None
    if isinstance(latency, LatencyResult):
        return latency.median_ms
    if isinstance(latency, Mapping) and "batches" in latency:
        return {int(bs): float(stats["median_ms"]) for bs, stats in latency["batches"].items()}
    if isinstance(latency, Mapping) and "median_ms" in latency:
        latency = latency["median_ms"]
    return {int(bs): float(ms) for bs, ms in latency.items()}


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def speedup(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """Compression/speed-up factors ``before / after`` (> 1 means smaller or faster).

    ``before``/``after`` are :func:`profile`-style dicts, optionally with a ``"latency"``
    entry (a :class:`LatencyResult`, its ``as_dict()``, or ``{batch_size: median_ms}``).
    Missing quantities give ``None``. Reductions in percent are included because papers
    quote "FLOPs down 47.4%"; compare only numbers counted under the same convention.
    """
    result: dict[str, Any] = {
        "macs_x": _ratio(before.get("macs"), after.get("macs")),
        "params_x": _ratio(before.get("params"), after.get("params")),
    }
    if "macs_thop" in before and "macs_thop" in after:
        result["macs_thop_x"] = _ratio(before["macs_thop"], after["macs_thop"])
    for key in ("macs", "params"):
        old, new = before.get(key), after.get(key)
        result[f"{key}_reduction_pct"] = 100.0 * (1 - new / old) if old and new is not None else None
    medians_before, medians_after = _latency_medians(before), _latency_medians(after)
    result["latency_x"] = (
        {
            bs: _ratio(medians_before[bs], medians_after[bs])
            for bs in medians_before
            if bs in medians_after
        }
        if medians_before is not None and medians_after is not None
        else None
    )
    return result
