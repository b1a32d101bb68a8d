"""Loading checkpoints into prunekit models, with errors that say what to do next.

Weights are files (state dicts, training checkpoints, ``.safetensors``) read without
unpickling code, or downloads that torchvision/timm make; one that cannot happen says where
to put the file by hand.  The zoo's pretrained files are looked up, never downloaded, in

1. ``$PRUNEKIT_WEIGHTS`` (the files directly in it, or in a per-source sub-folder), else
2. ``<data root>/weights/<source folder>/`` where the data root is ``$PRUNEKIT_DATA``, else
   ``../shared/data`` relative to the working directory, else the ``shared/data`` folder
   next to the repository that holds this package.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, PrunekitError

__all__ = [
    "PretrainedWeights",
    "WeightsDownloadError",
    "WeightsLoadError",
    "WeightsMismatchError",
    "WeightsNotFoundError",
    "download_guard",
    "find_data_root",
    "find_pretrained_file",
    "hf_hub_cache",
    "load_weights",
    "pretrained_checkpoint_info",
    "torch_hub_file",
    "weights_kind",
]

# The trained weights first; EMA copies (timm's train script) only when nothing else is there.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "state_dict_ema", "model_ema")
# Training scripts (torchvision's references, timm's train.py) store their argparse options
# beside the weights; a Namespace only holds attributes, and anything inside it still has to
# pass the weights-only unpickler.
_SAFE_GLOBALS = (argparse.Namespace,)
# DataParallel / DistributedDataParallel and torch.compile wrap the module and prefix every key.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_MAX_LISTED = 10
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".th", ".ckpt", ".tar")


class WeightsLoadError(PrunekitError, RuntimeError):
    """A checkpoint could not be read or applied."""


class WeightsNotFoundError(WeightsLoadError, FileNotFoundError):
    """A weights file that does not exist (or is a directory)."""


class WeightsDownloadError(WeightsLoadError, ConnectionError):
    """Pretrained weights that had to be downloaded and could not be; the message names the
    URL or hub id and where to put the file by hand."""


class WeightsMismatchError(WeightsLoadError):
    """The checkpoint's keys or tensor shapes do not fit the model."""

    def __init__(
        self,
        message: str,
        *,
        missing: list[str],
        unexpected: list[str],
        shape_mismatches: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    ):
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.shape_mismatches = shape_mismatches


@dataclass(frozen=True, eq=False)
class PretrainedWeights:
    """A checkpoint shipped in the shared data folder.

    ``filename`` is a glob (``"resnet56-*.th"``) because the release files carry a hash
    suffix; ``requires`` lists the constructor arguments the network was trained with.
    """

    filename: str
    folder: str
    requires: Mapping[str, Any] = field(default_factory=dict)
    top1: float | None = None
    source: str = ""


def load_weights(
    model: nn.Module, source: str | os.PathLike | Mapping[str, Any], *, strict: bool = True
) -> nn.Module:
    """Load a checkpoint file or state dict into ``model`` (in place) and return ``model``.

    Accepts plain state dicts, ``.safetensors`` files and ``{"state_dict": ...}``-style
    wrappers (``model``, ``state_dict_ema``, ... as torchvision's and timm's training scripts
    write them), and strips the ``module.`` (DataParallel) and ``_orig_mod.`` (torch.compile)
    key prefixes.  Pickled files are read with ``weights_only=True`` onto the CPU, so a file
    that pickles other Python objects is refused as unsafe.  With ``strict=False`` missing
    and unexpected keys are tolerated; shape mismatches never are.

    Raises:
        WeightsNotFoundError: ``source`` is a path that does not exist (a FileNotFoundError).
        WeightsLoadError: the file is not a readable checkpoint, or pickles Python objects.
        WeightsMismatchError: keys or shapes do not fit the model.
    """
    if isinstance(source, (str, os.PathLike)):
        origin = str(source)
        checkpoint = _read_checkpoint(Path(source))
    elif isinstance(source, Mapping):
        origin = "the given state dict"
        checkpoint = source
    else:
        raise TypeError(
            f"weights source must be a path or a state dict, not {type(source).__name__}"
        )
    state = _strip_prefixes(_unwrap(checkpoint, origin))
    _fill_bn_counters(model, state)
    _check_fit(model, state, strict, origin)
    model.load_state_dict(state, strict=strict)
    return model


