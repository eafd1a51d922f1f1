"""headprune's foundation: the plumbing both layers share.

``errors`` (the one user-facing exception), ``io`` (atomic writes and typed JSON records),
``inputs`` (tokenizer batches, targets, inference mode), ``data`` (data sets and batches),
``predict`` (the one batched predictor), ``processes`` (one process or many, through Accelerate),
``cache`` (where headprune keeps what it trains) and ``log`` (headprune's logger).

The rule that keeps the layers honest: nothing in ``attribution.core`` imports the rest of
``attribution`` or anything of ``prune`` (``tests/test_layers.py`` checks it).
"""
