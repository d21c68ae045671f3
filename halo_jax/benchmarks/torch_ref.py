"""The PyTorch reference of the step benchmark (`--compare_torch`): diffusers `WanTransformer3DModel`
with the same config, batch and optimizer, timed the same way (median of `steps` after `warmup`)."""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from collections.abc import Callable
from typing import Any

from ml_collections import ConfigDict

from halo_jax.benchmarks.config import latent_shape, make_batches, model_config, num_tokens
from halo_jax.benchmarks.timing import time_steps
from halo_jax.models import lora as lora_lib


def bench_torch(c: ConfigDict, threads: int, log: Callable[[str], None] = print) -> dict:
    """The SFT step and the Diffusion-DPO step in PyTorch (diffusers `WanTransformer3DModel`, same
    config, batch, AdamW); DPO with LoRA adapters on the same targets (reference = adapters off) when
    `lora.enabled`, else a frozen copy of the model as the reference."""
    import copy

    import torch
    from diffusers import WanTransformer3DModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = model_config(c)
    shape = latent_shape(c, cfg)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    dcfg = {k: v for k, v in cfg.to_diffusers_config().items() if not k.startswith("_")}
    model = WanTransformer3DModel(**dcfg)
    if dtype != torch.float32:
        model = model.to(dtype)
    sft_np, dpo_np = make_batches(c, cfg, shape)
    T = 1000.0
    results: dict[str, dict] = {}

    def fm(x0, noise, t):
        s = (t / T).view(-1, 1, 1, 1, 1)
        return ((1 - s) * x0 + s * noise).to(dtype), noise - x0

    def forward(m, x, t, text):
        return m(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0].float()

    def sft_step(m, opt, batch):
        x0, text = batch
        b = x0.shape[0]
        t = torch.rand(b) * T
        noise = torch.randn_like(x0)
        x_t, target = fm(x0, noise, t)
        loss = ((forward(m, x_t, t, text.to(dtype)) - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        return loss

    def timed(step):
        return time_steps(step, c.steps, c.warmup, sync=lambda out: out)

    tokens = num_tokens(cfg, shape) * int(c.batch)
    if "sft" in c.kinds:
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW(m.parameters(), lr=c.learning_rate, weight_decay=1e-4)
        batch = (torch.from_numpy(sft_np["latents"]), torch.from_numpy(sft_np["text"]))
        times = timed(lambda: sft_step(m, opt, batch))
        results["sft"] = {"time_s": statistics.median(times), "tokens_per_s": tokens / statistics.median(times)}
        log(f"  torch sft: {results['sft']['time_s'] * 1e3:.1f} ms")
        del m, opt

    if "diffusion_dpo" in c.kinds:
        policy = copy.deepcopy(model)
        if c.lora.enabled:
            adapters = _torch_lora(policy, int(c.lora.rank), float(c.lora.alpha))
            params = [p for a in adapters for p in (a.lora_a, a.lora_b)]

            def reference(x, t, text):
                for a in adapters:
                    a.enabled = False
                try:
                    return forward(policy, x, t, text)
                finally:
                    for a in adapters:
                        a.enabled = True
        else:
            ref = copy.deepcopy(model).requires_grad_(False)
            params = list(policy.parameters())
            reference = lambda x, t, text: forward(ref, x, t, text)  # noqa: E731
        opt = torch.optim.AdamW(params, lr=c.learning_rate, weight_decay=1e-4)
        w, l = torch.from_numpy(dpo_np["latents_w"]), torch.from_numpy(dpo_np["latents_l"])
        text = torch.from_numpy(dpo_np["text_embeds"]).to(dtype)
        beta = float(c.dpo.beta)

        def dpo_step():
            pairs = w.shape[0]
            t = torch.rand(pairs) * T
            noise = torch.randn_like(w)
            x0 = torch.stack([w, l], 1).flatten(0, 1)
            t2, n2, c2 = t.repeat_interleave(2), noise.repeat_interleave(2, 0), text.repeat_interleave(2, 0)
            x_t, target = fm(x0, n2, t2)
            with torch.no_grad():
                e_ref = ((reference(x_t, t2, c2) - target) ** 2).mean(dim=(1, 2, 3, 4)).view(pairs, 2)
            e = ((forward(policy, x_t, t2, c2) - target) ** 2).mean(dim=(1, 2, 3, 4)).view(pairs, 2)
            d = (e[:, 0] - e_ref[:, 0]) - (e[:, 1] - e_ref[:, 1])
            loss = -torch.nn.functional.logsigmoid(-beta * d).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            return loss

        times = timed(dpo_step)
        results["diffusion_dpo"] = {"time_s": statistics.median(times),
                                    "tokens_per_s": tokens / statistics.median(times)}
        log(f"  torch diffusion_dpo: {results['diffusion_dpo']['time_s'] * 1e3:.1f} ms")
    return {"threads": threads, "torch_version": torch.__version__, "results": results}


def torch_in_subprocess(c: ConfigDict, threads: int, log: Callable[[str], None] = print) -> dict:
    """`bench_torch` in a fresh Python process: torch's default CPU state, with no XLA thread pool or
    floating-point flags left over from the JAX side; its JSON comes back on the last stdout line."""
    import subprocess

    code = ("import json, sys; from ml_collections import ConfigDict; "
            "from halo_jax.benchmarks.torch_ref import bench_torch; "
            "a = json.loads(sys.stdin.read()); "
            "r = bench_torch(ConfigDict(a['config']), a['threads'], log=lambda m: print(m, file=sys.stderr)); "
            "print(json.dumps(r))")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps({"config": c.to_dict(), "threads": threads}),
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"the PyTorch reference benchmark failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    for line in proc.stderr.splitlines():
        if line.startswith("  torch "):
            log(line)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _torch_lora(model: Any, rank: int, alpha: float) -> list[Any]:
    """Wrap the Linear layers matching `lora.WAN_TARGETS` (diffusers names: attn1.to_out.0 ...) with
    `y = base(x) + (alpha/r)·(x A) B`, A ~ U(±1/√d_in), B = 0; freeze everything else."""
    import fnmatch

    import torch

    class LoRA(torch.nn.Module):
        def __init__(self, base: torch.nn.Linear):
            super().__init__()
            self.base, self.enabled, self.scale = base, True, alpha / rank
            bound = 1.0 / math.sqrt(base.in_features)
            self.lora_a = torch.nn.Parameter(torch.empty(base.in_features, rank).uniform_(-bound, bound))
            self.lora_b = torch.nn.Parameter(torch.zeros(rank, base.out_features))

        def forward(self, x):
            y = self.base(x)
            if not self.enabled:
                return y
            return y + ((x @ self.lora_a.to(x.dtype)) @ self.lora_b.to(x.dtype)) * self.scale

    model.requires_grad_(False)
    ours = {"to_out.0": "to_out", "ffn.net.0.proj": "ffn.proj_in", "ffn.net.2": "ffn.proj_out"}
    adapters = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear) or not name.startswith("blocks."):
            continue
        mapped = name
        for theirs, mine in ours.items():
            mapped = mapped.replace(theirs, mine)
        if not any(fnmatch.fnmatchcase(mapped, p) for p in lora_lib.WAN_TARGETS):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        adapter = LoRA(module)
        parent._modules[attr] = adapter
        adapters.append(adapter)
    if not adapters:
        raise RuntimeError("no torch Linear matched lora.WAN_TARGETS; the diffusers module names changed")
    return adapters
