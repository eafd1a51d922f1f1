"""headprune's logger. Library code logs to ``logging.getLogger("headprune")`` (or a child) and
never installs handlers; the CLI attaches one (``--quiet`` raises its level)."""

from __future__ import annotations

import logging

logger = logging.getLogger("headprune")


def get_logger(name: str = "") -> logging.Logger:
    """``headprune`` or its child ``headprune.<name>``."""
    return logger.getChild(name) if name else logger
