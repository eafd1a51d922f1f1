"""Run a recipe as a chain of resumable stages.

Stages, in order (each only when the recipe asks for it)::

    finetune -> dense -> score-<criterion>... -> sweep -> prune -> cost -> export
             -> analysis-tree -> analysis-triggers -> report

(the analysis stages interpret the dense model; their outputs go to ``OUT/analysis/``).

Every stage writes its outputs atomically under the output directory and then a marker
``OUT/stages/<stage>.json`` holding the **fingerprint** of its inputs: the stage's recipe section,
the model (content hash of its files), the data (spec plus content hash of local files), the
fingerprints of the stages it reads from, and the headprune version. A rerun skips every stage
whose marker matches (and whose files still exist) and says so; a stage whose inputs changed
says which ones and runs again.

Scoring is resumable *inside* the stage: the scored examples are cut into shards of
``score.shard_size`` rows; each shard's partial sums (``sum [L, H]`` float64 and ``count``, plus
AttAttr's completeness errors) are saved atomically as soon as the shard is done. A rerun loads
the finished shards and computes only the missing ones; shards are combined in shard order, so
the final scores are bit-for-bit those of an uninterrupted run.

Several processes (``torchrun``/``accelerate launch``): shards and sweep points are dealt out
round-robin by index (shard ``k`` to process ``k % N``), each process writes its own files, and
after a barrier the main process combines them — the result does not depend on ``N``. Dense and
final evaluation run data-parallel through ``prune.evaluate`` (rows sharded, logits gathered).
Cost, export and report run on the main process alone while the others wait.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from attribution import __version__
from attribution.core.data import DataSpec, encode, iter_batches, label_names, load_splits
from attribution.core.errors import HeadpruneError
from attribution.core.io import atomic_output, atomic_write_text
from attribution.importance import CRITERIA, make_criterion
from attribution.scores import HeadScores
from prune.recipe import Recipe

MARKER_FORMAT = "headprune.StageRecord"


# --------------------------------------------------------------------------------------------
# Fingerprints and markers
# --------------------------------------------------------------------------------------------


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


@dataclass
class StageRecord:
    """The marker of a finished stage: its input fingerprint, outputs (small JSON) and files."""

    name: str
    fingerprint: str
    inputs: dict[str, Any]
    outputs: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    finished: str = ""
    cpu_seconds: float = 0.0  # CPU time of the (main) process, all threads: compare runs on busy machines

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps({"format": MARKER_FORMAT, **dataclasses.asdict(self)}, indent=1))

    @classmethod
    def load(cls, path: Path) -> StageRecord | None:
        """The marker at ``path``, or None if absent or unreadable (then the stage reruns)."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.pop("format", None) != MARKER_FORMAT:
            return None
        try:
            return cls(**data)
        except TypeError:
            return None


@dataclass
class StageOutcome:
    """What happened to one stage in this invocation: ``ran`` or ``skipped``."""

    name: str
    status: str
    seconds: float
    note: str = ""


@dataclass
class RunResult:
    """The outcome of :func:`run_recipe`: per-stage outcomes, wall time, the final summary."""

    out_dir: Path
    stages: list[StageOutcome]
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)
    main: bool = True  # False on the other processes of a multi-process launch

    @property
    def ran(self) -> list[str]:
        return [s.name for s in self.stages if s.status == "ran"]

    @property
    def skipped(self) -> list[str]:
        return [s.name for s in self.stages if s.status == "skipped"]


def save_tensor_file(obj: Any, path: Path) -> None:
    """``torch.save`` so that ``path`` is either absent or complete."""
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


def save_json(obj: Any, path: Path) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def load_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


class _Processes:
    """Rank, world size and barriers through Accelerate (trivial on one process).

    ``PartialState(cpu=True)`` when there is no GPU: without it a CPU-only ``torchrun`` launch is
    mistaken for a single process. Initialised here first, so ``prune.distributed`` (which asks
    for the same shared state) sees the process group too.
    """

    def __init__(self) -> None:
        from accelerate import PartialState

        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        # the other processes wait at a barrier while the main one fine-tunes (minutes on a CPU,
        # hours for BERT-base on MNLI): a generous timeout instead of the default 30 minutes
        self.state = (
            PartialState(cpu=not torch.cuda.is_available(), timeout=datetime.timedelta(hours=12))
            if distributed
            else None
        )
        self.rank = int(self.state.process_index) if self.state else 0
        self.world = int(self.state.num_processes) if self.state else 1
        if self.world > 1 and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.world))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.state is not None and self.world > 1:
            self.state.wait_for_everyone()

    @contextlib.contextmanager
    def all_cores(self, alone: bool) -> Iterator[None]:
        """While the other processes wait at a barrier, let the main process use every core."""
        if not alone or self.world == 1:
            yield
            return
        previous = torch.get_num_threads()
        torch.set_num_threads(os.cpu_count() or previous)
        try:
            yield
        finally:
            torch.set_num_threads(previous)

    def mine(self, index: int) -> bool:
        """Work item ``index`` belongs to this process (round-robin)."""
        return index % self.world == self.rank


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------

