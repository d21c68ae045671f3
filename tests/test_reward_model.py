"""HALO reward model: token -> cell pooling, jitted forward, gradients, tower loading."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from halo_jax.convert.safetensors_io import CheckpointError, SafetensorsFolder, save_folder
from halo_jax.models.reward.matching import window_max
from halo_jax.models.reward.reward_model import RewardModel, RewardModelConfig, clip_to_label_range, pool_tokens
from halo_jax.models.reward.siglip import SiglipConfig, SiglipModel, SiglipTextConfig, SiglipVisionConfig
from halo_jax.models.reward.siglip_params import export_siglip
from halo_jax.models.text import build_word_tokenizer
from halo_jax.models.reward.towers import TOWER_LORA_TARGETS, apply_tower_lora, load_towers, trainable_filter
from halo_jax.reward import losses
from halo_jax.reward.model_io import model_config
from halo_jax.stages.train_reward import pairwise_cosines

GRID = (2, 2, 3)
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # these tests check shapes and gradient flow, not speed


def random_model(ctor, seed: int = 0):
    """`ctor()` with numpy-random params (traced by `nnx.eval_shape`: no per-initialiser XLA compiles).

    Layer-norm scales are 1 + noise, everything else N(0, 0.1^2).
    """
    graphdef, state = nnx.split(nnx.eval_shape(ctor))
    rng = np.random.RandomState(seed)

    def fill(path, v):
        value = rng.normal(0.0, 0.1, v.shape) + (1.0 if "scale" in jax.tree_util.keystr(path) else 0.0)
        return jnp.asarray(value.astype(v.dtype))

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def brute_force_cells(clip_shape, frame_indices, tokens_per_side, grid):
    """Cell (t, h, w) of every token, by explicit loops: a sampled frame is in the temporal cell
    whose frame range [floor(c*F/Tp), floor((c+1)*F/Tp)) holds it; a token row/column covering
    input pixels [j*L/n, (j+1)*L/n) goes to the cell it overlaps most (first cell on a tie)."""
    f_len, h_len, w_len = clip_shape
    n = tokens_per_side

    def bounds(length, g):
        return [math.floor(c * length / g) for c in range(g + 1)]

    def spatial_cell(j, length, g):
        lo, hi = j * length / n, (j + 1) * length / n
        b = bounds(length, g)
        overlap = [max(0.0, min(hi, b[c + 1]) - max(lo, b[c])) for c in range(g)]
        return int(np.argmax(overlap))

    out = np.zeros((len(frame_indices), n, n, 3), np.int64)
    tb = bounds(f_len, grid[0])
    for t, frame in enumerate(frame_indices):
        ct = [c for c in range(grid[0]) if tb[c] <= frame < tb[c + 1]]
        assert len(ct) == 1
        for r in range(n):
            for col in range(n):
                out[t, r, col] = (ct[0], spatial_cell(r, h_len, grid[1]), spatial_cell(col, w_len, grid[2]))
    return out


@pytest.mark.parametrize("num_frames,clip_shape", [(5, (5, 28, 28)), (5, (5, 35, 42)), (4, (9, 30, 28))])
def test_patch_pooling_puts_every_token_in_its_cell(num_frames, clip_shape):
    cfg = RewardModelConfig.tiny(num_frames=num_frames, grid=GRID)  # 7x7 tokens per frame
    cells = cfg.token_cell_map(clip_shape)
    frames = cfg.frame_indices(clip_shape[0])
    expected = brute_force_cells(clip_shape, frames, cfg.vision.grid, GRID)
    ids = cells.cell_ids()
    flat_expected = (expected[..., 0] * GRID[1] + expected[..., 1]) * GRID[2] + expected[..., 2]
    np.testing.assert_array_equal(ids, flat_expected)
    if clip_shape == (5, 28, 28):  # hand-checked: uneven 5 -> [0,2) [2,5); 7 rows -> 4 + 3 (row 3 ties,
        assert list(expected[:, 0, 0, 0]) == [0, 0, 1, 1, 1]  # goes to the earlier cell); 7 columns -> 2 + 3 + 2
        assert list(expected[0, :, 0, 1]) == [0, 0, 0, 0, 1, 1, 1]
        assert list(expected[0, 0, :, 2]) == [0, 0, 1, 1, 1, 2, 2]

    tokens = np.random.RandomState(0).randn(2, num_frames, 7, 7, 5).astype(np.float32)
    pooled = np.asarray(pool_tokens(jnp.asarray(tokens), cells))
    maxed = np.asarray(pool_tokens(jnp.asarray(tokens), cells, "max"))  # head_pool="mean_max"'s second half
    assert pooled.shape == (2, *GRID, 5)
    for t in range(GRID[0]):
        for h in range(GRID[1]):
            for w in range(GRID[2]):
                members = [tokens[:, a, b, c] for a in range(num_frames) for b in range(7) for c in range(7)
                           if tuple(expected[a, b, c]) == (t, h, w)]
                np.testing.assert_allclose(pooled[:, t, h, w], np.mean(members, axis=0), rtol=1e-5, atol=1e-6)
                np.testing.assert_array_equal(maxed[:, t, h, w], np.max(members, axis=0))


@pytest.fixture(scope="module")
def model():
    cfg = RewardModelConfig.tiny(num_frames=5, grid=GRID, vision_tuning="top:1", text_tuning="frozen")
    return random_model(lambda: RewardModel(cfg, rngs=nnx.Rngs(0)))


def test_forward_is_jitted_with_the_specified_shapes_and_gradients_reach_the_heads(model):
    cfg = model.config
    rng = np.random.RandomState(1)
    frames = rng.randint(0, 256, (2, 5, 35, 42, 3)).astype(np.uint8)
    frames[1] = frames[0]  # same clip, two prompts: the scores must depend on the prompt
    ids = rng.randint(0, cfg.text.vocab_size, (2, 8))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit(compiler_options=FAST_COMPILE)
    def step(params, frames, ids):
        def loss(params):
            out = nnx.merge(graphdef, params, rest)(frames, ids)
            return jnp.sum((out["video"] - 1.0) ** 2) + jnp.sum((out["patch"] - 5.0) ** 2), out

        return jax.grad(loss, has_aux=True)(params)

    grads, out = step(params, jnp.asarray(frames), jnp.asarray(ids))
    assert out["video"].shape == (2, len(cfg.aspects)) and out["video"].dtype == jnp.float32
    assert out["patch"].shape == (2, len(cfg.aspects), *GRID) and out["patch"].dtype == jnp.float32
    assert np.all(np.isfinite(out["video"])) and np.all(np.isfinite(out["patch"]))
    assert np.abs(np.asarray(out["video"][0] - out["video"][1])).max() > 1e-6
    assert np.asarray(out["patch"][0]).std() > 0  # cells differ

    def g(*path):
        node = grads
        for p in path:
            node = node[p]
        return np.asarray(node[...])

    for head in ("video_head", "patch_head"):
        for layer in ("fc1", "fc2"):
            assert np.abs(g(head, layer, "kernel")).max() > 0, (head, layer)
    assert np.abs(g("temporal", "cross_attn", "q_proj", "kernel")).max() > 0
    assert np.abs(g("text_proj", "kernel")).max() > 0
    # vision "top:1": only the last encoder layer (and the final norm) learn
    fc1 = g("vision", "encoder", "layers", "mlp", "fc1", "kernel")
    assert np.all(fc1[0] == 0) and np.abs(fc1[1]).max() > 0
    assert np.abs(g("vision", "post_layernorm", "scale")).max() > 0
    assert np.all(g("vision", "embeddings", "patch_embedding", "kernel") == 0)
    # text "frozen": no gradient anywhere in the tower
    assert all(np.all(np.asarray(v) == 0) for v in jax.tree.leaves(grads["text"]))


def test_trainable_filter_follows_the_tuning_modes(model):
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, trainable_filter(model.config)))}
    assert "video_head.fc2.kernel" in names and "patch_head.fc1.kernel" in names and "temporal.mlp.fc1.kernel" in names
    assert "vision.encoder.layers.mlp.fc1.kernel" in names and "vision.post_layernorm.scale" in names
    assert "vision.embeddings.patch_embedding.kernel" not in names
    assert not any(n.startswith("text.") for n in names)


def test_preprocess_uint8_and_float_agree(model):
    frames = np.random.RandomState(2).randint(0, 256, (3, 35, 42, 3)).astype(np.uint8)
    a = np.asarray(model.preprocess(jnp.asarray(frames)))
    b = np.asarray(model.preprocess(jnp.asarray(frames, jnp.float32) / 255.0))
    assert a.shape == (3, 28, 28, 3)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert -1.0 - 1e-6 <= a.min() and a.max() <= 1.0 + 1e-6


def test_load_towers_from_a_siglip_folder(tmp_path):
    siglip = random_model(lambda: SiglipModel(SiglipConfig.tiny(), rngs=nnx.Rngs(3)), seed=3)
    export_siglip(siglip, tmp_path / "siglip")
    cfg = RewardModelConfig.from_siglip_folder(tmp_path / "siglip", num_frames=2, width=32, num_heads=4, head_hidden=8,
                                               num_layers=1)
    model = load_towers(random_model(lambda: RewardModel(cfg, rngs=nnx.Rngs(4)), seed=4), tmp_path / "siglip")
    np.testing.assert_array_equal(np.asarray(model.vision.encoder.layers.self_attn.q_proj.kernel[...]),
                                  np.asarray(siglip.vision_model.encoder.layers.self_attn.q_proj.kernel[...]))
    np.testing.assert_array_equal(np.asarray(model.text.embeddings.token_embedding.embedding[...]),
                                  np.asarray(siglip.text_model.embeddings.token_embedding.embedding[...]))
    assert model.vision.head is None

    other = RewardModelConfig.tiny(vision=SiglipVisionConfig.tiny(num_hidden_layers=1))
    with pytest.raises(CheckpointError, match="from_siglip_folder"):
        load_towers(nnx.eval_shape(lambda: RewardModel(other, rngs=nnx.Rngs(5))), tmp_path / "siglip")

    source = SafetensorsFolder(tmp_path / "siglip")
    save_folder(tmp_path / "broken", {k: np.asarray(source[k]) for k in source if k != "text_model.head.weight"},
                siglip.config.to_transformers_config(), weights_name="model")
    with pytest.raises(CheckpointError, match=r"text_model\.head\.kernel"):
        load_towers(nnx.eval_shape(lambda: RewardModel(cfg, rngs=nnx.Rngs(4))), tmp_path / "broken")


def test_config_round_trip_and_errors():
    cfg = RewardModelConfig.tiny(aspects=("a", "b"), grid=[1, 2, 2], vision_tuning="top:2", head_pool="mean_max")
    assert RewardModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="grid"):
        RewardModelConfig.tiny(grid=(2, 8, 2))  # 7 token rows cannot fill 8 cells
    with pytest.raises(ValueError, match="vision_tuning"):
        RewardModelConfig.tiny(vision_tuning="top:9")
    with pytest.raises(ValueError, match="temporal"):
        RewardModelConfig.tiny(num_frames=2, grid=(2, 1, 1)).token_cell_map((1, 28, 28))  # 1 frame, 2 cells


def test_lora_towers_train_only_their_adapters():
    lora = pytest.importorskip("halo_jax.models.lora")
    cfg = RewardModelConfig.tiny(num_frames=2, grid=(1, 2, 2), vision_tuning="lora", text_tuning="frozen", lora_rank=2)
    model = apply_tower_lora(random_model(lambda: RewardModel(cfg, rngs=nnx.Rngs(0))), key=1)
    assert len(lora.lora_modules(model)) == len(TOWER_LORA_TARGETS)
    flt = trainable_filter(cfg)
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, flt))}
    assert "vision.encoder.layers.self_attn.q_proj.lora_b" in names and "video_head.fc1.kernel" in names
    assert not any(n.startswith("vision.") and "lora" not in n for n in names)
    assert not any(n.startswith("text.") for n in names)

    graphdef, train, rest = nnx.split(model, flt, ...)
    frames = jnp.asarray(np.random.RandomState(5).rand(1, 3, 28, 28, 3), jnp.float32)
    ids = jnp.asarray(np.random.RandomState(6).randint(0, cfg.text.vocab_size, (1, 6)))

    @jax.jit(compiler_options=FAST_COMPILE)
    def grads(train):
        return jax.grad(lambda t: jnp.sum(nnx.merge(graphdef, t, rest)(frames, ids)["video"] ** 2))(train)

    g = grads(train)
    assert np.abs(np.asarray(g["vision"]["encoder"]["layers"]["mlp"]["fc2"]["lora_b"][...])).max() > 0


def test_every_param_has_logical_axes():
    abstract = nnx.eval_shape(lambda: RewardModel(RewardModelConfig.tiny(), rngs=nnx.Rngs(0)))
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(var.get_value().shape), (path, names)


def test_match_features_are_the_matching_probabilities_of_video_and_cells():
    """With `match_features` the heads read sigmoid(L) of the video and of each cell with its own prompt
    (L as `match_logits`, the cell's tokens averaged by brute-force cell membership)."""
    cfg = RewardModelConfig.tiny(num_frames=5, grid=GRID, match_features=True)
    model = random_model(lambda: RewardModel(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.RandomState(2)
    frames = jnp.asarray(rng.randint(0, 256, (2, 5, 35, 42, 3)).astype(np.uint8))
    ids = jnp.asarray(rng.randint(0, cfg.text.vocab_size, (2, 8)))
    mask = jnp.asarray([[1] * 8, [1] * 5 + [0] * 3])
    cells = cfg.token_cell_map(frames.shape[1:4])
    v = model.video_tokens(model.sample_frames(frames))
    features = model._match_features(v, cells, model.encode_text(ids), model.text_groups(ids, mask))
    video, cell = features[:, 0], features[:, 1:].reshape(2, *GRID, 1)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    np.testing.assert_allclose(np.asarray(video[:, 0]), sig(np.diag(np.asarray(model.match_logits(frames, ids, mask)))),
                               rtol=1e-5)

    text = np.asarray(model.encode_text(ids), np.float64)
    scale, bias = math.exp(float(model.logit_scale[...][0])), float(model.logit_bias[...][0])
    member = brute_force_cells((5, 35, 42), cfg.frame_indices(5), cfg.vision.grid, GRID)
    tokens = np.asarray(v, np.float64).reshape(2, 5, 7, 7, -1)
    for b in range(2):
        t = (text[b] * np.asarray(mask[b])[:, None]).sum(0) / np.asarray(mask[b]).sum()
        t /= np.linalg.norm(t)
        for c in np.ndindex(*GRID):
            x = tokens[b][np.all(member == c, axis=-1)].mean(0)
            expected = sig(scale * x @ t / np.linalg.norm(x) + bias)
            assert float(cell[b][c][0]) == pytest.approx(expected, rel=1e-5), (b, c)
    out = model(frames, ids, mask)
    assert out["video"].shape == (2, len(cfg.aspects)) and out["patch"].shape == (2, len(cfg.aspects), *GRID)


def test_patch_reads_clip_gives_every_cell_the_clips_features_too():
    """With `patch_reads_clip` the patch head reads [cell mean, cell match feature, clip match feature] (the clip's
    next to each cell's); without match features or word evidence it has nothing to read: a ValueError."""
    cfg = RewardModelConfig.tiny(num_frames=5, grid=GRID, match_features=True, patch_reads_clip=True)
    model = random_model(lambda: RewardModel(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.RandomState(4)
    frames = jnp.asarray(rng.randint(0, 256, (2, 5, 35, 42, 3)).astype(np.uint8))
    ids, mask = jnp.asarray(rng.randint(0, cfg.text.vocab_size, (2, 8))), jnp.ones((2, 8), jnp.int32)
    cells = cfg.token_cell_map(frames.shape[1:4])
    v, text, h = model.encode(frames, ids, mask)
    features = model._match_features(v, cells, text, model.text_groups(ids, mask))  # (2, 1 + C, 1)
    cell_means = pool_tokens(h.reshape(2, 5, cfg.vision.grid, cfg.vision.grid, -1), cells)
    clip = jnp.broadcast_to(features[:, :1, None, None], (2, *GRID, 1))
    expected = model.patch_head(jnp.concatenate([cell_means, features[:, 1:].reshape(2, *GRID, 1), clip], -1))
    np.testing.assert_allclose(np.asarray(model(frames, ids, mask)["patch"]), np.moveaxis(np.asarray(expected), -1, 1),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="patch_reads_clip .* set match_features=True or word_evidence=True"):
        RewardModelConfig.tiny(patch_reads_clip=True)


def test_word_evidence_is_each_words_log_softmax_among_the_vocabulary_in_its_place():
    """With `word_evidence` (text tower of depth 0) the heads read, for every prompt token, log softmax over the
    vocabulary of the matching logit with that token replaced, at the prompt's own word; checked against
    the logits of every substituted prompt computed by `match_text` (rel. 1e-4); 0 at padding and past S."""
    text = SiglipTextConfig.tiny(num_hidden_layers=0, vocab_size=7)
    cfg = RewardModelConfig.tiny(num_frames=5, grid=GRID, text=text, word_evidence=True)
    model = random_model(lambda: RewardModel(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.RandomState(3)
    frames = jnp.asarray(rng.randint(0, 256, (2, 5, 35, 42, 3)).astype(np.uint8))
    ids = rng.randint(0, 7, (2, 6))
    mask = np.array([[1] * 6, [1] * 4 + [0] * 2])
    v, cells = model.video_tokens(model.sample_frames(frames)), cfg.token_cell_map((5, 35, 42))
    ids_, mask_ = jnp.asarray(ids), jnp.asarray(mask)
    got = np.asarray(model._word_evidence(v, cells, model.encode_text(ids_), model.text_groups(ids_, mask_), ids_))
    assert got.shape == (2, 1 + math.prod(GRID), text.max_position_embeddings)
    scale, bias = math.exp(float(model.logit_scale[...][0])), float(model.logit_bias[...][0])
    for b in range(2):
        for s in range(6):
            if not mask[b, s]:
                continue
            swapped = np.repeat(ids[b:b + 1], 7, axis=0)
            swapped[:, s] = np.arange(7)
            t = model.match_text(jnp.asarray(swapped), jnp.asarray(np.repeat(mask[b:b + 1], 7, axis=0)))[:, 0]
            cosines = model._view_cosines(v[b:b + 1], cells, t[None])[0]  # the views' (test above) with each (K, V)
            logits = scale * np.asarray(cosines, np.float64) + bias
            expected = logits[:, ids[b, s]] - np.log(np.exp(logits).sum(-1))
            np.testing.assert_allclose(got[b, :, s], expected, rtol=1e-4, atol=1e-5)
    assert not got[1, :, 4:].any() and not got[:, :, 6:].any()
    # phase 0's word loss L_w reads the clip's row (reward/losses.py): the mean over valid videos' tokens
    fit = model.word_fit(model.match_video(frames), jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(fit), got[:, 0, :6], rtol=1e-5, atol=1e-6)
    batch = {"frames": frames, "input_ids": jnp.asarray(ids), "text_mask": jnp.asarray(mask),
             "valid": jnp.asarray([0.0, 1.0]), "group": jnp.asarray([0, 1])}
    plain, _ = losses.matching_terms(model, batch)
    total, terms = losses.matching_terms(model, batch, word=0.5)
    expected_word = -got[1, 0, :4].mean()  # video 0 is padding
    assert float(terms["word"]) == pytest.approx(expected_word, rel=1e-5)
    assert float(total) == pytest.approx(float(plain) + 0.5 * expected_word, rel=1e-5)
    out = model(frames, jnp.asarray(ids), jnp.asarray(mask))
    assert out["patch"].shape == (2, len(cfg.aspects), *GRID)
    for head in (model.video_head, model.patch_head):  # the heads read the P values next to the tokens' mean
        assert head.fc1.kernel[...].shape[0] == cfg.width + text.max_position_embeddings
    with pytest.raises(ValueError, match="word_evidence needs a text tower of depth 0"):
        RewardModelConfig.tiny(word_evidence=True)


def test_phrase_matching_finds_each_phrase_whole_in_one_token(tmp_path):
    """match_pool="phrases": prompts cut at separator tokens (a fourth phrase joins the third); the logits, match
    features and word evidence checked by brute force in float64 (rel. 1e-4): the mean over a prompt's phrases of
    the best token's cosine with the phrase's unit mean, a word swapped within its own phrase."""
    text = SiglipTextConfig.tiny(num_hidden_layers=0, vocab_size=9)
    cfg = RewardModelConfig.tiny(num_frames=5, grid=GRID, text=text, match_pool="phrases", separator_ids=(7, 8),
                                 max_phrases=3, match_features=True, word_evidence=True)
    model = random_model(lambda: RewardModel(cfg, rngs=nnx.Rngs(0)))
    frames = jnp.asarray(np.random.RandomState(5).randint(0, 256, (2, 5, 35, 42, 3)).astype(np.uint8))
    ids = np.array([[1, 2, 3, 7, 4, 5, 8, 6, 2, 0], [1, 2, 8, 3, 4, 7, 5, 6, 7, 2]])
    mask = np.array([[1] * 9 + [0], [1] * 10])
    phrase_of = np.array([[0, 0, 0, -1, 1, 1, -1, 2, 2, -1], [0, 0, -1, 1, 1, -1, 2, 2, -1, 2]])  # -1: in none
    groups = np.asarray(model.text_groups(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_array_equal(groups, (phrase_of[..., None] == np.arange(3)).astype(np.float32))

    v, cells = model.video_tokens(model.sample_frames(frames)), cfg.token_cell_map((5, 35, 42))
    u = np.asarray(v, np.float64).reshape(2, -1, cfg.width)
    u /= np.linalg.norm(u, axis=-1, keepdims=True)
    member = brute_force_cells((5, 35, 42), cfg.frame_indices(5), cfg.vision.grid, GRID).reshape(-1, 3)
    views = [np.ones(len(member), bool)] + [np.all(member == c, axis=-1) for c in np.ndindex(*GRID)]
    scale, bias = math.exp(float(model.logit_scale[...][0])), float(model.logit_bias[...][0])

    def phrase_units(tokens, row):  # (S, D) text tokens -> (3, D) unit phrase means of prompt `row`'s phrases
        t = np.stack([tokens[phrase_of[row] == p].mean(0) for p in range(3)])
        return t / np.linalg.norm(t, axis=-1, keepdims=True)

    tokens = np.asarray(model.encode_text(jnp.asarray(ids)), np.float64)
    t = [phrase_units(tokens[j], j) for j in range(2)]
    expected = np.array([[scale * np.mean((u[i] @ t[j].T).max(0)) + bias for j in range(2)] for i in range(2)])
    np.testing.assert_allclose(model.match_logits(frames, jnp.asarray(ids), jnp.asarray(mask)), expected, rtol=1e-4)
    held_out = pairwise_cosines(np.asarray(model.match_video(frames)), np.asarray(model.match_text(jnp.asarray(ids),
                                jnp.asarray(mask))), 1)  # phase 0's held-out report, one video at a time
    np.testing.assert_allclose(held_out, (expected - bias) / scale, rtol=1e-4)
    features = model._match_features(v, cells, model.encode_text(jnp.asarray(ids)), jnp.asarray(groups))
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    for b in range(2):
        want = np.stack([sig(scale * (u[b][view] @ t[b].T).max(0) + bias) for view in views])  # (1 + C, 3)
        np.testing.assert_allclose(features[b], want, rtol=1e-4)

    evidence = np.asarray(model._word_evidence(v, cells, model.encode_text(jnp.asarray(ids)), jnp.asarray(groups),
                                               jnp.asarray(ids)))
    for b in range(2):
        for s in np.flatnonzero(phrase_of[b] >= 0):
            swapped = np.repeat(ids[b:b + 1], 9, axis=0)
            swapped[:, s] = np.arange(9)
            words = np.asarray(model.encode_text(jnp.asarray(swapped)), np.float64)[:, phrase_of[b] == phrase_of[b, s]]
            ts = words.mean(1) / np.linalg.norm(words.mean(1), axis=-1, keepdims=True)  # (V, D)
            logits = np.stack([scale * (u[b][view] @ ts.T).max(0) + bias for view in views])  # (1 + C, V)
            want = logits[:, ids[b, s]] - np.log(np.exp(logits).sum(-1))
            np.testing.assert_allclose(evidence[b, :, s], want, rtol=1e-4, atol=1e-5)
    assert not evidence[:, :, 10:].any() and not evidence[:, :, :10].transpose(0, 2, 1)[phrase_of < 0].any()
    fit = model.word_fit(model.match_video(frames), jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(fit), evidence[:, 0, :10], rtol=1e-5, atol=1e-6)
    for head in (model.video_head, model.patch_head):  # tokens' mean + one feature per phrase + word evidence
        assert head.fc1.kernel[...].shape[0] == cfg.width + 3 + text.max_position_embeddings
    assert model(frames, jnp.asarray(ids), jnp.asarray(mask))["patch"].shape == (2, len(cfg.aspects), *GRID)

    # phrase_window=k: a token matches as the max over the k x k tokens down and right of it in its frame
    n = cfg.vision.grid
    grid_v = np.asarray(v).reshape(2, 5, n, n, -1)
    rows = [[grid_v[:, :, i:i + 2, j:j + 2].max(axis=(2, 3)) for j in range(n)] for i in range(n)]
    want = np.stack([np.stack(row, 2) for row in rows], 2)
    np.testing.assert_array_equal(np.asarray(window_max(v, n, 2)).reshape(want.shape), want)

    # the stage's config names separator words; the run's tokenizer gives their ids
    tokenizer = build_word_tokenizer(["a red circle and a blue square on a black background"], tmp_path / "tok")
    section = {"match_pool": "phrases", "phrase_separators": ("and", "on"), "text": {"num_hidden_layers": 0}}
    made = model_config(section, cfg.aspects, GRID, tokenizer=tokenizer)
    assert made.separator_ids == tuple(tokenizer.convert_tokens_to_ids(["and", "on"]))
    with pytest.raises(ValueError, match="'beside' is not one known token"):
        model_config({**section, "phrase_separators": ("beside",)}, cfg.aspects, GRID, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="max_phrases must be >= 1 and phrase_window"):
        RewardModelConfig.tiny(max_phrases=0)


def test_mean_max_heads_read_the_mean_and_the_max_of_their_tokens(monkeypatch):
    """head_pool="mean_max": each head reads [mean, max] of its tokens (2 x width). Recorded head inputs: the
    video's max half is the max of the cells' max halves, its mean half the token-count-weighted mean of
    the cells' mean halves (every token lies in exactly one cell)."""
    from halo_jax.models.reward.reward_model import ScoreHead

    cfg = RewardModelConfig.tiny(num_frames=5, grid=GRID, head_pool="mean_max")
    model = random_model(lambda: RewardModel(cfg, rngs=nnx.Rngs(0)))
    assert model.video_head.fc1.kernel[...].shape[0] == model.patch_head.fc1.kernel[...].shape[0] == 2 * cfg.width
    seen = []
    original = ScoreHead.__call__
    monkeypatch.setattr(ScoreHead, "__call__", lambda head, x: seen.append(np.asarray(x)) or original(head, x))
    rng = np.random.RandomState(3)
    frames = jnp.asarray(rng.randint(0, 256, (2, 5, 35, 42, 3)).astype(np.uint8))
    ids = jnp.asarray(rng.randint(0, cfg.text.vocab_size, (2, 8)))
    out = model(frames, ids)
    assert out["video"].shape == (2, len(cfg.aspects)) and out["patch"].shape == (2, len(cfg.aspects), *GRID)
    video_in, cells_in = seen  # video head first, then patch head
    d = cfg.width
    assert video_in.shape == (2, 2 * d) and cells_in.shape == (2, *GRID, 2 * d)
    cells = cfg.token_cell_map(frames.shape[1:4])
    counts = cells.membership(normalize=False).sum(axis=0).reshape(GRID)
    np.testing.assert_array_equal(video_in[:, d:], cells_in[..., d:].reshape(2, -1, d).max(axis=1))
    weighted = (cells_in[..., :d] * counts[None, ..., None]).reshape(2, -1, d).sum(axis=1) / counts.sum()
    np.testing.assert_allclose(video_in[:, :d], weighted, rtol=1e-5, atol=1e-6)
    assert np.all(video_in[:, d:] >= video_in[:, :d])  # a max is never below its mean
    with pytest.raises(ValueError, match="head_pool='sum'"):
        RewardModelConfig.tiny(head_pool="sum")
    with pytest.raises(ValueError, match="match_pool='mean_max'"):
        RewardModelConfig.tiny(match_pool="mean_max")


def test_frame_difference_tokens_embed_the_change_around_each_frame():
    """frame_differences: token n of sampled frame t gets PatchEmbed_d(x[t+1] - x[t-1]) (one-sided at the ends),
    checked against a loop over frames and token squares; the embedding starts at zero (a loaded model is
    unchanged) and its tokens reach the scores and the matching embedding; a still clip gets nothing from it
    whatever its weights."""
    cfg = RewardModelConfig.tiny(num_frames=4, grid=GRID, frame_differences=True, match_pool="max")
    built = nnx.jit(lambda: RewardModel(cfg, rngs=nnx.Rngs(0)))().difference_embedding  # one compile
    assert not np.any(built.kernel[...]) and not np.any(built.bias[...])
    model = random_model(lambda: RewardModel(cfg, rngs=nnx.Rngs(0)))
    emb = model.difference_embedding
    emb.bias[...] = jnp.zeros_like(emb.bias[...])
    rng = np.random.default_rng(4)
    moving = jnp.asarray(rng.integers(0, 256, (2, 6, 32, 32, 3)), jnp.uint8)
    x = np.asarray(model.sample_frames(moving))  # (B, T, S, S, C)
    got = np.asarray(model.difference_tokens(jnp.asarray(x)))
    p, t, g = cfg.vision.patch_size, cfg.num_frames, cfg.vision.grid
    kernel = np.asarray(emb.kernel[...])
    for f in range(t):
        d = x[:, min(f + 1, t - 1)] - x[:, max(f - 1, 0)]
        for i in range(g):
            for j in range(g):
                square = d[:, i * p:(i + 1) * p, j * p:(j + 1) * p]
                np.testing.assert_allclose(got[:, f, i * g + j], np.einsum("bxyc,xycd->bd", square, kernel),
                                           rtol=1e-4, atol=1e-4)
    # the tokens the temporal blocks and the matching embedding read (here its max, match_pool="max")
    v = np.asarray(model.proj_in(model.encode_pixels(jnp.asarray(x)))) + got
    np.testing.assert_allclose(model.video_tokens(jnp.asarray(x)), v, rtol=1e-5, atol=1e-5)
    pooled = v.max(axis=(1, 2))
    np.testing.assert_allclose(model.match_video(moving)[:, 0], pooled / np.linalg.norm(pooled, axis=-1, keepdims=True),
                               rtol=1e-5, atol=1e-6)
    still = model.sample_frames(jnp.repeat(moving[:, :1], 6, axis=1))
    assert not np.any(model.difference_tokens(still))
    ids = jnp.asarray(rng.integers(0, cfg.text.vocab_size, (2, 8)))
    with_differences = model(moving, ids)["video"]
    emb.kernel[...] = jnp.zeros_like(emb.kernel[...])
    assert not np.allclose(with_differences, model(moving, ids)["video"], atol=1e-3)


def test_pixel_mlp_tokens_embed_each_square_of_the_frame_and_its_difference():
    """pixel_mlp: token n of sampled frame t also gets fc2(gelu(fc1([square of x_t, square of x[t+1] - x[t-1]])))
    (the squares flattened row by row, channels last), checked against numpy on every square; fc2 starts at
    zero (a loaded model is unchanged); the tokens reach the matching embedding and the scores."""
    cfg = RewardModelConfig.tiny(num_frames=3, grid=GRID, frame_differences=True, pixel_mlp=6)
    built = nnx.jit(lambda: RewardModel(cfg, rngs=nnx.Rngs(0)))().pixel_mlp  # one compile
    assert not np.any(built.fc2.kernel[...]) and not np.any(built.fc2.bias[...])
    p, t, g = cfg.vision.patch_size, cfg.num_frames, cfg.vision.grid
    assert built.fc1.kernel[...].shape == (p * p * 2 * cfg.vision.num_channels, 6)
    model = random_model(lambda: RewardModel(cfg, rngs=nnx.Rngs(0)))
    clip = jnp.asarray(np.random.default_rng(5).integers(0, 256, (2, 5, 32, 32, 3)), jnp.uint8)
    x = np.asarray(model.sample_frames(clip))
    w1, b1 = np.asarray(model.pixel_mlp.fc1.kernel[...]), np.asarray(model.pixel_mlp.fc1.bias[...])
    w2, b2 = np.asarray(model.pixel_mlp.fc2.kernel[...]), np.asarray(model.pixel_mlp.fc2.bias[...])
    expected = np.asarray(model.proj_in(model.encode_pixels(jnp.asarray(x)))) + np.asarray(
        model.difference_tokens(jnp.asarray(x)))
    for f in range(t):
        both = np.concatenate([x[:, f], x[:, min(f + 1, t - 1)] - x[:, max(f - 1, 0)]], axis=-1)
        for i in range(g):
            for j in range(g):
                square = both[:, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(2, -1)
                expected[:, f, i * g + j] += np.asarray(jax.nn.gelu(square @ w1 + b1)) @ w2 + b2
    np.testing.assert_allclose(model.video_tokens(jnp.asarray(x)), expected, rtol=1e-4, atol=1e-4)
    ids = jnp.asarray(np.random.default_rng(6).integers(0, cfg.text.vocab_size, (2, 8)))
    scores, matched = model(clip, ids)["video"], model.match_video(clip)
    model.pixel_mlp.fc2.kernel[...] = jnp.zeros_like(model.pixel_mlp.fc2.kernel[...])
    assert not np.allclose(scores, model(clip, ids)["video"], atol=1e-3)
    assert not np.allclose(matched, model.match_video(clip), atol=1e-4)
    with pytest.raises(ValueError, match="pixel_mlp must be >= 0"):
        RewardModelConfig.tiny(pixel_mlp=-1)


def test_conv_stem_tokens_embed_two_convolutions_of_the_frame_and_its_difference():
    """conv_stem: token n of sampled frame t also gets PatchEmbed_{p/2}(gelu(conv_2(gelu(conv_1(y))))) of y = [x_t,
    x[t+1] - x[t-1]], conv_1 3x3 stride 2, conv_2 3x3 stride 1, zero padding 1, checked against numpy sums over
    every output pixel; the patch embedding starts at zero (a loaded model is unchanged); the tokens reach the
    matching embedding and the scores."""
    cfg = RewardModelConfig.tiny(num_frames=3, grid=GRID, frame_differences=True, conv_stem=5)
    built = nnx.jit(lambda: RewardModel(cfg, rngs=nnx.Rngs(0)))().conv_stem  # one compile
    assert not np.any(built.embed.kernel[...]) and not np.any(built.embed.bias[...])
    c_in = 2 * cfg.vision.num_channels
    assert built.kernel1[...].shape == (3, 3, c_in, 5) and built.kernel2[...].shape == (3, 3, 5, 5)
    model = random_model(lambda: RewardModel(cfg, rngs=nnx.Rngs(0)))
    stem = model.conv_stem
    clip = jnp.asarray(np.random.default_rng(7).integers(0, 256, (2, 5, 32, 32, 3)), jnp.uint8)
    x = np.asarray(model.sample_frames(clip))  # (2, 3, 28, 28, 3)
    t, size, p = cfg.num_frames, cfg.image_size, cfg.vision.patch_size

    def conv(y, kernel, bias, stride):  # y (B, S, S, C), zero padding 1, 3x3
        padded = np.pad(y, ((0, 0), (1, 1), (1, 1), (0, 0)))
        n = (y.shape[1] - 1) // stride + 1
        out = np.zeros((y.shape[0], n, n, kernel.shape[-1]), np.float64)
        for i in range(n):
            for j in range(n):
                window = padded[:, stride * i:stride * i + 3, stride * j:stride * j + 3]
                out[:, i, j] = np.einsum("bklc,klcd->bd", window, kernel)
        return np.asarray(jax.nn.gelu(jnp.asarray(out + bias, jnp.float32)))

    params = [np.asarray(v[...]) for v in (stem.kernel1, stem.bias1, stem.kernel2, stem.bias2)]
    w, b = np.asarray(stem.embed.kernel[...]), np.asarray(stem.embed.bias[...])
    expected = np.asarray(model.proj_in(model.encode_pixels(jnp.asarray(x)))) + np.asarray(
        model.difference_tokens(jnp.asarray(x)))
    q, g = p // 2, size // p
    for f in range(t):
        y = np.concatenate([x[:, f], x[:, min(f + 1, t - 1)] - x[:, max(f - 1, 0)]], axis=-1)
        h = conv(conv(y, params[0], params[1], 2), params[2], params[3], 1)  # (2, 14, 14, 5)
        assert h.shape[1] == size // 2
        for i in range(g):
            for j in range(g):
                square = h[:, i * q:(i + 1) * q, j * q:(j + 1) * q]
                expected[:, f, i * g + j] += np.einsum("bklc,klcd->bd", square, w) + b
    np.testing.assert_allclose(model.video_tokens(jnp.asarray(x)), expected, rtol=1e-4, atol=1e-4)
    ids = jnp.asarray(np.random.default_rng(8).integers(0, cfg.text.vocab_size, (2, 8)))
    scores, matched = model(clip, ids)["video"], model.match_video(clip)
    stem.embed.kernel[...] = jnp.zeros_like(stem.embed.kernel[...])
    assert not np.allclose(scores, model(clip, ids)["video"], atol=1e-3)
    assert not np.allclose(matched, model.match_video(clip), atol=1e-4)
    with pytest.raises(ValueError, match="needs an even vision.patch_size"):
        RewardModelConfig.tiny(conv_stem=4, vision=SiglipVisionConfig.tiny(patch_size=7))


def test_clipped_scores_stay_in_range_with_the_identity_gradient():
    """clip_scores: the value is clip(s, 1, 5), the gradient the identity's (straight-through), so a score
    beyond a bound still learns a label inside the range."""
    raw = jnp.asarray(np.random.default_rng(0).normal(3.0, 4.0, size=(64,)), jnp.float32)  # far off 1..5
    assert float(raw.min()) < 1.0 and float(raw.max()) > 5.0
    np.testing.assert_array_equal(clip_to_label_range(raw), jnp.clip(raw, 1.0, 5.0))
    np.testing.assert_array_equal(jax.grad(lambda s: jnp.sum(clip_to_label_range(s)))(raw), 1.0)


def test_a_clipping_model_returns_clipped_and_raw_scores(model):
    """With clip_scores the model returns its heads' raw outputs too, and the clipped ones are theirs."""
    cfg = dataclasses.replace(model.config, clip_scores=True, score_offset=4.9)  # raw scores on both sides of 5
    clipping = random_model(lambda: RewardModel(cfg, rngs=nnx.Rngs(0)))
    nnx.update(clipping, nnx.state(model))
    rng = np.random.default_rng(1)
    frames = jnp.asarray(rng.integers(0, 256, (2, 5, 28, 28, 3)), jnp.uint8)
    ids = jnp.asarray(rng.integers(1, cfg.text.vocab_size, (2, 6)))
    out = clipping(frames, ids)
    assert set(out) == {"video", "patch", "video_raw", "patch_raw"}
    for k in ("video", "patch"):
        np.testing.assert_array_equal(out[k], jnp.clip(out[f"{k}_raw"], 1.0, 5.0))
    np.testing.assert_allclose(out["video_raw"], model(frames, ids)["video"] + 1.9, rtol=1e-6)
