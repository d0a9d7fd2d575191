#!/usr/bin/env bash
# Start and stop a real one-node slurm cluster on this machine, for tests and CI.
#
#   tests/slurm/cluster.sh install   apt-get install munge slurmctld slurmd slurm-client (root)
#   tests/slurm/cluster.sh start     write a private config, start munged/slurmctld/slurmd (root)
#   tests/slurm/cluster.sh stop      cancel jobs, stop the slurm daemons this script started
#   tests/slurm/cluster.sh status    "up" (exit 0) or "down" (exit 3)
#   tests/slurm/cluster.sh env       print the export lines (eval "$(tests/slurm/cluster.sh env)")
#
# Everything lives in a state directory, default ${TMPDIR:-/tmp}/tcia-slurm-<user>, override
# with TCIA_SLURM_DIR (the tests use a fresh one per run):
#   slurm.conf  env.sh  log/  run/*.pid  state/  spool/  lock
# /etc/slurm/slurm.conf is never written: the daemons and the client commands all honour
# SLURM_CONF (the daemons are also given -f). Source $TCIA_SLURM_DIR/env.sh to use the cluster.
#
# The machine this is for may run a slurm of its own (or another test cluster): `start` picks
# two free TCP ports and a cluster name of its own, and the cluster counts as up only when
# the slurmctld that answers through our slurm.conf reports our cluster name, port and state
# directory, and the slurmctld in our pid file is alive (`scontrol ping` alone says UP for
# whichever slurmctld holds the port). Daemons are only ever stopped by the PIDs in run/*.pid,
# and only if they run our slurm.conf.
#
# Known for Debian 12 / slurm 22.05 without systemd or usable cgroups: proctrack/linuxproc and
# task/none; RealMemory at ~90 % of `slurmd -C` (100 % drains the node with "Low RealMemory").
# munge is one per machine: it uses the system key (/etc/munge/munge.key, created once) and
# socket (/run/munge). A munged that answers is reused; one is started only when none answers,
# and it is never stopped: every slurm on the machine (another test run's, the machine's own)
# may depend on it by then.
#
# Optional environment: TCIA_SLURM_DIR; TCIA_SLURMCTLD_PORT and TCIA_SLURMD_PORT (fixed ports,
# refused when in use; default: free ones, chosen at each start).
set -euo pipefail

