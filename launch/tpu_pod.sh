#!/usr/bin/env bash
# Run halo_jax on every worker of a Cloud TPU VM slice (one process per worker host).
#
#   launch/tpu_pod.sh --name=NAME --zone=ZONE [options] -- --config=configs/X.py --workdir=DIR [--config.a.b=v ...]
#
# Steps (each printed before it runs; --dry-run prints them and runs nothing):
#   1. --create: gcloud compute tpus tpu-vm create NAME (--type, --version)
#   2. code on every worker: --repo=URL clones it (--branch), else this checkout is packed (git ls-files)
#      and copied with `tpu-vm scp --worker=all`
#   3. install on every worker: pip install "jax[tpu]==<version>" and the package (pip install -e .)
#   4. --setup='CMD': run CMD on every worker (e.g. mount the shared workdir: gcsfuse / NFS)
#   5. run `python3 -m halo_jax.main ARGS` on all workers at once (--worker=all). Each worker exports
#      TPU_WORKER_ID and TPU_WORKER_HOSTNAMES from the VM metadata, so halo_jax.main calls
#      jax.distributed.initialize() (no coordinator to configure on TPU: JAX finds it from the metadata).
#      Logs: ~/halo_jax_run.log on each worker.
#   6. --results=LOCAL_DIR: copy WORKDIR from worker 0 to LOCAL_DIR (tpu-vm scp --recurse)
#   7. --delete: delete the slice
#
# WORKDIR must be one path that every worker sees (a gcsfuse-mounted bucket or an NFS/Filestore mount)
# on a multi-host slice; a single-host slice (v5e-8, v6e-8, v4-8) may use a local path.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_pod.sh --name=NAME --zone=ZONE [options] -- --config=configs/X.py --workdir=DIR [overrides]

options:
  --name=NAME         TPU VM (slice) name                                     (required)
  --zone=ZONE         e.g. us-east5-a                                         (required)
  --project=PROJECT   GCP project (default: gcloud's configured project)
  --create            create the slice first; needs --type and --version
  --type=TYPE         accelerator type, e.g. v5p-32, v6e-16, v4-32
  --version=VERSION   TPU VM runtime, e.g. v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e), tpu-ubuntu2204-base (v4)
  --spot              create a spot slice
  --repo=URL          git URL to clone on the workers (default: copy this checkout)
  --branch=BRANCH     branch or tag for --repo (default: main)
  --jax=SPEC          pip requirement for JAX (default: jax[tpu]==<this machine's jax version, else latest>)
  --no-install        skip step 3 (workers already set up)
  --setup=CMD         shell command run on every worker before the job (mounts, env files)
  --env=KEY=VALUE     extra environment for the job on every worker (repeatable)
  --results=DIR       copy WORKDIR from worker 0 into local DIR after the run
  --delete            delete the slice at the end (also after a failed run)
  --dry-run           print every command, run none
  -h, --help          this help

example (Gran-DPO of Wan2.1-T2V-1.3B on a v5p-32, workdir on a gcsfuse mount):
  launch/tpu_pod.sh --name=halo --zone=us-east5-a --create --type=v5p-32 --version=v2-alpha-tpuv5 \
    --setup='mkdir -p ~/bucket && gcsfuse --implicit-dirs my-bucket ~/bucket' --delete -- \
    --config=configs/wan2_1_t2v_1_3b_dpo.py --workdir=/home/$USER/bucket/wan13b \
    --config.model.path=/home/$USER/bucket/Wan2.1-T2V-1.3B-Diffusers
EOF
}

NAME="" ZONE="" PROJECT="" TYPE="" VERSION="" REPO="" BRANCH="main" JAX_SPEC="" SETUP="" RESULTS=""
CREATE=0 DELETE=0 DRY=0 INSTALL=1 SPOT=0
ENVS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --type=*) TYPE="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --repo=*) REPO="${1#*=}" ;;
    --branch=*) BRANCH="${1#*=}" ;;
    --jax=*) JAX_SPEC="${1#*=}" ;;
    --setup=*) SETUP="${1#*=}" ;;
    --env=*) ENVS+=("${1#*=}") ;;
    --results=*) RESULTS="${1#*=}" ;;
    --create) CREATE=1 ;;
    --delete) DELETE=1 ;;
    --spot) SPOT=1 ;;
    --no-install) INSTALL=0 ;;
    --dry-run) DRY=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "$0: unknown option $1 (options come before --, halo_jax.main's arguments after it); see -h" >&2; exit 2 ;;
  esac
  shift
done
ARGS=("$@")
[[ -n "$NAME" && -n "$ZONE" ]] || { echo "$0: --name and --zone are required; see -h" >&2; exit 2; }
if [[ $CREATE == 1 && ( -z "$TYPE" || -z "$VERSION" ) ]]; then
  echo "$0: --create needs --type=ACCELERATOR_TYPE and --version=RUNTIME_VERSION; see -h" >&2; exit 2
