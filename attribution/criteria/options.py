"""Criterion options: what a criterion declares (name, default, type, help, choices), how a value
is checked and parsed, and the one-line error naming a bad option."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from attribution.core.errors import HeadpruneError

_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", object: "any value"}
_OF_TYPE = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    str: lambda v: isinstance(v, str),
    object: lambda v: True,
}


class CriterionOptionError(HeadpruneError):
    """A bad criterion option; ``option`` names it (None: the options as a whole)."""

    def __init__(self, criterion: str, option: str | None, problem: str, expect: str = "") -> None:
        self.criterion, self.option, self.problem, self.expect = criterion, option, problem, expect
        where = f"{criterion} option {option}" if option else f"{criterion} options"
        super().__init__(f"{where}: {problem}" + (f"; expected {expect}" if expect else ""))


@dataclass(frozen=True)
class CriterionOption:
    """One option of a criterion: what the CLI shows as a flag and a recipe accepts as a key.

    ``type`` is ``bool``, ``int``, ``float``, ``str`` (or ``object``: any value, unchecked);
    ``choices`` limits the values; ``minimum`` bounds numbers from below; ``nullable`` also accepts
    None (implied when the default is None).
    """

    name: str
    default: Any
    type: type
    help: str
    choices: tuple[Any, ...] | None = None
    minimum: int | float | None = None
    nullable: bool = False

    def __post_init__(self) -> None:
        if self.type not in _TYPE_WORDS:
            raise TypeError(f"criterion option {self.name}: type must be bool, int, float, str or object")

    @property
    def accepts_none(self) -> bool:
        return self.nullable or self.default is None

    @property
    def expect(self) -> str:
        """What a valid value looks like, in words."""
        if self.choices is not None:
            text = "one of: " + ", ".join(map(str, self.choices))
        elif self.type is int and self.minimum == 1:
            text = "a positive integer"
        elif self.minimum is not None:
            text = f"{_TYPE_WORDS[self.type]} >= {self.minimum}"
        else:
            text = _TYPE_WORDS[self.type]
        return text + (" (or null)" if self.accepts_none else "")

    def problem(self, value: Any) -> str | None:
        """None when ``value`` is valid, else what was wrong with it (``got ...``)."""
        if value is None:
            return None if self.accepts_none else "got null"
        ok = (
            _OF_TYPE[self.type](value)
            and (self.choices is None or value in self.choices)
            and (self.minimum is None or value >= self.minimum)
        )
        return None if ok else f"got {value!r}"

    def check(self, criterion: str, value: Any) -> Any:
        """``value`` as the criterion keeps it (ints become floats for float options), or a
        :class:`CriterionOptionError` naming the option."""
        problem = self.problem(value)
        if problem is not None:
            raise CriterionOptionError(criterion, self.name, problem, self.expect)
        return float(value) if self.type is float and value is not None else value

    def parse(self, criterion: str, text: str) -> Any:
        """A command-line string as a value of this option (not yet range-checked)."""
        if not isinstance(text, str):
            return text
        if self.accepts_none and text.strip().lower() in ("none", "null"):
            return None
        try:
            if self.type is bool:
                words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
                return words[text.strip().lower()]
            if self.type is int:
                return int(text)
            if self.type is float:
                return float(text)
        except (KeyError, ValueError):
            raise CriterionOptionError(criterion, self.name, f"got {text!r}", self.expect) from None
        return text
