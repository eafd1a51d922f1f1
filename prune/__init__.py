"""headprune's acting side: mask or remove heads, repair, evaluate, export, run recipes, the CLI.

The pruning entry points are importable from here (loaded lazily, so ``import prune`` stays cheap):
``mask_heads``, ``unmask_heads``, ``remove_heads``, ``bake_mask``, ``save_pruned``, ``load_pruned``,
``select_heads``, ``iterative_pruning``. Repair and evaluation live in ``prune.repair`` and
``prune.evaluate`` (modules of those names, so no same-named functions are exported here).
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "mask_heads": "prune.masking",
    "unmask_heads": "prune.masking",
    "remove_heads": "prune.surgery",
    "bake_mask": "prune.surgery",
    "save_pruned": "prune.surgery",
    "load_pruned": "prune.surgery",
    "select_heads": "prune.strategies",
    "iterative_pruning": "prune.strategies",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'prune' has no attribute {name!r}")


__all__ = list(_EXPORTS)
