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

import json
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attribution.core.errors import HeadpruneError
from attribution.core.io import atomic_write_text

FORMAT_VERSION = 1
MAX_SOURCE_EXAMPLES = 20  # source rows remembered per pattern


@dataclass
class TriggerPattern:
    """A token pattern mined for class ``label``, aggregated over the examples that produced it.

    ``segments[k]``/``positions[k]``: segment (0/1) and mean relative position (0..1) of token k.
    ``score``: summed attribution over its ``count`` occurrences; ``heads``: ``"layer.head"``
    (0-based) -> occurrences; ``examples``: source row indices (at most 20).
    """

    label: int
    tokens: list[str]
    token_ids: list[int]
    segments: list[int]
    positions: list[float]
    count: int
    score: float
    max_score: float
    heads: dict[str, int] = field(default_factory=dict)
    examples: list[int] = field(default_factory=list)

    @property
    def mean_score(self) -> float:
        return self.score / max(self.count, 1)

    @property
    def text(self) -> str:
        return " ".join(self.tokens)


@dataclass
class PatternAttack:
    """One pattern inserted into ``examples`` held-out examples of the other classes.

    Accuracies are on those examples: unmodified (``accuracy_before``, same truncation), with the
    pattern (``accuracy_after``) and with random tokens at the same positions (``accuracy_random``,
    mean over trials). ``flip_rate``/``random_flip_rate``: share now predicted as ``label``.
    """

    label: int
    rank: int
    tokens: list[str]
    examples: int
    accuracy_before: float
    accuracy_after: float
    accuracy_random: float
    flip_rate: float
    random_flip_rate: float

    @property
    def drop(self) -> float:
        return self.accuracy_before - self.accuracy_after

    @property
    def random_drop(self) -> float:
        return self.accuracy_before - self.accuracy_random


@dataclass
class ClassAttack:
    """A class's top-``patterns`` patterns: mean and best accuracy drop, with the random baseline."""

    label: int
    patterns: int
    examples: int
    accuracy_before: float
    mean_drop: float
    mean_random_drop: float
    best_drop: float
    best_random_drop: float
    mean_flip_rate: float
    mean_random_flip_rate: float


