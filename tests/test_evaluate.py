"""Stage `evaluate` on two tiny random Wan pipelines (2 held-out prompts x 2 seeds, 9 x 32 x 32), and
the statistics behind its metrics (bootstrap CI and defect / win rates against hand computations).

One stage run evaluates three "models": base, the same folder again ("same") and another DiT
("other"). Models of one architecture share one compiled sampler, so the run compiles once.
"""

import json
import shutil

import numpy as np
import pytest

from eval_world import PROMPTS, VIDEO, make_pipelines
from halo_jax.config import base_config, evaluate_config, generate_config
from halo_jax.data.video_io import read_mp4
from halo_jax.eval.metrics import compute_metrics, format_table
from halo_jax.eval.stats import bootstrap_indices, bootstrap_mean, defect_fraction, win_indicator
from halo_jax.eval.vbench import vbench_name
from halo_jax.models.wan import pipeline as pipeline_lib
from halo_jax.stages import evaluate as evaluate_stage
from halo_jax.stages import get_stage
from halo_jax.stages.generate import sample_seed

SEEDS = 2


def make_config(models: dict) -> object:
    config = base_config()
    generate_config(config)
    config.evaluate = evaluate_config()
    config.video.update(**VIDEO)
    config.sampler.num_steps = 3
    config.evaluate.update(models={k: str(v) for k, v in models.items()}, num_prompts=len(PROMPTS),
                           samples_per_prompt=SEEDS, batch_size=4, bootstrap=200, vbench=True, report_prompts=2)
    return config


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    base, other = make_pipelines(root)
    # A train_dpo-style metrics log beside "other" (the report plots it).
    (root / "dpo").mkdir()
    (root / "dpo" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 0.69 - 0.01 * s, "loss_video": 0.69, "loss_patch": 0.6, "acc_video": 0.5,
                    "acc_patch": 0.55}) + "\n" for s in range(1, 6)))
    config = make_config({"base": base, "same": base, "other": other})
    work = root / "work"
    get_stage("evaluate")(config, str(work))
    return config, work / "evaluate"


def _records(out):
    return [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]


def test_metrics_json_fields(evaluated):
    config, out = evaluated
    m = json.loads((out / "metrics.json").read_text())
    assert list(m["models"]) == ["base", "other", "same"] and m["base"] == "base"
    assert m["prompts"] == PROMPTS and m["samples_per_prompt"] == SEEDS and m["units"] == len(PROMPTS) * SEEDS
    assert m["generated_this_run"] == 3 * len(PROMPTS) * SEEDS and m["judges_run"] == ["oracle"]
    assert m["bootstrap"]["resamples"] == 200 and m["defect_threshold"] == 3.0
    j = m["judges"]["oracle"]
    assert j["aspects"] == list(config.aspects) and j["grid"] == list(config.grid)
    for name, e in j["models"].items():
        for key in ("video_score", "defect_rate"):
            assert set(e[key]) == {*config.aspects, "overall"}
            for est in e[key].values():
                assert est["lo"] <= est["mean"] <= est["hi"] and est["n"] == m["units"]
        assert 1.0 <= e["video_score"]["overall"]["mean"] <= 5.0
        assert ("win_rate" in e) == (name != "base")
    assert (out / "table.txt").read_text().startswith("oracle:")
    for name in m["models"]:
        assert len(list((out / name / "videos").glob("*.mp4"))) == len(PROMPTS) * SEEDS
    assert len(_records(out)) == 3 * len(PROMPTS) * SEEDS


def test_same_folder_same_seeds_identical_videos(evaluated):
    config, out = evaluated
    recs = {(r["model"], r["prompt_index"], r["sample_index"]): r for r in _records(out)}
    for p in range(len(PROMPTS)):
        for k in range(SEEDS):
            a, b, o = recs["base", p, k], recs["same", p, k], recs["other", p, k]
            assert a["seed"] == b["seed"] == o["seed"] == sample_seed(config.seed, p, k)
            np.testing.assert_array_equal(read_mp4(out / a["video"]), read_mp4(out / b["video"]))
            assert a["judges"] == b["judges"]
            assert not np.array_equal(read_mp4(out / a["video"]), read_mp4(out / o["video"]))
    assert not np.array_equal(read_mp4(out / recs["base", 0, 0]["video"]), read_mp4(out / recs["base", 0, 1]["video"]))
    win = json.loads((out / "metrics.json").read_text())["judges"]["oracle"]["models"]["same"]["win_rate"]
    for est in win.values():
        assert est["mean"] == 0.5 and est["lo"] <= 0.5 <= est["hi"]


