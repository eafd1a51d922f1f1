"""headprune's acting side: mask or remove heads, repair, evaluate, export, run recipes, the CLI.

The entry points are importable from here (loaded lazily, so ``import prune`` stays cheap):
``load_model`` (the one loader: ``"default"``, ``"minilm"``, dense or pruned directories, hub ids)
and ``save_pruned``; ``mask_heads``, ``unmask_heads``, ``remove_heads``, ``bake_mask``,
``select_heads``, ``iterative_pruning``. Repair and evaluation live in ``prune.repair`` and
``prune.evaluate`` (modules of those names, so no same-named functions are exported here).
"""

from __future__ import annotations

from attribution.core.exports import lazy_exports

_EXPORTS = {
    "mask_heads": "prune.masking",
    "unmask_heads": "prune.masking",
    "remove_heads": "prune.surgery",
    "bake_mask": "prune.surgery",
    "load_model": "prune.checkpoints",
    "save_pruned": "prune.checkpoints",
    "select_heads": "prune.strategies",
    "iterative_pruning": "prune.strategies",
}


__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