@dataclass
class TriggerReport:
    """Mined patterns per class (ranked) and, after ``attack_triggers``, the attack's numbers."""

    label_names: list[str]
    patterns: list[list[TriggerPattern]]
    stats: dict[str, Any] = field(default_factory=dict)
    attacks: list[PatternAttack] = field(default_factory=list)
    class_attacks: list[ClassAttack] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    def top(self, label: int, k: int = 5) -> list[TriggerPattern]:
        """The ``k`` best patterns of class ``label``."""
        if not 0 <= label < len(self.patterns):
            raise HeadpruneError(f"label {label} outside 0..{len(self.patterns) - 1}")
        return self.patterns[label][:k]

    # ---- serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "headprune.trigger_report",
            "version": FORMAT_VERSION,
            "label_names": self.label_names,
            "patterns": {
                name: [asdict(p) | {"mean_score": p.mean_score} for p in pats]
                for name, pats in zip(self.label_names, self.patterns, strict=True)
            },
            "stats": self.stats,
            "attacks": [asdict(a) | {"drop": a.drop, "random_drop": a.random_drop} for a in self.attacks],
            "class_attacks": [asdict(c) for c in self.class_attacks],
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TriggerReport:
        if data.get("format") != "headprune.trigger_report":
            raise HeadpruneError("not a headprune trigger report (missing format marker)")
        if int(data.get("version", 0)) > FORMAT_VERSION:
            raise HeadpruneError(f"trigger report format {data['version']} is newer than this headprune")
        names = list(data["label_names"])

        def strip(d: dict[str, Any], *keys: str) -> dict[str, Any]:
            return {k: v for k, v in d.items() if k not in keys}

        return cls(
            label_names=names,
            patterns=[[TriggerPattern(**strip(p, "mean_score")) for p in data["patterns"].get(n, [])] for n in names],
            stats=dict(data.get("stats", {})),
            attacks=[PatternAttack(**strip(a, "drop", "random_drop")) for a in data.get("attacks", [])],
            class_attacks=[ClassAttack(**c) for c in data.get("class_attacks", [])],
            provenance=dict(data.get("provenance", {})),
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write JSON atomically."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TriggerReport:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise HeadpruneError(f"trigger report not found: {path}") from None
        except json.JSONDecodeError as error:
            raise HeadpruneError(f"{path} is not valid JSON: {error}") from None
        return cls.from_dict(data)

    def summary(self, k: int = 5) -> str:
        """Tables for a terminal: top-``k`` patterns per class, then the attack."""
        lines = []
        s = self.stats
        if s:
            lines.append(
                f"mined {s.get('examples', '?')} examples: {s.get('correct', '?')} correctly classified, "
                f"{s.get('with_pattern', '?')} gave a pattern ({s.get('only_special', 0)} only special tokens)"
            )
        for label, name in enumerate(self.label_names):
            lines.append(f"class {name}: {len(self.patterns[label])} patterns")
            for rank, p in enumerate(self.top(label, k), 1):
                lines.append(
                    f"  {rank}. {p.text:<30} count {p.count:>4}  score {p.score:8.4f}  mean {p.mean_score:.4f}"
                )
        if self.attacks:
            lines.append("attack (accuracy on held-out examples of the other classes):")
            lines.append(f"  {'class':<10} {'rank':>4} {'pattern':<30} {'n':>5} {'before':>7} {'after':>7} "
                         f"{'random':>7} {'drop':>7} {'rnd drop':>8}")
            for a in self.attacks:
                lines.append(
                    f"  {self.label_names[a.label]:<10} {a.rank:>4} {' '.join(a.tokens):<30} {a.examples:>5} "
                    f"{a.accuracy_before:7.3f} {a.accuracy_after:7.3f} {a.accuracy_random:7.3f} "
                    f"{a.drop:7.3f} {a.random_drop:8.3f}"
                )
        for c in self.class_attacks:
            lines.append(
                f"class {self.label_names[c.label]} top-{c.patterns}: mean drop {c.mean_drop:.3f} "
                f"(random {c.mean_random_drop:.3f}), best {c.best_drop:.3f} (random {c.best_random_drop:.3f}), "
                f"flips to {self.label_names[c.label]} {c.mean_flip_rate:.3f} (random {c.mean_random_flip_rate:.3f})"
            )
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# helpers


def _columns(dataset: Any) -> tuple[list[str], list[str] | None, list[int]]:
    names = getattr(dataset, "column_names", None) or list(dataset[0].keys())
    for column in ("text", "label"):
        if column not in names:
            raise HeadpruneError(f"the data set needs a {column!r} column (columns: {', '.join(names)})")
    texts = [str(t) for t in dataset["text"]]
    pairs = [str(t) for t in dataset["text_pair"]] if "text_pair" in names else None
    labels = [int(v) for v in dataset["label"]]
    return texts, pairs, labels


def _sequence_ids(encoding: Any, row: int, tokenizer: Any) -> list[int | None]:
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


def _spans(seq: Sequence[int | None]) -> dict[int, tuple[int, int]]:
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


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def _predict_ids(
    model: Any, rows: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int, use_types: bool
) -> np.ndarray:
    """Predicted class of each ``(input_ids, token_type_ids)`` row (padded per batch; rows of similar
    length are batched together to cut padding, results in the original order)."""
    device = _device(model)
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


def _label_names(model: Any, given: Sequence[str] | None, labels: Sequence[int]) -> list[str]:
    classes = int(getattr(model.config, "num_labels", 0) or (max(labels, default=0) + 1))
    if given is not None:
        names = [str(n) for n in given]
        if len(names) < classes:
            raise HeadpruneError(f"{len(names)} label names for a model with {classes} classes")
        return names
    mapping = getattr(model.config, "id2label", None) or {}
    return [str(mapping.get(i, mapping.get(str(i), i))) for i in range(classes)]


# --------------------------------------------------------------------------------------------
# mining


def mine_triggers(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    *,
    examples: int | None = 500,
    n_steps: int = 20,
    method: str = "riemann_right",
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
        n_steps, method: AttAttr quadrature (the authors: Riemann, 64 steps; ``gausslegendre`` with
            4-6 nodes is more exact and much faster).
        pairs: strongest token pairs taken from the top head; ``min_ratio``: pairs below this share
            of the strongest are dropped.
        batch_size: examples attributed together.
        keep: patterns kept per class (the rest are counted in ``stats`` only).
    """
    from tqdm.auto import tqdm

    from attribution.attattr import AttAttr
    from attribution.core.inputs import inference_setup

    if pairs < 1:
        raise HeadpruneError(f"pairs must be at least 1, got {pairs}")
    if not 0.0 <= min_ratio <= 1.0:
        raise HeadpruneError(f"min_ratio must lie in [0, 1], got {min_ratio}")
    if batch_size < 1 or keep < 1:
        raise HeadpruneError("batch_size and keep must be positive")
    texts, text_pairs, labels = _columns(dataset)
    if not texts:
        raise HeadpruneError("cannot mine triggers from an empty data set")
    names = _label_names(model, label_names, labels)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(texts))
    if examples is not None:
        if examples < 1:
            raise HeadpruneError(f"examples must be at least 1, got {examples}")
        order = order[:examples]
    specials = set(getattr(tokenizer, "all_special_ids", []))
    attattr = AttAttr(model, output="probability")

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
            predicted = model(**{k: v.to(_device(model)) for k, v in batch.items()}).logits.argmax(-1).cpu()
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
                sub, target=gold[correct], n_steps=n_steps, method=method, internal_batch_size=internal_batch_size
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
        "method": method,
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
    seq = _sequence_ids(encoding, row, tokenizer)
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
    spans = _spans(seq)
    segs, rels = [], []
    for p in positions:
        start, end = spans[seq[p]]
        segs.append(int(seq[p]))
        rels.append((p - start) / max(end - start - 1, 1))
    return [ids[p] for p in positions], segs, rels, sum(v for v, _ in chosen)


# --------------------------------------------------------------------------------------------
# attack


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
    texts, text_pairs, labels = _columns(dataset)
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
                    out.append((ids, types, _sequence_ids(enc, k, tokenizer)[:n]))
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
            inserted = [_insert(base[k], pattern.token_ids, pattern) for k in targets]
            after = _predict_ids(model, inserted, pad_id, batch_size, use_types)
            own = np.isin(pool, pattern.token_ids)
            choices = pool[~own] if (~own).any() else pool
            trial_rng = np.random.default_rng([seed, label, rank])
            random_acc, random_flip = [], []
            for _ in range(random_trials):
                draws = trial_rng.choice(choices, size=(len(targets), len(pattern.token_ids)))
                noisy = [_insert(base[k], draws[q].tolist(), pattern) for q, k in enumerate(targets)]
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


def _insert(
    example: tuple[list[int], list[int], list[int | None]], tokens: Sequence[int], pattern: TriggerPattern
) -> tuple[list[int], list[int]]:
    """``(input_ids, token_type_ids)`` of one encoded example with ``tokens`` placed as ``pattern``'s."""
    ids, types, seq = example
    spans = _spans(seq)
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
