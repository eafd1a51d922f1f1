"""The recipe schema: one dataclass per section, each field carrying its constraint and the words
that say what is expected (shown in errors and by ``headprune validate --schema``)."""


from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from attribution.core.errors import HeadpruneError
from attribution.core.validate import SEED_MAX
from prune.finetune import FinetuneConfig

SPLITS = ("train", "validation", "test")
TREE_FORMATS = ("png", "pdf", "svg", "html", "txt", "json")  # attribution.tree_render.FORMATS, without importing it
_REQUIRED = object()


class RecipeError(HeadpruneError):
    """A recipe that cannot run: the message is one line naming file, line, key and expectation."""


# --------------------------------------------------------------------------------------------
# Field helpers: constraints carry their own description of what is expected
# --------------------------------------------------------------------------------------------


def _field(default: Any = _REQUIRED, *, expect: str, check: Callable[[Any], bool] | None = None, doc: str = ""):
    """A dataclass field with validation metadata (``expect`` is shown in error messages)."""
    meta = {"expect": expect, "check": check, "doc": doc}
    if default is _REQUIRED:
        return field(metadata=meta)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata=meta)
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda d=default: dataclasses.replace(d), metadata=meta)
    return field(default=default, metadata=meta)


def _positive(value: Any) -> bool:
    return value is None or value > 0


def _non_negative(value: Any) -> bool:
    return value is None or value >= 0


def _seed(value: Any) -> bool:
    return value is None or 0 <= value <= SEED_MAX


_SEED = f"an integer in 0..{SEED_MAX}"


def unit_open(value: Any) -> bool:
    return value is None or 0 < value < 1


def _one_of(*choices: str) -> Callable[[Any], bool]:
    return lambda value: value is None or value in choices


def is_metric_name(value: Any) -> bool:
    """A built-in metric (or alias), or one Hugging Face ``evaluate`` loads (a local metric script,
    or a hub metric when the hub is reachable): see ``prune.metrics.metric_function``."""
    from prune.metrics import metric_function

    try:
        metric_function(value)
    except HeadpruneError:
        return False
    return True


def metric_expect() -> str:
    from prune.metrics import METRICS

    return (
        "a metric name: " + ", ".join(METRICS) + ", or a metric Hugging Face evaluate loads "
        "(a local metric script, or a hub name: hub metrics need network)"
    )


# --------------------------------------------------------------------------------------------
# The schema
# --------------------------------------------------------------------------------------------


@dataclass
class DataSection:
    """Where the examples come from (see ``attribution.core.data.DataSpec``)."""

    name: str = _field(
        "tweets",
        expect="'tweets' (embedded), a hub name[:config], a local .csv/.tsv/.json/.jsonl/.parquet file or a directory",
    )
    text_column: str | None = _field(None, expect="a column name of the data set (or null to guess)")
    text_pair_column: str | None = _field(None, expect="a column name of the data set (or null)")
    label_column: str | None = _field(None, expect="a column name of the data set (or null to guess)")
    max_length: int = _field(64, expect="an integer >= 8", check=lambda v: v >= 8)
    seed: int = _field(0, expect=f"{_SEED} (seeds the split carved from data sets without one)", check=_seed)
    split_map: dict[str, str] = _field(
        {},
        expect="a mapping of train, validation or test to a split name of the data set, each source once "
        "(e.g. {validation: validation_matched})",
    )  # checked with attribution.core.data.check_split_map by the parser, which says which entry is wrong


@dataclass
class FinetuneSection:
    """Fine-tune ``model`` (then a base encoder) on the train split first; cached by its arguments.
    The defaults are ``prune.finetune.FinetuneConfig``'s (the data section gives ``max_length``)."""

    train_examples: int = _field(FinetuneConfig.train_examples, expect="a positive integer", check=_positive)
    epochs: int = _field(FinetuneConfig.epochs, expect="a positive integer", check=_positive)
    lr: float = _field(FinetuneConfig.lr, expect="a positive number", check=_positive)
    batch_size: int = _field(FinetuneConfig.batch_size, expect="a positive integer", check=_positive)
    seed: int = _field(FinetuneConfig.seed, expect=_SEED, check=_seed)


@dataclass
class ScoreSection:
    """Head importance by each criterion, on ``examples`` rows of ``split``, in resumable shards."""

    criteria: dict[str, dict[str, Any]] = _field(
        {"attattr": {}, "taylor": {}, "fisher": {}, "attention": {}, "random": {}},
        expect="a mapping (or list) of criterion names to their options",
    )
    split: str = _field("validation", expect="one of " + ", ".join(SPLITS), check=_one_of(*SPLITS))
    examples: int = _field(200, expect="a positive integer", check=_positive)
    batch_size: int = _field(8, expect="a positive integer", check=_positive)
    shard_size: int = _field(50, expect="a positive integer (examples per resumable shard)", check=_positive)


