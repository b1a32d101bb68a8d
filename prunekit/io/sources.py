"""Model sources for saved files: the builders a spec's ``base`` may name (``"source"``: the
zoo, torchvision, timm or the user's own ``package.module:function``), :func:`create_base`,
which builds a model that :func:`prunekit.io.save` can describe, and
:func:`build_saved_base`, which rebuilds a spec's architecture for :func:`prunekit.io.load`.

Both delegate to :mod:`prunekit.models.sources`; this module only fixes what a *file* may
ask for: never pretrained weights (a saved file carries its own), and the user's code only
when the caller trusts it (importing a module named inside a file runs that module).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from ..models.sources import MODEL_SOURCES, PRETRAINED_KEYS, build_base, build_model

__all__ = ["PRETRAINED_KEYS", "SOURCES", "build_saved_base", "create_base", "module_package"]

SOURCES = MODEL_SOURCES


def create_base(source: str, name: str, **kwargs: Any) -> nn.Module:
    """Build a model that :func:`~prunekit.io.save` can describe without an explicit ``base=``.

    ``source``: ``"prunekit"`` (the zoo), ``"torchvision"``, ``"timm"`` or ``"module"``
    (``name`` = ``"package.module:function"``). ``weights`` may be passed in ``kwargs``
    (``weights="DEFAULT"``, a file, ...); it is not recorded, since a saved file carries its
    own weights.
    """
    weights = kwargs.pop("weights", None)
    return build_model({"source": source, "name": name, "weights": weights, "kwargs": kwargs})


def module_package(name: str) -> str:
    """The top-level package of a ``package.module:function`` reference."""
    return name.partition(":")[0].split(".")[0]


def build_saved_base(source: str, name: str, kwargs: Mapping[str, Any], *,
                     trusted_modules: Sequence[str] | str = ()) -> nn.Module:
    """The base model a saved spec names, randomly initialised: never with pretrained weights,
    so building it never reads a weights file nor touches the network. A ``module`` source is
    built only when its package is in ``trusted_modules`` (or ``$PRUNEKIT_TRUSTED_MODULES``).

    Raises ValueError if ``kwargs`` hold one of :data:`PRETRAINED_KEYS`.
    """
    asked = [key for key in PRETRAINED_KEYS if key in kwargs]
    if asked:
        raise ValueError(f"the base kwargs ask for pretrained weights ({', '.join(asked)})")
    return build_base(source, name, kwargs, trusted_modules=trusted_modules)
