"""Adversarial trigger patterns from self-attention attribution (AttAttr §5).

Mining (per correctly classified example, as the authors' ``run_adver_connection.py``):

1. AttAttr of the gold (= predicted) class's probability, every layer;
2. the head with the single largest attribution entry over all layers and heads;
3. that head's ``pairs`` strongest token pairs (query, key) — 2, as the authors — keeping pairs
   scoring at least ``min_ratio`` (0.2, their cut-off) of the strongest;
4. the pattern: the tokens at those positions in sentence order, special tokens removed
   (examples whose pairs touch only special tokens give none); its score is the sum of the pairs'
   attributions; each token remembers its segment and relative position in it
   (0 = first token of the segment, 1 = last).

Patterns with the same class and token sequence are aggregated: ``count`` (frequency),
``score`` (summed), ``max_score``, the mean relative position of each token, and which heads
produced them. Each class's patterns are ranked by summed score (frequency times mean strength),
then count.

Attack: a class-``c`` pattern is inserted into held-out examples whose gold label is not ``c``, at the
same relative positions in the same segment (the originals are truncated first so the inserted
tokens always fit), and the accuracy on those examples is compared before and after. Baseline:
as many random vocabulary tokens (no special tokens, no ``##`` continuation pieces, none of the
pattern's own tokens; drawn per example, ``random_trials`` times, seeded) at the same positions.
Reported per pattern, and per class over its top-k patterns.
"""

from __future__ import annotations

import os
from typing import Any

from attribution.core.errors import HeadpruneError
from attribution.triggers.attack import attack_triggers, insert_pattern
from attribution.triggers.mining import mine_triggers
from attribution.triggers.report import ClassAttack, PatternAttack, TriggerPattern, TriggerReport
from attribution.triggers.text import insert_into_segment, insertion_slots, random_pool

__all__ = [
    "ClassAttack",
    "PatternAttack",
    "TriggerPattern",
    "TriggerReport",
    "attack_triggers",
    "insert_into_segment",
    "insert_pattern",
    "insertion_slots",
    "mine_triggers",
    "random_pool",
    "run_triggers",
]


def run_triggers(
    model: Any,
    tokenizer: Any,
    splits: Any,
    out_path: str | os.PathLike[str] | None,
    *,
    split: str = "train",
    examples: int | None = 500,
    n_steps: int = 20,
    integration: str = "riemann_right",
    pairs: int = 2,
    min_ratio: float = 0.2,
    batch_size: int = 8,
    keep: int = 50,
    internal_batch_size: int | None = None,
    attack: bool = False,
    attack_split: str = "validation",
    attack_examples: int | None = None,
    top_k: int = 5,
    random_trials: int = 3,
    patterns: str | os.PathLike[str] | None = None,
    max_length: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> TriggerReport:
    """Mine patterns from ``splits[split]`` (or reuse those of the report saved at ``patterns``),
    optionally attack ``splits[attack_split]``, and save the ``TriggerReport`` to ``out_path``
    (atomically; not saved when ``None``); returns it.

    ``splits``: a ``DatasetDict`` from ``attribution.core.data.load_splits``; its class names must
    be the model's classes (and those of a reused report). The mining options are
    ``mine_triggers``'s, the attack options ``attack_triggers``'s; ``max_length`` and ``seed``
    serve both.
    """
    from attribution.core.data import label_names as data_label_names

    names = data_label_names(splits)
    classes = int(model.config.num_labels)
    if classes != len(names):
        raise HeadpruneError(f"the model has {classes} classes but the data set has {len(names)}: {', '.join(names)}")
    if patterns is not None:
        report = TriggerReport.load(patterns)
        if report.label_names != names:
            raise HeadpruneError(f"{patterns} was mined for classes {report.label_names}, the data has {names}")
    else:
        report = mine_triggers(
            model,
            tokenizer,
            splits[split],
            examples=examples,
            n_steps=n_steps,
            integration=integration,
            pairs=pairs,
            min_ratio=min_ratio,
            batch_size=batch_size,
            max_length=max_length,
            keep=keep,
            seed=seed,
            label_names=names,
            internal_batch_size=internal_batch_size,
            progress=progress,
        )
        report.provenance["data_split"] = split
    if attack:
        report = attack_triggers(
            model,
            tokenizer,
            report,
            splits[attack_split],
            top_k=top_k,
            examples=attack_examples,
            random_trials=random_trials,
            max_length=max_length,
            seed=seed,
            progress=progress,
        )
        report.provenance["attack"]["split"] = attack_split
    if out_path is not None:
        report.save(out_path)
    return report
