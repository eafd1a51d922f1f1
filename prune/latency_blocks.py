"""The pieces a latency model times: standalone attention and feed-forward blocks built from a
model's first layer, the inputs they run on, and an interleaved timer (``prune.latency`` fits them).

``AttentionBlock`` reproduces the matmuls of transformers' SDPA path for one layer with ``h`` heads
(Q/K/V of the first ``h`` heads, scaled dot-product attention under the padding mask, output
projection, residual, LayerNorm; ``h = 0`` runs a zero-width context through the output projection,
as ``attribution.instrument`` runs a layer without heads). ``FeedForwardBlock`` is
``Linear(d, f)`` -> activation -> ``Linear(f, d)`` + residual -> LayerNorm with the first ``f``
neurons. Both own contiguous copies of their weights, as a pruned model does.
``tests/test_latency.py`` checks them against the model's own layer.
"""

from __future__ import annotations

import copy
import functools
import random
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from attribution import instrument
from attribution.core.errors import HeadpruneError
from prune.export import onnx_session

CLOCKS = ("wall", "cpu")


@dataclass(frozen=True)
class ModelShape:
    """The dense shape a latency model or a FLOP count is for: ``layers`` L, ``heads`` H per layer,
    ``head_size`` d_h, ``hidden`` d, ``ffn`` F (neurons per layer) and ``classes`` C."""

    layers: int
    heads: int
    head_size: int
    hidden: int
    ffn: int
    classes: int


def model_shape(model: PreTrainedModel) -> ModelShape:
    """The *original* (dense) shape of ``model`` from its config and first layer (pruned heads and
    neurons do not change it)."""
    config = model.config
    return ModelShape(
        layers=len(instrument.encoder_layers(model)),
        heads=instrument.original_num_heads(model),
        head_size=instrument.head_size(model),
        hidden=int(getattr(config, "hidden_size", None) or config.dim),
        ffn=int(getattr(config, "intermediate_size", None) or config.hidden_dim),
        classes=int(config.num_labels),
    )



