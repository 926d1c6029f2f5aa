"""The paper presets: every model, task and method preset builds and validates at its real shapes
and trains 2 steps on CPU with a tiny stand-in model; every evaluation preset runs on a few items
of the benchmark files. Runs share one module-wide compilation cache (same stand-in, same shapes)."""

import json
import os

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

import g2rpo_jax.eval as evaluation
from g2rpo_jax import models, sharding, train, train_step
from tests import stand_in

configs = stand_in.load_config_module("g2rpo")
eval_configs = stand_in.load_config_module("eval")
SHARED_DATA, needs_shared_data = stand_in.SHARED_DATA, stand_in.needs_shared_data
# Every method once (`adaptive` is g2rpo_a's other name), spread so that every model and task
# preset runs too: each distinct train step is compiled once, and both tasks share the sampler's.
RUNS = [("qwen3_0_6b_math", "sft"), ("qwen3_0_6b_math", "grpo"), ("qwen3_0_6b_math", "grpo_mu2"),
        ("qwen3_0_6b_code", "clip_higher"), ("qwen3_1_7b_math", "naive"), ("qwen3_8b_math", "g2rpo_a"),
        ("qwen3_0_6b_math", "ratio"), ("qwen3_1_7b_code", "linear_decay")]
GUIDED = ("naive", "g2rpo_a", "ratio", "linear_decay")


def test_the_runs_cover_every_method_model_and_task():
    assert {m for _, m in RUNS} == set(configs.METHODS) - {"adaptive"}
    assert {p.rpartition("_")[0] for p, _ in RUNS} == set(configs.MODELS)
    assert {p.rpartition("_")[2] for p, _ in RUNS} == set(configs.TASKS)


def parse_train_flags(*argv):
    """A config as `python -m g2rpo_jax.train` parses its command line."""
    argv = ["train", *argv]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True, sys_argv=argv)
    flag_values(argv)
    return flag_values.config


# ----------------------------------------------------------------------------- build and validate

def test_every_preset_and_method_builds_and_validates_at_its_real_shapes():
    assert len(configs.paper_presets()) == 6 and "qwen3_8b_code" in configs.paper_presets()
    for preset in configs.paper_presets():
        for method in configs.METHODS:
            cfg = configs.get_config(f"{preset},{method}")
            train.validate_config(cfg, sharding.make_mesh(dict(cfg.mesh.mesh)))  # 8 test devices
            assert cfg.run.workdir == f"runs/{preset}/{method}"
    assert configs.get_config("qwen3_1_7b_math").to_dict() == configs.get_config("qwen3_1_7b_math,g2rpo_a").to_dict()
    g2rpo_a = configs.get_config("qwen3_1_7b_math,g2rpo_a").to_dict()
    assert configs.get_config("qwen3_1_7b_math,adaptive").to_dict() == {
        **g2rpo_a, "run": {**g2rpo_a["run"], "workdir": "runs/qwen3_1_7b_math/adaptive"}}


def test_paper_values_and_what_each_method_changes():
    cfg = configs.get_config("qwen3_1_7b_math,g2rpo_a")
    assert (cfg.optim.learning_rate, cfg.optim.min_learning_rate, cfg.optim.warmup_steps) == (1e-5, 1e-6, 25)
    assert (cfg.step.temperature, cfg.step.beta, cfg.step.num_iterations, cfg.step.remat) == (0.7, 0.04, 1, True)
    assert (cfg.data.adapter, cfg.data.max_prompt_tokens, cfg.sampling.max_new_tokens) == ("openr1_math", 512, 4096)
    assert dict(cfg.rewards.weights) == {"accuracy": 1.0, "format": 0.1, "custom": 1.0}
    assert (cfg.guidance.mode, cfg.guidance.initial_length, cfg.guidance.max_length) == ("adaptive", 3072, 3072)
    assert (cfg.guidance.window, cfg.guidance.delta, cfg.guidance.alpha) == (3, 256, 0.25)
    grpo, mu2, clip = (configs.get_config(f"qwen3_1_7b_math,{m}") for m in ("grpo", "grpo_mu2", "clip_higher"))
    assert (grpo.guidance.mode, grpo.guidance.alpha, grpo.step.num_iterations) == ("none", 0.0, 1)
    # Clip-Higher and the GRPO row it is compared with: both off policy (μ = 2), only ε_high differs.
    assert (mu2.step.num_iterations, mu2.step.epsilon_high, mu2.optim.total_steps) == (2, 0.2, 1000)
    assert (clip.step.num_iterations, clip.step.epsilon_high) == (2, 0.28)
    clip_dict, mu2_dict = clip.to_dict(), mu2.to_dict()
    differences = {(section, key) for section in clip_dict if isinstance(clip_dict[section], dict)
                   for key in clip_dict[section] if clip_dict[section][key] != mu2_dict[section][key]}
    assert differences == {("step", "epsilon_high"), ("run", "workdir")}
    sft = configs.get_config("qwen3_1_7b_math,sft")
    assert (sft.step.loss_type, sft.step.group_size, sft.data.batch_size) == ("sft", 1, 256)
    assert configs.get_config("qwen3_1_7b_math,naive").guidance.mode == "fixed"
    assert configs.get_config("qwen3_1_7b_math,ratio").guidance.update_every == 3
    code = configs.get_config("qwen3_8b_code,g2rpo_a")
    assert (code.data.adapter, code.eval.tasks, dict(code.mesh.mesh)) == (
        "code_stdio", "humaneval", {"data": 1, "fsdp": -1, "tensor": 2})


