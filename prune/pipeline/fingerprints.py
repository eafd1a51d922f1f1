"""Fingerprints: what a stage's inputs were, so a rerun knows whether its outputs still hold;
file digests: what a stage's outputs were, so a rerun knows whether they are still those bytes.

Verification reads every recorded output once per rerun (a size mismatch is reported without
reading). There is no size+mtime shortcut: an in-place change that keeps the size and restores the
mtime would slip through it, and hashing is cheap next to the stages themselves (sha256 runs at
~0.5 GB/s on one core here: a BERT-base run's outputs, ~1.2 GB, verify in ~2-3 s).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class FileDigest:
    """The size and sha256 of one file a stage wrote."""

    size: int
    sha256: str


def file_digest(path: Path) -> FileDigest:
    """Size and sha256 of ``path`` (read once, in chunks)."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:  # not hashlib.file_digest: Python 3.11+, and we support 3.10
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return FileDigest(size, digest.hexdigest())


def check_digest(path: Path, recorded: FileDigest) -> str | None:
    """None when ``path`` still has the recorded bytes, else why not (missing, size, content)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    if not path.is_file():
        return "not a file"
    if size != recorded.size:
        return f"{size} bytes, {recorded.size} recorded"
    if file_digest(path).sha256 != recorded.sha256:
        return "content differs from the recorded sha256"
    return None


def fingerprint(inputs: Any) -> str:
    """sha256 of the canonical JSON of ``inputs`` (key order does not matter)."""
    payload = json.dumps(inputs, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def hash_files(paths: Iterable[Path], root: Path | None = None) -> str:
    """sha256 over the (relative name, content) of each file, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        name = str(path.relative_to(root)) if root else path.name
        digest.update(name.encode() + b"\0")
        with open(path, "rb") as handle:
            for chunk in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def hash_model_dir(path: Path) -> str:
    """Content hash of a model directory's config, weights and tokenizer files (not metadata)."""
    files = [
        p
        for p in path.iterdir()
        if p.is_file() and (p.suffix in (".json", ".safetensors", ".bin", ".txt", ".model") or p.name == "vocab")
    ]
    return hash_files(files, path)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def describe_changes(old: dict[str, Any], new: dict[str, Any], limit: int = 3) -> str:
    """``"score.examples 200 -> 100, model changed"``: what differs between two input records."""
    a, b = _flatten(old), _flatten(new)
    changes = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            before, after = a.get(key, "unset"), b.get(key, "unset")
            if isinstance(before, str) and len(before) > 24 or isinstance(after, str) and len(after) > 24:
                changes.append(f"{key} changed")
            else:
                changes.append(f"{key} {json.dumps(before)} -> {json.dumps(after)}")
    more = f" (+{len(changes) - limit} more)" if len(changes) > limit else ""
    return ", ".join(changes[:limit]) + more