def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` owning contiguous copies of ``weight`` ``[out, in]`` and ``bias`` ``[out]``."""
    out_features, in_features = weight.shape
    with warnings.catch_warnings():  # a zero-width Linear warns on init; it is overwritten anyway
        warnings.simplefilter("ignore", UserWarning)
        linear = nn.Linear(in_features, out_features, bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear.requires_grad_(False)


class AttentionBlock(nn.Module):
    """Self-attention of ``heads`` heads + output projection + residual + LayerNorm, the matmuls of
    transformers' SDPA path. ``forward(hidden [B, T, d], mask [B, 1, T, T] bool or None) -> [B, T, d]``."""

    def __init__(self, parts: dict[str, nn.Module], heads: int, head_size: int) -> None:
        super().__init__()
        width = heads * head_size
        for name in ("query", "key", "value"):
            source = parts[name]
            setattr(self, name, _linear(source.weight[:width], None if source.bias is None else source.bias[:width]))
        out = parts["output"]
        self.output = _linear(out.weight[:, :width], out.bias)
        self.norm = copy.deepcopy(parts["attention_norm"]).requires_grad_(False)
        self.heads, self.head_size, self.scaling = heads, head_size, head_size**-0.5

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        input_shape = hidden.shape[:-1]
        if self.heads:
            split = (*input_shape, -1, self.head_size)
            query = self.query(hidden).view(*split).transpose(1, 2)
            key = self.key(hidden).view(*split).transpose(1, 2)
            value = self.value(hidden).view(*split).transpose(1, 2)
            context = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=self.scaling)
            context = context.transpose(1, 2).reshape(*input_shape, -1).contiguous()
        else:  # as a layer without heads runs: a zero-width context through the output projection
            context = hidden.new_zeros(*input_shape, 0)
        return self.norm(self.output(context) + hidden)


class FeedForwardBlock(nn.Module):
    """``Linear(d, f)`` -> activation -> ``Linear(f, d)`` + residual -> LayerNorm with the first ``f``
    neurons of the real weights. ``forward(hidden [B, T, d]) -> [B, T, d]``."""

    def __init__(self, parts: dict[str, nn.Module], neurons: int) -> None:
        super().__init__()
        up, down = parts["up"], parts["down"]
        self.up = _linear(up.weight[:neurons], up.bias[:neurons] if up.bias is not None else None)
        self.act = parts["activation"]
        self.down = _linear(down.weight[:, :neurons], down.bias)
        self.norm = copy.deepcopy(parts["ffn_norm"]).requires_grad_(False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(self.down(self.act(self.up(hidden))) + hidden)


def layer_parts(model: PreTrainedModel) -> dict[str, nn.Module]:
    """The first layer's pieces: ``query``/``key``/``value``/``output`` (through the family table),
    ``up``/``down`` (the layer's last two ``nn.Linear``: intermediate and output of the FFN in every
    supported family), ``attention_norm``/``ffn_norm`` (its two LayerNorms, in order) and the
    config's ``activation``. The layer must be dense (H heads, F neurons)."""
    from transformers.activations import ACT2FN

    shape = model_shape(model)
    family = instrument.model_family(model)
    layer = instrument.encoder_layers(model)[0]
    attention = instrument.submodule(layer, family.attention)
    parts: dict[str, nn.Module] = {
        "query": instrument.submodule(attention, family.query),
        "key": instrument.submodule(attention, family.key),
        "value": instrument.submodule(attention, family.value),
        "output": instrument.output_projection(model, 0),
    }
    taken = {id(m) for m in parts.values()}
    linears = [m for m in layer.modules() if isinstance(m, nn.Linear) and id(m) not in taken]
    norms = [m for m in layer.modules() if isinstance(m, nn.LayerNorm)]
    if len(linears) < 2 or len(norms) != 2:
        raise HeadpruneError("cannot find the first layer's feed-forward projections and LayerNorms")
    parts.update(up=linears[-2], down=linears[-1], attention_norm=norms[0], ffn_norm=norms[1])
    heads = instrument.heads_per_layer(model)[0]
    width = parts["up"].weight.shape[0]
    if heads != shape.heads or width != shape.ffn or parts["down"].weight.shape != (shape.hidden, width):
        raise HeadpruneError(
            f"fit the latency model on a dense model: layer 0 has {heads} of {shape.heads} heads "
            f"and {width} of {shape.ffn} neurons"
        )
    name = getattr(model.config, "hidden_act", None) or getattr(model.config, "activation", "gelu")
    parts["activation"] = ACT2FN[name] if isinstance(name, str) else name
    return parts


def timing_batch(
    model: PreTrainedModel, batch_size: int, seq_len: int, *, padded: bool | None = None, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Seeded model inputs ``[batch_size, seq_len]`` (every input the model accepts). With ``padded``
    (default: ``batch_size > 1``) row 0 is full and the others have seeded lengths in ``[T/2, T]``."""
    from prune.export import model_input_names

    padded = batch_size > 1 if padded is None else padded
    generator = torch.Generator().manual_seed(seed)
    vocab = int(model.config.vocab_size)
    ids = torch.randint(min(5, vocab - 1), vocab, (batch_size, seq_len), generator=generator)
    mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    if padded:
        lengths = torch.randint(max(1, seq_len // 2), seq_len + 1, (batch_size,), generator=generator)
        lengths[0] = seq_len
        mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
        ids = ids.masked_fill(mask == 0, int(getattr(model.config, "pad_token_id", None) or 0))
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return {k: v for k, v in batch.items() if k in model_input_names(model)}


def block_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` 0/1 padding mask -> the bool ``[B, 1, T, T]`` (True = attend) transformers' SDPA
    path gives each layer."""
    batch, length = attention_mask.shape
    return attention_mask.bool()[:, None, None, :].expand(batch, 1, length, length)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """One thing to time: ``kind`` ``"attention"`` (``width`` heads), ``"ffn"`` (``width`` neurons) or
    ``"model"`` (the whole model); ``run()`` does one forward pass and returns its output."""

    kind: str
    width: int
    run: Callable[[], Any]


Timer = Callable[[Sequence[Block]], list[float]]


def time_interleaved(
    blocks: Sequence[Block],
    *,
    repeats: int = 20,
    warmup: int = 3,
    seed: int = 0,
    clock: str = "wall",
    progress: bool = True,
) -> list[float]:
    """Median milliseconds of each block's ``run()``. Every round runs every block once, in a seeded
    shuffled order, so slow phases of a shared machine and cache effects hit all of them alike.

    ``clock``: ``"wall"`` (``time.perf_counter``, what a user waits) or ``"cpu"`` (the calling
    thread's CPU time, ``time.thread_time``: on an oversubscribed machine it leaves out the time the
    process was descheduled; equal to wall time on an idle one, and only meaningful at one thread,
    where PyTorch and onnxruntime compute on the calling thread)."""
    if repeats < 1 or warmup < 0:
        raise HeadpruneError("repeats must be >= 1 and warmup >= 0")
    if clock not in CLOCKS:
        raise HeadpruneError(f"clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
    now = time.perf_counter if clock == "wall" else time.thread_time
    rng = random.Random(seed)
    times: list[list[float]] = [[] for _ in blocks]
    order = list(range(len(blocks)))
    for step in tqdm(range(warmup + repeats), desc="timing blocks", unit="round", disable=not progress):
        rng.shuffle(order)
        for i in order:
            start = now()
            blocks[i].run()
            elapsed = (now() - start) * 1000
            if step >= warmup:
                times[i].append(elapsed)
    return [statistics.median(t) for t in times]


def pin_malloc_thresholds(mmap_threshold: int = 32 * 2**20) -> bool:
    """Fix glibc malloc's mmap threshold at ``mmap_threshold`` bytes and stop it trimming the heap,
    for this whole process (call it once, before timing). Returns False without glibc (no change).

    glibc adapts the threshold to the largest block freed so far and returns heap tops above twice
    it to the system, so whether a forward pass gets its multi-megabyte activations from the heap or
    from fresh, page-faulted ``mmap`` memory depends on what ran before it. Interleaving many block
    widths (as a latency fit does) moves it all the time: on MiniLM-L6 at batch 32 this made the
    dense model ~40 ms (~10%) slower than the sum of its blocks while pruned models were not, and
    the fit's predictions up to 24% too slow; pinned, the overhead was 7-9 ms and the errors within
    5.5% (``scripts/bench_latency_model.py``, CPU clock). A long-running server repeating one model
    settles in the pinned regime anyway. ONNX Runtime has its own arena and is not affected."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, int(mmap_threshold)) and mallopt(m_trim_threshold, 2**30))


