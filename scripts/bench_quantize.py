#!/usr/bin/env python
"""Dense FP32 PyTorch vs its FP32 ONNX export vs dynamic INT8 ONNX (prune.quantize): accuracy and
macro-F1 on every test tweet, argmax agreement of INT8 with FP32 ONNX, file sizes, and latency at
batch 1 and 32 on --threads threads (median of --repeats passes, the three models interleaved in
every round so slow phases of a shared machine hit them alike), with ratios to FP32 PyTorch. Not a
timed test: run it by hand on a quiet machine.

    python scripts/bench_quantize.py --threads 1 --out results/bench_quantize
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

# Run from a checkout: make the repository importable as regular packages whatever the cwd.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attribution.core.data import load_splits
from attribution.core.io import atomic_write_text
from prune import quantize
from prune.checkpoints import load_model
from prune.cost import latency_batches
from prune.evaluate import evaluate
from prune.export import ONNX_FILE, QUANTIZED_FILE, export_and_check, onnx_logits
from prune.finetune import FINETUNE_META, default_finetuned_path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--out", default=None, help="directory for the ONNX files and results (default: a temp dir)")
    return parser.parse_args()


@torch.inference_mode()
def interleaved_latency(model, sessions: dict, batches: dict, repeats: int, warmup: int) -> dict[str, dict[int, float]]:
    """Median ms per forward pass, {name: {batch size: ms}}; every round runs every model on every size."""
    runners = {"FP32 PyTorch": lambda b: model(**b)} | {
        name: (lambda b, s=session: onnx_logits(s, b)) for name, session in sessions.items()
    }
    times = {name: {size: [] for size in batches} for name in runners}
    for step in range(warmup + repeats):
        for size, batch in batches.items():
            for name, run in runners.items():
                start = time.perf_counter()
                run(batch)
                if step >= warmup:
                    times[name][size].append((time.perf_counter() - start) * 1000)
    return {name: {size: statistics.median(v) for size, v in per.items()} for name, per in times.items()}


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.model == "default" and not (default_finetuned_path() / FINETUNE_META).is_file():
        print(f"the default classifier is not trained yet ({default_finetuned_path()}); run headprune finetune")
        return 1
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_quantize."))
    model, tokenizer = load_model(args.model)
    model.eval()
    test = load_splits("tweets")["test"]
    batches = latency_batches(test, tokenizer, sizes=args.sizes, max_length=args.max_length)
    check = [batches[max(batches)]] if max(batches) > 1 else None
    exported = export_and_check(model, out / ONNX_FILE, check_batches=check, threads=args.threads)
    print(f"exported FP32 ONNX: max |onnx - torch| {exported.max_abs_diff:.2g} on {exported.checked_examples} rows")

    started = time.perf_counter()
    torch_eval = evaluate(model, tokenizer, test, max_length=args.max_length)
    torch_seconds = time.perf_counter() - started
    result = quantize.quantize_and_check(
        exported.path, out / QUANTIZED_FILE, tokenizer, test, threads=args.threads, max_length=args.max_length,
        progress=True,
    )
    print(f"INT8 agrees with FP32 ONNX on {result.agreement:.2%} of {result.checked_examples} test rows "
          f"(max |Δlogit| {result.max_abs_diff:.3f}); PyTorch evaluation took {torch_seconds:.0f} s")

    shapes = {size: tuple(b["input_ids"].shape) for size, b in batches.items()}
    print(f"timing batches {shapes}, {args.threads} thread(s), {args.repeats} interleaved rounds")
    sessions = {
        "FP32 ONNX": quantize.open_session(result.fp32_path, args.threads),
        "INT8 ONNX": quantize.open_session(result.int8_path, args.threads),
    }
    latency = interleaved_latency(model, sessions, batches, args.repeats, args.warmup)

    torch_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = {
        "FP32 PyTorch": (torch_eval.metrics, None, torch_bytes),
        "FP32 ONNX": (result.fp32_metrics, 1.0, result.fp32_bytes),
        "INT8 ONNX": (result.int8_metrics, result.agreement, result.int8_bytes),
    }
    base = latency["FP32 PyTorch"]
    head = f"{'model':<14} {'accuracy':>8} {'macro-F1':>8} {'agree':>7} {'MB':>6}"
    head += "".join(f" {f'b{s} ms':>9} {f'b{s} x':>6}" for s in batches)
    print(head)
    for name, (metrics, agree, size) in rows.items():
        line = f"{name:<14} {metrics['accuracy']:>8.4f} {metrics['macro_f1']:>8.4f} "
        line += f"{'-' if agree is None else f'{agree:.2%}':>7} {size / 1e6:>6.1f}"
        line += "".join(f" {latency[name][s]:>9.2f} {base[s] / latency[name][s]:>5.2f}x" for s in batches)
        print(line)
    for s in batches:
        print(f"batch {s}: INT8 ONNX is {base[s] / latency['INT8 ONNX'][s]:.2f}x FP32 PyTorch, "
              f"{latency['FP32 ONNX'][s] / latency['INT8 ONNX'][s]:.2f}x FP32 ONNX")

    result.fp32_latency_ms = {s: latency["FP32 ONNX"][s] for s in batches}
    result.int8_latency_ms = {s: latency["INT8 ONNX"][s] for s in batches}
    result.sequence_length = int(batches[max(batches)]["input_ids"].shape[1])
    result.save(out / "quantized.json")
    summary = {
        "threads": args.threads, "repeats": args.repeats, "batch_shapes": {str(k): list(v) for k, v in shapes.items()},
        "latency_ms": {name: {str(k): v for k, v in per.items()} for name, per in latency.items()},
        "metrics": {name: metrics for name, (metrics, _, _) in rows.items()},
        "agreement": result.agreement, "bytes": {name: size for name, (_, _, size) in rows.items()},
    }
    atomic_write_text(out / "bench_quantize.json", json.dumps(summary, indent=1) + "\n")
    print(f"saved -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
