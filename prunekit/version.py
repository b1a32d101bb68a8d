"""The prunekit release number, in a module of its own so that code inside the package can
read it (saved specs record it) without importing the package root. Imports nothing."""

__version__ = "0.1.0"
