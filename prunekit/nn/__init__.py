"""Execution-side modules for pruned networks.

Importing this package registers :class:`StripeConv2d`, :class:`ShortcutBlock` and HASTE's
:class:`HashConv2d` as replacement modules that ``prunekit.io`` can save and load
(``prunekit.nn.registry``).
"""

from .haste import (HasteReport, dense_convolutions, hash_convolutions, haste_macs, hashed_modules,
                    macs_summary)
from .hashconv import HashConv2d
from .shortcut import ShortcutBlock
from .stripe import StripeConv2d, stripe_prune_model

__all__ = ["HashConv2d", "HasteReport", "ShortcutBlock", "StripeConv2d", "dense_convolutions",
           "hash_convolutions", "haste_macs", "hashed_modules", "macs_summary", "stripe_prune_model"]