def _torch_run(call: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with torch.inference_mode():
            return call()

    return run


def _export_block(module: nn.Module, args: tuple[torch.Tensor, ...], names: list[str], path: Path) -> Path:
    axes: dict[str, dict[int, str]] = {"hidden": {0: "batch", 1: "sequence"}, "output": {0: "batch", 1: "sequence"}}
    if "mask" in names:
        axes["mask"] = {0: "batch", 2: "sequence", 3: "keys"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer chatter
        torch.onnx.export(
            module, args, str(path), input_names=names, output_names=["output"], dynamic_axes=axes,
            opset_version=17, do_constant_folding=True, dynamo=False,
        )
    return path


def _onnx_run(session: Any, feed: dict[str, Any]) -> Callable[[], Any]:
    wanted = {i.name for i in session.get_inputs()}  # the exporter drops inputs a graph ignores
    feed = {k: v for k, v in feed.items() if k in wanted}

    def run() -> Any:
        return session.run(None, feed)[0]

    return run


def torch_runs(
    model: PreTrainedModel,
    attention: list[AttentionBlock],
    ffn: list[FeedForwardBlock],
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    batch: dict[str, torch.Tensor],
) -> list[Callable[[], Any]]:
    """One inference-mode run each: attention blocks, FFN blocks, then the model (its logits)."""
    runs = [_torch_run(functools.partial(block, hidden, mask)) for block in attention]
    runs += [_torch_run(functools.partial(block, hidden)) for block in ffn]
    runs.append(_torch_run(lambda: model(**batch).logits))
    return runs


def onnx_runs(
    model: PreTrainedModel,
    attention: list[AttentionBlock],
    ffn: list[FeedForwardBlock],
    hidden: torch.Tensor,
    mask: torch.Tensor,
    batch: dict[str, torch.Tensor],
    directory: Path,
    threads: int,
) -> list[Callable[[], Any]]:
    """Export every block and the model to ``directory``; one onnxruntime run each (attention
    blocks, FFN blocks, then the model), sessions on ``threads`` intra-op threads."""
    from prune.export import export_onnx

    runs = []
    hidden_np, mask_np = hidden.numpy(), mask.contiguous().numpy()
    blocks = [(f"attention{i}", block, True) for i, block in enumerate(attention)]
    blocks += [(f"ffn{i}", block, False) for i, block in enumerate(ffn)]
    for name, block, masked in blocks:
        names = ["hidden", "mask"] if masked else ["hidden"]
        args = (hidden, mask) if masked else (hidden,)
        path = _export_block(block, args, names, directory / f"{name}.onnx")
        feed = {"hidden": hidden_np, "mask": mask_np} if masked else {"hidden": hidden_np}
        runs.append(_onnx_run(onnx_session(path, threads), feed))
    path = export_onnx(model, directory / "model.onnx")  # traced on a padded batch, as headprune exports
    runs.append(_onnx_run(onnx_session(path, threads), {k: v.numpy() for k, v in batch.items()}))
    return runs
