#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the tests in tests/test_slurm.py.
#
#   sudo slurm/testing/start_cluster.sh     # root: installs packages, writes /etc/slurm, starts daemons
#   slurm/testing/stop_cluster.sh           # stops the daemons (packages and config stay)
#
# Idempotent: run it again and it only does what is missing. It installs Debian's slurmctld, slurmd,
# slurm-client, munge and shellcheck if absent (apt-get), writes /etc/slurm/slurm.conf and cgroup.conf
# for one CPU-only node named after `hostname -s` (CPUs=2 by default, RealMemory from /proc/meminfo)
# with slurmctld and slurmd on loopback, starts munged, slurmctld and slurmd, and waits until `sinfo`
# shows the node idle. No cgroups (sandboxes and containers often have none): proctrack/linuxproc,
# task/none. Jobs run as the submitting user; daemons run as root.
#
# It refuses to overwrite a slurm.conf it did not write (a real cluster's), unless FORCE=1.
# Time (Debian 12, 2 cores): about 20 s for apt-get the first time; starting the daemons until the
# node is idle about 1 s; a second run with everything up about 0.1 s.
# A requeued job may start again after AuthInfo=cred_expire seconds: 10 here (SLURM's default 120).
#
# Settings (environment): NODE_CPUS (2), STATE_DIR (/var/spool/slurm-test), FORCE (0).
set -euo pipefail

NODE_CPUS=${NODE_CPUS:-2}
STATE_DIR=${STATE_DIR:-/var/spool/slurm-test}
FORCE=${FORCE:-0}
CONF_DIR=/etc/slurm
MARKER="# written by conan-embedding slurm/testing/start_cluster.sh"

log() { echo "start_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $(id -u) == 0 ]] || die "run as root (it installs packages and starts daemons)"

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    command -v shellcheck >/dev/null || missing+=(shellcheck)
    ((${#missing[@]})) || return 0
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

node_name() {
    local name
    name=$(hostname -s 2>/dev/null || true)
    # The node name must resolve (slurmd looks itself up); fall back to localhost when it does not.
    if [[ -n $name ]] && getent hosts "$name" >/dev/null; then echo "$name"; else echo localhost; fi
}

write_config() {
    local node=$1 memory_mb conf=$CONF_DIR/slurm.conf new
    memory_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)  # leave the OS 10 %
    mkdir -p "$CONF_DIR" "$STATE_DIR/ctld" "$STATE_DIR/d" /var/log/slurm
    if [[ -f $conf ]] && ! grep -qF "$MARKER" "$conf" && [[ $FORCE != 1 ]]; then
        die "$conf exists and was not written by this script; FORCE=1 replaces it"
    fi
    new=$(cat <<EOF
$MARKER
ClusterName=conan-test
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire seconds (default 120) before it may start again.
AuthInfo=cred_expire=10
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/d
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
# No cgroups here: track processes through /proc, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
ReturnToService=2
JobRequeue=1
# Short timers so tests do not wait: a killed step gets SIGKILL 10 s after SIGTERM.
KillWait=10
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=$node NodeAddr=127.0.0.1 CPUs=$NODE_CPUS RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)
    if [[ ! -f $conf ]] || [[ $(cat "$conf") != "$new" ]]; then
        printf '%s\n' "$new" >"$conf"
        RESTART=1
    fi
    # Read only by cgroup plugins, none of which is configured; written so that nothing looks for one.
    printf '%s\nCgroupAutomount=no\nConstrainCores=no\nConstrainRAMSpace=no\n' "$MARKER" >"$CONF_DIR/cgroup.conf"
}

start_munge() {
    if munge -n </dev/null >/dev/null 2>&1; then return 0; fi
    [[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key 2>/dev/null || true
    chmod 0400 /etc/munge/munge.key
    mkdir -p /run/munge
    chown munge:munge /run/munge 2>/dev/null || true
    # --force: munged refuses some sandboxes' directory permissions otherwise.
    if id munge >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged --force
    else
        /usr/sbin/munged --force
    fi
    for _ in $(seq 50); do munge -n </dev/null >/dev/null 2>&1 && return 0; sleep 0.1; done
    die "munged did not start"
}

running() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_daemons() {
    if [[ ${RESTART:-0} == 1 ]]; then
        "$(dirname "$0")/stop_cluster.sh" --daemons-only
    fi
    running "$STATE_DIR/slurmctld.pid" || slurmctld
    running "$STATE_DIR/slurmd.pid" || slurmd
}

wait_idle() {
    local node=$1 state
    for _ in $(seq 120); do
        state=$(sinfo -h -n "$node" -o %T 2>/dev/null || true)
        case $state in
            idle|mixed|allocated) log "node $node is $state"; return 0 ;;
            down*|drain*) scontrol update NodeName="$node" State=RESUME 2>/dev/null || true ;;
        esac
        sleep 0.5
    done
    die "node $node not idle after 60 s (state '${state:-?}'); see /var/log/slurm/*.log"
}

install_packages
NODE=$(node_name)
write_config "$NODE"
start_munge
start_daemons
wait_idle "$NODE"
