#!/usr/bin/env bash
# The one-GPU figures of BENCHMARKS.md: the Wan2.1-T2V-1.3B architecture (random weights, bf16 compute,
# fp32 master weights, LoRA rank 32) at 33x480x832 and 81x480x832 pixels, one DPO pair per step.
#
#   OUT=bench_gpu launch/bench_gpu.sh        # from the repository root, halo_jax importable
#
# Order: a tiny smoke run first (stops the script if the stack does not run), then the figures that
# matter most first (Gran-DPO and Diffusion-DPO at 33 frames, Gran-DPO at 81 frames, then SFT and
# sampling), each in its own process under its own `timeout` (LIMIT seconds, default 240), so a slow
# compile costs one row, not the rest; a row that would start after DEADLINE seconds (default 3600) is
# skipped. Blocks run under `scan_layers=True` (one compiled block body: minutes less compile than 30
# unrolled blocks); the last row times the unrolled layout of the config as it is. Everything lands in
# $OUT: log.txt, gpu.txt, one JSON per process.
set -u
OUT=${OUT:-bench_gpu}
PY=${PYTHON:-python3}
LIMIT=${LIMIT:-240}
DEADLINE=${DEADLINE:-3600}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
LOG="$OUT/log.txt"

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
$PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax',
optax.__version__, jax.devices())" 2>&1 | tee -a "$LOG"

run() {  # run NAME SECONDS ARGS...: one benchmark process, its JSON at $OUT/NAME.json
    local name=$1 secs=$2
    shift 2
    if ((DEADLINE - SECONDS < secs)); then secs=$((DEADLINE - SECONDS)); fi
    if ((secs < 45)); then echo "== $name skipped: ${secs}s left before DEADLINE" | tee -a "$LOG"; return 1; fi
    echo "== $name ($(date -u +%H:%M:%S) UTC)" | tee -a "$LOG"
    timeout "$secs" $PY -m halo_jax.bench "$@" --out="$OUT/$name.json" 2>&1 | grep -v "^[IW][0-9]" | tee -a "$LOG"
    return "${PIPESTATUS[0]}"
}

WAN=(--config=configs/bench_wan2_1_1_3b.py --config.model.fields.scan_layers=True)
run tiny 120 --config=configs/bench_tiny.py --config.kinds=gran_dpo --config.steps=3 --config.warmup=1 || exit 1
run dpo_33f "$LIMIT" "${WAN[@]}" --config.kinds=gran_dpo,diffusion_dpo --config.steps=6 --config.warmup=2
run gran_81f "$LIMIT" "${WAN[@]}" --config.video.frames=81 --config.kinds=gran_dpo --config.steps=3 \
    --config.warmup=1 ||
    run gran_81f_remat_full "$LIMIT" "${WAN[@]}" --config.video.frames=81 --config.model.fields.remat=full \
        --config.kinds=gran_dpo --config.steps=3 --config.warmup=1
run sft_33f "$LIMIT" "${WAN[@]}" --config.kinds=sft,sample --config.steps=6 --config.warmup=2
run gran_33f_unrolled "$LIMIT" --config=configs/bench_wan2_1_1_3b.py --config.kinds=gran_dpo --config.steps=6 \
    --config.warmup=2
echo "== done ($(date -u +%H:%M:%S) UTC)" | tee -a "$LOG"
