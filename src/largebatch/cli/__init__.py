"""The ``largebatch`` command: one registry of sub-commands (``largebatch.cli.main``)."""
from largebatch.cli.main import main

__all__ = ["main"]
