#!/usr/bin/env bash
# longctx training over the nodes of a DeepSpeed hostfile (MPI style: "host slots=N" per line).
#
#   HOSTFILE=hostfile LONGCTX_CONFIG=cfg.yaml launch/deepspeed/train.sh [key=value ...]
#   longctx launch deepspeed CONFIG --nodes 2 --gpus-per-node 8 --dry-run   (renders this with checked values)
#
# Two ways to reach the nodes:
# - ssh (default): run this once, on the first host; DeepSpeed reaches the others with pdsh/ssh, and
#   exports the variables listed in LONGCTX_ENV_VARS (written to ./.deepspeed_env) on every node.
# - no ssh: run this on every host with NODE_RANK set to that host's line in the hostfile (0, 1, ...):
#   each becomes the DeepSpeed launcher of its own ranks (`longctx node`), and they meet at MASTER_ADDR
#   (default: the first host). The environment is each host's own. This is how the SLURM script runs.
# A hostfile with one host runs its processes there without ssh (NODE_RANK 0).
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

read -r -a overrides <<< "${LONGCTX_OVERRIDES}"
hosts="$(grep -cvE '^[[:space:]]*(#|$)' "${HOSTFILE}" || true)"
if [ -n "${NODE_RANK:-}" ] || [ "${hosts}" -eq 1 ]; then
  exec "${PYTHON}" -m longctx node "${LONGCTX_CONFIG}" "${overrides[@]}" "$@" --hostfile "${HOSTFILE}" \
    --node-rank "${NODE_RANK:-0}" ${MASTER_ADDR:+--master-addr "${MASTER_ADDR}"} --master-port "${MASTER_PORT}" < /dev/null
fi

# .deepspeed_env: one NAME=value per line, exported by DeepSpeed on every node.
: > .deepspeed_env
for name in ${LONGCTX_ENV_VARS}; do
  if [ -n "${!name:-}" ]; then
    printf '%s=%s\n' "${name}" "${!name}" >> .deepspeed_env
  fi
done

extra=()
if [ -n "${MASTER_ADDR:-}" ]; then        # otherwise DeepSpeed asks the first host over ssh
  extra+=(--master_addr "${MASTER_ADDR}")
fi

exec "${PYTHON}" -m deepspeed.launcher.runner --hostfile "${HOSTFILE}" --master_port "${MASTER_PORT}" \
  "${extra[@]}" --no_local_rank --module longctx.launch.cli train "${LONGCTX_CONFIG}" "${overrides[@]}" "$@" < /dev/null
