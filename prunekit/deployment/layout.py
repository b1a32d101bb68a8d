"""channels_last or not for a deployed model's dense convolutions, whether their fused
epilogues run as oneDNN post-ops, and which of them run on prunekit's C kernel
(:mod:`.native_dense`): measured, then cached.

oneDNN's post-op convolution saves a pass over the output at batch 64 but costs a fixed
~50 us more per call than the plain convolution at batch 1 (ResNet-56 on an EPYC: 10%
faster and 40% slower), so it is timed with the layouts, not assumed.

Which layout oneDNN runs faster depends on the CPU, the thread count, the dtype, the layer
shapes and the batch size, so :func:`choose_channels_last` times the model both ways on this
machine (interleaved rounds with NCHW inputs, as a caller feeds them; converting the weights
is enough, PyTorch's convolutions then produce channels_last activations) and the faster median
wins. The answer is cached in ``$PRUNEKIT_CACHE/deploy_layout.json`` (default
``~/.cache/prunekit``, the native kernel's cache) under a key of the device (with the CPU's
name), thread count, dtype, example input shape and -- beyond what the brief lists, because a
different network with the same input would get another answer -- a fingerprint of the
model's structure (module types and parameter shapes), plus the torch version (and, with
native candidates, their names and the C kernel's source digest). The file is
rewritten atomically; ``PRUNEKIT_DEPLOY_CACHE=0`` (or ``cache=False``) disables reading and
writing it.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from ..files import atomic_write_json, cache_root
from ..measure.machine_load import cpu_model_name
from ..nn import stripe_native
from .fused_dense import FusedConv2d
from .native_dense import swap_modules
from .native_sequence import group_native_convs

__all__ = ["cache_enabled", "cache_key", "cache_path", "choose_channels_last",
           "has_dense_post_ops", "layer_arguments", "measure_layouts", "read_cache",
           "set_dense_post_ops", "structure_fingerprint", "time_layers", "variant_name",
           "write_cache"]

CACHE_ENV = "PRUNEKIT_DEPLOY_CACHE"
CACHE_FILE = "deploy_layout.json"
# Timing of the decision: rounds x runs forward passes per layout, after a warm-up; a model
# slower than DECISION_BUDGET_MS / DECISION_RUNS a pass gets fewer runs (at least 2) and one
# warm-up (resnet18 at batch 64 takes ~3 s a pass: 6 variants would otherwise cost 6 min).
DECISION_ROUNDS, DECISION_RUNS, DECISION_WARMUP = 3, 5, 2
DECISION_BUDGET_MS = 400.0
# Per-layer timing of native twins: rounds x runs calls each way, after a warm-up call.
LAYER_ROUNDS, LAYER_RUNS = 3, 3
# The native variant changes the algorithm of many convs at once, so it must beat the best
# oneDNN variant by this much: on this shared 2-core machine a decision's medians move a few
# percent between runs, and a 2% win in one decision put resnet18 (batch 1, 1 thread) on NCHW
# natives that then ran 67.8 ms where channels_last oneDNN had run 49.4 ms the day before.
NATIVE_MARGIN = 0.05


def cache_path() -> Path:
    return cache_root() / CACHE_FILE


def cache_enabled(option: bool | None = None) -> bool:
    """``option`` when given, else the environment (``PRUNEKIT_DEPLOY_CACHE=0`` disables)."""
    if option is not None:
        return bool(option)
    return os.environ.get(CACHE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def structure_fingerprint(model: nn.Module) -> str:
    """Module types and parameter / buffer shapes (not values): the same network, pruned the
    same way, gets the same fingerprint whatever its weights."""
    parts = [f"{name}:{type(m).__name__}" for name, m in model.named_modules()]
    parts += [f"{name}:{tuple(t.shape)}" for name, t in model.state_dict().items()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def cache_key(device: torch.device | str, threads: int, dtype: torch.dtype,
              input_shape, fingerprint: str) -> str:
    device = torch.device(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model_name()
    return json.dumps({"device": str(device), "device_name": where, "threads": int(threads),
                       "dtype": str(dtype).replace("torch.", ""),
                       "input_shape": [int(v) for v in input_shape], "model": fingerprint,
                       "torch": torch.__version__}, sort_keys=True)


def read_cache(path: Path | None = None) -> dict:
    path = path or cache_path()
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # missing or damaged: measured again and rewritten
    return value if isinstance(value, dict) else {}


def write_cache(key: str, entry: dict, path: Path | None = None) -> None:
    path = path or cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    values = read_cache(path)
    values[key] = entry
    atomic_write_json(path, values, indent=1, sort_keys=True)


def _time_ms(model: nn.Module, inputs: tuple) -> float:
    start = time.perf_counter()
    model(*inputs)
    return (time.perf_counter() - start) * 1000.0


def layer_arguments(model: nn.Module, inputs: tuple, names) -> dict[str, tuple]:
    """The positional arguments each module in ``names`` receives on ``inputs`` (its first
    call), cloned."""
    captured: dict[str, tuple] = {}
    hooks = []
    for name in names:
        def hook(module, args, name=name):
            captured.setdefault(name, tuple(a.clone() if isinstance(a, torch.Tensor) else a
                                            for a in args))
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return captured


def time_layers(model: nn.Module, inputs: tuple,
                twins: dict[str, nn.Module]) -> dict[str, dict[str, float]]:
    """Median ms of every conv in ``twins`` on its own input from ``inputs``: ``{"dense":
    the faster of the plain and the oneDNN post-op call, "native": the kernel}``, NCHW,
    interleaved rounds."""
    arguments = layer_arguments(model, inputs, list(twins))
    result = {}
    with torch.inference_mode():
        for name, native in twins.items():
            if name not in arguments:  # never called on the example
                continue
            args, dense = arguments[name], model.get_submodule(name)
            variants = {"native": (native, None), "dense": (dense, False)}
            if isinstance(dense, FusedConv2d):
                variants["dense+post_ops"] = (dense, True)
            times = {key: [] for key in variants}
            saved = getattr(dense, "use_onednn", None)
            try:
                for _ in range(LAYER_ROUNDS):
                    for key, (module, post_ops) in variants.items():
                        if post_ops is not None and saved is not None:
                            module.use_onednn = post_ops
                        module(*args)
                        times[key] += [_time_ms(module, args) for _ in range(LAYER_RUNS)]
            finally:
                if saved is not None:
                    dense.use_onednn = saved
            medians = {key: statistics.median(v) for key, v in times.items()}
            result[name] = {"native": medians["native"],
                            "dense": min(v for k, v in medians.items() if k != "native")}
    return result


def set_dense_post_ops(model: nn.Module, on: bool) -> None:
    """Switch every FusedConv2d of ``model`` between oneDNN post-ops and the plain ops."""
    for m in model.modules():
        if isinstance(m, FusedConv2d):
            m.use_onednn = bool(on)


def has_dense_post_ops(model: nn.Module) -> bool:
    """Whether ``model`` holds a dense conv with a fused epilogue (worth timing both ways)."""
    return any(isinstance(m, FusedConv2d) for m in model.modules())


def measure_layouts(model: nn.Module, inputs: tuple, layouts=("contiguous", "channels_last"),
                    post_ops=(False,), native: dict[str, nn.Module] | None = None,
                    sequences: bool = False) -> dict[str, float]:
    """Median ms of ``model`` in every (layout, dense post-ops) variant, interleaved rounds:
    keys ``"contiguous"``, ``"channels_last"``, and with ``post_ops`` containing True also
    ``"contiguous+post_ops"`` / ``"channels_last+post_ops"`` (dense epilogues as oneDNN
    post-ops rather than separate ops). ``native`` (name -> module, e.g. the
    :class:`~.native_dense.NativeConv2d` twins of some convs) adds ``"native"`` (and
    ``"native+post_ops"``): NCHW with those modules swapped in (and with ``sequences``,
    consecutive kernel convs grouped into one call each, as deploy will run them: timed on a
    copy). The model is left contiguous, post-ops off, its own modules in place."""
    formats = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    variants = [(layout, on, False) for layout in layouts for on in post_ops]
    if native:
        variants += [("contiguous", on, True) for on in post_ops]
    times: dict[str, list[float]] = {variant_name(*v): [] for v in variants}
    grouped = _grouped_copy(model, native) if native and sequences else None
    with torch.inference_mode():
        first = _time_ms(model, inputs)  # also the first warm-up
        runs = max(2, min(DECISION_RUNS, int(DECISION_BUDGET_MS // max(first, 1e-3))))
        warmup = DECISION_WARMUP if runs == DECISION_RUNS else 1
        for _ in range(DECISION_ROUNDS):
            for layout, on, swapped in variants:
                model.to(memory_format=formats[layout])
                timed = grouped if swapped and grouped is not None else model
                previous = swap_modules(model, native) if swapped and timed is model else {}
                try:
                    set_dense_post_ops(timed, on)
                    for _ in range(warmup):
                        timed(*inputs)
                    times[variant_name(layout, on, swapped)] += [_time_ms(timed, inputs)
                                                             for _ in range(runs)]
                finally:
                    swap_modules(model, previous)
    model.to(memory_format=torch.contiguous_format)
    set_dense_post_ops(model, False)
    return {variant: statistics.median(values) for variant, values in times.items()}


def _grouped_copy(model: nn.Module, native: dict[str, nn.Module]) -> nn.Module:
    """A copy of ``model`` with ``native`` swapped in and its kernel-conv runs grouped."""
    previous = swap_modules(model, native)
    try:
        grouped = copy.deepcopy(model)
    finally:
        swap_modules(model, previous)
    group_native_convs(grouped)
    return grouped


def variant_name(layout: str, post_ops: bool, native: bool = False) -> str:
    """The key of a variant in :func:`measure_layouts`' result (``"channels_last+post_ops"``,
    ``"native"``, ...)."""
    return ("native" if native else layout) + ("+post_ops" if post_ops else "")


def _valid_entry(entry, native: bool) -> bool:
    return isinstance(entry, dict) and isinstance(entry.get("channels_last"), bool) \
        and isinstance(entry.get("dense_post_ops"), bool) and (not native or (
            isinstance(entry.get("native_convs"), list)
            and all(isinstance(n, str) for n in entry["native_convs"])))


def choose_channels_last(model: nn.Module, inputs: tuple, *, cache: bool | None = None,
                         layouts=("contiguous", "channels_last"), post_ops=None,
                         native: dict[str, nn.Module] | None = None,
                         sequences: bool = False) -> dict:
    """The fastest variant of ``model`` on ``inputs``, measured or cached: ``{"channels_last":
    bool, "dense_post_ops": bool, "native_convs": [names], "source": "cache" | "measured",
    "ms": {...}, "key": ...}``. ``layouts``: the candidate layouts; ``post_ops``: the candidate
    settings of the dense epilogue fusion (default: both when the model has fused dense convs,
    else off); ``native``: name -> :class:`~.native_dense.NativeConv2d` twin of the convs that
    may run on the C kernel. Each twin is first timed against its conv on the conv's own input
    (:func:`time_layers`, in ``"native_layers"``); the faster ones form the
    ``"native"`` variant, and ``"native_convs"`` names them when that variant wins by more than
    ``NATIVE_MARGIN``. ``sequences``: the native variant is timed with its kernel-conv runs
    grouped into one call each (:mod:`.native_sequence`), as deploy then runs it."""
    if post_ops is None:
        post_ops = (False, True) if has_dense_post_ops(model) else (False,)
    layouts, post_ops = tuple(layouts), tuple(bool(v) for v in post_ops)
    first = inputs[0]
    candidates = f"{'/'.join(layouts)}|post_ops={'/'.join(map(str, post_ops))}" + (
        f"|native={','.join(sorted(native))}|kernel={stripe_native.kernel_identity()}"
        + ("|sequences" if sequences else "") if native else "")
    key = cache_key(first.device, torch.get_num_threads(), first.dtype, first.shape,
                    f"{structure_fingerprint(model)}|{candidates}")
    use_cache = cache_enabled(cache)
    if use_cache:
        entry = read_cache().get(key)
        if _valid_entry(entry, bool(native)):
            return {"native_convs": [], **entry, "source": "cache", "key": key}
    layers = time_layers(model, inputs, native) if native else {}
    faster = {name: native[name] for name, t in layers.items() if t["native"] < t["dense"]}
    ms = measure_layouts(model, inputs, layouts, post_ops, faster, sequences=sequences)
    best = min(ms, key=ms.get)
    onednn = min((v for v in ms if not v.startswith("native")), key=ms.get)
    if best.startswith("native") and ms[best] > (1.0 - NATIVE_MARGIN) * ms[onednn]:
        best = onednn  # within the noise: keep oneDNN
    entry = {"channels_last": best.startswith("channels_last"),
             "dense_post_ops": best.endswith("+post_ops"),
             "native_convs": sorted(faster) if best.startswith("native") else [], "ms": ms,
             "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if native:
        entry["native_layers"] = {name: {k: round(v, 4) for k, v in t.items()}
                                  for name, t in layers.items()}
    if use_cache:
        try:
            write_cache(key, entry)
        except OSError:
            pass  # an unwritable cache only costs the measurement next time
    return {**entry, "source": "measured", "key": key}
