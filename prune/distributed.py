"""Running evaluation and head scoring on one process or many, through Accelerate.

Launch any headprune code with ``accelerate launch --num_processes N ...`` (or ``torchrun``) and
the functions here split the data between the processes and put the results back together:

- ``shard_bounds`` / ``shard``: contiguous shards whose sizes differ by at most one, so no example
  is duplicated or dropped at uneven sizes (Accelerate's own data loaders pad the last batch by
  repeating examples; we do not use them).
- ``gather_rows``: concatenate every process's rows in process order — that is dataset order,
  because the shards are contiguous — padding for the collective and trimming the padding after.
- ``reduce``: the ``reduce`` hook of ``attribution.head_importance``: sums ``(sum [L, H], count)``
  over processes, so every process ends with the scores of the whole data set.

On a single process every function is the identity, so the same code runs anywhere.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel

from attribution.core import processes
from attribution.core.errors import HeadpruneError
from attribution.scores import HeadScores


def head_importance(
    model: PreTrainedModel,
    tokenizer: Any,
    dataset: Any,
    method: str = "attattr",
    /,  # positional-only: attattr's own ``method`` option (quadrature rule) goes through **options
    *,
    batch_size: int = 16,
    max_length: int = 64,
    max_examples: int | None = None,
    progress: bool = True,
    **options: Any,
) -> HeadScores:
    """``attribution.head_importance`` over ``dataset`` (rows with ``text``[, ``text_pair``],
    ``label``), sharded across processes and reduced: every process returns the same
    ``HeadScores`` as a single process would (up to float summation order).

    ``max_examples`` takes the first rows of ``dataset`` before sharding.
    """
    from attribution.core.data import iter_batches
    from attribution.importance import head_importance as score

    if max_examples is not None:
        if max_examples < 1:
            raise HeadpruneError(f"max_examples must be positive, got {max_examples}")
        dataset = dataset.select(range(min(max_examples, len(dataset))))
    if len(dataset) == 0:
        raise HeadpruneError("no examples to score heads on")
    home = next(model.parameters()).device
    model.to(processes.device())
    part = processes.shard(dataset)

    def batches():
        for batch in iter_batches(part, tokenizer, batch_size=batch_size, max_length=max_length):
            batch.pop("index")
            yield batch

    scores = score(
        model,
        batches(),
        method,
        progress=progress and processes.is_main_process(),
        reduce=processes.reduce,
        total=len(part),
        **options,
    )
    model.to(home)
    scores.provenance["processes"] = processes.num_processes()
    return scores
