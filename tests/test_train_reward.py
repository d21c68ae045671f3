"""Stages `train_reward` and `score` on oracle-labelled shapes videos: learning, resume, export, scores, bad labels.

One tiny training run (module fixture) is shared: 800 synthetic 9x32x32 videos (blotch and
noise defects, the `visual_quality` aspect: the clearest signal a from-scratch tiny model can
pick up in 150 steps: held-out Spearman 0.58 (0.63 after 200 steps), where 400 videos gave only
0.35-0.47), phase 1 then a 2-step phase 2. The resume test copies its workdir: the
copy trains phase 2 for 4 steps in one go, the original continues its checkpoint from step 2
to 4; both must end with the same weights. The persistent compilation cache (a temporary
folder, this module only) lets the repeated runs reuse the compiled steps.
"""

import json
import logging
import math
import shutil

import jax
import ml_collections
import numpy as np
import pytest
from dpo_world import random_module
from flax import nnx

from halo_jax.config import ConfigError, base_config, reward_config, score_config
from halo_jax.convert.safetensors_io import SafetensorsFolder
from halo_jax.data import shapes
from halo_jax.data.stores import RolloutRecord, StoreReader, StoreWriter
from halo_jax.parallel.mesh import make_mesh
from halo_jax.reward import data as rdata
from halo_jax.reward.losses import LossWeights
from halo_jax.reward.model_io import create_model, load_reward_model, tokenize
from halo_jax.stages import score as score_stage
from halo_jax.stages import train_reward
from halo_jax.train.metrics import read_metrics

CLIP = (9, 32, 32)
ASPECTS = ("visual_quality",)


pytestmark = pytest.mark.usefixtures("compilation_cache")  # a resumed run reuses the compiled steps


PHASE1_STEPS = 150


def make_config(phase1_steps=PHASE1_STEPS, phase2_steps=2):
    c = base_config()
    c.stage = "train_reward"
    c.aspects = ASPECTS
    c.grid = (2, 2, 2)
    c.mesh.update(data=-1, fsdp=1)
    c.checkpoint.every_steps = 1000
    c.log.every_steps = 50
    c.log.progress = False
    c.reward = r = reward_config()
    r.synthetic_videos = 800
    r.synthetic.kinds = ("blotch", "noise")
    r.video.update(frames=CLIP[0], height=CLIP[1], width=CLIP[2])
    r.heldout_fraction = 0.25
    r.model.update(num_frames=5, width=32, num_layers=1, head_hidden=32)
    r.model.vision.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, image_size=32, patch_size=8)
    r.model.text.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    r.phase1.update(steps=phase1_steps, batch_size=32, learning_rate=3e-3, warmup_steps=10)
    r.phase2.update(steps=phase2_steps, batch_size=32, learning_rate=1e-3, warmup_steps=0, schedule_steps=4)
    r.eval_batch_size = 16
    c.score = score_config()
    c.score.aspect_weights = {"visual_quality": 1.0}
    c.score.batch_size = 16  # the eval batch: one compiled forward for both
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reward_run")
    train_reward.run(make_config(), str(workdir))
    return workdir


