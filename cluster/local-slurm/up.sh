#!/usr/bin/env bash
# Start a real single-node SLURM on 127.0.0.1 from Debian's packages, with two
# fake GPUs (gres backed by /dev/null), for dsub's tests and CI. Idempotent:
# running it again on a running cluster changes nothing. Needs root.
#
# Also installs slurm-wlm-torque (Slurm's PBS-compatible qsub/qstat/qdel), so
# dask-jobqueue's PBSCluster can run against the same cluster.
#
# State, logs and pid files go to $DSUB_SLURM_DIR (default /tmp/dsub-slurm);
# down.sh stops exactly the daemons this script started.
set -euo pipefail

STATE=${DSUB_SLURM_DIR:-/tmp/dsub-slurm}
CONF_DIR=/etc/slurm
MARK="# written by dsub cluster/local-slurm/up.sh"
PACKAGES=(slurmctld slurmd slurm-client munge slurm-wlm-torque)

if [ "$(id -u)" != 0 ]; then
  echo "local-slurm/up.sh: must run as root (it installs packages and starts daemons)" >&2
  exit 1
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "Installing ${missing[*]} ..."
  # Keep the packages' own scripts from starting daemons (no systemd here).
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || true
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

mkdir -p "$STATE"/{spool/ctld,spool/d,log,run,gpu}
NODE=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
for i in 0 1; do ln -sfn /dev/null "$STATE/gpu/gpu$i"; done

if [ -f "$CONF_DIR/slurm.conf" ] && ! grep -qF "$MARK" "$CONF_DIR/slurm.conf"; then
  echo "local-slurm/up.sh: $CONF_DIR/slurm.conf exists and was not written by dsub; leaving it alone" >&2
  exit 1
fi
mkdir -p "$CONF_DIR"
cat > "$CONF_DIR/slurm.conf" <<CONF
$MARK
ClusterName=dsub-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
ReturnToService=2
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,bf_interval=1
MpiDefault=none
SlurmdParameters=config_overrides
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
cat > "$CONF_DIR/gres.conf" <<CONF
$MARK
AutoDetect=off
NodeName=$NODE Name=gpu File=$STATE/gpu/gpu[0-1]
CONF

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# munge: start it unless one runs already (then it is not ours to stop).
if ! pgrep -x munged >/dev/null; then
  [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge && chown munge:munge /run/munge
  runuser -u munge -- munged
  pgrep -x munged > "$STATE/run/munged.pid"
fi

running "$STATE/run/slurmctld.pid" || slurmctld -c
running "$STATE/run/slurmd.pid" || slurmd

for _ in $(seq 1 60); do
  state=$(sinfo -h -n "$NODE" -o %t 2>/dev/null || true)
  case "$state" in
    idle*|mix*|alloc*) break ;;
    drain*|down*) scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;
  esac
  sleep 0.5
done
state=$(sinfo -h -n "$NODE" -o %t 2>/dev/null || true)
case "$state" in
  idle*|mix*|alloc*) echo "SLURM is up: node $NODE ($state), partition debug, 2 fake GPUs; state in $STATE" ;;
  *) echo "local-slurm/up.sh: node $NODE is '$state' after 30 s; see $STATE/log/" >&2; exit 1 ;;
esac
