"""The one error a user reads: bad input, named in one line (the CLI exits 2, no traceback).

At the bottom of the package so that every layer can raise it without importing the config.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A user-facing configuration error: one line that names the key and the values."""
