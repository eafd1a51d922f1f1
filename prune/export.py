"""Export a (pruned) classifier to ONNX, check it in onnxruntime, and time it.

:func:`export_directory` writes the layout ONNX Runtime users and Optimum expect: a directory with
``model.onnx``, the model's ``config.json`` and the tokenizer files (Optimum's
``ORTModelForSequenceClassification.from_pretrained(directory)`` and a plain
``AutoTokenizer.from_pretrained(directory)`` + ``onnxruntime.InferenceSession`` read it); the INT8
model of ``prune.quantize`` goes beside it as ``model_quantized.onnx``, Optimum's name.

The graph takes ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the model has
them), each ``[batch, sequence]`` with both axes dynamic, and returns ``logits [batch, classes]``.
It is exported with the TorchScript-based exporter (``dynamo=False``; the dynamo exporter needs
the ``onnxscript`` package) from a *padded* example batch, so the padding-mask path is what gets
traced, and checked in onnxruntime against PyTorch on batches of other sizes and lengths, padded
and unpadded (a trace that baked in one shape would fail there, not in production).

Layers that lost every head run a patched attention forward (``attribution.instrument``: the
attention output is the output projection's bias); it traces to a zero-width matmul plus bias,
which onnxruntime runs. The check below would catch it if a future version did not. Layers that
lost every feed-forward neuron need no patch: ``Linear(d, 0)``, the activation and ``Linear(0, d)``
trace to zero-width matmuls plus the output bias, which onnxruntime runs too (tested).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel

from attribution import instrument
from attribution.core.errors import HeadpruneError
from attribution.core.io import Record, atomic_directory, atomic_output

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
ONNX_FILE = "model.onnx"
QUANTIZED_FILE = "model_quantized.onnx"  # Optimum's ORTQuantizer name: <stem>_quantized.onnx


@dataclass
class OnnxExport(Record):
    """Where the ONNX file is and how faithful and fast it is (a ``headprune.OnnxExport`` record).

    ``max_abs_diff``: largest |ONNX − PyTorch| logit over the check batches; ``latency_ms``: batch
    size -> median milliseconds per forward pass in onnxruntime (string keys in ``to_dict``, as in
    JSON; ``from_dict`` turns them back into integers).
    """

    FORMAT: ClassVar[str] = "headprune.OnnxExport"
    VERSION: ClassVar[int] = 1

    path: str
    inputs: list[str]
    opset: int
    max_abs_diff: float
    checked_examples: int
    file_bytes: int
    latency_ms: dict[int, float] = field(default_factory=dict)
    sequence_length: int = 0
    threads: int = 0


class _LogitsOnly(torch.nn.Module):
    """``forward(*inputs) -> logits``: positional inputs in ``names`` order, for the tracer."""

    def __init__(self, model: PreTrainedModel, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, inputs, strict=True))).logits


def model_input_names(model: PreTrainedModel) -> list[str]:
    """The exported inputs: ``input_ids``, ``attention_mask`` and ``token_type_ids`` if accepted."""
    accepted = inspect.signature(model.forward).parameters
    return [name for name in INPUT_NAMES if name in accepted]


def example_batch(
    model: PreTrainedModel, batch_size: int = 2, length: int = 16, seed: int = 0, padded: bool = True
) -> dict[str, torch.Tensor]:
    """Random ids ``[B, T]`` within the vocabulary; with ``padded`` the last row is half padding."""
    generator = torch.Generator().manual_seed(seed)
    vocab = int(model.config.vocab_size)
    pad = int(getattr(model.config, "pad_token_id", None) or 0)
    ids = torch.randint(min(5, vocab - 1), vocab, (batch_size, length), generator=generator)
    mask = torch.ones(batch_size, length, dtype=torch.long)
    if padded:
        mask[-1, max(2, length // 2) :] = 0
        ids = ids.masked_fill(mask == 0, pad)
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return {k: v for k, v in batch.items() if k in model_input_names(model)}


def export_onnx(
    model: PreTrainedModel,
    path: str | os.PathLike[str],
    *,
    opset: int = 17,
    sample: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model`` as ONNX with dynamic batch and sequence axes; returns the path.

    ``sample`` (a padded tokenizer batch) is what gets traced; by default a random padded batch.
    The file is written next to ``path`` and renamed into place.
    """
    instrument.model_family(model)
    if any(gate is not None for gate in instrument.get_head_mask(model)):
        raise HeadpruneError(
            "the model has a soft head mask; bake it first (prune.surgery.bake_mask) or save and reload it"
        )
    if any(gate is not None for gate in instrument.get_neuron_mask(model)):
        raise HeadpruneError(
            "the model has a soft neuron mask; bake it first (prune.surgery.bake_mask) or save and reload it"
        )
    names = model_input_names(model)
    sample = sample if sample is not None else example_batch(model)
    missing = [n for n in names if n not in sample]
    if missing:
        raise HeadpruneError(f"the sample batch lacks {missing[0]!r}, an input of this model")
    args = tuple(sample[n].cpu() for n in names)
    path = Path(path)
    axes = {n: {0: "batch", 1: "sequence"} for n in names} | {"logits": {0: "batch"}}
    was_training = model.training
    model.eval()
    try:
        with atomic_output(path) as tmp, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer chatter about Python control flow on shapes
            torch.onnx.export(
                _LogitsOnly(model, names).cpu(),
                args,
                str(tmp),
                input_names=names,
                output_names=["logits"],
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    except HeadpruneError:
        raise
    except Exception as error:
        zero = [i for i, h in enumerate(instrument.heads_per_layer(model)) if h == 0]
        empty = [i for i, n in enumerate(instrument.neurons_per_layer(model)) if n == 0]
        hint = f" (layers {zero} have no heads left and run a patched forward)" if zero else ""
        hint += f" (layers {empty} have no feed-forward neurons left)" if empty else ""
        first = (str(error).strip().splitlines() or [""])[0][:200]
        raise HeadpruneError(f"ONNX export failed{hint}: {type(error).__name__}: {first}") from None
    finally:
        model.train(was_training)
    return path


def onnx_session(path: str | os.PathLike[str], threads: int | None = None) -> Any:
    """An onnxruntime CPU session with ``threads`` intra-op threads (default: torch's current
    number, so timings compare with PyTorch's) and one inter-op thread."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise HeadpruneError("ONNX needs onnxruntime: pip install 'headprune[onnx]'") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_logits(session: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Run an onnxruntime session on a tokenizer batch (extra keys are ignored) -> logits ``[B, C]``."""
    wanted = [i.name for i in session.get_inputs()]
    missing = [n for n in wanted if n not in batch]
    if missing:
        raise HeadpruneError(f"the ONNX model needs input {missing[0]!r}")
    feed = {n: batch[n].detach().cpu().long().numpy() for n in wanted}
    return torch.from_numpy(session.run(["logits"], feed)[0])


def check_onnx(
    path: str | os.PathLike[str],
    model: PreTrainedModel,
    batches: list[dict[str, torch.Tensor]] | None = None,
    *,
    atol: float = 1e-4,
) -> tuple[float, int]:
    """Compare ONNX and PyTorch logits; returns ``(max_abs_diff, examples)``.

    Default batches: sizes and lengths unlike the traced sample, padded and unpadded. Raises
    ``HeadpruneError`` when the difference exceeds ``atol``.
    """
    session = onnx_session(path)
    if batches is None:
        batches = [
            example_batch(model, batch_size=3, length=9, seed=1, padded=True),
            example_batch(model, batch_size=1, length=5, seed=2, padded=False),
            example_batch(model, batch_size=4, length=23, seed=3, padded=False),
        ]
    worst, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k in model_input_names(model)}
            expected = model(**inputs).logits.float().cpu()
            got = onnx_logits(session, inputs)
            if got.shape != expected.shape:
                raise HeadpruneError(f"ONNX logits have shape {tuple(got.shape)}, PyTorch {tuple(expected.shape)}")
            worst = max(worst, float((got - expected).abs().max()))
            count += expected.shape[0]
    if not worst <= atol:
        raise HeadpruneError(f"ONNX logits differ from PyTorch by {worst:.3g} (> atol {atol:g}) in {path}")
    return worst, count


