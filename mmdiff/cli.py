"""`mmdiff` (and `python -m mmdiff.cli`): the command line; the commands live in `mmdiff.commands`."""

from __future__ import annotations

import sys

from .commands import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
