#!/usr/bin/env bash
# Makes models/demo-base again: configs/demo-base.yaml from scratch (prepare, then 3,000 steps at 256 tokens on 2
# local processes), then its final checkpoint exported in mamba_ssm's layout (safetensors) with its tokenizer record.
# Prints the new weights' sha256: configs/demo.yaml pins it (model.from_pretrained_sha256).
#   bash models/demo-base/make.sh [OUT [key=value ...]]       (OUT: models/demo-base; overrides go to the run)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-models/demo-base}
shift || true
run_dir=$(mktemp -d "${TMPDIR:-/tmp}/demo-base.XXXXXX")
longctx run configs/demo-base.yaml run.resume=never "run.dir=$run_dir" "$@"
longctx export "$run_dir/checkpoints" "$out" --format mamba_ssm --safetensors
cp "$run_dir/report.md" "$out/report.md"
sha256sum "$out/model.safetensors"
