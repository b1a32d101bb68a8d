"""Conversion of the values a spec stores (model kwargs, structural attributes, method,
recipe, plan, metrics) to plain JSON types, with an error that names the offending value.
Imports nothing from prunekit."""
from __future__ import annotations

import json
from typing import Any


def _jsonable(value: Any, what: str) -> Any:
    """``value`` as plain JSON types; numpy/torch scalars and arrays are converted."""

    def convert(obj: Any) -> Any:
        if hasattr(obj, "tolist"):  # numpy arrays and scalars, tensors
            return obj.tolist()
        if isinstance(obj, (set, frozenset)):
            return sorted(obj)
        if hasattr(obj, "to_dict"):  # e.g. a PruningResult passed as metrics
            return obj.to_dict()
        raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")

    try:
        return json.loads(json.dumps(value, default=convert))
    except (TypeError, ValueError) as err:
        raise TypeError(f"{what} must be JSON-serialisable to be stored in the spec ({err})") \
            from None