def test_defect_rate_and_scores_match_records(evaluated):
    config, out = evaluated
    m = json.loads((out / "metrics.json").read_text())["judges"]["oracle"]["models"]
    records = _records(out)
    for name, e in m.items():
        mine = [r["judges"]["oracle"] for r in records if r["model"] == name]
        for a in config.aspects:
            cells = np.concatenate([np.ravel(j["patch_scores"][a]) for j in mine])
            assert e["defect_rate"][a]["mean"] == pytest.approx(np.mean(cells < config.defect_threshold), abs=1e-12)
            assert e["video_score"][a]["mean"] == pytest.approx(np.mean([j["video_scores"][a] for j in mine]))
        mean_cells = np.concatenate([np.mean([np.ravel(j["patch_scores"][a]) for a in config.aspects], axis=0)
                                     for j in mine])
        assert e["defect_rate"]["overall"]["mean"] == pytest.approx(np.mean(mean_cells < config.defect_threshold))


def test_vbench_export_and_report(evaluated):
    _, out = evaluated
    for name in ("base", "other", "same"):
        folder = out / "vbench" / name
        assert (folder / "prompts.txt").read_text().splitlines() == PROMPTS
        for r in (r for r in _records(out) if r["model"] == name):
            exported = folder / f"{r['prompt']}-{r['sample_index']}.mp4"
            assert exported.read_bytes() == (out / r["video"]).read_bytes()
    assert sorted(p.name for p in (out / "vbench" / "base").glob("*.mp4")) == sorted(
        vbench_name(p, k) for p in PROMPTS for k in range(SEEDS))
    index = (out / "report" / "index.html").read_text()
    for name in ("base", "other", "same"):
        assert f"media/{name}/p000000-s000_heat.gif" in index
    assert "plots/train_loss.png" in index and "plots/oracle_defect_rate.png" in index


def test_resume_generates_nothing_then_only_what_is_missing(evaluated, tmp_path, monkeypatch):
    config, out = evaluated
    config = config.copy_and_resolve_references()
    config.evaluate.update(report=False, vbench=False)  # only the generation is under test here
    work = tmp_path / "work"
    shutil.copytree(out, work / "evaluate")
    before = (work / "evaluate" / "other" / "records" / "p000001-s000.json").read_text()

    def no_load(*a, **k):
        raise AssertionError("resume must not load a model when every video is done")

    monkeypatch.setattr(evaluate_stage, "load_pipeline", no_load)
    get_stage("evaluate")(config, str(work))
    assert json.loads((work / "evaluate" / "metrics.json").read_text())["generated_this_run"] == 0
    assert (work / "evaluate" / "other" / "records" / "p000001-s000.json").read_text() == before

    # A missing record is regenerated alone, with its own seed (fake sampler: no compile).
    (work / "evaluate" / "other" / "records" / "p000001-s000.json").unlink()
    calls = []

    def fake_generate(self, prompts, seeds):
        calls.append((list(prompts), list(seeds)))
        n = len(prompts)
        return np.zeros((n, 1)), np.full((n, VIDEO["frames"], VIDEO["height"], VIDEO["width"], 3), 0, np.uint8)

    monkeypatch.setattr(evaluate_stage, "load_pipeline", pipeline_lib.load_pipeline)
    monkeypatch.setattr(pipeline_lib.Generator, "generate", fake_generate)
    get_stage("evaluate")(config, str(work))
    assert len(calls) == 1 and calls[0][1][0] == sample_seed(config.seed, 1, 0) and calls[0][0][0] == PROMPTS[1]
    assert json.loads((work / "evaluate" / "metrics.json").read_text())["generated_this_run"] == 1


