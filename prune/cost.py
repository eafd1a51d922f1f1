"""What pruning buys: parameters, FLOPs, measured latency and file size, dense vs pruned.

FLOPs follow DESIGN.md §5 and count one multiply-add as one operation. Per layer and per present
head, at sequence length T with hidden size d and head width d_h:

    attention:     4 * T * d * d_h   (Q, K, V and output projections)  +  2 * T^2 * d_h   (QK^T, AV)
    feed-forward:  2 * T * d         per present neuron (F_l per layer, read from the weights' shapes)
    classifier:    d^2 + d * C       per example (pooler/pre-classifier and output layer)

Element-wise work (softmax, LayerNorm, GELU, embeddings) is left out. ``predicted_speedup`` is the
ratio of these totals, computed at the data's mean token length: what removing heads could give if
the hardware ran FLOPs at a constant rate. Latency is measured, not assumed: median wall time of
repeated forward passes at batch sizes 1 and 32, dense and pruned interleaved in one run so both
see the same machine load. Masked heads still cost their FLOPs; only removed heads are counted out.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from attribution import instrument
from attribution.core.errors import HeadpruneError
from attribution.core.io import Record


@dataclass
class CostReport(Record):
    """Costs of one model. ``latency_ms`` maps a batch size (as a string, for JSON) to the median
    milliseconds per forward pass; ``attention_flops`` and ``total_flops`` are per example at
    ``mean_length`` tokens. Saved as a ``headprune.CostReport`` record."""

    FORMAT: ClassVar[str] = "headprune.CostReport"
    VERSION: ClassVar[int] = 1

    model: str
    heads: int
    heads_per_layer: list[int]
    params: int
    attention_params: int
    mean_length: float
    attention_flops: float
    total_flops: float
    latency_ms: dict[str, float] = field(default_factory=dict)
    latency_repeats: int = 0
    file_bytes: int | None = None
    threads: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _dims(model: PreTrainedModel) -> tuple[int, int, int, int]:
    """``(d, d_h, d_ff, classes)`` from the config (BERT-style or DistilBERT-style names)."""
    config = model.config
    d = int(getattr(config, "hidden_size", None) or config.dim)
    d_ff = int(getattr(config, "intermediate_size", None) or config.hidden_dim)
    return d, instrument.head_size(model), d_ff, int(config.num_labels)


def head_flops(hidden: int, head_size: int, seq_len: float) -> float:
    """Multiply-adds of one head for one example: ``4·T·d·d_h`` (Q, K, V, output) ``+ 2·T²·d_h``."""
    return float(4 * seq_len * hidden * head_size + 2 * seq_len**2 * head_size)


def neuron_flops(hidden: int, seq_len: float) -> float:
    """Multiply-adds of one feed-forward neuron for one example: ``2·T·d``."""
    return float(2 * seq_len * hidden)


def classifier_flops(hidden: int, classes: int) -> float:
    """The fixed per-example part: pooler/pre-classifier ``d²`` plus the output layer ``d·C``."""
    return float(hidden * hidden + hidden * classes)


def attention_flops(model: PreTrainedModel, seq_len: float) -> float:
    """Multiply-adds of all present heads for one example of ``seq_len`` tokens (DESIGN.md §5)."""
    d, d_h, _, _ = _dims(model)
    heads = sum(instrument.heads_per_layer(model))
    return float(heads * head_flops(d, d_h, seq_len))


def model_flops(model: PreTrainedModel, seq_len: float) -> float:
    """Attention + feed-forward + classifier multiply-adds for one example of ``seq_len`` tokens."""
    d, _, _, classes = _dims(model)
    neurons = sum(instrument.neurons_per_layer(model))  # real widths, from the module shapes
    return attention_flops(model, seq_len) + neurons * neuron_flops(d, seq_len) + classifier_flops(d, classes)


def attention_params(model: PreTrainedModel) -> int:
    """Parameters of the attention projections (q/k/v/output weights and biases) of present heads."""
    d, d_h, _, _ = _dims(model)
    heads = sum(instrument.heads_per_layer(model))
    layers = len(instrument.encoder_layers(model))
    return heads * (3 * (d * d_h + d_h) + d * d_h) + layers * d


def file_bytes(model: PreTrainedModel) -> int:
    """Size of the safetensors weights ``save_pruned`` writes for ``model``."""
    from prune.checkpoints import save_pruned

    with tempfile.TemporaryDirectory() as tmp:
        path = save_pruned(model, Path(tmp) / "model")
        return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def mean_token_length(dataset: Any, tokenizer: Any, max_length: int = 64) -> float:
    """Mean tokens per row (special tokens included, truncated at ``max_length``)."""
    pairs = list(dataset["text_pair"]) if "text_pair" in dataset.column_names else None
    ids = tokenizer(list(dataset["text"]), pairs, truncation=True, max_length=max_length)["input_ids"]
    if not ids:
        raise HeadpruneError("cannot measure the length of an empty data set")
    return float(sum(len(x) for x in ids) / len(ids))


def latency_batches(
    dataset: Any, tokenizer: Any, sizes: Sequence[int] = (1, 32), max_length: int = 64, seed: int = 0
) -> dict[int, dict[str, torch.Tensor]]:
    """Fixed inputs for timing: batch size 1 is the row whose length is closest to the mean; larger
    sizes are a seeded sample of rows padded to their longest."""
    if len(dataset) == 0:
        raise HeadpruneError("cannot build timing batches from an empty data set")
    lengths = [len(x) for x in tokenizer(list(dataset["text"]), truncation=True, max_length=max_length)["input_ids"]]
    mean = sum(lengths) / len(lengths)
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for size in sizes:
        if size == 1:
            rows = [min(range(len(lengths)), key=lambda i: abs(lengths[i] - mean))]
        else:
            rows = torch.randperm(len(dataset), generator=generator)[:size].tolist()
        chunk = dataset.select(rows)
        pairs = list(chunk["text_pair"]) if "text_pair" in chunk.column_names else None
        encoded = tokenizer(
            list(chunk["text"]), pairs, truncation=True, max_length=max_length, padding="longest", return_tensors="pt"
        )
        out[size] = dict(encoded)
    return out


@torch.inference_mode()
def measure_latency(
    models: Mapping[str, PreTrainedModel],
    batches: Mapping[int, dict[str, torch.Tensor]],
    *,
    repeats: int = 30,
    warmup: int = 3,
    progress: bool = True,
) -> dict[str, dict[int, float]]:
    """Median milliseconds per forward pass, ``{model name: {batch size: ms}}``.

    Models and batch sizes are interleaved within every repeat, so slow phases of a shared
    machine hit all of them alike (side-by-side measurement).
    """
    if repeats < 1 or warmup < 0:
        raise HeadpruneError("repeats must be >= 1 and warmup >= 0")
    for model in models.values():
        model.eval()
    times: dict[str, dict[int, list[float]]] = {name: {size: [] for size in batches} for name in models}
    for step in tqdm(range(warmup + repeats), desc="timing", unit="round", disable=not progress):
        for size, batch in batches.items():
            for name, model in models.items():
                start = time.perf_counter()
                model(**batch)
                elapsed = time.perf_counter() - start
                if step >= warmup:
                    times[name][size].append(elapsed * 1000)
    return {name: {size: statistics.median(v) for size, v in per.items()} for name, per in times.items()}


def cost_report(
    model: PreTrainedModel,
    mean_length: float,
    *,
    name: str = "",
    latency_ms: Mapping[int, float] | None = None,
    repeats: int = 0,
    with_file_size: bool = True,
) -> CostReport:
    """Static costs of ``model`` (params, FLOPs at ``mean_length``, file size) plus a latency
    measurement made elsewhere (``measure_latency``)."""
    if mean_length <= 0:
        raise HeadpruneError(f"mean_length must be positive, got {mean_length}")
    return CostReport(
        model=name or str(getattr(model.config, "_name_or_path", "")),
        heads=sum(instrument.heads_per_layer(model)),
        heads_per_layer=instrument.heads_per_layer(model),
        params=sum(p.numel() for p in model.parameters()),
        attention_params=attention_params(model),
        mean_length=float(mean_length),
        attention_flops=attention_flops(model, mean_length),
        total_flops=model_flops(model, mean_length),
        latency_ms={str(k): float(v) for k, v in (latency_ms or {}).items()},
        latency_repeats=repeats,
        file_bytes=file_bytes(model) if with_file_size else None,
        threads=torch.get_num_threads(),
    )


def compare_costs(dense: CostReport, pruned: CostReport) -> dict[str, Any]:
    """Dense/pruned ratios: ``predicted_speedup`` (total FLOPs), ``attention_flops_ratio``,
    ``measured_speedup`` per batch size, ``params_ratio`` and ``file_ratio``."""
    measured = {
        size: dense.latency_ms[size] / pruned.latency_ms[size]
        for size in dense.latency_ms
        if size in pruned.latency_ms and pruned.latency_ms[size] > 0
    }
    return {
        "predicted_speedup": dense.total_flops / pruned.total_flops,
        "attention_flops_ratio": dense.attention_flops / pruned.attention_flops if pruned.attention_flops else None,
        "measured_speedup": measured,
        "params_ratio": dense.params / pruned.params,
        "file_ratio": (dense.file_bytes / pruned.file_bytes) if dense.file_bytes and pruned.file_bytes else None,
    }


def format_comparison(dense: CostReport, pruned: CostReport) -> str:
    """A small text table of the two reports and their ratios."""
    ratios = compare_costs(dense, pruned)
    rows = [
        ("heads", f"{dense.heads}", f"{pruned.heads}", ""),
        ("parameters", f"{dense.params:,}", f"{pruned.params:,}", f"{ratios['params_ratio']:.2f}x"),
        (
            f"attention MACs @ T={dense.mean_length:.1f}",
            f"{dense.attention_flops / 1e6:.1f} M",
            f"{pruned.attention_flops / 1e6:.1f} M",
            "",
        ),
        (
            "total MACs (predicted speedup)",
            f"{dense.total_flops / 1e6:.1f} M",
            f"{pruned.total_flops / 1e6:.1f} M",
            f"{ratios['predicted_speedup']:.2f}x",
        ),
    ]
    for size, speedup in ratios["measured_speedup"].items():
        rows.append(
            (
                f"latency batch {size} (median)",
                f"{dense.latency_ms[size]:.2f} ms",
                f"{pruned.latency_ms[size]:.2f} ms",
                f"{speedup:.2f}x measured",
            )
        )
    if dense.file_bytes and pruned.file_bytes:
        sizes = (f"{dense.file_bytes / 1e6:.1f} MB", f"{pruned.file_bytes / 1e6:.1f} MB")
        rows.append(("file size", *sizes, f"{ratios['file_ratio']:.2f}x"))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}}  {'dense':>14}  {'pruned':>14}  ratio"]
    lines += [f"{a:{width}}  {b:>14}  {c:>14}  {d}" for a, b, c, d in rows]
    return "\n".join(lines)
