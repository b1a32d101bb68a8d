"""Execution-side modules for pruned networks.

Importing this package registers :class:`StripeConv2d` and :class:`ShortcutBlock` as
replacement modules that ``prunekit.io`` can save and load (``prunekit.nn.registry``).
"""

from .shortcut import ShortcutBlock
from .stripe import StripeConv2d, stripe_prune_model

__all__ = ["ShortcutBlock", "StripeConv2d", "stripe_prune_model"]