def test_train_reward_learns_and_reports(trained, capsys):
    root = trained / "reward"
    ev1 = json.loads((root / "eval_phase1.json").read_text())
    ev2 = json.loads((root / "eval_phase2.json").read_text())
    # 800 videos x 25% held-out prompts: ~200 held-out videos; chance is 0 +- 0.07
    assert ev1["counts"]["videos"] >= 120
    assert ev1["aspects"]["visual_quality"]["video_spearman"] > 0.4, ev1
    assert ev1["aspects"]["visual_quality"]["video_pairwise_accuracy"] > 0.5
    for key in ("video_pearson", "video_spearman", "video_pairwise_accuracy", "patch_spearman", "patch_defect_auroc"):
        assert key in ev2["aspects"]["visual_quality"] and key in ev2["mean"]
    split = json.loads((root / "split.json").read_text())
    assert split["train_videos"] + split["heldout_videos"] + json.loads((root / "bad_labels.json").read_text())[
        "rejected"] == 800
    assert (root / "synthetic" / "store.json").exists() and (root / "tokenizer" / "tokenizer_config.json").exists()
    m1 = read_metrics(root / "phase1" / "metrics.jsonl")
    assert m1[-1]["step"] == PHASE1_STEPS and m1[-1]["loss"] < m1[0]["loss"]
    assert "patch_mse" in read_metrics(root / "phase2" / "metrics.jsonl")[-1]
    info = json.loads((trained / "reward_ckpt" / "config.json").read_text())["info"]
    assert info["phases"] == {"phase1": PHASE1_STEPS, "phase2": 2} and info["clip"] == list(CLIP)
    # the overall reward of score.aspect_weights (visual quality alone here) is reported and kept with the export
    assert ev2["overall"]["weights"] == {a: float(a == "visual_quality") for a in ev2["aspects"]}
    assert ev2["overall"]["video_spearman"] == pytest.approx(ev2["aspects"]["visual_quality"]["video_spearman"])
    assert info["eval"]["phase2"]["overall"]["video_spearman"] == ev2["overall"]["video_spearman"]


def test_resumed_phase_ends_equal_to_an_uninterrupted_one(trained, tmp_path):
    fresh = tmp_path / "fresh"
    shutil.copytree(trained, fresh)
    shutil.rmtree(fresh / "reward" / "phase2")
    shutil.rmtree(fresh / "reward_ckpt")
    phase1_lines = len(read_metrics(trained / "reward" / "phase1" / "metrics.jsonl"))

    resumed = tmp_path / "resumed"
    shutil.copytree(trained, resumed)  # keep the module's run at 2 phase-2 steps for the other tests
    train_reward.run(make_config(phase2_steps=4), str(resumed))  # continues phase 2 from step 2
    train_reward.run(make_config(phase2_steps=4), str(fresh))  # phase 2 from phase 1, 4 steps in one go

    steps = [m["step"] for m in read_metrics(resumed / "reward" / "phase2" / "metrics.jsonl")]
    assert steps == [2, 4]  # 2 steps, then the resumed run logged only its own 2
    assert len(read_metrics(resumed / "reward" / "phase1" / "metrics.jsonl")) == phase1_lines  # phase 1 not redone
    a, b = SafetensorsFolder(resumed / "reward_ckpt"), SafetensorsFolder(fresh / "reward_ckpt")
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_allclose(np.asarray(a[key]), np.asarray(b[key]), rtol=0, atol=1e-6, err_msg=key)
    assert any(not np.array_equal(a[k], SafetensorsFolder(trained / "reward_ckpt")[k]) for k in a)


