#!/usr/bin/env bash
# Start and stop a real one-node slurm cluster on this machine, for tests and CI.
#
#   tests/slurm/cluster.sh install   apt-get install munge slurmctld slurmd slurm-client (root)
#   tests/slurm/cluster.sh start     write a private config, start munged/slurmctld/slurmd (root)
#   tests/slurm/cluster.sh stop      cancel jobs, stop the daemons this script started
#   tests/slurm/cluster.sh status    "up" (exit 0) or "down" (exit 3)
#   tests/slurm/cluster.sh env       print the export lines (eval "$(tests/slurm/cluster.sh env)")
#
# Everything lives in a state directory, default /tmp/tcia-slurm, override with TCIA_SLURM_DIR:
#   slurm.conf  env.sh  log/  run/*.pid  state/  spool/  lock
# /etc/slurm/slurm.conf is never written: the daemons and the client commands all honour
# SLURM_CONF (the daemons are also given -f). Source $TCIA_SLURM_DIR/env.sh to use the cluster.
#
# Known for Debian 12 / slurm 22.05 without systemd or usable cgroups: proctrack/linuxproc and
# task/none; RealMemory at ~90 % of `slurmd -C` (100 % drains the node with "Low RealMemory").
# munge uses the system key (/etc/munge/munge.key, created once) and socket (/run/munge): a munged
# that already answers is reused and never stopped; one this script starts is recorded in
# run/munged.pid and stopped by `stop`. Daemons are only ever stopped by the PIDs in run/*.pid.
#
# Optional environment: TCIA_SLURM_DIR, TCIA_SLURMCTLD_PORT (6817), TCIA_SLURMD_PORT (6818).
set -euo pipefail

PROG=${0##*/}
PACKAGES=(munge slurmctld slurmd slurm-client)
PATH=$PATH:/usr/sbin:/sbin:/usr/bin:/bin

DIR=${TCIA_SLURM_DIR:-/tmp/tcia-slurm}
CTLD_PORT=${TCIA_SLURMCTLD_PORT:-6817}
SLURMD_PORT=${TCIA_SLURMD_PORT:-6818}
CONF=$DIR/slurm.conf
NODE=$(hostname -s)
# How long start waits for each daemon to answer, and stop for each daemon to exit.
START_TIMEOUT=${TCIA_SLURM_START_TIMEOUT:-60}
STOP_TIMEOUT=20

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

need_root() {
    [[ $(id -u) -eq 0 ]] || die "'$1' must run as root (it starts system daemons as root)"
}

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# --- pid files -------------------------------------------------------------------------------

# pid_alive <pidfile> <comm>: the pid in <pidfile> is a live process whose name is <comm>
# (guards against a stale pid file whose pid was reused by an unrelated process).
pid_alive() {
    local pidfile=$1 comm=$2 pid
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ -r /proc/$pid/comm ]] || return 1
    [[ $(<"/proc/$pid/comm") == "$comm" ]]
}

# stop_pidfile <pidfile> <comm>: TERM the pid from <pidfile>, wait for it, KILL if it lingers.
stop_pidfile() {
    local pidfile=$1 comm=$2 pid i
    if ! pid_alive "$pidfile" "$comm"; then
        rm -f "$pidfile"
        return 0
    fi
    pid=$(<"$pidfile")
    log "stopping $comm (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < STOP_TIMEOUT * 10; i++)); do
        pid_alive "$pidfile" "$comm" || { rm -f "$pidfile"; return 0; }
        sleep 0.1
    done
    log "$comm (pid $pid) ignored SIGTERM for ${STOP_TIMEOUT}s: sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        pid_alive "$pidfile" "$comm" || { rm -f "$pidfile"; return 0; }
        sleep 0.1
    done
    die "$comm (pid $pid) survived SIGKILL"
}

# --- install ---------------------------------------------------------------------------------

installed() {
    local p
    for p in "${PACKAGES[@]}"; do
        [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == "install ok installed" ]] || return 1
    done
}

cmd_install() {
    need_root install
    local t0
    t0=$(now)
    if installed; then
        log "already installed: ${PACKAGES[*]}"
        return 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    log "apt-get update"
    apt-get update -qq || die "apt-get update failed"
    log "apt-get install ${PACKAGES[*]}"
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null \
        || die "apt-get install ${PACKAGES[*]} failed"
    installed || die "packages still missing after apt-get install: ${PACKAGES[*]}"
    log "installed in $(elapsed "$t0") s"
}

