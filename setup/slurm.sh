#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for tests and for trying profiles/slurm locally.
#
#   bash setup/slurm.sh install       apt install slurmctld slurmd slurm-client munge (idempotent)
#   bash setup/slurm.sh start DIR     write DIR/slurm.conf + DIR/gres.conf, start munged, slurmctld and
#                                     slurmd (all state, logs and sockets under DIR), wait until the
#                                     node is idle, print the environment to use it:
#                                     eval "$(bash setup/slurm.sh start DIR)"
#   bash setup/slurm.sh stop DIR      stop the daemons started with DIR
#
# The cluster: one node "vgnode" on 127.0.0.1 with this machine's CPUs and memory (from `slurmd -C`),
# one fake GPU on /dev/null (so `sbatch --gpus=1`, which Snakemake emits for `gpu=1`, can be
# scheduled), no accounting database (use `--slurm-status-command squeue`), free TCP ports, and a
# job-completion record in DIR/jobcomp.txt (one line per finished job, with its state).
# Nothing is written outside DIR. Client commands find the config through SLURM_CONF; because the
# Snakemake SLURM job step drops every SLURM_* variable before its inner `srun`, DIR/bin holds
# client wrappers that set SLURM_CONF, and the printed environment puts DIR/bin first on PATH.
set -euo pipefail

NODE=vgnode
PACKAGES=(slurmctld slurmd slurm-client munge)

usage() {
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

install() {
    local missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if ((${#missing[@]} == 0)); then
        echo "slurm: ${PACKAGES[*]} already installed"
        return
    fi
    local sudo=()
    [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    # the packages' own services are not used (start writes its own config): keep apt from starting
    # them, with a policy-rc.d for the duration of the install unless the machine has one already
    local policy=/usr/sbin/policy-rc.d own_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
        "${sudo[@]}" chmod 755 "$policy"
        own_policy=1
    fi
    local rc=0
    "${sudo[@]}" apt-get update -q &&
        DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" ||
        rc=$?
    ((own_policy == 0)) || "${sudo[@]}" rm -f "$policy"
    return "$rc"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for() { # seconds, description, command...
    local secs=$1 what=$2
    shift 2
    for ((i = 0; i < secs * 4; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.25
    done
    echo "slurm: timed out after ${secs}s waiting for $what" >&2
    return 1
}

node_idle() {
    [[ $(sinfo -h -N -n "$NODE" -o %t 2>/dev/null) == idle ]]
}

start() {
    local dir
    dir=$(mkdir -p "$1" && cd "$1" && pwd)
    for cmd in munged slurmctld slurmd sinfo; do
        command -v "$cmd" >/dev/null || {
            echo "slurm: $cmd not found; run: bash setup/slurm.sh install" >&2
            exit 1
        }
    done
    if [[ -f $dir/run/slurmctld.pid ]] && kill -0 "$(cat "$dir/run/slurmctld.pid")" 2>/dev/null; then
        echo "slurm: already running in $dir" >&2
        print_env "$dir"
        return
    fi
    mkdir -p "$dir"/{munge,state,spool,log,run,bin}
    chmod 755 "$dir" "$dir/munge"
    # munged refuses a socket below a folder that others cannot search
    local up=$dir
    while [[ $up != / ]]; do
        up=$(dirname "$up")
        if [[ $(stat -c %A "$up") != ?????????[xt] ]]; then
            echo "slurm: $up is not searchable by others (munged needs that for its socket); use another DIR" >&2
            exit 1
        fi
    done

    # munge: own key and socket, so a system munged (if any) is left alone
    if [[ ! -f $dir/munge/munge.key ]]; then
        dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
        chmod 400 "$dir/munge/munge.key"
    fi
    munged --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
        --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed"

    local hw user ctld_port d_port
    hw=$(slurmd -C | head -1 | sed "s/^NodeName=[^ ]*/NodeName=$NODE/")
    user=$(id -un)
    ctld_port=$(free_port)
    d_port=$(free_port)
    cat >"$dir/slurm.conf" <<EOF
# written by setup/slurm.sh start: a single-node cluster for tests
ClusterName=vectorgeo
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$d_port
SlurmUser=$user
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/jobcomp.txt
GresTypes=gpu
ReturnToService=2
MinJobAge=3600
SlurmdTimeout=30
InactiveLimit=0
$hw NodeAddr=127.0.0.1 Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$dir/gres.conf" <<EOF
AutoDetect=off
NodeName=$NODE Name=gpu File=/dev/null
EOF
    local real
    for cmd in srun sbatch squeue scancel sinfo scontrol sacct; do
        real=$(PATH=${PATH//$dir\/bin:/} command -v "$cmd")
        printf '#!/bin/sh\nexport SLURM_CONF=%q\nexec %q "$@"\n' "$dir/slurm.conf" "$real" >"$dir/bin/$cmd"
        chmod +x "$dir/bin/$cmd"
    done
    export SLURM_CONF=$dir/slurm.conf
    # on any failure below: show the logs and stop what was started
    trap 'tail -n 20 "$dir"/log/*.log >&2 || true; stop "$dir"' ERR
    slurmctld -i
    wait_for 30 "slurmctld" scontrol ping
    slurmd -N "$NODE"
    wait_for 60 "node $NODE to be idle" node_idle
    trap - ERR
    print_env "$dir"
}

print_env() {
    printf 'export SLURM_CONF=%q PATH=%q\n' "$1/slurm.conf" "$1/bin:$PATH"
}

stop_pid() { # pidfile
    [[ -f $1 ]] || return 0
    local pid
    pid=$(cat "$1")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for ((i = 0; i < 40; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.25
        done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$1"
}

stop() {
    local dir=$1
    [[ -d $dir ]] || return 0
    stop_pid "$dir/run/slurmd.pid"
    stop_pid "$dir/run/slurmctld.pid"
    stop_pid "$dir/run/munged.pid"
}

case "${1:-}" in
install) install ;;
start | stop)
    [[ $# -eq 2 ]] || usage
    "$1" "$2"
    ;;
*) usage ;;
esac
