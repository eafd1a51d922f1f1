"""``headprune export``: a (pruned) model directory to ONNX, checked in onnxruntime."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the export options."""
    parser.add_argument(
        "--model",
        required=True,
        metavar="MODEL",
        help="a model directory (pruned or dense), 'default', 'minilm' or a hub id",
    )
    parser.add_argument("--format", default="onnx", choices=["onnx"], help="export format (default: %(default)s)")
    parser.add_argument("--out", required=True, metavar="FILE", help="where to write, e.g. model.onnx")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default: %(default)s)")
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
    from attribution.instrument import kept_heads
    from prune.checkpoints import load_model
    from prune.export import example_batch, export_and_check

    if args.opset < 14:
        raise HeadpruneError(f"--opset must be at least 14, got {args.opset}")
    model, _ = load_model(args.model, tokenizer=False)
    latency = None
    if args.latency:
        latency = {size: example_batch(model, batch_size=size, length=64, padded=False) for size in (1, 32)}
    result = export_and_check(model, args.out, opset=args.opset, atol=args.atol, latency_batches=latency)
    heads = sum(len(k) for k in kept_heads(model))
    print(f"wrote {result.path} ({result.file_bytes / 1e6:.1f} MB, opset {result.opset}, {heads} heads)")
    print(f"inputs: {', '.join(result.inputs)} (dynamic batch and sequence axes)")
    print(f"max |onnx - torch| logit difference: {result.max_abs_diff:.2e} on {result.checked_examples} examples")
    for size, ms in result.latency_ms.items():
        print(f"onnxruntime latency, batch {size} x {result.sequence_length} tokens: {ms:.1f} ms")
    return 0
