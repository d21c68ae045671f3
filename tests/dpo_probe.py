"""A few Gran-DPO steps on a demo run's pairs, measured before and after (tests/test_demo.py runs it).

    python tests/dpo_probe.py DEMO_WORKDIR OUT.json

The reduced demo's DPO settings with 16 steps at lr 1e-3 on the shipped model; the metrics of the
parameters before the first step and after the last, both with the same timesteps and noise (the
probe state's rng and step are reset), written as {"before": {...}, "after": {...}}. A subprocess,
like every other demo run: the pytest worker itself never runs the sharded 8-device programs.
"""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from halo_jax.assets import SHAPES_WAN  # noqa: E402
from halo_jax.data.stores import StoreReader  # noqa: E402
from halo_jax.diffusion import FlowMatching  # noqa: E402
from halo_jax.models.lora import LoRAConfig, apply_lora  # noqa: E402
from halo_jax.models.wan.transformer_params import load_transformer  # noqa: E402
from halo_jax.parallel import mesh as mesh_lib  # noqa: E402
from halo_jax.stages.pairs import loss_config  # noqa: E402
from halo_jax.stages.train_dpo import make_dpo_step, pair_batches  # noqa: E402
from halo_jax.train.optim import make_optimizer  # noqa: E402
from reduced_demo import PROBE_STEPS, get_config  # noqa: E402

ROWS = 8


def main(workdir: Path, out: Path) -> None:
    config = get_config()
    cfg = config.dpo
    cfg.steps = PROBE_STEPS  # on the schedule the demo's train_dpo compiled (tests/reduced_demo.py)
    mesh = mesh_lib.make_mesh(config.mesh)
    model = apply_lora(load_transformer(SHAPES_WAN / "transformer", mesh=mesh), LoRAConfig.from_config(cfg.lora),
                       key=config.seed)
    diffusion = FlowMatching(num_train_timesteps=int(cfg.loss.num_train_timesteps), shift=float(cfg.diffusion.shift),
                             timestep_sampling=cfg.diffusion.timestep_sampling)
    step = make_dpo_step(model, diffusion, loss_config(config), make_optimizer(cfg), mesh)
    batch = next(pair_batches(StoreReader(workdir / "pairs"), ROWS, config.seed, step))  # pairs repeated to 8 rows
    state = step.init_state(config.seed)
    probe_rng = state["rng"].copy()  # uint32 key data

    def measure(state):  # metrics are taken before the update: the loss of `state`'s params, fixed t and noise
        # a device copy (the step donates its state) with the same dtypes, weak types and shardings as the
        # training state, so the step compiled for training runs it
        probe = jax.block_until_ready({**jax.tree.map(lambda x: x.copy(), state), "rng": probe_rng.copy(),
                                       "step": jnp.zeros_like(state["step"])})
        return {k: float(v) for k, v in jax.device_get(step(probe, batch)[1]).items()}

    # Each program finishes before the next is dispatched: the step's collectives never wait for devices
    # still busy with the state copies or an earlier step (8 CPU devices share this process's threads).
    with jax.set_mesh(mesh):
        before = measure(state)
        for _ in range(PROBE_STEPS):
            state = jax.block_until_ready(step(state, batch)[0])
        after = measure(state)
    out.write_text(json.dumps({"before": before, "after": after}, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
