"""``headprune export``: a (pruned) model to an ONNX directory, checked in onnxruntime.

``--out DIR`` receives ``model.onnx``, ``config.json`` and the tokenizer files (the layout of ONNX
Runtime users and Optimum); a path ending in ``.onnx`` is refused with a hint, since the export
became a directory (``--out onnx/`` writes ``onnx/model.onnx``)."""

from __future__ import annotations

import argparse

# opsets the TorchScript exporter (the one headprune uses, dynamo=False) writes
MIN_OPSET, MAX_OPSET = 14, 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the export options."""
    parser.add_argument(
        "--model",
        required=True,
        metavar="MODEL",
        help="a model directory (pruned or dense), 'default', 'minilm' or a hub id",
    )
    parser.add_argument("--format", default="onnx", choices=["onnx"], help="export format (default: %(default)s)")
    parser.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="the directory to write: model.onnx, config.json and the tokenizer files (a new or empty "
        "directory, or an earlier export, which is replaced)",
    )
    parser.add_argument(
        "--opset", type=int, default=17, help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET} (default: %(default)s)"
    )
    parser.add_argument(
        "--atol",
        type=float,
        default=1e-4,
        help="largest ONNX-vs-PyTorch logit difference accepted (default: %(default)s)",
    )
    parser.add_argument(
        "--latency", action="store_true", help="also time onnxruntime at batch sizes 1 and 32 (sequence length 64)"
    )


def run(args: argparse.Namespace) -> int:
    """Export, check against PyTorch, print the file, the difference and (optionally) latency."""
    from attribution.core.errors import HeadpruneError
    from attribution.core.validate import check_finite, check_output_dir, position_limit
    from attribution.instrument import kept_heads
    from prune.export import check_export_directory, example_batch, export_directory

    if not MIN_OPSET <= args.opset <= MAX_OPSET:
        raise HeadpruneError(f"--opset must lie in {MIN_OPSET}..{MAX_OPSET}, got {args.opset}")
    check_finite(args.atol, "--atol", positive=True)
    check_export_directory(args.out)  # before loading: a wrong --out fails at once
    check_output_dir(args.out)
    model, tokenizer = _model_and_tokenizer(args.model)
    latency = None
    if args.latency:
        length = min(64, position_limit(model.config) or 64)
        latency = {size: example_batch(model, batch_size=size, length=length, padded=False) for size in (1, 32)}
    result = export_directory(model, args.out, tokenizer, opset=args.opset, atol=args.atol, latency_batches=latency)
    heads = sum(len(k) for k in kept_heads(model))
    print(f"wrote {result.path} ({result.file_bytes / 1e6:.1f} MB, opset {result.opset}, {heads} heads)")
    beside = "config.json and the tokenizer files" if tokenizer is not None else "config.json (no tokenizer found)"
    print(f"beside it: {beside}")
    print(f"inputs: {', '.join(result.inputs)} (dynamic batch and sequence axes)")
    print(f"max |onnx - torch| logit difference: {result.max_abs_diff:.2e} on {result.checked_examples} examples")
    for size, ms in result.latency_ms.items():
        print(f"onnxruntime latency, batch {size} x {result.sequence_length} tokens: {ms:.1f} ms")
    return 0


def _model_and_tokenizer(name: str) -> tuple[object, object | None]:
    """The model and its tokenizer, or None for the tokenizer (with a warning) when the model has
    none: the export is still useful, but the directory then lacks the tokenizer files."""
    from attribution.core.errors import HeadpruneError
    from attribution.core.log import get_logger
    from prune.checkpoints import load_model

    try:
        return load_model(name)
    except HeadpruneError as error:
        model, _ = load_model(name, tokenizer=False)  # a problem with the model itself raises here
        get_logger("export").warning("exporting without a tokenizer: %s", error)
        return model, None
