"""Fingerprints: what a stage's inputs were, so a rerun knows whether its outputs still hold."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any


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