def test_phase0_matching_trains_the_towers_and_phase1_continues_it(tmp_path):
    """Phase 0 (video-text matching) learns to pick a held-out video's prompt above chance, changes only
    the towers, their projections (the difference embedding, pixel MLP and conv stem too) and the logit scale
    and bias; phase 1 records the phase 0 it continues."""
    config = make_config(phase1_steps=2, phase2_steps=0)
    config.reward.model.update(frame_differences=True, pixel_mlp=8, conv_stem=4)
    config.reward.synthetic_videos = 200
    config.reward.phase0.update(steps=30, batch_size=32, learning_rate=3e-3, warmup_steps=5)
    config.reward.phase0.hard_negatives = True
    train_reward.run(config, str(tmp_path))
    report = json.loads((tmp_path / "reward" / "eval_phase0.json").read_text())
    # measured with hard negatives and frame differences: top-1 0.15 among 13 held-out prompts (chance 0.077),
    # AUROC 0.71 (without frame differences 0.19 and 0.71; without either 0.23 and 0.79)
    assert report["retrieval_top1"] > 1.5 * report["chance"] and report["match_auroc"] > 0.65, report
    attributes = report["attributes"]  # every held-out video shows its prompt here (no mismatches)
    assert attributes["videos"] == report["counts"]["videos"], report
    assert all(0.0 <= attributes[a] <= 1.0 for a in shapes.ATTRIBUTES), report
    assert read_metrics(tmp_path / "reward" / "phase0" / "metrics.jsonl")[-1]["step"] == 30

    trained0 = load_reward_model(tmp_path / "reward" / "phase0" / "model").model
    after = nnx.to_flat_state(nnx.state(trained0, nnx.Param))
    initial = create_model(trained0.config, make_mesh(config.mesh), seed=config.seed)
    before = dict(nnx.to_flat_state(nnx.state(initial, nnx.Param)))
    changed = {str(path[0]) for path, var in after if not np.array_equal(np.asarray(var[...]),
                                                                          np.asarray(before[path][...]))}
    assert changed == set(train_reward.MATCHING_PARAMS), changed
    assert json.loads((tmp_path / "reward" / "phase1" / "done.json").read_text())["phase0_steps"] == 30

    config.reward.phase0.steps = 40  # phase 0 extended after phase 1 ran: refused before anything trains
    with pytest.raises(ConfigError, match="continues a phase 0 of 30 steps, but phase 0 now has 40"):
        train_reward.run(config, str(tmp_path))
    assert read_metrics(tmp_path / "reward" / "phase0" / "metrics.jsonl")[-1]["step"] == 30


def test_hard_negatives_change_one_attribute_and_ride_along_in_the_items():
    """Phase 0's hard negatives: per shapes video one prompt per attribute (or per entry of
    `negative_attributes`) with exactly that attribute of one object changed, the same however the data is
    cut; items carry their tokens and groups (a negative that is another example's prompt gets that prompt's
    group); non-shapes prompts get none (valid 0)."""
    prompts = ["a red circle moving left on a black background", "a red square moving left on a black background"]
    scores = np.full(1, 5.0, np.float32)
    ex = [rdata.Example(f"v{i}", p, "s", i, scores, None) for i, p in enumerate(prompts)]
    ex.append(rdata.Example("v2", "a cat on a sofa", "s", 2, scores, None))
    negatives = rdata.hard_negatives(ex, seed=0)
    assert negatives[2] == [] and rdata.hard_negatives(ex[1:2], seed=0) == negatives[1:2]
    for e, mine in zip(ex[:2], negatives):
        a = shapes.parse_prompt(e.prompt)
        changed = [{n for n in shapes.ATTRIBUTES if getattr(a.objects[0], n) != getattr(b.objects[0], n)}
                   for b in map(shapes.parse_prompt, mine)]
        assert changed == [{n} for n in shapes.ATTRIBUTES], (e.prompt, mine)
    negatives[0][1] = prompts[1]  # the shape negative of v0 is v1's prompt
    tokens = {p: (np.full(4, i, np.int32), np.ones(4, np.int32)) for i, p in
              enumerate(sorted({*prompts, "a cat on a sofa", *(p for n in negatives for p in n)}))}
    frames = [{"frames": np.zeros((3, 8, 8, 3), np.uint8)}] * 3
    data = rdata.RewardData(ex, {"s": frames}, (3, 8, 8), tokens, 1, (1, 1, 1)).with_negatives(negatives, {})
    first, last = data[0], data[2]
    assert first["negative_ids"].shape == (3, 4) and first["negative_valid"].tolist() == [1, 1, 1]
    assert first["negative_group"][1] == data[1]["group"] and first["negative_group"][0] >= len(data.prompt_ids)
    np.testing.assert_array_equal(first["negative_ids"][2], tokens[negatives[0][2]][0])
    assert last["negative_valid"].tolist() == [0, 0, 0] and np.all(last["negative_ids"] == last["input_ids"])
    assert data.subset(lambda e: e.video_id != "v0").negatives == negatives[1:]
    # `negative_attributes` picks the kinds (repeats: more of one), checked when the config is read
    section = ml_collections.ConfigDict({"negative_attributes": ("shape", "shape", "motion")})
    more = rdata.hard_negatives(ex, seed=0, attributes=train_reward.negative_attributes(section))
    assert [shapes.changed_attribute(ex[1].prompt, p) for p in more[1]] == ["shape", "shape", "motion"]
    for wrong in (("size",), ()):
        section.negative_attributes = wrong
        with pytest.raises(ConfigError, match="negative_attributes=.* must name one or more of"):
            train_reward.negative_attributes(section)


