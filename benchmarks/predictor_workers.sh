#!/usr/bin/env bash
# Predictor training with one Ray Train worker of all the cores against one worker per
# core (DDP, an all-reduce per step), on the same centroids and features; the order
# alternates from round to round.
#   benchmarks/predictor_workers.sh CENTROIDS FEATURES [ROUNDS]
# Prints each fit's train_seconds (predictor.json), wall time and validation top-1.
set -euo pipefail
centroids=$(realpath "${1:?centroids directory}")
features=$(realpath "${2:?features directory of the same run}")
rounds=${3:-1}
cd "$(dirname "$0")/.."
cores=$(nproc)
[ "$cores" -gt 1 ] || { echo "needs at least 2 cores to compare" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for round in $(seq "$rounds"); do
  order="1 $cores"
  [ $((round % 2)) -eq 1 ] || order="$cores 1"
  for workers in $order; do
    out="$work/r$round-w$workers"
    SECONDS=0
    .venv/bin/actclust train-predictor --centroids "$centroids" --features "$features" \
        --out "$out/cluster" --workers "$workers" >/dev/null
    .venv/bin/python - "$out/cluster/predictor.json" "$SECONDS" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"workers {r['workers']}: train_seconds {r['train_seconds']:.1f}, "
      f"wall {sys.argv[2]} s, validation top-1 {r['validation_accuracy']:.4f}")
PY
  done
done
