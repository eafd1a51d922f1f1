"""The trigger report: mined patterns per class and the attack's numbers, a typed JSON record
(``headprune.trigger_report``; see :mod:`attribution.triggers`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from attribution.core.errors import HeadpruneError
from attribution.core.io import Record

FORMAT_VERSION = 2  # 2: patterns as a list per class index; derived numbers no longer written


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
class TriggerReport(Record):
    """Mined patterns per class (ranked) and, after ``attack_triggers``, the attack's numbers.

    ``patterns[c]``: class ``c``'s patterns, best first. Saved as JSON (``save``/``load``, format
    ``headprune.trigger_report``).
    """

    FORMAT: ClassVar[str] = "headprune.trigger_report"
    VERSION: ClassVar[int] = FORMAT_VERSION

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

    # ---- serialisation (``Record``: to_dict/from_dict/save/load) --------------------------------

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> TriggerReport:
        """A report from ``to_dict``'s output; version-1 files (patterns keyed by class name, with the
        derived ``mean_score``, ``drop`` and ``random_drop`` written out) load too."""
        if isinstance(data, dict) and data.get("format") == cls.FORMAT and data.get("version", 1) == 1:
            names = data.get("label_names") or []
            by_name = data.get("patterns") if isinstance(data.get("patterns"), dict) else {}
            data = {
                **data,
                "version": cls.VERSION,
                "patterns": [[_without(p, "mean_score") for p in by_name.get(name, [])] for name in names],
                "attacks": [_without(a, "drop", "random_drop") for a in data.get("attacks", [])],
            }
        return super().from_dict(data, where)

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


def _without(row: Any, *keys: str) -> Any:
    """``row`` (a mapping) without ``keys``."""
    return {k: v for k, v in row.items() if k not in keys} if isinstance(row, dict) else row