def test_twin_groups_keep_the_records_of_one_video_together(caplog):
    """losses.twin: groups by the prompt a video shows, a mismatched video and its shown copy in one group (same
    video_key, the only key they share); without it, groups by the labelled prompt. A twin weight with no second
    record to pair warns."""
    shown, other = "a red circle moving left on a black background", "a blue circle moving left on a black background"
    scores = np.full(1, 5.0, np.float32)
    ex = [rdata.Example("syn-1", shown, "s", 0, scores, None),
          rdata.Example("syn-2", other, "s", 1, scores, None, rendered_prompt=shown),
          rdata.Example(rdata.shown_id("syn-2"), shown, "s", 2, scores, None, rendered_prompt=shown),
          rdata.Example("syn-3", shown, "s", 3, scores, None),
          rdata.Example("syn-4", other, "s", 4, scores, None)]
    assert rdata.prompt_groups(ex, 2) == [[1, 4], [0, 2], [3]]
    assert rdata.prompt_groups(ex, 2, twins=True) == [[4], [0], [1, 2], [3]]
    assert rdata.prompt_groups(ex, 3, twins=True) == [[4], [0, 1, 2], [3]]
    with pytest.raises(ValueError, match="twin pairs need group_size >= 2"):
        rdata.prompt_groups(ex, 1, twins=True)
    tokens = {p: (np.zeros(4, np.int32), np.ones(4, np.int32)) for p in (shown, other)}
    data = rdata.RewardData(ex, {"s": [{"frames": np.zeros((3, 8, 8, 3), np.uint8)}] * 5}, (3, 8, 8), tokens, 1,
                            (1, 1, 1))
    keys = [int(data[i]["video_key"]) for i in range(5)]
    assert keys[1] == keys[2] and len(set(keys)) == 4
    group = rdata.GroupedSource(data, 3, twins=True)[1]
    assert group["video_key"].tolist() == [keys[0], keys[1], keys[1]] and group["valid"].tolist() == [1, 1, 1]
    # a twin weight without a video's second record warns that its loss is 0
    weights = LossWeights(twin=0.5)
    assert not train_reward.warn_without_twins(weights, data)
    alone = data.subset(lambda e: e.video_id != rdata.shown_id("syn-2"))
    with caplog.at_level(logging.WARNING):
        assert train_reward.warn_without_twins(weights, alone)
    assert "reward.synthetic.mismatch_pairs=True" in caplog.text
    assert not train_reward.warn_without_twins(LossWeights(), alone)


def test_a_finished_phase_continues_under_the_current_model_config(tmp_path):
    """A finished phase's weights are copied into the model of the current config (a changed option such
    as match_features takes effect next); a trained parameter that no longer fits is a ConfigError."""
    from halo_jax.models.reward import RewardModel, RewardModelConfig

    def build(seed, **kw):  # NumPy-random values: no per-initialiser XLA compiles
        return random_module(lambda: RewardModel(RewardModelConfig.tiny(**kw), rngs=nnx.Rngs(seed)), seed)

    finished = build(0)
    current = build(1, match_features=True, clip_scores=True)
    head_before = np.asarray(current.video_head.fc1.kernel[...])
    model = train_reward.adopt_phase_weights(current, finished, 0, tmp_path)
    assert model.config.match_features and model.config.clip_scores
    theirs = dict(nnx.to_flat_state(nnx.state(finished, nnx.Param)))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[0] != "video_head" and path[0] != "patch_head":  # same shapes: the finished phase's values
            np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(theirs[path][...]), err_msg=str(path))
    np.testing.assert_array_equal(np.asarray(model.video_head.fc1.kernel[...]), head_before)  # (D + 1, H): kept

    with pytest.raises(ConfigError, match=r"phase 1 trained video_head\.fc1\.kernel of shape \(32, 16\).*\(33, 16\)"):
        train_reward.adopt_phase_weights(current, finished, 1, tmp_path)  # phase 1 trained the video head
    with pytest.raises(ConfigError, match="phase 0 trained proj_in"):
        train_reward.adopt_phase_weights(build(1, width=64), finished, 0, tmp_path)


