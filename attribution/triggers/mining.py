"""Mining trigger patterns per class (see :mod:`attribution.triggers`)."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from attribution.core.errors import HeadpruneError
from attribution.core.inputs import inference_setup
from attribution.core.inputs import label_names as model_label_names
from attribution.triggers.report import TriggerPattern, TriggerReport
from attribution.triggers.text import rows_of, segment_ids, segment_spans

MAX_SOURCE_EXAMPLES = 20  # source rows remembered per pattern


def _label_names(model: Any, given: Sequence[str] | None) -> list[str]:
    """``given`` (checked to name every class of the model), else the model's own class names."""
    names = model_label_names(model)
    if given is None:
        return names
    given = [str(n) for n in given]
    if len(given) < len(names):
        raise HeadpruneError(f"{len(given)} label names for a model with {len(names)} classes")
    return given


def mine_triggers(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    *,
    examples: int | None = 500,
    n_steps: int = 20,
    integration: str = "riemann_right",
    pairs: int = 2,
    min_ratio: float = 0.2,
    batch_size: int = 8,
    max_length: int = 64,
    keep: int = 50,
    seed: int = 0,
    label_names: Sequence[str] | None = None,
    internal_batch_size: int | None = None,
    progress: bool = True,
) -> TriggerReport:
    """Mine trigger patterns per class from correctly classified examples of ``dataset``.

    Args:
        dataset: rows with ``text`` (str), optional ``text_pair`` and ``label`` (int), e.g. a split
            of ``attribution.core.data.load_splits``.
        examples: how many rows to look at (a seeded random sample; ``None``: all).
        n_steps, integration: AttAttr quadrature (the authors: Riemann, 64 steps; ``gausslegendre``
            with 4-6 nodes is more exact and much faster).
        pairs: strongest token pairs taken from the top head; ``min_ratio``: pairs below this share
            of the strongest are dropped.
        batch_size: examples attributed together.
        keep: patterns kept per class (the rest are counted in ``stats`` only).
    """
    from tqdm.auto import tqdm

    from attribution.attattr import AttAttr

    if pairs < 1:
        raise HeadpruneError(f"pairs must be at least 1, got {pairs}")
    if not 0.0 <= min_ratio <= 1.0:
        raise HeadpruneError(f"min_ratio must lie in [0, 1], got {min_ratio}")
    if batch_size < 1 or keep < 1:
        raise HeadpruneError("batch_size and keep must be positive")
    texts, text_pairs, labels = rows_of(dataset)
    if not texts:
        raise HeadpruneError("cannot mine triggers from an empty data set")
    names = _label_names(model, label_names)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(texts))
    if examples is not None:
        if examples < 1:
            raise HeadpruneError(f"examples must be at least 1, got {examples}")
        order = order[:examples]
    specials = set(getattr(tokenizer, "all_special_ids", []))
    attattr = AttAttr(model, output="probability")
    device = next(model.parameters()).device

    found: dict[tuple[int, tuple[int, ...]], dict[str, Any]] = {}
    stats = Counter()
    per_class = defaultdict(Counter)
    bar = tqdm(total=len(order), desc="mining triggers", disable=not progress)
    for start in range(0, len(order), batch_size):
        rows = [int(r) for r in order[start : start + batch_size]]
        encoding = tokenizer(
            [texts[r] for r in rows],
            [text_pairs[r] for r in rows] if text_pairs is not None else None,
            truncation=True, max_length=max_length, padding=True, return_tensors="pt",
        )
        batch = {k: v for k, v in encoding.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        gold = torch.tensor([labels[r] for r in rows])
        with inference_setup(model), torch.no_grad():
            predicted = model(**{k: v.to(device) for k, v in batch.items()}).logits.argmax(-1).cpu()
        correct = (predicted == gold).nonzero().flatten().tolist()
        stats["examples"] += len(rows)
        stats["correct"] += len(correct)
        for r in rows:
            per_class[labels[r]]["examples"] += 1
        if correct:
            sub = {k: v[correct] for k, v in batch.items()}
            best_value = torch.full((len(correct),), -math.inf)
            best_head = [(0, 0)] * len(correct)
            best_matrix = [None] * len(correct)
            for result in attattr.iter_layers(
                sub,
                target=gold[correct],
                n_steps=n_steps,
                integration=integration,
                internal_batch_size=internal_batch_size,
            ):
                attributions = result.attributions.cpu()  # [b, H, T, T]
                b, heads, seq, _ = attributions.shape
                flat = attributions.view(b, heads * seq * seq)
                values, where = flat.max(dim=1)
                for k in range(b):
                    if float(values[k]) > float(best_value[k]):
                        head = int(where[k]) // (seq * seq)
                        best_value[k] = values[k]
                        best_head[k] = (result.layer, head)
                        best_matrix[k] = attributions[k, head].clone()
            for k, row_in_batch in enumerate(correct):
                row = rows[row_in_batch]
                per_class[labels[row]]["correct"] += 1
                pattern = _pattern_of(
                    best_matrix[k], encoding, row_in_batch, tokenizer, specials, pairs, min_ratio
                )
                if pattern is None:
                    stats["only_special"] += 1
                    continue
                ids, segs, rels, score = pattern
                stats["with_pattern"] += 1
                per_class[labels[row]]["with_pattern"] += 1
                entry = found.setdefault(
                    (labels[row], tuple(ids)),
                    {"count": 0, "score": 0.0, "max": -math.inf, "segs": [Counter() for _ in ids],
                     "rels": [0.0] * len(ids), "heads": Counter(), "examples": []},
                )
                entry["count"] += 1
                entry["score"] += score
                entry["max"] = max(entry["max"], score)
                for q, (s, rel) in enumerate(zip(segs, rels, strict=True)):
                    entry["segs"][q][s] += 1
                    entry["rels"][q] += rel
                entry["heads"][f"{best_head[k][0]}.{best_head[k][1]}"] += 1
                if len(entry["examples"]) < MAX_SOURCE_EXAMPLES:
                    entry["examples"].append(row)
        bar.update(len(rows))
    bar.close()

    patterns: list[list[TriggerPattern]] = [[] for _ in names]
    for (label, ids), entry in found.items():
        if not 0 <= label < len(names):
            raise HeadpruneError(f"label {label} outside the model's {len(names)} classes")
        patterns[label].append(
            TriggerPattern(
                label=label,
                tokens=list(tokenizer.convert_ids_to_tokens(list(ids))),
                token_ids=list(ids),
                segments=[int(c.most_common(1)[0][0]) for c in entry["segs"]],
                positions=[r / entry["count"] for r in entry["rels"]],
                count=entry["count"],
                score=float(entry["score"]),
                max_score=float(entry["max"]),
                heads=dict(entry["heads"].most_common()),
                examples=entry["examples"],
            )
        )
    for label in range(len(names)):
        per_class[label]["patterns"] = len(patterns[label])
        patterns[label].sort(key=lambda p: (-p.score, -p.count, p.token_ids))
        patterns[label] = patterns[label][:keep]
    stats_out: dict[str, Any] = {k: int(v) for k, v in stats.items()}
    stats_out.setdefault("with_pattern", 0)
    stats_out.setdefault("only_special", 0)
    stats_out["per_class"] = {names[c]: dict(per_class[c]) for c in sorted(per_class)}
    provenance = {
        "model": str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")),
        "n_steps": n_steps,
        "integration": integration,
        "output": "probability",
        "target": "gold (= predicted: correctly classified examples only)",
        "pairs": pairs,
        "min_ratio": min_ratio,
        "max_length": max_length,
        "examples": None if examples is None else int(examples),
        "seed": seed,
        "rank_by": "summed score, then count",
    }
    return TriggerReport(label_names=names, patterns=patterns, stats=stats_out, provenance=provenance)


def _pattern_of(
    matrix: torch.Tensor | None,
    encoding: Any,
    row: int,
    tokenizer: Any,
    specials: set[int],
    pairs: int,
    min_ratio: float,
) -> tuple[list[int], list[int], list[float], float] | None:
    """Token ids, segments, relative positions and score of one example's pattern (or None)."""
    if matrix is None:
        return None
    seq = segment_ids(encoding, row, tokenizer)
    n = int(encoding["attention_mask"][row].sum())
    ids = encoding["input_ids"][row].tolist()
    scores = matrix[:n, :n].flatten()
    top_values, top_index = scores.topk(min(pairs, scores.numel()))
    strongest = float(top_values[0])
    if strongest <= 0:
        return None
    chosen = [
        (float(v), int(i)) for v, i in zip(top_values, top_index, strict=True) if float(v) >= min_ratio * strongest
    ]
    positions = sorted({p for _, i in chosen for p in (i // n, i % n)})
    positions = [p for p in positions if seq[p] is not None and ids[p] not in specials]
    if not positions:
        return None
    spans = segment_spans(seq)
    segs, rels = [], []
    for p in positions:
        start, end = spans[seq[p]]
        segs.append(int(seq[p]))
        rels.append((p - start) / max(end - start - 1, 1))
    return [ids[p] for p in positions], segs, rels, sum(v for v, _ in chosen)