def onnx_latency(
    path: str | os.PathLike[str],
    batch: dict[str, torch.Tensor],
    *,
    repeats: int = 10,
    warmup: int = 2,
    threads: int | None = None,
) -> float:
    """Median milliseconds of one onnxruntime forward pass on ``batch`` (``threads``: intra-op
    threads, default torch's current number, so it compares with PyTorch's latency)."""
    session = onnx_session(path, threads)
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        onnx_logits(session, batch)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def export_and_check(
    model: PreTrainedModel,
    path: str | os.PathLike[str],
    *,
    opset: int = 17,
    check_batches: list[dict[str, torch.Tensor]] | None = None,
    latency_batches: dict[int, dict[str, torch.Tensor]] | None = None,
    repeats: int = 10,
    atol: float = 1e-4,
    threads: int | None = None,
) -> OnnxExport:
    """Export, check against PyTorch (``check_batches``: real tokenizer batches if you have them) and
    time each of ``latency_batches`` (batch size -> batch) with ``threads`` intra-op threads."""
    sample = check_batches[0] if check_batches else None
    if sample is not None and int(sample["attention_mask"].min()) == 1:
        sample = None  # trace a padded batch: an unpadded one could bake away the mask
    out = export_onnx(model, path, opset=opset, sample=sample)
    worst, count = check_onnx(out, model, check_batches, atol=atol)
    if check_batches:  # also the synthetic shapes: dynamic axes must really be dynamic
        worst = max(worst, check_onnx(out, model, None, atol=atol)[0])
    latency, length = {}, 0
    for size, batch in (latency_batches or {}).items():
        latency[int(size)] = onnx_latency(out, batch, repeats=repeats, threads=threads)
        length = int(batch["input_ids"].shape[1])
    return OnnxExport(
        path=str(out),
        inputs=model_input_names(model),
        opset=opset,
        max_abs_diff=worst,
        checked_examples=count,
        file_bytes=out.stat().st_size,
        latency_ms=latency,
        sequence_length=length,
        threads=threads or torch.get_num_threads(),
    )


