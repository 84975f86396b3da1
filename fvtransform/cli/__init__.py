"""Command line interface."""

from fvtransform.cli._main import main

__all__ = ["main"]