# --- munge -----------------------------------------------------------------------------------

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_ok; then
        if pid_alive "$DIR/run/munged.pid" munged; then
            log "munged already running (pid $(<"$DIR/run/munged.pid"), started by this script)"
        else
            log "munged already running (not started by this script: it will be left alone)"
        fi
        return 0
    fi
    command -v munged >/dev/null || die "munged not found: run '$0 install'"
    install -d -o munge -g munge -m 0700 /etc/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    install -d -o munge -g munge -m 0755 /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile=/etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0600 /etc/munge/munge.key
    # A stale socket/pid from a munged that died would make munged refuse to start.
    local sysfile=/run/munge/munged.pid
    if [[ -e $sysfile ]] && ! pid_alive "$sysfile" munged; then rm -f "$sysfile"; fi
    runuser -u munge -- munged --pid-file="$sysfile" </dev/null >"$DIR/log/munged.out" 2>&1 9>&- \
        || { cat "$DIR/log/munged.out" >&2; die "munged failed to start (see /var/log/munge/munged.log)"; }
    local i
    for ((i = 0; i < START_TIMEOUT * 10; i++)); do
        if munge_ok && pid_alive "$sysfile" munged; then
            cp "$sysfile" "$DIR/run/munged.pid"
            log "munged started (pid $(<"$DIR/run/munged.pid"))"
            return 0
        fi
        sleep 0.1
    done
    die "munged does not answer after ${START_TIMEOUT}s (see /var/log/munge/munged.log)"
}

# --- config ----------------------------------------------------------------------------------

node_line() {
    # slurmd -C: "NodeName=vm CPUs=2 Boards=1 ... RealMemory=24032" (+ an UpTime line).
    local line mem
    line=$(slurmd -C 2>/dev/null | grep -m1 '^NodeName=') \
        || die "'slurmd -C' printed no NodeName line"
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$line")
    [[ -n $mem ]] || die "no RealMemory in 'slurmd -C' output: $line"
    line=$(sed -e "s/^NodeName=[^ ]*/NodeName=$NODE/" \
        -e "s/RealMemory=[0-9]*/RealMemory=$((mem * 9 / 10))/" <<<"$line")
    echo "$line NodeAddr=127.0.0.1 State=UNKNOWN"
}

write_config() {
    local nodeline
    nodeline=$(node_line)
    cat >"$CONF.tmp" <<EOF
# Private one-node test cluster, written by tests/slurm/cluster.sh (do not edit: regenerated).
ClusterName=tcia
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
# No systemd, no usable cgroups here.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default, a job without --mem gets the whole node and jobs run one at a time.
DefMemPerCPU=1024
ReturnToService=2
MailProg=/bin/true
JobRequeue=1
# Test speed. KillWait: grace between SIGTERM and SIGKILL at a time limit/cancel (default 30).
# MinJobAge: ended jobs leave 'scontrol show job' 30..90 s later (default 300), long enough for
# a 0.2 s poller to see the final state. cred_expire: a requeued job is eligible again after
# cred_expire+1 s (default 120; slurmd rejects values below 5). sched_interval: the main
# scheduler pass that starts submitted jobs runs every second (default 60; in 22.05 a submit
# does not start a batch job by itself, so this is the submit-to-start latency, 0..1 s).
# Not configurable: slurmctld checks time limits and sends --signal warnings every 30 s.
KillWait=5
MinJobAge=30
AuthInfo=cred_expire=5
SchedulerParameters=sched_interval=1
InactiveLimit=0
SlurmdTimeout=300
SlurmctldTimeout=120
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
$nodeline
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
    cat >"$DIR/env.sh" <<EOF
# Source this file to use the test cluster: . $DIR/env.sh
export SLURM_CONF=$CONF
export TCIA_SLURM_DIR=$DIR
EOF
}

# --- start / stop / status -------------------------------------------------------------------

ctld_running() { pid_alive "$DIR/run/slurmctld.pid" slurmctld; }
slurmd_running() { pid_alive "$DIR/run/slurmd.pid" slurmd; }
ping_ok() { SLURM_CONF=$CONF scontrol ping 2>/dev/null | grep -q 'is UP'; }
node_state() { SLURM_CONF=$CONF sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n1; }

is_up() {
    ctld_running && slurmd_running && ping_ok && [[ $(node_state) =~ ^(idle|mixed|allocated|completing) ]]
}

tail_log() {
    local f
    for f in "$DIR/log/$1.out" "$DIR/log/$1.log"; do
        if [[ -s $f ]]; then
            { echo "--- last lines of $f:"; tail -n 20 "$f"; } >&2
        fi
    done
}

print_env() { cat "$DIR/env.sh"; }

