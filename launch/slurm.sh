#!/usr/bin/env bash
#SBATCH --job-name=halo_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
# halo_jax on a SLURM GPU cluster: `srun` starts the processes, JAX's distributed runtime joins them.
#
#   sbatch [--nodes=N --ntasks-per-node=G --gpus-per-node=G] launch/slurm.sh \
#       --config=configs/X.py --workdir=/shared/DIR [--config.a.b=value ...]
#   bash launch/slurm.sh --dry-run --config=... --workdir=...   # inside an allocation (or with fake SLURM_*
#                                                                # variables): print each process's command
#
# Processes: one per GPU (--ntasks-per-node = GPUs per node; each task sees one GPU: Slurm's per-task GPU
# binding, or else CUDA_VISIBLE_DEVICES = the task's SLURM_LOCALID-th GPU of the node) or one per node
# (--ntasks-per-node=1: the process drives every GPU of its node). Each gets
#   --config.distributed.coordinator_address = <first host of `scontrol show hostnames $SLURM_JOB_NODELIST`>:PORT
#   --config.distributed.num_processes       = $SLURM_NTASKS
#   --config.distributed.process_id          = $SLURM_PROCID
# which halo_jax.main turns into jax.distributed.initialize(). WORKDIR must be on a filesystem every node
# sees. Environment: HALO_PORT (default 12000 + job id mod 20000), PYTHON (default python), HALO_SETUP
# (a command run first, e.g. "source .venv/bin/activate" or "module load cuda"), SRUN_ARGS (extra srun flags).
set -euo pipefail

usage() { sed -n '9,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

DRY=0
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then usage; exit 0; fi
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
ARGS=("$@")
HAS_CONFIG=0 HAS_WORKDIR=0
for a in "${ARGS[@]+"${ARGS[@]}"}"; do
  [[ "$a" == --config=* ]] && HAS_CONFIG=1
  [[ "$a" == --workdir=* ]] && HAS_WORKDIR=1
  if [[ "$a" == --config.distributed.* ]]; then
    echo "$0: $a: the launcher sets --config.distributed.* itself (from SLURM_*); drop it" >&2; exit 2
  fi
done
[[ $HAS_CONFIG == 1 && $HAS_WORKDIR == 1 ]] || {
  echo "$0: give halo_jax.main's --config=configs/X.py and --workdir=DIR (on a filesystem every node sees); see -h" >&2
  exit 2; }
for v in SLURM_JOB_ID SLURM_JOB_NODELIST SLURM_NTASKS; do
  [[ -n "${!v:-}" ]] || { echo "$0: $v is not set: submit with sbatch (or run inside salloc)" >&2; exit 2; }
done

[[ -z "${HALO_SETUP:-}" ]] || eval "$HALO_SETUP"
mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
[[ ${#HOSTS[@]} -gt 0 ]] || { echo "$0: scontrol listed no hosts for $SLURM_JOB_NODELIST" >&2; exit 1; }
PORT="${HALO_PORT:-$((12000 + SLURM_JOB_ID % 20000))}"
COORD="${HOSTS[0]}:$PORT"
NTASKS="$SLURM_NTASKS"
PER_NODE="${SLURM_NTASKS_PER_NODE:-$(( (NTASKS + ${#HOSTS[@]} - 1) / ${#HOSTS[@]} ))}"
PER_NODE="${PER_NODE%%(*}"   # "8(x2)" -> "8"
PY="${PYTHON:-python}"
MAIN=("$PY" -m halo_jax.main "${ARGS[@]}"
      "--config.distributed.coordinator_address=$COORD" "--config.distributed.num_processes=$NTASKS")

# One task: pick its GPU when several tasks share a node that shows each task all its GPUs, then run
# halo_jax.main with this task's process id. "$@" = MAIN.
TASK='
if [[ "${HALO_PER_NODE}" -gt 1 && -n "${CUDA_VISIBLE_DEVICES:-}" && "${CUDA_VISIBLE_DEVICES}" == *,* ]]; then
  IFS=, read -ra gpus <<< "${CUDA_VISIBLE_DEVICES}"
  export CUDA_VISIBLE_DEVICES="${gpus[$SLURM_LOCALID]}"
elif [[ "${HALO_PER_NODE}" -gt 1 && -z "${CUDA_VISIBLE_DEVICES:-}" ]]; then
  export CUDA_VISIBLE_DEVICES="$SLURM_LOCALID"
fi
exec "$@" "--config.distributed.process_id=$SLURM_PROCID"
'

echo "halo_jax: ${#HOSTS[@]} node(s) ${HOSTS[*]}, $NTASKS process(es) ($PER_NODE per node), coordinator $COORD"
if [[ $DRY == 1 ]]; then
  for ((rank = 0; rank < NTASKS; rank++)); do
    node="${HOSTS[$((rank / PER_NODE))]:-?}"
    local_id=$((rank % PER_NODE))
    gpu="all"
    [[ $PER_NODE -gt 1 ]] && gpu="$local_id"
    printf 'process %d on %s (local %d, gpu %s):' "$rank" "$node" "$local_id" "$gpu"
    printf ' %q' "${MAIN[@]}" "--config.distributed.process_id=$rank"
    printf '\n'
  done
  exit 0
fi
# shellcheck disable=SC2086
exec srun --kill-on-bad-exit=1 ${SRUN_ARGS:-} env HALO_PER_NODE="$PER_NODE" bash -c "$TASK" halo_task "${MAIN[@]}"
