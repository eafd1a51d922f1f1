"""What every stage of a run shares: the recipe, the output directory, the data and its rows,
the dense model, the finished stages' records, and the processes of the run."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from attribution.core import processes
from attribution.core.data import DataSpec, iter_batches, label_names, load_splits
from attribution.core.errors import HeadpruneError
from attribution.core.log import get_logger
from prune.pipeline.artifacts import StageRecord, StageTiming
from prune.pipeline.fingerprints import file_digest, hash_files, hash_model_dir
from prune.recipe import Recipe

log = get_logger("run")
TOLERANCE_ROWS = 500


@dataclass
class RunContext:
    """State shared by the stages of one run (see :mod:`prune.pipeline.runner`)."""

    recipe: Recipe
    out: Path
    progress: bool = True
    command: str | None = None
    on_shard: Any = None  # callable(criterion, shard) after each saved shard (tests simulate crashes)
    records: dict[str, StageRecord] = field(default_factory=dict)
    timings: dict[str, StageTiming] = field(default_factory=dict)  # of the finished stages, when known
    model_path: str | None = None  # set by the finetune stage (or resolved from recipe.model)

    # ---- processes ---------------------------------------------------------------------------

    @property
    def main(self) -> bool:
        return processes.process_index() == 0 if processes.is_distributed() else True

    @property
    def world(self) -> int:
        return processes.num_processes() if processes.is_distributed() else 1

    def log(self, line: str) -> None:
        """A log line from the main process only."""
        if self.main:
            log.info(line)

    # ---- data --------------------------------------------------------------------------------

    @cached_property
    def spec(self) -> DataSpec:
        return DataSpec(**self.recipe.section("data"))

    @cached_property
    def splits(self) -> Any:
        return load_splits(self.spec)

    @cached_property
    def data_hash(self) -> dict[str, Any]:
        """The data part of every fingerprint: the spec, plus a content hash of local files."""
        from attribution.core.data import tweets_csv_path

        spec = self.recipe.section("data")
        name = spec["name"]
        content = None
        if name == "tweets":
            content = hash_files([tweets_csv_path()])
        elif Path(name).expanduser().is_file():
            content = hash_files([Path(name).expanduser()])
        elif Path(name).expanduser().is_dir():
            root = Path(name).expanduser()
            content = hash_files([p for p in root.rglob("*") if p.is_file()], root)
        return {"spec": spec, "content": content}

    def digests(self, *names: str) -> dict[str, str | None]:
        """sha256 of the run files ``names`` -- what a stage reads from the stages before it, the
        part of its fingerprint that makes it rerun only when those bytes change. A name ending in
        ``/`` stands for every file under that folder. The digests are those the writing stage
        recorded (verified when it was skipped); a file no stage of this run recorded is hashed
        now, an absent one maps to None."""
        recorded = {f: d.sha256 for record in self.records.values() for f, d in record.digests.items()}
        out: dict[str, str | None] = {}
        for name in names:
            if name.endswith("/"):
                inside = sorted(f for f in recorded if f.startswith(name))
                if inside:
                    out.update({f: recorded[f] for f in inside})
                    continue
                folder = self.out / name
                found = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
                out.update({str(p.relative_to(self.out)): file_digest(p).sha256 for p in found} or {name: None})
            elif name in recorded:
                out[name] = recorded[name]
            else:
                path = self.out / name
                out[name] = file_digest(path).sha256 if path.is_file() else None
        return out

    def common(self) -> dict[str, Any]:
        """The inputs every model-reading stage depends on."""
        return {"model": self.model_hash, "data": self.data_hash, "seed": self.recipe.seed}

    def _perm(self, split: str) -> list[int]:
        generator = torch.Generator().manual_seed(self.recipe.seed)
        return torch.randperm(len(self.splits[split]), generator=generator).tolist()

    def rows(self, purpose: str) -> Any:
        """The rows a stage uses: a seeded shuffle of its split (so sorted data is fine).

        Sweep rows never overlap the scored rows when both come from the same split: they are
        taken after the scored ones in the same shuffle.
        """
        recipe = self.recipe
        if purpose == "score":
            split, n, skip = recipe.score.split, recipe.score.examples, 0
        elif purpose == "sweep":
            split, n = recipe.sweep.split, recipe.sweep.examples
            scored = recipe.score is not None and split == recipe.score.split
            skip = min(recipe.score.examples, len(self.splits[split])) if scored else 0
        elif purpose == "evaluate":
            split, n, skip = recipe.evaluate.split, recipe.evaluate.examples, 0
            if n is None:
                return self.splits[split]  # the whole split, in its own order
        elif purpose == "repair":
            split, n, skip = recipe.repair.split, recipe.repair.examples, 0
        elif purpose == "compress":
            split, n, skip = recipe.compress.split, recipe.compress.examples, 0
        elif purpose == "calibration":  # the compress repair's rows, then the rows that guard it
            split, n, skip = "train", recipe.compress.calibration_examples, 0
        elif purpose == "guard":
            split, n = "train", recipe.compress.held_out_examples
            skip = min(recipe.compress.calibration_examples, len(self.splits[split]))
        elif purpose == "heal":
            split, n, skip = "train", recipe.heal.train_examples, 0
        elif purpose == "heal-held-out":
            split, n, skip = "validation", recipe.heal.held_out_examples, 0
        elif purpose == "tolerance":  # the compress target max_drop is judged here, never on test rows
            split, n, skip = "validation", TOLERANCE_ROWS, 0
        else:
            raise ValueError(purpose)
        order = self._perm(split)[skip:]
        chosen = order if n is None else order[:n]
        if not chosen:
            raise HeadpruneError(
                f"no {split} rows left for {purpose}: the split has {len(self.splits[split])} rows "
                f"and {skip} are used for scoring; lower score.examples or use another split"
            )
        return self.splits[split].select(chosen)

    def batches(self, dataset: Any, batch_size: int, *, keep_labels: bool = True) -> Iterable[dict[str, torch.Tensor]]:
        """Length-sorted tokenizer batches of ``dataset`` (without the row index)."""
        _, tokenizer = self.dense
        for batch in iter_batches(
            dataset, tokenizer, batch_size=batch_size, max_length=self.spec.max_length, sort_by_length=True
        ):
            batch.pop("index")
            if not keep_labels:
                batch.pop("labels", None)
            yield batch

    # ---- model -------------------------------------------------------------------------------

    def resolved_model_path(self) -> str:
        if self.model_path is None:
            raise RuntimeError("the model is resolved by the finetune stage")
        return self.model_path

    @cached_property
    def model_hash(self) -> str:
        path = Path(self.resolved_model_path())
        return hash_model_dir(path) if path.is_dir() else f"hub:{self.model_path}"

    @cached_property
    def dense(self) -> tuple[Any, Any]:
        """``(model, tokenizer)`` of the dense model, eval mode; checked against the data's labels."""
        from prune.checkpoints import load_model

        model, tokenizer = load_model(self.resolved_model_path(), progress=self.progress)
        # Weights loaded from safetensors can sit at unaligned addresses, and CPU kernels then take
        # other code paths (float results differ in the last bits). A deep copy gets fresh, aligned
        # storage -- as every later copy or device move does -- so scores are identical on one or
        # several processes.
        model = copy.deepcopy(model)
        classes = label_names(self.splits)
        if int(model.config.num_labels) != len(classes):
            raise HeadpruneError(
                f"the model {self.recipe.model!r} has {model.config.num_labels} output classes but the data set "
                f"has {len(classes)} ({', '.join(classes)}); add a finetune section to train a classifier for it"
            )
        return model, tokenizer

    def evaluate(
        self, model: Any, dataset: Any, metrics: list[str], batch_size: int, *, sharded: bool = True
    ) -> dict[str, float]:
        """Data-parallel evaluation (every process must call it; ``sharded=False`` in a stage that
        runs on the main process alone)."""
        from prune.evaluate import evaluate

        _, tokenizer = self.dense
        result = evaluate(
            model,
            tokenizer,
            dataset,
            metrics=metrics,
            batch_size=batch_size,
            max_length=self.spec.max_length,
            progress=self.progress,
            sharded=sharded,
        )
        return {k: float(v) for k, v in result.metrics.items()}

    @cached_property
    def timing_batches(self) -> dict[int, dict[str, torch.Tensor]]:
        """Fixed evaluation rows for timing (``prune.cost.latency_batches``), shared by PyTorch and ONNX."""
        from prune.cost import latency_batches

        _, tokenizer = self.dense
        sizes = self.recipe.cost.batch_sizes if self.recipe.cost else [1, 32]
        return latency_batches(
            self.rows("evaluate"), tokenizer, sizes, max_length=self.spec.max_length, seed=self.recipe.seed
        )

    def environment(self) -> dict[str, Any]:
        """Versions and machine, for the report."""
        import platform

        import transformers

        from attribution import __version__

        return {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "headprune": __version__,
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "processes": self.world,
            "platform": platform.platform(),
        }
