#!/usr/bin/env bash
# GPU check of the Triton SSD kernels: correctness at the 370M shapes up to 256K
# tokens, and `longctx bench kernels` against mamba_ssm's mamba_chunk_scan_combined.
#
#   tests/gpu/run.sh [OUT_DIR]        (default: $OUT, else ./gpu_results)
#
# GPU hosts may have no network: everything is installed from wheels placed in
# tests/gpu/wheels/ (pip --no-index). Missing wheels for packages already installed are
# fine; a missing mamba_ssm only drops its bench rows. Writes into OUT_DIR:
#   gpu_tests.json   errors per test (tests/gpu/test_gpu_kernels.py), gpu_tests.xml (junit)
#   bench_kernels.json, bench_kernels_long.json   `longctx bench kernels` rows
#   summary.json     exit codes, device, versions
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${1:-${OUT:-$root/gpu_results}}"
wheels="$here/wheels"
mkdir -p "$out"
cd "$root" || exit 1
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

pip_offline() {
  python -m pip install --no-index --find-links "$wheels" --no-build-isolation "$@"
}

if [ -d "$wheels" ]; then
  # the project (and any dependency not yet installed), then mamba_ssm if its wheel is there
  pip_offline -e "." || echo "run.sh: offline install of the project failed; running from the source tree" >&2
  if compgen -G "$wheels/mamba_ssm-*.whl" > /dev/null; then
    pip_offline mamba_ssm || echo "run.sh: mamba_ssm wheel did not install; no mamba_ssm rows" >&2
  fi
else
  echo "run.sh: no $wheels directory; using what is installed" >&2
fi

python - <<'PY' || { echo "run.sh: no CUDA device visible to torch" >&2; exit 2; }
import torch, triton
assert torch.cuda.is_available()
print("device:", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
PY
python -c "import mamba_ssm" 2>/dev/null && have_mamba=true || have_mamba=false

GPU_RESULTS_DIR="$out" python -m pytest tests/gpu/test_gpu_kernels.py -m gpu -o addopts="" -p no:cacheprovider \
  -q -ra --junitxml "$out/gpu_tests.xml"
tests_rc=$?

longctx() { python -m longctx "$@"; }
shape=(--heads 32 --headdim 64 --d-state 128 --chunk-size 256 --devices cuda --naive-max-len 0)
longctx bench kernels --lengths 8192,16384,32768,65536 --dtypes bfloat16,float32 --repeats 5 "${shape[@]}" \
  --out "$out/bench_kernels.json"
bench_rc=$?
# past 64K: mamba_ssm's 32-bit offsets; failures and wrong outputs land in the rows (error, rel err vs torch)
longctx bench kernels --lengths 131072,262144 --dtypes bfloat16 --repeats 2 "${shape[@]}" \
  --out "$out/bench_kernels_long.json"
long_rc=$?

python - "$out" "$tests_rc" "$bench_rc" "$long_rc" "$have_mamba" <<'PY'
import json, sys, torch
out, tests_rc, bench_rc, long_rc, have_mamba = sys.argv[1:]
summary = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, tests_rc=int(tests_rc),
               bench_rc=int(bench_rc), bench_long_rc=int(long_rc), mamba_ssm=have_mamba == "true")
with open(f"{out}/summary.json", "w") as f:
    json.dump(summary, f, indent=2)
print(json.dumps(summary))
PY

[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$long_rc" -eq 0 ]
