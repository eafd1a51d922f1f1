"""``HeadScores``: one number per attention head, with where it came from."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from attribution.core.errors import HeadpruneError
from attribution.core.io import Record, read_json


@dataclass
class HeadScores(Record):
    """Importance of each head: ``values`` ``[L, H]`` (original head indices; higher = more important).

    ``criterion`` names what scored them; ``provenance`` records how (model, the criterion's
    options, examples, package versions, diagnostics) and travels with them through save/load.
    Saved as JSON ``{"format": "headprune.HeadScores", "version": 2, "criterion", "shape",
    "values", "provenance"}``; version-1 files (``format_version`` 1, ``method``) still load.
    """

    FORMAT: ClassVar[str] = "headprune.HeadScores"
    VERSION: ClassVar[int] = 2

    values: torch.Tensor
    criterion: str
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.values = torch.as_tensor(self.values, dtype=torch.float64).detach().cpu()
        if self.values.dim() != 2:
            raise HeadpruneError(f"head scores must be [layers, heads], got shape {tuple(self.values.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        """``(L, H)``."""
        return (int(self.values.shape[0]), int(self.values.shape[1]))

    # ---- ranking -------------------------------------------------------------------------------

    def ranking(self, descending: bool = True) -> list[tuple[int, int]]:
        """All heads as ``(layer, head)``, most important first (ties broken by position)."""
        flat = self.values.flatten()
        order = sorted(range(flat.numel()), key=lambda i: (-flat[i].item() if descending else flat[i].item(), i))
        heads = self.shape[1]
        return [(i // heads, i % heads) for i in order]

    def top(self, k: int) -> list[tuple[int, int]]:
        """The ``k`` most important heads."""
        return self.ranking()[:k]

    def ranks(self) -> torch.Tensor:
        """``[L, H]`` rank of each head, 0 = most important."""
        ranks = torch.empty(self.values.numel(), dtype=torch.long)
        heads = self.shape[1]
        for rank, (layer, head) in enumerate(self.ranking()):
            ranks[layer * heads + head] = rank
        return ranks.view(self.shape)

    def spearman(self, other: HeadScores) -> float:
        """Spearman rank correlation with another scoring of the same heads (ties get average ranks)."""
        from scipy.stats import spearmanr

        if other.shape != self.shape:
            raise HeadpruneError(f"cannot compare head scores of shape {self.shape} and {other.shape}")
        return float(spearmanr(self.values.flatten().numpy(), other.values.flatten().numpy()).statistic)

    def normalized(self, kind: str = "layer_l2") -> HeadScores:
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
        return HeadScores(values, self.criterion, {**self.provenance, "normalized": kind})

    # ---- persistence ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.FORMAT,
            "version": self.VERSION,
            "criterion": self.criterion,
            "shape": list(self.shape),
            "values": self.values.tolist(),
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> HeadScores:
        """From ``to_dict``'s mapping (or a version-1 one); one-line errors naming ``where``."""
        where = where or "HeadScores"
        if not isinstance(data, dict) or data.get("format") != cls.FORMAT:
            kind = data.get("format") if isinstance(data, dict) else None
            found = f"a {kind} file" if isinstance(kind, str) else "no headprune file"
            raise HeadpruneError(f"{where}: not a headprune HeadScores file (found {found})")
        version = data.get("version", data.get("format_version", 1))
        if isinstance(version, bool) or not isinstance(version, int) or version > cls.VERSION:
            raise HeadpruneError(
                f"{where}: {cls.FORMAT} version {version!r} is newer than this headprune reads ({cls.VERSION})"
            )
        key = "criterion" if version >= 2 else "method"
        criterion = data.get(key)
        if not isinstance(criterion, str):
            raise HeadpruneError(f"{where}: {key}: expected the criterion's name, got {_describe(criterion)}")
        provenance = data.get("provenance", {})
        if provenance is None:
            provenance = {}
        if not isinstance(provenance, dict):
            raise HeadpruneError(f"{where}: provenance: expected a mapping, got {_describe(provenance)}")
        if version < 2:
            provenance = _upgrade_provenance(criterion, provenance)
        values = _matrix(data.get("values"), where)
        shape = data.get("shape")
        if shape is not None and shape != [len(values), len(values[0])]:
            raise HeadpruneError(
                f"{where}: shape says {shape}, but the values are {len(values)} x {len(values[0])}"
            )
        return cls(torch.tensor(values, dtype=torch.float64), criterion, provenance)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> HeadScores:
        """Read a scores file; one-line errors for a missing, non-JSON or malformed file."""
        return cls.from_dict(read_json(path, what="scores file"), where=str(path))

    # ---- display -------------------------------------------------------------------------------

    def plot(self, path: str | os.PathLike[str] | None = None, title: str | None = None, ax: Any = None):
        """Heatmap of ``[L, H]`` (layers bottom-up). Draws into ``ax`` when given, else into a new
        figure, saved as ``path`` when given (no pyplot state either way). Returns the axes."""
        from matplotlib.figure import Figure

        from attribution.core.io import atomic_output

        fig = None
        if ax is None:
            fig = Figure(figsize=(1.0 + 0.45 * self.shape[1], 1.0 + 0.45 * self.shape[0]))
            ax = fig.add_subplot()
        image = ax.imshow(self.values.numpy(), cmap="viridis", aspect="auto", origin="lower")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(self.shape[1]))
        ax.set_yticks(range(self.shape[0]))
        ax.set_title(title or f"head importance: {self.criterion}")
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
        top = ", ".join(f"L{layer}H{head}" for layer, head in self.top(5))
        return f"HeadScores({self.criterion}, {self.shape[0]}x{self.shape[1]}, top: {top})"


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        return f"a {'mapping' if isinstance(value, dict) else 'list'}"
    return repr(value)


def _matrix(values: Any, where: str) -> list[list[float]]:
    """``values`` checked to be a non-empty rectangular matrix of numbers (NaN/inf allowed as
    floats; ``check_scores`` refuses them where they matter)."""
    if not isinstance(values, list) or not values or not all(isinstance(row, list) for row in values):
        raise HeadpruneError(f"{where}: values: expected an [layers, heads] matrix of numbers, got {_describe(values)}")
    width = len(values[0])
    for i, row in enumerate(values):
        if len(row) != width or not row:
            raise HeadpruneError(
                f"{where}: values: ragged matrix (row 0 has {width} heads, row {i} has {len(row)})"
            )
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
