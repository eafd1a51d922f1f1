"""The opt-in modeling file of a pruned checkpoint, and how headprune recognises its own.

A pruned checkpoint saved with ``remote_code=True`` carries ``modeling_headprune.py`` (the module
``prune.modeling_headprune``, copied unchanged: plain torch + transformers code) and, in its
``config.json``, ``auto_map = {"AutoModelForSequenceClassification":
"modeling_headprune.Headpruned<Family>ForSequenceClassification"}``, so that
``AutoModelForSequenceClassification.from_pretrained(dir, trust_remote_code=True)`` (and
``transformers.pipeline(model=dir, trust_remote_code=True)``) load it without headprune.

Off by default: loading a checkpoint with ``trust_remote_code=True`` executes the Python file in
it, which is a security decision for the user, not for headprune.

headprune's own loader (``prune.checkpoints.load_model``) never executes that file: it rebuilds a
pruned checkpoint with its own code. :func:`is_headprune_remote_code` tells a checkpoint whose
``auto_map`` is exactly the one written here (safe for headprune to load without trusting remote
code) from one that would need third-party code.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from attribution.core.errors import HeadpruneError
from prune import modeling_headprune
from prune.surgery import KEPT_HEADS_KEY, KEPT_NEURONS_KEY

MODELING_FILE = "modeling_headprune.py"
AUTO_CLASS = "AutoModelForSequenceClassification"
AUTO_MAP_KEY = "auto_map"

__all__ = ["AUTO_CLASS", "AUTO_MAP_KEY", "MODELING_FILE", "auto_map", "is_headprune_remote_code", "write_modeling_file"]


def auto_map(model_type: str) -> dict[str, str]:
    """The ``auto_map`` entry of a pruned checkpoint of ``model_type`` carrying the modeling file."""
    cls = modeling_headprune.CLASSES.get(model_type)
    if cls is None:
        raise HeadpruneError(
            f"model type {model_type!r} has no headprune modeling file; "
            f"supported: {', '.join(modeling_headprune.CLASSES)}"
        )
    return {AUTO_CLASS: f"{Path(MODELING_FILE).stem}.{cls.__name__}"}


def is_headprune_remote_code(config: Mapping[str, Any]) -> bool:
    """True when a ``config.json`` (as a dict) carries headprune's own ``auto_map`` and nothing
    else: a pruned checkpoint (``headprune_kept_heads`` or ``headprune_kept_neurons`` recorded)
    whose ``auto_map`` is exactly the one :func:`auto_map` writes for its ``model_type``.

    headprune loads such a checkpoint with its own code and never imports the file the
    ``auto_map`` names, so it needs no ``trust_remote_code``; any other ``auto_map`` does.
    """
    mapping = config.get(AUTO_MAP_KEY)
    if not isinstance(mapping, Mapping) or not (KEPT_HEADS_KEY in config or KEPT_NEURONS_KEY in config):
        return False
    model_type = config.get("model_type")
    if model_type not in modeling_headprune.CLASSES:
        return False
    return dict(mapping) == auto_map(str(model_type))


def write_modeling_file(directory: str | Path) -> Path:
    """Copy ``modeling_headprune.py`` into ``directory`` (a checkpoint being written); returns its path."""
    target = Path(directory) / MODELING_FILE
    shutil.copyfile(Path(modeling_headprune.__file__), target)
    return target
