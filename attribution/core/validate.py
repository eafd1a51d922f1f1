"""Checks every entry point runs before it writes anything: seeds, numbers, output paths, lengths
against a model's position limit, and a data set's classes against a model's.

Each check raises a one-line ``HeadpruneError`` naming the option (or file) and what is wrong.

Decisions:

- Seeds lie in ``0..SEED_MAX`` (``2**32 - 1``): the range every consumer accepts — NumPy's
  ``RandomState`` and ``datasets``' splits take at most 32 bits, ``torch.manual_seed`` 64, and
  ``random.Random`` anything; a negative seed is refused rather than wrapped.
- An output's parent directory is tried for writing by creating and removing an empty temporary
  file in it: permission bits alone say nothing for root or a read-only mount.
- The usable length of a model is ``max_position_embeddings``, less ``pad_token_id + 1`` for the
  RoBERTa family, whose position ids start after the padding index.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

from attribution.core.errors import HeadpruneError

SEED_MAX = 2**32 - 1
# model types whose position ids start at pad_token_id + 1 (transformers' create_position_ids_from_input_ids)
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "mpnet")

__all__ = [
    "SEED_MAX",
    "check_classes",
    "check_finite",
    "check_max_length",
    "check_output_dir",
    "check_output_file",
    "check_seed",
    "position_limit",
]


def check_seed(value: Any, name: str = "seed") -> int:
    """``value`` as a seed in ``0..SEED_MAX``; ``name`` is how the user gave it (``--seed``)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise HeadpruneError(f"{name} must be an integer in 0..{SEED_MAX}, got {value!r}")
    if not 0 <= value <= SEED_MAX:
        raise HeadpruneError(f"{name} must lie in 0..{SEED_MAX} (2**32 - 1), got {value}")
    return value


def check_finite(value: Any, name: str, *, positive: bool = False, minimum: float | None = None) -> float:
    """``value`` as a finite float (``positive``: > 0; ``minimum``: >= it)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise HeadpruneError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise HeadpruneError(f"{name} must be a finite number, got {value}")
    if positive and not value > 0:
        raise HeadpruneError(f"{name} must be positive, got {value}")
    if minimum is not None and value < minimum:
        raise HeadpruneError(f"{name} must be at least {minimum}, got {value}")
    return float(value)


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path.cwd()


def _try_writing(directory: Path, name: str, shown: str) -> None:
    try:
        handle, probe = tempfile.mkstemp(prefix=".headprune-probe-", dir=directory)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise HeadpruneError(f"{name} {shown}: cannot write in {directory} ({reason})") from None
    os.close(handle)
    os.unlink(probe)


def _check_ancestors(path: Path, name: str, shown: str) -> None:
    """The nearest existing ancestor of ``path`` must be a directory one can write in."""
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise HeadpruneError(f"{name} {shown}: {existing} is a file, not a directory")
    _try_writing(existing, name, shown)


def check_output_file(path: str | os.PathLike[str], name: str = "--out") -> Path:
    """A file about to be written: not an existing directory, its directory writable (or creatable)."""
    shown = os.fspath(path)
    target = Path(shown).expanduser()
    if not shown.strip():
        raise HeadpruneError(f"{name}: empty path")
    if target.is_dir():
        raise HeadpruneError(f"{name} {shown} is an existing directory; expected a file path")
    if target.exists() and not target.is_file():
        raise HeadpruneError(f"{name} {shown} exists and is not a regular file")
    _check_ancestors(target.parent, name, shown)
    return target


def check_output_dir(path: str | os.PathLike[str], name: str = "--out") -> Path:
    """A directory about to be written into: not an existing file, writable (or creatable)."""
    shown = os.fspath(path)
    target = Path(shown).expanduser()
    if not shown.strip():
        raise HeadpruneError(f"{name}: empty path")
    if target.exists() and not target.is_dir():
        raise HeadpruneError(f"{name} {shown} is an existing file; expected a directory")
    _check_ancestors(target, name, shown)
    return target


def position_limit(config: Any) -> int | None:
    """Tokens a model with this config can take per sequence (None: the config does not say)."""
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        return None
    if getattr(config, "model_type", "") in _OFFSET_POSITIONS:
        limit -= int(getattr(config, "pad_token_id", None) or 1) + 1
    return limit


def check_max_length(model: Any, max_length: Any, name: str = "--max-length", *, minimum: int = 2) -> int:
    """``max_length`` as an int in ``minimum..position_limit(model.config)``."""
    if isinstance(max_length, bool) or not isinstance(max_length, int):
        raise HeadpruneError(f"{name} must be an integer, got {max_length!r}")
    if max_length < minimum:
        raise HeadpruneError(f"{name} must be at least {minimum}, got {max_length}")
    limit = position_limit(getattr(model, "config", model))
    if limit is not None and max_length > limit:
        raise HeadpruneError(f"{name} {max_length} exceeds the model's limit of {limit} tokens per sequence")
    return max_length


def _named(names: list[str]) -> bool:
    """Real class names, not indices ("0", "1") or transformers' placeholders ("LABEL_0")."""
    return not all(n.isdigit() or (n.upper().startswith("LABEL_") and n[6:].isdigit()) for n in names)


def check_classes(model: Any, data_classes: list[str], data: str = "the data set") -> None:
    """The data's class names (index i naming label i) must be the model's classes.

    The counts must be equal; when both sides have real names (not indices or ``LABEL_i``) they
    must be the same names in the same order (compared without case), since label i of the data
    is scored against output i of the model.
    """
    from attribution.core.inputs import label_names

    model_classes = label_names(model)
    shown = ", ".join(data_classes[:8]) + (", ..." if len(data_classes) > 8 else "")
    wanted = ", ".join(model_classes[:8]) + (", ..." if len(model_classes) > 8 else "")
    if len(data_classes) != len(model_classes):
        raise HeadpruneError(
            f"{data} has {len(data_classes)} classes ({shown}) but the model has {len(model_classes)} ({wanted})"
        )
    if _named(data_classes) and _named(model_classes):
        if [n.lower() for n in data_classes] != [n.lower() for n in model_classes]:
            same = sorted(n.lower() for n in data_classes) == sorted(n.lower() for n in model_classes)
            order = " in another order" if same else ""
            raise HeadpruneError(f"{data} has the classes {shown}{order}; the model's classes are {wanted}")
