#!/usr/bin/env bash
# The one prepared device run (issue 5): CUDA parity in fp32 and bf16, flash-attn against
# SDPA where flash-attn imports, the shm data path (pinned arenas, event fences; issue 10)
# against the in-process run, and stage0..3 on the LLaMA-3.2-1B shape (prefill-1024 and
# 128 decode steps) next to the monolithic model. From a session with a lent GPU:
#   bash scripts/gpu_wheels.sh        # here, once: wheels the device image lacks -> .whl/
#   device run: command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540
# What comes back under $OUT: gpu.log, parity.log, prefill.md/csv, bench.md/csv.
# Dry run on a CPU: DEVICE=cpu MODEL=tiny PROMPT=64 STEPS=8 OUT=/tmp/gc bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/tsqp-gpu-check}; mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda}; MODEL=${MODEL:-llama-3.2-1b}; PROMPT=${PROMPT:-1024}; STEPS=${STEPS:-128}
THREADS=${THREADS:-4}
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TSQP_CACHE=${TSQP_CACHE:-/tmp/tsqp-cache}
exec > >(tee "$OUT/gpu.log") 2>&1
step() { echo; echo "=== $(date +%T) $*"; }

if [ -d .whl ] && [ -n "$(ls .whl 2>/dev/null)" ]; then
    step "installing carried wheels"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl || exit 1
fi
step "installing tsqp (editable, offline)"
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . \
    $(for p in plugins/*/pyproject.toml; do printf -- "-e %s " "$(dirname "$p")"; done) || exit 1
nvidia-smi -L 2>/dev/null; python3 -m tsqp_core plugins
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '', 'transformers', transformers.__version__)"

step "parity: GPU tests (fp32, bf16, flash vs sdpa; pinned arenas and event fences over shm)"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_executor_parity.py \
    tests/test_gpu_data_path.py 2>&1 | tee "$OUT/parity.log" | tail -5

common=(model=$MODEL device=$DEVICE threads.tee=$THREADS threads.gpu=$THREADS
        server.timeout_s=300 hydra/launcher=basic)
step "stage sweep: prefill-$PROMPT with reference"
python3 -m tsqp_core run -m 'stage=glob(*)' "${common[@]}" workload=prefill \
    workload.prompt_tokens=$PROMPT workload.warmup=1 workload.repeats=3 reference=true \
    hydra.sweep.dir=/tmp/tsqp-sweep-prefill
cp /tmp/tsqp-sweep-prefill/summary.md "$OUT/prefill.md"; cp /tmp/tsqp-sweep-prefill/summary.csv "$OUT/prefill.csv"

step "stage3 prefill-$PROMPT with the shm arenas pageable (server.pin_memory=false), beside the sweep's pinned one"
python3 -m tsqp_core run stage=stage3 "${common[@]}" workload=prefill server.pin_memory=false \
    workload.prompt_tokens=$PROMPT workload.warmup=1 workload.repeats=3 \
    hydra.run.dir=/tmp/tsqp-prefill-pageable 2>&1 | grep -E "bench|breakdown|latency"

step "stage sweep: bench, prefill-$PROMPT + $STEPS decode steps"
python3 -m tsqp_core run -m 'stage=glob(*)' "${common[@]}" workload=bench \
    workload.prompt_tokens=$PROMPT workload.new_tokens=$STEPS workload.warmup=1 workload.repeats=3 \
    hydra.sweep.dir=/tmp/tsqp-sweep-bench
cp /tmp/tsqp-sweep-bench/summary.md "$OUT/bench.md"; cp /tmp/tsqp-sweep-bench/summary.csv "$OUT/bench.csv"
step "done"