def test_derived_totals_follow_command_line_overrides():
    config_arg = f"--config={os.path.join(stand_in.REPO, 'experiments/configs/g2rpo.py')}:qwen3_0_6b_math,linear_decay"
    cfg = parse_train_flags(config_arg, "--config.run.total_steps=200", "--config.step.num_iterations=3")
    assert (cfg.optim.total_steps, cfg.optim.warmup_steps, cfg.guidance.total_steps) == (600, 30, 200)
    cfg = parse_train_flags(config_arg, "--config.guidance.total_steps=50", "--config.optim.total_steps=70")
    assert (cfg.run.total_steps, cfg.guidance.total_steps, cfg.optim.total_steps, cfg.optim.warmup_steps) == (
        500, 50, 70, 3)
    assert json.loads(cfg.to_json_best_effort())["optim"]["total_steps"] == 70  # plain values in config.json
    demo = f"--config={os.path.join(stand_in.REPO, 'experiments/configs/g2rpo.py')}:demo,linear_decay"
    cfg = parse_train_flags(demo, "--config.run.total_steps=2")
    assert (cfg.optim.total_steps, cfg.guidance.total_steps) == (2, 2)  # ℓ decays to 0 over the 2 steps


def test_names_are_checked_and_legacy_presets_keep_their_variants():
    with pytest.raises(ValueError, match=r"config preset 'qwen3_4b_math' is unknown; valid: .*qwen3_1_7b_math"):
        configs.get_config("qwen3_4b_math,grpo")
    with pytest.raises(ValueError, match=r"method 'dapo' is unknown; valid: .*clip_higher"):
        configs.get_config("qwen3_0_6b_code,dapo")
    with pytest.raises(ValueError, match=r"variant 'grpo_mu2' is unknown"):
        configs.get_config("demo,grpo_mu2")  # the legacy presets keep exactly their old variants
    assert configs.get_config("demo,g2rpo_a").guidance.mode == "adaptive"  # the method's paper name works too
    demo = configs.get_config("demo,clip_higher")
    assert (demo.step.num_iterations, demo.step.epsilon_high, demo.model.dtype) == (1, 0.28, "float32")


# ----------------------------------------------------------------------------- 2 steps with a stand-in

@pytest.fixture(scope="module")
def stand_in_setup(tmp_path_factory):
    """The stand-in checkpoint, a math and a code training file, and the module's compile cache."""
    root = tmp_path_factory.mktemp("presets")
    files = {"checkpoint": stand_in.write_chat_stand_in(str(root / "stand_in")),
             "math": stand_in.write_jsonl(str(root / "math.jsonl"), stand_in.math_records()),
             "code": stand_in.write_jsonl(str(root / "code.jsonl"), stand_in.code_records()),
             "runs": root / "runs"}
    with stand_in.compilation_cache(str(root / "xla")):
        yield files


def at_test_size(cfg, files, workdir) -> None:
    """The preset at test size: the stand-in and small data, 8 prompts × G = 2 (16 rows: one group per
    batch shard on 8 devices), micro-batches of one group per batch shard as the model presets take,
    2 steps. Everything else (mesh, dtype, remat, method, rewards, lengths of guides) as the preset says."""
    task = "code" if cfg.data.adapter == "code_stdio" else "math"
    cfg.model.checkpoint, cfg.data.source = files["checkpoint"], files[task]
    supervised = cfg.step.loss_type == "sft"
    cfg.data.batch_size, cfg.step.group_size = (16, 1) if supervised else (8, 2)
    shards = sharding.batch_axis_size(sharding.make_mesh(dict(cfg.mesh.mesh)), tuple(cfg.mesh.rules))
    cfg.step.micro_batch_size = shards * cfg.step.group_size
    cfg.sampling.max_new_tokens = 44  # a whole guide (≤ 34 characters of math, ≤ 38 of fenced code) fits
    cfg.run.update({"total_steps": 2, "eval_every": 0, "save_hf_at_end": False, "workdir": str(workdir)})
    cfg.rewards.num_workers = 0
    cfg.mesh.compilation_cache_dir = ""  # the module's cache holds the programs


