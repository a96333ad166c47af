#!/usr/bin/env bash
# Remove the dpt_a / dpt_b namespaces (and the veth pair with them) created by netns_up.sh.
# Kills nothing: processes still running inside a namespace keep it alive until they exit
# (netns_down then still succeeds, the name is just gone). Idempotent.
set -uo pipefail
[ "$(id -u)" = 0 ] || { echo "netns_down: must run as root" >&2; exit 1; }
command -v ip >/dev/null 2>&1 || exit 0
rc=0
for ns in dpt_a dpt_b; do
    if ip netns list 2>/dev/null | awk '{print $1}' | grep -qx "$ns"; then
        pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
        [ -n "$pids" ] && echo "netns_down: warning: processes still in $ns: $pids" >&2
        ip netns del "$ns" || { echo "netns_down: cannot delete netns $ns" >&2; rc=1; }
    fi
    rm -rf "/etc/netns/$ns"
done
rmdir /etc/netns 2>/dev/null
# a veth left in the root namespace by an interrupted netns_up
ip link del dpt_va 2>/dev/null; ip link del dpt_vb 2>/dev/null
echo "netns_down: done"
exit $rc