@dataclass
class SweepSection:
    """Prune the lowest-scored fraction of heads by each criterion (masked) and measure the metric."""

    fractions: list[float] = _field(
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
        expect="a list of numbers strictly between 0 and 1",
        check=lambda v: len(v) > 0,
    )
    split: str = _field("validation", expect="one of " + ", ".join(SPLITS), check=_one_of(*SPLITS))
    examples: int | None = _field(500, expect="a positive integer, or null for the whole split", check=_positive)
    metric: str = _field("accuracy", expect=metric_expect(), check=is_metric_name)
    batch_size: int = _field(64, expect="a positive integer", check=_positive)


@dataclass
class TargetSection:
    """How many heads the final model loses: exactly one of the three keys."""

    fraction: float | None = _field(None, expect="a number strictly between 0 and 1", check=unit_open)
    keep_per_layer: int | None = _field(None, expect="a positive integer (heads kept in every layer)", check=_positive)
    max_drop: float | None = _field(
        None,
        expect="a number >= 0 (the largest swept fraction whose metric is at most this below the dense one)",
        check=_non_negative,
    )


@dataclass
class PruneSection:
    """The final pruning: which criterion's ranking, and how far."""

    criterion: str | None = _field(
        None, expect="a scored criterion's name, or 'best' (default: 'best' with a sweep, else the first scored)"
    )
    target: TargetSection = _field(
        TargetSection(max_drop=0.01), expect="a mapping with fraction, keep_per_layer or max_drop"
    )
    min_heads_per_layer: int = _field(0, expect="a non-negative integer", check=_non_negative)


@dataclass
class RepairSection:
    """Least-squares rescaling of the surviving heads (Kwon et al.) on calibration rows."""

    split: str = _field("train", expect="one of " + ", ".join(SPLITS), check=_one_of(*SPLITS))
    examples: int = _field(256, expect="a positive integer", check=_positive)
    batch_size: int = _field(32, expect="a positive integer", check=_positive)


@dataclass
class EvaluateSection:
    """The metrics of the dense and the final model."""

    split: str = _field("test", expect="one of " + ", ".join(SPLITS), check=_one_of(*SPLITS))
    examples: int | None = _field(None, expect="a positive integer, or null for the whole split", check=_positive)
    metrics: list[str] = _field(
        ["accuracy", "macro_f1"], expect="a non-empty list of metric names", check=lambda v: len(v) > 0
    )
    batch_size: int = _field(64, expect="a positive integer", check=_positive)


@dataclass
class CostSection:
    """Parameters, attention FLOPs, latency and file size, dense vs pruned."""

    batch_sizes: list[int] = _field([1, 32], expect="a non-empty list of positive integers", check=lambda v: len(v) > 0)
    repeats: int = _field(10, expect="a positive integer (latency = median of this many runs)", check=_positive)
    threads: int | None = _field(
        None,
        expect="a positive integer: CPU threads for timing PyTorch and ONNX Runtime alike (null: torch's default)",
        check=_positive,
    )


@dataclass
class ExportSection:
    """ONNX export of the final model, checked in onnxruntime against PyTorch."""

    onnx: bool = _field(True, expect="true or false")
    dense: bool = _field(True, expect="true or false (also export the dense model, for latency)")
    opset: int = _field(17, expect="an ONNX opset number >= 14", check=lambda v: v >= 14)
    check_examples: int = _field(32, expect="a positive integer", check=_positive)
    atol: float = _field(1e-4, expect="a positive number", check=_positive)
    remote_code: bool = _field(
        False,
        expect="true or false: the saved pruned checkpoints (model/, compress/model/, compress/healed/) also carry "
        "modeling_headprune.py, so transformers loads them without headprune with trust_remote_code=True "
        "(off by default: loading them that way runs code from the directory)",
    )