def _rollouts(folder, prompts, per_prompt=2):
    schema = RolloutRecord.schema((4, 3, 4, 4), (*CLIP, 3))
    with StoreWriter(folder, schema, process_index=0, chunk_size=3) as w:
        for p, prompt in enumerate(prompts):
            for k in range(per_prompt):
                frames = shapes.render(prompt, 10 * p + k, *CLIP)
                w.write(RolloutRecord(RolloutRecord.make_id(p, k), prompt, p, 10 * p + k, k,
                                      np.zeros((4, 3, 4, 4), np.float32), frames).to_record())


def test_score_writes_the_schema_pairs_reads(trained, tmp_path):
    workdir = tmp_path / "w"
    prompts = list(shapes.heldout_prompts()[:2]) + ["a red circle moving right on a black background"]
    _rollouts(workdir / "rollouts", prompts)
    config = make_config()
    config.stage = "score"
    config.score.model_path = str(trained / "reward_ckpt")
    score_stage.run(config, str(workdir))
    reader = StoreReader(workdir / "scores")
    assert [f.name for f in reader.schema.fields] == ["video_id", "prompt", "prompt_index", "sample_index", "seed",
                                                      "aspects", "video_scores", "patch_scores", "reward"]
    assert len(reader) == 6 and reader.ids() == sorted(RolloutRecord.make_id(p, k) for p in range(3) for k in range(2))
    recs = list(reader)
    for r in recs:
        assert r["aspects"] == list(ASPECTS)
        assert r["video_scores"].shape == (1,) and r["video_scores"].dtype == np.float32
        assert r["patch_scores"].shape == (1, 2, 2, 2) and r["patch_scores"].dtype == np.float32
        assert math.isclose(r["reward"], float(r["video_scores"][0]), rel_tol=1e-6)
        assert r["prompt"] == prompts[r["prompt_index"]] and r["seed"] == 10 * r["prompt_index"] + r["sample_index"]

    # equal to the reloaded model applied directly (float32, same program up to batch padding)
    loaded = load_reward_model(trained / "reward_ckpt")
    tokens = tokenize(loaded.tokenizer, prompts, loaded.text_max_length)
    frames = np.stack([StoreReader(workdir / "rollouts")[i]["frames"] for i in range(6)])
    ids = np.stack([tokens[r["prompt"]][0] for r in recs])
    mask = np.stack([tokens[r["prompt"]][1] for r in recs])
    graphdef, state = nnx.split(loaded.model)
    out = jax.jit(lambda s, f, i, m: nnx.merge(graphdef, s)(f, i, m))(state, frames, ids, mask)
    np.testing.assert_allclose(np.stack([r["video_scores"] for r in recs]), np.asarray(out["video"]), atol=1e-4)
    np.testing.assert_allclose(np.stack([r["patch_scores"] for r in recs]), np.asarray(out["patch"]), atol=1e-4)

    score_stage.run(config, str(workdir))  # resumable: nothing left to do, nothing written twice
    assert len(StoreReader(workdir / "scores")) == 6
    config.score.aspect_weights = {"sharpness": 1.0}
    with pytest.raises(ConfigError, match="sharpness"):
        score_stage.run(config, str(tmp_path / "w"))
    with pytest.raises(ConfigError, match="score.aspect_weights.*sharpness"):  # before any training
        train_reward.run(config, str(tmp_path / "w"))
    config.score.aspect_weights = {}
    config.reward.losses.bound_margin = 0.2
    with pytest.raises(ConfigError, match="bound_margin=0.2.*clip_scores=True"):  # a margin needs clipped scores
        train_reward.run(config, str(tmp_path / "w"))
    config.reward.losses.bound_margin = 0.0
    config.reward.losses.word = 1.0
    with pytest.raises(ConfigError, match="losses.word=1.0 needs a random text tower of depth 0"):  # depth 1 here
        train_reward.run(config, str(tmp_path / "w"))
    assert not (tmp_path / "w" / "reward").exists()


