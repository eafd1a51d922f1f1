"""The one exception type users see: a clear, one-line message about their input; and how any
other exception is told in one line (``describe_error``, the CLI's error boundary)."""

from __future__ import annotations

import json


class HeadpruneError(ValueError):
    """Bad input or an unsupported setting; the CLI prints its message on one line and exits 2."""


# exit statuses of the CLI: 2 bad input (anticipated), 1 a failure headprune did not anticipate
BAD_INPUT, UNEXPECTED = 2, 1
_MAX_CHARS = 400


def one_line(text: str, limit: int = _MAX_CHARS) -> str:
    """``text`` on one line: whitespace runs (newlines included) collapsed, at most ``limit`` chars."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def raised_by(error: BaseException, *packages: str) -> bool:
    """True when ``error``'s class comes from one of ``packages`` (top-level names: ``"safetensors"``,
    ``"tokenizers"``): errors of readers that have no common base class of their own."""
    return type(error).__module__.split(".")[0] in packages


def describe_error(error: BaseException) -> tuple[str, int]:
    """``(one-line message, exit status)`` for an exception that reached the command line.

    Anticipated failures -- headprune's own errors, the operating system's (with the file named),
    undecodable text or JSON, unreadable safetensors weights, YAML and tokenizer errors -- are bad
    input: status 2. Anything else is a failure headprune did not foresee: status 1, the message
    prefixed by the exception's type.
    """
    if isinstance(error, HeadpruneError):
        return one_line(str(error)), BAD_INPUT
    if isinstance(error, OSError) and getattr(error, "filename", None) is not None:
        reason = error.strerror or one_line(str(error), 200)
        second = f" -> {error.filename2}" if getattr(error, "filename2", None) else ""
        return one_line(f"{error.filename}{second}: {reason}"), BAD_INPUT
    if isinstance(error, OSError):
        return one_line(str(error) or type(error).__name__), BAD_INPUT
    if isinstance(error, UnicodeDecodeError):
        return one_line(f"a file is not UTF-8 text (byte {error.start}: {error.reason})"), BAD_INPUT
    if isinstance(error, json.JSONDecodeError):
        return one_line(f"invalid JSON ({error.msg} at line {error.lineno}, column {error.colno})"), BAD_INPUT
    if raised_by(error, "safetensors"):
        return one_line(f"unreadable safetensors weights: {error}"), BAD_INPUT
    if raised_by(error, "yaml"):
        return one_line(f"invalid YAML: {getattr(error, 'problem', None) or error}"), BAD_INPUT
    if raised_by(error, "tokenizers"):
        return one_line(f"tokenizer error: {error}"), BAD_INPUT
    return one_line(f"{type(error).__name__}: {error}"), UNEXPECTED
