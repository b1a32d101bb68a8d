"""channels_last or not for a deployed model's dense convolutions: measured, then cached.

Which layout oneDNN runs faster depends on the CPU, the thread count, the dtype, the layer
shapes and the batch size, so :func:`choose_channels_last` times the model both ways on this
machine (interleaved rounds with NCHW inputs, as a caller feeds them; converting the weights
is enough, PyTorch's convolutions then produce channels_last activations) and the faster median
wins. The answer is cached in ``$PRUNEKIT_CACHE/deploy_layout.json`` (default
``~/.cache/prunekit``, the native kernel's cache) under a key of the device (with the CPU's
name), thread count, dtype, example input shape and -- beyond what the brief lists, because a
different network with the same input would get another answer -- a fingerprint of the
model's structure (module types and parameter shapes), plus the torch version. The file is
rewritten atomically; ``PRUNEKIT_DEPLOY_CACHE=0`` (or ``cache=False``) disables reading and
writing it.
"""
from __future__ import annotations

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

__all__ = ["cache_enabled", "cache_key", "cache_path", "choose_channels_last", "read_cache",
           "structure_fingerprint", "write_cache"]

CACHE_ENV = "PRUNEKIT_DEPLOY_CACHE"
CACHE_FILE = "deploy_layout.json"
# Timing of the decision: rounds x runs forward passes per layout, after a warm-up.
DECISION_ROUNDS, DECISION_RUNS, DECISION_WARMUP = 3, 5, 2


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


def measure_layouts(model: nn.Module, inputs: tuple) -> dict[str, float]:
    """Median ms of ``model`` as it is and with channels_last weights, interleaved rounds.
    The model is left contiguous."""
    times: dict[str, list[float]] = {"contiguous": [], "channels_last": []}
    with torch.inference_mode():
        for _ in range(DECISION_ROUNDS):
            for layout, fmt in (("contiguous", torch.contiguous_format),
                                ("channels_last", torch.channels_last)):
                model.to(memory_format=fmt)
                for _ in range(DECISION_WARMUP):
                    model(*inputs)
                times[layout] += [_time_ms(model, inputs) for _ in range(DECISION_RUNS)]
    model.to(memory_format=torch.contiguous_format)
    return {layout: statistics.median(values) for layout, values in times.items()}


def choose_channels_last(model: nn.Module, inputs: tuple, *, cache: bool | None = None
                         ) -> dict:
    """``{"channels_last": bool, "source": "cache" | "measured", "ms": {...}, "key": ...}``."""
    first = inputs[0]
    key = cache_key(first.device, torch.get_num_threads(), first.dtype, first.shape,
                    structure_fingerprint(model))
    use_cache = cache_enabled(cache)
    if use_cache:
        entry = read_cache().get(key)
        if isinstance(entry, dict) and isinstance(entry.get("channels_last"), bool):
            return {**entry, "source": "cache", "key": key}
    ms = measure_layouts(model, inputs)
    entry = {"channels_last": ms["channels_last"] < ms["contiguous"], "ms": ms,
             "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if use_cache:
        try:
            write_cache(key, entry)
        except OSError:
            pass  # an unwritable cache only costs the measurement next time
    return {**entry, "source": "measured", "key": key}
