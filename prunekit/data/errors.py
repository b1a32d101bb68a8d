"""The errors prunekit's data code raises on purpose: a dataset that is not where prunekit
looked, a download whose checksum does not match, and a download that could not be fetched.
A file that is there but unusable is a :class:`prunekit.errors.DataError`.

All derive from :class:`prunekit.errors.PrunekitError` and from the built-in exception they
always were, so ``except FileNotFoundError`` / ``except ValueError`` /
``except ConnectionError`` keep working.
"""

from __future__ import annotations

from ..errors import PrunekitError

__all__ = ["ChecksumError", "DatasetNotFoundError", "DownloadError"]


class DatasetNotFoundError(PrunekitError, FileNotFoundError):
    """No dataset in a supported layout at any of the places prunekit looked."""


class ChecksumError(PrunekitError, ValueError):
    """A downloaded file does not have the expected MD5 checksum."""


class DownloadError(PrunekitError, ConnectionError):
    """A download that could not be fetched (typically: no network)."""
