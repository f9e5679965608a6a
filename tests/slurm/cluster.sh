#!/usr/bin/env bash
# A real two-node SLURM cluster on this one machine, for the tests (and for trying the sbatch scripts).
#
#   tests/slurm/cluster.sh start    # idempotent: writes the config, starts munge, slurmctld, two slurmd
#   tests/slurm/cluster.sh stop     # cancels its jobs, stops the daemons it started, and nothing else
#   tests/slurm/cluster.sh status
#   export SLURM_CONF=/tmp/longctx-slurm/etc/slurm.conf    # (`start` prints it) then sbatch, squeue... reach it
#
# Needs root and Debian's packages `slurm-wlm` and `munge` (.ci/run installs them when it runs as root).
# Nodes node1 and node2 live on the loopback addresses 127.0.0.2 and 127.0.0.3 (added to /etc/hosts),
# each a `slurmd -N` with its own port, spool and pid file; each claims 16 CPUs and 4 "GPUs" backed by
# plain files (Gres=gpu:4), so gpu options in the sbatch scripts are scheduled for real while the ranks
# run on the CPU (DS_ACCELERATOR=cpu). State lives under $LONGCTX_SLURM_DIR (default /tmp/longctx-slurm).
#
# It runs beside any other SLURM on the machine (a compute node's own slurmd, a site's /etc/slurm): its config
# is $dir/etc/slurm.conf, never /etc/slurm; its three ports are picked free when it starts, not SLURM's
# 6817-6819; and `stop` stops only the daemons named by the pid files under $dir (munged only if it started it).
set -euo pipefail

dir=$(realpath -m "${LONGCTX_SLURM_DIR:-/tmp/longctx-slurm}")   # absolute: the daemons chdir, `current` matches it
etc="$dir/etc"
# Every client here (scontrol, sinfo) and every daemon reads this cluster's config, whatever /etc/slurm holds.
export SLURM_CONF="$etc/slurm.conf"
nodes=(node1 node2)
addrs=(127.0.0.2 127.0.0.3)

# The pid files are this script's mark of ownership: only daemons configured here write under $dir.
ctld_pid="$dir/slurmctld.pid"
slurmd_pid() { echo "$dir/slurmd-$1.pid"; }
munged_pid="$dir/munge/munged.pid"

running() {   # running PIDFILE NAME: print the pid in PIDFILE if that process is alive and is NAME (not a reused pid)
  local pid
  pid=$(head -c 32 "$1" 2>/dev/null | tr -dc 0-9) || true
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] && echo "$pid"
}

current() {   # current PIDFILE NAME: running, and started with this config (an older cluster.sh used /etc/slurm's)
  local pid
  pid=$(running "$1" "$2") && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -qF -- "-f $SLURM_CONF "
}

free_ports() {   # free_ports N: N distinct TCP ports that nothing holds, on every address, as the daemons bind
  # Taken from below the kernel's ephemeral range, so no outgoing connection's port takes one between this pick
  # and the daemon's bind, or while node2's slurmd is down in the lost-node test; random, so two clusters started
  # at once (two LONGCTX_SLURM_DIR) rarely try the same.
  python3 - "$1" <<'EOF'
import random, socket, sys
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
held = []
for port in random.sample(range(10000, low), low - 10000):
    s = socket.socket()
    try:
        s.bind(("", port))
    except OSError:
        s.close()
        continue
    held.append(s)
    if len(held) == int(sys.argv[1]):
        break
print(" ".join(str(s.getsockname()[1]) for s in held))
EOF
}

write_config() {
  local ports
  read -r -a ports <<< "$(free_ports 3)"
  [ "${#ports[@]}" = 3 ] || { echo "cluster.sh: no 3 free TCP ports below the ephemeral range" >&2; return 1; }
  mkdir -p "$etc"
  for i in 0 1; do
    grep -q " ${nodes[$i]}\$" /etc/hosts || echo "${addrs[$i]} ${nodes[$i]}" >> /etc/hosts
  done
  for g in 0 1 2 3; do : > "$dir/gres/gpu$g"; done
  cat > "$etc/slurm.conf" <<EOF
ClusterName=longctx
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=${ports[0]}
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
# a requeued job may start again only cred_expire seconds after its requeue (120 by default): 10 here, so
# the requeue tests do not idle for two minutes at each pre-emption
AuthInfo=cred_expire=10
StateSaveLocation=$dir/ctld
SlurmdSpoolDir=$dir/spool-%n
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldPidFile=$ctld_pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
PlugStackConfig=$etc/plugstack.conf
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
NodeName=node1 NodeAddr=127.0.0.2 Port=${ports[1]} CPUs=16 RealMemory=4000 Gres=gpu:4 State=UNKNOWN
NodeName=node2 NodeAddr=127.0.0.3 Port=${ports[2]} CPUs=16 RealMemory=4000 Gres=gpu:4 State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
  {
    for n in "${nodes[@]}"; do
      for g in 0 1 2 3; do echo "NodeName=$n Name=gpu File=$dir/gres/gpu$g"; done
    done
  } > "$etc/gres.conf"
  echo "ConstrainCores=no" > "$etc/cgroup.conf"
  : > "$etc/plugstack.conf"      # no SPANK plugins: not the ones a site's /etc/slurm/plugstack.conf loads
}

