"""``HeadScores`` and ``NeuronScores``: one number per attention head or feed-forward neuron, with
where it came from (a common base, ``UnitScores``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from attribution.core.errors import HeadpruneError
from attribution.core.io import Record, read_json


@dataclass
class UnitScores(Record):
    """Importance of each prunable unit of one kind: ``values`` ``[L, U]`` float64 (original unit
    indices, removed units 0; higher = more important).

    The common base of :class:`HeadScores` (``UNIT = "head"``, ``[L, H]``) and
    :class:`NeuronScores` (``UNIT = "neuron"``, ``[L, F]``, F the feed-forward width before any
    pruning). ``criterion`` names what scored them; ``provenance`` records how (model, the
    criterion's options, examples, package versions, diagnostics) and travels with them through
    save/load. Saved as JSON ``{"format", "version", "criterion", "shape", "values", "provenance"}``.

    Timings (``TIMING_KEYS``: the seconds a scoring took) stay in memory (:attr:`timing`) but are
    not saved: the file's bytes depend only on what was computed, so identical runs write
    identical files (a pipeline run keeps its times in ``stages/<stage>.time.json``).
    """

    UNIT: ClassVar[str] = ""
    LETTER: ClassVar[str] = ""  # in names like L0H3 / L0N17
    TIMING_KEYS: ClassVar[tuple[str, ...]] = ("seconds", "seconds_this_run")

    values: torch.Tensor
    criterion: str
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.values = torch.as_tensor(self.values, dtype=torch.float64).detach().cpu()
        if self.values.dim() != 2:
            raise HeadpruneError(
                f"{self.UNIT} scores must be [layers, {self.UNIT}s], got shape {tuple(self.values.shape)}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        """``(L, U)``."""
        return (int(self.values.shape[0]), int(self.values.shape[1]))

    # ---- ranking -------------------------------------------------------------------------------

    def ranking(self, descending: bool = True) -> list[tuple[int, int]]:
        """All units as ``(layer, unit)``, most important first (ties broken by position)."""
        order = torch.sort(self.values.flatten(), descending=descending, stable=True).indices
        width = self.shape[1]
        return [(i // width, i % width) for i in order.tolist()]

    def top(self, k: int) -> list[tuple[int, int]]:
        """The ``k`` most important units."""
        return self.ranking()[:k]

    def ranks(self) -> torch.Tensor:
        """``[L, U]`` rank of each unit, 0 = most important."""
        order = torch.sort(self.values.flatten(), descending=True, stable=True).indices
        ranks = torch.empty(self.values.numel(), dtype=torch.long)
        ranks[order] = torch.arange(self.values.numel())
        return ranks.view(self.shape)

    def spearman(self, other: UnitScores) -> float:
        """Spearman rank correlation with another scoring of the same units (ties get average ranks)."""
        from scipy.stats import spearmanr

        if other.shape != self.shape:
            raise HeadpruneError(f"cannot compare {self.UNIT} scores of shape {self.shape} and {other.shape}")
        return float(spearmanr(self.values.flatten().numpy(), other.values.flatten().numpy()).statistic)

    def normalized(self, kind: str = "layer_l2") -> UnitScores:
        """A copy normalised by ``layer_l2`` (Michel et al.: each layer to unit L2 norm) or ``max``."""
        values = self.values.clone()
        if kind == "layer_l2":
            norms = values.norm(dim=1, keepdim=True)
            values = values / torch.where(norms > 0, norms, torch.ones_like(norms))
        elif kind == "max":
            peak = values.abs().max()
            values = values / peak if peak > 0 else values
        else:
            raise HeadpruneError(f"unknown normalisation {kind!r}; choose layer_l2 or max")
        return type(self)(values, self.criterion, {**self.provenance, "normalized": kind})

    # ---- persistence ---------------------------------------------------------------------------

    @property
    def timing(self) -> dict[str, Any]:
        """The provenance's timing entries (not saved)."""
        return {k: v for k, v in self.provenance.items() if k in self.TIMING_KEYS}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.FORMAT,
            "version": self.VERSION,
            "criterion": self.criterion,
            "shape": list(self.shape),
            "values": self.values.tolist(),
            "provenance": {k: v for k, v in self.provenance.items() if k not in self.TIMING_KEYS},
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> UnitScores:
        """From ``to_dict``'s mapping (or an older version's); one-line errors naming ``where``."""
        kind_name = cls.FORMAT.split(".")[-1]
        where = where or kind_name
        if not isinstance(data, dict) or data.get("format") != cls.FORMAT:
            kind = data.get("format") if isinstance(data, dict) else None
            found = f"a {kind} file" if isinstance(kind, str) else "no headprune file"
            raise HeadpruneError(f"{where}: not a headprune {kind_name} file (found {found})")
        version = data.get("version", data.get("format_version", 1))
        if isinstance(version, bool) or not isinstance(version, int) or version > cls.VERSION:
            raise HeadpruneError(
                f"{where}: {cls.FORMAT} version {version!r} is newer than this headprune reads ({cls.VERSION})"
            )
        key = cls._criterion_key(version)
        criterion = data.get(key)
        if not isinstance(criterion, str):
            raise HeadpruneError(f"{where}: {key}: expected the criterion's name, got {_describe(criterion)}")
        provenance = data.get("provenance", {})
        if provenance is None:
            provenance = {}
        if not isinstance(provenance, dict):
            raise HeadpruneError(f"{where}: provenance: expected a mapping, got {_describe(provenance)}")
        provenance = cls._upgrade(criterion, provenance, version)
        values = _matrix(data.get("values"), where, cls.UNIT)
        shape = data.get("shape")
        if shape is not None and shape != [len(values), len(values[0])]:
            raise HeadpruneError(f"{where}: shape says {shape}, but the values are {len(values)} x {len(values[0])}")
        return cls(torch.tensor(values, dtype=torch.float64), criterion, provenance)

    @classmethod
    def _criterion_key(cls, version: int) -> str:
        """Where a file of ``version`` names its criterion."""
        return "criterion"

    @classmethod
    def _upgrade(cls, criterion: str, provenance: dict[str, Any], version: int) -> dict[str, Any]:
        """The provenance of an older file as the current version writes it."""
        return provenance

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> UnitScores:
        """Read a scores file; one-line errors for a missing, non-JSON or malformed file."""
        return cls.from_dict(read_json(path, what="scores file"), where=str(path))

    # ---- display -------------------------------------------------------------------------------

    def plot(self, path: str | os.PathLike[str] | None = None, title: str | None = None, ax: Any = None):
        """Heatmap of ``[L, U]`` (layers bottom-up). Draws into ``ax`` when given, else into a new
        figure, saved as ``path`` when given (no pyplot state either way). Returns the axes."""
        from matplotlib.figure import Figure

        from attribution.core.io import atomic_output

        layers, width = self.shape
        fig = None
        if ax is None:
            fig = Figure(figsize=(min(1.0 + 0.45 * width, 12.0), 1.0 + 0.45 * layers))
            ax = fig.add_subplot()
        image = ax.imshow(self.values.numpy(), cmap="viridis", aspect="auto", origin="lower")
        ax.set_xlabel(self.UNIT)
        ax.set_ylabel("layer")
        if width <= 32:  # one tick per unit while they are legible
            ax.set_xticks(range(width))
        ax.set_yticks(range(layers))
        ax.set_title(title or f"{self.UNIT} importance: {self.criterion}")
        ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        if fig is not None:
            fig.tight_layout()
            if path is not None:
                with atomic_output(path) as tmp:
                    fig.savefig(tmp, dpi=120)
        elif path is not None:
            with atomic_output(path) as tmp:
                ax.figure.savefig(tmp, dpi=120)
        return ax

    def __str__(self) -> str:
        top = ", ".join(f"L{layer}{self.LETTER}{unit}" for layer, unit in self.top(5))
        return f"{type(self).__name__}({self.criterion}, {self.shape[0]}x{self.shape[1]}, top: {top})"


@dataclass
class HeadScores(UnitScores):
    """Importance of each head: ``values`` ``[L, H]`` (original head indices; higher = more important).

    ``criterion`` names what scored them; ``provenance`` records how (model, the criterion's
    options, examples, package versions, diagnostics) and travels with them through save/load.
    Saved as JSON ``{"format": "headprune.HeadScores", "version": 2, "criterion", "shape",
    "values", "provenance"}``; version-1 files (``format_version`` 1, ``method``) still load.
    """

    FORMAT: ClassVar[str] = "headprune.HeadScores"
    VERSION: ClassVar[int] = 2
    UNIT: ClassVar[str] = "head"
    LETTER: ClassVar[str] = "H"

    @classmethod
    def _criterion_key(cls, version: int) -> str:
        return "criterion" if version >= 2 else "method"

    @classmethod
    def _upgrade(cls, criterion: str, provenance: dict[str, Any], version: int) -> dict[str, Any]:
        return _upgrade_provenance(criterion, provenance) if version < 2 else provenance


@dataclass
class NeuronScores(UnitScores):
    """Importance of each feed-forward neuron: ``values`` ``[L, F]`` (F the intermediate width
    before any pruning; original neuron indices, removed neurons 0; higher = more important).

    Saved as JSON ``{"format": "headprune.NeuronScores", "version": 1, "criterion", "shape",
    "values", "provenance"}``; the provenance names the neurons a pruned model had lost
    (``removed_neurons``, per layer) and its widths (``neurons_per_layer``).
    """

    FORMAT: ClassVar[str] = "headprune.NeuronScores"
    VERSION: ClassVar[int] = 1
    UNIT: ClassVar[str] = "neuron"
    LETTER: ClassVar[str] = "N"


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        return f"a {'mapping' if isinstance(value, dict) else 'list'}"
    return repr(value)


def _matrix(values: Any, where: str, unit: str = "head") -> list[list[float]]:
    """``values`` checked to be a non-empty rectangular matrix of numbers (NaN/inf allowed as
    floats; ``check_scores`` refuses them where they matter)."""
    if not isinstance(values, list) or not values or not all(isinstance(row, list) for row in values):
        raise HeadpruneError(
            f"{where}: values: expected an [layers, {unit}s] matrix of numbers, got {_describe(values)}"
        )
    width = len(values[0])
    for i, row in enumerate(values):
        if len(row) != width or not row:
            raise HeadpruneError(f"{where}: values: ragged matrix (row 0 has {width} {unit}s, row {i} has {len(row)})")
        for j, value in enumerate(row):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise HeadpruneError(f"{where}: values[{i}][{j}]: expected a number, got {_describe(value)}")
    return values


def _upgrade_provenance(criterion: str, provenance: dict[str, Any]) -> dict[str, Any]:
    """Version 1 called attattr's quadrature rule ``method``; now ``integration``."""
    options = provenance.get("options")
    if criterion == "attattr" and isinstance(options, dict) and "method" in options and "integration" not in options:
        options = {("integration" if k == "method" else k): v for k, v in options.items()}
        provenance = {**provenance, "options": options}
    return provenance
