"""The command line: nested overrides, the resolved config, and one-line usage errors (exit 2)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from halo_jax import main as main_lib
from halo_jax.config import base_config


def cli(*args, tmp_path=None):
    return subprocess.run([sys.executable, "-m", "halo_jax.main", "--config=configs/describe.py", *args],
                          capture_output=True, text=True, timeout=120)


def test_nested_override_is_applied_and_written(tmp_path):
    result = cli(f"--workdir={tmp_path}", "--config.mesh.fsdp=-1", "--config.checkpoint.keep=7",
                 "--config.sharding.rules=(('embed','fsdp'),)")
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["checkpoint"]["keep"] == 7
    assert written["sharding"]["rules"] == [["embed", "fsdp"]]
    info = json.loads((tmp_path / "describe" / "describe.json").read_text())
    assert info["sharded_sum_ok"] and info["devices"] == 8  # conftest forces 8 CPU devices


@pytest.mark.parametrize("args, expected", [
    (["--config.mesh.fsdpp=2"], "unknown config key --config.mesh.fsdpp; valid keys under config.mesh: data, fsdp, tensor"),
    (["--config.nope.x=1"], "valid keys under config: aspects, checkpoint"),
    (["--config.mesh.fsdp=two"], "flag --config.mesh.fsdp=two"),
    (["--config.stage=fly"], "unknown stage 'fly'; choose one of: compare, describe"),
    (["--config.stage=pipeline", "--config.pipeline.stages=('describe','fly')"], "unknown stage 'fly'"),
    (["--config.mesh.tensor=3"], "mesh sizes {'data': 1, 'fsdp': -1, 'tensor': 3} do not divide the 8 devices"),
])
def test_usage_errors_are_one_line_with_status_2(tmp_path, args, expected):
    result = cli(f"--workdir={tmp_path}", *args)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("halo_jax.main: error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert expected in errors[0]
    assert not (tmp_path / "describe").exists()


def test_missing_workdir():
    result = cli()
    assert result.returncode == 2
    assert "--workdir is missing" in result.stderr


def test_pipeline_runs_listed_stages_in_process(tmp_path):
    config = base_config()
    config.stage = "pipeline"
    config.pipeline.stages = ("describe", "describe")
    main_lib.run(config, str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["stage"] == "pipeline"
    with pytest.raises(main_lib.UsageError, match="unknown stage 'x'"):
        config.pipeline.stages = ("x",)
        main_lib.run(config, str(tmp_path))


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.py")
                                         if not p.name.startswith("bench_")))  # bench configs: tests/test_bench.py
def test_every_config_builds_with_known_stages(name):
    """Each configs/*.py of `halo_jax.main` builds and names only registered stages (main.validate's checks)."""
    config = main_lib._load_defaults(str(Path(__file__).resolve().parents[1] / "configs" / name))
    main_lib.validate(config, "unused-workdir")