def pretrained_checkpoint_info(path: str | os.PathLike) -> dict[str, Any]:
    """Scalar metadata stored beside the weights, e.g. ``{"best_prec1": 93.62}``.

    ``best_prec1`` is what the akamaster training script recorded on the lossless CIFAR-10
    test set; an empty dict means the file holds nothing but tensors.
    """
    checkpoint = _read_checkpoint(Path(path))
    if not isinstance(checkpoint, Mapping) or _is_state_dict(checkpoint):
        return {}
    info: dict[str, Any] = {}
    for key, value in checkpoint.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (bool, int, float, str)):
            info[str(key)] = value
    return info


def weights_kind(weights: Any) -> str | None:
    """``None``, ``"file"`` (a path or state dict) or ``"name"`` (``"pretrained"``,
    ``"IMAGENET1K_V2"``, ...: a string that does not look like a path)."""
    if weights is None:
        return None
    if isinstance(weights, (os.PathLike, Mapping)):
        return "file"
    if not isinstance(weights, str) or not weights.strip():
        raise ConfigError(f"weights must be a file path or a name such as 'pretrained', got "
                          f"{weights!r}")
    path = Path(weights)
    is_path = path.suffix.lower() in WEIGHT_SUFFIXES or "/" in weights or os.sep in weights
    return "file" if is_path or path.exists() else "name"


def download_guard(build, what: str, place: str):
    """``build()``, with a failed download (no network: URLError, huggingface_hub's errors,
    all OSErrors) as a WeightsDownloadError naming ``what`` and where to ``place`` the file."""
    try:
        return build()
    except (OSError, TimeoutError) as err:
        text = str(err).strip()
        reason = text.splitlines()[0][:300].rstrip(".") if text else type(err).__name__
        raise WeightsDownloadError(
            f"could not download the pretrained weights {what}: {reason}. Without network, "
            f"download the file on another machine and {place}, or pass --weights PATH to the "
            f"downloaded file") from err


def hf_hub_cache() -> str:
    """The Hugging Face hub cache folder, where timm's downloads go."""
    try:
        from huggingface_hub import constants
        return str(constants.HF_HUB_CACHE)
    except (ImportError, AttributeError):  # no huggingface_hub, or one without that name
        return "~/.cache/huggingface/hub"


def torch_hub_file(url: str) -> Path:
    """Where ``torch.hub`` looks for (and downloads) the file at ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def find_data_root() -> Path | None:
    """The shared data folder (see the module docstring), or ``None`` if none exists."""
    env = os.environ.get("PRUNEKIT_DATA")
    if env:
        return Path(env).expanduser()
    for candidate in _default_data_roots():
        if candidate.is_dir():
            return candidate
    return None


def find_pretrained_file(info: PretrainedWeights) -> Path:
    """Locate ``info``'s checkpoint on disk; raise FileNotFoundError saying where we looked."""
    searched = _weights_dirs(info.folder)
    for directory in searched:
        matches = sorted(directory.glob(info.filename)) if directory.is_dir() else []
        if matches:
            return matches[0]
    places = "\n  ".join(str(d) for d in searched)
    raise WeightsNotFoundError(
        f"pretrained weights {info.filename!r} not found. Looked in:\n  {places}\n"
        "Set PRUNEKIT_WEIGHTS to the folder holding the .th files, or PRUNEKIT_DATA to the "
        "shared data folder (the one containing weights/" + info.folder + "/)."
    )


def _default_data_roots() -> list[Path]:
    # parents[3] of prunekit/models/weights.py is the folder holding the source checkout,
    # the same place as parents[2] of prunekit/__init__.py
    return [
        Path.cwd() / ".." / "shared" / "data",
        Path(__file__).resolve().parents[3] / "shared" / "data",
    ]


def _weights_dirs(folder: str) -> list[Path]:
    env = os.environ.get("PRUNEKIT_WEIGHTS")
    if env:
        # An explicit setting is the user's intent; silently falling back would hide typos.
        base = Path(env).expanduser()
        return [base, base / folder]
    env_data = os.environ.get("PRUNEKIT_DATA")
    roots = [Path(env_data).expanduser()] if env_data else _default_data_roots()
    return [root / "weights" / folder for root in roots]


