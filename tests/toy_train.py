"""A tiny sharded regression run through the library's train state, step, loop and checkpoints.

Used by the foundation tests as a subprocess: resume after a kill, and multi-process
(2 x 4 CPU devices) against single-process (1 x 8). Writes `final.npz` with the params.
"""

import argparse
import os
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--workdir", required=True)
parser.add_argument("--steps", type=int, default=8)
parser.add_argument("--mesh", default="1,2,4")
parser.add_argument("--devices", type=int, default=8)
parser.add_argument("--every", type=int, default=1)
parser.add_argument("--sleep", type=float, default=0.0)
parser.add_argument("--coordinator", default="")
parser.add_argument("--num_processes", type=int, default=1)
parser.add_argument("--process_id", type=int, default=0)
args = parser.parse_args()
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import grain  # noqa: E402

from halo_jax.parallel import distributed  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
distributed.initialize(ml_collections.ConfigDict({"distributed": {
    "coordinator_address": args.coordinator, "num_processes": args.num_processes,
    "process_id": args.process_id, "cpu_collectives": "gloo"}}))

from flax import nnx  # noqa: E402

from halo_jax.parallel import mesh as mesh_lib  # noqa: E402
from halo_jax.parallel.sharding import batch_sharding, param_init  # noqa: E402
from halo_jax.train import state as state_lib  # noqa: E402
from halo_jax.train.checkpoint import Checkpointer  # noqa: E402
from halo_jax.train.loop import train_loop  # noqa: E402
from halo_jax.train.metrics import MetricsWriter  # noqa: E402


class MLP(nnx.Module):
    def __init__(self, rngs):
        init = nnx.initializers.lecun_normal()
        self.up = nnx.Linear(8, 32, kernel_init=param_init(init, "embed", "mlp"), rngs=rngs)
        self.down = nnx.Linear(32, 8, kernel_init=param_init(init, "mlp", "embed"), rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


def loss_fn(model, batch, key):
    noise = 0.01 * jax.random.normal(key, batch["x"].shape)
    err = model(batch["x"] + noise) - batch["y"]
    return jnp.mean(err**2), {}


sizes = dict(zip(("data", "fsdp", "tensor"), map(int, args.mesh.split(","))))
mesh = mesh_lib.make_mesh(sizes)
model = MLP(nnx.Rngs(0))
graphdef, params, frozen = state_lib.split_model(model)
tx = optax.adamw(1e-2)
shardings = state_lib.train_state_shardings(params, tx, mesh)
bsh = batch_sharding(mesh, 2)
step_fn = state_lib.make_train_step(graphdef, frozen, loss_fn, tx, shardings, {"x": bsh, "y": bsh})

rng = np.random.default_rng(0)
xs = rng.normal(size=(64, 8)).astype(np.float32)
data = {"x": xs, "y": np.sin(xs[:, ::-1]).astype(np.float32)}
ds = grain.MapDataset.range(64).shuffle(seed=3).repeat().batch(16)
it = iter(ds.map(lambda idx: {k: v[idx] for k, v in data.items()}).to_iter_dataset())
rows = distributed.process_local_rows(16, bsh)


def to_device(batch):
    time.sleep(args.sleep)
    return distributed.global_batch({k: v[rows] for k, v in batch.items()}, bsh)


ckpt = Checkpointer(os.path.join(args.workdir, "ckpt"), keep=2, every_steps=args.every)
state, extra = state_lib.restore_or_init(ckpt, lambda: state_lib.init_train_state(state_lib.pure(params), tx, 0), shardings)
if extra:
    it.set_state(extra["data"])
print(f"start step {int(state['step'])}", flush=True)
writer = MetricsWriter(args.workdir)
state = train_loop(state, step_fn, it, num_steps=args.steps, checkpointer=ckpt, writer=writer, log_every=1,
                   to_device=to_device, show_progress=False)
final = distributed.to_host(state["params"])
if jax.process_index() == 0:
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_leaves_with_path(final)}
    np.savez(os.path.join(args.workdir, "final.npz"), **flat)
ckpt.close()
print("done", flush=True)
sys.exit(0)
