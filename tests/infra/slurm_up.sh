#!/usr/bin/env bash
# Bring up a single-node Slurm cluster on this host (Debian/Ubuntu, root).
#
#   tests/infra/slurm_up.sh          # install if needed, configure, start, wait for idle node
#   tests/infra/slurm_down.sh        # stop slurmd, slurmctld, munged
#
# Env knobs (all optional):
#   SLURM_UP_TIMEOUT   seconds to wait for the node to become idle (default 60)
#   SLURM_UP_CPUS      CPUs to advertise (default: nproc)
#   SLURM_UP_NO_INSTALL=1  never call apt-get; fail if slurm/munge are missing
#
# Exit 0: `sinfo` shows the node idle in partition `debug`.
# Exit !=0: one line "slurm_up: <reason>" on stderr (details in /var/log/slurm/*.log).
set -uo pipefail

T0=$(date +%s)
TIMEOUT=${SLURM_UP_TIMEOUT:-60}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm
APT_LOG=/tmp/dptrain-slurm-apt.log

die()  { echo "slurm_up: $*" >&2; exit 1; }
info() { echo "slurm_up: [$(( $(date +%s) - T0 ))s] $*"; }

[ "$(id -u)" = 0 ] || die "must run as root (needs apt-get, /etc/slurm, daemons)"

# A process is 'ours' if the pid file points to a live process with the expected comm.
pid_alive() { # pidfile comm
    local p; [ -r "$1" ] || return 1
    p=$(cat "$1" 2>/dev/null) || return 1
    [ -n "$p" ] && [ -d "/proc/$p" ] && [ "$(cat /proc/$p/comm 2>/dev/null)" = "$2" ]
}

