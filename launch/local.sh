#!/usr/bin/env bash
# Run halo_jax as N processes on this machine (127.0.0.1), each with its own share of the CPU devices.
#
#   launch/local.sh N DEVICES_PER_PROCESS --config=configs/X.py --workdir=DIR [--config.a.b=value ...]
#
# Each process gets JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, which
# halo_jax.main turns into jax.distributed.initialize() (gloo collectives on CPU).
# XLA_FLAGS from the environment are kept (the device count is added last, so it wins).
# Logs go to DIR/logs/process_K.log; the script waits for every process and fails if any fails.
# When one process fails the others are stopped (TERM, then KILL after GRACE seconds, default 10):
# they would otherwise wait at the next barrier or collective until the runtime's timeout.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS --config=... --workdir=... [overrides]" >&2
  exit 2
fi
NUM="$1"; DEVICES="$2"; shift 2
WORKDIR=""
for arg in "$@"; do [[ "$arg" == --workdir=* ]] && WORKDIR="${arg#--workdir=}"; done
[[ -n "$WORKDIR" ]] || { echo "$0: --workdir=DIR is required" >&2; exit 2; }
mkdir -p "$WORKDIR/logs"
PORT="${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}"
PY="${PYTHON:-python}"
pids=()
for ((i = 0; i < NUM; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$DEVICES" \
  JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT" JAX_NUM_PROCESSES="$NUM" JAX_PROCESS_ID="$i" \
    "$PY" -m halo_jax.main "$@" > "$WORKDIR/logs/process_$i.log" 2>&1 &
  pids+=($!)
done
stop_all() {
  kill -TERM "${pids[@]}" 2>/dev/null || true
  for ((t = 0; t < ${GRACE:-10} * 2; t++)); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.5
  done
  kill -KILL "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap 'stop_all; exit 130' INT TERM
left=("${pids[@]}")
while ((${#left[@]})); do
  code=0
  finished=""
  wait -n -p finished "${left[@]}" || code=$?  # bash >= 5.1
  [[ -n "$finished" ]] || break
  rest=()
  for pid in "${left[@]}"; do [[ "$pid" == "$finished" ]] || rest+=("$pid"); done
  left=("${rest[@]}")
  if ((code != 0)); then
    for i in "${!pids[@]}"; do [[ "${pids[$i]}" == "$finished" ]] && rank=$i; done
    echo "process $rank failed (exit status $code); stopping the others; see $WORKDIR/logs/process_$rank.log" >&2
    stop_all
    exit 1
  fi
done
exit 0
