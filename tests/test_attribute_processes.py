"""``headprune attribute`` across processes: shards of fixed size dealt out round-robin, merged in
shard order on the main process -- one process and two write the same bytes, and each process
scores only its own shards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from attribution.criteria import TaylorCriterion, score_dataset, score_in_shards
from attribution.scores import HeadScores
from tests.prune_helpers import tiny_dataset, tiny_tokenizer
from tests.tiny_recipe import tiny_csv, tiny_model_dir

ROOT = Path(__file__).parent.parent
ROWS, SHARD = 13, 3  # 5 shards, the last one short: ranks 0 and 1 score 3 + 3 + 1 and 3 + 3 rows


class CountingTaylor(TaylorCriterion):
    """Taylor that counts, per process, the examples it scored."""

    seen = 0

    def per_example(self, model, batch):
        CountingTaylor.seen += int(batch["input_ids"].shape[0])
        return super().per_example(model, batch)


def _worker(out_dir: str) -> None:
    from accelerate import PartialState

    from attribution.core import processes
    from tests.conftest import tiny_model

    PartialState._reset_state()  # forked from the test process: forget its single-process state
    torch.set_num_threads(1)
    tokenizer = tiny_tokenizer(Path(out_dir) / f"tok{processes.process_index()}")
    scores = score_in_shards(
        tiny_model("bert", seed=5), tokenizer, tiny_dataset(ROWS, seed=3), CountingTaylor(), shard_size=SHARD,
        batch_size=2, progress=False,
    )  # fmt: skip
    result = {"seen": CountingTaylor.seen, "values": None if scores is None else scores.values.tolist()}
    Path(out_dir, f"rank{processes.process_index()}.json").write_text(json.dumps(result))


def test_each_process_scores_only_its_shards_and_the_main_one_gets_all(tmp_path):
    from accelerate import PartialState, debug_launcher

    from tests.conftest import tiny_model

    debug_launcher(_worker, args=(str(tmp_path),), num_processes=2)
    PartialState._reset_state()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["seen"] for r in ranks] == [7, 6]  # shards 0, 2, 4 and 1, 3
    assert ranks[1]["values"] is None
    torch.set_num_threads(1)
    model, tokenizer, data = tiny_model("bert", seed=5), tiny_tokenizer(tmp_path / "tok"), tiny_dataset(ROWS, seed=3)
    one = score_in_shards(model, tokenizer, data, "taylor", shard_size=SHARD, batch_size=2, progress=False)
    assert torch.equal(torch.tensor(ranks[0]["values"], dtype=torch.float64), one.values)  # bit for bit
    # and the scores of the plain one-pass scorer (other batches: float32 rounding differs)
    plain = score_dataset(model, tokenizer, data, "taylor", batch_size=2, progress=False)
    torch.testing.assert_close(one.values, plain.values, rtol=1e-6, atol=1e-9)
    assert one.provenance["examples"] == ROWS and one.provenance["shard_size"] == SHARD


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="needs torchrun")
def test_attribute_under_torchrun_writes_what_one_process_writes(tmp_path):
    model, data = tiny_model_dir(tmp_path / "m"), tiny_csv(tmp_path / "data.csv", rows=60)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = [
        "attribute", "--model", str(model), "--data", str(data), "--split", "train", "--examples", "22",
        "--criterion", "attattr", "--n-steps", "2", "--shard-size", "4", "--batch-size", "3", "--max-length", "16",
        "--quiet",
    ]  # fmt: skip
    one = subprocess.run(
        ["python", "-m", "prune.cli", *args, "--out", str(tmp_path / "one.json")],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        ["torchrun", "--nproc_per_node", "2", "-m", "prune.cli", *args, "--out", str(tmp_path / "two.json")],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    assert (tmp_path / "one.json").read_bytes() == (tmp_path / "two.json").read_bytes()
    scores = HeadScores.load(tmp_path / "two.json")
    assert scores.provenance["examples"] == 22 and "relative_completeness_error" in scores.provenance
    assert two.stdout.count("scored 22 train examples") == 1  # the main process alone reports
