"""Attacking with trigger patterns: each class's top patterns inserted into held-out rows of the
other classes, against random tokens at the same positions (see :mod:`attribution.triggers`)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from attribution.core.errors import HeadpruneError
from attribution.triggers.report import ClassAttack, PatternAttack, TriggerPattern, TriggerReport
from attribution.triggers.text import insert_into_segment, random_pool, rows_of, segment_ids, segment_spans


@torch.inference_mode()
def _predict_ids(
    model: Any, rows: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int, use_types: bool
) -> np.ndarray:
    """Predicted class of each ``(input_ids, token_type_ids)`` row (padded per batch; rows of similar
    length are batched together to cut padding, results in the original order)."""
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda r: (len(rows[r][0]), r))
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = [rows[r] for r in order[start : start + batch_size]]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        types = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (row_ids, row_types) in enumerate(chunk):
            ids[r, : len(row_ids)] = torch.tensor(row_ids)
            mask[r, : len(row_ids)] = 1
            types[r, : len(row_types)] = torch.tensor(row_types)
        batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        if use_types:
            batch["token_type_ids"] = types.to(device)
        out.append(model(**batch).logits.argmax(dim=-1).cpu())
    if not out:
        return np.zeros(0, dtype=np.int64)
    predicted = np.empty(len(rows), dtype=np.int64)
    predicted[order] = torch.cat(out).numpy()
    return predicted


def attack_triggers(
    model: Any,
    tokenizer: Any,
    report: TriggerReport,
    dataset: Any,
    *,
    top_k: int = 5,
    examples: int | None = None,
    random_trials: int = 3,
    batch_size: int = 64,
    max_length: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> TriggerReport:
    """Insert each class's top-``top_k`` patterns into held-out examples of the other classes.

    Args:
        report: from ``mine_triggers`` (not modified; a copy with the attack is returned).
        dataset: held-out rows (``text``[, ``text_pair``], ``label``), e.g. the validation split.
        examples: a seeded random sample of this many rows (``None``: all).
        random_trials: random-token draws per pattern (the baseline is their mean).

    Returns:
        a new ``TriggerReport`` with ``attacks`` (per pattern) and ``class_attacks`` (per class).
    """
    from tqdm.auto import tqdm

    if top_k < 1 or random_trials < 1 or batch_size < 1:
        raise HeadpruneError("top_k, random_trials and batch_size must be positive")
    texts, text_pairs, labels = rows_of(dataset)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(texts))
    if examples is not None:
        if examples < 1:
            raise HeadpruneError(f"examples must be at least 1, got {examples}")
        order = order[:examples]
    rows = [int(r) for r in order]
    if not rows:
        raise HeadpruneError("cannot attack: the held-out data set is empty")
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    pool = np.array(random_pool(tokenizer))
    use_types = "token_type_ids" in getattr(tokenizer, "model_input_names", ["token_type_ids"])

    encoded_cache: dict[int, list[tuple[list[int], list[int], list[int | None]]]] = {}
    before_cache: dict[int, np.ndarray] = {}

    def encoded(extra: int) -> list[tuple[list[int], list[int], list[int | None]]]:
        # truncate the originals so `extra` inserted tokens always fit in max_length
        if extra not in encoded_cache:
            limit = max_length - extra
            if limit < 3:
                raise HeadpruneError(f"max_length {max_length} leaves no room for a {extra}-token pattern")
            out = []
            for start in range(0, len(rows), 256):
                chunk = rows[start : start + 256]
                enc = tokenizer(
                    [texts[r] for r in chunk],
                    [text_pairs[r] for r in chunk] if text_pairs is not None else None,
                    truncation=True, max_length=limit, padding=True, return_tensors="pt",
                )
                for k in range(len(chunk)):
                    n = int(enc["attention_mask"][k].sum())
                    ids = enc["input_ids"][k, :n].tolist()
                    types = enc["token_type_ids"][k, :n].tolist() if "token_type_ids" in enc else [0] * n
                    out.append((ids, types, segment_ids(enc, k, tokenizer)[:n]))
            encoded_cache[extra] = out
            before_cache[extra] = _predict_ids(model, [(i, t) for i, t, _ in out], pad_id, batch_size, use_types)
        return encoded_cache[extra]

    gold = np.array([labels[r] for r in rows])
    attacks: list[PatternAttack] = []
    class_attacks: list[ClassAttack] = []
    jobs = [
        (label, rank, p) for label in range(len(report.patterns)) for rank, p in enumerate(report.top(label, top_k), 1)
    ]
    was_training = model.training
    model.eval()
    try:
        for label, rank, pattern in tqdm(jobs, desc="attacking", disable=not progress):
            targets = [k for k in range(len(rows)) if gold[k] != label]
            if not targets:
                continue
            base = encoded(len(pattern.token_ids))
            before = before_cache[len(pattern.token_ids)][targets]
            inserted = [insert_pattern(base[k], pattern.token_ids, pattern) for k in targets]
            after = _predict_ids(model, inserted, pad_id, batch_size, use_types)
            own = np.isin(pool, pattern.token_ids)
            choices = pool[~own] if (~own).any() else pool
            trial_rng = np.random.default_rng([seed, label, rank])
            random_acc, random_flip = [], []
            for _ in range(random_trials):
                draws = trial_rng.choice(choices, size=(len(targets), len(pattern.token_ids)))
                noisy = [insert_pattern(base[k], draws[q].tolist(), pattern) for q, k in enumerate(targets)]
                predicted = _predict_ids(model, noisy, pad_id, batch_size, use_types)
                random_acc.append(float((predicted == gold[targets]).mean()))
                random_flip.append(float((predicted == label).mean()))
            attacks.append(
                PatternAttack(
                    label=label,
                    rank=rank,
                    tokens=list(pattern.tokens),
                    examples=len(targets),
                    accuracy_before=float((before == gold[targets]).mean()),
                    accuracy_after=float((after == gold[targets]).mean()),
                    accuracy_random=float(np.mean(random_acc)),
                    flip_rate=float((after == label).mean()),
                    random_flip_rate=float(np.mean(random_flip)),
                )
            )
    finally:
        model.train(was_training)
    for label in range(len(report.patterns)):
        mine = [a for a in attacks if a.label == label]
        if not mine:
            continue
        best = max(mine, key=lambda a: (a.drop, -a.rank))
        class_attacks.append(
            ClassAttack(
                label=label,
                patterns=len(mine),
                examples=mine[0].examples,
                accuracy_before=float(np.mean([a.accuracy_before for a in mine])),
                mean_drop=float(np.mean([a.drop for a in mine])),
                mean_random_drop=float(np.mean([a.random_drop for a in mine])),
                best_drop=best.drop,
                best_random_drop=best.random_drop,
                mean_flip_rate=float(np.mean([a.flip_rate for a in mine])),
                mean_random_flip_rate=float(np.mean([a.random_flip_rate for a in mine])),
            )
        )
    provenance = dict(report.provenance)
    provenance["attack"] = {
        "top_k": top_k,
        "examples": len(rows),
        "random_trials": random_trials,
        "max_length": max_length,
        "seed": seed,
        "baseline": "random vocabulary tokens (no specials, no ## pieces, not the pattern's tokens), same positions",
    }
    return TriggerReport(
        label_names=list(report.label_names),
        patterns=report.patterns,
        stats=dict(report.stats),
        attacks=attacks,
        class_attacks=class_attacks,
        provenance=provenance,
    )


def insert_pattern(
    example: tuple[list[int], list[int], list[int | None]], tokens: Sequence[int], pattern: TriggerPattern
) -> tuple[list[int], list[int]]:
    """``(input_ids, token_type_ids)`` of one encoded example with ``tokens`` placed as ``pattern``'s."""
    ids, types, seq = example
    spans = segment_spans(seq)
    if not spans:
        return list(ids), list(types)
    by_segment: dict[int, list[int]] = defaultdict(list)
    for q, segment in enumerate(pattern.segments):
        # a segment missing from this example (a pair pattern on a single text): use the first one
        by_segment[segment if segment in spans else min(spans)].append(q)
    out_ids, out_types = list(ids), list(types)
    for segment in sorted(by_segment, key=lambda s: -spans[s][0]):  # right to left: spans stay valid
        start, end = spans[segment]
        qs = by_segment[segment]
        new_segment = insert_into_segment(
            out_ids[start:end], [tokens[q] for q in qs], [pattern.positions[q] for q in qs]
        )
        segment_type = out_types[start]
        out_ids[start:end] = new_segment
        out_types[start:end] = [segment_type] * len(new_segment)
    return out_ids, out_types
