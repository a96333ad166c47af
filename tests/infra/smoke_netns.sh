#!/usr/bin/env bash
# Smoke-test the namespaces from netns_up.sh: ping, a raw 2-process gloo group
# (rank 0 in dpt_a, rank 1 in dpt_b), and torchrun --nnodes 2 with static and c10d rendezvous.
# Usage: tests/infra/smoke_netns.sh   (PYTHON/TORCHRUN to override; default repo .venv)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
TR=${TORCHRUN:-$ROOT/.venv/bin/torchrun}
WORK=$(mktemp -d /tmp/dpt-netns-smoke.XXXXXX)
BASE=${PORT:-$(( 29500 + RANDOM % 1000 ))}
trap 'rm -rf "$WORK"' EXIT
export GLOO_SOCKET_IFNAME=dpt0   # not strictly needed with /etc/netns/*/hosts, but explicit is safer

echo "--- ping"
ip netns exec dpt_a ping -c1 -W2 10.77.0.2 | tail -2

pair() { # label cmd_a cmd_b  -> runs both concurrently, fails if either fails
    echo "--- $1"
    ip netns exec dpt_a timeout 90 bash -c "$2" >"$WORK/a.log" 2>&1 & local pa=$!
    ip netns exec dpt_b timeout 90 bash -c "$3" >"$WORK/b.log" 2>&1 & local pb=$!
    local ra=0 rb=0; wait $pa || ra=$?; wait $pb || rb=$?
    grep -h RESULT "$WORK/a.log" "$WORK/b.log" || true
    if [ $ra != 0 ] || [ $rb != 0 ]; then
        echo "smoke_netns: '$1' failed (rc $ra/$rb)"; tail -n 20 "$WORK/a.log" "$WORK/b.log"; exit 1
    fi >&2
}

cat > "$WORK/raw.py" <<'PYEOF'
import sys, datetime, torch, torch.distributed as dist
rank, port = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"tcp://10.77.0.1:{port}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=60))
x = torch.tensor([float(rank + 1)]); dist.all_reduce(x)
assert x.item() == 3.0, x
print(f"RESULT raw rank={rank} sum={x.item()}", flush=True)
dist.destroy_process_group()
PYEOF
cat > "$WORK/tr.py" <<'PYEOF'
import os, datetime, torch, torch.distributed as dist
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
r, w = dist.get_rank(), dist.get_world_size()
x = torch.tensor([float(r + 1)]); dist.all_reduce(x)
assert x.item() == w * (w + 1) / 2, x
print(f"RESULT torchrun rank={r}/{w} MASTER_ADDR={os.environ['MASTER_ADDR']} sum={x.item()}", flush=True)
dist.destroy_process_group()
PYEOF

pair "gloo init_method=tcp://10.77.0.1:$BASE" \
     "$PY $WORK/raw.py 0 $BASE" "$PY $WORK/raw.py 1 $BASE"

S="--nnodes 2 --nproc-per-node 1 --master-addr 10.77.0.1 --master-port $((BASE+1))"
pair "torchrun static rendezvous" \
     "$TR $S --node-rank 0 $WORK/tr.py" "$TR $S --node-rank 1 $WORK/tr.py"

C="--nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint 10.77.0.1:$((BASE+2)) --rdzv-id smoke$BASE"
pair "torchrun c10d rendezvous" \
     "$TR $C --rdzv-conf is_host=1 --local-addr 10.77.0.1 $WORK/tr.py" \
     "$TR $C --rdzv-conf is_host=0 --local-addr 10.77.0.2 $WORK/tr.py"
echo "smoke_netns: OK"
