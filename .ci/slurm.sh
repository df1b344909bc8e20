#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for tests/test_slurm.py and CI.
#
#   .ci/slurm.sh up      install slurm-wlm + munge if missing, write the configuration, start
#                        munged, slurmctld and slurmd, wait until the node is idle
#                        (nothing to do when the cluster already answers)
#   .ci/slurm.sh down    cancel every job and stop the three daemons (by their pid files)
#   .ci/slurm.sh status  sinfo and squeue
#
# Needs root. A slurm.conf that this script did not write is never touched. Built for a bare Debian machine without systemd or cgroups: the daemons are
# started directly, processes are tracked through /proc (proctrack/linuxproc, task/none),
# there is no accounting database (accounting_storage/none: use `squeue` as the executor's
# status command), and the node announces one fake GPU (gres.conf File=/dev/null) so that
# GPU requests (`--gpus=1`) can be submitted and scheduled. The node is named after
# `hostname` with the CPUs and memory that `slurmd -C` finds; its partition is `local`.
set -euo pipefail

CONF_DIR=/etc/slurm
STATE_DIR=/var/spool/slurmctld
SPOOL_DIR=/var/spool/slurmd
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm
MUNGE_RUN=/run/munge
PARTITION=local
WAIT_S=${SLURM_UP_TIMEOUT:-60}

log() { echo "slurm.sh: $*" >&2; }

node_state() {
    # state of this machine's node ("idle", "mixed", ...), empty when the controller does not answer
    timeout 10 sinfo -h -N -n "$(hostname)" -o %t 2>/dev/null | head -n1 | tr -d '*~#' || true
}

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null; then
        return
    fi
    log "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_config() {
    local host node_line
    host=$(hostname)
    # "NodeName=<host> CPUs=.. Boards=.. SocketsPerBoard=.. CoresPerSocket=.. ThreadsPerCore=.. RealMemory=.."
    node_line=$(slurmd -C | head -n1)
    mkdir -p "$CONF_DIR" "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR" "$RUN_DIR"
    cat > "$CONF_DIR/slurm.conf" <<EOF
# Written by .ci/slurm.sh: one node, no accounting, no cgroups.
ClusterName=fdpipe
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
$node_line Gres=gpu:1 State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    cat > "$CONF_DIR/gres.conf" <<EOF
# One fake GPU: lets jobs request --gpus=1 on a machine without one.
NodeName=$host Name=gpu File=/dev/null
EOF
}

start_munge() {
    if timeout 5 munge -n </dev/null 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1; then
        return
    fi
    mkdir -p "$MUNGE_RUN" /var/log/munge /var/lib/munge
    chown munge:munge "$MUNGE_RUN" /var/log/munge /var/lib/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 700 /etc/munge
    chmod 400 /etc/munge/munge.key
    runuser -u munge -- munged
}

alive() {   # alive <pid file>
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

up() {
    local state="" t0=$SECONDS
    # without a controller of ours running, ask sinfo only when a configuration not written
    # here may describe another cluster (an unreachable controller makes sinfo wait)
    if alive "$RUN_DIR/slurmctld.pid" || { [ -e "$CONF_DIR/slurm.conf" ] \
            && ! grep -q "^# Written by .ci/slurm.sh" "$CONF_DIR/slurm.conf"; }; then
        state=$(node_state)
    fi
    case "$state" in
        idle|mix|mixed|alloc|allocated)
            log "cluster already up (node $(hostname): $state)"
            return ;;
    esac
    if [ -e "$CONF_DIR/slurm.conf" ] && ! grep -q "^# Written by .ci/slurm.sh" "$CONF_DIR/slurm.conf"; then
        # a real cluster's configuration: never overwritten
        if timeout 10 sinfo -h >/dev/null 2>&1; then
            log "$CONF_DIR/slurm.conf was not written by this script and its cluster answers: using it"
            return
        fi
        log "$CONF_DIR/slurm.conf was not written by this script: not overwriting it"
        exit 1
    fi
    install
    write_config
    start_munge
    alive "$RUN_DIR/slurmctld.pid" || slurmctld
    alive "$RUN_DIR/slurmd.pid" || slurmd
    for _ in $(seq "$((WAIT_S * 2))"); do
        state=$(node_state)
        case "$state" in
            idle|mix|mixed|alloc|allocated)
                log "cluster up in $((SECONDS - t0)) s: node $(hostname) $state, partition $PARTITION"
                return ;;
            down|drain|drained|fail)
                # a node left down by an earlier run of the daemons
                scontrol update nodename="$(hostname)" state=resume 2>/dev/null || true ;;
        esac
        sleep 0.5
    done
    log "the node did not become idle within ${WAIT_S} s (state: '${state:-no answer}'); logs in $LOG_DIR"
    tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
    exit 1
}

stop_pid() {   # stop_pid <pid file>
    if alive "$1"; then
        local pid
        pid=$(cat "$1")
        kill "$pid"
        for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
        kill -9 "$pid" 2>/dev/null || true
    fi
}

down() {
    if [ -n "$(node_state)" ]; then
        scancel --full --user="$(id -un)" 2>/dev/null || true
    fi
    stop_pid "$RUN_DIR/slurmd.pid"
    stop_pid "$RUN_DIR/slurmctld.pid"
    stop_pid "$MUNGE_RUN/munged.pid"
    log "cluster down"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) sinfo; squeue ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
