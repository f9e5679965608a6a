#!/usr/bin/env bash
# Fill tests/gpu/offline/ (git-ignored) on a machine with network, for tests/gpu/run.sh on a GPU machine without.
#
#   tests/gpu/fetch.sh [DEST]          (default: tests/gpu/offline; replaces what is there once the new
#                                      folder is complete)
#
# Downloads with pip, from the package index only:
#   - mamba_ssm's source distribution (never built: MAMBA_SKIP_CUDA_BUILD=TRUE for the metadata step pip runs);
#     tests/gpu/offline.py keeps its Triton SSD (ssd_combined.py and what it imports) under peer/, with a stub
#     package __init__ and peer.json (version, sha256 of the sdist);
#   - wheels/: omegaconf (pure Python; 2.4 carries its own antlr4 runtime) and PyYAML, its one dependency, for
#     CPython 3.10-3.13 on x86_64 Linux. run.sh unpacks only what the GPU machine's python lacks.
# Versions: MAMBA_SSM_VERSION, OMEGACONF_VERSION, PYYAML_VERSION override the pins below.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dest="${1:-$here/offline}"
mamba_version="${MAMBA_SSM_VERSION:-2.3.2.post1}"
omegaconf_version="${OMEGACONF_VERSION:-2.4.0}"
pyyaml_version="${PYYAML_VERSION:-6.0.4}"
py="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
pip_get() { "$py" -m pip download --quiet --no-deps "$@"; }

MAMBA_SKIP_CUDA_BUILD=TRUE pip_get --no-binary :all: --no-build-isolation -d "$tmp/sdist" "mamba-ssm==$mamba_version"
pip_get --only-binary :all: -d "$tmp/wheels" "omegaconf==$omegaconf_version"
for v in 10 11 12 13; do
  pip_get --only-binary :all: --implementation cp --python-version "3.$v" --abi "cp3$v" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$tmp/wheels" "PyYAML==$pyyaml_version"
done

sdist="$(find "$tmp/sdist" -name 'mamba_ssm-*.tar.gz' | head -n 1)"
[ -n "$sdist" ] || { echo "fetch.sh: no mamba_ssm sdist was downloaded" >&2; exit 1; }
# The new folder is made beside DEST (one filesystem: the swap is two renames) and replaces it only once it is
# complete: a failed vendoring (a version without the Triton SSD) leaves the last good folder as it was, and a
# check already reading DEST loses its files for two renames' time, not for the whole vendoring.
mkdir -p "$(dirname "$dest")"
new="$(mktemp -d "${dest%/}.new.XXXXXX")"
trap 'rm -rf "$tmp" "$new" "$new.old"' EXIT
mv "$tmp/wheels" "$new/wheels"
"$py" "$here/offline.py" vendor "$sdist" --dest "$new/peer" | sed "s#$new#$dest#"
"$py" "$here/offline.py" check --offline "$new" >/dev/null
if [ -e "$dest" ]; then mv "$dest" "$new.old"; fi
mv "$new" "$dest"
"$py" "$here/offline.py" check --offline "$dest"
