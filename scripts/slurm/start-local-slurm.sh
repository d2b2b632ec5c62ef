#!/usr/bin/env bash
# start-local-slurm.sh [DIR]
#
# ckpt's test cluster (used by tests/slurm.rs and .ci/run; derived from the
# measured notes in docs/slurm.md). Brings up a private single-node Slurm
# cluster (munged + slurmctld + slurmd, Debian packages slurm-wlm/munge,
# Slurm 22.05 on bookworm) without systemd.
# Everything (config, munge key/socket, state, spool, logs, pid files) lives
# under DIR (default: $SLURM_LOCAL_DIR or /tmp/ckpt-slurm).
# Concurrent calls (parallel tests) are serialised with flock on DIR.lock.
#
# Idempotent: if the daemons recorded in DIR are alive and the node answers,
# it only re-checks and exits 0. A fresh start wipes DIR/state and DIR/spool
# (job ids restart at 1) unless SLURM_LOCAL_KEEP_STATE=1.
#
# Must run as root (slurmd has to run as root to launch jobs).
#
# Knobs (environment):
#   SLURM_LOCAL_DIR           default /tmp/ckpt-slurm (overridden by $1)
#   SLURM_LOCAL_CPUS          CPUs advertised for the node (default: nproc,
#                             at least 8 so that parallel test jobs all run).
#                             More than nproc is allowed (config_overrides).
#   SLURM_LOCAL_KILLWAIT      seconds between SIGTERM and SIGKILL at time
#                             limit / scancel / requeue (default 30)
#   SLURM_LOCAL_MINJOBAGE     seconds a finished job stays in scontrol (60)
#   SLURM_LOCAL_CRED_EXPIRE   AuthInfo cred_expire; a requeued job is held
#                             for cred_expire+1 s (BeginTime) before it may
#                             run again. Slurm default 120; here 10 (min 5).
#   SLURM_LOCAL_CTLD_PORT     default 6817
#   SLURM_LOCAL_SLURMD_PORT   default 6818
#   SLURM_LOCAL_TIMEOUT       seconds to wait for the node to be idle (90)
#   SLURM_LOCAL_NO_INSTALL=1  never run apt-get
#   SLURM_LOCAL_LINK_ETC=1    also symlink /etc/slurm/slurm.conf -> DIR conf
#                             (only if absent or already a symlink)
#   SLURM_LOCAL_KEEP_STATE=1  keep jobs/state from a previous run
#
# After it succeeds:   source DIR/env.sh   (exports SLURM_CONF)
# To stop:             stop-local-slurm.sh DIR
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"     # munged, slurmctld, slurmd live in /usr/sbin

DIR=${1:-${SLURM_LOCAL_DIR:-/tmp/ckpt-slurm}}
CPUS_WANT=${SLURM_LOCAL_CPUS:-}
KILLWAIT=${SLURM_LOCAL_KILLWAIT:-30}
MINJOBAGE=${SLURM_LOCAL_MINJOBAGE:-60}
CRED_EXPIRE=${SLURM_LOCAL_CRED_EXPIRE:-10}
CTLD_PORT=${SLURM_LOCAL_CTLD_PORT:-6817}
SLURMD_PORT=${SLURM_LOCAL_SLURMD_PORT:-6818}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-90}

