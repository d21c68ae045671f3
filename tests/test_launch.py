"""The launchers: `bash -n` syntax, usage errors, and the commands they would run (dry runs; a fake
`scontrol`, `srun` and Python on PATH for SLURM). No gcloud or Slurm is needed or touched."""

import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("launch/local.sh", "launch/tpu_pod.sh", "launch/slurm.sh")
MAIN_ARGS = ["--config=configs/wan2_1_t2v_1_3b_dpo.py", "--workdir=/shared/run", "--config.model.path=/data/wan 1.3b"]


def _sh(*args, env=None, check=True):
    proc = subprocess.run(["bash", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _exe(path: Path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("script", SCRIPTS)
def test_syntax(script):
    _sh("-n", script)


def test_tpu_pod_dry_run():
    out = _sh("launch/tpu_pod.sh", "--dry-run", "--name=halo", "--zone=us-east5-a", "--project=p1", "--create",
              "--type=v5p-32", "--version=v2-alpha-tpuv5", "--jax=jax[tpu]==0.10.2", "--env=FOO=1",
              "--results=/tmp/res", "--delete", "--", *MAIN_ARGS).stdout
    lines = [ln[2:] for ln in out.splitlines() if ln.startswith("+ ")]
    cmds = [shlex.split(ln) for ln in lines]
    assert cmds[0][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "halo"]
    assert "--accelerator-type=v5p-32" in cmds[0] and "--version=v2-alpha-tpuv5" in cmds[0]
    ssh = [c for c in cmds if c[4] == "ssh"]
    assert ssh and all("--worker=all" in c and "--zone=us-east5-a" in c and "--project=p1" in c for c in ssh)
    install = next(c[-1] for c in ssh if "pip install" in c[-1])
    assert "jax[tpu]==0.10.2" in install.replace("\\", "") and "pip install -q -e ." in install
    run = ssh[-1][-1].removeprefix("--command=")
    assert "TPU_WORKER_HOSTNAMES=" in run and "TPU_WORKER_ID=" in run and "export FOO=1" in run
    main = shlex.split(run.split("python3 -m halo_jax.main", 1)[1].split("2>&1")[0])
    assert main == MAIN_ARGS  # arguments survive the remote shell intact (the space included)
    assert cmds[-2][4] == "scp" and "--worker=0" in cmds[-2] and "halo:/shared/run" in cmds[-2]
    assert cmds[-1][4] == "delete"


def test_tpu_pod_usage_errors():
    assert "usage:" in _sh("launch/tpu_pod.sh", "-h").stdout
    bad = _sh("launch/tpu_pod.sh", "--dry-run", "--zone=z", "--", *MAIN_ARGS, check=False)
    assert bad.returncode == 2 and "--name" in bad.stderr
    bad = _sh("launch/tpu_pod.sh", "--dry-run", "--name=n", "--zone=z", "--create", "--", *MAIN_ARGS, check=False)
    assert bad.returncode == 2 and "--type" in bad.stderr
    bad = _sh("launch/tpu_pod.sh", "--dry-run", "--name=n", "--zone=z", "--", "--config=c.py", "--workdir=gs://b/r",
              check=False)
    assert bad.returncode == 2 and "gcsfuse" in bad.stderr


@pytest.fixture
def fake_slurm(tmp_path):
    """scontrol lists two hosts; srun runs its command once per task with SLURM_PROCID/SLURM_LOCALID set
    (2 tasks per node); 'python' prints its GPU and arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _exe(bin_dir / "scontrol", '[[ "$1 $2 $3" == "show hostnames gpu-a[17-18]" ]] || exit 3\necho gpu-a17\necho gpu-a18\n')
    _exe(bin_dir / "srun", 'while [[ "$1" == --* ]]; do shift; done\n'
                           'for r in $(seq 0 $((SLURM_NTASKS - 1))); do\n'
                           '  SLURM_PROCID=$r SLURM_LOCALID=$((r % 2)) "$@" || exit 1\ndone\n')
    _exe(bin_dir / "fakepy", 'echo "gpu=${CUDA_VISIBLE_DEVICES:-unset} $*"\n')
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-a[17-18]",
           "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2(x2)", "PYTHON": str(bin_dir / "fakepy")}
    return env


def test_slurm_dry_run(fake_slurm):
    out = _sh("launch/slurm.sh", "--dry-run", *MAIN_ARGS, env=fake_slurm).stdout.splitlines()
    assert "coordinator gpu-a17:16242" in out[0]  # first host, port 12000 + 4242
    procs = [ln for ln in out if ln.startswith("process ")]
    assert len(procs) == 4
    for rank, line in enumerate(procs):
        head, cmd = line.split(": ", 1)
        assert head.startswith(f"process {rank} on {'gpu-a17' if rank < 2 else 'gpu-a18'} (local {rank % 2}")
        args = shlex.split(cmd)
        assert args[1:3] == ["-m", "halo_jax.main"] and args[3:6] == MAIN_ARGS
        assert args[6:] == ["--config.distributed.coordinator_address=gpu-a17:16242",
                            "--config.distributed.num_processes=4", f"--config.distributed.process_id={rank}"]


def test_slurm_srun_path(fake_slurm):
    """The real (non-dry) path through a fake srun: each task gets its own GPU and process id."""
    out = _sh("launch/slurm.sh", *MAIN_ARGS, env={**fake_slurm, "HALO_PORT": "9999"}).stdout.splitlines()
    runs = [ln for ln in out if ln.startswith("gpu=")]
    assert len(runs) == 4
    for rank, line in enumerate(runs):
        assert line.startswith(f"gpu={rank % 2} -m halo_jax.main --config=configs/wan2_1_t2v_1_3b_dpo.py")
        assert "--config.distributed.coordinator_address=gpu-a17:9999" in line
        assert line.endswith(f"--config.distributed.num_processes=4 --config.distributed.process_id={rank}")
    # Slurm's own per-task binding (several GPUs listed) is narrowed to the task's local GPU.
    out = _sh("launch/slurm.sh", *MAIN_ARGS, env={**fake_slurm, "CUDA_VISIBLE_DEVICES": "4,5"}).stdout
    assert [ln.split()[0] for ln in out.splitlines() if ln.startswith("gpu=")] == ["gpu=4", "gpu=5", "gpu=4", "gpu=5"]


def test_slurm_errors(fake_slurm):
    env = {k: v for k, v in fake_slurm.items() if k != "SLURM_JOB_ID"}
    bad = _sh("launch/slurm.sh", *MAIN_ARGS, env={**env, "SLURM_JOB_ID": ""}, check=False)
    assert bad.returncode == 2 and "SLURM_JOB_ID" in bad.stderr
    bad = _sh("launch/slurm.sh", *MAIN_ARGS, "--config.distributed.process_id=3", env=fake_slurm, check=False)
    assert bad.returncode == 2 and "sets --config.distributed" in bad.stderr
    assert "srun" in _sh("launch/slurm.sh", "-h").stdout


def test_local_processes_get_their_ids_and_keep_the_callers_xla_flags(tmp_path):
    """launch/local.sh through a fake Python: each process's log shows what it was started with."""
    fake = tmp_path / "fakepy"
    _exe(fake, 'echo "$JAX_PROCESS_ID/$JAX_NUM_PROCESSES $JAX_COORDINATOR_ADDRESS [$XLA_FLAGS] $*"\n'
               '[[ "$JAX_PROCESS_ID" != 1 || -z "$FAIL" ]] || exit 7\n')
    work = tmp_path / "run"
    env = {"PYTHON": str(fake), "PORT": "12345", "XLA_FLAGS": "--xla_dump_to=/tmp/d"}
    _sh("launch/local.sh", "2", "4", "--config=configs/describe.py", f"--workdir={work}", env=env)
    for rank in (0, 1):
        log = (work / "logs" / f"process_{rank}.log").read_text().strip()
        assert log == (f"{rank}/2 127.0.0.1:12345 [--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=4] "
                       f"-m halo_jax.main --config=configs/describe.py --workdir={work}")
    bad = _sh("launch/local.sh", "2", "4", f"--workdir={work}", env={**env, "FAIL": "1", "GRACE": "1"}, check=False)
    assert bad.returncode == 1 and "process 1 failed (exit status 7)" in bad.stderr
