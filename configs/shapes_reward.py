"""The reward model of the moving-shapes world: video, then patch reward, on oracle-labelled videos.

    python -m halo_jax.main --config=configs/shapes_reward.py --workdir=workdir/shapes_reward

Trains on `synthetic_videos` rendered 17x32x32 videos with random local defects (all kinds),
labelled by the oracle (plus WORKDIR/labels when a label stage ran there), holds out 10% of the
prompts, and writes `reward/eval_phase{1,2}.json` (held-out video/patch Spearman against the
oracle; the issue's targets are video >= 0.90, patch >= 0.85, phase 2 not lowering video
Spearman by more than 0.02) and the export `reward_ckpt/`. Sized for one accelerator; the
`:cpu` variant (`--config=configs/shapes_reward.py:cpu`) is a smaller run a laptop finishes.
The towers are random tiny SigLIP towers trained from scratch (nothing can be downloaded);
with a local SigLIP folder set `--config.reward.siglip_path=...` and tune the towers.
"""

from halo_jax.config import base_config, reward_config, score_config


def get_config(variant: str = "accelerator"):
    config = base_config()
    config.stage = "train_reward"
    config.reward = r = reward_config()
    config.score = score_config()
    config.checkpoint.every_steps = 500
    config.log.every_steps = 50
    # 30000 videos, ten times the 3000 of before: text alignment 0.52 -> 0.66 on :cpu (README; the store takes
    # 8 min to render and label on 2 cores)
    r.synthetic_videos = 30000
    r.video.update(frames=17, height=32, width=32)
    r.heldout_fraction = 0.1
    # every frame (flicker alternates frames), 4x4-pixel tokens (defects are a few pixels wide)
    r.model.update(num_frames=17, width=128, num_layers=2, num_heads=4, head_hidden=128)
    r.model.vision.update(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                          image_size=32, patch_size=4)
    # the text tower reads each word without context (depth 0: word and position embeddings, final norm): with
    # one layer phase 0 memorised the training prompts (README, :cpu phase 0: held-out top-1 0.70 -> 0.90, shape
    # words 0.54 -> 0.71, motion words 0.69 -> 0.91)
    r.model.text.update(hidden_size=64, intermediate_size=128, num_hidden_layers=0, num_attention_heads=4)
    # scores clipped to 1..5 and a censored regression: labels at 5 ask for raw scores between 6 and 7, so
    # clean cells tie at 5 as their labels do (docs/architecture.md, "Clipped scores")
    r.model.clip_scores = True
    # the heads read the max of their tokens next to the mean: an object fills few of them (README, 3000
    # videos: patch text alignment 0.25 -> 0.39, visual quality 0.84 -> 0.80)
    r.model.head_pool = "mean_max"
    # tokens also embed x[t+1] - x[t-1]: motion and outlines local to a token (README, :cpu: video Spearman
    # 0.938 / 0.911 / 0.708 -> 0.953 / 0.940 / 0.749, patch 0.853 / 0.729 / 0.579 -> 0.891 / 0.799 / 0.616)
    r.model.frame_differences = True
    # phase 0 matches the max of the tokens, not their mean, which cancels a difference's two edges (README:
    # held-out top-1 retrieval 0.57 -> 0.69, motion words 0.49 -> 0.69; video Spearman +0.01)
    r.model.match_pool = "max"
    # the heads also read the matching probability of the video (of each cell) with its prompt: with the
    # depth-0 text tower that carries phase 0's reading of the words to them (README, :cpu: video text
    # alignment 0.748 -> 0.791, patch 0.614 -> 0.654, text reading 0.67 -> 0.73)
    r.model.match_features = True
    # and, for every prompt word, how much better it fits than every other word in its place (README, :cpu: text
    # reading 0.82 -> 0.84, patch temporal consistency 0.844 -> 0.854, patch text alignment 0.735 -> 0.725)
    r.model.word_evidence = True
    # every token also embeds two 3x3 convolutions of the frame and its difference: outlines and the direction of an
    # edge's movement are not linear in the pixels, and an outline split between tokens reaches each whole (README,
    # :cpu: phase-0 shape reading 0.74 -> 0.78 and text reading 0.87 -> 0.89 against the pixel MLP it replaced)
    r.model.conv_stem = 16
    # the patch head also reads the clip's match features and word evidence: the clip's say which word fails, the
    # cell's own whether its object is there (README, :cpu: patch text alignment 0.726 -> 0.763, motion-changed
    # cells scored clean 30% -> 11%; docs/architecture.md, "Cells read the clip")
    r.model.patch_reads_clip = True
    r.losses.bound_margin = 1.0
    # phase 0 also asks each prompt word to beat every other vocabulary word in its place (docs/architecture.md,
    # "Word loss"; phase 0 alone it changed nothing; it ran with a nonlinear token embedding in the README's headline)
    r.losses.word = 1.0
    # phases 1-2 also rank each mismatched video (and each of its cells) below its copy labelled against the prompt
    # it shows, the same pixels: the text's share of the error alone (README, :cpu: video text alignment 0.903 ->
    # 0.911, patch 0.823 -> 0.831; docs/architecture.md, "Twins")
    r.losses.twin = 0.5
    # phase 2 also ranks the cells of each video by their labels: a score the whole clip shares cancels in every
    # pair, so what tells one cell from another learns from it (README, :cpu, weights 0 / 1 / 2 / 3: patch text
    # alignment 0.831 / 0.843 / 0.844 / 0.852; docs/architecture.md, "Cell ranking")
    r.losses.cell_ranking = 3.0
    # a quarter of the videos labelled against an altered prompt: text alignment that needs the text; each
    # of them is also kept labelled against the prompt it shows (the same pixels under both texts)
    r.synthetic.mismatch_fraction = 0.25
    r.synthetic.mismatch_pairs = True
    # the towers are trained from scratch: phase 0 first teaches them which prompt a video shows, each video also
    # against its prompt with one object's colour, shape (twice) or motion changed (README, :cpu: phase 0 reads
    # shape 0.78 -> 0.88; docs/architecture.md, "Asking phase 0 for shape")
    r.phase0.update(steps=2000, batch_size=64, learning_rate=1e-3, warmup_steps=100, hard_negatives=True,
                    negative_attributes=("colour", "shape", "shape", "motion"))
    r.phase1.update(steps=6000, batch_size=64, learning_rate=1e-3, warmup_steps=200)
    r.phase2.update(steps=4000, batch_size=64, learning_rate=5e-4, warmup_steps=100)
    r.eval_batch_size = 64
    if variant == "cpu":
        r.model.update(width=64, num_layers=1, head_hidden=64)
        r.model.vision.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, patch_size=8)
        r.model.text.update(hidden_size=32, intermediate_size=64)
        # 2000 matching steps: with words read without context phase 0 keeps improving (README: top-1 0.90 ->
        # 0.93; video text alignment after phase 2 0.791 -> 0.829)
        # 4000 with the hard negatives: phase 0 reads shape 0.88 -> 0.91 (README, :cpu: video text alignment
        # 0.890 -> 0.899, patch 0.763 -> 0.794, patch temporal consistency 0.901 -> 0.911; 16 min more); 8000:
        # shape 0.91 -> 0.95 (video text alignment 0.899 -> 0.903, patch 0.794 -> 0.823; 32 min more)
        r.phase0.update(steps=8000, batch_size=64, learning_rate=2e-3, warmup_steps=50)
        r.phase1.update(steps=1500, batch_size=32, learning_rate=2e-3, warmup_steps=50)
        # 4000 patch-phase steps: without the pixel MLP every figure still rose from 4000 to 6000 (README, 2000 /
        # 4000 / 6000: video text alignment 0.828 / 0.852 / 0.862); with it 4000 beat that 6000 on every figure
        # (and the conv stem that replaced it 4000 again on all but patch text alignment)
        r.phase2.update(steps=4000, batch_size=32, learning_rate=1e-3, warmup_steps=50)
        r.eval_batch_size = 32
    elif variant != "accelerator":
        raise ValueError(f"unknown variant {variant!r}: use 'accelerator' (default) or 'cpu'")
    return config
