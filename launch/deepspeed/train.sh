#!/usr/bin/env bash
# longctx training over the nodes of a DeepSpeed hostfile (MPI style: "host slots=N" per line).
#
#   HOSTFILE=hostfile LONGCTX_CONFIG=cfg.yaml launch/deepspeed/train.sh [key=value ...]
#   longctx launch deepspeed CONFIG --nodes 2 --gpus-per-node 8 --dry-run   (renders this with checked values)
#
# Remote nodes are reached with pdsh/ssh by DeepSpeed; the variables listed in LONGCTX_ENV_VARS
# are written to ./.deepspeed_env, which DeepSpeed exports on every node. A hostfile with only
# "localhost slots=N" runs N local processes without ssh (how the tests run it, on CPU).
set -euo pipefail

: "${LONGCTX_CONFIG:?set LONGCTX_CONFIG to the YAML config of the run}"
: "${HOSTFILE:=hostfile}"
: "${LONGCTX_OVERRIDES:=}"
: "${MASTER_PORT:=29500}"
: "${PYTHON:=python}"
: "${LONGCTX_ENV_VARS:=PYTHONPATH DS_ACCELERATOR NCCL_DEBUG NCCL_SOCKET_IFNAME NCCL_IB_HCA OMP_NUM_THREADS HF_HOME AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_DEFAULT_REGION S3_ENDPOINT_URL}"

if [ ! -f "${HOSTFILE}" ]; then
  echo "longctx: hostfile ${HOSTFILE} not found (lines like 'node-1 slots=8')" >&2
  exit 2
fi

# .deepspeed_env: one NAME=value per line, exported by DeepSpeed on every node.
: > .deepspeed_env
for name in ${LONGCTX_ENV_VARS}; do
  if [ -n "${!name:-}" ]; then
    printf '%s=%s\n' "${name}" "${!name}" >> .deepspeed_env
  fi
done

# One host: DeepSpeed's local mode, which needs no ssh (it would otherwise probe ssh to that host).
extra=()
hosts="$(grep -cvE '^[[:space:]]*(#|$)' "${HOSTFILE}" || true)"
if [ "${hosts}" -eq 1 ]; then
  extra+=(--no_ssh_check)
  MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
fi
if [ -n "${MASTER_ADDR:-}" ]; then        # otherwise DeepSpeed asks the first host over ssh
  extra+=(--master_addr "${MASTER_ADDR}")
fi

read -r -a overrides <<< "${LONGCTX_OVERRIDES}"
exec "${PYTHON}" -m deepspeed.launcher.runner --hostfile "${HOSTFILE}" --master_port "${MASTER_PORT}" \
  "${extra[@]}" --no_local_rank --module longctx.launch.cli train "${LONGCTX_CONFIG}" "${overrides[@]}" "$@" < /dev/null
