#!/usr/bin/env bash
# State collapse at small scale, end to end (README, "State collapse at small scale").
# Trains three small Mamba-2 models on the demo's synthetic passkey documents (d_state 32 and 128 at
# 256 tokens; d_state 128 trained on, at 1024 tokens), then reads 8192 tokens of concatenated documents
# with the state carried across them, as trained and with each mitigation, and prints the table.
#   bash configs/collapse/run.sh            (about 10 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/collapse}
LENGTH=${LENGTH:-8192}
MARGIN=${MARGIN:-0.2}
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
      --buckets 12 --margin "$MARGIN" --compare --mitigations ${MITIGATIONS[$name]} --out "$OUT/$model/eval-$name"
  done
done
python - "$OUT" "${MODELS[@]}" <<'PY'
import json, sys
from pathlib import Path
out, models = Path(sys.argv[1]), sys.argv[2:]
names = ["decay_scale", "state_norm", "window"]
print("| model | d_state | trained at | collapse point as trained | loss 4K-8K as trained | "
      + " | ".join(f"{n}: collapse / loss 4K-8K" for n in names) + " |")
print("|---" * (5 + len(names)) + "|")
for m in models:
    cfg = (out / m / "checkpoints").glob("step_*/trainer_state.json")
    trained = max(json.loads(p.read_text())["seq_len"] for p in cfg)
    runs = {n: json.loads((out / m / f"eval-{n}" / "loss_vs_position.json").read_text())["variants"] for n in names}
    def tail(r):
        b = [x for x in r["buckets"] if x["start"] >= 4000]
        return sum(x["mean_loss"] * x["tokens"] for x in b) / sum(x["tokens"] for x in b)
    base = runs[names[0]]["without"]
    cells = [f"{runs[n]['with mitigations']['collapse_point'] or '-'} / {tail(runs[n]['with mitigations']):.3f}" for n in names]
    d_state = "128" if "128" in m else "32"
    print(f"| {m} | {d_state} | {trained} | {base['collapse_point'] or '-'} | {tail(base):.3f} | " + " | ".join(cells) + " |")
PY