ShardHook = Callable[[str, int], None]


class Pipeline:
    """Runs one recipe into one output directory; see the module docstring.

    Args:
        recipe: a validated :class:`~prune.recipe.Recipe`.
        out_dir: where every output goes (created after the data set has loaded).
        progress: tqdm bars and log lines (main process only).
        force: ignore finished stages and shards; recompute everything.
        command: the command line recorded in the report.
        on_shard: called as ``on_shard(criterion, shard)`` after each shard is saved (tests use it
            to simulate a crash mid-attribution).
        log: where log lines go (default: print to stdout).
    """

    def __init__(
        self,
        recipe: Recipe,
        out_dir: str | os.PathLike[str],
        *,
        progress: bool = True,
        force: bool = False,
        command: str | None = None,
        on_shard: ShardHook | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.recipe = recipe
        self.out = Path(out_dir)
        self.force = force
        self.command = command
        self.on_shard = on_shard
        self.procs = _Processes()
        self.progress = progress and self.procs.main
        self._log = log or (lambda line: print(line, flush=True))
        self.records: dict[str, StageRecord] = {}
        self.outcomes: list[StageOutcome] = []
        self._model_path: Path | str | None = None

    # ---- logging -----------------------------------------------------------------------------

    def log(self, line: str) -> None:
        if self.procs.main:
            self._log(line)

    # ---- data ----------------------------------------------------------------------------------

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

    def _perm(self, split: str) -> list[int]:
        generator = torch.Generator().manual_seed(self.recipe.seed)
        return torch.randperm(len(self.splits[split]), generator=generator).tolist()

    def rows(self, purpose: str) -> Any:
        """The rows each stage uses (a seeded shuffle of the split, so sorted data is fine).

        Sweep rows never overlap the scored rows when both come from the same split.
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

    # ---- model ---------------------------------------------------------------------------------

    @property
    def model_path(self) -> str:
        if self._model_path is None:
            raise RuntimeError("the model is resolved by the finetune stage or _resolve_model")
        return str(self._model_path)

    @cached_property
    def model_hash(self) -> str:
        path = Path(self.model_path)
        return hash_model_dir(path) if path.is_dir() else f"hub:{self.model_path}"

    @cached_property
    def dense(self) -> tuple[Any, Any]:
        """``(model, tokenizer)`` of the dense model, eval mode; checked against the data's labels."""
        from prune.evaluate import load_model

        model, tokenizer = load_model(self.model_path)
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

    def batches(self, dataset: Any, batch_size: int, *, keep_labels: bool = True) -> Iterable[dict[str, torch.Tensor]]:
        _, tokenizer = self.dense
        for batch in iter_batches(
            dataset, tokenizer, batch_size=batch_size, max_length=self.spec.max_length, sort_by_length=True
        ):
            batch.pop("index")
            if not keep_labels:
                batch.pop("labels", None)
            yield batch

    # ---- the stage machinery -------------------------------------------------------------------

    def marker(self, name: str) -> Path:
        return self.out / "stages" / f"{name}.json"

    def stage(
        self,
        name: str,
        inputs: dict[str, Any],
        body: Callable[[str], tuple[dict[str, Any], list[str]]],
        *,
        main_only: bool = False,
        valid: Callable[[StageRecord], bool] | None = None,
    ) -> StageRecord:
        """Run ``body(fingerprint) -> (outputs, files)`` unless a matching marker says it is done."""
        self.procs.barrier()
        inputs = {**inputs, "headprune": __version__}
        fp = fingerprint(inputs)
        record = None if self.force else StageRecord.load(self.marker(name))
        if record is not None and record.fingerprint == fp:
            missing = [f for f in record.files if not (self.out / f).exists()]
            if not missing and (valid is None or valid(record)):
                self.log(f"[{name}] already done (fingerprint {fp[:10]}), skipped")
                self.records[name] = record
                self.outcomes.append(StageOutcome(name, "skipped", 0.0))
                return record
            reason = f"outputs missing ({missing[0]})" if missing else "outputs no longer valid"
        elif record is not None:
            reason = "inputs changed: " + describe_changes(record.inputs, inputs)
        else:
            reason = "forced" if self.force and self.marker(name).exists() else "not run before"
        self.log(f"[{name}] running ({reason})")
        started, cpu_started = time.perf_counter(), time.process_time()
        outputs: dict[str, Any] = {}
        files: list[str] = []
        if self.procs.main or not main_only:
            with self.procs.all_cores(main_only):
                outputs, files = body(fp)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        self.procs.barrier()
        if self.procs.main:
            record = StageRecord(
                name, fp, inputs, outputs, files, round(seconds, 3), time.strftime("%Y-%m-%dT%H:%M:%S"), round(cpu, 3)
            )
            record.save(self.marker(name))
        self.procs.barrier()
        if not self.procs.main:
            record = StageRecord.load(self.marker(name))
            if record is None:
                raise HeadpruneError(f"stage {name}: the main process wrote no marker")
        self.records[name] = record
        self.outcomes.append(StageOutcome(name, "ran", seconds))
        self.log(f"[{name}] done in {seconds:.1f} s (CPU {cpu:.1f} s)")
        return record

    # ---- run -------------------------------------------------------------------------------------

    def run(self) -> RunResult:
        started = time.perf_counter()
        recipe = self.recipe
        # Everything that can fail on bad input happens before the output directory is touched.
        splits = self.splits
        triggers = recipe.analysis.triggers if recipe.analysis is not None else None
        for purpose, section in (("score", recipe.score), ("sweep", recipe.sweep), ("evaluate", recipe.evaluate)):
            if section is not None and section.split not in splits:
                raise HeadpruneError(f"{purpose}.split {section.split!r} is not a split of {recipe.data.name}")
        for key in ("split", "attack_split") if triggers is not None else ():
            if getattr(triggers, key) not in splits:
                raise HeadpruneError(f"analysis.triggers.{key} {getattr(triggers, key)!r} is not a split of "
                                     f"{recipe.data.name}")
        if self.out.exists() and not self.out.is_dir():
            raise HeadpruneError(f"output path {self.out} exists and is not a directory")
        if self.procs.main:
            (self.out / "stages").mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "recipe.yaml", recipe.to_yaml())
            if self.command:
                atomic_write_text(self.out / "command.txt", self.command + "\n")
        self.procs.barrier()
        self.log(f"headprune run: {recipe.title} -> {self.out}  ({self.procs.world} process(es))")

        self.stage_model()
        self.stage_dense()
        for name, options in (recipe.score.criteria if recipe.score is not None else {}).items():
            self.stage_score(name, options)
        if recipe.sweep is not None:
            self.stage_sweep()
        if recipe.prune is not None:
            self.stage_prune()
            if recipe.cost is not None:
                self.stage_cost()
        if recipe.export is not None and recipe.export.onnx:
            self.stage_export()
        if recipe.analysis is not None and recipe.analysis.tree is not None:
            self.stage_analysis_tree()
        if recipe.analysis is not None and recipe.analysis.triggers is not None:
            self.stage_analysis_triggers()
        self.stage_report()
        seconds = time.perf_counter() - started
        summary = self.records["report"].outputs.get("summary", {})
        ran = sum(1 for o in self.outcomes if o.status == "ran")
        self.log(
            f"finished in {seconds:.1f} s: {ran} stage(s) ran, {len(self.outcomes) - ran} skipped; "
            f"report: {self.out / 'report.html'}"
        )
        return RunResult(self.out, self.outcomes, seconds, summary, self.procs.main)

    # ---- stages --------------------------------------------------------------------------------

    def stage_model(self) -> None:
        """Resolve the model; with a finetune section (or ``model: default``) a cached fine-tune."""
        recipe = self.recipe
        if recipe.finetune is None and recipe.model != "default":
            from attribution.models import resolve_name

            self._model_path = resolve_name(recipe.model)
            self.log(f"[model] {recipe.model} -> {self._model_path}")
            return
        inputs = {
            "model": recipe.model,
            "finetune": recipe.section("finetune"),
            "data": self.data_hash if recipe.finetune is not None else None,
        }

        def body(fp: str) -> tuple[dict[str, Any], list[str]]:
            from attribution.models import FINETUNE_META

            path = self._finetune()
            meta = load_json(path / FINETUNE_META) if (path / FINETUNE_META).is_file() else {}
            outputs = {
                "path": str(path),
                "train_seconds": meta.get("seconds"),
                "metrics": meta.get("metrics"),
                "config": meta.get("config"),
            }
            save_json(outputs, self.out / "finetune.json")
            return outputs, ["finetune.json"]

        record = self.stage(
            "finetune", inputs, body, main_only=True, valid=lambda r: Path(r.outputs.get("path", "")).is_dir()
        )
        self._model_path = record.outputs["path"]
        self.log(f"[model] {self._model_path}")

    def _finetune(self) -> Path:
        from prune.finetune import finetune, resolve_model

        recipe = self.recipe
        if recipe.finetune is None:
            return Path(resolve_model("default", progress=self.progress))
        options = recipe.finetune
        result = finetune(
            recipe.model,
            self.spec,
            train_examples=options.train_examples,
            epochs=options.epochs,
            lr=options.lr,
            batch_size=options.batch_size,
            max_length=self.spec.max_length,
            seed=options.seed,
            progress=self.progress,
        )
        how = "reused from the cache" if result.cached else f"trained in {result.seconds:.0f} s"
        self.log(f"[finetune] {how}: validation accuracy {result.validation_accuracy:.4f}")
        return result.path

    def _common(self) -> dict[str, Any]:
        return {"model": self.model_hash, "data": self.data_hash, "seed": self.recipe.seed}

    def _evaluate(self, model: Any, dataset: Any, metrics: list[str], batch_size: int) -> dict[str, float]:
        """Data-parallel evaluation (every process must call it)."""
        from prune.evaluate import evaluate

        _, tokenizer = self.dense
        # evaluate() moves the model to the process's device ("cpu:0" in a CPU process group);
        # put it back where the other stages expect it.
        home = next(model.parameters()).device
        result = evaluate(
            model,
            tokenizer,
            dataset,
            metrics=metrics,
            batch_size=batch_size,
            max_length=self.spec.max_length,
            progress=self.progress,
        )
        model.to(home)
        return {k: float(v) for k, v in result.metrics.items()}

    def stage_dense(self) -> None:
        section = self.recipe.section("evaluate")

        def body(fp: str) -> tuple[dict[str, Any], list[str]]:
            model, _ = self.dense
            data = self.rows("evaluate")
            metrics = self._evaluate(model, data, section["metrics"], section["batch_size"])
            result = {"split": section["split"], "examples": len(data), "metrics": metrics}
            if self.procs.main:
                save_json(result, self.out / "dense.json")
            self.log(f"[dense] {_metrics_text(metrics)} on {len(data)} {section['split']} rows")
            return result, ["dense.json"]

        self.stage("dense", {"evaluate": section, **self._common()}, body)

    # ---- scoring, in resumable shards ------------------------------------------------------------

    def stage_score(self, name: str, options: dict[str, Any]) -> None:
        section = {k: v for k, v in self.recipe.section("score").items() if k != "criteria"}
        inputs = {"criterion": name, "options": options, "score": section, **self._common()}
        self.stage(f"score-{name}", inputs, lambda fp: self._score(name, options, fp))

    def _score(self, name: str, options: dict[str, Any], fp: str) -> tuple[dict[str, Any], list[str]]:
        recipe = self.recipe
        model, _ = self.dense
        path = self.out / "scores" / f"{name}.json"
        started = time.perf_counter()
        if not CRITERIA[name].needs_data:
            from attribution.importance import head_importance

            if self.procs.main:
                scores = head_importance(model, [], name, progress=False, **options)
                scores.provenance.update(model=recipe.model, model_path=self.model_path)
                scores.save(path)
            return {"examples": 0, "shards": 0}, [f"scores/{name}.json"]

        rows = self.rows("score")
        size = recipe.score.shard_size
        n_shards = math.ceil(len(rows) / size)
        shard_dir = self.out / "scores" / f"{name}.shards"
        done = [k for k in range(n_shards) if _shard_ok(shard_dir / f"shard-{k:05d}.pt", fp)]
        if done:
            self.log(f"[score-{name}] resuming: {len(done)} of {n_shards} shards already done")
        todo = [k for k in range(n_shards) if k not in done and self.procs.mine(k)]
        bar = tqdm(
            total=sum(min(size, len(rows) - k * size) for k in todo),
            desc=f"scoring heads ({name})",
            unit="ex",
            disable=not self.progress,
        )
        for k in todo:
            shard_started = time.perf_counter()
            criterion = make_criterion(name, **options)  # fresh: AttAttr keeps per-shard deltas
            layers, heads = _shape(model)
            summed = torch.zeros(layers, heads, dtype=torch.float64)
            count = 0
            part = rows.select(range(k * size, min((k + 1) * size, len(rows))))
            for batch in self.batches(part, recipe.score.batch_size):
                values = criterion.per_example(model, batch)  # [B, L, H]
                summed += values.sum(dim=0)
                count += values.shape[0]
                bar.update(values.shape[0])
            deltas = torch.cat(criterion.deltas) if getattr(criterion, "deltas", None) else None
            save_tensor_file(
                {
                    "fingerprint": fp,
                    "shard": k,
                    "rows": [k * size, k * size + count],
                    "sum": summed,
                    "count": count,
                    "deltas": deltas,
                    "seconds": time.perf_counter() - shard_started,
                },
                shard_dir / f"shard-{k:05d}.pt",
            )
            if self.on_shard is not None:
                self.on_shard(name, k)
        bar.close()
        self.procs.barrier()
        if not self.procs.main:
            return {}, []
        shards = [torch.load(shard_dir / f"shard-{k:05d}.pt", weights_only=True) for k in range(n_shards)]
        scores = _combine_shards(name, options, shards, model)
        scores.provenance.update(
            model=recipe.model,
            model_path=self.model_path,
            split=recipe.score.split,
            shards=n_shards,
            shard_size=size,
            seconds_this_run=round(time.perf_counter() - started, 3),
        )
        scores.save(path)
        outputs = {
            "examples": int(sum(s["count"] for s in shards)),
            "shards": n_shards,
            "shards_reused": len(done),
            "shards_computed": n_shards - len(done),
        }
        return outputs, [f"scores/{name}.json"]

    def scores(self, name: str) -> HeadScores:
        return HeadScores.load(self.out / "scores" / f"{name}.json")

    # ---- sweep ---------------------------------------------------------------------------------

    def stage_sweep(self) -> None:
        recipe = self.recipe
        criteria = list(recipe.score.criteria)
        inputs = {
            "sweep": recipe.section("sweep"),
            "scores": {c: self.records[f"score-{c}"].fingerprint for c in criteria},
            "score_rows": [recipe.score.split, recipe.score.examples],  # sweep rows avoid them
            "min_heads_per_layer": recipe.prune.min_heads_per_layer if recipe.prune else 0,
            **self._common(),
        }
        self.stage("sweep", inputs, self._sweep)

    def _sweep(self, fp: str) -> tuple[dict[str, Any], list[str]]:
        from attribution.core.predict import predict_logits
        from prune.metrics import compute_metrics
        from prune.strategies import select_heads
        from prune.surgery import remove_heads

        recipe = self.recipe
        section = recipe.sweep
        model, tokenizer = self.dense
        data = encode(self.rows("sweep"), tokenizer, self.spec)
        labels = torch.as_tensor(list(data["label"]))
        criteria = list(recipe.score.criteria)
        scores = {c: self.scores(c) for c in criteria}
        minimum = recipe.prune.min_heads_per_layer if recipe.prune else 0
        items: list[tuple[str, float]] = [("dense", 0.0)] + [(c, f) for c in criteria for f in section.fractions]
        point_dir = self.out / "sweep"
        bar = tqdm(total=len(items), desc="sweep (criterion x fraction)", unit="pt", disable=not self.progress)
        for index, (criterion, fraction) in enumerate(items):
            path = point_dir / f"{criterion}-{fraction:.4f}.json"
            if not self.procs.mine(index) or _point_ok(path, fp):
                bar.update(1)
                continue
            point: dict[str, Any] = {"fingerprint": fp, "criterion": criterion, "fraction": fraction}
            pruned = model
            try:
                if criterion != "dense":
                    heads = select_heads(scores[criterion], sparsity=fraction, min_per_layer=minimum)
                    pruned = copy.deepcopy(model)
                    remove_heads(pruned, heads)
                    point["heads_removed"] = sum(len(h) for h in heads.values())
                else:
                    point["heads_removed"] = 0
            except HeadpruneError as error:  # e.g. min_heads_per_layer makes the fraction impossible
                point.update(metric=None, error=str(error))
            else:
                logits = predict_logits(
                    pruned, tokenizer, data, batch_size=section.batch_size, max_length=self.spec.max_length
                )
                point["metric"] = compute_metrics(logits, labels, [section.metric])[section.metric]
            save_json(point, path)
            bar.update(1)
        bar.close()
        self.procs.barrier()
        if not self.procs.main:
            return {}, []
        points = [load_json(point_dir / f"{c}-{f:.4f}.json") for c, f in items]
        layers, heads = _shape(model)
        curves = {
            c: [
                {
                    "fraction": p["fraction"],
                    "heads_removed": p.get("heads_removed"),
                    "metric": p["metric"],
                    **({"error": p["error"]} if "error" in p else {}),
                }
                for p in points
                if p["criterion"] == c
            ]
            for c in criteria
        }
        result = {
            "metric": section.metric,
            "split": section.split,
            "examples": len(data),
            "total_heads": layers * heads,
            "dense": points[0]["metric"],
            "fractions": list(section.fractions),
            "curves": curves,
        }
        save_json(result, self.out / "sweep.json")
        self.log(f"[sweep] dense {section.metric} {result['dense']:.4f} on {len(data)} {section.split} rows")
        for c in criteria:
            line = "  ".join(
                f"{p['fraction']:.2f}:{p['metric']:.3f}" if p["metric"] is not None else f"{p['fraction']:.2f}:-"
                for p in curves[c]
            )
            self.log(f"[sweep] {c:>9}  {line}")
        return {"dense": result["dense"]}, ["sweep.json"]

    # ---- final prune (+ repair) ----------------------------------------------------------------

    def stage_prune(self) -> None:
        recipe = self.recipe
        criteria = list(recipe.score.criteria)
        inputs = {
            "prune": recipe.section("prune"),
            "repair": recipe.section("repair"),
            "evaluate": recipe.section("evaluate"),
            "scores": {c: self.records[f"score-{c}"].fingerprint for c in criteria},
            "sweep": self.records["sweep"].fingerprint if "sweep" in self.records else None,
            **self._common(),
        }
        self.stage("prune", inputs, self._prune, valid=lambda r: (self.out / "model" / "config.json").is_file())

    def choose(self) -> dict[str, Any]:
        """Which criterion and how many heads: the decision of the prune stage, with its reason."""
        from prune.strategies import select_heads

        recipe = self.recipe
        target = recipe.prune.target
        minimum = recipe.prune.min_heads_per_layer
        sweep = load_json(self.out / "sweep.json") if recipe.sweep is not None else None
        criterion = recipe.prune.criterion

        def best_fraction(name: str) -> tuple[float, float | None]:
            floor = sweep["dense"] - target.max_drop
            ok = [p for p in sweep["curves"][name] if p["metric"] is not None and p["metric"] >= floor - 1e-12]
            if not ok:
                return 0.0, None
            top = max(ok, key=lambda p: p["fraction"])
            return top["fraction"], top["metric"]

        candidates = [c for c in recipe.score.criteria if c != "random"] or list(recipe.score.criteria)
        if criterion == "best":
            ranked = sorted(
                candidates,
                key=lambda c: (-best_fraction(c)[0], -(best_fraction(c)[1] or 0.0), candidates.index(c)),
            )
            criterion = ranked[0]
        scores = self.scores(criterion)
        decision: dict[str, Any] = {"criterion": criterion, "chosen_by": recipe.prune.criterion}
        if recipe.prune.criterion == "best":
            decision["candidates"] = candidates
        if target.fraction is not None:
            decision["reason"] = f"fixed fraction {target.fraction}"
            heads = select_heads(scores, sparsity=target.fraction, min_per_layer=minimum)
        elif target.keep_per_layer is not None:
            decision["reason"] = f"keep the best {target.keep_per_layer} heads of every layer"
            heads = select_heads(scores, keep_per_layer=target.keep_per_layer, min_per_layer=minimum)
        else:
            fraction, metric = best_fraction(criterion)
            if metric is None:
                decision["reason"] = (
                    f"no swept fraction keeps {sweep['metric']} within {target.max_drop} of dense "
                    f"({sweep['dense']:.4f}); the model is left unpruned"
                )
                heads = {}
            else:
                decision["reason"] = (
                    f"the largest swept fraction whose {sweep['split']} {sweep['metric']} stays within "
                    f"{target.max_drop:g} of the dense model's: {metric:.4f} vs {sweep['dense']:.4f}"
                )
                heads = select_heads(scores, sparsity=fraction, min_per_layer=minimum)
        decision["removed"] = {str(k): v for k, v in heads.items()}
        return decision

    def _prune(self, fp: str) -> tuple[dict[str, Any], list[str]]:
        from prune.surgery import load_pruned, remove_heads, save_pruned

        recipe = self.recipe
        dense, tokenizer = self.dense
        decision = self.choose()
        heads = {int(k): v for k, v in decision["removed"].items()}
        model = copy.deepcopy(dense)
        if heads:
            remove_heads(model, heads)
        from attribution import instrument

        layers, per_layer = _shape(model)
        kept = instrument.kept_heads(model)
        removed = layers * per_layer - sum(len(k) for k in kept)
        self.log(
            f"[prune] {decision['criterion']}: removing {removed} of {layers * per_layer} heads "
            f"({removed / (layers * per_layer):.0%}); {decision['reason']}"
        )
        evaluate = recipe.evaluate
        data = self.rows("evaluate")
        dense_metrics = load_json(self.out / "dense.json")["metrics"]
        metrics = {"dense": dense_metrics}
        metrics["pruned"] = self._evaluate(model, data, evaluate.metrics, evaluate.batch_size)
        files = ["prune.json", "model/config.json"]
        repair_info = None
        if recipe.repair is not None and heads:
            from prune.repair import repair

            calibration = list(self.batches(self.rows("repair"), recipe.repair.batch_size, keep_labels=False))
            result = repair(model, calibration, dense=dense, progress=self.progress)
            metrics["repaired"] = self._evaluate(model, data, evaluate.metrics, evaluate.batch_size)
            if self.procs.main:
                result.save(self.out / "repair.json")
            files.append("repair.json")
            repair_info = {"examples": result.examples, "seconds": result.seconds, "layers": len(result.layers)}
        final = metrics.get("repaired", metrics["pruned"])
        self.log(f"[prune] dense {_metrics_text(dense_metrics)}")
        self.log(f"[prune] pruned {_metrics_text(metrics['pruned'])}")
        if "repaired" in metrics:
            self.log(f"[prune] repaired {_metrics_text(metrics['repaired'])}")
        out: dict[str, Any] = {
            **decision,
            "heads_removed": removed,
            "total_heads": layers * per_layer,
            "fraction": removed / (layers * per_layer),
            "kept": kept,
            "kept_per_layer": [len(k) for k in kept],
            "split": evaluate.split,
            "examples": len(data),
            "metrics": metrics,
            "final_metrics": final,
            "repair": repair_info,
            "model_dir": "model",
        }
        if self.procs.main:
            save_pruned(model, self.out / "model", tokenizer)
            # the checkpoint must reload into the identical model
            reloaded, _ = load_pruned(self.out / "model", tokenizer=False)
            probe = next(iter(self.batches(data.select(range(min(16, len(data)))), 16, keep_labels=False)))
            with torch.no_grad():
                diff = (reloaded(**probe).logits - model(**probe).logits).abs().max().item()
            if diff > 1e-4:
                raise HeadpruneError(
                    f"the saved pruned model does not reload identically (logits differ by {diff:.3g})"
                )
            out["reload_max_abs_diff"] = diff
            save_json(out, self.out / "prune.json")
        return out, files

    # ---- cost ----------------------------------------------------------------------------------

    @cached_property
    def timing_batches(self) -> dict[int, dict[str, torch.Tensor]]:
        """Fixed evaluation rows for timing (``prune.cost.latency_batches``), shared by PyTorch and ONNX."""
        from prune.cost import latency_batches

        _, tokenizer = self.dense
        sizes = self.recipe.cost.batch_sizes if self.recipe.cost else [1, 32]
        return latency_batches(
            self.rows("evaluate"), tokenizer, sizes, max_length=self.spec.max_length, seed=self.recipe.seed
        )

    def stage_cost(self) -> None:
        recipe = self.recipe
        inputs = {
            "cost": recipe.section("cost"),
            "prune": self.records["prune"].fingerprint,
            "evaluate": recipe.section("evaluate"),
            **self._common(),
        }
        self.stage("cost", inputs, self._cost, main_only=True)

    def _cost(self, fp: str) -> tuple[dict[str, Any], list[str]]:
        from prune.cost import compare_costs, cost_report, format_comparison, mean_token_length, measure_latency
        from prune.surgery import load_pruned

        dense, tokenizer = self.dense
        pruned, _ = load_pruned(self.out / "model", tokenizer=False)
        mean = mean_token_length(self.rows("evaluate"), tokenizer, self.spec.max_length)
        repeats = self.recipe.cost.repeats
        with _threads(self.recipe.cost.threads):
            latency = measure_latency(
                {"dense": dense, "pruned": pruned}, self.timing_batches, repeats=repeats, progress=self.progress
            )
            threads = torch.get_num_threads()
        reports = {
            name: cost_report(model, mean, name=name, latency_ms=latency[name], repeats=repeats)
            for name, model in (("dense", dense), ("pruned", pruned))
        }
        for report in reports.values():
            report.threads = threads
        result = {
            "dense": reports["dense"].to_dict(),
            "pruned": reports["pruned"].to_dict(),
            "ratios": compare_costs(reports["dense"], reports["pruned"]),
        }
        save_json(result, self.out / "cost.json")
        for line in format_comparison(reports["dense"], reports["pruned"]).splitlines():
            self.log(f"[cost] {line}")
        return {}, ["cost.json"]

    # ---- export --------------------------------------------------------------------------------

    def stage_export(self) -> None:
        recipe = self.recipe
        inputs = {
            "export": recipe.section("export"),
            "prune": self.records["prune"].fingerprint if "prune" in self.records else None,
            "cost": recipe.section("cost"),
            "evaluate": recipe.section("evaluate"),
            **self._common(),
        }
        self.stage("export", inputs, self._export, main_only=True)

    def _export(self, fp: str) -> tuple[dict[str, Any], list[str]]:
        from prune.export import export_and_check
        from prune.surgery import load_pruned

        section = self.recipe.export
        data = self.rows("evaluate")
        check = list(self.batches(data.select(range(min(section.check_examples, len(data)))), 16, keep_labels=False))
        latency = self.timing_batches
        repeats = self.recipe.cost.repeats if self.recipe.cost else 10
        threads = self.recipe.cost.threads if self.recipe.cost else None
        result: dict[str, Any] = {}
        files = []
        targets = []
        if self.recipe.prune is not None:
            targets.append(("pruned", self.out / "model"))
        if section.dense:
            targets.append(("dense", None))
        for label, directory in targets:
            model = load_pruned(directory, tokenizer=False)[0] if directory is not None else self.dense[0]
            path = self.out / "onnx" / ("model.onnx" if label == "pruned" else "dense.onnx")
            exported = export_and_check(
                model,
                path,
                opset=section.opset,
                check_batches=check,
                latency_batches=latency,
                repeats=repeats,
                atol=section.atol,
                threads=threads,
            )
            info = exported.to_dict()
            info["path"] = str(path.relative_to(self.out))
            result[label] = info
            files.append(info["path"])
            timing = ", ".join(f"b={b}: {ms:.1f} ms" for b, ms in exported.latency_ms.items())
            self.log(f"[export] {label}: {info['path']}, max |onnx - torch| {exported.max_abs_diff:.1e}; {timing}")
        save_json(result, self.out / "export.json")
        return {}, ["export.json", *files]

    # ---- analysis: attribution trees and trigger mining on the dense model ------------------------

    def stage_analysis_tree(self) -> None:
        section = self.recipe.section("analysis")["tree"]
        inputs = {"tree": section, **self._common()}
        self.stage("analysis-tree", inputs, self._analysis_tree, main_only=True)

    def _analysis_tree(self, fp: str) -> tuple[dict[str, Any], list[str]]:
        from prune.commands.tree import tree_stage

        section = self.recipe.analysis.tree
        model, tokenizer = self.dense
        folder = self.out / "analysis" / "trees"
        folder.mkdir(parents=True, exist_ok=True)
        files: list[str] = []
        trees = []
        for i, text in enumerate(section.texts):
            pair = section.text_pairs[i] if section.text_pairs is not None else None
            final = [folder / f"tree-{i}.{fmt.lower().lstrip('.')}" for fmt in section.formats]
            tree_stage(  # save_tree writes every format atomically
                model, tokenizer, text, final, text_pair=pair, tau=section.tau, n_steps=section.steps,
                method=section.method, max_length=self.spec.max_length,
            )
            written = [str(path.relative_to(self.out)) for path in final]
            files += written
            trees.append({"text": text, "text_pair": pair, "files": written})
            self.log(f"[analysis-tree] tree {i}: {final[0].with_suffix('.*').name}")
        return {"trees": trees}, files

    def stage_analysis_triggers(self) -> None:
        section = self.recipe.section("analysis")["triggers"]
        inputs = {"triggers": section, **self._common()}
        self.stage("analysis-triggers", inputs, self._analysis_triggers, main_only=True)

    def _analysis_triggers(self, fp: str) -> tuple[dict[str, Any], list[str]]:
        from prune.commands.triggers import triggers_stage

        section = self.recipe.analysis.triggers
        model, tokenizer = self.dense
        path = self.out / "analysis" / "triggers.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        report = triggers_stage(  # TriggerReport.save writes atomically
            model, tokenizer, self.splits, path, split=section.split, examples=section.examples,
            attack=section.attack, attack_split=section.attack_split, attack_examples=section.attack_examples,
            top_k=section.top_k, random_trials=section.random_trials, max_length=self.spec.max_length,
            seed=self.recipe.seed, progress=self.progress, n_steps=section.steps, method=section.method,
            pairs=section.pairs, batch_size=section.batch_size,
        )
        self.log(f"[analysis-triggers] {path.relative_to(self.out)}")
        return {"classes": list(report.label_names)}, [str(path.relative_to(self.out))]

    # ---- report --------------------------------------------------------------------------------

    def stage_report(self) -> None:
        inputs = {
            "report": self.recipe.section("report"),
            "upstream": {name: record.fingerprint for name, record in self.records.items()},
            "title": self.recipe.title,
        }
        self.stage("report", inputs, self._report, main_only=True)

    def _report(self, fp: str) -> tuple[dict[str, Any], list[str]]:
        from prune.report import write_report

        written = write_report(
            self.out,
            title=self.recipe.title,
            recipe=self.recipe.to_dict(),
            command=self.command,
            timings={name: (record.seconds, record.cpu_seconds) for name, record in self.records.items()},
            environment=_environment(self.procs.world),
            stages=[*self.records, "report"],
        )
        files = [str(Path(p).relative_to(self.out)) for p in written.files]
        return {"summary": written.summary}, files


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` inside the block (unchanged for None)."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _shape(model: Any) -> tuple[int, int]:
    from attribution import instrument

    return len(instrument.encoder_layers(model)), instrument.original_num_heads(model)


def _shard_ok(path: Path, fp: str) -> bool:
    if not path.is_file():
        return False
    try:
        return torch.load(path, weights_only=True).get("fingerprint") == fp
    except Exception:  # a torn or foreign file: recompute it
        return False


def _point_ok(path: Path, fp: str) -> bool:
    try:
        return load_json(path).get("fingerprint") == fp
    except (OSError, ValueError):
        return False


def _combine_shards(name: str, options: dict[str, Any], shards: list[dict[str, Any]], model: Any) -> HeadScores:
    """Shard partial sums -> ``HeadScores``, exactly as ``attribution.head_importance`` reduces."""
    import transformers

    from attribution import instrument

    criterion = make_criterion(name, **options)
    summed = torch.zeros_like(shards[0]["sum"])
    count = 0
    for shard in shards:  # shard order: the same float sums on every (re)run
        summed += shard["sum"]
        count += int(shard["count"])
    if count == 0:
        raise HeadpruneError("no examples to score heads on")
    values = summed / count if criterion.reduction == "mean" else summed
    values = criterion.finalize(values)
    provenance: dict[str, Any] = {
        "model_type": model.config.model_type,
        "examples": count,
        "options": criterion.options(),
        "kept_heads": instrument.kept_heads(model),
        "seconds": round(sum(float(s["seconds"]) for s in shards), 3),
        "headprune": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    deltas = [s["deltas"] for s in shards if s.get("deltas") is not None]
    if deltas:
        relative = torch.cat(deltas).flatten().double()
        provenance["relative_completeness_error"] = {
            "median": float(relative.median()),
            "p90": float(torch.quantile(relative, 0.9)),
        }
    return HeadScores(values, name, provenance)


def _metrics_text(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def _environment(processes: int) -> dict[str, Any]:
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "headprune": __version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "processes": processes,
        "platform": platform.platform(),
    }


def run_recipe(
    recipe: Recipe,
    out_dir: str | os.PathLike[str],
    *,
    progress: bool = True,
    force: bool = False,
    command: str | None = None,
    on_shard: ShardHook | None = None,
    log: Callable[[str], None] | None = None,
) -> RunResult:
    """Run ``recipe`` into ``out_dir`` (resuming whatever is already done there)."""
    pipeline = Pipeline(recipe, out_dir, progress=progress, force=force, command=command, on_shard=on_shard, log=log)
    return pipeline.run()