def cosine_rate(update: int, updates: int) -> float:
    """The paper recipe's learning rate at an update: cosine from 1e-5 to 1e-6 (5% warmup rounds to 0 here)."""
    return 1e-6 + 9e-6 * 0.5 * (1 + np.cos(np.pi * update / updates))


@pytest.mark.slow
@pytest.mark.parametrize("preset,method", RUNS)
def test_preset_trains_two_steps_with_a_stand_in_model(stand_in_setup, preset, method):
    cfg = configs.get_config(f"{preset},{method}")
    workdir = stand_in_setup["runs"] / f"{preset},{method}"
    at_test_size(cfg, stand_in_setup, workdir)
    train.train(cfg)
    records = stand_in.read_metrics(str(workdir))
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in records)
    # μ updates a step over a schedule of 2·μ updates (optim.total_steps follows both): the logged
    # rate is the mean over the step's updates.
    mu = cfg.step.num_iterations
    assert mu == (2 if method in ("grpo_mu2", "clip_higher") else 1)
    expected = [np.mean([cosine_rate(n, 2 * mu) for n in range(step * mu, (step + 1) * mu)]) for step in (0, 1)]
    assert [r["learning_rate"] for r in records] == pytest.approx(expected, rel=1e-5)
    if method == "sft":
        assert "reward/total" not in records[0] and records[0]["guided_token_share"] == 0.0
        return
    share = [r["guidance/guided_rollout_share"] for r in records]
    assert share == ([0.5, 0.5] if method in GUIDED else [0.0, 0.0])  # α = ¼ of G = 2 rounds up to 1
    lengths = [r["guidance/length"] for r in records]
    if method == "naive":
        assert lengths == [3072, 3072]
    if method == "linear_decay":
        assert lengths[1] < lengths[0]
    if method in GUIDED:
        # A whole trace (ℓ = 3072) holds the boxed answer or the fenced program: guided rollouts are right.
        assert [r["guidance/reward_guided"] for r in records] == [1.0, 1.0]
    if preset.endswith("code") and method in GUIDED:
        assert records[0]["reward_events/executions"] > 0  # the guided programs ran in the sandbox


# ----------------------------------------------------------------------------- evaluation presets

def test_eval_presets_follow_the_paper_protocol():
    for name, tasks in eval_configs.PRESETS.items():
        config = eval_configs.get_config(name)
        assert (config.temperature, config.top_p, config.top_k) == (0.6, 0.95, 20)
        assert (config.num_samples, config.pass_k, config.max_new_tokens) == (8, "1", 4096)
        assert config.tasks == tasks and evaluation.parse_task_list(tasks)
    assert eval_configs.get_config("aime24,humaneval").tasks == "aime24,humaneval"  # task lists as before
    assert eval_configs.get_config("").num_samples == evaluation.DEFAULT_NUM_SAMPLES
    with pytest.raises(ValueError, match=r"eval preset 'paper_gsm8k' is unknown; valid: .*paper_math500"):
        eval_configs.get_config("paper_gsm8k")


@pytest.fixture(scope="module")
def eval_data_root(tmp_path_factory):
    """../shared/data, plus the two benchmarks it does not ship, laid out where the presets look."""
    root = tmp_path_factory.mktemp("eval_root")
    for name in os.listdir(SHARED_DATA):
        os.symlink(os.path.join(os.path.abspath(SHARED_DATA), name), root / name)
    for path, source in ((eval_configs.GPQA_FILE, "tests/fixtures/eval/gpqa_style.jsonl"),
                         (eval_configs.LIVECODEBENCH_FILE, "tests/fixtures/data/code_stdio.jsonl")):
        os.makedirs(root / os.path.dirname(path), exist_ok=True)
        os.symlink(os.path.join(stand_in.REPO, source), root / path)
    return str(root)


@pytest.fixture(scope="module")
def qwen3_stand_in(tmp_path_factory):
    """A one-layer random Qwen3 with the real Qwen3 tokenizer and chat template."""
    path = str(tmp_path_factory.mktemp("qwen3_stand_in"))
    return models.write_random_checkpoint(path, models.TINY_QWEN3.replace(num_layers=1), seed=1)


