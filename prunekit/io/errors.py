"""The error :func:`prunekit.io.save` raises for a model that a saved file could not
describe, so that it refuses at save time instead of writing a file that never loads back
or loads as another network. Loading raises the ``WeightsLoadError`` family."""
from __future__ import annotations

from ..errors import PrunekitError

__all__ = ["SaveError"]


class SaveError(PrunekitError, ValueError):
    """A model :func:`prunekit.io.save` cannot store so that loading rebuilds it exactly; the
    message names the module, tensor or attribute and says what to do instead."""
