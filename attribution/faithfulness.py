"""Faithfulness of token-relevance methods by deletion (a perturbation benchmark).

For every example and method, the example's tokens are ranked by relevance for the model's
predicted class, and tokens are *deleted* (removed from the sequence, not masked; [CLS]/[SEP] and
other ``keep_ids`` always stay) at fixed fractions of the deletable tokens:

- **positive perturbation**: most relevant first. The accuracy curve should fall fast:
  lower ``positive_auc`` is better.
- **negative perturbation**: least relevant first. The curve should stay high: higher
  ``negative_auc`` is better.
- **comprehensiveness** (ERASER, DeYoung et al. 2020): mean over the bins (1, 5, 10, 20, 50%) of
  ``p(y|x) - p(y|x without the top-k)``; higher is better.
- **sufficiency** (ERASER): mean over the bins of ``p(y|x) - p(y|only the top-k)``; lower is better.
- **AOPC** (Samek et al. 2017): mean over the fractions of ``p(y|x) - p(y|x without the top-k)``
  on the positive curve; higher is better.

``y`` is the class predicted on the full input (the class explained). Accuracy is against the gold
label when the data has labels, else agreement with that prediction. ``k = floor(f * m + 0.5)``
of the ``m`` deletable tokens; ties in relevance are broken by position. An AUC is the trapezoid
area under the curve divided by the fraction range, i.e. the curve's mean height in [0, 1].

All perturbed inputs of a batch of examples (every method, fraction and bin) are de-duplicated,
sorted by length and run through the model in a few large forward calls (``forward_batch_size``
rows each): transformers has milliseconds of fixed overhead per call.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from attribution.core.errors import HeadpruneError
from attribution.core.inputs import inference_setup, validate_inputs
from attribution.core.io import Record, atomic_output
from attribution.relevance import TokenRelevance, make_relevance, special_token_ids  # noqa: F401 (re-export)

DEFAULT_FRACTIONS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(10))  # 0.0 .. 0.9
ERASER_BINS: tuple[float, ...] = (0.01, 0.05, 0.10, 0.20, 0.50)
FORMAT = "headprune.FaithfulnessResult"

Sequence_ = tuple[tuple[int, ...], tuple[int, ...] | None]  # (ids, token types)


def n_deleted(fraction: float, deletable: int) -> int:
    """How many of ``deletable`` tokens a fraction removes: ``floor(f * m + 0.5)``, within [0, m]."""
    return max(0, min(deletable, math.floor(fraction * deletable + 0.5)))


def deletion_order(relevance: Sequence[float], deletable: Sequence[bool], most_relevant_first: bool) -> list[int]:
    """Positions of the deletable tokens in deletion order (ties: lower position first)."""
    sign = -1.0 if most_relevant_first else 1.0
    positions = [i for i, ok in enumerate(deletable) if ok]
    return sorted(positions, key=lambda i: (sign * float(relevance[i]), i))


def delete_tokens(ids: Sequence[int], types: Sequence[int] | None, positions: Iterable[int]) -> Sequence_:
    """``(ids, types)`` without the tokens at ``positions``."""
    drop = set(positions)
    kept = [i for i in range(len(ids)) if i not in drop]
    return tuple(int(ids[i]) for i in kept), (None if types is None else tuple(int(types[i]) for i in kept))


class BatchedPredictor:
    """Class probabilities for many token sequences in few forward calls.

    ``__call__(sequences)`` de-duplicates, sorts by length, pads to the longest of each chunk of
    ``forward_batch_size`` rows and returns ``[N, C]`` float32 probabilities (CPU) in input order.
    ``calls`` counts the model's forward calls.
    """

    def __init__(self, model: PreTrainedModel, pad_id: int = 0, forward_batch_size: int = 512) -> None:
        if forward_batch_size < 1:
            raise HeadpruneError(f"forward_batch_size must be positive, got {forward_batch_size}")
        self.model = model
        self.pad_id = int(pad_id)
        self.forward_batch_size = forward_batch_size
        self.calls = 0

    def __call__(self, sequences: Sequence[Sequence_]) -> torch.Tensor:
        unique = list(dict.fromkeys(sequences))
        where = {seq: i for i, seq in enumerate(unique)}
        order = sorted(range(len(unique)), key=lambda i: len(unique[i][0]))
        device = next(self.model.parameters()).device
        probs: list[torch.Tensor | None] = [None] * len(unique)
        with inference_setup(self.model), torch.no_grad():
            for start in range(0, len(order), self.forward_batch_size):
                chunk = order[start : start + self.forward_batch_size]
                width = max(len(unique[i][0]) for i in chunk)
                ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                types = torch.zeros((len(chunk), width), dtype=torch.long)
                has_types = unique[chunk[0]][1] is not None
                for row, i in enumerate(chunk):
                    seq_ids, seq_types = unique[i]
                    ids[row, : len(seq_ids)] = torch.tensor(seq_ids, dtype=torch.long)
                    mask[row, : len(seq_ids)] = 1
                    if seq_types is not None:
                        types[row, : len(seq_types)] = torch.tensor(seq_types, dtype=torch.long)
                batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
                if has_types:
                    batch["token_type_ids"] = types.to(device)
                out = torch.softmax(self.model(**batch).logits.float(), dim=-1).cpu()
                self.calls += 1
                for row, i in enumerate(chunk):
                    probs[i] = out[row]
        if not unique:
            return torch.zeros(0, 0)
        stacked = torch.stack(probs)  # type: ignore[arg-type]
        return stacked[torch.tensor([where[s] for s in sequences], dtype=torch.long)]


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class MethodFaithfulness:
    """One method's curves and scores (means over examples).

    ``positive``/``negative``: accuracy at each fraction (most/least relevant deleted first);
    ``positive_probability``/``negative_probability``: mean probability of the explained class.
    """

    positive: list[float]
    negative: list[float]
    positive_probability: list[float]
    negative_probability: list[float]
    positive_auc: float
    negative_auc: float
    comprehensiveness: float
    sufficiency: float
    aopc: float
    seconds_per_example: float
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class FaithfulnessResult(Record):
    """The benchmark's outcome: per method a :class:`MethodFaithfulness`, plus the grid and
    provenance (model, data, examples, batch sizes, versions). Saves/loads JSON atomically
    (``save``/``load``, format ``headprune.FaithfulnessResult``)."""

    FORMAT: ClassVar[str] = FORMAT

    fractions: list[float]
    bins: list[float]
    examples: int
    accuracy: float  # on the unperturbed inputs
    reference: str  # "gold" or "prediction": what accuracy is measured against
    methods: dict[str, MethodFaithfulness]
    provenance: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> FaithfulnessResult:
        if isinstance(data, dict) and "format_version" in data:  # written before Record's "version"
            data = {k: v for k, v in data.items() if k != "format_version"}
        return super().from_dict(data, where)

    def table(self) -> str:
        """A markdown table, one row per method (arrows: which direction is better)."""
        lines = [
            "| method | pos. AUC ↓ | neg. AUC ↑ | comprehensiveness ↑ | sufficiency ↓ | AOPC ↑ | s / example |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, m in self.methods.items():
            lines.append(
                f"| {name} | {m.positive_auc:.3f} | {m.negative_auc:.3f} | {m.comprehensiveness:.3f} | "
                f"{m.sufficiency:.3f} | {m.aopc:.3f} | {m.seconds_per_example:.4f} |"
            )
        return "\n".join(lines)

    def summary(self) -> str:
        """One line describing the setting, then the table."""
        model = self.provenance.get("model", "?")
        head = (
            f"{self.examples} examples, model {model}, unperturbed accuracy {self.accuracy:.3f} "
            f"(vs {self.reference}); fractions {self.fractions[0]:g}..{self.fractions[-1]:g}, "
            f"ERASER bins {', '.join(f'{b:g}' for b in self.bins)}"
        )
        return f"{head}\n\n{self.table()}"

    def plot(self, path: str | os.PathLike[str] | None = None) -> Any:
        """Positive and negative accuracy curves per method and the ERASER scores: a matplotlib
        ``Figure`` (no pyplot state), also written as PNG (atomically) when ``path`` is given."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(15, 4.2))
        axes = fig.subplots(1, 3)
        x = [100 * f for f in self.fractions]
        for name, m in self.methods.items():
            style = {"linestyle": "--", "color": "gray"} if name == "random" else {}
            axes[0].plot(x, m.positive, marker="o", markersize=3, label=f"{name} ({m.positive_auc:.3f})", **style)
            axes[1].plot(x, m.negative, marker="o", markersize=3, label=f"{name} ({m.negative_auc:.3f})", **style)
        for ax, title in zip(axes[:2], ("positive: most relevant deleted first (lower is better)",
                                         "negative: least relevant deleted first (higher is better)"), strict=True):
            ax.set_xlabel("% of tokens deleted")
            ax.set_ylabel(f"accuracy (vs {self.reference})")
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        names = list(self.methods)
        pos = np.arange(len(names))
        axes[2].bar(pos - 0.2, [self.methods[n].comprehensiveness for n in names], 0.4, label="comprehensiveness ↑")
        axes[2].bar(pos + 0.2, [self.methods[n].sufficiency for n in names], 0.4, label="sufficiency ↓")
        axes[2].set_xticks(pos, names, rotation=45, ha="right")
        axes[2].set_title("ERASER (probability of the explained class)", fontsize=10)
        axes[2].axhline(0, color="black", linewidth=0.5)
        axes[2].legend(fontsize=7)
        model = self.provenance.get("model", "")
        fig.suptitle(f"deletion faithfulness, {self.examples} examples, {model}", fontsize=10)
        fig.tight_layout()
        if path is not None:
            with atomic_output(path) as tmp:
                fig.savefig(tmp, dpi=120)
        return fig


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