def test_bootstrap_ci_against_hand_computation():
    values = np.array([3.0, 4.5, 1.0, 2.0, 5.0])
    resamples, seed = 40, 7
    idx = bootstrap_indices(len(values), resamples, seed)
    assert idx.shape == (resamples, 5) and idx.min() >= 0 and idx.max() < 5
    np.testing.assert_array_equal(idx, bootstrap_indices(len(values), resamples, seed))  # fixed RNG seed
    means = sorted(sum(values[i] for i in row) / 5 for row in idx.tolist())

    def quantile(q):  # linear interpolation between order statistics
        pos = q * (resamples - 1)
        lo = int(np.floor(pos))
        return means[lo] + (pos - lo) * (means[min(lo + 1, resamples - 1)] - means[lo])

    est = bootstrap_mean(values, idx)
    assert est.mean == pytest.approx(3.1) and est.n == 5
    assert est.lo == pytest.approx(quantile(0.025)) and est.hi == pytest.approx(quantile(0.975))
    assert est.lo < est.mean < est.hi
    const = bootstrap_mean(np.full(5, 2.5), idx)
    assert (const.lo, const.mean, const.hi) == (2.5, 2.5, 2.5)
    with pytest.raises(ValueError, match="one value per unit"):
        bootstrap_mean(values[:4], idx)


def test_win_and_defect_rates_on_fixed_records():
    np.testing.assert_array_equal(win_indicator([3, 2, 4], [2, 2, 5]), [1.0, 0.5, 0.0])
    np.testing.assert_array_equal(defect_fraction([[[2.9, 3.0]], [[1.0, 1.0]]], 3.0), [0.5, 1.0])

    def record(model, p, vq, ta, cells_vq, cells_ta):
        return {"model": model, "video_id": f"{p}", "prompt": "x", "prompt_index": p, "sample_index": 0, "seed": p,
                "judges": {"oracle": {"aspects": ["vq", "ta"], "grid": [1, 1, 2],
                                      "video_scores": {"vq": vq, "ta": ta},
                                      "patch_scores": {"vq": [[cells_vq]], "ta": [[cells_ta]]}}}}

    records = [record("base", 0, 3.0, 3.0, [2.0, 4.0], [2.0, 4.0]), record("base", 1, 2.0, 4.0, [1.0, 1.0], [5.0, 5.0]),
               record("base", 2, 4.0, 4.0, [5.0, 5.0], [5.0, 5.0]),
               record("new", 0, 4.0, 3.0, [4.0, 4.0], [2.0, 4.0]), record("new", 1, 3.0, 3.0, [1.0, 5.0], [5.0, 5.0]),
               record("new", 2, 3.0, 4.0, [5.0, 5.0], [1.0, 5.0])]
    m = compute_metrics(records, ["base", "new"], "base", threshold=3.0, resamples=50, seed=0)
    new = m["judges"]["oracle"]["models"]["new"]
    # overall video scores: base 3, 3, 4 ; new 3.5, 3, 3.5 -> wins 1, 0.5, 0
    assert new["win_rate"]["overall"]["mean"] == pytest.approx(0.5)
    assert new["win_rate"]["vq"]["mean"] == pytest.approx(2 / 3)  # 4>3, 3>2, 3<4
    # defect cells (< 3): vq 0 + 1 + 0 of 6 ; ta 1 + 0 + 1 of 6 ; mean over aspects: [3, 4], [3, 5], [3, 5] -> 0
    assert new["defect_rate"]["vq"]["mean"] == pytest.approx(1 / 6)
    assert new["defect_rate"]["ta"]["mean"] == pytest.approx(2 / 6)
    assert new["defect_rate"]["overall"]["mean"] == 0.0
    base = m["judges"]["oracle"]["models"]["base"]
    assert base["defect_rate"]["vq"]["mean"] == pytest.approx(3 / 6) and "win_rate" not in base
    assert base["video_score"]["overall"]["mean"] == pytest.approx(10 / 3)
    assert "new" in format_table(m, "base")
    with pytest.raises(ValueError, match="has no video"):
        compute_metrics(records[:5], ["base", "new"], "base", threshold=3.0)