def export_directory(
    model: PreTrainedModel,
    directory: str | os.PathLike[str],
    tokenizer: Any = None,
    **options: Any,
) -> OnnxExport:
    """Export ``model`` to the directory ``directory``: ``model.onnx`` (checked and timed by
    :func:`export_and_check`, which receives ``options``), the model's ``config.json`` and, when
    given, the tokenizer's files. Returns the record, whose ``path`` is ``directory/model.onnx``.

    The directory is built next to its final place and renamed into it: an existing directory is
    replaced only by a complete export, and only when it is an earlier export (it holds
    ``model.onnx``) or empty; anything else, and a path ending in ``.onnx``, is refused (the export
    is a directory, not a file). The config keeps headprune's records of the kept heads and neurons
    (informative: nothing in the directory needs them) and drops any ``auto_map``, whose modeling
    file the directory does not carry.
    """
    final = Path(directory).expanduser().resolve()
    check_export_directory(final)
    with atomic_directory(final) as tmp:
        result = export_and_check(model, tmp / ONNX_FILE, **options)
        model.config.save_pretrained(tmp)
        config_file = tmp / "config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if config.pop("auto_map", None) is not None:
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return dataclasses.replace(result, path=str(final / ONNX_FILE))


def check_export_directory(directory: str | os.PathLike[str]) -> Path:
    """``directory`` if it may receive an ONNX export directory; otherwise a one-line
    ``HeadpruneError``: a path ending in ``.onnx`` (since the export became a directory, pass the
    directory: ``--out onnx/`` writes ``onnx/model.onnx``), a file, or a directory holding other things."""
    path = Path(directory)
    if path.suffix.lower() == ".onnx" and not path.is_dir():
        folder = path.with_suffix("")
        raise HeadpruneError(
            f"{path} names a file, but the ONNX export is a directory ({ONNX_FILE}, config.json and the "
            f"tokenizer files): pass a directory, e.g. {folder}/ (writes {folder / ONNX_FILE})"
        )
    if path.exists() and not path.is_dir():
        raise HeadpruneError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not (path / ONNX_FILE).is_file():
        raise HeadpruneError(
            f"{path} is not empty and holds no {ONNX_FILE}: it is not an earlier export, so it is not replaced; "
            "choose another directory"
        )
    return path
