"""``HeadScores``: one number per attention head, with where it came from."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from attribution.core.errors import HeadpruneError
from attribution.core.io import atomic_write_text

FORMAT_VERSION = 1


@dataclass
class HeadScores:
    """Importance of each head: ``values`` ``[L, H]`` (original head indices; higher = more important).

    ``provenance`` records how the scores were made (model, method options, examples, seed,
    package versions) and travels with them through save/load.
    """

    values: torch.Tensor
    method: str
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
        return HeadScores(values, self.method, {**self.provenance, "normalized": kind})

    # ---- persistence ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "headprune.HeadScores",
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "shape": list(self.shape),
            "values": self.values.tolist(),
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeadScores:
        if not isinstance(data, dict) or data.get("format") != "headprune.HeadScores":
            raise HeadpruneError("not a headprune HeadScores file")
        return cls(torch.tensor(data["values"], dtype=torch.float64), data["method"], data.get("provenance", {}))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write JSON atomically; returns the path."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> HeadScores:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise HeadpruneError(f"scores file not found: {path}") from None
        except json.JSONDecodeError as error:
            raise HeadpruneError(f"scores file {path} is not valid JSON: {error}") from None
        return cls.from_dict(data)

    # ---- display -------------------------------------------------------------------------------

    def plot(self, path: str | os.PathLike[str] | None = None, title: str | None = None, ax: Any = None):
        """Heatmap of ``[L, H]`` (layers bottom-up); saves a PNG when ``path`` is given."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        own = ax is None
        if own:
            fig, ax = plt.subplots(figsize=(1.0 + 0.45 * self.shape[1], 1.0 + 0.45 * self.shape[0]))
        image = ax.imshow(self.values.numpy(), cmap="viridis", aspect="auto", origin="lower")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(self.shape[1]))
        ax.set_yticks(range(self.shape[0]))
        ax.set_title(title or f"head importance: {self.method}")
        ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        if own:
            fig.tight_layout()
            if path is not None:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                fig.savefig(path, dpi=120)
            plt.close(fig)
        return ax

    def __str__(self) -> str:
        top = ", ".join(f"L{layer}H{head}" for layer, head in self.top(5))
        return f"HeadScores({self.method}, {self.shape[0]}x{self.shape[1]}, top: {top})"
