"""Execution-side modules for pruned networks."""

from .stripe import StripeConv2d, stripe_prune_model

__all__ = ["StripeConv2d", "stripe_prune_model"]