def _label(vid, prompt, **changes):
    rec = {"video_id": vid, "prompt": prompt, "cache_key": f"key-{vid}",
           "teacher": {"name": "oracle", "model": "exact", "prompt_version": "oracle-v1"},
           "aspects": list(ASPECTS), "grid": [2, 2, 2], "video_scores": {"visual_quality": 4.0},
           "patch_scores": {"visual_quality": [[[4.0, 5.0], [3.0, 2.0]], [[5.0, 5.0], [1.0, 2.5]]]}}
    rec.update(changes)
    return rec


def test_bad_labels_are_rejected_with_id_and_reason(tmp_path):
    prompts = ["a red circle moving right on a black background", "a blue square moving up on a white background"]
    _rollouts(tmp_path / "rollouts", prompts)
    good_patch = _label("x", "y")["patch_scores"]
    lines = [
        _label("p000000-s000", prompts[0]),
        _label("p000000-s001", prompts[0], video_scores={}),                                   # missing aspect
        _label("p000001-s000", prompts[1], grid=[1, 2, 2]),                                    # wrong grid
        _label("p000001-s001", prompts[1], video_scores={"visual_quality": float("nan")}),     # NaN
        _label("p000009-s000", prompts[1]),                                                    # no such rollout
        _label("p000000-s000", prompts[0], cache_key="other", patch_scores=good_patch),        # second label
    ]
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "labels.p00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    config = make_config()
    config.reward.synthetic_videos = 0
    examples, readers, bad = train_reward.gather_examples(config, str(tmp_path), tmp_path / "reward")
    assert [e.video_id for e in examples] == ["p000000-s000"]
    assert examples[0].patch_scores.shape == (1, 2, 2, 2) and examples[0].video_scores.tolist() == [4.0]
    reasons = {vid: reason for vid, _, reason in bad.rejected}
    assert set(reasons) == {"p000000-s000", "p000000-s001", "p000001-s000", "p000001-s001", "p000009-s000"}
    assert len(bad) == 5
    assert "missing aspect 'visual_quality'" in reasons["p000000-s001"]
    assert "grid" in reasons["p000001-s000"]
    assert "not a finite number" in reasons["p000001-s001"]
    assert "no rollout" in reasons["p000009-s000"]
    assert "second label" in reasons["p000000-s000"]
    assert bad.counts == {"labels": 5} and "5 rejected" in bad.summary_lines()[0]

    config.reward.on_bad_label = "fail"
    with pytest.raises(ConfigError, match=r"p000000-s001.*missing aspect"):
        train_reward.gather_examples(config, str(tmp_path), tmp_path / "reward")