wait_for() {   # wait_for SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds
  local limit=$1 what=$2; shift 2
  for _ in $(seq $((limit * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "cluster.sh: $what did not come up within ${limit}s (logs: $dir/log)" >&2
  return 1
}

fresh() {   # fresh PIDFILE NAME: before starting NAME, drop its pid file unless it names a live NAME: the
  # daemon SIGTERMs the pid its pid file names, which after a SIGKILL (the lost-node test) may be anyone's now
  running "$1" "$2" >/dev/null || rm -f "$1"
}

start() {
  mkdir -p "$dir"/{ctld,log,gres,munge} /run/munge
  chown slurm:slurm "$dir/ctld" "$dir/log"
  local stale=0
  for f in "$ctld_pid:slurmctld" "$(slurmd_pid node1):slurmd" "$(slurmd_pid node2):slurmd"; do
    if running "${f%:*}" "${f##*:}" >/dev/null && ! current "${f%:*}" "${f##*:}"; then stale=1; fi
  done
  if [ "$stale" = 1 ]; then    # daemons of an older cluster.sh (/etc/slurm, ports 6817-6819): replace them
    echo "cluster.sh: stopping this cluster's daemons started with another config" >&2
    stop
  fi
  # New ports only when none of this cluster's daemons runs: a restart mid-test (the lost-node test brings
  # node2 back) keeps the config the running slurmctld and node1 use.
  if ! running "$ctld_pid" slurmctld >/dev/null && ! running "$(slurmd_pid node1)" slurmd >/dev/null &&
     ! running "$(slurmd_pid node2)" slurmd >/dev/null; then
    write_config
  fi
  # munge: the machine's munged if one answers (a SLURM machine runs one; slurm.conf's auth/munge finds it at its
  # default socket), else one started here, with its pid file under $dir so that `stop` stops it and only it.
  if ! munge -n >/dev/null 2>&1; then
    [ -s /etc/munge/munge.key ] || mungekey --create --force >/dev/null 2>&1 || \
      dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
    chown munge:munge /etc/munge/munge.key /run/munge "$dir/munge"; chmod 400 /etc/munge/munge.key
    fresh "$munged_pid" munged
    runuser -u munge -- /usr/sbin/munged --force --pid-file="$munged_pid"
  fi
  wait_for 10 munge munge -n
  # -f: the config, and the mark in each daemon's command line that `current` reads
  if ! running "$ctld_pid" slurmctld >/dev/null; then fresh "$ctld_pid" slurmctld; /usr/sbin/slurmctld -f "$SLURM_CONF"; fi
  wait_for 30 slurmctld scontrol ping
  for n in "${nodes[@]}"; do
    if ! running "$(slurmd_pid "$n")" slurmd >/dev/null; then
      fresh "$(slurmd_pid "$n")" slurmd
      /usr/sbin/slurmd -f "$SLURM_CONF" -N "$n"
    fi
  done
  for n in "${nodes[@]}"; do
    scontrol update nodename="$n" state=resume >/dev/null 2>&1 || true
  done
  # shellcheck disable=SC2016  # expanded by the inner shell, at each poll
  wait_for 60 "both nodes idle" bash -c '[ "$(sinfo -h -N -o %t | grep -cE "^(idle|mix|alloc)")" = 2 ]'
}

stop_pid() {   # stop_pid PIDFILE NAME: SIGTERM the daemon, wait for it to exit (SIGKILL after 30 s)
  local pid
  pid=$(running "$1" "$2") || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 150); do running "$1" "$2" >/dev/null || return 0; sleep 0.2; done
  echo "cluster.sh: $2 ($pid) still running 30s after SIGTERM: SIGKILL" >&2
  kill -KILL "$pid" 2>/dev/null || true
}

stop() {
  # Jobs first, so that no job step (slurmstepd and its tasks) outlives the slurmd that started it; SLURM
  # SIGTERMs them, and SIGKILLs what is left after KillWait (30 s).
  # (Not with an older cluster.sh's slurmctld: its config is not $SLURM_CONF, and a client without one spends a
  # minute looking for a controller.)
  if current "$ctld_pid" slurmctld && timeout 20 scontrol ping >/dev/null 2>&1; then
    timeout 20 scancel --partition=debug >/dev/null 2>&1 || true
    for _ in $(seq 225); do [ -z "$(timeout 20 squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
  fi
  for n in "${nodes[@]}"; do stop_pid "$(slurmd_pid "$n")" slurmd; done
  stop_pid "$ctld_pid" slurmctld
  stop_pid "$munged_pid" munged
}

case "${1:-}" in
  start) start; echo "SLURM cluster up: $(sinfo -h -N -o '%N:%t' | tr '\n' ' ')"; echo "export SLURM_CONF=$SLURM_CONF" ;;
  stop) stop ;;
  status) sinfo -N ;;
  *) sed -n '2,17p' "$0"; exit 2 ;;
esac
