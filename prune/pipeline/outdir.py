"""The output directory of a run: one writer at a time (:class:`OutputLock`), and the temporary
files of killed runs removed when the next run starts (:func:`remove_leftovers`).

The lock is ``OUT/.headprune.lock``: an ``flock`` held on it for the whole run (the kernel drops
it when the process dies, however it dies) and, inside, who holds it (pid, host, start time,
command) for the one-line refusal a second run prints. A lock file found without a live holder
(its process was killed) is taken over with a warning. ``flock`` needs a POSIX system; on a network
file system it is as reliable as the file system's locking.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from attribution.core.errors import HeadpruneError
from attribution.core.io import TEMPORARY_FILE
from attribution.core.log import get_logger

log = get_logger("run")

LOCK_NAME = ".headprune.lock"
# prune.checkpoints.save_pruned and prune.export.export_directory write a directory into
# ``tempfile.mkdtemp(prefix=".<name>.", suffix=".tmp")`` beside its final place and park the
# previous one at ``.<name>.old`` while they swap them
SAVE_DIRECTORY = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")
PARKED_DIRECTORY = re.compile(r"^\.(?P<target>.+)\.old$")


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def holder_text(holder: dict[str, Any]) -> str:
    """``pid 123 on host-a since 2026-12-01T17:52:46`` (what a lock file says about its holder)."""
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('started', '?')}"


class OutputLock:
    """Exclusive use of an output directory by one run (see the module docstring).

    ``with OutputLock(out, command):`` raises a one-line :class:`HeadpruneError` naming the holder
    when another live process has the directory; the lock is released on every way out of the
    block (exceptions and ``KeyboardInterrupt`` included).
    """

    def __init__(self, out: Path, command: str | None = None) -> None:
        self.out = Path(out)
        self.path = self.out / LOCK_NAME
        self.command = command
        self.fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        self.out.mkdir(parents=True, exist_ok=True)
        for _ in range(10):  # retried only when the file was replaced under us
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = self._read(fd)
                os.close(fd)
                raise HeadpruneError(
                    f"output directory {self.out} is in use by another run ({holder_text(holder)}); "
                    f"wait for it or choose another --out"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder released (unlinked) it between our open and our lock
                os.close(fd)
                continue
            previous = self._read(fd)
            if previous:
                gone = previous.get("host") == socket.gethostname() and not _alive(int(previous.get("pid", -1)))
                why = "its process is gone" if gone else "it holds no lock"
                log.warning(f"taking over the stale lock of {self.out} ({holder_text(previous)}; {why})")
            me = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "command": self.command,
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
            self.fd = fd
            return
        raise HeadpruneError(f"could not lock {self.path}: it keeps being replaced")

    @staticmethod
    def _read(fd: int) -> dict[str, Any]:
        try:
            data = json.loads(os.pread(fd, 65536, 0).decode() or "{}")
        except (ValueError, UnicodeDecodeError, OSError):
            return {}
        return data if isinstance(data, dict) else {}

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # unlink while holding: nobody locks a dead file
        finally:
            os.close(self.fd)  # drops the flock
            self.fd = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.release()


def remove_leftovers(out: Path) -> list[Path]:
    """Remove the temporary files and directories killed runs left under ``out``; returns them.

    Only headprune's own names are touched (the module docstring and
    :data:`attribution.core.io.TEMPORARY_FILE`): an ``atomic_output`` file whose writer (by the
    pid in its name) is gone, a ``save_pruned``/``export_directory`` directory, and a parked
    ``.<name>.old`` directory of theirs (it holds a ``config.json``, or nothing). Call it while
    holding :class:`OutputLock`, so no other run is writing them.
    """
    removed: list[Path] = []
    for root, dirs, files in os.walk(out):
        here = Path(root)
        for name in files:
            match = TEMPORARY_FILE.match(name)
            if match and (int(match["pid"]) == os.getpid() or not _alive(int(match["pid"]))):
                (here / name).unlink(missing_ok=True)
                removed.append(here / name)
        for name in list(dirs):
            path = here / name
            model = (path / "config.json").is_file() or not any(path.iterdir())
            if SAVE_DIRECTORY.match(name) or (PARKED_DIRECTORY.match(name) and model):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
                dirs.remove(name)
    return removed
