#!/usr/bin/env bash
# longctx training over the nodes of a DeepSpeed hostfile (MPI style: "host slots=N" per line).
#
#   HOSTFILE=hostfile LONGCTX_CONFIG=cfg.yaml launch/deepspeed/train.sh [key=value ...]
#   longctx launch deepspeed CONFIG --nodes 2 --gpus-per-node 8 --dry-run   (renders this with checked values)
#
# Overrides: this script's arguments, each passed on whole (blanks, quotes, $ and all; the rendered script
# sets its overrides as arguments with `set --`), after those in LONGCTX_OVERRIDES, which is split at blanks
# (an override with a blank, e.g. 'curriculum.stages.0.mitigations={decay_scale: 0.9}', goes as an argument).
#
# Two ways to reach the nodes:
# - ssh (default): run this once, on the first host; DeepSpeed reaches the others with pdsh/ssh. Its pdsh
#   runner writes each host's command as one shell line, with the variables named in LONGCTX_ENV_VARS
#   exported in it (read from a file of this user's only, removed on exit), and logs that line, which `ps`
#   also shows on every host: so no secret is passed that way. Names like *SECRET*, *TOKEN*, *PASSWORD*,
#   *API_KEY* are refused in LONGCTX_ENV_VARS and unset for the runner (it would export MLFLOW_* ones of
#   its own accord); the hosts use credentials of their own (~/.aws/credentials, an instance role), or
#   run without ssh. `longctx`'s arguments go base64-encoded (`longctx --argv-b64`): that line's shell
#   would read a $, ` or ; in them.
# - no ssh: run this on every host with NODE_RANK set to that host's line in the hostfile (0, 1, ...):
#   each becomes the DeepSpeed launcher of its own ranks (`longctx node`), and they meet at MASTER_ADDR
#   (default: the first host). The environment is each host's own, secrets included; nothing is written.
#   This is how the SLURM script runs.
# A hostfile with one host runs its processes there without ssh (NODE_RANK 0).
set -euo pipefail

: "${LONGCTX_CONFIG:?set LONGCTX_CONFIG to the YAML config of the run}"
: "${HOSTFILE:=hostfile}"
: "${LONGCTX_OVERRIDES:=}"           # blank-separated key=value overrides (more: the arguments)
: "${MASTER_PORT:=29500}"
: "${PYTHON:=python}"
# No AWS_ACCESS_KEY_ID either: without its secret, boto3 on a host stops at it ("partial credentials")
# instead of reading that host's own credentials.
: "${LONGCTX_ENV_VARS:=PYTHONPATH DS_ACCELERATOR NCCL_DEBUG NCCL_SOCKET_IFNAME NCCL_IB_HCA OMP_NUM_THREADS HF_HOME AWS_DEFAULT_REGION S3_ENDPOINT_URL}"

if [ ! -f "${HOSTFILE}" ]; then
  echo "longctx: hostfile ${HOSTFILE} not found (lines like 'node-1 slots=8')" >&2
  exit 2
fi

read -r -a overrides <<< "${LONGCTX_OVERRIDES}"
overrides+=("$@")
hosts="$(grep -cvE '^[[:space:]]*(#|$)' "${HOSTFILE}" || true)"
if [ -n "${NODE_RANK:-}" ] || [ "${hosts}" -eq 1 ]; then
  exec "${PYTHON}" -m longctx node "${LONGCTX_CONFIG}" "${overrides[@]}" --hostfile "${HOSTFILE}" \
    --node-rank "${NODE_RANK:-0}" ${MASTER_ADDR:+--master-addr "${MASTER_ADDR}"} --master-port "${MASTER_PORT}" < /dev/null
fi

# A name that says its variable holds a secret: AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, HF_TOKEN,
# WANDB_API_KEY, MLFLOW_TRACKING_PASSWORD, ... (not TOKENIZERS_PARALLELISM: whole words between _).
secret() { [[ "$1" =~ (^|_)(SECRET|TOKEN|PASSWORD|PASSWD|API_KEY|PRIVATE_KEY)(_|$) ]]; }

# The runner's environment file: mktemp makes it this user's only (0600); DS_ENV_FILE, an absolute path,
# is where DeepSpeed's runner reads it (in place of ~/.deepspeed_env and ./.deepspeed_env).
DS_ENV_FILE="$(mktemp)"
export DS_ENV_FILE
trap 'rm -f "${DS_ENV_FILE}"' EXIT
for name in ${LONGCTX_ENV_VARS}; do
  if ! [[ "${name}" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || secret "${name}"; then
    echo "longctx: LONGCTX_ENV_VARS names ${name}: not a variable name, or a secret, which DeepSpeed's pdsh" \
         "runner would log and show to every host's ps; give the hosts their own (~/.aws/credentials, an" \
         "instance role), or run without ssh (NODE_RANK on each host)" >&2
    exit 2
  fi
  if [ -n "${!name:-}" ]; then
    printf '%s=%s\n' "${name}" "${!name}" >> "${DS_ENV_FILE}"
  fi
done
# The runner needs no secret itself, and it exports variables named MLFLOW_*, PYTHON*, NCCL_*, ... of its own
# accord into the line it logs: every secret is unset for it.
held=()
for name in $(compgen -e); do
  if secret "${name}"; then
    held+=("${name}")
    unset "${name}"
  fi
done
if [ "${#held[@]}" -gt 0 ]; then
  echo "longctx: not passed to the hosts: ${held[*]} (DeepSpeed's pdsh runner would log them); the hosts use" \
       "their own credentials (~/.aws/credentials, an instance role), or run this without ssh (NODE_RANK)" >&2
fi

extra=()
if [ -n "${MASTER_ADDR:-}" ]; then        # otherwise DeepSpeed asks the first host over ssh
  extra+=(--master_addr "${MASTER_ADDR}")
fi
echo "longctx: on each host of ${HOSTFILE}: longctx train ${LONGCTX_CONFIG@Q} ${overrides[*]@Q}"
argv="$(printf '%s\0' train "${LONGCTX_CONFIG}" "${overrides[@]}" | base64 -w0)"

# Not exec'd, so that the EXIT trap removes the environment file; a SIGTERM to this script goes on to the
# runner, which stops the hosts' launchers.
"${PYTHON}" -m deepspeed.launcher.runner --hostfile "${HOSTFILE}" --master_port "${MASTER_PORT}" \
  "${extra[@]}" --no_local_rank --module longctx.launch.cli --argv-b64 "${argv}" < /dev/null &
runner=$!
trap 'kill -TERM "${runner}" 2>/dev/null || true' TERM
trap 'kill -INT "${runner}" 2>/dev/null || true' INT      # a background job starts with SIGINT ignored
trap 'kill -HUP "${runner}" 2>/dev/null || true' HUP
while kill -0 "${runner}" 2>/dev/null; do
  wait "${runner}" || true               # returns early when the TERM trap runs; then wait again
done
wait "${runner}"                         # its exit status is this script's
