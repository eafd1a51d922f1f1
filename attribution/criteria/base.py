"""Importance criteria as objects, and the one score accumulator every scoring path uses.

A :class:`Criterion` scores one kind of unit (``unit``: ``"head"`` by default, or ``"neuron"``,
see :mod:`.units`): it turns a batch into per-example scores ``[B, L, U]`` (heads: ``[B, L, H]``;
neurons: ``[B, L, F]``), or, with ``needs_data = False``, scores the model directly. It declares
its options (:class:`CriterionOption`: name, default, type, help, choices), validates them itself,
records them in the provenance and reports its own diagnostics (AttAttr: the relative completeness
error). Criteria are registered by name with :func:`register_criterion`, filed by their unit: head
criteria in :data:`CRITERIA` (what the CLI, recipes and :func:`head_importance` use), neuron
criteria in :data:`NEURON_CRITERIA` (:func:`neuron_importance`). A name may exist for both units
(``taylor``, ``fisher``, ``random``, ``gate_ig``).

Scoring is one accumulation, whatever runs it and whatever the unit: a :class:`ScoreAccumulator`
sums per-example scores into a :class:`ScorePartial` (``sum`` ``[L, U]``, ``count``, per-example
diagnostics); partials of shards merge in shard order (:meth:`ScorePartial.merge`);
:func:`finalize_scores` reduces across processes (optional hook), divides or not (``reduction``),
post-processes (``finalize``) and wraps the result in the unit's scores class
(:class:`~attribution.scores.HeadScores` or :class:`~attribution.scores.NeuronScores`) with
provenance. :func:`head_importance`, :func:`neuron_importance` (batches in one process) and
:func:`score_dataset` (a data set, sharded over processes) are that accumulation end to end.
Nothing of size ``[B, L, H, T, T]`` is kept beyond one layer of one batch.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from attribution import instrument
from attribution.core.errors import HeadpruneError
from attribution.core.io import save_tensors
from attribution.criteria.options import _OF_TYPE, CriterionOption, CriterionOptionError
from attribution.criteria.units import HEAD, UNITS, unit_named
from attribution.scores import HeadScores, NeuronScores, UnitScores

Reducer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

# --------------------------------------------------------------------------------------------
# Criterion and registry
# --------------------------------------------------------------------------------------------


class Criterion:
    """Base class of importance criteria (of heads, or of the units ``unit`` names).

    Subclasses set ``name``, ``unit`` (``"head"``, the default, or ``"neuron"``), ``reduction``
    (``"mean"`` or ``"sum"`` over examples), ``needs_data`` and ``OPTIONS`` (a tuple of
    :class:`CriterionOption`; the validated values, defaults filled in, are ``self.settings``), and
    implement ``per_example`` (or ``scores`` when ``needs_data = False``). Optional hooks:
    ``validate_options`` (checks across options), ``finalize`` (post-process the reduced
    ``[L, U]``), ``take_diagnostics``/``summarize`` (per-example diagnostics into provenance
    entries). ``RENAMED`` maps old option names to new
    ones, for a clear error.

    A subclass that defines its own ``__init__`` with keyword defaults instead of ``OPTIONS`` gets
    an ``option_spec`` read from that signature.
    """

    name: ClassVar[str] = ""
    unit: ClassVar[str] = "head"
    reduction: ClassVar[str] = "mean"
    needs_data: ClassVar[bool] = True
    OPTIONS: ClassVar[tuple[CriterionOption, ...]] = ()
    RENAMED: ClassVar[dict[str, str]] = {}

    def __init__(self, **options: Any) -> None:
        self.settings: dict[str, Any] = self.check_options(options)
        self.validate_options()

    # ---- options ---------------------------------------------------------------------------

    @classmethod
    def option_spec(cls) -> dict[str, CriterionOption]:
        """The options this criterion takes, by name."""
        if cls.OPTIONS or cls.__init__ is Criterion.__init__:
            return {option.name: option for option in cls.OPTIONS}
        spec: dict[str, CriterionOption] = {}
        for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
            if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.default is inspect.Parameter.empty:
                continue
            kind = type(p.default) if type(p.default) in (bool, int, float, str) else object
            spec[p.name] = CriterionOption(p.name, p.default, kind, "")
        return spec

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """Validated options with the defaults filled in; a one-line error naming a bad option."""
        spec = cls.option_spec()
        for key in options:
            if key in spec:
                continue
            if key in cls.RENAMED:
                raise CriterionOptionError(cls.name, key, f"renamed to {cls.RENAMED[key]}")
            takes = f"its options: {', '.join(spec)}" if spec else "it takes no options"
            raise CriterionOptionError(cls.name, key, f"not an option of {cls.name} ({takes})")
        return {
            key: option.check(cls.name, options[key]) if key in options else option.default
            for key, option in spec.items()
        }

    def validate_options(self) -> None:
        """Checks across options (raise :class:`CriterionOptionError`); none by default."""

    def options(self) -> dict[str, Any]:
        """Settings recorded in the provenance (enough to construct the criterion again)."""
        return dict(getattr(self, "settings", {}))

    # ---- scoring ---------------------------------------------------------------------------

    def per_example(self, model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, L, U]`` float64 scores of each example (original unit indices, removed units 0;
        heads: ``[B, L, H]``)."""
        raise NotImplementedError(f"criterion {self.name!r} does not score examples")

    def scores(self, model: PreTrainedModel) -> torch.Tensor:
        """``[L, U]`` scores of a criterion that needs no data (``needs_data = False``)."""
        raise NotImplementedError(f"criterion {self.name!r} needs data")

    def finalize(self, values: torch.Tensor) -> torch.Tensor:
        """Post-process the reduced ``[L, U]`` (e.g. per-layer normalisation)."""
        return values

    # ---- diagnostics -----------------------------------------------------------------------

    def take_diagnostics(self) -> dict[str, torch.Tensor]:
        """Per-example diagnostic tensors (first dimension: examples) gathered since the last
        call, then forgotten. None by default."""
        return {}

    def summarize(self, diagnostics: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Provenance entries from the diagnostics of all scored examples. None by default."""
        return {}

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({options})"


CRITERIA: dict[str, type[Criterion]] = {}  # head criteria: head_importance, the CLI, recipes
NEURON_CRITERIA: dict[str, type[Criterion]] = {}  # neuron criteria: neuron_importance
REGISTRIES: dict[str, dict[str, type[Criterion]]] = {"head": CRITERIA, "neuron": NEURON_CRITERIA}


def register_criterion(cls: type[Criterion]) -> type[Criterion]:
    """Class decorator: make a criterion available by its ``name``, in the registry of its ``unit``
    (heads: :data:`CRITERIA`, for ``head_importance``, the CLI's ``--criterion`` and recipes'
    ``score.criteria``; neurons: :data:`NEURON_CRITERIA`, for ``neuron_importance``)."""
    if not (isinstance(cls, type) and issubclass(cls, Criterion)):
        raise TypeError(f"register_criterion takes a Criterion subclass, got {cls!r}")
    if not cls.name or not isinstance(cls.name, str):
        raise TypeError(f"{cls.__name__} needs a name to be registered")
    if cls.reduction not in ("mean", "sum"):
        raise TypeError(f"{cls.__name__}.reduction must be 'mean' or 'sum', got {cls.reduction!r}")
    if cls.unit not in REGISTRIES:
        raise TypeError(f"{cls.__name__}.unit must be one of {', '.join(REGISTRIES)}, got {cls.unit!r}")
    cls.option_spec()  # fails now, not at first use, on an unusable option declaration
    REGISTRIES[cls.unit][cls.name] = cls
    return cls


def make_criterion(criterion: str | Criterion, *, unit: str = "head", **options: Any) -> Criterion:
    """A criterion object scoring ``unit`` (``head`` or ``neuron``): a name registered for that
    unit with its options, or a ``Criterion`` of that unit as it is (then no options). One-line
    errors for unknown names, bad options and a criterion of another unit."""
    registry = REGISTRIES[unit_named(unit).name]
    if isinstance(options.get("method"), str) and options["method"] in registry:  # the former argument name
        raise HeadpruneError(f"method was renamed to criterion: criterion={options['method']!r}")
    if isinstance(criterion, Criterion):
        if options:
            raise HeadpruneError(
                f"options ({', '.join(sorted(options))}) go with a criterion name; "
                f"this {criterion.name} criterion object is already configured"
            )
        if criterion.unit != unit:
            raise HeadpruneError(f"criterion {criterion.name!r} scores {criterion.unit}s, not {unit}s")
        return criterion
    if not isinstance(criterion, str) or criterion not in registry:
        shown = criterion if isinstance(criterion, str) else type(criterion).__name__
        which = "" if unit == "head" else f"{unit} "
        raise HeadpruneError(f"unknown {which}criterion {shown!r}; choose one of {', '.join(registry)}")
    cls = registry[criterion]
    cls.check_options(options)  # also for criteria with their own __init__
    try:
        return cls(**options)
    except TypeError as error:  # a criterion's own __init__ refusing its arguments
        raise HeadpruneError(f"bad option for criterion {criterion!r}: {error}") from None


def scatter_heads(model: PreTrainedModel, per_layer: dict[int, torch.Tensor], batch_size: int) -> torch.Tensor:
    """``{layer: [B, H_l]}`` over a layer's current heads -> ``[B, L, H]`` float64 over the original
    heads (removed heads 0): the layout ``per_example`` returns (any unit: ``Unit.scatter``)."""
    return HEAD.scatter(model, per_layer, batch_size)


def zero_removed_heads(model: PreTrainedModel, values: torch.Tensor) -> torch.Tensor:
    """``values`` ``[..., L, H]`` with the removed heads of ``model`` set to 0 (any unit:
    ``Unit.zero_removed``)."""
    return HEAD.zero_removed(model, values)


# --------------------------------------------------------------------------------------------
# Accumulation
# --------------------------------------------------------------------------------------------

PARTIAL_FORMAT = "headprune.ScorePartial"


@dataclass
class ScorePartial:
    """Summed per-example scores of some examples: ``sum`` ``[L, U]`` float64, ``count`` examples,
    per-example ``diagnostics`` (first dimension: examples), ``seconds`` spent; ``fingerprint``
    is free for the caller (the recipe pipeline stores its stage fingerprint there)."""

    sum: torch.Tensor
    count: int
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0
    fingerprint: str = ""

    @classmethod
    def merge(cls, partials: Iterable[ScorePartial]) -> ScorePartial:
        """One partial of several, summed in the given order (shard order: the same float sums,
        bit for bit, on every rerun); diagnostics concatenated in that order."""
        partials = list(partials)
        if not partials:
            raise HeadpruneError("no partial scores to merge")
        summed = torch.zeros_like(partials[0].sum, dtype=torch.float64)
        diagnostics: dict[str, list[torch.Tensor]] = {}
        for partial in partials:
            if partial.sum.shape != summed.shape:
                raise HeadpruneError(
                    f"cannot merge partial scores of shape {tuple(partial.sum.shape)} and {tuple(summed.shape)}"
                )
            summed += partial.sum
            for key, values in partial.diagnostics.items():
                diagnostics.setdefault(key, []).append(values)
        return cls(
            summed,
            sum(int(p.count) for p in partials),
            {key: torch.cat(parts) for key, parts in diagnostics.items()},
            sum(float(p.seconds) for p in partials),
            partials[0].fingerprint if all(p.fingerprint == partials[0].fingerprint for p in partials) else "",
        )

    def save(self, path: str | os.PathLike[str], fingerprint: str | None = None) -> None:
        """Write atomically (``torch.save`` of plain tensors and values); ``fingerprint``, when
        given, replaces the partial's own before saving."""
        if fingerprint is not None:
            self.fingerprint = str(fingerprint)
        fields = {"sum": self.sum, "count": int(self.count), "diagnostics": dict(self.diagnostics)}
        fields.update(seconds=float(self.seconds), fingerprint=self.fingerprint)
        save_tensors({"format": PARTIAL_FORMAT, "version": 1, **fields}, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ScorePartial:
        """Read a file written by ``save``; a one-line error when it is missing or not one."""
        try:
            data = torch.load(path, weights_only=True)
        except FileNotFoundError:
            raise HeadpruneError(f"partial scores file not found: {path}") from None
        except Exception as error:  # torn, truncated or not a torch file
            raise HeadpruneError(f"{path} is not a readable partial scores file ({type(error).__name__})") from None
        if not isinstance(data, dict) or data.get("format") != PARTIAL_FORMAT:
            raise HeadpruneError(f"{path} is not a {PARTIAL_FORMAT} file")
        summed, count, diagnostics = data.get("sum"), data.get("count"), data.get("diagnostics", {})
        ok = isinstance(diagnostics, dict) and all(isinstance(v, torch.Tensor) for v in diagnostics.values())
        ok = ok and isinstance(summed, torch.Tensor) and summed.dim() == 2 and _OF_TYPE[int](count) and count >= 0
        if not ok:
            raise HeadpruneError(f"{path}: corrupt {PARTIAL_FORMAT} file")
        return cls(
            summed.double(), count, dict(diagnostics), float(data.get("seconds", 0.0)), str(data.get("fingerprint", ""))
        )

    @classmethod
    def load_matching(cls, path: str | os.PathLike[str], fingerprint: str) -> ScorePartial | None:
        """The partial in ``path`` if it is complete and carries ``fingerprint``, else None
        (missing, torn, foreign or stale files are to be recomputed)."""
        try:
            partial = cls.load(path)
        except HeadpruneError:
            return None
        return partial if partial.fingerprint == fingerprint else None


class ScoreAccumulator:
    """Sums ``criterion.per_example`` over batches: ``update(batch)`` per batch, then ``partial()``.

    Used by every scoring path (plain, sharded, multi-process) and every unit (``shape`` is
    ``[L, U]`` of the criterion's unit: ``[L, H]`` for heads, ``[L, F]`` for neurons), so they all
    sum alike.
    """

    def __init__(self, criterion: Criterion, model: PreTrainedModel) -> None:
        self.criterion, self.model = criterion, model
        self.shape = unit_named(criterion.unit).shape(model)
        self.sum = torch.zeros(self.shape, dtype=torch.float64)
        self.count = 0
        self._diagnostics: dict[str, list[torch.Tensor]] = {}
        self._started = time.perf_counter()
        criterion.take_diagnostics()  # forget leftovers of earlier use: a partial holds its own

    def update(self, batch: dict[str, torch.Tensor]) -> int:
        """Score one batch; returns the number of examples added."""
        criterion = self.criterion
        if not criterion.needs_data:
            raise HeadpruneError(f"criterion {criterion.name!r} needs no data: it scores the model itself")
        values = criterion.per_example(self.model, batch)
        if values.dim() != 3 or tuple(values.shape[1:]) != self.shape:
            raise HeadpruneError(
                f"criterion {criterion.name!r} gave per-example scores of shape {tuple(values.shape)}, "
                f"expected [batch, {self.shape[0]}, {self.shape[1]}]"
            )
        self.sum += values.double().sum(dim=0)
        self.count += int(values.shape[0])
        for key, diagnostic in criterion.take_diagnostics().items():
            self._diagnostics.setdefault(key, []).append(diagnostic.detach().cpu())
        return int(values.shape[0])

    def partial(self) -> ScorePartial:
        """What has been summed so far."""
        return ScorePartial(
            self.sum.clone(),
            self.count,
            {key: torch.cat(parts) for key, parts in self._diagnostics.items()},
            time.perf_counter() - self._started,
        )


def finalize_scores(
    criterion: Criterion,
    model: PreTrainedModel,
    partial: ScorePartial | None,
    *,
    reduce: Reducer | None = None,
    provenance: dict[str, Any] | None = None,
) -> UnitScores:
    """Scores from summed scores (``HeadScores``, or ``NeuronScores`` for a neuron criterion):
    ``reduce(sum, count)`` first when given (e.g.
    ``attribution.core.processes.reduce`` to sum over processes), then the mean over examples (or
    the sum, by ``criterion.reduction``), then ``criterion.finalize``. A criterion that needs no
    data scores ``model`` directly (``partial`` is then ignored and may be None).

    The provenance holds the model, its type, the examples, the criterion's options, the kept
    heads (for neurons: the widths and removed neurons), the seconds, package versions and the
    criterion's summary of its diagnostics; ``provenance`` adds (or overrides) entries.
    """
    started = time.perf_counter()
    unit = unit_named(criterion.unit)
    if not criterion.needs_data:
        summed = criterion.scores(model)
        count = 1
    else:
        if partial is None:
            raise HeadpruneError(f"no examples to score {unit.plural} on")
        summed, count = partial.sum, int(partial.count)
        if reduce is not None:
            summed, total = reduce(summed, torch.tensor(float(count), dtype=torch.float64))
            count = int(total)
        if count == 0:
            raise HeadpruneError(f"no examples to score {unit.plural} on")
    values = summed / count if criterion.reduction == "mean" else summed
    values = criterion.finalize(values)
    import transformers

    from attribution import __version__

    seconds = (partial.seconds if partial is not None else 0.0) + time.perf_counter() - started
    record: dict[str, Any] = {
        "model": getattr(model.config, "_name_or_path", "") or model.config.model_type,
        "model_type": model.config.model_type,
        "examples": count if criterion.needs_data else 0,
        "options": criterion.options(),
        **unit.provenance(model),
        "seconds": round(seconds, 3),
        "headprune": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if criterion.needs_data and partial is not None and partial.diagnostics:
        record.update(criterion.summarize(partial.diagnostics))
    record.update(provenance or {})
    return unit.scores(values, criterion.name, record)


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------


def head_importance(
    model: PreTrainedModel,
    batches: Iterable[dict[str, torch.Tensor]],
    criterion: str | Criterion = "attattr",
    *,
    max_examples: int | None = None,
    progress: bool = True,
    reduce: Reducer | None = None,
    total: int | None = None,
    **options: Any,
) -> HeadScores:
    """Score every head of ``model`` on ``batches`` (tokenizer batches; ``labels`` used when present).

    Args:
        criterion: a registered name (``attattr``, ``taylor``, ``fisher``, ``attention``,
            ``random``, ...; see ``CRITERIA``) with its ``options``, or a ``Criterion`` object.
        max_examples: stop after this many examples (the last batch is cut).
        reduce: combines ``(sum [L, H], count [])`` across processes (``core.processes.reduce``).
        total: number of examples for the progress bar, when ``batches`` has no ``len``.
        options: the criterion's options (e.g. ``n_steps``, ``integration`` for attattr).

    Returns:
        ``HeadScores`` with ``values`` ``[L, H]``.
    """
    return _importance(model, batches, criterion, "head", max_examples, progress, reduce, total, options)


def neuron_importance(
    model: PreTrainedModel,
    batches: Iterable[dict[str, torch.Tensor]],
    criterion: str | Criterion = "fisher",
    *,
    max_examples: int | None = None,
    progress: bool = True,
    reduce: Reducer | None = None,
    total: int | None = None,
    **options: Any,
) -> NeuronScores:
    """Score every feed-forward neuron of ``model`` on ``batches``, as :func:`head_importance`
    scores heads (the same accumulation).

    Args:
        criterion: a name in ``NEURON_CRITERIA`` (``fisher``, ``taylor``, ``magnitude``,
            ``random``, ``gate_ig``, ...) with its ``options``, or a neuron ``Criterion`` object.

    Returns:
        ``NeuronScores`` with ``values`` ``[L, F]`` (F the width before pruning; removed neurons 0).
    """
    return _importance(model, batches, criterion, "neuron", max_examples, progress, reduce, total, options)


def _importance(
    model: PreTrainedModel,
    batches: Iterable[dict[str, torch.Tensor]],
    criterion: str | Criterion,
    unit: str,
    max_examples: int | None,
    progress: bool,
    reduce: Reducer | None,
    total: int | None,
    options: dict[str, Any],
) -> Any:
    instrument.model_family(model)
    criterion = make_criterion(criterion, unit=unit, **options)
    accumulator = ScoreAccumulator(criterion, model)
    if criterion.needs_data:
        desc = f"scoring {UNITS[unit].plural} ({criterion.name})"
        bar = tqdm(total=max_examples or total, desc=desc, unit="ex", disable=not progress)
        for batch in batches:
            if max_examples is not None and accumulator.count >= max_examples:
                break
            if max_examples is not None:
                keep = max_examples - accumulator.count
                batch = {k: v[:keep] for k, v in batch.items()}
            bar.update(accumulator.update(batch))
        bar.close()
    return finalize_scores(criterion, model, accumulator.partial(), reduce=reduce)


def score_dataset(
    model: PreTrainedModel,
    tokenizer: Any,
    dataset: Any,
    criterion: str | Criterion,
    *,
    batch_size: int = 16,
    max_length: int = 64,
    max_examples: int | None = None,
    progress: bool = True,
    sort_by_length: bool = False,
    unit: str = "head",
    **options: Any,
) -> UnitScores:
    """:func:`head_importance` (or with ``unit="neuron"`` :func:`neuron_importance`) over
    ``dataset`` (rows with ``text``[, ``text_pair``], ``label``), on one process or sharded across
    the processes of a distributed launch (``accelerate launch``, ``torchrun``): every process
    returns the scores of the whole data set (as one process would, up to float summation order),
    diagnostics included.

    ``max_examples`` takes the first rows of ``dataset`` before sharding; ``sort_by_length``
    batches rows of similar length together (less padding; the same scores up to summation order).
    """
    from attribution.core import processes
    from attribution.core.data import first_rows, iter_batches

    criterion = make_criterion(criterion, unit=unit, **options)
    dataset = first_rows(dataset, max_examples)
    if len(dataset) == 0:
        raise HeadpruneError(f"no examples to score {UNITS[unit].plural} on")
    instrument.model_family(model)
    home = next(model.parameters()).device
    model.to(processes.device())
    try:
        part = processes.shard(dataset)
        accumulator = ScoreAccumulator(criterion, model)
        if criterion.needs_data:
            bar = tqdm(
                total=len(part),
                desc=f"scoring {UNITS[unit].plural} ({criterion.name})",
                unit="ex",
                disable=not (progress and processes.is_main_process()),
            )
            for batch in iter_batches(
                part, tokenizer, batch_size=batch_size, max_length=max_length, sort_by_length=sort_by_length
            ):
                batch.pop("index")
                bar.update(accumulator.update(batch))
            bar.close()
        partial = accumulator.partial()
        if criterion.needs_data and processes.num_processes() > 1:
            partial.diagnostics = _gather_diagnostics(partial.diagnostics)
        scores = finalize_scores(
            criterion,
            model,
            partial,
            reduce=processes.reduce if criterion.needs_data else None,
            provenance={"processes": processes.num_processes()},
        )
    finally:
        model.to(home)
    return scores


def _gather_diagnostics(diagnostics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every process's diagnostics, concatenated in process order (= dataset order for contiguous
    shards); a process with an empty shard contributes nothing."""
    from accelerate.utils import gather_object

    everyone = gather_object([{key: value.cpu() for key, value in diagnostics.items()}])
    keys = list(dict.fromkeys(key for part in everyone for key in part))
    return {key: torch.cat([part[key] for part in everyone if key in part]) for key in keys}
