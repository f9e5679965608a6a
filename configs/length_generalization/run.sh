#!/usr/bin/env bash
# Length generalization at small scale, end to end (docs/results/length-generalization.md).
# Starts from the collapse study's short-state128 model (configs/collapse/run.sh trains it: d_state 128, 1500
# steps at 256 tokens with state resets; it collapses past its training length), then
#   (a) continues it 150 steps (10% of its first stage) at 256 tokens with no change,
#   (b) the same with carry_state: batch (State Passing),
#   (c) the same with carry_state: document (truncated BPTT over documents up to 1000 tokens),
#   (d) the paper's mitigations on (a): decay_scale 0.9, state norm (every 64, calibrated at 256), window 256,
#   (e) (a) with one scale per layer fitted on held-out sequences of 4096 tokens (longctx calibrate, decay and A),
# and evaluates all of them side by side on the same prompts and held-out text: passkey retrieval at 256..8192
# tokens and loss against position to 16K (longctx eval ... --variants). About 25 minutes on 2 CPU cores
# once the collapse study's model exists.
#   bash configs/length_generalization/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/lengthgen}
BASE=${BASE:-runs/collapse/short-state128/checkpoints}
if [ ! -d "$BASE" ]; then
  longctx run configs/collapse/short-state128.yaml
fi
for mode in none batch document; do
  resume="$BASE/$(cat "$BASE/latest")"            # the first time: from the collapse study's last checkpoint
  [ -f "$OUT/carry-$mode/checkpoints/latest" ] && resume=auto
  longctx run configs/length_generalization/continue.yaml "run.dir=$OUT/carry-$mode" \
    "curriculum.stages.1.carry_state=$mode" "run.resume=$resume"
done
for param in decay A; do
  [ -f "$OUT/calibrated-$param/calibration.json" ] ||
    longctx calibrate "$OUT/carry-none/checkpoints" --length 4096 --data runs/demo-data/mds --param "$param" \
      --samples 16 --batch 4 --steps 30 --out "$OUT/calibrated-$param"
done
A="checkpoint=$OUT/carry-none/checkpoints"
VARIANTS=(
  "as trained (1500 steps)="
  "(a) continued=$A"
  "(b) state passing=checkpoint=$OUT/carry-batch/checkpoints"
  "(c) truncated BPTT=checkpoint=$OUT/carry-document/checkpoints"
  "(d) decay 0.9=$A,decay_scale=0.9"
  "(d) state norm=$A,state_norm.every=64"
  "(d) window 256=$A,window=256"
  "(e) calibrated decay=checkpoint=$OUT/calibrated-decay"
  "(e) calibrated A=checkpoint=$OUT/calibrated-A"
)
longctx eval passkey "$BASE" --lengths 256,512,1024,2048,4096,8192 --depths 0,0.5,1 --samples 2 \
  --calibration-length 256 --out "$OUT/passkey" --variants "${VARIANTS[@]}"
longctx eval length "$BASE" --data runs/demo-data/mds --seed 1 --lengths 16384 --buckets 12 --margin 0.2 \
  --min-position 256 --calibration-length 256 --out "$OUT/length" --variants "${VARIANTS[@]}"
cat "$OUT/passkey/table.md" "$OUT/length/table.md"
