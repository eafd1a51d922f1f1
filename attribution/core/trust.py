"""Whether headprune may run the Python code a model directory or hub repository ships.

A model whose ``config.json`` (or ``tokenizer_config.json``) carries an ``auto_map`` asks
transformers to import code from the model's own files. headprune never does that unless the user
opted in (``--trust-remote-code``, or ``trust_remote_code: true`` in a recipe): every loader passes
``trust_remote_code=remote_code_allowed()``, and ``refuse_remote_code`` turns a local directory with
an ``auto_map`` into a one-line error before transformers could prompt on the terminal.

The permission is a context (``allow_remote_code()``), not a global switch: the CLI grants it for
the duration of one command, and it ends with it.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from attribution.core.errors import HeadpruneError

_ALLOWED: contextvars.ContextVar[bool] = contextvars.ContextVar("headprune_trust_remote_code", default=False)
_CONFIGS = ("config.json", "tokenizer_config.json")

__all__ = ["allow_remote_code", "refuse_remote_code", "remote_code_allowed"]


def remote_code_allowed() -> bool:
    """True inside ``allow_remote_code()`` (the user opted in), else False."""
    return _ALLOWED.get()


@contextlib.contextmanager
def allow_remote_code(allowed: bool = True) -> Iterator[None]:
    """Let loaders run a model's own code (``trust_remote_code=True``) while the block runs."""
    token = _ALLOWED.set(bool(allowed))
    try:
        yield
    finally:
        _ALLOWED.reset(token)


def refuse_remote_code(
    directory: str | os.PathLike[str],
    shown: str | None = None,
    *,
    exempt: Callable[[dict[str, Any]], bool] | None = None,
) -> None:
    """A one-line ``HeadpruneError`` when ``directory`` ships code (an ``auto_map``) and the user
    did not opt in; nothing for hub ids, other directories, or when allowed. ``exempt(config)``
    True: an ``auto_map`` the caller knows it will not execute (headprune's own, on a pruned
    checkpoint it rebuilds itself)."""
    path = Path(directory)
    if remote_code_allowed() or not path.is_dir():
        return
    for name in _CONFIGS:
        try:
            config = json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # absent or unreadable: the loader reports it
        if isinstance(config, dict) and config.get("auto_map") and not (exempt is not None and exempt(config)):
            raise HeadpruneError(
                f"{shown or path} ships its own Python code (auto_map in {name}); headprune does not run it "
                "unless you pass --trust-remote-code (recipes: trust_remote_code: true)"
            )
