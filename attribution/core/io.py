"""Atomic file writes and typed JSON records: every file headprune writes goes through here.

``atomic_output`` yields a temporary path beside the target and renames it into place only when
the block succeeds, so a file is always either the old one or the complete new one. ``Record`` is
the one JSON convention of headprune's result files: a dataclass saved as
``{"format": "headprune.<Name>", "version": N, ...fields}``, written atomically, and loaded back
with a one-line error naming the file (and the key) when it is missing, corrupt, of another kind
or of a newer version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
import threading
import types
import typing
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from attribution.core.errors import HeadpruneError

R = TypeVar("R", bound="Record")


# the temporary files of atomic_output: ``.<name>.<pid>.<8 hex>.tmp<suffix>`` beside the target;
# a killed process leaves them behind, and a later run of the same output directory removes them
TEMPORARY_FILE = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp(?:\.[^.]+)?$")


def temporary_path(path: Path) -> Path:
    """The temporary name ``atomic_output`` writes ``path`` under (matches :data:`TEMPORARY_FILE`)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows (``/proc`` on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:  # elsewhere the only way to read it is to set it (and put it back at once)
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike[str]) -> None:
    """Give ``path`` (and, for a directory, everything in it) the modes a plain ``open``/``mkdir``
    would have given under the user's umask: files ``0o666 & ~umask``, directories ``0o777 & ~umask``.
    For what libraries create private (``tempfile.mkdtemp``, transformers' safetensors writer:
    mode 0600), so that a shared cache is readable by others under umask 022."""
    mask = current_umask()
    root = Path(path)
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for item in paths:
        if item.is_symlink():
            continue
        item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields a fresh temporary directory beside ``directory`` (``.NAME.XXXXXXXX.tmp``, the name
    the pipeline's clean-up of killed runs recognises). When the block succeeds, its files get the
    user's umask (:func:`apply_umask`) and it replaces ``directory`` (an existing one is moved
    aside first and removed once the new one is in place); when it fails it is removed and
    ``directory`` is untouched. Refusing a ``directory`` that must not be replaced is the caller's."""
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        apply_umask(tmp)  # mkdtemp makes it private (0700), safetensors' writer its files (0600)
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` (same suffix, so writers that go by it still work);
    when the block succeeds it replaces ``path``, when it fails it is removed: ``path`` is always
    either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` so that ``path`` is either the old file or the complete new one."""
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def save_tensors(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` so that ``path`` is either absent (or old) or complete."""
    import torch

    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


def timing_field(default: float = 0.0) -> Any:
    """A dataclass field for a measured time: kept in memory, never written by :func:`to_jsonable`
    (so a result file's bytes depend only on what was computed, and identical runs write identical
    files), left out of ``==`` (two runs that computed the same thing are equal), and ignored when an
    older file that still has it is read."""
    return dataclasses.field(default=default, compare=False, metadata={"timing": True})


def saved_fields(cls_or_obj: Any) -> list[dataclasses.Field]:
    """The dataclass fields that are written to files: all but :func:`timing_field` ones."""
    return [f for f in dataclasses.fields(cls_or_obj) if not f.metadata.get("timing")]


def to_jsonable(value: Any) -> Any:
    """Dataclasses (without their timing fields), paths, tensors and tuples as plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if isinstance(value, Record):
            return value.to_dict()
        return {f.name: to_jsonable(getattr(value, f.name)) for f in saved_fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist") and callable(value.tolist):  # tensors and numpy values
        return value.tolist()
    return value


def write_json(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``obj`` (plain values, dataclasses, tensors) as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(to_jsonable(obj), indent=1) + "\n")
    return Path(path)


def read_json(path: str | os.PathLike[str], what: str = "file") -> Any:
    """The JSON value in ``path``; a one-line ``HeadpruneError`` when it is absent or not JSON."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HeadpruneError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise HeadpruneError(f"{path} is a directory, not a {what}") from None
    except UnicodeDecodeError:
        raise HeadpruneError(f"{path} is not a text (UTF-8 JSON) {what}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise HeadpruneError(f"{path} is not valid JSON ({error.msg} at line {error.lineno})") from None


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Rebuild nested records/dataclasses from plain JSON values, following the type hints."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], where) if len(args) == 1 else value
    if isinstance(tp, type) and issubclass(tp, Record):
        return tp.from_dict(value, where)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise HeadpruneError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _from_fields(tp, value, where)
    if origin is list and isinstance(value, list):
        (item,) = typing.get_args(tp) or (Any,)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict and isinstance(value, dict):
        key, item = typing.get_args(tp) or (Any, Any)
        return {
            (int(k) if key is int else k): _convert(v, item, f"{where}.{k}") for k, v in value.items()
        }
    return value


def _from_fields(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    timings = {f.name for f in dataclasses.fields(cls) if f.metadata.get("timing")}
    data = {k: v for k, v in data.items() if k not in timings}  # files written before timings left them
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise HeadpruneError(f"{where}: unknown key {unknown[0]!r}")
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in data]
    if missing:
        raise HeadpruneError(f"{where}: missing key {missing[0]!r}")
    try:
        return cls(**{k: _convert(v, hints.get(k, Any), f"{where}.{k}") for k, v in data.items()})
    except (TypeError, ValueError) as error:
        if isinstance(error, HeadpruneError):
            raise
        raise HeadpruneError(f"{where}: {error}") from None


class Record:
    """Base of headprune's typed result files (mix into a ``@dataclass``).

    Subclasses set ``FORMAT`` (``"headprune.<Name>"``) and bump ``VERSION`` when a field changes
    meaning. ``to_dict``/``from_dict`` follow the dataclass fields (nested records and dataclasses
    included); override them only for fields JSON cannot hold as they are (tensors).
    """

    FORMAT: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1

    def to_dict(self) -> dict[str, Any]:
        body = {f.name: to_jsonable(getattr(self, f.name)) for f in saved_fields(self)}
        return {"format": self.FORMAT, "version": self.VERSION, **body}

    @classmethod
    def from_dict(cls: type[R], data: Any, where: str = "") -> R:
        where = where or cls.__name__
        if not isinstance(data, dict) or data.get("format") != cls.FORMAT:
            kind = data.get("format") if isinstance(data, dict) else None
            found = f"a {kind} file" if isinstance(kind, str) else "no headprune file"
            raise HeadpruneError(f"{where}: expected a {cls.FORMAT} file, found {found}")
        version = data.get("version", 1)
        if not isinstance(version, int) or version > cls.VERSION:
            raise HeadpruneError(
                f"{where}: {cls.FORMAT} version {version} is newer than this headprune reads ({cls.VERSION})"
            )
        body = {k: v for k, v in data.items() if k not in ("format", "version")}
        return _from_fields(cls, body, where)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write JSON atomically; returns the path."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")
        return Path(path)

    @classmethod
    def load(cls: type[R], path: str | os.PathLike[str]) -> R:
        """Read a file written by ``save``; one-line errors name the file and the key."""
        return cls.from_dict(read_json(path, what=f"{cls.FORMAT.split('.')[-1]} file"), where=str(path))