# ---------------------------------------------------------------- install
need_pkgs=()
command -v slurmctld >/dev/null 2>&1 || need_pkgs+=(slurmctld)
command -v slurmd    >/dev/null 2>&1 || need_pkgs+=(slurmd)
command -v srun      >/dev/null 2>&1 || need_pkgs+=(slurm-client)
command -v munged    >/dev/null 2>&1 || need_pkgs+=(munge)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    [ "${SLURM_UP_NO_INSTALL:-0}" = 1 ] && die "missing ${need_pkgs[*]} and SLURM_UP_NO_INSTALL=1"
    command -v apt-get >/dev/null 2>&1 || die "slurm/munge missing and apt-get not available (not Debian/Ubuntu?)"
    info "installing slurm-wlm munge (log: $APT_LOG)"
    export DEBIAN_FRONTEND=noninteractive
    # policy-rc.d (exit 101) stops postinst scripts from trying to start services;
    # only add one temporarily if the system does not have one already.
    tmp_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && tmp_policy=1
    fi
    apt_install() {
        apt-get install -y -q --no-install-recommends \
            -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
            slurm-wlm munge >>"$APT_LOG" 2>&1
    }
    : > "$APT_LOG"
    if ! apt_install; then
        info "apt-get install failed, running apt-get update and retrying"
        apt-get update -q >>"$APT_LOG" 2>&1 || { [ $tmp_policy = 1 ] && rm -f /usr/sbin/policy-rc.d; die "apt-get update failed (no registry access?), see $APT_LOG"; }
        apt_install || { [ $tmp_policy = 1 ] && rm -f /usr/sbin/policy-rc.d; die "apt-get install slurm-wlm munge failed, see $APT_LOG"; }
    fi
    [ $tmp_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
    for b in slurmctld slurmd srun sinfo munged; do
        command -v $b >/dev/null 2>&1 || die "$b still missing after apt-get install, see $APT_LOG"
    done
    info "installed"
fi

# ---------------------------------------------------------------- munge
MUNGE_KEY=/etc/munge/munge.key
MUNGE_USER=munge
id "$MUNGE_USER" >/dev/null 2>&1 || MUNGE_USER=root
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [ ! -s "$MUNGE_KEY" ]; then
    info "creating munge key"
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile="$MUNGE_KEY" --force >/dev/null 2>&1 \
            || dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
    else
        dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
    fi || die "cannot create $MUNGE_KEY"
fi
chown -R "$MUNGE_USER:$MUNGE_USER" /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
chmod 0400 "$MUNGE_KEY"

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! munge_ok; then
    info "starting munged"
    # stale socket/pid from a dead munged make it refuse to start
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock /run/munge/munged.pid
    if [ "$MUNGE_USER" = root ]; then
        munged --force >>/var/log/munge/munged.start.log 2>&1
    else
        runuser -u "$MUNGE_USER" -- munged >>/var/log/munge/munged.start.log 2>&1
    fi || die "munged failed to start (see /var/log/munge/munged.log and munged.start.log)"
    for _ in $(seq 1 50); do munge_ok && break; sleep 0.1; done
    munge_ok || die "munged started but 'munge -n | unmunge' fails (see /var/log/munge/munged.log)"
fi

# ---------------------------------------------------------------- slurm.conf
NODE=$(hostname -s) || die "hostname -s failed"
[ -n "$NODE" ] || die "empty short hostname"
CPUS=${SLURM_UP_CPUS:-$(nproc)}
MEM_KB=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
# Advertise 80% of RAM (>=256 MB); config_overrides below makes slurmd trust it anyway.
MEM_MB=$(( MEM_KB / 1024 * 8 / 10 )); [ "$MEM_MB" -ge 256 ] || MEM_MB=256

mkdir -p "$CONF_DIR" "$LOG_DIR" "$RUN_DIR" /var/spool/slurmctld /var/spool/slurmd
NEW_CONF=$(mktemp)
cat > "$NEW_CONF" <<CONF
# Generated by dptrain tests/infra/slurm_up.sh -- single-node test cluster.
ClusterName=dptrain
# Everything on loopback: works even if the hostname does not resolve.
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=${RUN_DIR}/slurmctld.pid
SlurmdPidFile=${RUN_DIR}/slurmd.pid
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: works in containers / VMs without a usable cgroup hierarchy.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
# Debian default /bin/mail is absent -> 'Configured MailProg is invalid' in the log.
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Trust the NodeName line below rather than what slurmd detects (container-safe).
SlurmdParameters=config_overrides
# Bring the node back automatically after daemon restarts.
ReturnToService=2
# Do not try to copy the caller's rlimits (fails for e.g. MEMLOCK in containers).
PropagateResourceLimits=NONE
InactiveLimit=0
KillWait=5
MinJobAge=60
SlurmctldTimeout=30
SlurmdTimeout=60
Waittime=0
NodeName=${NODE} NodeAddr=127.0.0.1 NodeHostname=${NODE} CPUs=${CPUS} RealMemory=${MEM_MB} State=UNKNOWN
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
CONF

conf_changed=1
if [ -f "$CONF" ] && cmp -s "$NEW_CONF" "$CONF"; then conf_changed=0; fi
if [ $conf_changed = 1 ]; then
    info "writing $CONF (node=$NODE cpus=$CPUS mem=${MEM_MB}MB)"
    cp "$NEW_CONF" "$CONF" && chmod 0644 "$CONF" || { rm -f "$NEW_CONF"; die "cannot write $CONF"; }
fi
rm -f "$NEW_CONF"

# ---------------------------------------------------------------- daemons
stop_daemon() { # name pidfile
    local p
    pid_alive "$2" "$1" || return 0
    p=$(cat "$2"); kill "$p" 2>/dev/null
    for _ in $(seq 1 50); do [ -d "/proc/$p" ] || return 0; sleep 0.1; done
    kill -9 "$p" 2>/dev/null; sleep 0.2
}
if [ $conf_changed = 1 ]; then
    # config changed: restart whatever is running so it picks the new one up
    stop_daemon slurmd "$RUN_DIR/slurmd.pid"
    stop_daemon slurmctld "$RUN_DIR/slurmctld.pid"
fi

if ! pid_alive "$RUN_DIR/slurmctld.pid" slurmctld; then
    info "starting slurmctld (log: $LOG_DIR/slurmctld.log)"
    slurmctld >>"$LOG_DIR/slurmctld.start.log" 2>&1 \
        || die "slurmctld failed to start: $(tail -n1 "$LOG_DIR/slurmctld.log" 2>/dev/null)"
fi
# slurmd registers with slurmctld; give the controller a moment to listen.
for _ in $(seq 1 50); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
scontrol ping 2>/dev/null | grep -q UP \
    || die "slurmctld not responding: $(tail -n1 "$LOG_DIR/slurmctld.log" 2>/dev/null)"

if ! pid_alive "$RUN_DIR/slurmd.pid" slurmd; then
    info "starting slurmd (log: $LOG_DIR/slurmd.log)"
    slurmd >>"$LOG_DIR/slurmd.start.log" 2>&1 \
        || die "slurmd failed to start: $(tail -n1 "$LOG_DIR/slurmd.log" 2>/dev/null)"
fi

# ---------------------------------------------------------------- wait for idle
resumed=0
deadline=$(( $(date +%s) + TIMEOUT ))
state=""
while :; do
    state=$(sinfo -h -p debug -n "$NODE" -o '%t' 2>/dev/null | head -n1)
    case "$state" in
        idle|mix|alloc) break ;;  # usable (mix/alloc: jobs already running on an old cluster)
        drain*|drng|down*|fail*|inval*)
            if [ $resumed = 0 ]; then
                scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1
                resumed=1
            fi ;;
    esac
    pid_alive "$RUN_DIR/slurmd.pid" slurmd || die "slurmd died: $(tail -n1 "$LOG_DIR/slurmd.log" 2>/dev/null)"
    pid_alive "$RUN_DIR/slurmctld.pid" slurmctld || die "slurmctld died: $(tail -n1 "$LOG_DIR/slurmctld.log" 2>/dev/null)"
    [ "$(date +%s)" -lt "$deadline" ] || die "node $NODE not idle after ${TIMEOUT}s (state='${state:-?}', reason: $(sinfo -h -R -o '%E' 2>/dev/null | head -n1))"
    sleep 0.5
done
info "ready: node $NODE state=$state partition=debug cpus=$CPUS"
exit 0