fi
WORKDIR=""
HAS_CONFIG=0
for a in "${ARGS[@]}"; do
  [[ "$a" == --workdir=* ]] && WORKDIR="${a#--workdir=}"
  [[ "$a" == --config=* ]] && HAS_CONFIG=1
done
[[ -n "$WORKDIR" && $HAS_CONFIG == 1 ]] || {
  echo "$0: after -- give halo_jax.main's --config=configs/X.py and --workdir=DIR (a path every worker sees)" >&2; exit 2; }
if [[ "$WORKDIR" == gs://* ]]; then
  echo "$0: --workdir=$WORKDIR: halo_jax writes its stores with local file I/O; mount the bucket (gcsfuse, see --setup) and pass the mount path" >&2
  exit 2
fi
if [[ -z "$JAX_SPEC" ]]; then
  v="$(python3 -c 'import jax; print(jax.__version__)' 2>/dev/null || true)"
  JAX_SPEC="jax[tpu]${v:+==$v}"
fi

GC=(gcloud compute tpus tpu-vm)
LOC=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && LOC+=(--project="$PROJECT")

quote() {  # one word as a shell reads it back: bare when safe, else in single quotes
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
run() {  # print a command (shell-quoted), then run it unless --dry-run
  printf '+'; for w in "$@"; do printf ' '; quote "$w"; done; printf '\n'
  [[ $DRY == 1 ]] || "$@"
}
on_all() {  # run a shell command on every worker
  run "${GC[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="$1"
}

cleanup() {
  local status=$?
  if [[ $DELETE == 1 ]]; then run "${GC[@]}" delete "$NAME" "${LOC[@]}" --quiet || true; fi
  exit $status
}
trap cleanup EXIT

# 1. create
if [[ $CREATE == 1 ]]; then
  create=("${GC[@]}" create "$NAME" "${LOC[@]}" --accelerator-type="$TYPE" --version="$VERSION")
  [[ $SPOT == 1 ]] && create+=(--spot)
  run "${create[@]}"
fi

# 2. code
if [[ -n "$REPO" ]]; then
  on_all "rm -rf ~/halo_jax && git clone --depth 1 --branch $(printf '%q' "$BRANCH") $(printf '%q' "$REPO") ~/halo_jax"
else
  ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  TARBALL="${TMPDIR:-/tmp}/halo_jax_src_$$.tgz"
  printf '+ (cd %q && git ls-files -z | tar czf %q --null -T -)\n' "$ROOT" "$TARBALL"
  [[ $DRY == 1 ]] || (cd "$ROOT" && git ls-files -z | tar czf "$TARBALL" --null -T -)
  run "${GC[@]}" scp "$TARBALL" "$NAME:halo_jax_src.tgz" "${LOC[@]}" --worker=all
  on_all "rm -rf ~/halo_jax && mkdir -p ~/halo_jax && tar xzf ~/halo_jax_src.tgz -C ~/halo_jax"
fi

# 3. install
if [[ $INSTALL == 1 ]]; then
  on_all "cd ~/halo_jax && python3 -m pip install -q -U $(printf '%q' "$JAX_SPEC") && python3 -m pip install -q -e ."
fi

# 4. setup
[[ -z "$SETUP" ]] || on_all "$SETUP"

# 5. run on every worker
MD='http://metadata.google.internal/computeMetadata/v1/instance/attributes'
worker_env="export TPU_WORKER_ID=\$(curl -sf -H Metadata-Flavor:Google $MD/agent-worker-number);"
worker_env+=" export TPU_WORKER_HOSTNAMES=\$(curl -sf -H Metadata-Flavor:Google $MD/worker-network-endpoints"
worker_env+=" | tr , '\\n' | awk -F: '{print (NF==3) ? \$3 : \$1}' | paste -sd, -);"
extra=""
for kv in "${ENVS[@]+"${ENVS[@]}"}"; do extra+=" export $(printf '%q' "$kv");"; done
cmd="cd ~/halo_jax && $worker_env$extra python3 -m halo_jax.main"
for a in "${ARGS[@]}"; do cmd+=" $(printf '%q' "$a")"; done
cmd+=" 2>&1 | tee ~/halo_jax_run.log; exit \${PIPESTATUS[0]}"
on_all "$cmd"

# 6. results
if [[ -n "$RESULTS" ]]; then
  [[ $DRY == 1 ]] || mkdir -p "$RESULTS"
  run "${GC[@]}" scp --recurse "$NAME:$WORKDIR" "$RESULTS" "${LOC[@]}" --worker=0
fi
