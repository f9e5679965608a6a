#!/usr/bin/env bash
# A real two-node SLURM cluster on this one machine, for the tests (and for trying the sbatch scripts).
#
#   tests/slurm/cluster.sh start    # idempotent: (re)writes the config, starts munge, slurmctld, two slurmd
#   tests/slurm/cluster.sh stop
#   tests/slurm/cluster.sh status
#
# Needs root and Debian's packages `slurm-wlm` and `munge` (.ci/run installs them when it runs as root).
# Nodes node1 and node2 live on the loopback addresses 127.0.0.2 and 127.0.0.3 (added to /etc/hosts),
# each a `slurmd -N` with its own port, spool and pid file; each claims 16 CPUs and 4 "GPUs" backed by
# plain files (Gres=gpu:4), so gpu options in the sbatch scripts are scheduled for real while the ranks
# run on the CPU (DS_ACCELERATOR=cpu). State lives under $LONGCTX_SLURM_DIR (default /tmp/longctx-slurm).
set -euo pipefail

dir="${LONGCTX_SLURM_DIR:-/tmp/longctx-slurm}"
conf=/etc/slurm
nodes=(node1 node2)
addrs=(127.0.0.2 127.0.0.3)

write_config() {
  mkdir -p "$conf" "$dir"/{ctld,log,gres} /run/munge
  chown slurm:slurm "$dir/ctld" "$dir/log"
  for i in 0 1; do
    grep -q " ${nodes[$i]}\$" /etc/hosts || echo "${addrs[$i]} ${nodes[$i]}" >> /etc/hosts
  done
  for g in 0 1 2 3; do : > "$dir/gres/gpu$g"; done
  cat > "$conf/slurm.conf" <<EOF
ClusterName=longctx
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=6817
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/ctld
SlurmdSpoolDir=$dir/spool-%n
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldPidFile=$dir/slurmctld.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
GresTypes=gpu
ReturnToService=2
KillWait=30
MinJobAge=600
JobRequeue=1
SlurmdTimeout=20
InactiveLimit=0
MpiDefault=none
NodeName=node1 NodeAddr=127.0.0.2 Port=6818 CPUs=16 RealMemory=4000 Gres=gpu:4 State=UNKNOWN
NodeName=node2 NodeAddr=127.0.0.3 Port=6819 CPUs=16 RealMemory=4000 Gres=gpu:4 State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
  {
    for n in "${nodes[@]}"; do
      for g in 0 1 2 3; do echo "NodeName=$n Name=gpu File=$dir/gres/gpu$g"; done
    done
  } > "$conf/gres.conf"
  echo "ConstrainCores=no" > "$conf/cgroup.conf"
}

wait_for() {   # wait_for SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds
  local limit=$1 what=$2; shift 2
  for _ in $(seq $((limit * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "cluster.sh: $what did not come up within ${limit}s (logs: $dir/log)" >&2
  return 1
}

start() {
  write_config
  [ -s /etc/munge/munge.key ] || mungekey --create --force >/dev/null 2>&1 || \
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
  chown munge:munge /etc/munge/munge.key /run/munge; chmod 400 /etc/munge/munge.key
  pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged --force
  wait_for 10 munge munge -n
  pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
  wait_for 30 slurmctld scontrol ping
  for i in 0 1; do
    pgrep -f "slurmd -N ${nodes[$i]}" >/dev/null || /usr/sbin/slurmd -N "${nodes[$i]}"
  done
  for n in "${nodes[@]}"; do
    scontrol update nodename="$n" state=resume >/dev/null 2>&1 || true
  done
  # shellcheck disable=SC2016  # expanded by the inner shell, at each poll
  wait_for 60 "both nodes idle" bash -c '[ "$(sinfo -h -N -o %t | grep -cE "^(idle|mix|alloc)")" = 2 ]'
}

stop() {
  pkill -f "slurmd -N node" 2>/dev/null || true
  pkill -x slurmctld 2>/dev/null || true
}

case "${1:-}" in
  start) start; echo "SLURM cluster up: $(sinfo -h -N -o '%N:%t' | tr '\n' ' ')" ;;
  stop) stop ;;
  status) sinfo -N ;;
  *) sed -n '2,12p' "$0"; exit 2 ;;
esac
