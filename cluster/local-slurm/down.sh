#!/usr/bin/env bash
# Stop the single-node SLURM that up.sh started: cancel its jobs first (workers
# of a crashed run would otherwise wait out their death timeout), then stop
# only the daemons whose pid files up.sh left. Packages stay installed.
set -uo pipefail

STATE=${DSUB_SLURM_DIR:-/tmp/dsub-slurm}
command -v scancel >/dev/null && scancel --partition=debug 2>/dev/null || true

stop() {
  local pidfile=$1
  [ -f "$pidfile" ] || return 0
  local pid
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  fi
  rm -f "$pidfile"
}
stop "$STATE/run/slurmd.pid"
stop "$STATE/run/slurmctld.pid"
stop "$STATE/run/munged.pid"
echo "SLURM stopped (state kept in $STATE)"