def test_synthetic_videos_with_mismatched_prompts(tmp_path):
    """reward.synthetic.mismatch_fraction: a video is stored with an altered prompt (one attribute changed),
    keeps the prompt it was rendered from, and its oracle text alignment is the mismatched one."""
    from halo_jax.reward import data as rdata

    aspects = ("visual_quality", "text_alignment")
    kwargs = dict(seed=3, clip_shape=CLIP, grid=(1, 2, 2), aspects=aspects, videos_per_prompt=2, max_defects=0)
    rdata.synthesize(tmp_path / "all", 4, mismatch_fraction=1.0, **kwargs)
    rdata.synthesize(tmp_path / "none", 4, mismatch_fraction=0.0, **kwargs)
    mismatched, matched = StoreReader(tmp_path / "all"), StoreReader(tmp_path / "none")
    for i in range(4):
        m, c = mismatched[i], matched[i]
        assert m["rendered_prompt"] == c["prompt"] == c["rendered_prompt"] and m["prompt"] != m["rendered_prompt"]
        np.testing.assert_array_equal(m["frames"], c["frames"])  # the same render, judged against another text
        assert c["label"]["video_scores"]["text_alignment"] >= 4.9
        assert m["label"]["video_scores"]["text_alignment"] < 4.0

    # mismatch_pairs: each mismatched video is kept a second time, labelled against the prompt it shows
    rdata.synthesize(tmp_path / "pairs", 4, mismatch_fraction=1.0, mismatch_pairs=True, **kwargs)
    pairs = StoreReader(tmp_path / "pairs")
    by_id = {pairs[i]["video_id"]: pairs[i] for i in range(len(pairs))}
    assert sorted(by_id) == sorted([mismatched[i]["video_id"] for i in range(4)]
                                   + [rdata.shown_id(mismatched[i]["video_id"]) for i in range(4)])
    for i in range(4):
        m, c = mismatched[i], by_id[rdata.shown_id(mismatched[i]["video_id"])]
        assert by_id[m["video_id"]]["label"] == m["label"] and c["label"] == matched[i]["label"] | {
            "video_id": c["video_id"]}
        np.testing.assert_array_equal(c["frames"], m["frames"])
        assert rdata.planned_video_id(c["video_id"]) == m["video_id"] == rdata.planned_video_id(m["video_id"])

    # the held-out report's text reading: mismatched videos scored again with the prompt they show
    examples = rdata.examples_from_synthetic(pairs, aspects, (1, 2, 2), rdata.BadLabels())
    zeros = (np.zeros(4, np.int32), np.ones(4, np.int32))
    held = rdata.RewardData(examples, {"synthetic": pairs}, CLIP, {e.prompt: zeros for e in examples}, 2, (1, 2, 2))

    class Reader:  # text alignment 4 for the prompt a video shows, else 2
        def score(self, frames, prompts):
            assert len(frames) == len(prompts) == 4
            shown = [e.rendered_prompt for e in examples if not e.prompt_is_rendered]
            ta = np.array([4.0 if p in shown else 2.0 for p in prompts])
            return {"video": np.stack([np.full(4, 5.0), ta], axis=1),
                    "patch": np.broadcast_to(ta[:, None, None, None, None], (4, 2, 1, 2, 2)).copy()}

    labelled = np.array([2.0 if e.prompt_is_rendered else 3.0 for e in examples])  # scores with their own prompts
    changed = {shapes.changed_attribute(e.rendered_prompt, e.prompt) for e in examples if not e.prompt_is_rendered}
    assert None not in changed
    for offset, accuracy in ((0, 1.0), (1, 0.5)):  # ties count half
        by_attribute = {a: accuracy for a in shapes.ATTRIBUTES if a in changed}
        assert train_reward.text_reading(Reader(), held, labelled + offset, 1) == {
            "accuracy": accuracy, "videos": 4, "by_attribute": by_attribute}
    assert train_reward.text_reading(Reader(), held.subset(lambda e: e.prompt_is_rendered), labelled[:4], 1) is None
    # cells: those labelled below the threshold against the altered prompt, scored again with the shown one
    altered = [e for e in examples if not e.prompt_is_rendered]
    low = np.stack([e.patch_scores[1] for e in altered]) < 3.0
    assert low.any()
    cell_scores = np.where(np.stack([e.patch_scores[1] for e in examples]) < 3.0, 4.0, 1.0)  # ties where low
    cells = train_reward.text_reading(Reader(), held, labelled, 1, cell_scores)["cells"]
    assert cells["cells"] == int(low.sum()) and cells["accuracy"] == 0.5
    assert set(cells["by_attribute"]) <= set(shapes.ATTRIBUTES)
    assert train_reward.text_reading(Reader(), held, labelled, 1, cell_scores - 3.0)["cells"]["accuracy"] == 1.0
