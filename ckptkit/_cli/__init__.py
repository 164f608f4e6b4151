"""The ``ckptkit`` command line (``python -m ckptkit``): ls, show, verify, prune, pin, unpin, plot."""

from __future__ import annotations

from ckptkit._cli._main import build_parser, main

__all__ = ["build_parser", "main"]
