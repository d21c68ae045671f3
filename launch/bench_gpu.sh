#!/usr/bin/env bash
# The one-GPU figures of BENCHMARKS.md: the Wan2.1-T2V-1.3B architecture (random weights, bf16 compute,
# fp32 master weights, LoRA rank 32) at 33x480x832 and 81x480x832 pixels, one DPO pair per step.
#
#   OUT=bench_gpu launch/bench_gpu.sh        # from the repository root, halo_jax importable
#
# Order: a tiny smoke run first (stops the script if the stack does not run), then the figures that
# matter most first (the DPO steps at 33 frames, then at 81 frames with SFT, then SFT and sampling at
# 33 frames, the remat=full rows at 33 frames, the unrolled layout), each in its own process under its
# own `timeout` (LIMIT seconds, default 240), so a slow compile costs one row, not the rest; a row that
# would start after DEADLINE seconds (default 3600) is skipped. Most rows scan the blocks (one compiled
# block body: ~15 s of compile against ~90 s for 30 unrolled blocks). The 81-frame rows use remat=full:
# with dots_with_no_batch_dims_saveable the Gran-DPO step asks for a 147 GiB buffer (H200, 2026-12-04).
# Everything lands in $OUT: log.txt, gpu.txt, one JSON per process (at most 8 files: the device
# tool's limit).
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
    if ((secs < 45)); then
        echo "== $name skipped: ${secs}s is too little (LIMIT, DEADLINE)" | tee -a "$LOG"
        return 1
    fi
    echo "== $name ($(date -u +%H:%M:%S) UTC)" | tee -a "$LOG"
    timeout "$secs" $PY -m halo_jax.bench "$@" --out="$OUT/$name.json" 2>&1 | grep -v "^[IW][0-9]" | tee -a "$LOG"
    return "${PIPESTATUS[0]}"
}

# The layout is named on every row, so the rows do not move with the config's defaults.
WAN=(--config=configs/bench_wan2_1_1_3b.py)
SCAN_DOTS=(--config.model.fields.scan_layers=True --config.model.fields.remat=dots_with_no_batch_dims_saveable)
SCAN_FULL=(--config.model.fields.scan_layers=True --config.model.fields.remat=full)
F81=(--config.video.frames=81 --config.steps=3 --config.warmup=1)
run tiny 120 --config=configs/bench_tiny.py --config.kinds=gran_dpo --config.steps=3 --config.warmup=1 || exit 1
run dpo_33f "$LIMIT" "${WAN[@]}" "${SCAN_DOTS[@]}" --config.kinds=gran_dpo,diffusion_dpo --config.steps=6 \
    --config.warmup=2
run remat_full_81f "$LIMIT" "${WAN[@]}" "${SCAN_FULL[@]}" "${F81[@]}" --config.kinds=sft,diffusion_dpo,gran_dpo
run sft_33f "$LIMIT" "${WAN[@]}" "${SCAN_DOTS[@]}" --config.kinds=sft,sample --config.steps=6 --config.warmup=2
run remat_full_33f "$LIMIT" "${WAN[@]}" "${SCAN_FULL[@]}" --config.kinds=sft,gran_dpo --config.steps=6 \
    --config.warmup=2
run gran_33f_unrolled "$LIMIT" "${WAN[@]}" --config.model.fields.scan_layers=False \
    --config.model.fields.remat=dots_with_no_batch_dims_saveable --config.kinds=gran_dpo --config.steps=6 \
    --config.warmup=2
echo "== done ($(date -u +%H:%M:%S) UTC)" | tee -a "$LOG"
