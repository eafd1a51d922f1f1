"""Dynamic INT8 quantization of an exported ONNX classifier, and evaluation through onnxruntime.

The quantized model is evaluated itself (argmax agreement with its FP32 parent, metrics, latency),
not inferred from the FP32 one (DESIGN.md §5).

Decisions, each measured (embedded default MiniLM-L6, 2,000 test tweets, one AVX2 core without
VNNI; tiny trained BERTs in ``tests/test_quantize.py``):

- ``onnxruntime.quantization.quantize_dynamic``: weights INT8 ahead of time, activations UINT8 with
  a per-batch scale computed at run time; no calibration data needed.
- **No pre-processing** (``quant_pre_process``), although ORT suggests it: its symbolic shape
  inference fails on the exported graph ("Incomplete symbolic shape inference", leaving temporary
  files in the working directory); with ``auto_merge`` or without the symbolic pass it runs but
  changes nothing measurable (same agreement and accuracy, latency within noise) — an
  onnxruntime session applies the same graph optimisations when it loads the model. ORT's root-
  logger suggestion to pre-process is therefore filtered out during the call.
- **Per-channel weights with reduced range by default** (ORT's defaults are per-tensor and full
  range). On x86 without VNNI, onnxruntime's U8S8 kernels (``vpmaddubsw``) can saturate, and
  per-channel scales put more weights near the INT8 limits, so per-channel alone is sometimes
  worse; 7-bit weights (``reduce_range``) avoid the saturation. Agreement with the FP32 ONNX model
  on the default's test tweets: per-tensor 95.2%, per-channel 97.9%, per-channel + reduce_range
  97.7%, per-tensor + reduce_range 86.2%; on the tiny trained test models per-channel alone fell to
  90-94% while per-channel + reduce_range stayed >= 99.5% with a max |Δlogit| ten times smaller.
  Latency of the signed-weight variants was the same within noise (``quint8`` weights: ~20% slower
  at batch 32).
- ``op_types`` defaults to ORT's (MatMul and Gather, i.e. also the word embeddings: the file
  shrinks 4x, to 23 MB for the default; quantizing only MatMul keeps a 59 MB file and gained about
  half a point of agreement there).
- **MatMuls with a zero-width weight stay FP32**: a layer that lost every head exports a
  ``[0, hidden]`` output projection (``prune.export``), and onnxruntime's dynamic INT8 kernels
  return wrong values for it (the pruned test model: max |Δlogit| 0.17 instead of 0.01 with the
  defaults, 54% agreement per-tensor). They cost nothing in FP32.
- File names are the caller's; the pipeline (and ``prune.export.QUANTIZED_FILE``) follows Optimum:
  ``model_quantized.onnx`` beside ``model.onnx``, ``config.json`` and the tokenizer files, so the
  directory loads in Optimum and plain onnxruntime alike.
- The input model is loaded here and handed to ORT as a ``ModelProto``: ORT then does its shape
  inference in a temporary directory instead of writing ``<name>-inferred.onnx`` beside the input;
  the output is written through ``atomic_output``, so an interrupted quantization leaves no file.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from attribution.core.data import iter_batches, restore_order
from attribution.core.errors import HeadpruneError
from attribution.core.io import Record, atomic_output
from attribution.core.log import get_logger
from prune.evaluate import DEFAULT_METRICS, EvalResult
from prune.export import onnx_latency, onnx_logits, onnx_session
from prune.metrics import compute_metrics

log = get_logger("quantize")

WEIGHT_TYPES = ("qint8", "quint8")
_PRE_PROCESS_HINT = "Please consider to run pre-processing before quantization"


def _first_line(error: BaseException, limit: int = 200) -> str:
    return (str(error).strip().splitlines() or [""])[0][:limit]


def _existing_file(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if not path.exists():
        raise HeadpruneError(f"ONNX model not found: {path}")
    if not path.is_file():
        raise HeadpruneError(f"{path} is not a file (expected an ONNX model)")
    return path


def load_onnx(path: str | os.PathLike[str]) -> Any:
    """The ``onnx.ModelProto`` in ``path``; a one-line ``HeadpruneError`` when it is missing or not ONNX."""
    path = _existing_file(path)
    try:
        import onnx
    except ImportError:
        raise HeadpruneError("INT8 quantization needs onnx and onnxruntime: pip install 'headprune[onnx]'") from None
    try:
        model = onnx.load(str(path))
    except Exception as error:
        raise HeadpruneError(f"{path} is not an ONNX model ({type(error).__name__}: {_first_line(error)})") from None
    if model.ir_version == 0 or not model.graph.node:
        raise HeadpruneError(f"{path} is not an ONNX model (no graph)")
    return model


def open_session(path: str | os.PathLike[str], threads: int | None = None) -> Any:
    """An onnxruntime CPU session on ``path`` (``threads`` intra-op threads, default torch's number);
    one-line errors for a missing file, a file onnxruntime cannot load and a graph without ``logits``."""
    path = _existing_file(path)
    try:
        session = onnx_session(path, threads)
    except HeadpruneError:
        raise
    except Exception as error:
        raise HeadpruneError(f"onnxruntime cannot load {path}: {type(error).__name__}: {_first_line(error)}") from None
    if "logits" not in [o.name for o in session.get_outputs()]:
        raise HeadpruneError(f"{path} has no 'logits' output (export it with prune.export.export_onnx)")
    return session


def zero_width_matmuls(model: Any) -> list[str]:
    """Names of the MatMul nodes whose constant weight has a zero dimension (layers without heads)."""
    empty = {init.name for init in model.graph.initializer if 0 in list(init.dims)}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and any(i in empty for i in n.input)]


class _DropPreProcessHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_PRE_PROCESS_HINT)


@contextlib.contextmanager
def _no_pre_process_hint() -> Iterator[None]:
    """ORT logs its pre-processing suggestion on the root logger; we skip pre-processing on purpose."""
    hint = _DropPreProcessHint()
    root = logging.getLogger()
    root.addFilter(hint)
    try:
        yield
    finally:
        root.removeFilter(hint)


def quantize_onnx(
    onnx_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    per_channel: bool = True,
    reduce_range: bool = True,
    weight_type: str = "qint8",
    op_types: Sequence[str] | None = None,
) -> Path:
    """Write a dynamically INT8-quantized copy of the FP32 ONNX model ``onnx_path`` to ``out_path``.

    ``weight_type``: ``"qint8"`` (signed weights, the fast kernels) or ``"quint8"``; ``op_types``:
    the operator types to quantize (default ORT's: MatMul, Gather, ...). Defaults and the nodes
    kept in FP32 are explained in the module docstring. The file appears complete or not at all.
    """
    kind = str(weight_type).lower()
    if kind not in WEIGHT_TYPES:
        raise HeadpruneError(f"weight_type must be one of {', '.join(WEIGHT_TYPES)}, got {weight_type!r}")
    source, out = Path(onnx_path), Path(out_path)
    model = load_onnx(source)
    if out.resolve() == source.resolve():
        raise HeadpruneError(f"the INT8 output would overwrite its FP32 input {source}; choose another path")
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise HeadpruneError("INT8 quantization needs onnxruntime: pip install 'headprune[onnx]'") from None
    skipped = zero_width_matmuls(model)
    started = time.perf_counter()
    try:
        with atomic_output(out) as tmp, _no_pre_process_hint():
            quantize_dynamic(
                model,
                tmp,
                op_types_to_quantize=list(op_types) if op_types else None,
                per_channel=per_channel,
                reduce_range=reduce_range,
                weight_type=QuantType.QInt8 if kind == "qint8" else QuantType.QUInt8,
                nodes_to_exclude=skipped,
            )
    except HeadpruneError:
        raise
    except Exception as error:
        first = f"{type(error).__name__}: {_first_line(error)}"
        raise HeadpruneError(f"INT8 quantization of {source} failed: {first}") from None
    log.info(
        "quantized %s -> %s (%s weights%s%s, %.1f s; %d zero-width MatMuls kept FP32): %.1f -> %.1f MB",
        source, out, kind, ", per channel" if per_channel else "", ", reduced range" if reduce_range else "",
        time.perf_counter() - started, len(skipped), source.stat().st_size / 1e6, out.stat().st_size / 1e6,
    )
    return out


def _feed(batch: dict[str, torch.Tensor], wanted: list[str]) -> dict[str, torch.Tensor]:
    """Exactly the graph's inputs; ``token_type_ids`` the graph declares but the tokenizer does not
    produce (RoBERTa family) are zeros, as PyTorch's default is."""
    feed = {}
    for name in wanted:
        if name in batch:
            feed[name] = batch[name]
        elif name == "token_type_ids":
            feed[name] = torch.zeros_like(batch["input_ids"])
        else:
            raise HeadpruneError(f"the ONNX model needs input {name!r}, which the tokenizer does not produce")
    return feed


def onnx_predict_logits(
    path: str | os.PathLike[str],
    tokenizer: Any,
    dataset: Any,
    *,
    batch_size: int = 64,
    max_length: int = 64,
    threads: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Logits ``[N, C]`` (float32) of the ONNX model in ``path`` for every row of ``dataset``, in
    dataset order. Batched by token length like ``attribution.core.predict.predict_logits``, so the
    rows see the same padding as in PyTorch; one process (no sharding)."""
    if len(dataset) == 0:
        raise HeadpruneError("cannot predict on an empty data set")
    session = open_session(path, threads)
    wanted = [i.name for i in session.get_inputs()]
    logits, index = [], []
    batches = iter_batches(dataset, tokenizer, batch_size=batch_size, max_length=max_length, sort_by_length=True)
    with tqdm(total=math.ceil(len(dataset) / batch_size), desc="onnxruntime", leave=False, disable=not progress) as bar:
        for batch in batches:
            index.append(batch.pop("index"))
            logits.append(onnx_logits(session, _feed(batch, wanted)).float())
            bar.update(1)
    return restore_order(torch.cat(logits), torch.cat(index))


def _labels(dataset: Any) -> torch.Tensor:
    if "label" not in dataset.column_names:
        raise HeadpruneError(f"the data set has no 'label' column (columns: {', '.join(dataset.column_names)})")
    labels = torch.as_tensor(list(dataset["label"]), dtype=torch.long)
    if (labels < 0).any():
        raise HeadpruneError("the data set has unlabelled rows (label -1); evaluate on a labelled split")
    return labels


def evaluate_onnx(
    path: str | os.PathLike[str],
    tokenizer: Any,
    dataset: Any,
    *,
    metrics: Sequence[str] = DEFAULT_METRICS,
    batch_size: int = 64,
    max_length: int = 64,
    threads: int | None = None,
    progress: bool = False,
    model_name: str = "",
    data_name: str = "",
    split: str = "",
) -> EvalResult:
    """``prune.evaluate.evaluate`` for an ONNX model run by onnxruntime: the same metrics
    (``prune.metrics``) on every row of ``dataset`` (with a ``label`` column)."""
    labels = _labels(dataset)
    compute_metrics([0], [0], metrics)  # unknown metric names fail before any work
    started = time.perf_counter()
    logits = onnx_predict_logits(
        path, tokenizer, dataset, batch_size=batch_size, max_length=max_length, threads=threads, progress=progress
    )
    return EvalResult(
        metrics=compute_metrics(logits, labels, metrics),
        examples=int(logits.shape[0]),
        model=model_name or str(path),
        data=data_name,
        split=split,
        seconds=round(time.perf_counter() - started, 3),
        extra={"runtime": "onnxruntime", "threads": threads or torch.get_num_threads()},
    )


@dataclass
class QuantizedExport(Record):
    """An INT8 ONNX model beside its FP32 parent, both measured (a ``headprune.QuantizedExport`` record).

    ``agreement``: fraction of the ``checked_examples`` rows on which both predict the same class;
    ``max_abs_diff``: largest |INT8 − FP32| logit there; metrics: on those rows, empty when they are
    unlabelled; latency: batch size -> median ms per forward pass in onnxruntime (string keys in
    ``to_dict``, as in JSON); ``skipped_nodes``: MatMuls left in FP32 (zero-width weights).

    Where the disagreements lie: ``p99_abs_diff`` is the 99th percentile over rows of each row's
    largest |INT8 − FP32| logit (the INT8 noise level); ``decided_rows`` the fraction of rows whose
    FP32 top-2 logit margin exceeds twice that (rows the noise can hardly flip), and
    ``decided_agreement`` the agreement on those rows. A low ``agreement`` with
    ``decided_agreement`` near 1 means the flips are near-ties of the FP32 model, not a broken
    quantization (on the embedded default's compressed model: 98.0% overall, 100% on the 82.6% of
    rows beyond the noise).
    """

    FORMAT: ClassVar[str] = "headprune.QuantizedExport"
    VERSION: ClassVar[int] = 2

    fp32_path: str
    int8_path: str
    fp32_bytes: int
    int8_bytes: int
    weight_type: str
    per_channel: bool
    reduce_range: bool
    checked_examples: int
    agreement: float
    max_abs_diff: float
    fp32_metrics: dict[str, float] = field(default_factory=dict)
    int8_metrics: dict[str, float] = field(default_factory=dict)
    fp32_latency_ms: dict[int, float] = field(default_factory=dict)
    int8_latency_ms: dict[int, float] = field(default_factory=dict)
    sequence_length: int = 0
    threads: int = 0
    skipped_nodes: list[str] = field(default_factory=list)
    p99_abs_diff: float = 0.0
    decided_rows: float = 1.0
    decided_agreement: float = 1.0

    @property
    def size_ratio(self) -> float:
        """FP32 bytes / INT8 bytes."""
        return self.fp32_bytes / self.int8_bytes

    @property
    def speedup(self) -> dict[int, float]:
        """Batch size -> FP32 ONNX latency / INT8 ONNX latency."""
        return {s: self.fp32_latency_ms[s] / ms for s, ms in self.int8_latency_ms.items() if s in self.fp32_latency_ms}


def agreement_by_margin(fp32: torch.Tensor, int8: torch.Tensor) -> dict[str, float]:
    """``p99_abs_diff``, ``decided_rows`` and ``decided_agreement`` of two logit tensors ``[N, C]``
    (see ``QuantizedExport``)."""
    if fp32.shape != int8.shape or fp32.ndim != 2 or not len(fp32):
        raise HeadpruneError(f"logits of shapes {tuple(fp32.shape)} and {tuple(int8.shape)} cannot be compared")
    noise = float((fp32 - int8).abs().amax(dim=1).quantile(0.99))
    if fp32.shape[1] < 2:
        return {"p99_abs_diff": noise, "decided_rows": 1.0, "decided_agreement": 1.0}
    top = fp32.topk(2, dim=1).values
    decided = (top[:, 0] - top[:, 1]) > 2 * noise
    same = fp32.argmax(1) == int8.argmax(1)
    agreement = float(same[decided].float().mean()) if bool(decided.any()) else 1.0
    return {"p99_abs_diff": noise, "decided_rows": float(decided.float().mean()), "decided_agreement": agreement}


def quantize_and_check(
    onnx_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    tokenizer: Any,
    dataset: Any,
    *,
    latency_batches: Mapping[int, dict[str, torch.Tensor]] | None = None,
    threads: int | None = None,
    per_channel: bool = True,
    reduce_range: bool = True,
    weight_type: str = "qint8",
    op_types: Sequence[str] | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    batch_size: int = 64,
    max_length: int = 64,
    repeats: int = 10,
    progress: bool = False,
) -> QuantizedExport:
    """Quantize ``onnx_path`` to ``out_path`` (``quantize_onnx``), run both on every row of
    ``dataset`` and compare them; time both on each of ``latency_batches`` (batch size -> tokenizer
    batch), FP32 and INT8 alternating per batch size, with ``threads`` intra-op threads."""
    labelled = "label" in dataset.column_names and min(dataset["label"], default=-1) >= 0
    if labelled:
        compute_metrics([0], [0], metrics)  # unknown metric names fail before any work
    out = quantize_onnx(
        onnx_path, out_path, per_channel=per_channel, reduce_range=reduce_range, weight_type=weight_type,
        op_types=op_types,
    )
    predict = dict(batch_size=batch_size, max_length=max_length, threads=threads, progress=progress)
    fp32 = onnx_predict_logits(onnx_path, tokenizer, dataset, **predict)
    int8 = onnx_predict_logits(out, tokenizer, dataset, **predict)
    labels = _labels(dataset) if labelled else None
    noise = agreement_by_margin(fp32, int8)
    fp32_latency, int8_latency, length = {}, {}, 0
    for size, batch in (latency_batches or {}).items():
        fp32_latency[int(size)] = onnx_latency(onnx_path, batch, repeats=repeats, threads=threads)
        int8_latency[int(size)] = onnx_latency(out, batch, repeats=repeats, threads=threads)
        length = int(batch["input_ids"].shape[1])
    result = QuantizedExport(
        fp32_path=str(onnx_path),
        int8_path=str(out),
        fp32_bytes=Path(onnx_path).stat().st_size,
        int8_bytes=out.stat().st_size,
        weight_type=str(weight_type).lower(),
        per_channel=per_channel,
        reduce_range=reduce_range,
        checked_examples=int(fp32.shape[0]),
        agreement=float((fp32.argmax(1) == int8.argmax(1)).float().mean()),
        max_abs_diff=float((fp32 - int8).abs().max()),
        fp32_metrics=compute_metrics(fp32, labels, metrics) if labels is not None else {},
        int8_metrics=compute_metrics(int8, labels, metrics) if labels is not None else {},
        fp32_latency_ms=fp32_latency,
        int8_latency_ms=int8_latency,
        sequence_length=length,
        threads=threads or torch.get_num_threads(),
        skipped_nodes=zero_width_matmuls(load_onnx(onnx_path)),
        **noise,
    )
    log.info(
        "INT8 agrees with FP32 on %.2f%% of %d rows (max |Δlogit| %.3g; %.2f%% on the %.1f%% of rows whose "
        "FP32 margin exceeds twice the p99 |Δlogit| %.3g); %.1fx smaller",
        100 * result.agreement, result.checked_examples, result.max_abs_diff, 100 * result.decided_agreement,
        100 * result.decided_rows, result.p99_abs_diff, result.size_ratio,
    )
    return result
