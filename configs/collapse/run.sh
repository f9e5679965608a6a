#!/usr/bin/env bash
# State collapse at small scale, end to end (docs/results/collapse.md).
# Trains three small Mamba-2 models on the demo's synthetic passkey documents (d_state 32 and 128 at
# 256 tokens; d_state 128 trained on, at 1024 tokens), then reads 8192 tokens of concatenated documents
# with the state carried across them, as trained and with each mitigation, and prints the table.
#   bash configs/collapse/run.sh            (about 30 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/collapse}
LENGTH=${LENGTH:-8192}
MARGIN=${MARGIN:-0.2}
TRAINED=${TRAINED:-256}   # judge positions past the short models' training length
MODELS=(short-state32 short-state128 long-state128)
for model in "${MODELS[@]}"; do
  longctx run "configs/collapse/$model.yaml" "run.dir=$OUT/$model"
done
declare -A MITIGATIONS=(
  [decay_scale]="decay_scale=0.9"
  [state_norm]="state_norm.every=64 state_norm.multiplier=1.0"
  [window]="window=256"
)
for model in "${MODELS[@]}"; do
  for name in "${!MITIGATIONS[@]}"; do
    # shellcheck disable=SC2086  # the mitigation list is meant to split into KEY=VAL words
    longctx eval length "$OUT/$model/checkpoints" --data runs/demo-data/mds --seed 1 --lengths "$LENGTH" \
      --buckets 12 --margin "$MARGIN" --min-position "$TRAINED" --compare --mitigations ${MITIGATIONS[$name]} --out "$OUT/$model/eval-$name"
  done
done
python - "$OUT" "${MODELS[@]}" <<'PY'
import json, sys
from pathlib import Path
out, models = Path(sys.argv[1]), sys.argv[2:]
names = {"decay_scale": "decay_scale 0.9", "state_norm": "state norm (every 64, x1.0)", "window": "window 256"}
config = {"short-state32": ("32", "one document (<= 301)", "256"), "short-state128": ("128", "one document (<= 301)", "256"),
          "long-state128": ("128", "the whole sequence", "256 then 1024")}
def cell(r):
    last = r["buckets"][-1]
    return f"{r['collapse_point'] or 'none'} / {last['mean_loss']:.3f}"
print("| model | d_state | state carried in training over | trained at | as trained | "
      + " | ".join(names.values()) + " |")
print("|---" * (5 + len(names)) + "|")
for m in models:
    runs = {n: json.loads((out / m / f"eval-{n}" / "loss_vs_position.json").read_text())["variants"] for n in names}
    d_state, carried, trained = config.get(m, ("?", "?", "?"))
    print(f"| {m} | {d_state} | {carried} | {trained} | {cell(runs['decay_scale']['without'])} | "
          + " | ".join(cell(runs[n]["with mitigations"]) for n in names) + " |")
print()
print("cells: collapse point (first position bucket past the training length whose loss exceeds the best "
      "bucket since then by the margin) / mean loss of the last bucket")
PY
