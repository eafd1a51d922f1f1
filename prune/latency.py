"""A fitted latency model: what a model with given heads and FFN neurons per layer costs on this machine.

The approach of Kwon et al. (NeurIPS 2022, "A Fast Post-Training Pruning Framework for
Transformers"): time one encoder layer's attention block with ``h = 0..H`` heads and its
feed-forward block with ``f`` neurons on a grid over ``0..F``, then predict a pruned model as

    predict(heads, neurons) = overhead + sum_l attention(h_l) + sum_l ffn(f_l)

interpolating piecewise-linearly between grid points (they observed latency flat below a
threshold and linear above; a dense enough grid captures both). One ``LatencyModel`` is valid for
one backend (PyTorch or ONNX Runtime), batch size, sequence length, thread count and model shape.

Decisions the paper leaves open, taken here:

- **The blocks** (``prune.latency_blocks``) are standalone modules built from the first layer's
  real weights (every layer of an encoder has the same shape): attention = Q/K/V projections of the
  first ``h`` heads, scaled dot-product attention with the model's padding mask ``[B, 1, T, T]``
  (bool; ``None`` when nothing is padded, as transformers' SDPA path does), output projection,
  residual and LayerNorm; with ``h = 0`` a zero-width context through the output projection (its
  bias), as ``attribution.instrument`` runs a layer without heads. Feed-forward = ``Linear(d, f)``
  -> activation -> ``Linear(f, d)`` + residual -> LayerNorm, with the first ``f`` rows/columns of
  the real weights. Each grid point owns a contiguous copy of its weights (as a pruned model does),
  so interleaved timing leaves them as cold in cache as a layer's weights are in a full forward pass.
  For ONNX Runtime each block (and the dense model, through ``prune.export``) is exported to a
  temporary directory and run in a session with the same thread count.
- **The allocator**: with glibc, PyTorch's multi-megabyte activations come from the heap or from
  fresh page-faulted ``mmap`` memory depending on malloc's adaptive threshold, i.e. on what ran
  before; interleaving many block widths moves it. Call ``latency_blocks.pin_malloc_thresholds()``
  once before timing (the benchmark does): unpinned, the dense model timed ~10% slower than the
  sum of its blocks while pruned models did not (overhead 39-47 ms at batch 32 instead of 7-9),
  and PyTorch predictions came out up to 24% too slow; pinned, within 5.5%. The fit does not change
  process-wide allocator settings by itself.
- **The clock**: wall time by default (what a user waits). ``clock="cpu"`` times the calling
  thread's CPU time instead: on an oversubscribed shared machine (more runnable processes than
  cores) wall time mostly measures the scheduler, CPU time still measures the work; on an idle
  machine the two agree at one thread. Only for ``threads=1``. Measured at ~5 runnable processes
  on 2 cores: wall-clock medians of millisecond blocks were 2-3x their CPU time and batch-1
  predictions off by up to 2x, while batch 32 stayed within 6%.
- **The overhead** (embeddings, mask construction, pooler, classifier, the per-layer Python and
  graph glue the standalone blocks lack) is *measured as the dense model's latency minus the sum of
  its blocks at full width*, all timed interleaved in one run. So ``predict`` at full width equals
  the measured dense latency by construction, and any constant per-layer difference between a
  standalone block and the same block inside the model lands in the overhead instead of in the
  per-unit slopes. It can come out negative (logged, not hidden): for ONNX Runtime it is, a little,
  because every standalone block pays a session call and an input copy that a block inside the
  graph does not.
- **Monotone fit**: medians of a noisy machine need not increase with width; the curves used for
  prediction are their isotonic (pool-adjacent-violators) fit, so removing a unit never predicts a
  slower model. The raw medians are kept in the record beside the fit.
- **Inputs**: hidden states are seeded ``randn [B, T, d]``; with ``padded`` (default: batch size
  > 1, as real batches padded to their longest row are) row 0 is full and the others have seeded
  lengths in ``[T/2, T]``. ONNX blocks always take the mask (the exported model is traced padded).

``flops`` is the multiply-add count of DESIGN.md §5 with the same ``(heads_per_layer,
neurons_per_layer)`` arguments, so a search can take either as its cost
(``functools.partial(flops, shape, seq_len=T)`` or ``latency_model.predict``).
"""