def _read_checkpoint(path: Path) -> Any:
    if not path.exists():
        raise WeightsNotFoundError(f"weights file not found: {path}")
    if path.is_dir():
        raise WeightsNotFoundError(f"weights path is a directory, expected a checkpoint file: "
                                   f"{path}")
    if _is_safetensors(path):
        return _read_safetensors(path)
    try:
        with torch.serialization.safe_globals(list(_SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except pickle.UnpicklingError as err:
        global_ = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if global_ is None:  # e.g. "Unsupported operand": the bytes are not a torch pickle
            raise _corrupt(path, err) from err
        raise WeightsLoadError(
            f"{path} pickles a Python object ({global_.group(1)}), so it is refused as unsafe: "
            "unpickling it could run any code, and torch.load(weights_only=True) reads only "
            "tensors and plain containers. If you trust the file, load it yourself with "
            "torch.load(path, weights_only=False) and save its state_dict() (or pass that to "
            "load_weights); otherwise it is corrupt or not a checkpoint - re-download it."
        ) from err
    except Exception as err:  # truncated legacy files raise EOFError, KeyError, RuntimeError...
        raise _corrupt(path, err) from err


def _is_safetensors(path: Path) -> bool:
    if path.suffix.lower() == ".safetensors":
        return True
    # Otherwise by content: an 8-byte little-endian header length, then a JSON object.
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and not head.startswith(b"PK")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, ValueError, OSError) as err:
        raise WeightsLoadError(f"{path} is truncated or not a safetensors file ({err}); "
                               "re-download or re-save it.") from err


def _corrupt(path: Path, err: Exception) -> WeightsLoadError:
    text = str(err).strip()
    unpickler = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    detail = unpickler.group(1) if unpickler else (text.splitlines()[-1] if text else "")
    return WeightsLoadError(
        f"{path} is corrupt or not a PyTorch checkpoint ({type(err).__name__}"
        f"{': ' + detail if detail else ''}); it may be truncated - re-download it."
    )


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _unwrap(checkpoint: Any, origin: str) -> dict[str, torch.Tensor]:
    obj = checkpoint
    for _ in range(3):  # wrappers are sometimes nested, e.g. {"model": {"state_dict": ...}}
        if _is_state_dict(obj):
            return dict(obj)
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj), None)
        if inner is None:
            break
        obj = inner
    if isinstance(checkpoint, Mapping):
        keys = ", ".join(map(str, list(checkpoint)[:_MAX_LISTED]))
        what = f"a dict with keys [{keys}]"
    else:
        what = f"a {type(checkpoint).__name__}"
    raise WeightsLoadError(
        f"no state dict found in {origin}: it holds {what}; expected a mapping of parameter "
        f"names to tensors, possibly under one of {list(_WRAPPER_KEYS)}"
    )


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            # Only when every key has it: a real submodule may be called "module".
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def _fill_bn_counters(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    # Checkpoints from PyTorch < 0.4.1 have no num_batches_tracked buffers; they carry no
    # information, so keep the model's own rather than reporting them as missing.
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value.clone()


def compare_state(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]):
    """(missing keys, unexpected keys, [(key, given shape, expected shape)]) of a state dict."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [(k, tuple(given[k].shape), tuple(v.shape)) for k, v in expected.items()
              if k in given and given[k].shape != v.shape]
    return missing, unexpected, shapes


def mismatch_lines(missing, unexpected, shapes, strict: bool, source: str = "checkpoint") -> list[str]:
    """The readable lines of a :class:`WeightsMismatchError` (shared by checkpoints and .safetensors)."""
    lines = []
    if strict and missing:
        lines.append(f"  {len(missing)} missing key(s): {listing(missing)}")
    if strict and unexpected:
        lines.append(f"  {len(unexpected)} unexpected key(s): {listing(unexpected)}")
    if shapes:
        described = [f"{k}: {source} {a} vs model {b}" for k, a, b in shapes]
        lines.append(f"  {len(shapes)} shape mismatch(es):\n    " + listing(described, "\n    "))
    return lines


def _check_fit(
    model: nn.Module, state: Mapping[str, torch.Tensor], strict: bool, origin: str
) -> None:
    missing, unexpected, shapes = compare_state(model.state_dict(), state)
    if not shapes and (not strict or (not missing and not unexpected)):
        return
    spec = getattr(model, "prunekit_spec", None)
    target = type(model).__name__ + (f" ({spec['name']})" if spec else "")
    lines = [f"weights from {origin} do not fit {target}:"]
    lines += mismatch_lines(missing, unexpected, shapes, strict)
    lines.append(
        "Was the checkpoint saved from a different depth, width, shortcut type or "
        "num_classes? A pruned checkpoint must be loaded into the model rebuilt from its spec."
    )
    raise WeightsMismatchError(
        "\n".join(lines),
        missing=missing if strict else [],
        unexpected=unexpected if strict else [],
        shape_mismatches=shapes,
    )


def listing(items: list[str], sep: str = ", ") -> str:
    shown = sep.join(items[:_MAX_LISTED])
    rest = len(items) - _MAX_LISTED
    return shown + (f"{sep}... and {rest} more" if rest > 0 else "")
