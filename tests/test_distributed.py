"""Sharding, gathering and reducing across processes: two CPU processes must give what one gives
(``attribution.criteria.score_dataset``: scores and diagnostics; ``evaluate``; ``gather_rows``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from attribution.core import processes
from attribution.criteria import score_dataset
from prune.evaluate import evaluate
from tests.conftest import tiny_model
from tests.prune_helpers import tiny_dataset, tiny_tokenizer

ROWS = 13  # does not divide evenly by 2 (nor by the batch size)
CRITERIA = {"taylor": {}, "attention": {}, "attattr": {"n_steps": 3, "integration": "gausslegendre"}}


@pytest.mark.parametrize("n", [0, 1, 2, 7, 13, 64])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shards_cover_every_row_exactly_once(n, world):
    rows = []
    sizes = []
    for index in range(world):
        start, stop = processes.shard_bounds(n, world, index)
        rows.extend(range(start, stop))
        sizes.append(stop - start)
    assert rows == list(range(n))
    assert max(sizes) - min(sizes) <= 1


def test_single_process_is_identity():
    values = torch.arange(6.0).reshape(3, 2)
    assert processes.gather_rows(values) is values
    summed, count = torch.ones(2, 3, dtype=torch.float64), torch.tensor(4.0, dtype=torch.float64)
    assert processes.reduce(summed, count) == (summed, count)


def _compute(out_dir: str) -> dict:
    """Everything the comparison needs, computed by whichever processes run it."""
    torch.set_num_threads(1)
    tokenizer = tiny_tokenizer(Path(out_dir) / "tok")
    data = tiny_dataset(ROWS, seed=3)
    model = tiny_model("bert", seed=5)
    result = {"rank": processes.process_index(), "processes": processes.num_processes()}
    for name, options in CRITERIA.items():
        scores = score_dataset(model, tokenizer, data, name, batch_size=4, progress=False, **options)
        result[name] = scores.values.tolist()
        result[f"{name}_examples"] = scores.provenance["examples"]
        result[f"{name}_processes"] = scores.provenance["processes"]
    # one example per batch: no padding, so each example's diagnostic does not depend on the shard
    one = score_dataset(model, tokenizer, data, "attattr", batch_size=1, progress=False, **CRITERIA["attattr"])
    result["attattr_completeness"] = one.provenance["relative_completeness_error"]
    start, stop = processes.shard_bounds(ROWS, result["processes"], result["rank"])
    rows = processes.gather_rows(torch.arange(start, stop, dtype=torch.float64)[:, None])
    result["gathered_rows"] = rows.flatten().tolist()
    evaluation = evaluate(model, tokenizer, data, metrics=("accuracy", "macro_f1"), batch_size=4)
    result["metrics"] = evaluation.metrics
    result["eval_examples"] = evaluation.examples
    return result


def _worker(out_dir: str) -> None:
    from accelerate import PartialState

    PartialState._reset_state()  # forked from the test process: forget its single-process state
    result = _compute(out_dir)
    Path(out_dir, f"rank{result['rank']}.json").write_text(json.dumps(result))


def test_two_processes_equal_one(tmp_path):
    from accelerate import debug_launcher

    debug_launcher(_worker, args=(str(tmp_path),), num_processes=2)
    from accelerate import PartialState

    PartialState._reset_state()
    single = _compute(str(tmp_path))
    assert single["processes"] == 1
    for rank in (0, 1):
        multi = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert multi["processes"] == 2 and multi["rank"] == rank
        assert multi["gathered_rows"] == list(map(float, range(ROWS)))  # no duplicate, no drop, in order
        for name in CRITERIA:
            assert multi[f"{name}_examples"] == ROWS and multi[f"{name}_processes"] == 2
            torch.testing.assert_close(
                torch.tensor(multi[name], dtype=torch.float64),
                torch.tensor(single[name], dtype=torch.float64),
                rtol=1e-6,
                atol=1e-9,
            )
        # the diagnostics are gathered from every process: the summary of all rows, as on one process
        # (up to float noise: a relative completeness error is a small difference of large numbers)
        completeness = multi["attattr_completeness"]
        assert completeness.keys() == {"median", "p90"}
        assert completeness == pytest.approx(single["attattr_completeness"], rel=1e-2)
        assert multi["eval_examples"] == ROWS
        assert multi["metrics"] == single["metrics"]
    # local diagnostics would differ between the ranks (they scored different rows)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["attattr_completeness"] == ranks[1]["attattr_completeness"]
