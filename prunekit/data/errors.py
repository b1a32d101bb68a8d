"""The errors prunekit's data code raises on purpose: a dataset that is not where prunekit
looked, and a download whose checksum does not match.

Both derive from :class:`prunekit.errors.PrunekitError` and from the built-in exception they
always were, so ``except FileNotFoundError`` / ``except ValueError`` keep working.
"""

from __future__ import annotations

from ..errors import PrunekitError

__all__ = ["ChecksumError", "DatasetNotFoundError"]


class DatasetNotFoundError(PrunekitError, FileNotFoundError):
    """No dataset in a supported layout at any of the places prunekit looked."""


class ChecksumError(PrunekitError, ValueError):
    """A downloaded file does not have the expected MD5 checksum."""
