"""Checks of the ``init`` payloads of prunekit's own replacement modules (SWP's StripeConv2d
and ShortcutBlock), and the shapes of the tensors each will hold, so that a file's payload is
validated before the class allocates anything from it.

Importing this module also registers the classes themselves (their modules register them
as replacements when imported). The declarations belong next to the classes, in the
``@register_replacement(init=..., shapes=...)`` decorators of ``prunekit.nn.stripe`` and
``prunekit.nn.shortcut``; until they move there, io supplies them.
"""
from __future__ import annotations

from typing import Any

from ..nn.registry import (either, flag, integer, integers, one_of, register_replacement)
from ..nn.shortcut import ShortcutBlock
from ..nn.stripe import StripeConv2d

# Imported for its side effect: it registers ZeroPadShortcut's structural attributes.
from ..models import cifar_resnet  # noqa: F401  isort: skip

__all__: list[str] = []


def _pair(lo: int):
    check = integers(lo)

    def pair(value: Any) -> list[int]:
        value = check(value)
        if len(value) != 2:
            raise ValueError(f"must be a list of 2 integers >= {lo}")
        return list(value)
    return pair


def _stripe_mask(value: Any) -> list:
    # [out_channels][kh][kw] of 0/1; the shape is checked against the other keys in
    # _stripe_shapes, before torch ever sees the list.
    if not (isinstance(value, list) and all(
            isinstance(row, list) and all(
                isinstance(col, list) and all(v in (0, 1) and not isinstance(v, float)
                                              for v in col) for col in row) for row in value)):
        raise ValueError("must be a nested list [out_channels][kh][kw] of 0 and 1")
    return value


def _stripe_shapes(init: dict[str, Any]) -> dict[str, list[int]]:
    out, (kh, kw) = init["out_channels"], init["kernel_size"]
    mask = init["stripe_mask"]
    if len(mask) != out or any(len(row) != kh or any(len(col) != kw for col in row)
                               for row in mask):
        raise ValueError(f"stripe_mask is not [{out}][{kh}][{kw}] (out_channels, kernel_size)")
    kept = sum(v for row in mask for col in row for v in col)
    shapes = {"weight": [kept, init["in_channels"]], "out_index": [kept],
              "stripe_mask": [out, kh, kw]}
    if init["bias"]:
        shapes["bias"] = [out]
    return shapes


register_replacement(StripeConv2d, init={
    "in_channels": integer(1), "out_channels": integer(1), "kernel_size": _pair(1),
    "stride": _pair(1), "padding": either(one_of("same", "valid"), _pair(0)),
    "dilation": _pair(1), "bias": flag, "stripe_mask": _stripe_mask,
}, shapes=_stripe_shapes)

register_replacement(ShortcutBlock, init={"channels": integer(1)},
                     shapes=lambda init: {"constant": [1, init["channels"], 1, 1]})
