"""The spec: the JSON document stored in a saved file's safetensors metadata that says how to
rebuild the architecture (its format name, where it is stored, and how a stored one is parsed
and checked before anything is built from it)."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..models.weights import WeightsLoadError, WeightsMismatchError, listing
from ..version import __version__
from .sources import SOURCES

__all__ = ["FORMAT", "SAVED_SPEC_ATTR", "SPEC_KEY"]

FORMAT = "prunekit/1"
SPEC_KEY = "prunekit_spec"  # key of the spec in the safetensors header metadata
SAVED_SPEC_ATTR = "prunekit_saved_spec"  # attribute of a loaded model holding its whole spec


def _parse_spec(path: Path, text: str) -> dict[str, Any]:
    try:
        spec = json.loads(text)
        fmt = spec["format"]
        base = spec["base"]
        ok = (isinstance(base["name"], str) and isinstance(base.get("kwargs", {}), dict)
              and _is_table(spec.get("modules", {}), dict)
              and _is_table(spec.get("replaced", {}), dict)
              and _is_table(spec.get("shapes", {}), list))
    except (ValueError, KeyError, TypeError) as err:
        raise WeightsLoadError(f"the prunekit spec in {path} is corrupt ({err}); re-save the "
                               "model with prunekit.io.save") from None
    if not ok or base.get("source", "prunekit") not in SOURCES or not all(
            isinstance(e.get("class"), str) and isinstance(e.get("init"), dict)
            for e in spec.get("replaced", {}).values()):
        raise WeightsLoadError(f"the prunekit spec in {path} is malformed; re-save the model")
    if fmt != FORMAT:
        raise WeightsLoadError(f"{path} uses format {fmt!r} but this prunekit (version "
                               f"{__version__}) reads {FORMAT!r}; upgrade prunekit")
    base.setdefault("source", "prunekit")
    base.setdefault("kwargs", {})
    spec.setdefault("modules", {})
    spec.setdefault("replaced", {})
    return spec


def _is_table(value: Any, kind: type) -> bool:
    return isinstance(value, dict) and all(isinstance(v, kind) for v in value.values())


def _check_shapes(path: Path, spec: dict[str, Any], header: Mapping[str, Sequence[int]]) -> None:
    """The spec's ``shapes`` (a copy for readers) must agree with the safetensors header,
    which is authoritative, for every tensor both list; a tensor only one of them lists is
    left to the missing/unexpected key check of loading (``strict``)."""
    wrong = [(key, tuple(header[key]), tuple(shape))
             for key, shape in spec.get("shapes", {}).items()
             if key in header and list(shape) != list(header[key])]
    if wrong:
        described = [f"{key}: spec {list(b)} vs stored {list(a)}" for key, a, b in wrong]
        raise WeightsMismatchError(
            f"the spec in {path} gives other shapes than the tensors it stores: "
            f"{listing(described)}. The file was edited or is corrupt; re-save it.",
            missing=[], unexpected=[], shape_mismatches=wrong)