from __future__ import annotations

import bisect
import functools
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel

from attribution.core.errors import HeadpruneError
from attribution.core.io import Record
from attribution.core.log import get_logger
from attribution.core.processes import torch_threads
from prune.cost import classifier_flops, head_flops, neuron_flops
from prune.latency_blocks import (
    CLOCKS,
    AttentionBlock,
    Block,
    FeedForwardBlock,
    ModelShape,
    Timer,
    block_mask,
    layer_parts,
    model_shape,
    onnx_runs,
    time_interleaved,
    timing_batch,
    torch_runs,
)

__all__ = ["BACKENDS", "LatencyModel", "ModelShape", "fit_latency_model", "flops", "model_shape"]

log = get_logger("latency")

BACKENDS = ("torch", "onnx")


def _check_widths(shape: ModelShape, heads_per_layer: Sequence[int], neurons_per_layer: Sequence[int]) -> None:
    if len(heads_per_layer) != shape.layers or len(neurons_per_layer) != shape.layers:
        raise HeadpruneError(
            f"expected {shape.layers} heads and {shape.layers} neuron counts (one per layer), "
            f"got {len(heads_per_layer)} and {len(neurons_per_layer)}"
        )
    if any(not 0 <= h <= shape.heads for h in heads_per_layer):
        raise HeadpruneError(f"heads per layer must be in 0..{shape.heads}, got {list(heads_per_layer)}")
    if any(not 0 <= f <= shape.ffn for f in neurons_per_layer):
        raise HeadpruneError(f"neurons per layer must be in 0..{shape.ffn}, got {list(neurons_per_layer)}")


def flops(
    shape: ModelShape, heads_per_layer: Sequence[int], neurons_per_layer: Sequence[int], seq_len: float
) -> float:
    """Multiply-adds per example of ``seq_len`` tokens (DESIGN.md §5): each head
    ``4·T·d·d_h + 2·T²·d_h``, each neuron ``2·T·d``, plus the fixed classifier ``d² + d·C``.
    Element-wise work is not counted; equals ``prune.cost.model_flops`` on a model of these widths."""
    _check_widths(shape, heads_per_layer, neurons_per_layer)
    if not seq_len > 0:
        raise HeadpruneError(f"seq_len must be positive, got {seq_len}")
    per_head = head_flops(shape.hidden, shape.head_size, seq_len)
    per_neuron = neuron_flops(shape.hidden, seq_len)
    return float(
        sum(heads_per_layer) * per_head
        + sum(neurons_per_layer) * per_neuron
        + classifier_flops(shape.hidden, shape.classes)
    )


def _monotone(values: Sequence[float]) -> list[float]:
    """Non-decreasing least-squares fit of ``values`` (pool adjacent violators, equal weights)."""
    pools: list[list[float]] = []  # [mean, count]
    for value in values:
        pools.append([float(value), 1.0])
        while len(pools) > 1 and pools[-2][0] > pools[-1][0]:
            mean, count = pools.pop()
            pools[-1] = [(pools[-1][0] * pools[-1][1] + mean * count) / (pools[-1][1] + count), pools[-1][1] + count]
    return [mean for mean, count in pools for _ in range(int(count))]


def _interpolate(x: float, xs: Sequence[int], ys: Sequence[float]) -> float:
    """Piecewise-linear ``y(x)`` through the points ``(xs, ys)`` (``xs`` increasing, ``x`` inside)."""
    i = bisect.bisect_left(xs, x)
    if xs[i] == x:
        return float(ys[i])
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return float(y0 + (y1 - y0) * (x - x0) / (x1 - x0))


