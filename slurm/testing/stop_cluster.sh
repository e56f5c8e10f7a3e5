#!/usr/bin/env bash
# Stops what slurm/testing/start_cluster.sh started: slurmd, slurmctld and (unless --daemons-only)
# munged. Packages, /etc/slurm and the state directory stay, so the next start is quick.
set -euo pipefail

STATE_DIR=${STATE_DIR:-/var/spool/slurm-test}

stop_pidfile() {
    local pidfile=$1 pid
    [[ -f $pidfile ]] || return 0
    pid=$(cat "$pidfile")
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$pidfile"
}

stop_pidfile "$STATE_DIR/slurmd.pid"
stop_pidfile "$STATE_DIR/slurmctld.pid"
if [[ ${1:-} != --daemons-only ]]; then
    stop_pidfile /run/munge/munged.pid
fi
