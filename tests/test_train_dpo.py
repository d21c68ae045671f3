"""Stage `train_dpo` on a tiny world: runs, resumes after preemption bit-identically, exports a loadable
`dpo_ckpt/`; bad pair stores fail naming both videos / the grid and the latents."""

import shutil

import numpy as np
import pytest

from dpo_world import GRID, LATENT, make_base, make_config, make_stores
from halo_jax.convert.safetensors_io import SafetensorsFolder
from halo_jax.data.stores import StoreWriter
from halo_jax.models.wan.pipeline import load_pipeline
from halo_jax.stages import get_stage
from halo_jax.stages.pairs import pairs_schema
from halo_jax.train import checkpoint as checkpoint_lib
from halo_jax.train.loop import Preempted
from halo_jax.train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("compilation_cache")  # the repeated and resumed runs reuse the compiled steps


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_world")
    base = make_base(root / "base_ckpt")
    make_stores(root)
    config = make_config(base)
    get_stage("pairs")(config, str(root))
    return root, config


def _tensors(folder):
    f = SafetensorsFolder(folder)
    return {k: np.asarray(f[k]) for k in f}


def test_resume_is_bit_identical_and_export_loads(world, tmp_path, monkeypatch):
    root, config = world
    runs = {}
    for name in ("straight", "preempted"):
        work = tmp_path / name
        work.mkdir()
        shutil.copytree(root / "pairs", work / "pairs")
        runs[name] = work
    get_stage("train_dpo")(config, str(runs["straight"]))

    original = checkpoint_lib.Checkpointer.preempted
    monkeypatch.setattr(checkpoint_lib.Checkpointer, "preempted", lambda self, step: step == 2 or original(self, step))
    with pytest.raises(Preempted):
        get_stage("train_dpo")(config, str(runs["preempted"]))
    assert not (runs["preempted"] / "dpo_ckpt").exists()
    monkeypatch.setattr(checkpoint_lib.Checkpointer, "preempted", original)
    get_stage("train_dpo")(config, str(runs["preempted"]))

    m1 = read_metrics(runs["straight"] / "dpo" / "metrics.jsonl")
    m2 = read_metrics(runs["preempted"] / "dpo" / "metrics.jsonl")
    assert [r["step"] for r in m2] == [1, 2, 3, 4]  # 3 and 4 from the resumed run
    for a, b in zip(m1, m2):
        for k in ("loss", "grad_norm"):
            assert a[k] == b[k], (a["step"], k)
    assert {"loss", "skipped", "nonfinite"} <= set(m1[0]) and m1[-1]["skipped"] == 0

    t1 = _tensors(runs["straight"] / "dpo_ckpt" / "transformer")
    t2 = _tensors(runs["preempted"] / "dpo_ckpt" / "transformer")
    base = _tensors(root / "base_ckpt" / "transformer")
    assert t1.keys() == t2.keys() == base.keys()  # LoRA merged: the plain diffusers layout
    for k in t1:
        np.testing.assert_array_equal(t1[k], t2[k], err_msg=k)  # bit-identical on CPU
    changed = [k for k in t1 if not np.array_equal(t1[k], base[k])]
    assert changed and all(any(s in k for s in ("attn1", "attn2", "ffn")) for k in changed), changed

    for part in ("vae", "text_encoder"):  # copied unchanged from the base
        a, b = _tensors(runs["straight"] / "dpo_ckpt" / part), _tensors(root / "base_ckpt" / part)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    pipe = load_pipeline(runs["straight"] / "dpo_ckpt")
    assert pipe.max_text_length == 8 and pipe.transformer.config.num_layers == 1
    # A finished run is not repeated.
    assert get_stage("train_dpo")(config, str(runs["straight"])) == runs["straight"] / "dpo_ckpt"


def _bad_store(workdir, shape_w, shape_l, grid):
    with StoreWriter(workdir / "pairs", pairs_schema((None,) * 4, (None, None), (None,) * 3), chunk_size=1) as w:
        w.write({"pair_id": "a__b", "prompt": "p", "winner_id": "a", "loser_id": "b", "reward_w": 2.0,
                 "reward_l": 1.0, "latents_w": np.zeros(shape_w, np.float32),
                 "latents_l": np.zeros(shape_l, np.float32), "text_embeds": np.zeros((8, 16), np.float32),
                 "s": np.ones(grid, np.int8), "a": np.ones(grid, np.float32), "video_reward_gap": 1.0,
                 "patch_reward_gap": np.ones(grid, np.float32)})


def test_bad_pair_stores_fail_naming_both(tmp_path):
    config = make_config(tmp_path / "never_loaded")
    _bad_store(tmp_path / "shapes", LATENT, (4, 3, 2, 2), GRID)
    with pytest.raises(ValueError, match=r"winner 'a' latents \(4, 2, 2, 2\) and loser 'b' latents \(4, 3, 2, 2\)"):
        get_stage("train_dpo")(config, str(tmp_path / "shapes"))
    config.grid = (4, 2, 2)
    _bad_store(tmp_path / "grid", LATENT, LATENT, (4, 2, 2))
    with pytest.raises(ValueError, match=r"grid \(4, 2, 2\) does not fit the latents \(4, 2, 2, 2\) of winner 'a' "
                                         r"and loser 'b'"):
        get_stage("train_dpo")(config, str(tmp_path / "grid"))


def test_full_diffusion_dpo_exports_and_nonfinite_pairs_stop(world, tmp_path):
    root, config = world
    config = config.copy_and_resolve_references()
    config.dpo.update(mode="full", steps=2, grad_accum=2, max_skipped=2)
    config.dpo.loss.patch_weight = 0.0  # plain Diffusion-DPO through the same code
    config.mesh.update(data=1, fsdp=1, tensor=-1)
    shutil.copytree(root / "pairs", tmp_path / "full" / "pairs")
    get_stage("train_dpo")(config, str(tmp_path / "full"))
    t = _tensors(tmp_path / "full" / "dpo_ckpt" / "transformer")
    base = _tensors(root / "base_ckpt" / "transformer")
    assert t.keys() == base.keys()
    changed = {k for k in t if not np.array_equal(t[k], base[k])}
    assert any("attn1" in k for k in changed) and any("proj_out" in k or "norm" in k or "patch" in k for k in changed)
    assert [r["step"] for r in read_metrics(tmp_path / "full" / "dpo" / "metrics.jsonl")] == [1, 2]

    # Every batch holds a NaN latent: each step is skipped, the run stops at max_skipped.
    from halo_jax.align.dpo_step import NonFiniteError
    from halo_jax.data.stores import StoreReader

    reader = StoreReader(root / "pairs")
    schema = pairs_schema(LATENT, reader[0]["text_embeds"].shape, GRID)
    with StoreWriter(tmp_path / "nan" / "pairs", schema, chunk_size=2) as w:
        for i, rec in enumerate(reader):
            if i == 0:
                rec["latents_w"] = np.where(np.arange(rec["latents_w"].size).reshape(LATENT) == 0, np.nan,
                                            rec["latents_w"]).astype(np.float32)
            w.write(rec)
    config.dpo.steps = 5
    with pytest.raises(NonFiniteError, match="2 DPO steps had a non-finite"):
        get_stage("train_dpo")(config, str(tmp_path / "nan"))
    assert not (tmp_path / "nan" / "dpo_ckpt").exists()
