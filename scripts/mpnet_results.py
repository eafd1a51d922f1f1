"""Print what the README's MPNet-base section reports, from a finished ``recipes/tweets-mpnet.yaml`` run:
the fine-tune's accuracy, the sweep's accuracy per criterion and fraction, the heads AttAttr ranks
first (and where its top heads sit by layer), and the pruned model's cost.

    headprune run recipes/tweets-mpnet.yaml --out runs/tweets-mpnet
    python scripts/mpnet_results.py runs/tweets-mpnet
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from attribution import HeadScores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the run directory")
    parser.add_argument("--top", type=int, default=12, help="how many of AttAttr's first heads to list")
    args = parser.parse_args()
    run = args.run

    finetune = json.loads((run / "finetune.json").read_text()) if (run / "finetune.json").is_file() else None
    if finetune:
        print("fine-tune:", json.dumps({k: v for k, v in finetune.items() if k not in ("format", "version")})[:600])

    sweep = json.loads((run / "sweep.json").read_text())
    print("\nsweep:", json.dumps({k: v for k, v in sweep.items() if k not in ("format", "version")})[:2000])

    scores = HeadScores.load(run / "scores" / "attattr.json")
    values = scores.values  # [L, H]
    heads = values.shape[1]
    order = values.flatten().argsort(descending=True).tolist()
    first = [(i // heads, i % heads) for i in order[: args.top]]
    print(f"\nAttAttr's first {args.top} heads (layer, head; 0-based):", first)
    by_layer = Counter(layer for layer, _ in [(i // heads, i % heads) for i in order[: values.numel() // 4]])
    print("layers of AttAttr's top quarter:", dict(sorted(by_layer.items())))

    for name in ("prune.json", "cost.json", "dense.json"):
        path = run / name
        if path.is_file():
            record = json.loads(path.read_text())
            print(f"\n{name}:", json.dumps({k: v for k, v in record.items() if k not in ("format", "version")})[:2500])


if __name__ == "__main__":
    main()