def test_reward_model_judge_records(tmp_path):
    """The reward-model judge: a tiny random export scores videos into the record layout the metrics read."""
    from flax import nnx

    from dpo_world import random_module
    from halo_jax.data import shapes
    from halo_jax.models.reward.reward_model import RewardModel, RewardModelConfig
    from halo_jax.models.reward.siglip import SiglipTextConfig, SiglipVisionConfig
    from halo_jax.models.text import build_word_tokenizer
    from halo_jax.reward.model_io import save_reward_model

    tok = build_word_tokenizer(PROMPTS, tmp_path / "tok", model_max_length=8)
    cfg = RewardModelConfig(
        vision=SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=16, patch_size=8),
        text=SiglipTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              vocab_size=len(tok), max_position_embeddings=8),
        num_frames=2, width=16, num_layers=1, num_heads=2, head_hidden=16, grid=(2, 2, 2))
    model = random_module(lambda: RewardModel(cfg, rngs=nnx.Rngs(0)), 5)
    folder = save_reward_model(model, tmp_path / "reward_ckpt", tok, 8, info={"clip": [2, 16, 16]})
    config = make_config({"base": tmp_path})
    config.evaluate.update(reward_model=str(folder), teacher="none")
    assert evaluate_stage.judge_names(config.evaluate, PROMPTS) == ["reward_model"]
    judges = evaluate_stage.Judges(config, ["reward_model"], batch_size=2)
    frames = np.stack([shapes.render(p, 1, **VIDEO) for p in PROMPTS])
    verdicts = judges.judge(frames, PROMPTS)
    for v in verdicts:
        j = v["reward_model"]
        assert j["aspects"] == list(cfg.aspects) and j["grid"] == [2, 2, 2] and j["id"] == judges.ids["reward_model"]
        assert all(np.isfinite(j["video_scores"][a]) for a in cfg.aspects)
        assert all(np.shape(j["patch_scores"][a]) == (2, 2, 2) for a in cfg.aspects)
        assert judges.complete({"judges": v})
    records = [{"model": m, "video_id": str(i), "prompt": p, "prompt_index": i, "sample_index": 0, "seed": i,
                "judges": verdicts[i]} for m in ("base", "x") for i, p in enumerate(PROMPTS)]
    m = compute_metrics(records, ["base", "x"], "base", threshold=3.0, resamples=20)
    assert m["judges"]["reward_model"]["models"]["x"]["win_rate"]["overall"]["mean"] == 0.5


def test_prompt_selection_first_or_spread():
    from halo_jax.data import shapes

    section = evaluate_config()
    section.num_prompts = 4
    assert evaluate_stage.select_prompts(section) == list(shapes.heldout_prompts()[:4])
    section.prompt_selection = "spread"
    held = shapes.heldout_prompts()
    assert evaluate_stage.select_prompts(section) == [held[0], held[35], held[69], held[104]] and len(held) == 105
    section.update(prompts=("a", "b", "c"), num_prompts=2)
    assert evaluate_stage.select_prompts(section) == ["a", "c"]


