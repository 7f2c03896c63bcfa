#!/usr/bin/env bash
# A one-node Slurm on this machine, for the cluster tests and for trying the
# slurm executor: `scripts/slurm-local.sh up` installs Debian's slurm-wlm and
# munge if they are missing, writes a slurm.conf for this host (its cores and
# memory; no cgroups, no accounting database), starts munged, slurmctld and
# slurmd, and waits until `sinfo` shows the node idle. `down` stops them.
# Idempotent: `up` on a running cluster only checks it. Needs root.
set -euo pipefail
cmd=${1:-up}
conf_dir=/etc/slurm
host=$(hostname -s)

down() {
  pkill -x slurmd 2>/dev/null || true
  pkill -x slurmctld 2>/dev/null || true
  pkill -x munged 2>/dev/null || true
  echo "slurm-local: stopped"
}

idle() { sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; }

up() {
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    echo "slurm-local: installing slurm-wlm and munge"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
  fi
  if pgrep -x slurmctld >/dev/null && pgrep -x slurmd >/dev/null && idle; then
    echo "slurm-local: already up ($(sinfo -h -o '%P %D %T' | head -1))"
    return
  fi
  down >/dev/null
  mkdir -p /etc/munge /var/log/munge /run/munge /var/lib/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown -R munge:munge /etc/munge /var/log/munge /run/munge /var/lib/munge
  chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key
  runuser -u munge -- /usr/sbin/munged

  local cpus mem
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))
  mkdir -p "$conf_dir" /var/spool/slurmd /var/spool/slurmctld /var/log/slurm
  cat > "$conf_dir/slurm.conf" <<CONF
ClusterName=r1pipe-local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# A job that does not say how much memory it needs gets 1 GB a core, not the whole node.
DefMemPerCPU=1024
SchedulerType=sched/backfill
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
KillWait=30
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  /usr/sbin/slurmctld
  /usr/sbin/slurmd
  for _ in $(seq 1 60); do
    if idle; then
      echo "slurm-local: up ($(sinfo -h -o '%P %D %T' | head -1), $cpus cpus, $mem MB)"
      return
    fi
    scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
    sleep 1
  done
  echo "slurm-local: the node did not come up; the logs:" >&2
  tail -20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
  exit 1
}

case "$cmd" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
