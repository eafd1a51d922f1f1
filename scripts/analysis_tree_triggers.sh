#!/usr/bin/env bash
# Issue #5 measurements on the fine-tuned default classifier (MiniLM-L6 on the embedded tweets):
#   1. the attribution tree of one held-out tweet (test split, row 1), as text/PNG/HTML/JSON;
#   2. trigger patterns mined from 500 training tweets (seeded sample, correctly classified only),
#      AttAttr with Gauss-Legendre quadrature, 4 nodes (median completeness error ~0.03%);
#   3. the attack: each class's top-5 patterns inserted into 1,000 held-out (validation) tweets of
#      the other classes, against random vocabulary tokens at the same positions (3 draws).
# It never fine-tunes if the default model is cached (headprune finetune trains it once, ~10 min).
#
#   scripts/analysis_tree_triggers.sh [OUT_DIR]      # default: runs/analysis-tree-triggers
set -euo pipefail
OUT="${1:-runs/analysis-tree-triggers}"
mkdir -p "$OUT"

TWEET=$(python -c "from attribution.core.data import load_splits; print(load_splits('tweets')['test'][1]['text'])")
echo "tweet: $TWEET"
time headprune tree --model default --text "$TWEET" --n-steps 6 --integration gausslegendre --tau 0.4 \
    --out "$OUT/tree.txt" --out "$OUT/tree.png" --out "$OUT/tree.html" --out "$OUT/tree.json"

time headprune triggers --model default --data tweets --split train --examples 500 \
    --n-steps 4 --integration gausslegendre --pairs 2 --seed 0 \
    --attack --top-k 5 --attack-split validation --attack-examples 1000 --random-trials 3 \
    --out "$OUT/triggers.json" | tee "$OUT/triggers.txt"
