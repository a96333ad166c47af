#!/usr/bin/env bash
# The GPU check of issue 15 item 6: on a CUDA machine, in <= 8 minutes, one results file.
#
#   bash benchmarks/gpu_check.sh                 # writes benchmarks/results/gpu_check-<host>-<date>.json
#   PYTHON=/opt/venv/bin/python bash benchmarks/gpu_check.sh   # a Python whose torch sees CUDA
#
# What it measures, each step under `timeout`, using only dptrain's own CLI:
#   1. dptrain bench: single / dp (all GPUs) / ddp (nccl) throughput and per-GPU memory
#      (DataParallel's GPU-0 imbalance = max/min of the per-GPU peaks), convnet, batch 64;
#   2. dptrain train --precision 16 (fp16 autocast + GradScaler) and --precision bf16;
#   3. dptrain train --recipe mnist-fast on one GPU: training time and test accuracy;
#   4. a run killed with kill -9 after its first checkpoint, then --resume auto on the GPU.
# A failed or timed-out step is recorded as such and the others still run; the script exits 1
# if any step failed, 2 (with one "error:" line) when no CUDA GPU is visible.
#
# Python: $PYTHON if set; else ./.venv/bin/python if its torch sees CUDA; else python3 if its
# torch does; else a new venv .venv-gpu with the default (CUDA) torch from PyPI (first run only,
# not counted in the 8 minutes). MNIST comes from `dptrain data fetch mnist` (offline-capable).
# Never part of CI: it needs a GPU.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
START_S=$(date +%s)
DATE_UTC=$(date -u +%Y-%m-%dT%H:%M:%SZ)
COMMAND="$0 $*"
RESULTS_DIR="${GPU_CHECK_RESULTS:-$ROOT/benchmarks/results}"
WORK="${GPU_CHECK_WORK:-}"
DATA="${DPTRAIN_DATA:-$ROOT/data}"

say() { printf 'gpu_check: %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 2; }

sees_cuda() {  # $1: a python; true when its torch imports and sees a GPU
    [ -x "$1" ] || command -v "$1" >/dev/null 2>&1 || return 1
    timeout 120 "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
        >/dev/null 2>&1
}

# ------------------------------------------------------------------ python with CUDA
if [ -n "${PYTHON:-}" ]; then
    PY="$PYTHON"
    sees_cuda "$PY" || die "no CUDA GPU is visible to torch in $PY (torch.cuda.is_available() is False, or torch does not import); run this on a machine with an NVIDIA GPU and a CUDA build of torch, or point PYTHON at one"
elif sees_cuda "$ROOT/.venv/bin/python"; then
    PY="$ROOT/.venv/bin/python"
elif sees_cuda python3 && timeout 60 python3 -c 'import dptrain' >/dev/null 2>&1; then
    PY="$(command -v python3)"
else
    if ! command -v nvidia-smi >/dev/null 2>&1 || ! timeout 30 nvidia-smi -L >/dev/null 2>&1; then
        die "no CUDA GPU is visible (nvidia-smi finds none, and no Python here has a torch that sees one); run this on a machine with an NVIDIA GPU"
    fi
    say "creating .venv-gpu with a CUDA build of torch (first run only)"
    VENV="$ROOT/.venv-gpu"
    [ -x "$VENV/bin/python" ] || timeout 300 python3 -m venv "$VENV" || die "cannot create $VENV"
    timeout 1200 "$VENV/bin/python" -m pip install -q --disable-pip-version-check torch numpy \
        || die "pip could not install torch into $VENV"
    timeout 300 "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT" \
        || die "pip could not install dptrain into $VENV"
    PY="$VENV/bin/python"
    sees_cuda "$PY" || die "the torch installed into $VENV does not see the GPU (driver too old for its CUDA build?)"
fi
NGPU=$(timeout 60 "$PY" -c 'import torch; print(torch.cuda.device_count())') \
    || die "cannot count the GPUs with $PY"
[ -n "$WORK" ] || WORK=$(mktemp -d -t dptrain-gpu-check.XXXXXX) || die "cannot create a work dir"
say "python $PY, $NGPU GPU(s), work dir $WORK"
mkdir -p "$WORK" "$RESULTS_DIR" || die "cannot create $WORK or $RESULTS_DIR"
DPT=("$PY" -m dptrain)
export DPTRAIN_DATA="$DATA"

# ------------------------------------------------------------------ steps
STEPS_FILE="$WORK/steps.tsv"
: > "$STEPS_FILE"
FAILED=0
step() {  # step NAME TIMEOUT_S CMD...: run under timeout, log to $WORK/NAME.log, record
    local name=$1 limit=$2
    shift 2
    local t0 t1 rc status
    say "$name: $*"
    t0=$(date +%s.%N)
    timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    case $rc in
        0) status=ok ;;
        124 | 137) status="timed out after ${limit} s" ; FAILED=1 ;;
        *) status="failed (exit $rc)" ; FAILED=1 ;;
    esac
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(awk "BEGIN { print $t1 - $t0 }")" "$*" \
        >> "$STEPS_FILE"
    say "$name: $status"
    return $rc
}

