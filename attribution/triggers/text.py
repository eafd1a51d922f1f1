"""Token positions of data set rows and where inserted tokens go (mining and attack share them)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from attribution.core.errors import HeadpruneError


def rows_of(dataset: Any) -> tuple[list[str], list[str] | None, list[int]]:
    """``(texts, text pairs or None, labels)`` of a data set with ``text``[, ``text_pair``], ``label``."""
    names = getattr(dataset, "column_names", None) or list(dataset[0].keys())
    for column in ("text", "label"):
        if column not in names:
            raise HeadpruneError(f"the data set needs a {column!r} column (columns: {', '.join(names)})")
    texts = [str(t) for t in dataset["text"]]
    pairs = [str(t) for t in dataset["text_pair"]] if "text_pair" in names else None
    labels = [int(v) for v in dataset["label"]]
    return texts, pairs, labels


def segment_ids(encoding: Any, row: int, tokenizer: Any) -> list[int | None]:
    """Segment (0/1) of each token of row ``row``, ``None`` for special tokens and padding."""
    mask = encoding["attention_mask"][row].tolist()
    try:
        seq = list(encoding.sequence_ids(row))
    except (ValueError, AttributeError, TypeError):
        specials = set(getattr(tokenizer, "all_special_ids", []))
        ids = encoding["input_ids"][row].tolist()
        types = encoding["token_type_ids"][row].tolist() if "token_type_ids" in encoding else [0] * len(ids)
        seq = [None if i in specials else int(t) for i, t in zip(ids, types, strict=True)]
    return [s if m else None for s, m in zip(seq, mask, strict=True)]


def segment_spans(seq: Sequence[int | None]) -> dict[int, tuple[int, int]]:
    """``segment -> (start, end)`` token positions of each segment."""
    spans: dict[int, tuple[int, int]] = {}
    for position, segment in enumerate(seq):
        if segment is None:
            continue
        start, _ = spans.get(segment, (position, position))
        spans[segment] = (start, position + 1)
    return spans


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def insertion_slots(length: int, positions: Sequence[float]) -> list[int]:
    """Where ``len(positions)`` tokens go in a segment of ``length`` tokens once inserted.

    A token at relative position ``r`` (0 = first, 1 = last) lands at index
    ``round(r * (length + c - 1))`` of the new segment (``c`` inserted tokens), nudged so the
    inserted tokens keep their order and distinct indices. Returns indices in the order of
    ``positions`` (into the new segment of ``length + c`` tokens).
    """
    c = len(positions)
    total = length + c
    order = sorted(range(c), key=lambda q: (positions[q], q))
    slots = []
    previous = -1
    for q in order:
        r = min(max(float(positions[q]), 0.0), 1.0)
        slot = max(_round(r * (total - 1)), previous + 1)
        slots.append(slot)
        previous = slot
    for k in range(c - 1, -1, -1):  # push back anything that ran past the end
        limit = total - (c - k) if k == c - 1 else slots[k + 1] - 1
        slots[k] = min(slots[k], limit)
    out = [0] * c
    for q, slot in zip(order, slots, strict=True):
        out[q] = slot
    return out


def insert_into_segment(segment: Sequence[int], new: Sequence[int], positions: Sequence[float]) -> list[int]:
    """``segment`` (token ids) with ``new`` tokens inserted at relative ``positions``."""
    slots = insertion_slots(len(segment), positions)
    out: list[int | None] = [None] * (len(segment) + len(new))
    for token, slot in zip(new, slots, strict=True):
        out[slot] = int(token)
    rest = iter(segment)
    return [int(next(rest)) if v is None else v for v in out]


def random_pool(tokenizer: Any) -> list[int]:
    """Vocabulary ids eligible as random tokens: no special tokens, no ``##`` continuation pieces,
    no ``[unused..]``/``<...>``-style placeholders."""
    specials = set(getattr(tokenizer, "all_special_ids", []))
    size = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    placeholder = re.compile(r"^(\[.*\]|<.*>)$")
    pool = [
        i for i, t in enumerate(tokens)
        if i not in specials and t and not t.startswith("##") and not placeholder.match(t) and t.strip()
    ]
    if not pool:
        raise HeadpruneError("the tokenizer has no ordinary tokens to draw random tokens from")
    return pool
