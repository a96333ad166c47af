#!/usr/bin/env bash
# Stop the single-node Slurm cluster started by slurm_up.sh (slurmd, slurmctld, munged).
# Leaves packages, /etc/slurm/slurm.conf and the munge key in place; idempotent.
#   SLURM_DOWN_KEEP_MUNGE=1  leave munged running
#   SLURM_DOWN_PURGE_STATE=1 also wipe /var/spool/slurmctld and /var/spool/slurmd (job ids restart at 1)
set -uo pipefail
RUN_DIR=/run/slurm
rc=0

stop() { # comm pidfile
    local p
    [ -r "$2" ] || return 0
    p=$(cat "$2" 2>/dev/null)
    if [ -n "$p" ] && [ -d "/proc/$p" ] && [ "$(cat /proc/$p/comm 2>/dev/null)" = "$1" ]; then
        kill "$p" 2>/dev/null
        for _ in $(seq 1 100); do [ -d "/proc/$p" ] || break; sleep 0.1; done
        if [ -d "/proc/$p" ]; then kill -9 "$p" 2>/dev/null; sleep 0.2; fi
        if [ -d "/proc/$p" ]; then echo "slurm_down: could not stop $1 (pid $p)" >&2; rc=1; return; fi
        echo "slurm_down: stopped $1 (pid $p)"
    fi
    rm -f "$2"
}

[ "$(id -u)" = 0 ] || { echo "slurm_down: must run as root" >&2; exit 1; }
stop slurmd    "$RUN_DIR/slurmd.pid"
stop slurmctld "$RUN_DIR/slurmctld.pid"
if [ "${SLURM_DOWN_KEEP_MUNGE:-0}" != 1 ]; then
    stop munged /run/munge/munged.pid
fi
if [ "${SLURM_DOWN_PURGE_STATE:-0}" = 1 ]; then
    rm -rf /var/spool/slurmctld/* /var/spool/slurmd/*
fi
exit $rc
