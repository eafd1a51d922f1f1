#!/usr/bin/env python
"""Is the fitted latency model right? Predicted vs measured latency of pruned MiniLM-L6 models.

For each backend (PyTorch, ONNX Runtime) and batch size (32 and 1) at T = the test split's mean
token length, one interleaved timing run holds the latency model's blocks (attention with 0..H
heads, feed-forward on the neuron grid, the dense model) *and* 4-6 physically pruned copies of the
model (seeded random heads via ``prune.surgery.remove_heads``; neurons too via
``prune.surgery.remove_neurons`` when it exists, otherwise heads only, and the script says so).
The fit uses only the blocks and the dense model; the pruned models are then predicted and
compared with their own medians from the same run, so machine drift between a fit and a later
measurement does not pose as model error. Target: |error| <= 10%. Not a timed test: run by hand.

glibc's malloc thresholds are pinned first (``prune.latency_blocks.pin_malloc_thresholds``;
``--no-pin-malloc`` shows what happens without). On a shared, oversubscribed machine use
``--clock cpu`` (the thread's CPU time; 1 thread): wall-clock medians of millisecond blocks there
measure the scheduler, not the model.

    python scripts/bench_latency_model.py --threads 1 --clock cpu --out results/latency
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import argparse
import copy
import random
import sys
import tempfile
from pathlib import Path

import torch

# Run from a checkout: make the repository importable as regular packages whatever the cwd.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attribution.core.data import load_splits
from prune import surgery
from prune.checkpoints import load_model
from prune.cost import mean_token_length
from prune.export import export_onnx
from prune.latency import LatencyModel, fit_latency_model, flops
from prune.latency_blocks import (
    Block,
    model_shape,
    onnx_session,
    pin_malloc_thresholds,
    time_interleaved,
    timing_batch,
)

# (name, heads kept per layer, neurons kept per layer as a fraction of F) for L = 6, H = 12
CONFIGS = [
    ("heads 1/2 even", [6] * 6, [1.0] * 6),
    ("heads uneven, 2 empty", [12, 0, 6, 0, 9, 3], [1.0] * 6),
    ("neurons 2/3", [12] * 6, [2 / 3] * 6),
    ("heads 1/2 + neurons 1/2", [6] * 6, [0.5] * 6),
    ("uneven both", [8, 6, 4, 3, 2, 1], [0.8, 0.6, 0.45, 0.3, 0.2, 0.05]),
    ("empty sub-layers", [12, 0, 6, 1, 0, 4], [1.0, 0.0, 0.25, 0.0, 1.0, 0.1]),
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--backends", default="torch,onnx")
    parser.add_argument("--batch-sizes", default="32,1")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or the thread's CPU time (1 thread; robust on an oversubscribed machine)")
    parser.add_argument("--no-pin-malloc", action="store_true",
                        help="keep glibc's adaptive mmap threshold (prune.latency_blocks.pin_malloc_thresholds)")
    parser.add_argument("--out", default=None, help="directory for the fitted LatencyModel records (JSON)")
    return parser.parse_args()


def pruned_models(dense, with_neurons: bool, seed: int) -> list[tuple[str, list[int], list[int], torch.nn.Module]]:
    """The configurations as physically pruned copies (seeded random choice of which units go)."""
    shape = model_shape(dense)
    rng = random.Random(seed)
    out = []
    for name, heads, fractions in CONFIGS:
        neurons = [round(shape.ffn * f) for f in fractions] if with_neurons else [shape.ffn] * shape.layers
        dense_widths = heads == [shape.heads] * shape.layers and neurons == [shape.ffn] * shape.layers
        if dense_widths or (heads, neurons) in [(c[1], c[2]) for c in out]:
            continue  # heads only: a configuration that differed only in its neurons
        model = copy.deepcopy(dense)
        drop_heads = {layer: rng.sample(range(shape.heads), shape.heads - h) for layer, h in enumerate(heads)}
        surgery.remove_heads(model, {k: v for k, v in drop_heads.items() if v})
        if with_neurons:
            drop = {layer: rng.sample(range(shape.ffn), shape.ffn - n) for layer, n in enumerate(neurons)}
            surgery.remove_neurons(model, {k: v for k, v in drop.items() if v})
        out.append((name, heads, neurons, model.eval()))
    return out


def model_runs(models, backend: str, batch: dict[str, torch.Tensor], threads: int, directory: Path) -> list:
    runs = []
    for index, model in enumerate(models):
        if backend == "torch":

            def run(model=model):
                with torch.inference_mode():
                    return model(**batch).logits

        else:
            session = onnx_session(export_onnx(model, directory / f"pruned{index}.onnx"), threads)
            feed = {k: v.numpy() for k, v in batch.items()}

            def run(session=session, feed=feed):
                return session.run(None, feed)[0]

        runs.append(run)
    return runs


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    pinned = False if args.no_pin_malloc else pin_malloc_thresholds()
    dense, tokenizer = load_model(args.model)
    test = load_splits("tweets")["test"]
    seq_len = round(mean_token_length(test, tokenizer))
    with_neurons = hasattr(surgery, "remove_neurons")
    configs = pruned_models(dense, with_neurons, args.seed)
    shape = model_shape(dense)
    wait = os.environ["OMP_WAIT_POLICY"]
    print(f"{shape}; T = {seq_len} (test mean); {args.threads} thread(s); OMP_WAIT_POLICY={wait}; "
          f"{args.clock} clock; median of {args.repeats} interleaved rounds; malloc thresholds "
          f"{'pinned' if pinned else 'adaptive (glibc default)'}")
    if not with_neurons:
        print("prune.surgery.remove_neurons does not exist yet: heads-only configurations")
    full = [shape.ffn] * shape.layers
    header = f"{'backend':7} {'batch':>5}  {'configuration':26} {'heads':>5} {'neurons':>7}  " \
             f"{'predicted':>10} {'measured':>10} {'error':>7}  {'speedup pred/meas':>17}  FLOPs speedup"
    rows, worst = [], 0.0
    for backend in args.backends.split(","):
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            batch = timing_batch(dense, batch_size, seq_len, seed=args.seed + 1)
            with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
                extra = [Block("model", i + 1, run) for i, run in enumerate(
                    model_runs([m for *_, m in configs], backend, batch, args.threads, Path(tmp)))]
                measured: list[float] = []

                def timer(blocks, extra=extra, measured=measured):
                    times = time_interleaved([*blocks, *extra], repeats=args.repeats, warmup=args.warmup,
                                             seed=args.seed, clock=args.clock, progress=True)
                    measured.extend(times[len(blocks):])
                    return times[: len(blocks)]

                fitted: LatencyModel = fit_latency_model(
                    dense, backend=backend, batch_size=batch_size, seq_len=seq_len, threads=args.threads,
                    repeats=args.repeats, warmup=args.warmup, seed=args.seed, clock=args.clock, progress=False,
                    timer=timer,
                )
            if args.out:
                fitted.save(Path(args.out) / f"latency_{backend}_b{batch_size}.json")
            print(f"\n{backend} batch {batch_size}: dense {fitted.dense_ms:.2f} ms = overhead {fitted.overhead_ms:.2f}"
                  f" + {shape.layers} x (attention {fitted.attention_ms(shape.heads):.2f} [0 heads: "
                  f"{fitted.attention_ms(0):.2f}] + ffn {fitted.ffn_ms(shape.ffn):.2f} [0 neurons: "
                  f"{fitted.ffn_ms(0):.2f}])")
            dense_flops = flops(shape, [shape.heads] * shape.layers, full, seq_len)
            for (name, heads, neurons, _), real in zip(configs, measured, strict=True):
                predicted = fitted.predict(heads, neurons)
                error = (predicted - real) / real * 100
                worst = max(worst, abs(error))
                rows.append(
                    f"{backend:7} {batch_size:>5}  {name:26} {sum(heads):>5} {sum(neurons):>7}  "
                    f"{predicted:>8.2f}ms {real:>8.2f}ms {error:>+6.1f}%  "
                    f"{fitted.dense_ms / predicted:>8.2f}x/{fitted.dense_ms / real:.2f}x  "
                    f"{dense_flops / flops(shape, heads, neurons, seq_len):>8.2f}x"
                )
            print(header)
            print("\n".join(r for r in rows if r.startswith(f"{backend:7} {batch_size:>5}")))
    print("\n" + header)
    print("\n".join(rows))
    print(f"\nworst |error| {worst:.1f}% (target <= 10%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
