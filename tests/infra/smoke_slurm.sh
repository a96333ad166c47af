#!/usr/bin/env bash
# Smoke-test the cluster from slurm_up.sh: srun, sbatch, and a 2-rank gloo all_reduce under srun.
# Usage: tests/infra/smoke_slurm.sh   (PYTHON=... to override the interpreter; default repo .venv)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
WORK=$(mktemp -d /tmp/dpt-slurm-smoke.XXXXXX)
PORT=${PORT:-$(( 29500 + RANDOM % 1000 ))}
trap 'rm -rf "$WORK"' EXIT

echo "--- srun -N1 -n2 hostname"
timeout 60 srun -N1 -n2 hostname

echo "--- sbatch --nodes=1 --ntasks-per-node=2 (sbatch --wait)"
cat > "$WORK/job.sbatch" <<JOB
#!/bin/bash
#SBATCH --nodes=1 --ntasks-per-node=2
#SBATCH --output=$WORK/job-%j.out
#SBATCH --time=00:05:00
srun "$PY" -c 'import os; print(os.environ["SLURM_PROCID"], os.environ["SLURM_NTASKS"], os.environ["SLURM_LOCALID"], os.environ["SLURM_NODELIST"])'
JOB
timeout 120 sbatch --wait "$WORK/job.sbatch"
cat "$WORK"/job-*.out
[ "$(grep -c . "$WORK"/job-*.out)" = 2 ] || { echo "smoke_slurm: expected 2 lines of output" >&2; exit 1; }

echo "--- srun -n2 gloo all_reduce (tcp://127.0.0.1:$PORT)"
timeout 120 srun -N1 -n2 "$PY" -c "
import os, datetime, torch, torch.distributed as dist
r, w = int(os.environ['SLURM_PROCID']), int(os.environ['SLURM_NTASKS'])
dist.init_process_group('gloo', init_method='tcp://127.0.0.1:$PORT', rank=r, world_size=w, timeout=datetime.timedelta(seconds=60))
x = torch.tensor([float(r + 1)]); dist.all_reduce(x)
assert x.item() == w * (w + 1) / 2, x
print(f'rank {r}/{w}: all_reduce sum={x.item()}', flush=True)
dist.destroy_process_group()
"
echo "smoke_slurm: OK"