cmd_start() {
    need_root start
    local t0 i state
    t0=$(now)
    mkdir -p "$DIR"
    DIR=$(cd "$DIR" && pwd -P)
    CONF=$DIR/slurm.conf
    # Serialise concurrent starts/stops on the same state directory.
    exec 9>"$DIR/lock"
    flock -w 120 9 || die "another cluster.sh holds $DIR/lock"

    if [[ -f $CONF ]] && is_up; then
        log "already running (state dir $DIR)"
        print_env
        return 0
    fi
    for cmd in slurmctld slurmd scontrol sinfo munge munged; do
        command -v "$cmd" >/dev/null || die "$cmd not found: run '$0 install' first"
    done
    # Half-started leftovers from an earlier run: stop them (by pid file) and start clean.
    if ctld_running || slurmd_running; then
        log "found a partly running cluster in $DIR: restarting it"
        stop_daemons
    fi
    # Fresh job state and logs each start: tests must not inherit jobs from an earlier run.
    rm -rf "${DIR:?}/state" "${DIR:?}/spool"
    mkdir -p "$DIR"/{log,run,state,spool}
    local f
    for f in "$DIR"/log/*.log "$DIR"/log/*.out; do
        if [[ -e $f ]]; then mv -f "$f" "$f.prev"; fi
    done
    write_config
    export SLURM_CONF=$CONF

    start_munge

    slurmctld -f "$CONF" </dev/null >"$DIR/log/slurmctld.out" 2>&1 9>&- || { tail_log slurmctld; die "slurmctld failed to start"; }
    for ((i = 0; i < START_TIMEOUT * 10; i++)); do
        ping_ok && break
        if ((i > 10)) && ! ctld_running; then tail_log slurmctld; die "slurmctld exited"; fi
        sleep 0.1
    done
    ping_ok || { tail_log slurmctld; die "slurmctld does not answer 'scontrol ping' after ${START_TIMEOUT}s"; }
    log "slurmctld up (pid $(<"$DIR/run/slurmctld.pid"))"

    slurmd -f "$CONF" -N "$NODE" </dev/null >"$DIR/log/slurmd.out" 2>&1 9>&- || { tail_log slurmd; die "slurmd failed to start"; }
    local resumed=0
    for ((i = 0; i < START_TIMEOUT * 10; i++)); do
        state=$(node_state)
        case $state in
            idle*|mixed*|allocated*) break ;;
            down*|drain*|fail*)
                if ((!resumed)) && slurmd_running; then
                    log "node $NODE is $state: resuming it"
                    scontrol update NodeName="$NODE" State=RESUME || true
                    resumed=1
                fi ;;
        esac
        if ((i > 20)) && ! slurmd_running; then tail_log slurmd; die "slurmd exited"; fi
        sleep 0.1
    done
    case $state in
        idle*|mixed*|allocated*) ;;
        *) tail_log slurmd
           SLURM_CONF=$CONF scontrol show node "$NODE" >&2 || true
           die "node $NODE is '$state', not idle, after ${START_TIMEOUT}s" ;;
    esac
    log "slurmd up (pid $(<"$DIR/run/slurmd.pid")), node $NODE $state; started in $(elapsed "$t0") s"
    print_env
}

stop_daemons() {
    stop_pidfile "$DIR/run/slurmd.pid" slurmd
    stop_pidfile "$DIR/run/slurmctld.pid" slurmctld
}

cancel_jobs() {
    # Running job steps (slurmstepd) outlive slurmd, so cancel jobs while the cluster is up.
    ping_ok || return 0
    local jobs i
    jobs=$(SLURM_CONF=$CONF squeue -h -o '%A' 2>/dev/null || true)
    [[ -n $jobs ]] || return 0
    log "cancelling jobs: $(tr '\n' ' ' <<<"$jobs")"
    # shellcheck disable=SC2086
    SLURM_CONF=$CONF scancel $jobs 2>/dev/null || true
    for ((i = 0; i < (STOP_TIMEOUT + 10) * 10; i++)); do
        [[ -z $(SLURM_CONF=$CONF squeue -h -o '%A' 2>/dev/null) ]] && return 0
        sleep 0.1
    done
    log "warning: jobs still listed after cancelling them: stopping anyway"
}

cmd_stop() {
    if [[ ! -d $DIR ]]; then
        log "not running (no state dir $DIR)"
        return 0
    fi
    DIR=$(cd "$DIR" && pwd -P)
    CONF=$DIR/slurm.conf
    [[ -d $DIR/run ]] || { log "not running (nothing in $DIR/run)"; return 0; }
    exec 9>"$DIR/lock"
    flock -w 120 9 || die "another cluster.sh holds $DIR/lock"
    if [[ -f $CONF ]]; then cancel_jobs; fi
    stop_daemons
    stop_pidfile "$DIR/run/munged.pid" munged
    log "stopped"
}

cmd_status() {
    if [[ -f $CONF ]] && is_up; then
        echo "up: slurmctld pid $(<"$DIR/run/slurmctld.pid"), slurmd pid $(<"$DIR/run/slurmd.pid"), node $NODE $(node_state); SLURM_CONF=$CONF"
        return 0
    fi
    local what=()
    ctld_running && what+=("slurmctld pid $(<"$DIR/run/slurmctld.pid")")
    slurmd_running && what+=("slurmd pid $(<"$DIR/run/slurmd.pid")")
    if ((${#what[@]})); then
        echo "down: partly running (${what[*]}) but not usable; node state '$(node_state)'"
    else
        echo "down"
    fi
    return 3
}

cmd_env() {
    [[ -f $DIR/env.sh ]] || die "no $DIR/env.sh: run '$0 start' first"
    print_env
}

usage() {
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

case ${1:-} in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    -h|--help|help|"") usage ;;
    *) log "unknown command '$1'"; usage ;;
esac
