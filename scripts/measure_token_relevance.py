#!/usr/bin/env python
"""Issue #6 measurements on the fine-tuned default classifier (MiniLM-L6 on the embedded tweets).

1. ``faithfulness``: the deletion benchmark of every token-relevance method on the first 500 test
   tweets (AttAttr: 4 Gauss-Legendre nodes; IG: 20), explained 16 at a time.
2. ``heads``: head scores on the first 200 validation tweets by AttAttr (4 Gauss-Legendre nodes,
   predicted class probability), the unary share, the pairwise share and the gradient-weighted
   criterion, and the Spearman correlation of each with AttAttr.
3. ``timing``: seconds per example of each method explaining one tweet at a time (50 test tweets,
   methods in round robin after one warm-up call each; median and mean), next to the batched
   figure from step 1.

Heavy steps run one after the other. It never fine-tunes if the default model is cached.

    python scripts/measure_token_relevance.py [--out runs/token-relevance] [--steps faithfulness,heads,timing]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def faithfulness_step(out: Path, examples: int) -> None:
    from prune.cli import main

    code = main([
        "faithfulness", "--model", "default", "--data", "tweets", "--split", "test",
        "--examples", str(examples), "--methods", "all", "--attattr-n-steps", "4", "--ig-n-steps", "20",
        "--batch-size", "16", "--out", str(out / "faithfulness"),
    ])
    if code:
        raise SystemExit(code)


def heads_step(out: Path, examples: int) -> None:
    from attribution import HeadScores
    from prune.cli import main

    runs = {
        "attattr": ["--criterion", "attattr", "--n-steps", "4", "--integration", "gausslegendre"],
        "unary_share": ["--criterion", "unary_share"],
        "pairwise_share": ["--criterion", "pairwise_share"],
        "gradient_weighted": ["--criterion", "gradient_weighted"],
    }
    scores = {}
    for name, options in runs.items():
        path = out / "heads" / f"{name}.json"
        code = main([
            "attribute", "--model", "default", "--data", "tweets", "--split", "validation",
            "--examples", str(examples), "--batch-size", "16", *options, "--out", str(path),
            "--plot", str(path.with_suffix(".png")),
        ])
        if code:
            raise SystemExit(code)
        scores[name] = HeadScores.load(path)
    lines = [f"Spearman with AttAttr head scores ({examples} validation tweets):"]
    summary = {}
    for name, value in scores.items():
        if name != "attattr":
            rho = value.spearman(scores["attattr"])
            summary[name] = rho
            lines.append(f"  {name:<18} {rho:+.3f}   ({value.provenance['seconds']:.1f} s)")
    lines.append(f"  attattr itself took {scores['attattr'].provenance['seconds']:.1f} s")
    share = scores["unary_share"].values
    lines.append(
        f"unary share over all heads: mean {share.mean():.3f}, min {share.min():.3f}, max {share.max():.3f}; "
        f"per layer mean {', '.join(f'{v:.2f}' for v in share.mean(dim=1).tolist())}"
    )
    text = "\n".join(lines)
    print(text)
    (out / "heads" / "spearman.txt").write_text(text + "\n")
    (out / "heads" / "spearman.json").write_text(json.dumps(summary, indent=1) + "\n")


def timing_step(out: Path, examples: int) -> None:
    from attribution.core.data import load_splits
    from attribution.relevance import RELEVANCE_METHODS, default_method_options, make_relevance
    from prune.checkpoints import load_model

    model, tokenizer = load_model("default")
    texts = load_splits("tweets")["test"].select(range(examples))["text"]
    encoded = [tokenizer(t, truncation=True, max_length=64, return_tensors="pt") for t in texts]
    options = default_method_options(tokenizer, {"attattr": {"n_steps": 4}, "ig": {"n_steps": 20}})
    methods = {name: make_relevance(name, model, **options.get(name, {})) for name in RELEVANCE_METHODS}
    for method in methods.values():
        method.attribute(dict(encoded[0]))  # warm-up (captum import, first-call allocations)
    # Round robin over the methods per example, so a burst of load on the shared CPU hits all alike;
    # the median resists such bursts.
    times: dict[str, list[float]] = {name: [] for name in methods}
    for enc in encoded:
        for name, method in methods.items():
            tick = time.perf_counter()
            method.attribute(dict(enc))
            times[name].append(time.perf_counter() - tick)
    seconds = {}
    for name, values in times.items():
        seconds[name] = {"median": statistics.median(values), "mean": statistics.fmean(values)}
        print(f"  {name:<15} median {seconds[name]['median']:.4f}  mean {seconds[name]['mean']:.4f} s / example")
    (out / "timing_single.json").write_text(json.dumps(seconds, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/token-relevance")
    parser.add_argument("--steps", default="faithfulness,heads,timing")
    parser.add_argument("--faithfulness-examples", type=int, default=500)
    parser.add_argument("--head-examples", type=int, default=200)
    parser.add_argument("--timing-examples", type=int, default=50)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    for step in steps:
        started = time.perf_counter()
        print(f"== {step}", flush=True)
        if step == "faithfulness":
            faithfulness_step(out, args.faithfulness_examples)
        elif step == "heads":
            heads_step(out, args.head_examples)
        elif step == "timing":
            timing_step(out, args.timing_examples)
        else:
            raise SystemExit(f"unknown step {step!r}")
        print(f"== {step} done in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
