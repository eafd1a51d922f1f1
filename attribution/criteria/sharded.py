"""Scores over fixed shards of a data set, dealt out to the processes of a launch: the same bits on
any number of processes.

:func:`score_dataset` splits the rows into one contiguous part per process, so the batches (and
with them float32 rounding) depend on how many processes there are. Here the rows are cut into
shards of ``shard_size`` whatever the launch; shard ``k`` is scored by process ``k % N`` (length-sorted
batches inside the shard, a fresh criterion per shard as the recipe pipeline's score stage does),
the per-shard partial sums (float64) are gathered on the main process and merged in shard order
(:meth:`ScorePartial.merge`). One process and two give identical scores, diagnostics included.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from tqdm.auto import tqdm

from attribution.core import processes
from attribution.core.errors import HeadpruneError
from attribution.criteria.base import Criterion, ScoreAccumulator, ScorePartial, finalize_scores, make_criterion
from attribution.criteria.units import UNITS
from attribution.scores import UnitScores


def score_in_shards(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    criterion: str | Criterion,
    *,
    shard_size: int = 64,
    batch_size: int = 16,
    max_length: int = 64,
    max_examples: int | None = None,
    progress: bool = True,
    unit: str = "head",
    **options: Any,
) -> UnitScores | None:
    """Score ``dataset`` (rows with ``text``[, ``text_pair``], ``label``) on this process's shards.

    Every process of a distributed launch must call it; the main process returns the scores of
    the whole data set (``HeadScores`` ``[L, H]``, or ``NeuronScores`` ``[L, F]`` with
    ``unit="neuron"``), the others None. ``max_examples`` takes the first rows before sharding.
    ``provenance`` records ``shard_size`` (which the float sums depend on), not the number of
    processes (which they do not): one process and several write the same file.
    """
    from attribution.core.data import first_rows, iter_batches

    if shard_size < 1:
        raise HeadpruneError(f"shard_size must be at least 1, got {shard_size}")
    criterion = make_criterion(criterion, unit=unit, **options)
    template = copy.deepcopy(criterion)  # never updated itself: each shard starts from a fresh copy of it
    dataset = first_rows(dataset, max_examples)
    if len(dataset) == 0:
        raise HeadpruneError(f"no examples to score {UNITS[unit].plural} on")
    main = not processes.is_distributed() or processes.is_main_process()
    provenance = {"shard_size": shard_size}  # not the number of processes: the scores do not depend on it
    if not criterion.needs_data:
        return finalize_scores(criterion, model, None, provenance=provenance) if main else None
    count = math.ceil(len(dataset) / shard_size)
    mine = [k for k in range(count) if processes.mine(k)]
    sizes = {k: min(shard_size, len(dataset) - k * shard_size) for k in mine}
    bar = tqdm(
        total=sum(sizes.values()),
        desc=f"scoring {UNITS[unit].plural} ({criterion.name})",
        unit="ex",
        disable=not (progress and main),
    )
    partials: dict[int, ScorePartial] = {}
    for k in mine:
        accumulator = ScoreAccumulator(copy.deepcopy(template), model)
        part = dataset.select(range(k * shard_size, k * shard_size + sizes[k]))
        for batch in iter_batches(part, tokenizer, batch_size=batch_size, max_length=max_length, sort_by_length=True):
            batch.pop("index")
            bar.update(accumulator.update(batch))
        partials[k] = accumulator.partial()
    bar.close()
    everyone = processes.gather_objects(partials)
    if not main:
        return None
    merged: dict[int, ScorePartial] = {k: p for part in everyone for k, p in part.items()}
    return finalize_scores(
        criterion, model, ScorePartial.merge(merged[k] for k in range(count)), provenance=provenance
    )
