#!/usr/bin/env bash
# longctx data preparation submitted as a Ray job to an existing Ray cluster.
#
#   RAY_ADDRESS=http://head-node:8265 LONGCTX_CONFIG=/shared/prepare.yaml launch/ray/prepare.sh [key=value ...]
#   longctx launch ray CONFIG --dry-run   (renders this with the config checked)
#
# The driver of the job runs on the head node and connects to the cluster (ray_address=auto); every
# node needs this package installed. The config path must be readable on the head node.
# Overrides: this script's arguments, each passed on whole (blanks, quotes, $ and all; the rendered script
# sets its overrides as arguments with `set --`), after those in LONGCTX_OVERRIDES, which is split at blanks
# (an override with a blank, e.g. 'curriculum.stages.0.mitigations={decay_scale: 0.9}', goes as an argument).
# `longctx`'s arguments go base64-encoded (`longctx --argv-b64`): `ray job submit` joins the job's command
# into one line for the head's shell, which older Ray versions (subprocess.list2cmdline) quote no more than
# with double quotes around blanks, so that the shell would read a $, ` or ; in an override.
set -euo pipefail

: "${RAY_ADDRESS:?set RAY_ADDRESS to the job server of the cluster, e.g. http://head-node:8265}"
: "${LONGCTX_CONFIG:?set LONGCTX_CONFIG to the YAML config with data.prepare}"
: "${LONGCTX_OVERRIDES:=}"           # blank-separated key=value overrides (more: the arguments)
: "${PYTHON:=python}"

# Clusters started by `ray start` use token authentication by default; the token lives in ~/.ray/auth_token.
if [ -z "${RAY_AUTH_MODE:-}" ] && { [ -n "${RAY_AUTH_TOKEN:-}" ] || [ -f "${HOME}/.ray/auth_token" ]; }; then
  export RAY_AUTH_MODE=token
fi

read -r -a overrides <<< "${LONGCTX_OVERRIDES}"
overrides+=("$@")
echo "prepare.sh: longctx prepare ${LONGCTX_CONFIG@Q} ${overrides[*]@Q} data.prepare.ray_address=auto"
argv="$(printf '%s\0' prepare "${LONGCTX_CONFIG}" "${overrides[@]}" data.prepare.ray_address=auto | base64 -w0)"
# A job server whose cluster has just started answers "No available agent to submit job, please try again
# later" until its agent registers: that (and only that) is retried, every 5 s, LONGCTX_SUBMIT_ATTEMPTS times.
attempts="${LONGCTX_SUBMIT_ATTEMPTS:-24}"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
for ((attempt = 1; ; attempt++)); do
  set +e
  ray job submit --address "${RAY_ADDRESS}" -- "${PYTHON}" -m longctx --argv-b64 "${argv}" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" -eq 0 ] || ! grep -q "No available agent to submit job" "$log"; then
    exit "$rc"
  fi
  if [ "$attempt" -lt "$attempts" ]; then
    echo "prepare.sh: the job server at ${RAY_ADDRESS} has no agent yet; submitting again in 5 s" \
      "(attempt $attempt of $attempts)" >&2
    sleep 5
    continue
  fi
  # The agent never registered: it most often died at start, and the raylet with it. The usual cause is a
  # port taken by another Ray on the same machine (the agent's HTTP port is 52365 unless set).
  echo "prepare.sh: the job server at ${RAY_ADDRESS} still had no agent after $attempts attempts." \
    "The head's dashboard agent did not start: read dashboard_agent.log in the head's Ray session logs" \
    "(/tmp/ray/session_latest/logs by default). If another Ray runs on that machine, start the head" \
    "with its own ports (ray start --head --dashboard-agent-listen-port=PORT ...)." >&2
  exit "$rc"
done