@needs_shared_data
@pytest.mark.acceptance
@pytest.mark.parametrize("preset", sorted(eval_configs.PRESETS))
def test_eval_preset_runs_on_a_few_items(preset, qwen3_stand_in, eval_data_root, tmp_path):
    """Test size: 2 problems × 2 samples of 8 tokens, prompts cut to their last 64 tokens (one
    length bucket: every preset reuses the same compiled sampler); the protocol as the preset says."""
    config = eval_configs.get_config(preset)
    config.update({"checkpoint": qwen3_stand_in, "output_dir": str(tmp_path), "data_root": eval_data_root,
                   "limit": 2, "num_samples": 2, "max_new_tokens": 8, "dtype": "float32"})
    config.prompt.update({"max_prompt_tokens": 64, "overlong": "truncate_left"})
    config.rewards.num_workers = 0
    summary = evaluation.run(config)
    names = [spec.name for spec in evaluation.parse_task_list(eval_configs.PRESETS[preset])]
    assert list(summary["tasks"]) == names
    for metrics in summary["tasks"].values():
        assert (metrics["num_problems"], metrics["num_samples"]) == (2, 2) and 0 <= metrics["pass@1"] <= 1
    settings = summary["settings"]
    assert (settings["temperature"], settings["top_p"], settings["top_k"], settings["pass_k"]) == (0.6, 0.95, 20, [1])
    assert os.path.isfile(tmp_path / "summary.json")


def test_gpqa_preset_scores_the_letter_in_the_box(tmp_path):
    """Gold letters score 1, a wrong letter 0, on the GPQA-style fixture (the options are shuffled)."""
    config = eval_configs.get_config("paper_gpqa")
    root = tmp_path / "root"
    os.makedirs(root / "gpqa")
    os.symlink(os.path.join(stand_in.REPO, "tests/fixtures/eval/gpqa_style.jsonl"), root / eval_configs.GPQA_FILE)
    config.update({"data_root": str(root), "num_samples": 2})
    config.rewards.num_workers = 0
    settings = evaluation.EvalSettings.from_config(config)

    def answer_with(pick):
        return lambda examples, k: [[f"Reasoning. The answer is \\boxed{{{pick(e)}}}."] * k for e in examples]

    gold = evaluation.evaluate(None, None, None, config.tasks, settings,
                               completions_fn=answer_with(lambda e: e.answer))
    wrong = evaluation.evaluate(None, None, None, config.tasks, settings,
                                completions_fn=answer_with(lambda e: "B" if e.answer != "B" else "C"))
    assert gold["tasks"]["gpqa_diamond"]["pass@1"] == 1.0 and gold["tasks"]["gpqa_diamond"]["num_problems"] == 3
    assert wrong["tasks"]["gpqa_diamond"]["pass@1"] == 0.0


# ----------------------------------------------------------------------------- experiments/README.md

def paper_rows() -> list[list[str]]:
    """The commands of the README's paper-row table, each split into its words."""
    with open(os.path.join(stand_in.REPO, "experiments", "README.md"), encoding="utf-8") as handle:
        text = handle.read()
    table = text.split("<!-- paper rows: begin")[1].split("<!-- paper rows: end -->")[0]
    return [line.split(" | ")[4].strip("`").split() for line in table.splitlines() if line.startswith("| ") and
            line.split(" | ")[0][2:].isdigit()]


def flag(name: str, words: list[str]) -> str:
    return next(w.split("=", 1)[1] for w in words if w.startswith(name + "="))


def test_readme_lists_a_command_for_every_paper_row():
    seen = set()
    for words in paper_rows():
        train_words, evaluate = [], words  # a base row only evaluates
        if "&&" in words:
            train_words, evaluate = words[: words.index("&&")], words[words.index("&&") + 1:]
        eval_preset = flag("--config", evaluate).split(":")[1]
        assert eval_preset in eval_configs.PRESETS
        if train_words:
            preset, method = flag("--config", train_words).split(":")[1].split(",")
            cfg = configs.get_config(f"{preset},{method}")
            assert flag("--checkpoint", evaluate) == f"{cfg.run.workdir}/final_hf"  # evaluates what it trained
        else:
            preset, method = flag("--output_dir", evaluate).split("/")[1], "base"
        assert flag("--output_dir", evaluate) == f"runs/{preset}/{method}/final_eval"
        assert eval_preset == f"paper_{preset.rpartition('_')[2]}"
        seen.add((preset, method))
    methods = set(configs.METHODS) - {"adaptive"} | {"base"}
    assert seen == {(p, m) for p in configs.paper_presets() for m in methods}
