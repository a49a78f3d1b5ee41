"""Logging set-up shared by the workflow scripts and the CLI."""

from __future__ import annotations

import logging
import sys
from pathlib import Path


def setup_logging(path: str | Path | None = None, level: int = logging.INFO) -> logging.Logger:
    """Log to a file (a rule's ``log:``) and to stderr; return the ``vectorgeo`` logger."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(path, mode="w"))
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True
    )
    logging.captureWarnings(True)
    return logging.getLogger("vectorgeo")
