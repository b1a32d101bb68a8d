"""The error family: every error prunekit raises on purpose derives from :class:`PrunekitError`.

Each subclass also derives from the built-in exception a caller would expect (``ValueError``
for bad values, ``FileNotFoundError`` for missing files, ...), so ``except ValueError`` keeps
working. The ``prunekit`` command prints a PrunekitError's message without a traceback and
exits with code 2; any other exception is a bug and keeps its traceback.

This module imports nothing from prunekit: it sits at the bottom of the import graph.
"""
from __future__ import annotations

__all__ = ["ConfigError", "DataError", "PrunekitError"]


class PrunekitError(Exception):
    """Base of every error prunekit raises on purpose. The message says what was wrong and
    what to do about it."""


class ConfigError(PrunekitError, ValueError):
    """An option, flag or configuration value that cannot be used as given."""


class DataError(PrunekitError, ValueError):
    """A dataset or data file that cannot be used as it is (wrong dtype, range, lengths)."""
