#!/usr/bin/env bash
# stop-local-slurm.sh [DIR]
# Stops the cluster that start-local-slurm.sh started in DIR
# (default: $SLURM_LOCAL_DIR or /tmp/ckpt-slurm):
#   1. cancels every job of that cluster through Slurm itself and waits
#      (bounded) for them to go away, so no job processes are left behind;
#   2. stops slurmd, slurmctld and munged by the PIDs recorded in DIR/run,
#      after checking each PID's name and that its command line mentions DIR.
# Never kills anything by name. Safe to run twice. Keeps DIR (logs) unless
# SLURM_LOCAL_WIPE=1.
set -uo pipefail

DIR=${1:-${SLURM_LOCAL_DIR:-/tmp/ckpt-slurm}}
case "$DIR" in /*) ;; *) DIR="$(pwd)/$DIR" ;; esac
RUN=$DIR/run
CONF=$DIR/etc/slurm.conf
export SLURM_CONF=$CONF
log() { echo "[stop-local-slurm] $*" >&2; }

pid_ok() {
    local name=$1 pf=$2 pid
    [ -s "$pf" ] || return 1
    pid=$(tr -dc 0-9 <"$pf")
    [ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
    [ "$(cat /proc/$pid/comm 2>/dev/null)" = "$name" ] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$DIR/" || return 1
    echo "$pid"
}

[ -d "$RUN" ] || { log "nothing to stop in $DIR"; exit 0; }

# 1. cancel this cluster's jobs (only if its controller is ours and alive)
if pid_ok slurmctld "$RUN/slurmctld.pid" >/dev/null && [ -f "$CONF" ]; then
    jobs=$(squeue -h -o '%A' 2>/dev/null | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
        log "cancelling jobs: $jobs"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
        kw=$(scontrol show config 2>/dev/null | awk -F= '/^KillWait/{gsub(/[^0-9]/,"",$2); print $2}')
        deadline=$(( $(date +%s) + ${kw:-30} + 15 ))
        while [ -n "$(squeue -h -o '%A' 2>/dev/null)" ] && [ "$(date +%s)" -lt "$deadline" ]; do
            sleep 0.5
        done
        left=$(squeue -h -o '%A' 2>/dev/null | tr '\n' ' ')
        if [ -n "${left// /}" ]; then
            log "jobs still present ($left); sending SIGKILL to them via scancel"
            # shellcheck disable=SC2086
            scancel --full -s KILL $left 2>/dev/null || true
            sleep 2
        fi
    fi
fi

# 2. daemons, in reverse start order
rc=0
for d in slurmd slurmctld munged; do
    pf=$RUN/$d.pid
    if p=$(pid_ok "$d" "$pf"); then
        kill -TERM "$p" 2>/dev/null || true
        for _ in $(seq 1 100); do [ -d "/proc/$p" ] || break; sleep 0.1; done
        if [ -d "/proc/$p" ]; then
            log "$d (pid $p) ignored SIGTERM for 10s; SIGKILL"
            kill -KILL "$p" 2>/dev/null || true
            sleep 0.5
        fi
        if [ -d "/proc/$p" ]; then log "$d (pid $p) still alive!"; rc=1; else log "stopped $d (pid $p)"; fi
    elif [ -s "$pf" ]; then
        log "$d: pid $(cat "$pf") not running (or not ours); skipping"
    fi
    rm -f "$pf"
done

# undo the optional /etc symlink made with SLURM_LOCAL_LINK_ETC=1
if [ -L /etc/slurm/slurm.conf ] && [ "$(readlink /etc/slurm/slurm.conf)" = "$CONF" ]; then
    rm -f /etc/slurm/slurm.conf
    log "removed /etc/slurm/slurm.conf symlink"
fi

if [ "${SLURM_LOCAL_WIPE:-0}" = 1 ]; then
    case "$DIR" in
        /|/tmp|/root|/home|/usr|/etc|/var) log "refusing to wipe $DIR" ;;
        *) [ -f "$DIR/etc/slurm.conf" ] && rm -rf "$DIR" && log "removed $DIR" ;;
    esac
fi
exit $rc
