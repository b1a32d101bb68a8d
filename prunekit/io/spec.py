"""The spec: the JSON document stored in a saved file's safetensors metadata that says how to
rebuild the architecture (its format name, where it is stored, and how a stored one is parsed
and checked before anything is built from it)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..models.weights import WeightsLoadError
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
              and isinstance(spec.get("modules", {}), dict))
    except (ValueError, KeyError, TypeError) as err:
        raise WeightsLoadError(f"the prunekit spec in {path} is corrupt ({err}); re-save the "
                               "model with prunekit.io.save") from None
    if not ok or base.get("source", "prunekit") not in SOURCES:
        raise WeightsLoadError(f"the prunekit spec in {path} is malformed; re-save the model")
    if fmt != FORMAT:
        raise WeightsLoadError(f"{path} uses format {fmt!r} but this prunekit (version "
                               f"{__version__}) reads {FORMAT!r}; upgrade prunekit")
    base.setdefault("source", "prunekit")
    base.setdefault("kwargs", {})
    spec.setdefault("modules", {})
    return spec