class _Accumulator:
    """Sums over examples for one method."""

    def __init__(self, n_fractions: int) -> None:
        self.positive = np.zeros(n_fractions)
        self.negative = np.zeros(n_fractions)
        self.positive_probability = np.zeros(n_fractions)
        self.negative_probability = np.zeros(n_fractions)
        self.comprehensiveness = 0.0
        self.sufficiency = 0.0
        self.seconds = 0.0


def _auc(curve: Sequence[float], fractions: Sequence[float]) -> float:
    if len(fractions) < 2:
        return float(curve[0])
    x = np.asarray(fractions, dtype=np.float64)
    y = np.asarray(curve, dtype=np.float64)
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2 / (x[-1] - x[0]))


def faithfulness(
    model: PreTrainedModel,
    batches: Iterable[dict[str, torch.Tensor]],
    methods: Sequence[str] | dict[str, TokenRelevance],
    *,
    keep_ids: Sequence[int] = (),
    pad_id: int | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    bins: Sequence[float] = ERASER_BINS,
    forward_batch_size: int = 512,
    max_examples: int | None = None,
    method_options: dict[str, dict[str, Any]] | None = None,
    progress: bool = True,
    total: int | None = None,
) -> FaithfulnessResult:
    """Run the deletion benchmark.

    Args:
        batches: tokenizer batches (``labels`` used when present; ``index`` ignored).
        methods: relevance method names (see ``attribution.relevance``) or ready instances by name.
        keep_ids: token ids never deleted (``special_token_ids(tokenizer)``).
        pad_id: padding id for perturbed batches (default: the model config's, else 0).
        fractions: deletion fractions for the positive/negative curves (sorted, in [0, 1]).
        bins: ERASER rationale sizes for comprehensiveness and sufficiency.
        forward_batch_size: rows per forward call for the perturbed inputs.
        max_examples: stop after this many examples.
        method_options: per method name, constructor options (e.g. ``{"ig": {"n_steps": 20}}``).
        total: examples for the progress bar.

    Returns:
        :class:`FaithfulnessResult`; ``seconds_per_example`` times each method's ``attribute`` on
        these batches (the batch size matters: it is recorded in the provenance).
    """
    fractions = [float(f) for f in fractions]
    bins = [float(b) for b in bins]
    if not fractions or any(not 0 <= f <= 1 for f in fractions) or sorted(fractions) != fractions:
        raise HeadpruneError("fractions must be a non-empty increasing list of numbers in [0, 1]")
    if any(not 0 < b <= 1 for b in bins):
        raise HeadpruneError("ERASER bins must lie in (0, 1]")
    if isinstance(methods, dict):
        explainers = dict(methods)
    else:
        options = method_options or {}
        explainers = {name: make_relevance(name, model, **options.get(name, {})) for name in methods}
    if not explainers:
        raise HeadpruneError("no relevance methods to benchmark")
    if pad_id is None:
        pad_id = getattr(model.config, "pad_token_id", None)
        pad_id = 0 if pad_id is None else int(pad_id)
    keep = {int(i) for i in keep_ids}
    versions = _versions()  # before the long loop: nothing after it should be able to fail
    predictor = BatchedPredictor(model, pad_id, forward_batch_size)
    sums = {name: _Accumulator(len(fractions)) for name in explainers}
    count, correct_full, p_full_sum, reference = 0, 0, 0.0, None
    batch_sizes: list[int] = []
    bar = tqdm(total=max_examples or total, desc="faithfulness", unit="ex", disable=not progress)
    started = time.perf_counter()

    for raw in batches:
        if max_examples is not None and count >= max_examples:
            break
        raw = dict(raw)
        raw.pop("index", None)
        labels = raw.pop("labels", None)
        if max_examples is not None:
            cut = max_examples - count
            raw = {k: v[:cut] for k, v in raw.items()}
            labels = None if labels is None else labels[:cut]
        batch = validate_inputs(model, raw)
        bsz = batch["input_ids"].shape[0]
        batch_sizes.append(bsz)
        mask = batch["attention_mask"].bool().cpu()
        ids_all = batch["input_ids"].cpu()
        types_all = batch.get("token_type_ids")
        types_all = None if types_all is None else types_all.cpu()
        examples: list[Sequence_] = []
        for b in range(bsz):
            n = int(mask[b].sum())
            examples.append(
                (tuple(ids_all[b, :n].tolist()), None if types_all is None else tuple(types_all[b, :n].tolist()))
            )
        full = predictor(examples)  # [B, C]
        predicted = full.argmax(dim=-1)
        p_full = full.gather(1, predicted[:, None])[:, 0]
        reference = reference or ("gold" if labels is not None else "prediction")
        gold = labels.cpu() if labels is not None else predicted
        correct_full += int((predicted == gold).sum())

        relevances: dict[str, torch.Tensor] = {}
        for name, explainer in explainers.items():
            tick = time.perf_counter()
            relevances[name] = explainer.attribute(batch, target=predicted.to(batch["input_ids"].device)).cpu()
            sums[name].seconds += time.perf_counter() - tick

        # Every perturbed sequence of this batch, then one predictor call for all of them.
        plan: list[tuple[str, int, str, int]] = []  # (method, example, kind, grid index)
        sequences: list[Sequence_] = []
        for b, (ids, types) in enumerate(examples):
            deletable = [i not in keep for i in ids]
            m = sum(deletable)
            for name in explainers:
                rel = relevances[name][b, : len(ids)].tolist()
                most = deletion_order(rel, deletable, True)
                least = deletion_order(rel, deletable, False)
                for j, f in enumerate(fractions):
                    k = n_deleted(f, m)
                    plan.append((name, b, "pos", j))
                    sequences.append(delete_tokens(ids, types, most[:k]))
                    plan.append((name, b, "neg", j))
                    sequences.append(delete_tokens(ids, types, least[:k]))
                for j, size in enumerate(bins):
                    k = n_deleted(size, m)
                    plan.append((name, b, "comp", j))
                    sequences.append(delete_tokens(ids, types, most[:k]))
                    plan.append((name, b, "suff", j))
                    sequences.append(delete_tokens(ids, types, most[k:]))
        probs = predictor(sequences)
        for (name, b, kind, j), row in zip(plan, probs, strict=True):
            acc = sums[name]
            cls = int(predicted[b])
            p = float(row[cls])
            if kind in ("pos", "neg"):
                hit = float(int(row.argmax()) == int(gold[b]))
                if kind == "pos":
                    acc.positive[j] += hit
                    acc.positive_probability[j] += p
                else:
                    acc.negative[j] += hit
                    acc.negative_probability[j] += p
            elif kind == "comp":
                acc.comprehensiveness += (float(p_full[b]) - p) / len(bins)
            else:
                acc.sufficiency += (float(p_full[b]) - p) / len(bins)
        count += bsz
        p_full_sum += float(p_full.sum())  # AOPC: mean p(x) minus the mean positive probability curve
        bar.update(bsz)
    bar.close()
    if count == 0:
        raise HeadpruneError("no examples to benchmark")

    results: dict[str, MethodFaithfulness] = {}
    for name, acc in sums.items():
        positive = (acc.positive / count).tolist()
        negative = (acc.negative / count).tolist()
        pos_prob = (acc.positive_probability / count).tolist()
        neg_prob = (acc.negative_probability / count).tolist()
        mean_p_full = p_full_sum / count
        results[name] = MethodFaithfulness(
            positive=positive,
            negative=negative,
            positive_probability=pos_prob,
            negative_probability=neg_prob,
            positive_auc=_auc(positive, fractions),
            negative_auc=_auc(negative, fractions),
            comprehensiveness=acc.comprehensiveness / count,
            sufficiency=acc.sufficiency / count,
            aopc=float(np.mean([mean_p_full - p for p in pos_prob])),
            seconds_per_example=acc.seconds / count,
            options=explainers[name].options(),
        )
    provenance = {
        "model": getattr(model.config, "_name_or_path", "") or model.config.model_type,
        "batch_size": max(batch_sizes),
        "forward_batch_size": forward_batch_size,
        "forward_calls": predictor.calls,
        "keep_ids": sorted(keep),
        "seconds": round(time.perf_counter() - started, 2),
        **versions,
    }
    return FaithfulnessResult(
        fractions=fractions,
        bins=bins,
        examples=count,
        accuracy=correct_full / count,
        reference=reference or "prediction",
        methods=results,
        provenance=provenance,
    )


def _versions() -> dict[str, str]:
    import transformers

    try:
        from attribution import __version__ as version
    except ImportError:  # the package being re-installed under a long run: fall back to its metadata
        from importlib.metadata import version as installed

        version = installed("headprune")
    return {"headprune": version, "torch": torch.__version__, "transformers": transformers.__version__}