step fetch 120 "${DPT[@]}" data fetch mnist --root "$DATA"

NPROCS=1
[ "$NGPU" -gt 1 ] && NPROCS="1,$NGPU"
step bench 210 "${DPT[@]}" bench --device cuda --strategies single,dp,ddp --nproc "$NPROCS" \
    --model convnet --batch-size 64 --steps 100 --warmup 10 --repeats 2 --baseline-steps 0 \
    --no-roofline --no-plots --data-root "$DATA" --out "$WORK/bench"

for prec in 16 bf16; do
    step "precision-$prec" 60 "${DPT[@]}" train --device cuda --nproc 1 --model convnet \
        --precision "$prec" --epochs 1 --batch-size 128 --lr 0.05 --log-every 100 --quiet \
        --data-root "$DATA" --out "$WORK/precision-$prec"
done

step recipe 60 "${DPT[@]}" train --recipe mnist-fast --device cuda --nproc 1 --quiet \
    --data-root "$DATA" --out "$WORK/recipe"

# resume after kill -9: a 2-epoch run checkpointing every 100 steps, killed (the whole process
# group: launcher and workers) once its first checkpoint exists, then resumed on the GPU
RESUME=(train --device cuda --nproc 1 --model convnet --epochs 2 --batch-size 64 --lr 0.05
        --ckpt-every 100 --log-every 100 --seed 0 --data-root "$DATA" --out "$WORK/resume")
say "resume: start, kill -9 after the first checkpoint"
setsid timeout 90 "${DPT[@]}" "${RESUME[@]}" > "$WORK/resume-killed.log" 2>&1 &
VICTIM=$!
for _ in $(seq 1 600); do
    [ -f "$WORK/resume/checkpoints/last.pt" ] && break
    kill -0 "$VICTIM" 2>/dev/null || break
    sleep 0.1
done
sleep 1  # past the checkpoint, mid-way to the next one
KILLED_AT=$(date +%s.%N)
kill -9 -- "-$VICTIM" 2>/dev/null || kill -9 "$VICTIM" 2>/dev/null
wait "$VICTIM" 2>/dev/null
KILL_RC=$?
printf '%s\t%s\t%s\t%s\t%s\n' "resume-killed" "killed with SIGKILL" "$KILL_RC" "0" \
    "kill -9 at $KILLED_AT" >> "$STEPS_FILE"
cp "$WORK/resume/checkpoints/last.pt" "$WORK/killed-last.pt" 2>/dev/null
step resume 90 "${DPT[@]}" "${RESUME[@]}" --resume auto

# ------------------------------------------------------------------ one results file
HOST=$(hostname -s 2>/dev/null || echo host)
OUT_FILE="$RESULTS_DIR/gpu_check-$HOST-$(date -u +%Y%m%d-%H%M%S).json"
NVSMI=$(timeout 30 nvidia-smi --query-gpu=index,name,memory.total,driver_version \
        --format=csv,noheader 2>/dev/null || true)
GIT=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
timeout 120 "$PY" - "$WORK" "$OUT_FILE" "$DATE_UTC" "$COMMAND" "$START_S" "$NVSMI" "$GIT" \
    <<'PYEOF' || { echo "error: could not write the results file" >&2; exit 1; }
