"""The one batched predictor: logits for every row of a data set, in data set order."""

from __future__ import annotations

import math
from typing import Any

import torch
from tqdm.auto import tqdm

from attribution.core import processes
from attribution.core.data import iter_batches, restore_order
from attribution.core.errors import HeadpruneError


@torch.no_grad()
def predict_logits(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    *,
    batch_size: int = 64,
    max_length: int = 64,
    progress: bool = False,
    desc: str = "predicting",
    sharded: bool = False,
) -> torch.Tensor:
    """Logits ``[N, C]`` (float32, CPU) for every row of ``dataset`` in dataset order.

    Rows are batched by token length (less padding), then put back in order. ``sharded=True``
    splits the rows across the processes of a multi-process launch: each predicts its contiguous
    shard on its own device and the logits are gathered, so every process returns all ``N`` rows,
    each computed exactly once. The model is returned to its device and train/eval mode afterwards.
    """
    if len(dataset) == 0:
        raise HeadpruneError("cannot predict on an empty data set")
    was_training = model.training
    home = next(model.parameters()).device
    model.eval()
    dev = processes.device() if sharded else home
    model.to(dev)
    part = processes.shard(dataset) if sharded else dataset
    logits, index = [], []
    bar = tqdm(
        total=math.ceil(len(part) / batch_size),
        desc=desc,
        leave=False,
        disable=not (progress and (not sharded or processes.is_main_process())),
    )
    try:
        for batch in iter_batches(part, tokenizer, batch_size=batch_size, max_length=max_length, sort_by_length=True):
            index.append(batch.pop("index"))
            batch.pop("labels", None)
            logits.append(model(**{k: v.to(dev) for k, v in batch.items()}).logits.float().cpu())
            bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
        model.to(home)
    classes = int(model.config.num_labels)
    local = restore_order(torch.cat(logits), torch.cat(index)) if logits else torch.zeros(0, classes)
    return processes.gather_rows(local) if sharded else local