def test_groups_pool_runs_and_compare_targets():
    """evaluate.groups: a group's per-unit value is the mean of its members'; stage compare's targets and table."""
    from ml_collections import ConfigDict

    from halo_jax.stages import compare

    def record(model, p, score, cells):
        return {"model": model, "video_id": f"{p}", "prompt": "x", "prompt_index": p, "sample_index": 0, "seed": p,
                "judges": {"oracle": {"aspects": ["vq"], "grid": [1, 1, 4], "video_scores": {"vq": score},
                                      "patch_scores": {"vq": [[cells]]}}}}

    runs = {  # model -> per unit (video score, cells); defect = cell < 3
        "base": [(2.0, [1, 1, 1, 5]), (3.0, [1, 1, 5, 5])],
        "gran_dpo_s0": [(4.0, [5, 5, 5, 5]), (4.0, [1, 5, 5, 5])],
        "gran_dpo_s1": [(3.0, [5, 5, 5, 5]), (5.0, [5, 5, 5, 5])],
        "diffusion_dpo_s0": [(3.0, [1, 1, 5, 5]), (3.0, [1, 1, 5, 5])],
    }
    records = [record(m, p, s, c) for m, units in runs.items() for p, (s, c) in enumerate(units)]
    groups = {"gran_dpo": ["gran_dpo_s0", "gran_dpo_s1"], "diffusion_dpo": ["diffusion_dpo_s0"]}
    m = compute_metrics(records, list(runs), "base", threshold=3.0, resamples=50, groups=groups)
    models = m["judges"]["oracle"]["models"]
    gran = models["gran_dpo"]
    # per unit, mean over the two runs: scores (3.5, 4.5); defect fractions (0, 1/8); wins vs base (1, 1)
    assert gran["video_score"]["vq"]["mean"] == pytest.approx(4.0)
    assert gran["defect_rate"]["overall"]["mean"] == pytest.approx(1 / 16)
    assert gran["win_rate"]["overall"]["mean"] == 1.0
    assert models["diffusion_dpo"]["defect_rate"]["vq"] == models["diffusion_dpo_s0"]["defect_rate"]["vq"]
    assert m["groups"] == groups
    with pytest.raises(ValueError, match="members"):
        compute_metrics(records, list(runs), "base", threshold=3.0, groups={"g": ["base"]})

    # base defect rate 5/8 -> gran 1/16 (90% lower); diffusion_dpo 1/2; gran's score 4.0 >= 3.0
    checks = compare.targets(models, "base")
    assert [ok for _, ok, _ in checks] == [True, gran["defect_rate"]["overall"]["hi"]
                                           < models["diffusion_dpo"]["defect_rate"]["overall"]["lo"], True]
    assert "90% lower" in checks[0][2]
    config = ConfigDict({"compare": {"variants": {"diffusion_dpo": 0.0, "gran_dpo": 1.0}, "seeds": (0, 1)},
                         "dpo": {"steps": 10}})
    plan = {"diffusion_dpo_s0": ("diffusion_dpo", 0, 0.0), "gran_dpo_s0": ("gran_dpo", 0, 1.0),
            "gran_dpo_s1": ("gran_dpo", 1, 1.0)}
    text = compare.results_markdown({**m, "base": "base"}, config, plan)
    lines = text.splitlines()
    assert lines[4].startswith("| base | - | 2.50") and lines[6].startswith("| gran_dpo | 2 | 4.00")
    assert "| Gran-DPO lowers the base's patch defect rate by at least 50% | yes | 62.5% -> 6.2% (90% lower) |" in text


def test_vlm_judge_against_a_fake_server(monkeypatch):
    """evaluate.vlm_judge: the VLM teacher of config.label.openai judges each video (OpenAI-compatible server on
    127.0.0.1); a video it gives up on gets no verdict, so its record stays incomplete and a re-run asks again."""
    from fake_vlm_server import FakeVLMServer, expected
    from halo_jax.config import label_config
    from halo_jax.data import shapes

    config = make_config({})
    config.label = label_config()
    grid = tuple(config.grid)
    server = FakeVLMServer(config.aspects, grid, plan={PROMPTS[1]: ["bad_json", "bad_json"]}, lifetime_s=60).start()
    try:
        monkeypatch.setenv("HALO_TEST_VLM_KEY", "sk-halo-test-evaluate")
        config.label.openai.update(base_url=server.url, api_key_env="HALO_TEST_VLM_KEY", num_frames=2, image_size=48,
                                   timeout_s=5.0, max_reasks=1, max_retries=1, backoff_base_s=0.01)
        config.evaluate.update(teacher="none", vlm_judge=True)
        assert evaluate_stage.judge_names(config.evaluate, PROMPTS) == ["openai_vlm"]
        judges = evaluate_stage.Judges(config, ["openai_vlm"], batch_size=2)
        frames = np.stack([shapes.render(p, 1, **VIDEO) for p in PROMPTS])
        verdicts = judges.judge(frames, PROMPTS, ["base/a", "base/b"])
    finally:
        server.stop()
    video, patch = expected(PROMPTS[0], config.aspects, grid)
    got = verdicts[0]["openai_vlm"]
    assert got["video_scores"] == video and got["patch_scores"] == patch and got["grid"] == list(grid)
    assert got["usage"]["requests"] == 1
    assert judges.complete({"judges": verdicts[0]}) and "openai_vlm" not in verdicts[1]
    assert not judges.complete({"judges": verdicts[1]})
    assert evaluate_stage.vlm_usage([{"judges": v} for v in verdicts])["requests"] == 1
