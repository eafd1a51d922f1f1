"""One run per output directory: a second ``run`` on the same ``--out`` refuses with one line naming
the holder (exit 2) while the first finishes; a lock left by a killed run is taken over; the lock is
released on every way out of a run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from attribution.core.errors import HeadpruneError
from prune.pipeline import run_recipe
from prune.pipeline.outdir import LOCK_NAME, OutputLock
from prune.recipe import load_recipe
from tests.test_resume import dead_pid
from tests.test_stages import logged
from tests.tiny_recipe import tiny_recipe

ROOT = Path(__file__).parent.parent
SCORE_ONLY = {
    "score": "score:\n  split: train\n  examples: 8\n  batch_size: 4\n  shard_size: 4\n  criteria:\n    taylor: {}\n",
    "sweep": "sweep: null\n",
    "prune": "prune: null\n",
    "repair": "",
    "cost": "cost: null\n",
    "export": "export: null\n",
}


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``headprune ...`` from this worktree, in another process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "prune.cli", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_second_run_on_the_same_out_refuses_while_the_first_finishes(tmp_path):
    recipe = tiny_recipe(tmp_path, **SCORE_ONLY)
    out = tmp_path / "out"
    second: list[subprocess.CompletedProcess[str]] = []
    before: list[list[str]] = []

    def start_another_run(criterion: str, shard: int) -> None:
        if not second:  # the first run holds the directory now
            before.append(sorted(str(p.relative_to(out)) for p in out.rglob("*")))
            second.append(cli("run", str(recipe), "--out", str(out), "--quiet"))
            assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before[0]  # nothing written

    result = run_recipe(load_recipe(recipe), out, progress=False, on_shard=start_another_run)
    assert result.ran == ["dense", "score-taylor", "report"]
    refused = second[0]
    assert refused.returncode == 2, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in refused.stderr
    assert f"pid {os.getpid()} on {socket.gethostname()} since 20" in lines[0] and str(out) in lines[0]
    assert not (out / LOCK_NAME).exists()  # released at the end of the first run
    assert cli("run", str(recipe), "--out", str(out), "--quiet").returncode == 0  # and free again


def test_stale_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path):
    recipe = tiny_recipe(tmp_path, **SCORE_ONLY)
    out = tmp_path / "out"
    out.mkdir()
    pid = dead_pid()
    holder = {"pid": pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00", "command": "headprune run"}
    (out / LOCK_NAME).write_text(json.dumps(holder))
    with logged() as lines:
        result = run_recipe(load_recipe(recipe), out, progress=False)
    assert result.ran == ["dense", "score-taylor", "report"]
    warning = [line for line in lines if "stale lock" in line]
    assert warning == [
        f"taking over the stale lock of {out} (pid {pid} on {socket.gethostname()} since 2026-01-01T00:00:00; "
        "its process is gone)"
    ]
    assert not (out / LOCK_NAME).exists()


def test_lock_held_by_a_killed_process_is_free():
    """flock is the truth: a holder killed with SIGKILL (no cleanup at all) holds nothing."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        code = (
            "import os, signal, sys\n"
            "from pathlib import Path\n"
            "from prune.pipeline.outdir import OutputLock\n"
            "OutputLock(Path(sys.argv[1])).acquire()\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n"
        )
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        assert subprocess.run([sys.executable, "-c", code, str(out)], env=env, cwd=ROOT).returncode == -9
        assert (out / LOCK_NAME).exists()
        with OutputLock(out):
            assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
            with pytest.raises(HeadpruneError, match=f"in use by another run \\(pid {os.getpid()} on "):
                OutputLock(out).acquire()  # a second holder, even in this process (flock is per open file)
        assert not (out / LOCK_NAME).exists()


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_lock_is_released_when_a_run_fails_or_is_interrupted(tmp_path, error):
    recipe = tiny_recipe(tmp_path, **SCORE_ONLY)
    out = tmp_path / "out"

    def fail(criterion: str, shard: int) -> None:
        assert (out / LOCK_NAME).exists()
        raise error("stop")

    with pytest.raises(error):
        run_recipe(load_recipe(recipe), out, progress=False, on_shard=fail)
    assert not (out / LOCK_NAME).exists()
    with logged() as lines:
        result = run_recipe(load_recipe(recipe), out, progress=False)
    assert "score-taylor" in result.ran and not any("stale lock" in line for line in lines)