now_ms() { local t=$EPOCHREALTIME; t=${t/[.,]/}; echo $(( t / 1000 )); }
T0=$(now_ms)
since() { local d=$(( $(now_ms) - T0 )); printf '%d.%03d' $((d / 1000)) $((d % 1000)); }
log() { echo "[start-local-slurm +$(since)s] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"
case "$DIR" in /*) ;; *) DIR="$(pwd)/$DIR" ;; esac
# one start at a time (tests start the cluster from several processes at once)
exec 9>"$DIR.lock"
flock -w 900 9 || die "could not lock $DIR.lock within 900s"
# (the daemons below are started with 9>&-: a daemon that inherited the lock would hold it
# for its whole life and every later call would wait here)

# ---------------------------------------------------------------- install
need_install=0
for b in munged munge unmunge slurmctld slurmd slurmstepd sbatch srun squeue sinfo scontrol scancel; do
    command -v "$b" >/dev/null 2>&1 || need_install=1
done
if [ "$need_install" = 1 ]; then
    [ "${SLURM_LOCAL_NO_INSTALL:-0}" = 1 ] && die "slurm/munge binaries missing and SLURM_LOCAL_NO_INSTALL=1"
    log "installing slurm-wlm + munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt_install() {
        apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends \
            slurm-wlm munge >"$1" 2>&1
    }
    mkdir -p "$DIR"
    # keep the packages' postinst from starting system-wide munge/slurm
    # daemons via /etc/init.d (Docker images usually have this file already)
    MADE_POLICY=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        MADE_POLICY=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT   # also on failure
    fi
    if ! apt_install "$DIR/apt-install.log"; then
        log "apt-get install failed; running apt-get update and retrying"
        apt-get -o DPkg::Lock::Timeout=600 update >"$DIR/apt-update.log" 2>&1 || true
        apt_install "$DIR/apt-install.log" || { tail -20 "$DIR/apt-install.log" >&2; die "apt-get install failed"; }
    fi
    if [ "$MADE_POLICY" = 1 ]; then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
    log "install done"
fi

NODE=$(hostname -s)
[ -n "$NODE" ] || die "empty hostname"
CONF=$DIR/etc/slurm.conf
RUN=$DIR/run
export SLURM_CONF=$CONF

# pid_ok NAME PIDFILE: pid file exists, process alive, comm matches, and its
# command line mentions DIR (so we never touch somebody else's daemon)
pid_ok() {
    local name=$1 pf=$2 pid
    [ -s "$pf" ] || return 1
    pid=$(tr -dc 0-9 <"$pf")
    [ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
    [ "$(cat /proc/$pid/comm 2>/dev/null)" = "$name" ] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$DIR/" || return 1
    echo "$pid"
}

node_state() { sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n1; }

wait_idle() {
    local deadline=$(( $(date +%s) + TIMEOUT )) st="" resumed=0
    while :; do
        st=$(node_state || true)
        case "$st" in
            idle|mixed|allocated|completing) return 0 ;;
            down*|drain*|fail*)
                if [ $resumed = 0 ]; then
                    log "node state '$st' -> scontrol update state=resume"
                    scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
                    resumed=1
                fi ;;
        esac
        [ "$(date +%s)" -lt "$deadline" ] || { log "node state: '${st:-<no answer>}'"; return 1; }
        sleep 0.5
    done
}

# ---------------------------------------------------- already running?
if [ -f "$CONF" ] &&
   pid_ok munged "$RUN/munged.pid" >/dev/null &&
   pid_ok slurmctld "$RUN/slurmctld.pid" >/dev/null &&
   pid_ok slurmd "$RUN/slurmd.pid" >/dev/null; then
    log "cluster in $DIR already running; checking node"
    wait_idle || die "daemons alive but node $NODE not usable; see $DIR/log"
    log "node $NODE is $(node_state)"
    echo "export SLURM_CONF=$CONF"
    exit 0
fi

# Something is half up (or stale pid files): stop what is ours, then start.
if [ -d "$RUN" ]; then
    for d in slurmd slurmctld munged; do
        if p=$(pid_ok "$d" "$RUN/$d.pid"); then
            log "stopping leftover $d (pid $p)"
            kill -TERM "$p" 2>/dev/null || true
            for _ in $(seq 1 50); do [ -d "/proc/$p" ] || break; sleep 0.2; done
            [ -d "/proc/$p" ] && kill -KILL "$p" 2>/dev/null || true
        fi
        rm -f "$RUN/$d.pid"
    done
fi

# ------------------------------------------------------------ layout
mkdir -p "$DIR/etc" "$DIR/munge" "$DIR/log" "$RUN"
if [ "${SLURM_LOCAL_KEEP_STATE:-0}" != 1 ]; then
    rm -rf "$DIR/state" "$DIR/spool"
    # job ids restart at 1: keep the previous run's logs apart
    mkdir -p "$DIR/log/prev"
    for f in "$DIR"/log/*.log "$DIR"/log/jobcomp.txt; do
        [ -f "$f" ] && mv -f "$f" "$DIR/log/prev/"
    done
fi
mkdir -p "$DIR/state" "$DIR/spool/slurmd-$NODE"
chmod 755 "$DIR" "$DIR/munge"       # munged: socket dir must be a+x
# munged also refuses a socket below any directory that others cannot enter
# (mktemp -d makes 0700 directories): name the first one, with the fix
p=$DIR
while [ "$p" != / ]; do
    p=$(dirname "$p")
    [ "$(( 0$(stat -c %a "$p") & 01 ))" = 1 ] ||
        die "munged needs execute permission for all on every parent of $DIR; $p is $(stat -c %a "$p") (fix: chmod o+x $p, or use another DIR)"
done
chmod 700 "$DIR/state"

# ------------------------------------------------------------- munge
KEY=$DIR/munge/munge.key
SOCK=$DIR/munge/munge.socket
if [ ! -s "$KEY" ]; then
    dd if=/dev/urandom of="$KEY" bs=1024 count=1 status=none
fi
chown root:root "$KEY"; chmod 400 "$KEY"
rm -f "$SOCK" "$SOCK.lock"
munged --socket="$SOCK" --key-file="$KEY" --pid-file="$RUN/munged.pid" \
       --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" 9>&- \
    || die "munged failed to start: $(tail -n 3 "$DIR/log/munged.log" 2>/dev/null)"
for _ in $(seq 1 50); do pid_ok munged "$RUN/munged.pid" >/dev/null && [ -S "$SOCK" ] && break; sleep 0.1; done
munge -S "$SOCK" -n </dev/null | unmunge -S "$SOCK" >/dev/null \
    || die "munge self-test failed; see $DIR/log/munged.log"
log "munged up (pid $(cat "$RUN/munged.pid"))"

# ------------------------------------------------------------ config
CPUS=${CPUS_WANT:-$(( $(nproc) < 8 ? 8 : $(nproc) ))}
MEM=$(awk '/^MemTotal:/{print int($2/1024*0.9)}' /proc/meminfo)
HW=$(slurmd -C 2>/dev/null | head -n1 || true)       # what slurmd will detect
HWCPUS=$(echo "$HW" | grep -oE ' CPUs=[0-9]+' | cut -d= -f2 || true)
TOPO=$(echo "$HW" | grep -oE '(Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=[0-9]+' | tr '\n' ' ' || true)
if [ -n "$HWCPUS" ] && [ "$CPUS" -eq "$HWCPUS" ] && [ -n "$TOPO" ]; then
    # exactly the real topology: slurmd has nothing to complain about
    NODEDEF="CPUs=$CPUS $TOPO"
    OVERRIDES=""
else
    # more (or fewer, e.g. nproc < hardware in a container) CPUs than
    # slurmd detects: accept the configured count instead of draining
    NODEDEF="CPUs=$CPUS"
    OVERRIDES="SlurmdParameters=config_overrides"
fi

cat >"$CONF.new" <<EOF
# generated by start-local-slurm.sh -- private single-node test cluster
ClusterName=localci
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCK,cred_expire=$CRED_EXPIRE
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd-%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$DIR/etc/plugstack.conf
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=$MINJOBAGE
KillWait=$KILLWAIT
OverTimeLimit=0
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=60
$OVERRIDES
NodeName=$NODE NodeAddr=127.0.0.1 $NODEDEF RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
mv "$CONF.new" "$CONF"
: >"$DIR/etc/plugstack.conf"
cat >"$DIR/env.sh" <<EOF
export SLURM_CONF=$CONF
EOF

if [ "${SLURM_LOCAL_LINK_ETC:-0}" = 1 ]; then
    mkdir -p /etc/slurm
    if [ ! -e /etc/slurm/slurm.conf ] || [ -L /etc/slurm/slurm.conf ]; then
        ln -sfn "$CONF" /etc/slurm/slurm.conf
        log "linked /etc/slurm/slurm.conf -> $CONF"
    else
        log "NOT linking: /etc/slurm/slurm.conf is a regular file"
    fi
fi

# ------------------------------------------------------------ daemons
# Both daemons fork, detach (close stdio) and write their pid files.
slurmctld -f "$CONF" 9>&- || die "slurmctld failed: $(tail -n 5 "$DIR/log/slurmctld.log" 2>/dev/null)"
deadline=$(( $(date +%s) + TIMEOUT ))
until scontrol ping 2>/dev/null | grep -q 'UP'; do
    pid_ok slurmctld "$RUN/slurmctld.pid" >/dev/null || [ ! -s "$RUN/slurmctld.pid" ] ||
        die "slurmctld exited: $(tail -n 5 "$DIR/log/slurmctld.log")"
    [ "$(date +%s)" -lt "$deadline" ] || die "slurmctld did not answer; see $DIR/log/slurmctld.log"
    sleep 0.2
done
log "slurmctld up (pid $(pid_ok slurmctld "$RUN/slurmctld.pid"))"

slurmd -f "$CONF" -N "$NODE" 9>&- || die "slurmd failed: $(tail -n 5 "$DIR/log/slurmd.log" 2>/dev/null)"
for _ in $(seq 1 50); do pid_ok slurmd "$RUN/slurmd.pid" >/dev/null && break; sleep 0.1; done
pid_ok slurmd "$RUN/slurmd.pid" >/dev/null || die "slurmd not running: $(tail -n 5 "$DIR/log/slurmd.log")"
log "slurmd up (pid $(pid_ok slurmd "$RUN/slurmd.pid"))"

wait_idle || die "node $NODE did not become idle within ${TIMEOUT}s; see $DIR/log"
log "node $NODE is $(node_state); cluster ready in $(since)s"

cat >&2 <<EOF
Use it:   source $DIR/env.sh      (or: export SLURM_CONF=$CONF)
          sinfo; sbatch ...; squeue; scontrol show job ID
Finished-job records: $DIR/log/jobcomp.txt   (no sacct: accounting disabled)
Logs:     $DIR/log/{slurmctld,slurmd,munged}.log
Stop:     $(dirname "$(readlink -f "$0")")/stop-local-slurm.sh $DIR
EOF
echo "export SLURM_CONF=$CONF"
