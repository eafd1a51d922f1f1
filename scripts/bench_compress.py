#!/usr/bin/env python
"""The accuracy–latency frontier of the embedded default, as a table.

Runs ``recipes/tweets-minilm-compress.yaml`` (resumable: finished stages are reused) and prints
every point of its frontier: dense; heads only and heads + neurons at each budget, unrepaired and
repaired; the healed model; INT8 ONNX. Each point's latency was measured side by side with the
dense model in one run (median of interleaved repeats, one thread); the latency model's prediction
is printed beside the measurement. Not a timed test: run it by hand, ideally on a quiet machine.

    python scripts/bench_compress.py --out runs/compress [--set heal=null] [--set compress.frontier=[0.6]]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Run from a checkout: make the repository importable as regular packages whatever the cwd.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prune.latency_blocks import pin_malloc_thresholds  # noqa: E402
from prune.pipeline import run_recipe  # noqa: E402
from prune.pipeline.artifacts import StageTiming  # noqa: E402
from prune.recipe import load_recipe  # noqa: E402
from prune.report.compression import frontier_points, predicted_batch, prediction_error, run_speedup  # noqa: E402
from prune.report.run_files import RunFiles  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "tweets-minilm-compress.yaml"))
    parser.add_argument("--out", default="runs/compress")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    pin_malloc_thresholds()  # this script owns its process: the malloc regime the latency model assumes
    result = run_recipe(load_recipe(args.recipe, args.overrides), args.out)
    run = RunFiles.read(Path(args.out), result.files)
    if run.frontier is None:
        print("the recipe has no frontier (compress.frontier is empty)")
        return 1
    points, metric, batch = frontier_points(run)
    sizes = [str(b) for b in run.frontier.batch_sizes]
    int8 = run.quantize.speedup_vs_torch if run.quantize is not None else None
    header = f"{'model':<44} {'heads':>5} {'neurons':>7} {metric:>8} " + " ".join(
        f"{'b=' + b + ' ms':>10} {'speed-up':>8}" for b in sizes
    ) + f" {'predicted':>9} {'error':>7}"
    dense = next((p for p in points if p.kind == "dense"), None)
    predicted_at = predicted_batch(run.frontier, batch)
    print(header + f"  (predicted ms and its error: batch {predicted_at})")
    for p in points:
        cells = []
        for b in sizes:
            ms, speed = p.latency_ms.get(b), run_speedup(points, p, b, int8)
            cells.append(f"{ms:10.1f}" if ms is not None else f"{'-':>10}")
            cells.append(f"{speed:7.2f}x" if speed is not None else f"{'-':>8}")
        fraction_error = prediction_error(p, dense, predicted_at)  # of the fraction of dense latency
        error = f"{fraction_error:+7.1%}" if fraction_error is not None else f"{'-':>7}"
        predicted = f"{p.predicted_ms:9.1f}" if p.predicted_ms else f"{'-':>9}"
        heads = f"{p.heads:>5}" if p.heads is not None else f"{'-':>5}"
        neurons = f"{p.neurons:>7}" if p.neurons is not None else f"{'-':>7}"
        print(f"{p.label:<44} {heads} {neurons} {p.metric:8.4f} " + " ".join(cells) + f" {predicted} {error}")
    final = run.compress
    if final is not None:
        print(f"\nfinal ({final.target} {final.fraction:g}): " + ", ".join(
            f"{name} {values[metric]:.4f}" for name, values in final.metrics.items()
        ))
    stages = Path(args.out) / "stages"
    seconds = {
        name: StageTiming.load(stages / f"{name}.time.json").seconds
        for name in ("compress-score", "latency-model", "compress", "frontier", "heal", "quantize")
        if (stages / f"{name}.time.json").is_file()
    }
    if seconds:
        print("stage seconds (when last run): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