@dataclass
class TreeSection:
    """Attribution trees (AttAttr §4) of a few inputs, on the dense model (``headprune tree``)."""

    RENAMED: typing.ClassVar[dict[str, str]] = {"steps": "n_steps", "method": "integration"}

    texts: list[str] = _field(expect="a non-empty list of input texts", check=lambda v: len(v) > 0)
    text_pairs: list[str] | None = _field(
        None, expect="a list of second texts, one per text (sentence-pair models), or null"
    )
    tau: float = _field(0.4, expect="a number between 0 and 1", check=lambda v: 0 <= v <= 1)
    n_steps: int = _field(20, expect="a positive integer (AttAttr quadrature nodes)", check=_positive)
    integration: str = _field("riemann_right", expect="an integration method name (AttAttr quadrature rule)")
    formats: list[str] = _field(
        ["png", "html", "txt", "json"], expect="a non-empty list of png, pdf, svg, html, txt, json",
        check=lambda v: len(v) > 0,
    )


@dataclass
class TriggersSection:
    """Trigger mining (AttAttr §5) on the dense model, optionally attacking held-out rows."""

    RENAMED: typing.ClassVar[dict[str, str]] = {"steps": "n_steps", "method": "integration"}

    split: str = _field("train", expect="one of " + ", ".join(SPLITS), check=_one_of(*SPLITS))
    examples: int = _field(500, expect="a positive integer", check=_positive)
    n_steps: int = _field(20, expect="a positive integer (AttAttr quadrature nodes)", check=_positive)
    integration: str = _field("riemann_right", expect="an integration method name (AttAttr quadrature rule)")
    pairs: int = _field(2, expect="a positive integer (token pairs of the top head per example)", check=_positive)
    batch_size: int = _field(8, expect="a positive integer", check=_positive)
    attack: bool = _field(False, expect="true or false")
    top_k: int = _field(5, expect="a positive integer (patterns per class to attack with)", check=_positive)
    attack_split: str = _field("validation", expect="one of " + ", ".join(SPLITS), check=_one_of(*SPLITS))
    attack_examples: int | None = _field(
        None, expect="a positive integer, or null for the whole split", check=_positive
    )
    random_trials: int = _field(3, expect="a positive integer", check=_positive)


@dataclass
class AnalysisSection:
    """Interpretation outputs under ``OUT/analysis/``: attribution trees and/or trigger mining."""

    tree: TreeSection | None = _field(None, expect="a mapping of tree options, or null")
    triggers: TriggersSection | None = _field(None, expect="a mapping of trigger options, true or null")


@dataclass
class CompressTargetSection:
    """How far the compress stage goes: exactly one of the three keys."""

    latency: float | None = _field(
        None, expect="a number strictly between 0 and 1 (the fraction of the dense model's latency to keep)",
        check=unit_open,
    )
    flops: float | None = _field(
        None, expect="a number strictly between 0 and 1 (the fraction of multiply-adds to keep)", check=unit_open
    )
    max_drop: float | None = _field(
        None, expect="a number >= 0 (the most compression whose metric is at most this below dense)",
        check=_non_negative,
    )


@dataclass
class CompressSection:
    """Heads and feed-forward neurons removed together to a budget (Kwon et al.'s search), repaired."""

    criterion: str = _field("fisher", expect="a criterion that scores heads and neurons: fisher, taylor or gate_ig")
    split: str = _field("train", expect="one of " + ", ".join(SPLITS), check=_one_of(*SPLITS))
    examples: int = _field(512, expect="a positive integer (rows the units are scored on)", check=_positive)
    batch_size: int = _field(16, expect="a positive integer", check=_positive)
    target: CompressTargetSection = _field(
        CompressTargetSection(latency=0.6), expect="a mapping with latency, flops or max_drop"
    )
    backend: str = _field("torch", expect="torch or onnx (whose latency the latency target counts)",
                          check=_one_of("torch", "onnx"))
    latency_batch_size: int = _field(32, expect="a positive integer (the batch size latency is modelled at)",
                                     check=_positive)
    frontier: list[float] = _field(
        [0.8, 0.7, 0.6, 0.5], expect="a list of numbers strictly between 0 and 1 (budgets measured for the report)",
        check=lambda v: all(0 < x < 1 for x in v),
    )
    repair: str = _field("refit", expect="refit (least squares of the output projections), scales or none",
                         check=_one_of("refit", "scales", "none"))
    calibration_examples: int = _field(256, expect="a positive integer (training rows the repair fits on)",
                                       check=_positive)
    held_out_examples: int = _field(256, expect="a positive integer (training rows that guard the repair)",
                                    check=_positive)