import json, os, platform, sys, time
from pathlib import Path

work, out_file, date, command, start_s, nvsmi, git = sys.argv[1:8]
work = Path(work)


def load(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


steps = []
for line in (work / "steps.tsv").read_text().splitlines():
    name, status, rc, seconds, cmd = line.split("\t", 4)
    steps.append({"name": name, "status": status, "exit_code": int(rc),
                  "seconds": float(seconds or 0), "command": cmd})

import torch  # noqa: E402

def nccl_version():
    try:
        v = torch.cuda.nccl.version()
        return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    except Exception as exc:  # no NCCL in this build
        return f"unavailable ({type(exc).__name__})"


machine = {
    "date": date, "command": command, "git_commit": git, "hostname": platform.node(),
    "platform": platform.platform(), "python": platform.python_version(),
    "torch": torch.__version__, "cuda": torch.version.cuda,
    "cudnn": torch.backends.cudnn.version(), "nccl": nccl_version(),
    "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    "nvidia_smi": nvsmi.splitlines(), "cpu_count": os.cpu_count(),
}
try:
    from dptrain import __version__ as dptrain_version
    from dptrain import hardware
    machine["dptrain"] = dptrain_version
    machine["cpu"] = hardware.cpu_info().to_dict()
except Exception as exc:  # the record still stands without it
    machine["dptrain"] = f"unknown ({exc})"

bench = load(work / "bench" / "results.json")
bench_rows = []
if bench:
    for c in bench["configurations"]:
        s = c.get("summary") or {}
        mem = [m for m in s.get("memory", []) if m.get("peak_bytes")]
        peaks = [m["peak_bytes"] for m in mem]
        bench_rows.append({
            "name": c["name"], "status": c["status"], "reason": c["reason"],
            "samples_per_s": (s.get("samples_per_s") or {}).get("mean"),
            "samples_per_s_std": (s.get("samples_per_s") or {}).get("std"),
            "efficiency": (s.get("efficiency") or {}).get("mean"),
            "backend": s.get("backend"),
            "per_gpu_peak_mib": {m["device"]: round(m["peak_bytes"] / 2**20, 1) for m in mem},
            "gpu0_imbalance_max_over_min": max(peaks) / min(peaks) if len(peaks) > 1 else None,
        })

runs = {}
for name in ("precision-16", "precision-bf16", "recipe", "resume"):
    summary = load(work / name / "summary.json")
    if summary:
        runs[name] = {k: summary.get(k) for k in (
            "test_accuracy", "train_samples_per_s", "train_time_s", "wall_time_s", "steps",
            "epochs", "device", "precision", "world_size", "strategy", "backend")}
resume = {}
try:
    ck = torch.load(work / "killed-last.pt", weights_only=True, map_location="cpu")
    resume["checkpoint_at_kill"] = ck.get("position")
except Exception as exc:
    resume["checkpoint_at_kill"] = f"none ({type(exc).__name__})"
resume["resumed_log_tail"] = (work / "resume.log").read_text()[-1500:] \
    if (work / "resume.log").exists() else None
resume["resumed_summary"] = runs.get("resume")

doc = {
    "schema": "dptrain-gpu-check/1", "machine": machine, "steps": steps,
    "total_seconds": time.time() - float(start_s),
    "bench": {"configurations": bench_rows,
              "options": bench.get("options") if bench else None},
    "precision_runs": {"fp16_gradscaler": runs.get("precision-16"),
                       "bf16": runs.get("precision-bf16")},
    "recipe_mnist_fast": runs.get("recipe"),
    "resume_after_kill9": resume,
    "note": "fresh processes per run; bench figures are mean +- std over 2 repeats; "
            "train_time_s is the training loop alone (summary.json), wall_time_s the whole run",
}
Path(out_file).write_text(json.dumps(doc, indent=1, default=str) + "\n")
print(out_file)
PYEOF
say "wrote $OUT_FILE in $(( $(date +%s) - START_S )) s (logs in $WORK)"
exit $FAILED