@dataclass
class LatencyModel(Record):
    """Fitted latency of one model shape on one backend, batch size, sequence length and thread
    count (a ``headprune.LatencyModel`` record). All times in milliseconds per forward pass of a
    ``[batch_size, seq_len]`` batch.

    ``attention_heads`` is ``0..H``; ``ffn_neurons`` the neuron grid (increasing, from 0 to F).
    ``*_measured_ms`` are the medians as timed, ``*_fit_ms`` their monotone fit (what ``predict``
    uses); ``dense_ms`` is the whole dense model timed in the same run, and
    ``overhead_ms = dense_ms - L * (attention_fit(H) + ffn_fit(F))``.
    """

    FORMAT: ClassVar[str] = "headprune.LatencyModel"
    VERSION: ClassVar[int] = 1

    backend: str
    batch_size: int
    seq_len: int
    threads: int
    shape: ModelShape
    attention_heads: list[int]
    attention_measured_ms: list[float]
    attention_fit_ms: list[float]
    ffn_neurons: list[int]
    ffn_measured_ms: list[float]
    ffn_fit_ms: list[float]
    dense_ms: float
    overhead_ms: float
    padded: bool = True
    clock: str = "wall"
    repeats: int = 0
    model: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        shape = self.shape
        if self.backend not in BACKENDS:
            raise HeadpruneError(f"LatencyModel: backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.clock not in CLOCKS:
            raise HeadpruneError(f"LatencyModel: clock must be one of {', '.join(CLOCKS)}, got {self.clock!r}")
        if self.attention_heads != list(range(shape.heads + 1)):
            raise HeadpruneError(f"LatencyModel: attention_heads must be 0..{shape.heads}")
        grid = self.ffn_neurons
        if not grid or grid[0] != 0 or grid[-1] != shape.ffn or sorted(set(grid)) != grid:
            raise HeadpruneError(f"LatencyModel: ffn_neurons must increase from 0 to {shape.ffn}")
        for name, values, grid_ in (
            ("attention_measured_ms", self.attention_measured_ms, self.attention_heads),
            ("attention_fit_ms", self.attention_fit_ms, self.attention_heads),
            ("ffn_measured_ms", self.ffn_measured_ms, grid),
            ("ffn_fit_ms", self.ffn_fit_ms, grid),
        ):
            if len(values) != len(grid_):
                raise HeadpruneError(f"LatencyModel: {name} has {len(values)} values for {len(grid_)} grid points")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LatencyModel:
        """Read a file written by ``save``; one-line errors name the file."""
        try:
            return super().load(path)
        except HeadpruneError as error:
            text = str(error)
            raise HeadpruneError(text if str(path) in text else f"{path}: {text}") from None

    def attention_ms(self, heads: float) -> float:
        """One layer's attention block with ``heads`` heads (``0..H``; fractions interpolate)."""
        if not 0 <= heads <= self.shape.heads:
            raise HeadpruneError(f"heads must be in 0..{self.shape.heads}, got {heads}")
        return _interpolate(heads, self.attention_heads, self.attention_fit_ms)

    def ffn_ms(self, neurons: float) -> float:
        """One layer's feed-forward block with ``neurons`` neurons (``0..F``), piecewise-linear
        between grid points."""
        if not 0 <= neurons <= self.shape.ffn:
            raise HeadpruneError(f"neurons must be in 0..{self.shape.ffn}, got {neurons}")
        return _interpolate(neurons, self.ffn_neurons, self.ffn_fit_ms)

    def predict(self, heads_per_layer: Sequence[int], neurons_per_layer: Sequence[int]) -> float:
        """Predicted milliseconds per forward pass: overhead + Σ_l attention(h_l) + Σ_l ffn(f_l)."""
        _check_widths(self.shape, heads_per_layer, neurons_per_layer)
        return (
            self.overhead_ms
            + sum(self.attention_ms(h) for h in heads_per_layer)
            + sum(self.ffn_ms(f) for f in neurons_per_layer)
        )


def _ffn_grid(ffn: int, grid: Sequence[int] | None) -> list[int]:
    if grid is None:
        grid = [round(ffn * i / 32) for i in range(33)]
    points = sorted({0, ffn, *(int(g) for g in grid)})
    if points[0] < 0 or points[-1] > ffn:
        raise HeadpruneError(f"the neuron grid must lie in 0..{ffn}, got {list(grid)}")
    return points


def _check_fit_args(backend: str, batch_size: int, seq_len: int, threads: int, repeats: int, clock: str) -> None:
    if backend not in BACKENDS:
        raise HeadpruneError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if clock not in CLOCKS:
        raise HeadpruneError(f"clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
    if clock == "cpu" and threads != 1:
        raise HeadpruneError(f"the cpu clock times one thread; use threads=1 (got {threads}) or clock='wall'")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("threads", threads), ("repeats", repeats)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise HeadpruneError(f"{name} must be a positive integer, got {value!r}")


def fit_latency_model(
    model: PreTrainedModel,
    *,
    backend: str = "torch",
    batch_size: int = 32,
    seq_len: int = 33,
    threads: int = 1,
    repeats: int = 20,
    warmup: int = 3,
    grid: Sequence[int] | None = None,
    padded: bool | None = None,
    seed: int = 0,
    clock: str = "wall",
    progress: bool = True,
    timer: Timer | None = None,
) -> LatencyModel:
    """Time ``model``'s blocks and fit a ``LatencyModel`` for ``backend`` at ``[batch_size, seq_len]``
    on ``threads`` threads (torch intra-op threads, or onnxruntime's, during the fit).

    Blocks: attention with 0..H heads, feed-forward at the neuron counts ``grid`` (default
    ``round(F * i / 32)``, i = 0..32; 0 and F are always added) and the whole dense model, timed
    interleaved by ``timer`` (default ``time_interleaved`` with ``repeats``, ``warmup``, ``seed``,
    ``clock``; pass a function of ``list[Block] -> list[ms]`` to inject a fake). For ``"onnx"`` each block and
    the model are exported to a temporary directory and run in onnxruntime. ``model`` must be dense
    in its first layer; it is not modified.
    """
    _check_fit_args(backend, batch_size, seq_len, threads, repeats, clock)
    shape = model_shape(model)
    parts = layer_parts(model)
    neurons = _ffn_grid(shape.ffn, grid)
    padded = batch_size > 1 if padded is None else padded
    batch = timing_batch(model, batch_size, seq_len, padded=padded, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch_size, seq_len, shape.hidden, generator=generator, dtype=parts["up"].weight.dtype)
    mask = block_mask(batch["attention_mask"])
    attention = [AttentionBlock(parts, h, shape.head_size).eval() for h in range(shape.heads + 1)]
    ffn = [FeedForwardBlock(parts, f).eval() for f in neurons]
    timer = timer or functools.partial(
        time_interleaved, repeats=repeats, warmup=warmup, seed=seed, clock=clock, progress=progress
    )
    was_training = model.training
    model.eval()
    kinds = [("attention", h) for h in range(shape.heads + 1)] + [("ffn", f) for f in neurons] + [("model", 0)]
    log.info("timing %d %s blocks, batch %d x %d, %d thread(s)", len(kinds), backend, batch_size, seq_len, threads)
    try:
        with tempfile.TemporaryDirectory(prefix="headprune-latency-") as tmp, torch_threads(threads):
            if backend == "torch":
                runs = torch_runs(model, attention, ffn, hidden, mask if padded else None, batch)
            else:
                runs = onnx_runs(model, attention, ffn, hidden, mask, batch, Path(tmp), threads)
            times = list(timer([Block(kind, width, run) for (kind, width), run in zip(kinds, runs, strict=True)]))
    finally:
        model.train(was_training)
    if len(times) != len(kinds):
        raise HeadpruneError(f"the timer returned {len(times)} times for {len(kinds)} blocks")
    attention_ms = times[: shape.heads + 1]
    ffn_ms = times[shape.heads + 1 : -1]
    attention_fit, ffn_fit = _monotone(attention_ms), _monotone(ffn_ms)
    overhead = times[-1] - shape.layers * (attention_fit[-1] + ffn_fit[-1])
    if overhead < 0:
        log.warning("the dense model (%.3f ms) timed faster than its blocks: overhead %.3f ms", times[-1], overhead)
    return LatencyModel(
        backend=backend,
        batch_size=batch_size,
        seq_len=seq_len,
        threads=threads,
        shape=shape,
        attention_heads=list(range(shape.heads + 1)),
        attention_measured_ms=attention_ms,
        attention_fit_ms=attention_fit,
        ffn_neurons=neurons,
        ffn_measured_ms=ffn_ms,
        ffn_fit_ms=ffn_fit,
        dense_ms=times[-1],
        overhead_ms=overhead,
        padded=padded,
        clock=clock,
        repeats=repeats,
        model=str(getattr(model.config, "_name_or_path", "")),
    )