PROG=${0##*/}
PACKAGES=(munge slurmctld slurmd slurm-client)
PATH=$PATH:/usr/sbin:/sbin:/usr/bin:/bin

DIR=${TCIA_SLURM_DIR:-${TMPDIR:-/tmp}/tcia-slurm-$(id -un)}
# Canonical, because the daemons' command lines (-f $CONF) are compared with it.
if [[ -d $DIR ]]; then DIR=$(cd "$DIR" && pwd -P); fi
CONF=$DIR/slurm.conf
NODE=$(hostname -s)
# How often start picks new ports when another process took one before our daemon bound it.
PORT_ATTEMPTS=3
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

# pid_ours <pidfile> <comm>: pid_alive, and the process runs our slurm.conf (-f $CONF), so that
# a pid reused by another cluster's daemon of the same name is never taken for ours. (A zombie,
# which an init that does not reap leaves behind, has an empty cmdline: it counts as gone.)
pid_ours() {
    local pidfile=$1 comm=$2
    pid_alive "$pidfile" "$comm" || return 1
    local args
    args=$(tr '\0' '\n' <"/proc/$(<"$pidfile")/cmdline" 2>/dev/null) || return 1
    grep -qxF -- "$CONF" <<<"$args"
}

# stop_pidfile <pidfile> <comm>: TERM the pid from <pidfile>, wait for it, KILL if it lingers.
stop_pidfile() {
    local pidfile=$1 comm=$2 pid i
    if ! pid_ours "$pidfile" "$comm"; then
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

# Two starts at once (two test runs) must not both start a munged: serialise machine-wide, in
# munge's own folder (root's, unlike /tmp where anyone may plant a file of that name).
MUNGE_LOCK=/run/munge/.tcia-cluster-sh.lock

start_munge() {
    munge_ok && { log "munged already running: reusing it"; return 0; }
    command -v munged >/dev/null || die "munged not found: run '$0 install'"
    install -d -o munge -g munge -m 0755 /run/munge
    exec 8>>"$MUNGE_LOCK"
    flock -w 120 8 || die "another cluster.sh holds $MUNGE_LOCK"
    if munge_ok; then
        log "munged started meanwhile by someone else: reusing it"
        exec 8>&-
        return 0
    fi
    install -d -o munge -g munge -m 0700 /etc/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
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
    runuser -u munge -- munged --pid-file="$sysfile" </dev/null >"$DIR/log/munged.out" 2>&1 8>&- 9>&- \
        || { cat "$DIR/log/munged.out" >&2; die "munged failed to start (see /var/log/munge/munged.log)"; }
    local i
    for ((i = 0; i < START_TIMEOUT * 10; i++)); do
        if munge_ok && pid_alive "$sysfile" munged; then
            log "munged started (pid $(<"$sysfile"); it stays running, shared by every slurm here)"
            exec 8>&-
            return 0
        fi
        sleep 0.1
    done
    die "munged does not answer after ${START_TIMEOUT}s (see /var/log/munge/munged.log)"
}

# --- ports -----------------------------------------------------------------------------------

# Local ports of every TCP socket on this machine (listening or connected), from /proc.
ports_in_use() {
    local f _sl addr _rest
    for f in /proc/net/tcp /proc/net/tcp6; do
        [[ -r $f ]] || continue
        while read -r _sl addr _rest; do
            [[ $addr == *:* ]] && echo $((16#${addr##*:}))
        done < <(tail -n +2 "$f")
    done
    return 0
}

# Not `ports_in_use | grep -q`: grep leaving early fails the pipe (pipefail).
port_in_use() { grep -qx "$1" <<<"$(ports_in_use)"; }

# free_port [taken...]: a random port no socket uses, not one of the arguments. Taken from
# below the kernel's ephemeral range (where outgoing connections get theirs) and above 10000
# (away from 6817-6819, slurm's defaults, and other well-known services).
free_port() {
    local low used port i
    read -r low _ </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || low=32768
    ((low > 11000)) || low=65535
    used=" $(ports_in_use | tr '\n' ' ') $* "
    for ((i = 0; i < 1000; i++)); do
        port=$((10000 + (RANDOM * 32768 + RANDOM) % (low - 10000)))
        [[ $used == *" $port "* ]] || { echo "$port"; return 0; }
    done
    die "no free TCP port between 10000 and $low"
}

# choose_ports: CTLD_PORT and SLURMD_PORT, fixed by the environment or free ones.
choose_ports() {
    if [[ -n ${TCIA_SLURMCTLD_PORT:-} ]]; then
        CTLD_PORT=$TCIA_SLURMCTLD_PORT
        ! port_in_use "$CTLD_PORT" \
            || die "TCIA_SLURMCTLD_PORT $CTLD_PORT is in use (another slurm?): unset it to use a free port"
    else
        CTLD_PORT=$(free_port) || exit 1
    fi
    if [[ -n ${TCIA_SLURMD_PORT:-} ]]; then
        SLURMD_PORT=$TCIA_SLURMD_PORT
        ! port_in_use "$SLURMD_PORT" \
            || die "TCIA_SLURMD_PORT $SLURMD_PORT is in use (another slurm?): unset it to use a free port"
    else
        SLURMD_PORT=$(free_port "$CTLD_PORT") || exit 1
    fi
}

# --- config ----------------------------------------------------------------------------------

# conf_value <key>: its value in our slurm.conf.
conf_value() { sed -n "s/^$1=//p" "$CONF" | head -n1; }

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
    local nodeline name
    nodeline=$(node_line) || exit 1
    # A name of its own per start, so that no other slurmctld (not even an earlier start of
    # this one, on the same state directory) can pass for it.
    name=tcia$(od -An -N4 -tx4 /dev/urandom | tr -d ' \n')
    cat >"$CONF.tmp" <<EOF
# Private one-node test cluster, written by tests/slurm/cluster.sh (do not edit: regenerated).
ClusterName=$name
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
    mv "$CONF.tmp" "$CONF" || die "cannot write $CONF"
    cat >"$DIR/env.sh" <<EOF || die "cannot write $DIR/env.sh"
# Source this file to use the test cluster: . $DIR/env.sh
export SLURM_CONF=$CONF
export TCIA_SLURM_DIR=$DIR
EOF
}

# --- start / stop / status -------------------------------------------------------------------

ctld_running() { pid_ours "$DIR/run/slurmctld.pid" slurmctld; }
slurmd_running() { pid_ours "$DIR/run/slurmd.pid" slurmd; }

# field <text> <key>: the value of "Key   = value" in `scontrol show config` output.
field() { sed -n "s/^$2 *= *//p" <<<"$1" | head -n1; }

# ctld_ours: our slurmctld runs, and the one answering through our slurm.conf is it. `scontrol
# show config` prints the configuration of the slurmctld that answers, not of the file.
ctld_ours() {
    local shown
    [[ -f $CONF ]] && ctld_running || return 1
    shown=$(SLURM_CONF=$CONF scontrol show config 2>/dev/null) || return 1
    [[ $(field "$shown" ClusterName) == "$(conf_value ClusterName)" &&
       $(field "$shown" SlurmctldPort) == "$(conf_value SlurmctldPort)" &&
       $(field "$shown" StateSaveLocation) == "$DIR/state" ]]
}
node_state() { SLURM_CONF=$CONF sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n1; }

is_up() {
    ctld_ours && slurmd_running && [[ $(node_state) =~ ^(idle|mixed|allocated|completing) ]]
}

# port_taken <daemon>: its log says that another process held its port when it started.
port_taken() { grep -qs 'Address already in use' "$DIR/log/$1.log" "$DIR/log/$1.out"; }

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
    local t0 attempt rc
    t0=$(now)
    mkdir -p "$DIR"
    DIR=$(cd "$DIR" && pwd -P)
    CONF=$DIR/slurm.conf
    # Serialise concurrent starts/stops on the same state directory.
    exec 9>"$DIR/lock"
    flock -w 120 9 || die "another cluster.sh holds $DIR/lock"

    if is_up; then
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
    mkdir -p "$DIR"/{log,run}
    start_munge
    # Between choosing a free port and the daemon binding it, another process may take it:
    # then choose again (fixed ports are not retried).
    for ((attempt = 1; ; attempt++)); do
        rc=0
        start_daemons || rc=$?
        ((rc == 0)) && break
        stop_daemons
        if ((rc != 75)) || [[ -n ${TCIA_SLURMCTLD_PORT:-}${TCIA_SLURMD_PORT:-} ]] ||
            ((attempt >= PORT_ATTEMPTS)); then
            die "the cluster did not start (state dir $DIR)"
        fi
        log "a port was taken before our daemon bound it: choosing other ports"
    done
    log "cluster $(conf_value ClusterName) up on ports $CTLD_PORT/$SLURMD_PORT; started in $(elapsed "$t0") s"
    print_env
}

# start_daemons: fresh state, config, slurmctld, slurmd. Returns 75 when a daemon found its
# port taken, 1 on any other failure (having shown the daemon's log). Called as `start_daemons
# || ...`, so set -e is off in here: failures are handled (or die) where they happen.
start_daemons() {
    # Fresh job state and logs each start: tests must not inherit jobs from an earlier run.
    rm -rf "${DIR:?}/state" "${DIR:?}/spool"
    mkdir -p "$DIR"/{log,run,state,spool} || die "cannot create the folders in $DIR"
    local f i state
    for f in "$DIR"/log/slurm*.log "$DIR"/log/slurm*.out; do
        if [[ -e $f ]]; then mv -f "$f" "$f.prev"; fi
    done
    choose_ports
    write_config
    export SLURM_CONF=$CONF

    slurmctld -f "$CONF" </dev/null >"$DIR/log/slurmctld.out" 2>&1 8>&- 9>&- || { tail_log slurmctld; return 1; }
    for ((i = 0; i < START_TIMEOUT * 10; i++)); do
        ctld_ours && break
        if ((i > 10)) && ! ctld_running; then
            port_taken slurmctld && return 75
            tail_log slurmctld; log "slurmctld exited"; return 1
        fi
        sleep 0.1
    done
    ctld_ours || { tail_log slurmctld; log "our slurmctld does not answer after ${START_TIMEOUT}s"; return 1; }
    log "slurmctld up (pid $(<"$DIR/run/slurmctld.pid"), port $CTLD_PORT)"

    slurmd -f "$CONF" -N "$NODE" </dev/null >"$DIR/log/slurmd.out" 2>&1 8>&- 9>&- || { tail_log slurmd; return 1; }
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
        if ((i > 20)) && ! slurmd_running; then
            port_taken slurmd && return 75
            tail_log slurmd; log "slurmd exited"; return 1
        fi
        sleep 0.1
    done
    case $state in
        idle*|mixed*|allocated*) ;;
        *) tail_log slurmd
           scontrol show node "$NODE" >&2 || true
           log "node $NODE is '$state', not idle, after ${START_TIMEOUT}s"
           return 1 ;;
    esac
    log "slurmd up (pid $(<"$DIR/run/slurmd.pid"), port $SLURMD_PORT), node $NODE $state"
}