@dataclass
class HealSection:
    """Distillation from the dense model under a wall-clock budget (after compress)."""

    budget: str = _field("10m", expect="a duration like 10m, 90s or 1h")
    max_steps: int | None = _field(None, expect="a positive integer, or null (the budget decides)", check=_positive)
    train_examples: int = _field(12000, expect="a positive integer", check=_positive)
    held_out_examples: int = _field(500, expect="a positive integer (validation rows for early stopping)",
                                    check=_positive)
    lr: float = _field(3e-5, expect="a positive number", check=_positive)
    temperature: float = _field(2.0, expect="a positive number", check=_positive)
    alpha: float = _field(0.5, expect="a number in [0, 1] (weight of the distillation term)",
                          check=lambda v: 0 <= v <= 1)
    batch_size: int = _field(32, expect="a positive integer", check=_positive)
    seed: int = _field(0, expect=_SEED, check=_seed)


@dataclass
class QuantizeSection:
    """Dynamic INT8 quantization of the exported ONNX model (ONNX Runtime), evaluated on the test rows."""

    per_channel: bool = _field(
        True, expect="true or false (per-channel weight scales: on CPUs without VNNI per-tensor INT8 loses accuracy)"
    )


@dataclass
class ReportSection:
    """The report's title (default: the recipe's name)."""

    title: str | None = _field(None, expect="a string")


@dataclass
class Recipe:
    """A validated recipe; optional sections are None when the stage is off."""

    model: str = _field(expect="a model: 'default', 'minilm', a local directory or a hub id")
    name: str | None = _field(None, expect="a string")
    output: str | None = _field(None, expect="an output directory (--out overrides it)")
    seed: int = _field(0, expect=_SEED, check=_seed)
    trust_remote_code: bool = _field(
        False, expect="true or false (true: run Python code a model directory ships, its auto_map)"
    )
    data: DataSection = _field(DataSection(), expect="a mapping (data set spec)")
    finetune: FinetuneSection | None = _field(None, expect="a mapping of fine-tuning options, true or null")
    score: ScoreSection | None = _field(
        ScoreSection(), expect="a mapping (head-importance scoring), or null to skip (then no sweep/prune)"
    )
    sweep: SweepSection | None = _field(SweepSection(), expect="a mapping of sweep options, or null to skip")
    prune: PruneSection | None = _field(PruneSection(), expect="a mapping of pruning options, or null to skip")
    repair: RepairSection | None = _field(None, expect="a mapping of repair options, true or null")
    evaluate: EvaluateSection = _field(EvaluateSection(), expect="a mapping (evaluation)")
    cost: CostSection | None = _field(CostSection(), expect="a mapping of cost options, or null to skip")
    export: ExportSection | None = _field(ExportSection(), expect="a mapping of export options, or null to skip")
    analysis: AnalysisSection | None = _field(None, expect="a mapping with tree and/or triggers, or null")
    compress: CompressSection | None = _field(None, expect="a mapping of compress options, true or null")
    heal: HealSection | None = _field(None, expect="a mapping of heal options, true or null")
    quantize: QuantizeSection | None = _field(None, expect="a mapping of quantize options, true or null")
    report: ReportSection = _field(ReportSection(), expect="a mapping (report options)")
    # not part of the YAML: where it came from (for messages and relative paths)
    source: str = field(default="<recipe>", repr=False, compare=False, metadata={"internal": True})

    def section(self, name: str) -> Any:
        """A section as plain JSON-able data (what stage fingerprints hash)."""
        value = getattr(self, name)
        return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe (defaults filled in), as written to ``OUT/recipe.resolved.yaml``."""
        out = {}
        for item in dataclasses.fields(self):
            if not item.metadata.get("internal"):
                out[item.name] = self.section(item.name)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def title(self) -> str:
        return self.report.title or self.name or Path(self.source).stem


def describe_schema() -> str:
    """Every key with its default and what it expects (``headprune validate --schema``)."""
    lines: list[str] = []

    def walk(cls: type, indent: str) -> None:
        hints = typing.get_type_hints(cls)
        for item in dataclasses.fields(cls):
            if item.metadata.get("internal"):
                continue
            tp = hints[item.name]
            inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
            sub = tp if dataclasses.is_dataclass(tp) else (inner[0] if inner else None)
            if item.default is not dataclasses.MISSING:
                default = item.default
            elif item.default_factory is not dataclasses.MISSING:
                default = item.default_factory()
            else:
                default = "(required)"
            if sub is not None:
                state = "" if default is not None else "  # off unless given"
                lines.append(f"{indent}{item.name}:{state}  # {item.metadata['expect']}")
                walk(sub, indent + "  ")
            else:
                shown = json.dumps(default) if default != "(required)" else default
                lines.append(f"{indent}{item.name}: {shown}  # {item.metadata['expect']}")

    walk(Recipe, "")
    return "\n".join(lines)
