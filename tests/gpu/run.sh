#!/usr/bin/env bash
# The GPU check in one run, on a bare GPU machine with no network and no package index (under 8 minutes on one H100).
#
#   tests/gpu/run.sh [--rehearse] [--phases env,correctness,...] OUT     (OUT default: $OUT, else ./gpu_results)
#
# Before: tests/gpu/fetch.sh, on a machine with network, fills tests/gpu/offline/ (git-ignored, a few MiB: the
# omegaconf and PyYAML wheels, mamba_ssm's Triton SSD from its sdist); bring that folder along with the checkout.
# Installs nothing and never pip-installs the project: the checkout runs from PYTHONPATH with the machine's own
# python3, torch and triton; a wheel from tests/gpu/offline/wheels is unpacked into a temporary folder only for a
# module the machine lacks. Each phase of tests/gpu/phases.py runs in its own process under its own time limit
# (seconds in LIMITS; GPU_CHECK_LIMIT_<phase>=S overrides one), so one slow phase cannot eat the others' time.
# Writes OUT/gpu_check.json (every check, table, number and version), OUT/gpu_check.md (the same as Markdown
# tables for README) and OUT/gpu_check.log (every phase's output); exits non-zero naming each error, tolerance
# miss and timed-out phase.
# --rehearse: the same plan at tiny shapes in fp32 on CPU, with the Triton interpreter (tests/test_gpu_plan.py).
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
py="${PYTHON:-python3}"
offline="${GPU_CHECK_OFFLINE:-$here/offline}"
phases="env,correctness,long,long_peer,speed,model"
rehearse=false
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --rehearse) rehearse=true ;;
    --phases) phases="$2"; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) out="$1" ;;
  esac
  shift
done
out="${out:-${OUT:-$root/gpu_results}}"
start=$(date +%s.%N)

# seconds per phase: on an H200 (fresh machine, empty Triton cache) the phases took env 6, correctness 137, long 88,
# long_peer 60, speed 117, model 55 (463 s, docs/gpu/2026-11-28-h200); each limit leaves room over that, and the
# report fails the run when all of them together pass the 480 s budget
LIMITS="env=20 correctness=165 long=110 long_peer=80 speed=145 model=75"
budget=480
tiny=()
if $rehearse; then
  LIMITS="env=120 correctness=180 long=120 long_peer=180 speed=180 model=180"
  budget=0
  tiny=(--tiny)
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
else
  export TRITON_CACHE_AUTOTUNING=1     # later phases reuse the autotuning of earlier ones
fi

# the phases' fragments go under OUT as they are written, so a run killed from outside (the machine's own limit)
# still hands back how far every phase got (a report is written after each phase; OUT/phases goes at the end)
mkdir -p "$out"
work="$out/phases"
rm -rf "$work"
mkdir -p "$work"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
site="$tmp/site"
cd "$root" || exit 1
if ! "$py" "$here/offline.py" check --offline "$offline"; then
  echo "run.sh: $offline is incomplete (above); run tests/gpu/fetch.sh where there is network" >&2
  exit 2
fi
"$py" "$here/offline.py" site "$site" --offline "$offline" | sed 's/^/run.sh: wheel /'
export PYTHONPATH="$root:$site${PYTHONPATH:+:$PYTHONPATH}" GPU_CHECK_OFFLINE="$offline" GPU_CHECK_SITE="$site"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

: >"$out/gpu_check.log.tmp"
limits=""
for phase in ${phases//,/ }; do
  default="$(tr ' ' '\n' <<<"$LIMITS" | sed -n "s/^$phase=//p")"
  [ -n "$default" ] || { echo "run.sh: no phase '$phase'" >&2; exit 2; }
  override="GPU_CHECK_LIMIT_$phase"
  limit="${!override:-$default}"
  limits="${limits:+$limits,}$phase=$limit"
  echo "run.sh: $phase (limit $limit s)"
  t0=$(date +%s.%N)
  timeout -k 2 "$limit" "$py" -m tests.gpu.phases "$phase" --out "$work" ${tiny[@]+"${tiny[@]}"} >"$work/$phase.log" 2>&1
  rc=$?
  took="$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')"
  echo "$rc $took $limit" >"$work/$phase.rc"
  { echo "===== $phase: exit $rc in $took s (limit $limit s)"; cat "$work/$phase.log"; } >>"$out/gpu_check.log.tmp"
  tail -n 3 "$work/$phase.log" | sed "s/^/  /"
  # the report so far, so a run killed from outside still leaves gpu_check.json / .md with every finished phase
  done_phases="${done_phases:+$done_phases,}$phase"
  "$py" "$here/report.py" "$work" "$out" --phases "$done_phases" --limits "$limits" --budget 0 --seconds 0 \
    --mode "partial: $done_phases of $phases" >/dev/null 2>&1
done
total="$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')"
mv "$out/gpu_check.log.tmp" "$out/gpu_check.log"
mode=full
$rehearse && mode=rehearse
"$py" "$here/report.py" "$work" "$out" --phases "$phases" --limits "$limits" --budget "$budget" --seconds "$total" \
  --mode "$mode"
rc=$?
# gpu_check.json holds every fragment and each phase's log tail, gpu_check.log the whole logs: OUT stays 3 files
[ -s "$out/gpu_check.json" ] && rm -rf "$work"
exit $rc