stop_daemons() {
    stop_pidfile "$DIR/run/slurmd.pid" slurmd
    stop_pidfile "$DIR/run/slurmctld.pid" slurmctld
}

cancel_jobs() {
    # Running job steps (slurmstepd) outlive slurmd, so cancel jobs while the cluster is up;
    # only through our own slurmctld, never another cluster's jobs.
    ctld_ours || return 0
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
    [[ -d $DIR/run ]] || { log "not running (nothing in $DIR/run)"; return 0; }
    exec 9>"$DIR/lock"
    flock -w 120 9 || die "another cluster.sh holds $DIR/lock"
    cancel_jobs
    stop_daemons
    # munged is left running (see the top of this file); run/munged.pid is from older versions.
    rm -f "$DIR/run/munged.pid"
    log "stopped"
}

cmd_status() {
    if is_up; then
        echo "up: cluster $(conf_value ClusterName), slurmctld pid $(<"$DIR/run/slurmctld.pid") port $(conf_value SlurmctldPort), slurmd pid $(<"$DIR/run/slurmd.pid") port $(conf_value SlurmdPort), node $NODE $(node_state); SLURM_CONF=$CONF"
        return 0
    fi
    local what=()
    ctld_running && what+=("slurmctld pid $(<"$DIR/run/slurmctld.pid")")
    slurmd_running && what+=("slurmd pid $(<"$DIR/run/slurmd.pid")")
    if ((${#what[@]})); then
        # The node state only from our own slurmctld: another one may hold our port.
        ctld_ours && what+=("node state '$(node_state)'")
        echo "down: partly running (${what[*]}) but not usable"
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
