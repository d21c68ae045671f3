"""Entry point: `python -m halo_jax.main --config=configs/NAME.py --workdir=DIR [--config.a.b=value ...]`.

Parses the ml_collections config (overrides included), starts the distributed
runtime when the run is multi-process, writes the resolved config to
`WORKDIR/config.json` and runs `config.stage` (or every stage of
`config.pipeline.stages` when the stage is `pipeline`). Usage errors print one
line naming the problem and the valid choices, and exit with status 2.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

from halo_jax.io import atomic_write_text

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/ (`file.py` or `file.py:arg`).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for every output of the run (created if missing).")

USAGE_ERROR = 2


class UsageError(Exception):
    """A bad command line: reported in one line, exit status 2."""


def _fail(message: str) -> None:
    print(f"halo_jax.main: error: {message}", file=sys.stderr)
    sys.exit(USAGE_ERROR)


def _config_path(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _load_defaults(spec: str) -> ConfigDict:
    """The config file's `get_config()` before overrides (for error messages)."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_halo_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _explain_override_error(argv: list[str]) -> str:
    """Find the first `--config.x.y=...` whose key does not exist and list the valid keys there."""
    spec = _config_path(argv)
    config = _load_defaults(spec)
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        dotted = arg[len("--config."):].split("=", 1)[0]
        node, walked = config, []
        for part in dotted.split("."):
            if not isinstance(node, (ConfigDict, dict)) or part not in node:
                keys = ", ".join(sorted(node.keys())) if isinstance(node, (ConfigDict, dict)) else "(none: it is a value)"
                where = "config." + ".".join(walked) if walked else "config"
                return f"unknown config key --config.{dotted}; valid keys under {where}: {keys}"
            node = node[part]
            walked.append(part)
    return "a --config.* override names a key that does not exist"


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with one-line errors (exit 2) instead of tracebacks."""
    try:
        rest = flags.FLAGS(argv)
    except flags.IllegalFlagValueError as e:
        _fail(f"{str(e).splitlines()[0]} (check the type of the value against the config file)")
    except flags.Error as e:
        _fail(f"{str(e).splitlines()[0]}; run with --helpfull to list the flags")
    except (AttributeError, KeyError) as e:
        _fail(_explain_override_error(argv))
    except Exception as e:  # a config file that fails to import or to build
        _fail(f"cannot load config {_config_path(argv)!r}: {type(e).__name__}: {e}")
    return rest


def validate(config, workdir: str | None) -> None:
    """Raise UsageError for a missing config/workdir or an unknown stage."""
    from halo_jax import stages

    if not isinstance(config, ConfigDict):
        raise UsageError(f"--config is missing or cannot be loaded ({_config_path(sys.argv)!r}); "
                         "pass --config=configs/NAME.py (see configs/)")
    if not workdir:
        raise UsageError("--workdir is missing; pass --workdir=DIR, where every output of the run goes")
    names = list(config.pipeline.stages) if config.stage == stages.PIPELINE else [config.stage]
    for name in names:
        if name not in stages.STAGES:
            raise UsageError(f"unknown stage {name!r}; choose one of: {', '.join(stages.stage_names())}")


def write_config(config, workdir: Path) -> None:
    """The resolved config as JSON, atomically (process 0 only)."""
    workdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(workdir / "config.json", config.to_json_best_effort(indent=2, sort_keys=True))


def run(config, workdir: str) -> None:
    """Run the configured stage(s) in `workdir` (the programmatic twin of the command line)."""
    from halo_jax import stages
    from halo_jax.parallel import distributed

    validate(config, workdir)
    distributed.initialize(config)
    import jax

    from halo_jax.parallel.mesh import resolve_mesh_shape

    resolve_mesh_shape(dict(config.mesh), jax.device_count())  # fail before any stage starts
    if distributed.is_main_process():
        write_config(config, Path(workdir))
    names = list(config.pipeline.stages) if config.stage == stages.PIPELINE else [config.stage]
    for name in names:
        logging.info("stage %s: start (workdir %s)", name, workdir)
        stages.get_stage(name)(config, workdir)
        logging.info("stage %s: done", name)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; settings go through --config.a.b=value")
    try:
        validate(_CONFIG.value, _WORKDIR.value)
    except UsageError as e:
        _fail(str(e))
    from halo_jax.config import ConfigError

    try:
        run(_CONFIG.value, _WORKDIR.value)
    except ConfigError as e:
        _fail(str(e))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
